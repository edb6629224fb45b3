//! Project automation: `cargo xtask <command>` (see `USAGE`).

mod apt;
mod browser;
mod chaos;
mod ci;
mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci::run(&args[1..]),
        Some("bench") => harness::bench(&args[1..]),
        Some("chaos") => chaos::run(&args[1..]),
        Some("browser") => browser::run(&args[1..]),
        Some("integration") => harness::integration(&args[1..]),
        Some("demo") => harness::demo(&args[1..]),
        Some(other) => bail!("unknown xtask {other:?}\n{USAGE}"),
        None => {
            println!("{USAGE}");
            Ok(())
        }
    }
}

const USAGE: &str = "usage: cargo xtask <command>
  ci [step..]           fmt, clippy -D warnings (workspace + umbrella feature matrix), tests,
                        docs, cargo deny; steps: fmt clippy features test doc deny
  bench [scenario..]    benchmarks side by side with their baselines (default: all)
  chaos [options]       the reliability and security suite with long budgets, the fuzz
                        targets, and the table of figures (see docs/RELIABILITY.md)
  integration           the real `ksync` binary with WebSocket (auth, middleware), Git (branches,
                        a conflict, a merge) and P2P peers bridged in; replicas must end equal
  demo                  a short live demo: the server and two replicas syncing, one offline
  browser [file..]      the dashboard and the JS client in headless Chromium (installs chromium
                        and playwright-core when missing; default: every tests/browser/*.test.mjs)";

/// A `cargo` command for a child of xtask, without the package variables `cargo run` gave
/// xtask (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...). Build scripts such as ring's declare
/// `rerun-if-env-changed` on them, so a child that inherited them rebuilt ring and everything
/// above it (libp2p, ksync-p2p, xtask) each time CI went from a shell's cargo to xtask's and
/// back: ~25 s, three times per CI run.
pub(crate) fn cargo_command() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_set_by_cargo_run) {
            command.env_remove(name);
        }
    }
    command
}

/// Whether `cargo run` sets `name` for the program it runs (cargo's "Environment variables
/// Cargo sets for crates"); `CARGO` itself is kept: it names the cargo to use.
fn is_set_by_cargo_run(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "OUT_DIR"
        )
}

/// Runs `cargo <args>`, failing on a non-zero exit.
pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = cargo_command()
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// The workspace this run is for. `cargo run` sets `CARGO_MANIFEST_DIR` at run time; prefer it
/// to the compile-time value, since checkouts that share a target directory share the binary.
pub(crate) fn workspace_root() -> PathBuf {
    let xtask = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    xtask
        .parent()
        .map_or_else(|| xtask.clone(), Path::to_path_buf)
}

/// Where cargo puts this workspace's builds (honours `CARGO_TARGET_DIR` and cargo config).
pub(crate) fn target_dir(root: &Path) -> Result<PathBuf> {
    let output = cargo_command()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(root.join("Cargo.toml"))
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed ({})", output.status);
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("reading cargo metadata")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata gave no target_directory")
}
