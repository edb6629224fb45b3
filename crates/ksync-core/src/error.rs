//! The error type of the [`SyncClient`](crate::SyncClient) operations.

use crate::event::InvalidEvent;
use crate::middleware::MiddlewareError;
use crate::replica::Ingested;
use crate::storage::StorageError;

/// Errors from sync operations, common to every transport.
///
/// Transport crates keep their own detailed error enums and wrap them in
/// [`SyncError::Transport`] at the [`SyncClient`](crate::SyncClient) boundary; the source chain
/// keeps the detail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The operation needs a connection and there is none. Events stay queued.
    #[error("not connected")]
    NotConnected,
    /// The client was shut down.
    #[error("client is closed")]
    Closed,
    /// The peer did not answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The server refused our credentials or our rights.
    #[error("authentication or authorisation failed: {0}")]
    Auth(String),
    /// The other side broke the protocol or sent something we cannot read.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The other side refused a request, with its reason.
    #[error("rejected: {0}")]
    Rejected(String),
    /// An event broke the model's rules.
    #[error("invalid event: {0}")]
    InvalidEvent(#[from] InvalidEvent),
    /// Local storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// A middleware refused or failed on an event.
    #[error("middleware: {0}")]
    Middleware(#[from] MiddlewareError),
    /// `on`/`off` was given a notification name that does not exist.
    #[error(
        "unknown notification {0:?} (known: connected, disconnected, reconnecting, event, sync, error, conflict, metrics, status, peer-connected, peer-disconnected)"
    )]
    UnknownNotification(String),
    /// The client does not offer this operation.
    #[error("operation not supported by this client: {0}")]
    Unsupported(&'static str),
    /// Configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A transport-specific failure; the source has the detail.
    #[error("transport: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// [`Replica::ingest`](crate::Replica::ingest) stored part of a batch, then failed
    /// (settling a conflict: reading for it or writing its revision). `stored` is what the
    /// storage now holds of the batch; a caller must report it, as a retry finds those
    /// events duplicates and never reports them. The conflicts not in `stored` are found
    /// again by a retry of the batch.
    #[error("stored {} received events, then failed: {error}", .stored.appended.len())]
    PartlyIngested {
        /// What was stored before the failure (new events, duplicates, the conflicts
        /// settled and the revisions written for them).
        stored: Box<Ingested>,
        /// The failure.
        #[source]
        error: Box<SyncError>,
    },
}

impl SyncError {
    /// Wraps a transport's own error.
    pub fn transport(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        SyncError::Transport(Box::new(error))
    }

    /// What a [`SyncError::PartlyIngested`] says is stored; `None` for any other error.
    pub fn ingested(&self) -> Option<&Ingested> {
        match self {
            SyncError::PartlyIngested { stored, .. } => Some(stored),
            _ => None,
        }
    }
}
