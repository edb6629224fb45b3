//! `cargo xtask ci [step..]`: everything CI checks, in order, with a timing table at the end.
//!
//! Steps (all by default; name some to run only those):
//! - `fmt`: `cargo fmt --all -- --check`
//! - `clippy`: `cargo clippy --workspace --all-targets -- -D warnings`
//! - `features`: clippy on the `ksync` umbrella with no features, each feature alone, and `full`
//! - `test`: `cargo test --workspace`; with `KSYNC_CI_NEXTEST=1`, `cargo nextest run
//!   --workspace` plus the doc tests instead
//! - `doc`: `cargo doc --no-deps` with `RUSTDOCFLAGS=-D warnings`, the workspace's libraries
//!   and the umbrella with every feature
//! - `deny`: `cargo deny --offline check` (advisories from the local RustSec snapshot, licenses,
//!   bans, sources)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const STEPS: [&str; 6] = ["fmt", "clippy", "features", "test", "doc", "deny"];

/// The folder name cargo-deny derives from the default advisory-db URL: the checkout must sit
/// there for `cargo deny --offline` to find it.
const ADVISORY_DB_DIR_NAME: &str = "advisory-db-3157b0e258782691";

pub(crate) fn run(args: &[String]) -> Result<()> {
    for arg in args {
        if !STEPS.contains(&arg.as_str()) {
            bail!("unknown ci step {arg:?}; steps: {}", STEPS.join(", "));
        }
    }
    let selected: Vec<&str> = if args.is_empty() {
        STEPS.to_vec()
    } else {
        STEPS
            .into_iter()
            .filter(|s| args.iter().any(|a| a == s))
            .collect()
    };
    let root = crate::workspace_root();
    let mut timings: Vec<(&str, Duration)> = Vec::new();
    for step in selected {
        eprintln!("\n==> ci: {step}");
        let start = Instant::now();
        match step {
            "fmt" => cargo_in(&root, &["fmt", "--all", "--", "--check"], &[])?,
            "clippy" => cargo_in(
                &root,
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
                &[],
            )?,
            "features" => umbrella_feature_matrix(&root)?,
            "test" => tests(&root)?,
            "doc" => docs(&root)?,
            "deny" => deny(&root)?,
            _ => unreachable!("steps are validated above"),
        }
        timings.push((step, start.elapsed()));
    }
    eprintln!("\nci: all steps passed");
    for (step, took) in &timings {
        eprintln!("  {step:<10} {:>7.1}s", took.as_secs_f64());
    }
    let total: Duration = timings.iter().map(|(_, t)| *t).sum();
    eprintln!("  {:<10} {:>7.1}s", "total", total.as_secs_f64());
    Ok(())
}

/// Runs `cargo <args>` in `dir` with extra environment, failing on a non-zero exit.
fn cargo_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let shown_env: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    eprintln!("$ {shown_env}cargo {}", args.join(" "));
    let status = crate::cargo_command()
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// The umbrella's features other than `default` and `full`, read from `cargo metadata` so new
/// features join the matrix without editing this file. Empty when the umbrella does not exist.
fn umbrella_features(root: &Path) -> Result<Option<Vec<String>>> {
    let out = crate::cargo_command()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let Some(umbrella) = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "ksync"))
    else {
        return Ok(None);
    };
    let mut features: Vec<String> = umbrella["features"]
        .as_object()
        .map(|f| {
            f.keys()
                .filter(|k| *k != "default" && *k != "full")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    features.sort();
    Ok(Some(features))
}

/// Clippy on the umbrella alone with no features, each feature alone and `full`: proves every
/// feature builds by itself (no feature silently relies on another). `-p ksync` keeps the rest
/// of the workspace out, and each feature set's dependency artifacts get their own hash in
/// `target/`, so runs after the first reuse them instead of rebuilding.
fn umbrella_feature_matrix(root: &Path) -> Result<()> {
    let Some(features) = umbrella_features(root)? else {
        eprintln!("ci: no `ksync` umbrella crate yet; skipping the feature matrix");
        return Ok(());
    };
    let clippy = |extra: &[&str]| -> Result<()> {
        let mut args = vec!["clippy", "-p", "ksync", "--all-targets"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "-D", "warnings"]);
        cargo_in(root, &args, &[])
    };
    clippy(&["--no-default-features"])?;
    for feature in &features {
        clippy(&["--no-default-features", "--features", feature])?;
    }
    clippy(&["--features", "full"])?;
    Ok(())
}

fn tests(root: &Path) -> Result<()> {
    // Plain `cargo test` by default: some suites are custom harnesses (`harness = false`) that
    // do not answer nextest's `--list` protocol. `KSYNC_CI_NEXTEST=1` uses nextest (plus the
    // doc tests, which nextest does not run) where every binary supports it.
    let nextest = std::env::var_os("KSYNC_CI_NEXTEST").is_some()
        && crate::cargo_command()
            .args(["nextest", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
    if nextest {
        cargo_in(
            root,
            &["nextest", "run", "--workspace", "--no-fail-fast"],
            &[],
        )?;
        cargo_in(root, &["test", "--workspace", "--doc"], &[])
    } else {
        cargo_in(root, &["test", "--workspace"], &[])
    }
}

fn docs(root: &Path) -> Result<()> {
    let env = [("RUSTDOCFLAGS", "-D warnings")];
    // `--lib`: the `ksync` binary (ksync-cli) would write its docs over the `ksync` umbrella's.
    cargo_in(root, &["doc", "--no-deps", "--workspace", "--lib"], &env)?;
    if umbrella_features(root)?.is_some() {
        // The umbrella as docs.rs builds it (all features), so every inlined re-export resolves.
        cargo_in(
            root,
            &["doc", "--no-deps", "-p", "ksync", "--all-features"],
            &env,
        )?;
    }
    Ok(())
}

fn deny(root: &Path) -> Result<()> {
    let installed = crate::cargo_command()
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        bail!(
            "cargo-deny is not installed. Install it with `cargo install cargo-deny --locked` \
             (.ci/run does this, with a faster release profile), then run `cargo xtask ci deny` again."
        );
    }
    // `cargo deny` reads the manifests of every package in Cargo.lock, for every target
    // platform; `--offline` cannot download the ones no local build needed (windows-*), so
    // fetch them first. Only crates.io is contacted; advisories stay offline.
    cargo_in(root, &["fetch"], &[])?;
    match advisory_db(root) {
        Ok(db_dir) => {
            let db_dir = db_dir
                .to_str()
                .context("the advisory-db path must be UTF-8 for cargo-deny")?;
            cargo_in(
                root,
                &["deny", "--offline", "check", "--hide-inclusion-graph"],
                &[("KSYNC_ADVISORY_DB_DIR", db_dir)],
            )
        }
        // Without a snapshot there is nothing to check advisories against offline; the other
        // checks need no database and still run. Loud, so nobody mistakes it for a full pass.
        Err(missing) => {
            eprintln!(
                "WARNING: {missing:#}\nWARNING: cargo deny advisories NOT checked; checking licenses, bans and sources only"
            );
            cargo_in(
                root,
                &[
                    "deny",
                    "--offline",
                    "check",
                    "--hide-inclusion-graph",
                    "licenses",
                    "bans",
                    "sources",
                ],
                &[("KSYNC_ADVISORY_DB_DIR", "target/advisory-dbs")],
            )
        }
    }
}

/// Lays the RustSec snapshot (`$KSYNC_ADVISORY_DB`, default `../shared/advisory-db` beside the
/// workspace) out as the git checkout `cargo deny --offline` expects, under
/// `target/advisory-dbs`, and returns that directory (the `db-path` deny.toml reads from
/// `KSYNC_ADVISORY_DB_DIR`). Reuses an earlier lay-out of the same snapshot.
fn advisory_db(root: &Path) -> Result<PathBuf> {
    let source = std::env::var_os("KSYNC_ADVISORY_DB")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/advisory-db"));
    if !source.join("crates").is_dir() {
        bail!(
            "no RustSec advisory database at {} (expected a snapshot with a crates/ folder); \
             set KSYNC_ADVISORY_DB to one",
            source.display()
        );
    }
    let db_root = root.join("target/advisory-dbs");
    let checkout = db_root.join(ADVISORY_DB_DIR_NAME);
    let snapshot = std::fs::read_to_string(source.join("SNAPSHOT")).unwrap_or_default();
    let laid_out = std::fs::read_to_string(checkout.join("SNAPSHOT")).unwrap_or_default();
    if checkout.join(".git").is_dir() && laid_out == snapshot && !snapshot.is_empty() {
        return Ok(db_root);
    }
    eprintln!(
        "ci: laying out the advisory database {} as a git checkout at {}",
        source.display(),
        checkout.display()
    );
    if checkout.exists() {
        std::fs::remove_dir_all(&checkout)
            .with_context(|| format!("removing {}", checkout.display()))?;
    }
    copy_tree(&source, &checkout)?;
    let git = |args: &[&str]| -> Result<()> {
        let status = Command::new("git")
            .arg("-C")
            .arg(&checkout)
            .args([
                "-c",
                "user.name=ksync-ci",
                "-c",
                "user.email=ci@localhost",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .status()
            .context("running git (needed to lay out the advisory database)")?;
        if !status.success() {
            bail!("git {} failed with {status}", args.join(" "));
        }
        Ok(())
    };
    git(&["init", "-q"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", "advisory-db snapshot"])?;
    Ok(db_root)
}

/// Copies a directory tree (files and folders; the source's own `.git`, if any, is skipped).
/// Copies get fresh permissions, so a read-only source makes writable copies.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".git" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            std::fs::write(&dst, bytes).with_context(|| format!("writing {}", dst.display()))?;
        }
    }
    Ok(())
}
