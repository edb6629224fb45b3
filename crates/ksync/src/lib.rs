//! # kSync
//!
//! kSync keeps event logs in step across replicas: in real time over WebSocket, by Git-like
//! pull and push over HTTP (offline first, with branches), or peer to peer over libp2p with no
//! server at all. Every replica holds the same [`Event`]s; duplicates are dropped, conflicts
//! are values ([`Conflict`]) settled by a policy you choose.
//!
//! This crate only re-exports: the core types ([`KSync`], [`Event`], [`SyncClient`],
//! [`InMemoryStorage`], [`Pipeline`], ...) at the root, and each part behind a feature as a
//! module, with the spec's client names also at the root.
//!
//! | feature | module | brings | default |
//! |---|---|---|---|
//! | `ws` | `ws` | `WebSocketSyncClient`: real-time sync over WebSocket | yes |
//! | `storage-file` | `storage_file` | `FileStorage`: the durable, checksummed on-disk log | yes |
//! | `git` | `git` | `GitSyncClient`: Git-like pull/push, branches, merges over HTTP | |
//! | `p2p` | `p2p` | `P2PSyncClient`: peer to peer on libp2p (gossipsub, mDNS, Kademlia) | |
//! | `middleware` | `middleware` | filters, field encryption, redaction, rate limiting, a metrics tap | |
//! | `server` | `server` | the server behind `ksync serve`, and the routers `ws::server`, `git::server` | |
//! | `full` | | all of the above | |
//!
//! ## Default features
//!
//! `ws` and `storage-file`: the client side of the set-up most applications start with, a
//! real-time client that keeps its events in a crash-safe file so nothing emitted offline is
//! lost; `use ksync::{KSync, FileStorage, WebSocketSyncClient}` works without naming a feature.
//! Both are light (tungstenite, crc32fast, postcard). The rest is opt-in because each is
//! either heavy or not for every client: `git` brings an HTTP client with TLS (reqwest,
//! rustls), `p2p` brings libp2p (about as much to compile as everything else together),
//! `server` brings axum and jsonwebtoken, which a client never needs. Use
//! `default-features = false` for the core alone (in-memory storage, custom sync clients).
//!
//! ## Example
//!
//! The examples in `crates/ksync/examples/` turn every snippet of the user guide into a
//! program; `custom_sync_client` is the smallest complete one (no server needed):
//!
//! ```sh
//! cargo run -p ksync --example custom_sync_client
//! ```
//!
//! ```
//! use ksync::{Event, InMemoryStorage, Storage};
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! let storage = InMemoryStorage::new();
//! storage.append(vec![Event::new("1", "user_created", serde_json::json!({"name": "John"}), 1)]).await?;
//! assert_eq!(storage.state()?["1"].data["name"], "John");
//! # Ok::<(), Box<dyn std::error::Error>>(()) })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[doc(inline)]
pub use ksync_core::*;

#[cfg(feature = "ws")]
#[doc(inline)]
pub use ksync_ws as ws;

#[cfg(feature = "git")]
#[doc(inline)]
pub use ksync_git as git;

#[cfg(feature = "p2p")]
#[doc(inline)]
pub use ksync_p2p as p2p;

#[cfg(feature = "storage-file")]
#[doc(inline)]
pub use ksync_storage_file as storage_file;

#[cfg(feature = "middleware")]
#[doc(inline)]
pub use ksync_middleware as middleware;

#[cfg(feature = "server")]
#[doc(inline)]
pub use ksync_server as server;

// The spec's names at the root: `import { KSync, FileStorage, WebSocketSyncClient } from 'ksync'`.
#[cfg(feature = "storage-file")]
#[doc(no_inline)]
pub use ksync_storage_file::FileStorage;

#[cfg(feature = "ws")]
#[doc(no_inline)]
pub use ksync_ws::{Strategy, WebSocketSyncClient};

#[cfg(feature = "git")]
#[doc(no_inline)]
pub use ksync_git::GitSyncClient;

#[cfg(feature = "p2p")]
#[doc(no_inline)]
pub use ksync_p2p::{DiscoveryMethod, P2PSyncClient};
