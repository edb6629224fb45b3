//! Git-like, offline-first sync over HTTP for kSync.
//!
//! - [`GitSyncClient`]: the spec's client. `pull`, `push`, `sync` (through
//!   [`ksync_core::PullPushClient`]), `clone`, branches and merge; local state in the attached
//!   replica's storage so a killed process loses nothing and pushes nothing twice.
//! - [`server::GitServer`] (feature `server`): the repository service as an axum `Router`:
//!   repositories with branches, each branch a log with its own `serverVersion`.
//! - [`wire`]: the JSON bodies both sides speak (documented in `docs/PROTOCOL.md`).

mod client;
#[cfg(feature = "server")]
mod decoded;
mod error;
mod gzip;
#[cfg(feature = "server")]
pub mod server;
mod upload;
pub mod wire;

pub use client::{
    GitSyncClient, GitSyncClientBuilder, LocalStatus, MERGE_MAX_CONFLICTS, MergeResult,
    OptionalBranch, Phase, Progress, ProgressFn,
};
pub use error::GitError;
pub use wire::{BranchInfo, RepoInfo};
