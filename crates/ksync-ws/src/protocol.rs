//! The wire protocol shared by the client and the relay: JSON messages in text frames, and the
//! same JSON deflated in binary frames when both sides agreed on compression.
//!
//! `docs/PROTOCOL.md` describes every message for people writing clients in other languages;
//! this module is its Rust form.

use std::io::{Read, Write};

use ksync_core::{Event, Stored};
use serde::{Deserialize, Serialize};

/// Close codes the relay (and the client) use, besides the standard ones.
pub mod close {
    /// Normal closure (RFC 6455).
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down (RFC 6455 "going away"): reconnect later and resume.
    pub const GOING_AWAY: u16 = 1001;
    /// Data the endpoint cannot accept: a binary frame without negotiated compression, or one
    /// that does not inflate to JSON.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A frame broke RFC 6455 (reserved bits or opcodes, an oversized or fragmented control
    /// frame, an unmasked client frame, a bad continuation...).
    pub const WEBSOCKET_PROTOCOL: u16 = 1002;
    /// A text frame (or close reason) that is not valid UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy violation (e.g. rights withdrawn).
    pub const POLICY: u16 = 1008;
    /// A message larger than the limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server failed internally (e.g. storage).
    pub const INTERNAL: u16 = 1011;
    /// The connection broke the protocol: the first message was not `hello`, or similar.
    pub const PROTOCOL_ERROR: u16 = 4000;
    /// The `hello` announced a protocol version this server does not speak.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4001;
    /// No `hello` arrived within the handshake timeout.
    pub const HANDSHAKE_TIMEOUT: u16 = 4002;
    /// The client fell too far behind the live stream: reconnect and resume from your cursor.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client did not answer a ping before the next one was due.
    pub const HEARTBEAT_TIMEOUT: u16 = 4009;
    /// The credentials the connection was opened with expired (a JWT's `exp`, plus the
    /// server's leeway): reconnect with fresh ones (the same ones are refused with 401).
    /// Also the in-band refusal of missing or wrong credentials (see
    /// [`super::code::UNAUTHORIZED`]).
    pub const CREDENTIALS_EXPIRED: u16 = 4401;
    /// In-band refusal of missing or refused credentials (HTTP 401 as a close code); the same
    /// code as [`CREDENTIALS_EXPIRED`]: either way, fresh credentials are needed.
    pub const UNAUTHORIZED: u16 = CREDENTIALS_EXPIRED;
    /// In-band refusal: a bad room name (HTTP 400 as a close code).
    pub const BAD_ROOM: u16 = 4400;
    /// In-band refusal: the credentials do not allow this room.
    pub const FORBIDDEN: u16 = 4403;
    /// In-band refusal: too many failed logins from this address, or too many connections
    /// of this client (`RelayConfig::max_connections_per_client`); try again later.
    pub const RATE_LIMITED: u16 = 4429;
}

/// Error codes carried by [`ServerMessage::Error`].
pub mod code {
    /// The text was not JSON, or not a known message shape.
    pub const BAD_MESSAGE: &str = "bad_message";
    /// The message `type` is not known.
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    /// The first message was not `hello`, or `hello` came twice.
    pub const PROTOCOL: &str = "protocol";
    /// The `hello` named a protocol version the server does not speak.
    pub const UNSUPPORTED_PROTOCOL: &str = "unsupported_protocol";
    /// The caller may not do this (e.g. publish with a read-only grant, or open a room its
    /// credentials do not cover).
    pub const FORBIDDEN: &str = "forbidden";
    /// No credentials, or refused ones (in-band refusal of an upgrade, before close 4401).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// Too many failed logins from this address, or too many connections of this client
    /// (in-band, before close 4429).
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The room name is not valid (in-band, before close 4400).
    pub const BAD_ROOM: &str = "bad_room";
    /// A binary frame arrived without negotiated compression, or did not inflate.
    pub const BAD_BINARY: &str = "bad_binary";
    /// The server's storage failed; nothing from the publish was stored.
    pub const STORAGE: &str = "storage";
    /// The `since` cursor is beyond the room's last sequence number (the room was reset or
    /// the cursor belongs to another server); the stream continues from `serverVersion`.
    pub const CURSOR_AHEAD: &str = "cursor_ahead";
}

/// Messages a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ClientMessage {
    /// The first message on every connection.
    Hello(Hello),
    /// Events to store and fan out, acknowledged by an `ack` with the same `ref`.
    Publish(Publish),
    /// Asks for a `pong`: a liveness check for clients that cannot send WebSocket pings
    /// (browsers). Allowed any time after `hello`.
    Ping(Ping),
}

/// `ping` (client) and `pong` (server): the `pong` echoes the `ping`'s `ref`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Chosen by the client; echoed in the `pong`.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<u64>,
}

/// `hello`: protocol version and where to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// Must equal [`ksync_core::PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The last sequence number the client holds: the server sends every event after it, then
    /// the live stream. Absent: live stream only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// Ask for a snapshot (latest version of every id) plus the tail instead of the history.
    #[serde(default, skip_serializing_if = "is_false")]
    pub state: bool,
    /// Ask the server to send event batches as deflated binary frames.
    #[serde(default, skip_serializing_if = "is_false")]
    pub compression: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `publish`: a batch of events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publish {
    /// Chosen by the client; echoed in the `ack`.
    #[serde(rename = "ref")]
    pub reference: u64,
    /// The events, stored in this order.
    pub events: Vec<serde_json::Value>,
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    /// The answer to `hello`.
    Welcome(Welcome),
    /// A batch of events with their sequence numbers, in order.
    Events(EventsBatch),
    /// One page of a snapshot (state-based start).
    Snapshot(SnapshotPage),
    /// The outcome of a `publish`, one result per event.
    Ack(Ack),
    /// Something the client sent was refused.
    Error(ErrorMessage),
    /// The answer to a `ping`, after everything the server sent before it.
    Pong(Ping),
}

/// `welcome`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Welcome {
    /// The protocol version the server speaks.
    pub protocol: u32,
    /// The room joined.
    pub room: String,
    /// The room's last sequence number when the client joined. Catch-up covers
    /// `(since, serverVersion]`; live events start after it.
    pub server_version: u64,
    /// Whether event batches will come as deflated binary frames.
    pub compression: bool,
    /// How often the server pings, in milliseconds.
    pub heartbeat_ms: u64,
    /// The largest message the server accepts, in bytes.
    pub max_message_size: usize,
    /// Names the room's log: it changes when the room is reset (its log deleted, an in-memory
    /// server restarted) or another server answers at this address, and only then. A cursor
    /// read from another log does not apply to this one: a client seeing a new `logId` syncs
    /// the room again from `since: 0` and publishes its events again. Absent from servers
    /// before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
}

/// `events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsBatch {
    /// The events in sequence order.
    pub events: Vec<Stored>,
}

/// `snapshot`: one page of the room's state as of `serverVersion`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPage {
    /// The sequence number the snapshot reflects; the tail starts after it.
    pub server_version: u64,
    /// The latest version of some ids.
    pub events: Vec<Event>,
    /// Whether this is the last page.
    pub last: bool,
}

/// `ack`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// The `ref` of the publish.
    #[serde(rename = "ref")]
    pub reference: u64,
    /// One result per published event, in order.
    pub results: Vec<PublishResult>,
    /// The room's last sequence number after this publish.
    pub server_version: u64,
}

/// What happened to one published event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum PublishResult {
    /// Stored at `seq` (durably, when the server's storage is durable).
    Stored {
        /// Its sequence number.
        seq: u64,
    },
    /// The room already held this exact revision at `seq`; nothing new was stored.
    Duplicate {
        /// Where it is.
        seq: u64,
    },
    /// The room holds other content under the same `(id, version)`; nothing was stored.
    Conflict {
        /// The revision the room holds. Absent once the ack's revisions would take it past
        /// the server's `maxMessageSize`: the revision is in the room's log at a sequence
        /// number the client reads (or has read) from the stream, where it settles the
        /// conflict like any received event.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held: Option<Event>,
    },
    /// The event is not valid; nothing was stored.
    Invalid {
        /// Why.
        message: String,
    },
    /// The server failed to store the batch; nothing was stored. Retry later.
    Failed {
        /// Why.
        message: String,
    },
}

/// `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// A stable code (see [`code`]).
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
    /// The `ref` of the publish this is about, if any.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<u64>,
}

impl ServerMessage {
    /// An `error` message.
    pub fn error(code: &str, message: impl Into<String>, reference: Option<u64>) -> Self {
        ServerMessage::Error(ErrorMessage {
            code: code.into(),
            message: message.into(),
            reference,
        })
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not JSON, or JSON of the wrong shape.
    #[error("malformed message: {0}")]
    Json(#[source] serde_json::Error),
    /// Valid JSON whose `type` is not a known message.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A binary frame that does not inflate, or inflates past the size limit.
    #[error("bad compressed frame: {0}")]
    Inflate(String),
}

/// Decodes a JSON message, telling an unknown `type` apart from malformed JSON.
pub fn decode<T: serde::de::DeserializeOwned>(
    text: &[u8],
    known: &[&str],
) -> Result<T, DecodeError> {
    decode_with(text, known, |text| serde_json::from_slice(text))
}

/// [`decode`] with `read` as the JSON reader.
fn decode_with<T>(
    text: &[u8],
    known: &[&str],
    read: fn(&[u8]) -> serde_json::Result<T>,
) -> Result<T, DecodeError> {
    read(text).map_err(|e| {
        // Find out whether the problem is the type tag, for a precise error.
        #[derive(Deserialize)]
        struct Tag {
            #[serde(rename = "type")]
            kind: String,
        }
        match serde_json::from_slice::<Tag>(text) {
            Ok(tag) if !known.contains(&tag.kind.as_str()) => DecodeError::UnknownType(tag.kind),
            _ => DecodeError::Json(e),
        }
    })
}

/// Decodes a message from the relay, the one reader of them. Read through
/// [`ksync_core::received_json`]: a message nesting past the 127 levels serde_json reads, up
/// to the deepest data a received event may hold plus what a message puts around it, is read
/// too. An `events` frame and a `snapshot` page put 3 or 4 levels around an event's data, an
/// ack's `held` revision 4: events older relays stored with data up to 126 levels deep (the
/// most they took) arrive in each, instead of every session ending on the same message.
pub fn decode_server_message(json: &[u8]) -> Result<ServerMessage, DecodeError> {
    decode_with(json, SERVER_TYPES, ksync_core::received_json::from_slice)
}

/// The `protocol` a `hello` names (relay or monitor feed), read before the rest of it: a
/// client of another version is answered `unsupported_protocol` (4001) even when its other
/// fields have shapes this version does not read. `None` for text that is not a `hello` with
/// an integer `protocol` >= 0 (the full decode then says what is wrong with it).
pub fn hello_protocol(text: &[u8]) -> Option<u64> {
    announced_protocol(text, "hello")
}

/// The `protocol` a `welcome` names, read before the rest of it, as the relay reads a
/// `hello`'s: a server of another version is refused as one (`WsError::UnsupportedProtocol`)
/// even when its other fields have shapes this version does not read. `None` for text that is
/// not a `welcome` with an integer `protocol` >= 0: such a welcome is one the client cannot
/// follow (a protocol error, retried), not one of another version.
pub fn welcome_protocol(text: &[u8]) -> Option<u64> {
    announced_protocol(text, "welcome")
}

/// The integer `protocol` >= 0 of a message of type `kind`.
fn announced_protocol(text: &[u8], kind: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct Announced {
        #[serde(rename = "type")]
        kind: String,
        protocol: u64,
    }
    serde_json::from_slice::<Announced>(text)
        .ok()
        .filter(|announced| announced.kind == kind)
        .map(|announced| announced.protocol)
}

/// The `type` names of [`ClientMessage`].
pub const CLIENT_TYPES: &[&str] = &["hello", "publish", "ping"];
/// The `type` names of [`ServerMessage`].
pub const SERVER_TYPES: &[&str] = &["welcome", "events", "snapshot", "ack", "error", "pong"];

/// Largest message kSync's Rust client accepts (and inflates a compressed frame to), in bytes.
pub const CLIENT_MAX_MESSAGE_SIZE: usize = 16 << 20;

/// The `maxMessageSize` a relay may announce, in bytes: at least 1 KiB, at most 8 MiB. An
/// `ack` can be about twice that limit (see docs/PROTOCOL.md, "Frame sizes"), and every
/// message must still fit [`CLIENT_MAX_MESSAGE_SIZE`], or clients would refuse a frame the
/// relay sends them again after each reconnect.
pub const MAX_MESSAGE_SIZE_RANGE: std::ops::RangeInclusive<usize> =
    1024..=CLIENT_MAX_MESSAGE_SIZE / 2;

/// Shortest message, in bytes of JSON, that goes deflated when compression is negotiated:
/// shorter ones (a single small event) stay text frames. Compression is for batches; a
/// compressor run per tiny message costs more than the few bytes it saves.
pub const DEFLATE_MIN_BYTES: usize = 1024;

/// Deflates (raw RFC 1951 deflate, no zlib header) a JSON message for a binary frame.
pub fn deflate(json: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(json.len() / 2 + 16),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(json);
    encoder.finish().unwrap_or_default()
}

/// Inflates a binary frame, refusing output larger than `limit` bytes (a deflate bomb).
pub fn inflate(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit));
    let decoder = flate2::read::DeflateDecoder::new(data);
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::Inflate(e.to_string()))?;
    if out.len() > limit {
        return Err(DecodeError::Inflate(format!(
            "inflates past the {limit}-byte message limit"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_have_the_documented_shape() {
        let hello: ClientMessage =
            serde_json::from_str(r#"{"type":"hello","protocol":1,"since":5}"#).expect("hello");
        assert_eq!(
            hello,
            ClientMessage::Hello(Hello {
                protocol: 1,
                since: Some(5),
                state: false,
                compression: false
            })
        );
        let ack = ServerMessage::Ack(Ack {
            reference: 7,
            results: vec![
                PublishResult::Stored { seq: 3 },
                PublishResult::Duplicate { seq: 1 },
            ],
            server_version: 3,
        });
        assert_eq!(
            serde_json::to_value(&ack).expect("ser"),
            json!({"type":"ack","ref":7,"results":[{"status":"stored","seq":3},{"status":"duplicate","seq":1}],"serverVersion":3})
        );
    }

    #[test]
    fn unknown_type_is_told_apart_from_garbage() {
        assert!(matches!(
            decode::<ClientMessage>(br#"{"type":"subscribe"}"#, CLIENT_TYPES),
            Err(DecodeError::UnknownType(t)) if t == "subscribe"
        ));
        assert!(matches!(
            decode::<ClientMessage>(b"{not json", CLIENT_TYPES),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode::<ClientMessage>(br#"{"type":"publish"}"#, CLIENT_TYPES),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn deflate_round_trips_and_bombs_are_refused() {
        let json = serde_json::to_vec(&json!({"a": "x".repeat(10_000)})).expect("ser");
        let packed = deflate(&json);
        assert!(packed.len() < json.len() / 10);
        assert_eq!(inflate(&packed, 1 << 20).expect("inflate"), json);
        assert!(matches!(
            inflate(&packed, 1000),
            Err(DecodeError::Inflate(_))
        ));
        assert!(inflate(b"\xff\xfe garbage", 1000).is_err());
    }
}
