//! ksync-middleware's integration tests as one binary, one module per former test file: one
//! link instead of one per file (CI time). Tests that must run in their own process
//! (they re-execute themselves, install a global subscriber or read the process's RSS)
//! stay in their own files beside this directory.
#![allow(clippy::unwrap_used)] // tests may unwrap

#[path = "../common/mod.rs"]
mod common;

mod failing_middleware;
mod filter_before_encryption;
mod filters_over_websocket;
mod outgoing_over_websocket;
mod over_git;
mod over_websocket;
