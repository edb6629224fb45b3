//! ksync-p2p's integration tests as one binary, one module per former test file: one
//! link instead of one per file (CI time). Tests that must run in their own process
//! (they re-execute themselves, install a global subscriber or read the process's RSS)
//! stay in their own files beside this directory.
#![allow(clippy::unwrap_used)] // tests may unwrap

#[path = "../common/mod.rs"]
mod common;

mod catch_up_budget;
mod catch_up_greed;
mod catch_up_liars;
mod catch_up_past_the_end;
mod config_bounds;
mod convergence;
mod event_limits;
mod gossip_queue;
mod kad_addresses;
mod lifecycle;
mod misbehaving;
mod observed;
mod p2p;
mod peer_names;
mod per_host;
mod redial;
mod sending;
mod shaping;
mod upgrade;
mod versions;
