//! kSync's crates driven in-process: `harness <bench [scenario..] | integration | demo>`.
//!
//! Run through `cargo xtask`, which builds this binary first: `bench` optimised, `integration`
//! and `demo` with the workspace's feature resolution so that, after `cargo test --workspace`,
//! nothing but this binary and the targets it runs is built again.

mod bench;
mod demo;
mod integration;

use anyhow::{Result, bail};

/// The allocator `ksync serve` runs on (see the `ksync` binary), so the relays benchmarked in
/// child processes of this binary run as served. The clients here share it, whichever system
/// they measure.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench::run(&args[1..]),
        Some("integration") => integration::run(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        _ => bail!("usage: harness <bench [scenario..] | integration | demo> (see `cargo xtask`)"),
    }
}
