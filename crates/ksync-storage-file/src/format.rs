//! The on-disk format: a file header, then length-prefixed, checksummed records.
//!
//! ```text
//! header  (16 bytes): magic "KSYNCLOG" | format version u32 LE | flags u32 LE (0)
//! record  (9 + len) : len u32 LE | crc32 u32 LE | kind u8 | payload (len bytes)
//! ```
//!
//! The CRC (crc32, IEEE) covers the length bytes, the kind and the payload, so a damaged length
//! is caught as surely as a damaged payload. Sequence numbers are not stored: the n-th event
//! record is event n.
//!
//! Event payloads are postcard for the fixed fields (`id`, `type`, `timestamp`, `version`,
//! `origin`) followed by the event's `data` in a compact binary value encoding (a tagged tree
//! with LEB128 varints; see `encode_event` for why). Meta payloads are postcard `(key, value)`;
//! a meta removal (a tombstone: the key reads as absent from there on) is postcard `key`.
//! Record kinds: 1 event, 2 meta, 3 meta removal. Kind 3 came later within format version 1:
//! files without one read as before, and a build that predates it refuses a file holding one
//! (an unknown kind under a good checksum is damage to it, never a tail to cut, and it proves
//! that damage before it is no torn tail either). Likewise a record longer than
//! [`MAX_RECORD_LEN`] that the file holds whole under a good checksum is a newer build's (a
//! larger limit), refused with [`StorageError::Format`], never cut.
//!
//! Compaction at open (see `compact.rs`) may drop metadata records that no longer count
//! (overwritten, removed, removals); it copies the others unchanged and never drops an event.

use ksync_core::{Event, EventCodec, StorageError};

use crate::value::owned_str;

/// The first 8 bytes of every kSync log.
pub const MAGIC: [u8; 8] = *b"KSYNCLOG";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the file header.
pub const HEADER_LEN: usize = 16;
/// Length of a record header (`len`, `crc`, `kind`).
pub const RECORD_HEADER_LEN: usize = 9;
/// Largest record payload accepted, in bytes (20 MiB): enough for every valid event. An
/// event's encoding is at most 9/4 of its compact JSON (a float, `0.5,`, is 4 bytes of JSON and
/// 9 here; nothing else grows), and a valid event is at most
/// [`ksync_core::MAX_EVENT_JSON_BYTES`] (8 MiB) of JSON. Anything bigger (an event that skipped
/// validation) is refused at append time with [`StorageError::Codec`].
pub const MAX_RECORD_LEN: usize = 20 << 20;
const _: () = assert!(MAX_RECORD_LEN >= ksync_core::MAX_EVENT_JSON_BYTES / 4 * 9 + 4096);

/// Record kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum RecordKind {
    /// One event; the n-th event record has sequence number n.
    Event = 1,
    /// A metadata entry (`key`, `value`); the latest record for a key wins.
    Meta = 2,
    /// A metadata removal (`key`): the key is absent until a later `Meta` record sets it.
    MetaRemove = 3,
}

impl RecordKind {
    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Event),
            2 => Some(Self::Meta),
            3 => Some(Self::MetaRemove),
            _ => None,
        }
    }
}

/// The file header this build writes.
pub(crate) fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// Checks a file header; every problem is a [`StorageError::Format`].
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), StorageError> {
    if bytes.len() < HEADER_LEN {
        return Err(StorageError::Format(format!(
            "file is {} bytes, shorter than a kSync log header ({HEADER_LEN} bytes)",
            bytes.len()
        )));
    }
    if bytes[..8] != MAGIC {
        return Err(StorageError::Format(
            "not a kSync log (bad magic bytes)".into(),
        ));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version > FORMAT_VERSION {
        return Err(StorageError::Format(format!(
            "kSync log format version {version} is newer than this build reads ({FORMAT_VERSION})"
        )));
    }
    if version == 0 {
        return Err(StorageError::Format("kSync log format version 0".into()));
    }
    let flags = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if flags != 0 {
        return Err(StorageError::Format(format!(
            "unknown kSync log header flags {flags:#x}"
        )));
    }
    Ok(())
}

/// The fixed fields of an event, ahead of its `data`, in postcard's encoding: written by
/// [`encode_event`] and read by [`read_head`] by hand (no serde, no allocation); a test checks
/// the bytes against postcard's.
#[cfg(test)]
#[derive(serde::Serialize)]
struct EventHead<'a> {
    id: &'a str,
    event_type: &'a str,
    timestamp: u64,
    version: u64,
    origin: Option<&'a str>,
}

/// Appends a framed record whose payload `fill` writes.
fn frame(
    out: &mut Vec<u8>,
    kind: RecordKind,
    fill: impl FnOnce(&mut Vec<u8>) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
    out[start + 8] = kind as u8;
    if let Err(e) = fill(out) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - RECORD_HEADER_LEN;
    if len > MAX_RECORD_LEN {
        out.truncate(start);
        return Err(StorageError::Codec(format!(
            "record of {len} bytes exceeds the limit of {MAX_RECORD_LEN} bytes"
        )));
    }
    let len_bytes = (len as u32).to_le_bytes();
    out[start..start + 4].copy_from_slice(&len_bytes);
    let crc = record_crc(len_bytes, kind as u8, &out[start + RECORD_HEADER_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn record_crc(len_bytes: [u8; 4], kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len_bytes);
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

/// Appends one event record to `out` (nothing is appended on error).
///
/// Payload choice (measured, see ARCHITECTURE.md): the fixed fields in postcard, then `data`
/// in the binary value encoding of `value.rs` (postcard cannot carry a `serde_json::Value`).
/// It is the smallest of the forms measured (a third smaller than a JSON payload); decoding
/// costs about the same for all of them, being dominated by allocating the event.
pub(crate) fn encode_event(event: &Event, out: &mut Vec<u8>) -> Result<(), StorageError> {
    frame(out, RecordKind::Event, |out| {
        // postcard's encoding of `EventHead`: strings as a varint length and the bytes,
        // integers as varints, the option as a 0/1 byte then the value.
        use crate::value::{put_str, put_varint};
        put_str(out, &event.id);
        put_str(out, &event.event_type);
        put_varint(out, event.timestamp);
        put_varint(out, event.version);
        match &event.origin {
            None => out.push(0),
            Some(origin) => {
                out.push(1);
                put_str(out, origin);
            }
        }
        crate::value::encode(&event.data, out)
            .map_err(|e| StorageError::Codec(format!("encoding event data: {e}")))
    })
}

/// Appends one metadata record to `out` (nothing is appended on error).
pub(crate) fn encode_meta(key: &str, value: &str, out: &mut Vec<u8>) -> Result<(), StorageError> {
    frame(out, RecordKind::Meta, |out| {
        postcard::to_io(&(key, value), &mut *out)
            .map(|_| ())
            .map_err(|e| StorageError::Codec(format!("encoding meta: {e}")))
    })
}

/// Appends one metadata removal record (a tombstone) to `out` (nothing is appended on error).
pub(crate) fn encode_meta_remove(key: &str, out: &mut Vec<u8>) -> Result<(), StorageError> {
    frame(out, RecordKind::MetaRemove, |out| {
        postcard::to_io(&key, &mut *out)
            .map(|_| ())
            .map_err(|e| StorageError::Codec(format!("encoding meta removal: {e}")))
    })
}

/// The fields of an event payload, borrowed, `data` still encoded.
struct RawEvent<'a> {
    id: &'a [u8],
    event_type: &'a [u8],
    timestamp: u64,
    version: u64,
    origin: Option<&'a [u8]>,
    data: &'a [u8],
}

/// Splits an event payload: postcard's encoding of [`EventHead`] (strings as a varint length
/// and the bytes, integers as LEB128 varints, an option as a 0/1 byte then the value), then
/// `data`. Strings are not checked for UTF-8 here.
fn read_head(payload: &[u8]) -> Result<RawEvent<'_>, String> {
    let mut r = crate::value::Reader::new(payload);
    let id = r.str_bytes()?;
    let event_type = r.str_bytes()?;
    let timestamp = r.varint()?;
    let version = r.varint()?;
    let origin = match r.varint()? {
        0 => None,
        1 => Some(r.str_bytes()?),
        _ => return Err("bad origin tag".into()),
    };
    Ok(RawEvent {
        id,
        event_type,
        timestamp,
        version,
        origin,
        data: r.rest(),
    })
}

fn utf8(raw: &[u8]) -> Result<(), String> {
    if crate::value::is_utf8(raw) {
        Ok(())
    } else {
        Err("event string is not UTF-8".into())
    }
}

/// Checks that an event payload decodes ([`decode_event`] would succeed), allocating nothing.
/// Returns its id (checked UTF-8) and version.
pub(crate) fn check_event(payload: &[u8]) -> Result<(&[u8], u64), String> {
    let raw = read_head(payload).map_err(|e| format!("undecodable event record: {e}"))?;
    utf8(raw.id)?;
    utf8(raw.event_type)?;
    if let Some(origin) = raw.origin {
        utf8(origin)?;
    }
    crate::value::check(raw.data).map_err(|e| format!("undecodable event data: {e}"))?;
    Ok((raw.id, raw.version))
}

/// Decodes an event payload.
pub(crate) fn decode_event(payload: &[u8]) -> Result<Event, String> {
    let raw = read_head(payload).map_err(|e| format!("undecodable event record: {e}"))?;
    let data =
        crate::value::decode(raw.data).map_err(|e| format!("undecodable event data: {e}"))?;
    Ok(Event {
        id: owned_str(raw.id)?,
        event_type: owned_str(raw.event_type)?,
        data,
        timestamp: raw.timestamp,
        version: raw.version,
        origin: raw.origin.map(owned_str).transpose()?,
    })
}

/// The `(id, version)` of an event payload, without checking or decoding the rest.
pub(crate) fn event_key(payload: &[u8]) -> Option<(&[u8], u64)> {
    read_head(payload).ok().map(|raw| (raw.id, raw.version))
}

/// How the log index reads back event payloads it keeps encoded.
pub(crate) const CODEC: EventCodec = EventCodec {
    decode: |payload| decode_event(payload).ok(),
    key: event_key,
};

/// A decoded record.
#[cfg(test)]
#[derive(Debug)]
pub(crate) enum Record {
    /// An event.
    Event(Event),
    /// A metadata entry.
    Meta(String, String),
    /// A metadata removal.
    MetaRemove(String),
}

/// What [`parse_frame`] found at the start of a buffer.
#[derive(Debug)]
pub(crate) enum Frame<'a> {
    /// A complete record with a good checksum.
    Good {
        /// Its kind byte (not yet checked against the known kinds).
        kind: u8,
        /// Its payload.
        payload: &'a [u8],
        /// Total bytes the record takes (header + payload).
        total: usize,
    },
    /// The buffer ends inside the record.
    Incomplete,
    /// The bytes cannot be a record (length out of range or checksum mismatch).
    Bad(&'static str),
}

/// Parses the record that starts at `buf[0]`.
pub(crate) fn parse_frame(buf: &[u8]) -> Frame<'_> {
    if buf.len() < RECORD_HEADER_LEN {
        return Frame::Incomplete;
    }
    let len_bytes = [buf[0], buf[1], buf[2], buf[3]];
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_RECORD_LEN {
        return Frame::Bad("record length out of range");
    }
    let total = RECORD_HEADER_LEN + len;
    if buf.len() < total {
        return Frame::Incomplete;
    }
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let kind = buf[8];
    let payload = &buf[RECORD_HEADER_LEN..total];
    if record_crc(len_bytes, kind, payload) != crc {
        return Frame::Bad("checksum mismatch");
    }
    Frame::Good {
        kind,
        payload,
        total,
    }
}

/// Decodes the payload of a record with a good checksum. An error here means the record was
/// written by something else than this format's writer (a good checksum rules out a torn write).
#[cfg(test)]
pub(crate) fn decode(kind: u8, payload: &[u8]) -> Result<Record, String> {
    match RecordKind::from_byte(kind) {
        Some(RecordKind::Event) => decode_event(payload).map(Record::Event),
        Some(RecordKind::Meta) => {
            let (key, value) = decode_meta(payload)?;
            Ok(Record::Meta(key.to_owned(), value.to_owned()))
        }
        Some(RecordKind::MetaRemove) => decode_meta_remove(payload).map(Record::MetaRemove),
        None => Err(format!("unknown record kind {kind}")),
    }
}

fn decode_meta(payload: &[u8]) -> Result<(&str, &str), String> {
    let ((key, value), rest): ((&str, &str), &[u8]) =
        postcard::take_from_bytes(payload).map_err(|e| format!("undecodable meta record: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes in meta record".into());
    }
    Ok((key, value))
}

fn decode_meta_remove(payload: &[u8]) -> Result<String, String> {
    let (key, rest): (&str, &[u8]) = postcard::take_from_bytes(payload)
        .map_err(|e| format!("undecodable meta removal record: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes in meta removal record".into());
    }
    Ok(key.to_owned())
}

/// A checked record whose event payload is left encoded.
#[derive(Debug)]
pub(crate) enum CheckedRecord<'a> {
    /// An event; its payload decodes. Its id and version.
    Event(&'a [u8], u64),
    /// A metadata entry.
    Meta(String, String),
    /// A metadata removal.
    MetaRemove(String),
}

/// Checks the payload of a record with a good checksum like [`decode`] does, decoding only
/// metadata: events stay encoded (see `ksync_core::LogIndex::push_encoded`).
pub(crate) fn check(kind: u8, payload: &[u8]) -> Result<CheckedRecord<'_>, String> {
    match RecordKind::from_byte(kind) {
        Some(RecordKind::Event) => {
            check_event(payload).map(|(id, version)| CheckedRecord::Event(id, version))
        }
        Some(RecordKind::Meta) => {
            let (key, value) = decode_meta(payload)?;
            Ok(CheckedRecord::Meta(key.to_owned(), value.to_owned()))
        }
        Some(RecordKind::MetaRemove) => decode_meta_remove(payload).map(CheckedRecord::MetaRemove),
        None => Err(format!("unknown record kind {kind}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_round_trips() {
        let events = [
            Event::new("a", "t", json!({"x": [1, 2.5, null], "s": "é\"\n"}), 7),
            Event::new("b", "t", json!(null), 0)
                .with_version(u64::MAX)
                .with_origin("o"),
            Event::new("", "", json!(-0.0), u64::MAX),
        ];
        for event in events {
            let mut buf = Vec::new();
            encode_event(&event, &mut buf).expect("encodes");
            let (kind, payload) = whole_record(&buf);
            match decode(kind, payload).expect("decodes") {
                Record::Event(back) => assert_eq!(back, event),
                other => panic!("wrong record {other:?}"),
            }
        }
    }

    #[test]
    fn meta_round_trips_and_damage_is_seen() {
        let mut buf = Vec::new();
        encode_meta("k", "v", &mut buf).expect("encodes");
        let (kind, payload) = whole_record(&buf);
        assert!(
            matches!(decode(kind, payload), Ok(Record::Meta(ref k, ref v)) if k == "k" && v == "v")
        );
        assert_damage_is_seen(&buf);
    }

    #[test]
    fn meta_removal_round_trips_and_damage_is_seen() {
        let mut buf = Vec::new();
        encode_meta_remove("cursor/p2p/x", &mut buf).expect("encodes");
        let (kind, payload) = whole_record(&buf);
        assert_eq!(kind, RecordKind::MetaRemove as u8);
        assert!(
            matches!(decode(kind, payload), Ok(Record::MetaRemove(ref k)) if k == "cursor/p2p/x")
        );
        assert!(
            matches!(check(kind, payload), Ok(CheckedRecord::MetaRemove(ref k)) if k == "cursor/p2p/x")
        );
        // A removal's payload is not a meta entry's, nor the other way round.
        assert!(check(RecordKind::Meta as u8, payload).is_err());
        let mut meta = Vec::new();
        encode_meta("k", "v", &mut meta).expect("encodes");
        assert!(check(RecordKind::MetaRemove as u8, &meta[RECORD_HEADER_LEN..]).is_err());
        assert_damage_is_seen(&buf);
    }

    /// The kind and payload of `buf`, which must be one whole good record.
    fn whole_record(buf: &[u8]) -> (u8, &[u8]) {
        match parse_frame(buf) {
            Frame::Good {
                kind,
                payload,
                total,
            } => {
                assert_eq!(total, buf.len());
                (kind, payload)
            }
            other => panic!("bad frame {other:?}"),
        }
    }

    /// Every flipped byte of the record `buf` fails its check, every cut of it is incomplete.
    fn assert_damage_is_seen(buf: &[u8]) {
        for i in 0..buf.len() {
            let mut bad = buf.to_vec();
            bad[i] ^= 0x40;
            assert!(
                !matches!(parse_frame(&bad), Frame::Good { .. }),
                "flip at {i} undetected"
            );
        }
        for cut in 0..buf.len() {
            assert!(matches!(parse_frame(&buf[..cut]), Frame::Incomplete));
        }
    }

    /// Re-frames `payload` as an event record with a good checksum.
    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(&mut out, RecordKind::Event, |out| {
            out.extend_from_slice(payload);
            Ok(())
        })
        .expect("frames");
        out
    }

    #[test]
    fn checking_agrees_with_decoding_on_damaged_payloads() {
        let event = Event::new("id-é", "t", json!({"k": ["v", 1.5, -3, {"x": null}]}), 9)
            .with_origin("o")
            .with_version(300);
        let mut buf = Vec::new();
        encode_event(&event, &mut buf).expect("encodes");
        let payload = buf[RECORD_HEADER_LEN..].to_vec();
        assert!(check(RecordKind::Event as u8, &payload).is_ok());
        let mut refused = 0;
        for i in 0..payload.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = payload.clone();
                bad[i] ^= flip;
                let record = framed(&bad);
                let Frame::Good { kind, payload, .. } = parse_frame(&record) else {
                    panic!("a good checksum");
                };
                let checked = check(kind, payload).is_ok();
                assert_eq!(
                    checked,
                    decode(kind, payload).is_ok(),
                    "flip {flip:#x} at {i}"
                );
                refused += usize::from(!checked);
            }
        }
        assert!(refused > 0);
        // Not UTF-8 in the id, the type, the origin, a key and a string value: each refused.
        for needle in [&b"id-"[..], b"\x01t", b"\x01o", b"\x01k", b"\x01v"] {
            let at = payload
                .windows(needle.len())
                .position(|w| w == needle)
                .expect("field present")
                + needle.len()
                - 1;
            let mut bad = payload.clone();
            bad[at] = 0xff;
            assert!(check(RecordKind::Event as u8, &bad).is_err());
            assert!(decode(RecordKind::Event as u8, &bad).is_err());
        }
    }

    #[test]
    fn a_checksummed_record_that_does_not_decode_is_corrupt_not_cut() {
        let good = |i: u64| {
            let mut out = Vec::new();
            encode_event(
                &Event::new(format!("e{i}"), "t", json!({"s": "x"}), i),
                &mut out,
            )
            .expect("encodes");
            out
        };
        let mut bad_payload = good(1)[RECORD_HEADER_LEN..].to_vec();
        let at = bad_payload.len() - 1; // the last byte of the string "x"
        bad_payload[at] = 0xff;
        let bad = framed(&bad_payload);
        for last in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("bad.log");
            let mut file = header().to_vec();
            file.extend_from_slice(&good(0));
            let offset = file.len() as u64;
            file.extend_from_slice(&bad);
            if !last {
                file.extend_from_slice(&good(2));
            }
            std::fs::write(&path, &file).expect("write");
            match crate::FileStorage::open(&path) {
                Err(StorageError::Corrupt { offset: at, reason }) => {
                    assert_eq!(at, offset);
                    assert!(reason.contains("UTF-8"), "{reason}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
            assert_eq!(std::fs::read(&path).expect("read"), file, "left alone");
        }
    }

    #[test]
    fn event_heads_are_postcard() {
        for event in [
            Event::new("a", "t", json!(null), 7),
            Event::new("é".repeat(200), "type", json!(1), u64::MAX)
                .with_version(u64::MAX / 3)
                .with_origin("o".repeat(130)),
            Event::new("", "", json!(null), 0).with_version(128),
        ] {
            let head = EventHead {
                id: &event.id,
                event_type: &event.event_type,
                timestamp: event.timestamp,
                version: event.version,
                origin: event.origin.as_deref(),
            };
            let mut expected = postcard::to_allocvec(&head).expect("postcard");
            crate::value::encode(&event.data, &mut expected).expect("data");
            let mut buf = Vec::new();
            encode_event(&event, &mut buf).expect("encodes");
            assert_eq!(&buf[RECORD_HEADER_LEN..], &expected[..]);
        }
    }

    #[test]
    fn headers() {
        assert!(check_header(&header()).is_ok());
        let mut newer = header();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(matches!(
            check_header(&newer),
            Err(StorageError::Format(m)) if m.contains("newer")
        ));
        assert!(matches!(
            check_header(b"KSYNCLOX\x01\0\0\0\0\0\0\0"),
            Err(StorageError::Format(_))
        ));
        assert!(matches!(
            check_header(b"KSYNC"),
            Err(StorageError::Format(_))
        ));
    }
}
