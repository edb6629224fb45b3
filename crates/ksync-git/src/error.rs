//! The client's error type.

use ksync_core::{InvalidEvent, SyncError};

/// What went wrong talking to a repository service.
///
/// [`GitSyncClient`](crate::GitSyncClient) methods return [`SyncError`] (the common error of every
/// transport): timeouts become [`SyncError::Timeout`], refused credentials [`SyncError::Auth`],
/// and the rest [`SyncError::Transport`] holding a `GitError`. [`GitError::of`] digs it out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GitError {
    /// The repository URL cannot be used.
    #[error("invalid repository URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The request did not complete (connection refused or reset, bad TLS, ...).
    #[error("request to {url} failed: {source}")]
    Http {
        /// The request URL.
        url: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The service answered with an error status.
    #[error("{url} answered {status} ({code}): {message}")]
    Server {
        /// The request URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The service's error code (`repo_not_found`, `payload_too_large`, ...).
        code: String,
        /// The service's message.
        message: String,
    },
    /// The answer was larger than the client reads ([`max_response_bytes`]); it was not read
    /// further.
    ///
    /// [`max_response_bytes`]: crate::GitSyncClientBuilder::max_response_bytes
    #[error(
        "{url} answered with more than {limit} bytes (after decompression), the most this client reads"
    )]
    ResponseTooLarge {
        /// The request URL.
        url: String,
        /// The client's limit, in bytes.
        limit: usize,
    },
    /// The answer could not be understood.
    #[error("unexpected answer from {url}: {reason}")]
    Protocol {
        /// The request URL.
        url: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The service speaks another protocol version than this client
    /// ([`ksync_core::PROTOCOL_VERSION`]): its answer announced another `X-KSync-Protocol`.
    /// Retrying cannot help (auto-pull stops on it, see
    /// [`GitError::is_unsupported_protocol`]): upgrade the client, or use a service of its
    /// version.
    #[error(
        "{url}: the service speaks protocol version {theirs:?}, this client {}: upgrade",
        ksync_core::PROTOCOL_VERSION
    )]
    UnsupportedProtocol {
        /// The request URL.
        url: String,
        /// The version the answer announced, as sent.
        theirs: String,
    },
    /// Outgoing middleware made a local event break the event rules
    /// ([`Event::validate`](ksync_core::Event::validate)): the service would refuse every batch
    /// holding it, so it is not pushed (it comes back in the push's `rejected_events`).
    #[error(
        "outgoing middleware made event {id:?} version {version} break the event rules ({reason}): not pushed"
    )]
    InvalidOutgoing {
        /// The event's id (cut to 64 characters: an over-long id may be the fault).
        id: String,
        /// The event's version.
        version: u64,
        /// The rule it breaks.
        #[source]
        reason: InvalidEvent,
    },
    /// A merge found more collisions than one `merge` call settles
    /// ([`MERGE_MAX_CONFLICTS`](crate::MERGE_MAX_CONFLICTS)): those settled are kept
    /// (their resolutions are pushed by the next `merge`), and `merge` again goes on from there.
    #[error(
        "merging {from:?} found more than {limit} collisions, the most one merge call settles: merge again for the rest"
    )]
    MergeUnfinished {
        /// The branch merged from.
        from: String,
        /// [`MERGE_MAX_CONFLICTS`](crate::MERGE_MAX_CONFLICTS).
        limit: usize,
    },
    /// The service took a push batch, but recording here how far the push got (a cursor in
    /// the local storage) failed. The push itself succeeds: its events are on the service,
    /// reported in its result and their `sync` notified, once. This comes as an `error`
    /// notification, and the write is tried again before the next pull, push, merge or
    /// branch operation of this client, which fails with it while the storage still refuses
    /// (nothing is sent again meanwhile). A restart before it is written sends those events
    /// again (the service keeps them once).
    #[error(
        "the service stored the pushed events, but recording cursor {cursor:?} here failed (tried again before the next operation): {source}"
    )]
    CursorNotRecorded {
        /// The cursor (its metadata key).
        cursor: String,
        /// The local storage's error.
        #[source]
        source: Box<SyncError>,
    },
}

impl GitError {
    /// The `GitError` inside a [`SyncError::Transport`], if that is what `error` is.
    pub fn of(error: &SyncError) -> Option<&GitError> {
        match error {
            SyncError::Transport(inner) => inner.downcast_ref::<GitError>(),
            _ => None,
        }
    }

    /// The HTTP status of a [`GitError::Server`] answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            GitError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The service's error code of a [`GitError::Server`] answer.
    pub fn code(&self) -> Option<&str> {
        match self {
            GitError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the service and this client speak different protocol versions: an answer
    /// announcing another one ([`GitError::UnsupportedProtocol`]), or the service refusing
    /// ours (400 `unsupported_protocol`, also behind a proxy that drops the header). The same
    /// request gets the same answer, so auto-pull stops on it.
    pub fn is_unsupported_protocol(&self) -> bool {
        match self {
            GitError::UnsupportedProtocol { .. } => true,
            GitError::Server { code, .. } => code == "unsupported_protocol",
            _ => false,
        }
    }

    /// Converts to the common error, mapping timeouts and auth refusals to their own variants.
    pub(crate) fn into_sync(self) -> SyncError {
        match &self {
            GitError::Http { source, .. } if source.is_timeout() => {
                SyncError::Timeout(self.to_string())
            }
            GitError::Server {
                status: 401 | 403, ..
            } => SyncError::Auth(self.to_string()),
            _ => SyncError::transport(self),
        }
    }
}
