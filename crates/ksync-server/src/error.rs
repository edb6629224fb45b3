//! The server's typed errors.

use std::path::PathBuf;

/// Why the server could not be configured, started or stopped cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A configured key (a JWT secret or public key) is unusable. The message names the key
    /// (its `kid` or kind), never its material.
    #[error("invalid key {name}: {reason}")]
    InvalidKey {
        /// Which key (`kid`, or the kind of key when it has none).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration is inconsistent (e.g. two API keys with the same name).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A key or secret file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key is unusable. The message never quotes the key.
    #[error("TLS: {path}: {reason}")]
    Tls {
        /// The certificate or key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed (the accept loop ended with an error).
    #[error("server IO error: {0}")]
    Io(#[from] std::io::Error),
    /// Opening or flushing storage failed (the storage error says what it was doing).
    #[error("{0}")]
    Storage(#[from] ksync_core::StorageError),
    /// The WebSocket relay could not be built (e.g. a limit out of range).
    #[error("relay: {0}")]
    Relay(#[from] ksync_ws::server::RelayError),
    /// The server task panicked or was cancelled.
    #[error("server task failed: {0}")]
    Task(String),
    /// A second SIGINT/SIGTERM arrived while
    /// [`run_until_signals`](crate::RunningServer::run_until_signals) was draining: it stopped
    /// waiting for open connections and did not flush. Every acknowledged event was already
    /// durable (an ack follows the append's `fdatasync`); what was not acknowledged may not
    /// have been stored. `ksync serve` exits with 130.
    #[error("drain cut short by a second signal; open connections were dropped")]
    Interrupted,
    /// The final flush at shutdown did not finish within its wait (the shutdown timeout
    /// again, at least 1 s): a stuck or very slow disk. The stop went on without it. Every
    /// acknowledged event was already durable (an ack follows the append's `fdatasync`); what
    /// was not acknowledged may not have been stored.
    #[error(
        "storage flush did not finish within {timeout:?} at shutdown (a stuck or very slow disk); every acknowledged event was already durable"
    )]
    FlushTimedOut {
        /// How long the flush was waited for.
        timeout: std::time::Duration,
    },
}
