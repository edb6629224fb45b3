//! `cargo xtask chaos`: the reliability and security suite with its long budgets, the fuzz
//! targets for a fixed time each, and one table of figures.
//!
//! The suite is the `reliability` test binary of `ksync-tests` (`tests/tests/reliability`);
//! with `KSYNC_CHAOS=1` every test switches to its long budget, and each appends its figures
//! (JSON lines) to the file named by `KSYNC_FIGURES`. The fuzz targets live in `fuzz/` (a
//! cargo-fuzz project outside the workspace) and run with `--sanitizer none` on stable.

use std::collections::BTreeMap;
use std::path::Path;

use std::time::Instant;

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask chaos [--fuzz-secs N] [--no-fuzz] [--only FILTER] [--fast]
  --fuzz-secs N   seconds per fuzz target (default 60)
  --no-fuzz       skip the fuzz targets
  --only FILTER   run only the suite tests whose name contains FILTER (e.g. crash, auth)
  --fast          the cargo-test budgets instead of the long ones";

/// The fuzz targets in `fuzz/fuzz_targets/`.
const FUZZ_TARGETS: &[&str] = &[
    "event_decoder",
    "ws_message",
    "push_body",
    "file_log_recovery",
    "repo_name",
];

#[derive(Debug, serde::Deserialize)]
struct Figure {
    suite: String,
    figure: String,
    value: String,
    expect: String,
    ok: bool,
}

struct Options {
    fuzz_secs: u64,
    fuzz: bool,
    only: Option<String>,
    fast: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        fuzz_secs: 60,
        fuzz: true,
        only: None,
        fast: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--fuzz-secs" => {
                options.fuzz_secs = it
                    .next()
                    .context("--fuzz-secs needs a number")?
                    .parse()
                    .context("--fuzz-secs needs a number")?;
            }
            "--no-fuzz" => options.fuzz = false,
            "--only" => options.only = Some(it.next().context("--only needs a filter")?.clone()),
            "--fast" => options.fast = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown option {other:?}\n{USAGE}"),
        }
    }
    Ok(options)
}

/// Runs the suite (and the fuzz targets), prints the table; fails if a test failed or a
/// figure missed its expectation.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    let root = crate::workspace_root();
    let out_dir = root.join("target").join("chaos");
    std::fs::create_dir_all(&out_dir).context("creating target/chaos")?;
    let figures_path = out_dir.join("figures.jsonl");
    // Err: no previous run; nothing to remove.
    let _ = std::fs::remove_file(&figures_path);

    let started = Instant::now();
    let mut test = crate::cargo_command();
    test.current_dir(&root)
        .args([
            "test",
            // Release: the long budgets are CPU-bound (simulation, property cases); debug
            // builds run them several times slower.
            "--release",
            "-p",
            "ksync-tests",
            "--test",
            "reliability",
            "--",
            "--test-threads",
            "2",
        ])
        .env("KSYNC_FIGURES", &figures_path)
        .env("RUST_BACKTRACE", "0");
    if let Some(only) = &options.only {
        test.arg(only);
    }
    if !options.fast {
        test.env("KSYNC_CHAOS", "1");
    }
    eprintln!(
        "$ {}cargo test --release -p ksync-tests --test reliability",
        if options.fast { "" } else { "KSYNC_CHAOS=1 " }
    );
    let suite_ok = test.status().context("running the suite")?.success();
    let suite_time = started.elapsed();

    let mut fuzz_rows = Vec::new();
    if options.fuzz && options.only.is_none() {
        fuzz_rows = run_fuzz(&root, options.fuzz_secs, &out_dir)?;
    }

    let text = std::fs::read_to_string(&figures_path).unwrap_or_default();
    let mut figures: Vec<Figure> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    figures.extend(fuzz_rows);
    print_table(&figures);
    println!(
        "\nsuite: {} in {:.0} s ({} figures; {})",
        if suite_ok { "passed" } else { "FAILED" },
        suite_time.as_secs_f64(),
        figures.len(),
        if options.fast {
            "cargo-test budgets"
        } else {
            "chaos budgets"
        }
    );
    let missed = figures.iter().filter(|f| !f.ok).count();
    if !suite_ok || missed > 0 {
        bail!("chaos: {missed} figure(s) missed their expectation; suite passed: {suite_ok}");
    }
    Ok(())
}

fn print_table(figures: &[Figure]) {
    let mut by_suite: BTreeMap<&str, Vec<&Figure>> = BTreeMap::new();
    for f in figures {
        by_suite.entry(f.suite.as_str()).or_default().push(f);
    }
    println!("\n| suite | figure | value | expected | met |");
    println!("|---|---|---|---|---|");
    for (suite, rows) in by_suite {
        for f in rows {
            println!(
                "| {suite} | {} | {} | {} | {} |",
                f.figure,
                f.value,
                f.expect,
                if f.ok { "yes" } else { "**no**" }
            );
        }
    }
}

/// Runs every fuzz target for `secs` seconds; one figure per target.
fn run_fuzz(root: &Path, secs: u64, out_dir: &Path) -> Result<Vec<Figure>> {
    let fuzz_dir = root.join("fuzz");
    if !fuzz_dir.join("Cargo.toml").exists() {
        bail!("no fuzz/Cargo.toml");
    }
    let has_cargo_fuzz = crate::cargo_command()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        crate::cargo(&["install", "cargo-fuzz", "--locked"])?;
    }
    let mut rows = Vec::new();
    for target in FUZZ_TARGETS {
        let log = out_dir.join(format!("fuzz-{target}.log"));
        let log_file = std::fs::File::create(&log).context("creating the fuzz log")?;
        eprintln!("$ cargo fuzz run {target} --sanitizer none -- -max_total_time={secs}");
        let status = crate::cargo_command()
            .current_dir(&fuzz_dir)
            .args([
                "fuzz",
                "run",
                target,
                "--sanitizer",
                "none",
                "--",
                &format!("-max_total_time={secs}"),
            ])
            .stdout(log_file.try_clone().context("log")?)
            .stderr(log_file)
            .status()
            .with_context(|| format!("running fuzz target {target}"))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // libFuzzer ends with "Done N runs in S second(s)".
        let runs = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("Done "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("?")
            .to_owned();
        let crashed = !status.success();
        rows.push(Figure {
            suite: "fuzz".into(),
            figure: format!("{target}: panics ({secs} s)"),
            value: format!(
                "{} in {runs} runs{}",
                usize::from(crashed),
                if crashed {
                    format!(" (see {})", log.display())
                } else {
                    String::new()
                }
            ),
            expect: "0".into(),
            ok: !crashed,
        });
    }
    Ok(rows)
}
