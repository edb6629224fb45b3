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
//! | feature | module | brings |
//! |---|---|---|
//! | `middleware` | [`middleware`] | filters, field encryption, redaction, rate limiting, a metrics tap |
//! | `p2p` | [`p2p`] | [`P2PSyncClient`] (libp2p: gossipsub, mDNS, Kademlia, catch-up) |
//! | `full` | | every feature above |
//!
//! ## Default features
//!
//! None, for now: the core alone is useful (in-memory storage, the orchestrator, custom sync
//! clients) and builds in seconds, and every transport pulls a sizeable dependency tree
//! (libp2p roughly doubles a clean build), so you opt into exactly the parts you use, as with
//! the `libp2p` and `tokio` crates. `full` turns everything on.
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

#[cfg(feature = "middleware")]
#[doc(inline)]
pub use ksync_middleware as middleware;

#[cfg(feature = "p2p")]
#[doc(inline)]
pub use ksync_p2p as p2p;

#[cfg(feature = "p2p")]
#[doc(no_inline)]
pub use ksync_p2p::{DiscoveryMethod, P2PSyncClient};
