//! `bench`, `integration` and `demo`: build the `harness` package (xtask/harness: kSync's crates
//! driven in-process) and run it.
//!
//! Why a second package: xtask itself depends on no kSync crate, so `cargo xtask` builds in
//! seconds. Built through `cargo run -p xtask` with those crates, it resolved their features
//! for xtask alone and so compiled tokio, hyper, libp2p and every kSync crate once more beside
//! what `cargo test --workspace` builds (~3 minutes of a CI run). The harness is built with
//! `--workspace` and the examples, the test step's feature resolution, and reuses all of it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

/// The Debian packages `bench ws` compares against (reported as skipped when absent).
const BENCH_BASELINES: [&str; 2] = ["nats-server", "redis-server"];

/// `cargo xtask bench [scenario..]`: the harness optimised (a debug build measures the wrong
/// thing), after installing the baselines a new machine lacks.
pub(crate) fn bench(args: &[String]) -> Result<()> {
    if args.is_empty() || args.iter().any(|a| a == "ws") {
        for program in BENCH_BASELINES {
            if which(program).is_none() {
                eprintln!("{program} is not installed: installing Debian's package");
                if let Err(error) = crate::apt::install(program) {
                    eprintln!("{error:#}: bench ws reports {program} as skipped");
                }
            }
        }
    }
    let mut cargo_args = vec!["run", "--release", "-p", "harness", "--", "bench"];
    cargo_args.extend(args.iter().map(String::as_str));
    crate::cargo(&cargo_args)
}

/// `cargo xtask integration`: the `ksync` binary, the umbrella's examples and the harness in
/// one build, then the scenario.
pub(crate) fn integration(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        bail!("cargo xtask integration takes no arguments (got {arg:?})");
    }
    crate::cargo(&[
        "build",
        "--workspace",
        "--bin",
        "ksync",
        "--bin",
        "harness",
        "--examples",
        "--features",
        "ksync/full",
    ])?;
    run_harness("integration")
}

/// `cargo xtask demo`: the `ksync` binary and the harness, then the demo.
pub(crate) fn demo(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        bail!("cargo xtask demo takes no arguments (got {arg:?})");
    }
    crate::cargo(&["build", "--workspace", "--bin", "ksync", "--bin", "harness"])?;
    run_harness("demo")
}

fn run_harness(task: &str) -> Result<()> {
    let harness = crate::target_dir(&crate::workspace_root())?
        .join("debug")
        .join("harness");
    eprintln!("$ {} {task}", harness.display());
    let status = std::process::Command::new(&harness)
        .arg(task)
        .status()
        .with_context(|| format!("running {}", harness.display()))?;
    if !status.success() {
        bail!("harness {task} failed with {status}");
    }
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/usr/bin".into()])
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}
