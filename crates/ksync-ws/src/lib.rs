//! kSync real-time sync over WebSocket.
//!
//! - [`WebSocketSyncClient`]: the spec's client (builder with the spec's options and defaults,
//!   notifications, middleware, reconnect with resume, offline queue).
//! - [`server::Relay`] (feature `server`): the relay as an axum `Router`: rooms with one log
//!   each, group commit, shared encoded-once fan-out, resume, snapshots, auth, limits.
//! - [`protocol`]: the wire messages (described for other languages in `docs/PROTOCOL.md`).
//!
//! tungstenite's types never appear in this API; errors are [`WsError`], wrapped in
//! `SyncError::Transport` at the `SyncClient` boundary.

mod client;
mod error;
mod progress;
pub mod protocol;
#[cfg(feature = "server")]
pub mod server;
mod tls;

pub use client::{Strategy, WebSocketSyncClient, WebSocketSyncClientBuilder};
pub use error::WsError;
