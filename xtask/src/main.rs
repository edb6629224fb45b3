//! Project automation: `cargo xtask <ci | bench [scenario..]>`.

mod apt;
mod bench;
mod browser;
mod chaos;
mod ci;
mod demo;
mod integration;

use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("chaos") => chaos::run(&args[1..]),
        Some("browser") => browser::run(&args[1..]),
        Some("integration") => integration::run(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
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

/// Runs `cargo <args>`, failing on a non-zero exit.
pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}
