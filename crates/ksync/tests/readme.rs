//! The README's quick start is the compiled example it says it is: its code block is the marked
//! part of `examples/quick_start.rs` word for word, and its `use` lines are the example's.

const README: &str = include_str!("../../../README.md");
const EXAMPLE: &str = include_str!("../examples/quick_start.rs");

/// The text between `begin` and `end` in `text` (each on a line of its own).
fn between<'a>(text: &'a str, begin: &str, end: &str) -> &'a str {
    let start = text
        .find(begin)
        .unwrap_or_else(|| panic!("{begin:?} not found"))
        + begin.len();
    let len = text[start..]
        .find(end)
        .unwrap_or_else(|| panic!("{end:?} not found after {begin:?}"));
    &text[start..start + len]
}

#[test]
fn the_quick_start_in_the_readme_is_the_example() {
    let section = between(README, "## Quick start\n", "\n## ");
    let block = between(section, "```rust\n", "```\n");
    let region = between(
        EXAMPLE,
        "// README quick start begins\n",
        "// README quick start ends",
    );
    let (uses, body) = block
        .split_once("\n\n")
        .expect("the README block: use lines, a blank line, then the example");
    assert_eq!(
        body, region,
        "README.md's quick start differs from examples/quick_start.rs (copy the marked region)"
    );
    for line in uses.lines() {
        assert!(
            line.starts_with("use ") && EXAMPLE.lines().any(|l| l == line),
            "README.md's quick start has {line:?}, which the example does not"
        );
    }
}
