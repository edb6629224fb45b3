//! Helpers for kSync's cross-crate reliability and security suite (`tests/tests/reliability`).
//!
//! - [`figures`]. Every suite reports its figures (acknowledged events lost, bit flips detected,
//!   refused N/N, ...) through one function; `cargo xtask chaos` collects them into one table.
//! - [`budget()`]. The fast budget under `cargo test`, the long one under `cargo xtask chaos`.
//! - [`child`]. Re-executes the test binary as a child process (for SIGKILL and SIGSTOP).
//! - [`proxy`]. A TCP fault proxy that cuts, stalls and blackholes connections.
//! - [`stats`]. Percentiles.

pub mod child;
pub mod figures;
pub mod proxy;
pub mod stats;

/// The environment variable that switches the suite to its long budgets (set by
/// `cargo xtask chaos`).
pub const CHAOS_ENV: &str = "KSYNC_CHAOS";

/// `fast` under `cargo test`, `chaos` when [`CHAOS_ENV`] is set.
pub fn budget(fast: u64, chaos: u64) -> u64 {
    if chaos_mode() { chaos } else { fast }
}

/// Whether the long budgets are on.
pub fn chaos_mode() -> bool {
    std::env::var_os(CHAOS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}
