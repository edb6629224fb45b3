//! ksync-git's integration tests as one binary, one module per former test file: one
//! link instead of one per file (CI time). Tests that must run in their own process
//! (they re-execute themselves, install a global subscriber or read the process's RSS)
//! stay in their own files beside this directory.
#![allow(clippy::unwrap_used)] // tests may unwrap

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod bounds;
mod busy;
mod client_storage_failure;
mod copy_pages;
mod edges;
mod interrupted;
mod liars;
mod limits;
mod many_branches;
mod options;
mod per_client_pushes;
mod protocol_doc_examples;
mod push_stalls;
mod slow_link;
mod spec_flow;
mod storage_failure;
mod stored_records;
mod sync;
mod timers;
mod versions;
