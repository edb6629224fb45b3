//! ksync-ws's integration tests as one binary, one module per former test file: one
//! link instead of one per file (CI time). Tests that must run in their own process
//! (they re-execute themselves, install a global subscriber or read the process's RSS)
//! stay in their own files beside this directory.
#![allow(clippy::unwrap_used)] // tests may unwrap

#[path = "../common/mod.rs"]
mod common;

mod activity;
mod auth;
mod auth_lifetime;
mod bad_input;
mod client;
mod client_cursor_writes;
mod client_forward_durable;
mod client_liars;
mod client_lifecycle_races;
mod client_resume;
mod client_send;
mod client_storage_failure;
mod client_timers;
mod heartbeat_stall;
mod interop_python;
mod per_client_limits;
mod protocol_doc_examples;
mod relay;
mod relay_edges;
mod relay_storage_failure;
mod relay_timers;
mod room_queues;
mod rooms;
mod shutdown_drain;
mod slow_link;
mod upgrade;
mod versions;
