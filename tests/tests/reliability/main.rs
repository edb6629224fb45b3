//! kSync's reliability and security suite: one test binary across crates.
//!
//! Each module is one suite; each reports figures through `ksync_tests::figures`. Under
//! `cargo test` the budgets are small; `cargo xtask chaos` sets `KSYNC_CHAOS=1` for the long
//! ones and prints the table. Child processes are this binary re-executed (see
//! `ksync_tests::child`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod auth;
mod common;
mod convergence;
mod crash;
mod disk;
mod frames;
mod load;
mod network;
mod sim;
