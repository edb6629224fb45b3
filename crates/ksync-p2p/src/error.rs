//! The crate's error type.

use std::path::PathBuf;

use ksync_core::{InvalidEvent, MiddlewareError, SyncError};
use libp2p::PeerId;

/// Errors from the P2P client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum P2PError {
    /// An option is invalid (e.g. `encryption` on without a network key, a bad `peer_id`).
    #[error("invalid P2P configuration: {0}")]
    Config(String),
    /// The identity key file could not be read or written.
    #[error("identity key file {path}: {source}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The identity key file exists but does not hold a key this version can read.
    #[error("identity key file {path} is damaged or not a libp2p key: {source}")]
    KeyDecode {
        /// The key file.
        path: PathBuf,
        /// Why decoding failed.
        #[source]
        source: libp2p::identity::DecodingError,
    },
    /// A network (pre-shared) key could not be parsed.
    #[error("invalid network key: {0}")]
    NetworkKey(String),
    /// Building the libp2p transport or behaviours failed.
    #[error("building the libp2p node failed: {0}")]
    Build(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// Listening on the configured address failed (e.g. the port is taken).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Publishing to the network failed (the event is stored; catch-up delivers it).
    #[error("publishing to the network failed: {0}")]
    Publish(String),
    /// The node is not started (call `start` first).
    #[error("the P2P node is not started")]
    NotStarted,
    /// The node stopped (after `disconnect`, or its task ended).
    #[error("the P2P node has stopped")]
    Stopped,
    /// `connect_to_peer` got something that is neither a peer name, a peer id nor a
    /// multiaddr.
    #[error("{0:?} is neither a peer name, a peer id nor a multiaddr")]
    InvalidTarget(String),
    /// Dialing a peer failed.
    #[error("dialing {target} failed: {source}")]
    Dial {
        /// What was dialed.
        target: String,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// `connect_to_peer` got a peer name (the spec's `peerId`) that no peer this node has
    /// met announced.
    #[error("no peer named {0:?} is known (connect by address first, or let discovery find it)")]
    UnknownPeer(String),
    /// No address is known for this peer and discovery did not find one.
    #[error("no address known for peer {0} (discovery did not find it)")]
    PeerNotFound(PeerId),
    /// The operation did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// An event breaks the model's rules.
    #[error("invalid event: {0}")]
    InvalidEvent(#[from] InvalidEvent),
    /// An event is larger than `max_event_bytes` once encoded.
    #[error("event is {size} bytes encoded, the limit is {max}")]
    EventTooLarge {
        /// Encoded size.
        size: usize,
        /// Limit.
        max: usize,
    },
    /// Encoding an event failed.
    #[error("encoding an event failed: {0}")]
    Encode(#[from] serde_json::Error),
    /// An outgoing middleware failed on the event (it is stored; it was not published).
    #[error("middleware: {0}")]
    Middleware(#[from] MiddlewareError),
    /// The local replica (storage) failed or refused the event.
    #[error("local replica: {0}")]
    Replica(#[source] SyncError),
    /// A peer's catch-up answer held events over this node's `max_event_bytes` (the peer's
    /// own limit may be larger, so this is no misbehaviour): they were skipped, not stored,
    /// and are not asked for again from this peer. Reported as an `error` notification
    /// without `status: error`.
    #[error("skipped {} events from peer {peer} over max_event_bytes ({max} bytes): too large", keys.len())]
    ReceivedTooLarge {
        /// The peer.
        peer: PeerId,
        /// The skipped revisions.
        keys: Vec<ksync_core::RevisionKey>,
        /// This node's limit.
        max: usize,
    },
    /// A peer sent something no honest peer sends: a catch-up answer that breaks the
    /// protocol (a page that does not follow the request, a log id that changes mid-round,
    /// events nobody asked for or the same revision twice), or a name (the spec's `peerId`)
    /// another connected peer holds. What it sent is refused (in part or whole) and nothing
    /// of ours is touched; reported as an `error` notification.
    #[error("peer {peer} broke the protocol: {reason}")]
    PeerMisbehaved {
        /// The peer.
        peer: PeerId,
        /// What it did.
        reason: String,
    },
}

impl From<P2PError> for SyncError {
    fn from(e: P2PError) -> Self {
        match e {
            P2PError::NotStarted => SyncError::NotConnected,
            P2PError::Stopped => SyncError::Closed,
            P2PError::InvalidEvent(e) => SyncError::InvalidEvent(e),
            P2PError::Replica(e) => e,
            P2PError::Timeout(what) => SyncError::Timeout(what),
            P2PError::Config(what) => SyncError::Config(what),
            P2PError::Middleware(e) => SyncError::Middleware(e),
            other => SyncError::transport(other),
        }
    }
}
