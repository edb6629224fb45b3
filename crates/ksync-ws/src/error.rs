//! The client's error type.

use std::sync::Arc;
use std::time::Duration;

use ksync_core::SyncError;

/// What went wrong in a [`WebSocketSyncClient`](crate::WebSocketSyncClient). Reaches users
/// wrapped in [`SyncError::Transport`]; [`WsError::find`] gets it back.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// The URL is not a `ws://` or `wss://` URL we can connect to.
    #[error("invalid url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why it is refused.
        reason: String,
    },
    /// The TCP connection failed.
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// The IO error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The TLS handshake of a `wss://` connection failed. A refused certificate (unknown
    /// issuer, wrong name, expired) stops the client: trust its root with
    /// `tls_root_certificates_pem`, or fix the server's certificate.
    #[error("TLS with {host} failed: {reason}")]
    Tls {
        /// The server name checked against the certificate.
        host: String,
        /// rustls' explanation.
        reason: String,
        /// Whether the server's certificate was refused (retrying cannot help).
        certificate: bool,
    },
    /// Connecting (TCP, TLS, upgrade, `welcome`) took longer than the connect timeout.
    #[error("connecting timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The server answered the upgrade with an HTTP error (400: bad room name; 401/403:
    /// credentials or rights; 404: no such endpoint; 503: full or shutting down). A 4xx
    /// other than 408, 425 and 429 is final and not retried ([`WsError::is_fatal`]); 5xx are.
    #[error("server refused the connection with HTTP {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The server's explanation.
        message: String,
    },
    /// The WebSocket layer failed (handshake or framing).
    #[error("websocket error: {0}")]
    WebSocket(String),
    /// The server closed the connection with a close code (see `docs/PROTOCOL.md`). Codes
    /// that retrying cannot fix (see [`WsError::is_fatal`], e.g. 4401: the credentials
    /// expired) stop the client; the others are reconnected from.
    #[error("server closed the connection with code {code}: {reason}")]
    Closed {
        /// The close code, e.g. 4008 (slow consumer: resume), 1001 (server going away) or
        /// 4401 (credentials expired).
        code: u16,
        /// The server's reason.
        reason: String,
    },
    /// The server did not answer a ping in time: the connection is considered dead.
    #[error("no answer from the server within {0:?} of a ping")]
    HeartbeatTimeout(Duration),
    /// The server sent something that breaks the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server's `welcome` announced another protocol version than this client speaks
    /// ([`ksync_core::PROTOCOL_VERSION`]). The client closes with 4001 and stops, as after the
    /// relay's own 4001 (reconnecting would meet the same server): upgrade the client, or
    /// point it at a server of its version.
    #[error(
        "the server speaks protocol version {server}, this client {}: upgrade",
        ksync_core::PROTOCOL_VERSION
    )]
    UnsupportedProtocol {
        /// The version the server's `welcome` announced (any integer >= 0: read before the
        /// rest of the welcome, which may not decode as this version's).
        server: u64,
    },
    /// The server reported an error message (`{"type":"error"}`).
    #[error("server error {code}: {message}")]
    Server {
        /// The error code, e.g. `forbidden`.
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// The server could not store a published batch; it will be sent again.
    #[error("server failed to store events: {0}")]
    StoreFailed(String),
    /// A published event was refused as invalid; it is not sent again.
    #[error("server refused event {id:?} as invalid: {message}")]
    InvalidEvent {
        /// The event id.
        id: String,
        /// Why.
        message: String,
    },
    /// The standalone outbox is full (overflow policy: the new event is refused, nothing
    /// queued is dropped).
    #[error("outbox full ({capacity} events waiting to be sent); the event was not queued")]
    OutboxFull {
        /// The outbox capacity.
        capacity: usize,
    },
    /// The connection ended without a close frame.
    #[error("connection lost")]
    ConnectionLost,
    /// The room's log is not the one this client's cursor was read in: the room was reset, or
    /// the address now serves another log (`welcome.logId` changed, or the log is shorter than
    /// the cursor: `cursor_ahead`). The client reconnects at once from the start of the room
    /// and publishes its own events again.
    #[error(
        "the room was reset (its log now ends at seq {server_version}; this client's cursor was {cursor}): syncing again from the start"
    )]
    RoomReset {
        /// The cursor this client resumed from.
        cursor: u64,
        /// The room's last sequence number.
        server_version: u64,
    },
}

impl WsError {
    /// Finds the `WsError` inside a [`SyncError`], if it carries one.
    pub fn find(error: &SyncError) -> Option<&WsError> {
        match error {
            SyncError::Transport(inner) => inner.downcast_ref::<WsError>(),
            _ => None,
        }
    }

    /// Whether retrying cannot help: a bad URL or room name, an upgrade refused with a 4xx
    /// status other than 408, 425 and 429 (400 bad room, 401/403 credentials or rights, 404
    /// no such endpoint, 405...: the same request gets the same answer), a `welcome` of another
    /// protocol version, or a close code that `docs/PROTOCOL.md` answers with "fix the
    /// client", "upgrade" or "fresh credentials" (1002, 1003, 1007, 4000, 4001, 4400, 4401,
    /// 4403; the last three are also the in-band refusals of clients that offer `ksync.v1`).
    /// The client stops reconnecting after such an error (with an `error` notification); a
    /// later explicit `connect()` tries again. The relay sends an `error` message before some of
    /// those closes (`protocol` before 4000, `unsupported_protocol` before 4001, `bad_binary`
    /// before 1003): a session that ends on one of these is fatal as well.
    pub fn is_fatal(&self) -> bool {
        use crate::protocol::{close, code};
        if let WsError::Server { code: sent, .. } = self {
            return [code::PROTOCOL, code::UNSUPPORTED_PROTOCOL, code::BAD_BINARY]
                .contains(&sent.as_str());
        }
        matches!(
            self,
            WsError::InvalidUrl { .. }
                | WsError::UnsupportedProtocol { .. }
                | WsError::Tls {
                    certificate: true,
                    ..
                }
                | WsError::Refused {
                    status: 400..=407 | 409..=424 | 426..=428 | 430..=499,
                    ..
                }
                | WsError::Closed {
                    code: close::WEBSOCKET_PROTOCOL
                        | close::UNSUPPORTED_DATA
                        | close::INVALID_DATA
                        | close::PROTOCOL_ERROR
                        | close::UNSUPPORTED_PROTOCOL
                        | close::BAD_ROOM
                        | close::CREDENTIALS_EXPIRED
                        | close::FORBIDDEN,
                    ..
                }
        )
    }
}

impl From<WsError> for SyncError {
    fn from(error: WsError) -> Self {
        SyncError::transport(error)
    }
}
