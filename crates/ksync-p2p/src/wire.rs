//! What goes over the wire: the gossip payload, gossipsub message ids, and the catch-up
//! (anti-entropy) request-response messages. See `docs/PROTOCOL.md`, section P2P.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use ksync_core::{Event, EventLimits, PROTOCOL_VERSION, RevisionKey};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The gossipsub topic of a network.
pub fn gossip_topic(network: &str) -> String {
    format!("/ksync/{PROTOCOL_VERSION}/events/{network}")
}

/// The request-response protocol of catch-up.
pub(crate) const SYNC_PROTOCOL: &str = "/ksync/sync/1";
/// The Kademlia protocol (a private DHT, not the public IPFS one).
pub(crate) const KAD_PROTOCOL: &str = "/ksync/kad/1";

/// The identify `protocol_version` peers announce; peers that announce another are dropped.
pub(crate) fn identify_version(network: &str) -> String {
    format!("/ksync/{PROTOCOL_VERSION}/{network}")
}

/// The identify `agent_version`: the crate and the spec's `peerId` of this peer, so others can
/// `connect_to_peer` it by that name.
pub(crate) fn agent_version(peer_name: &str) -> String {
    format!("ksync-p2p/{} peer/{peer_name}", env!("CARGO_PKG_VERSION"))
}

/// The spec's `peerId` in a peer's identify `agent_version` (see [`agent_version`]), if it is
/// a valid name.
pub(crate) fn peer_name(agent_version: &str) -> Option<String> {
    let (_, name) = agent_version.rsplit_once(" peer/")?;
    ksync_core::Name::new(name).ok()?;
    Some(name.to_owned())
}

/// Most keys in one `Keys` page.
pub(crate) const MAX_PAGE: u32 = 1024;
/// Most events of its log a responder looks at for one `Keys` page: a long run of events its
/// filter keeps home costs one bounded walk per page, and an empty page that moves the
/// requester past it.
pub(crate) const MAX_PAGE_SCAN: usize = 8 * MAX_PAGE as usize;
/// Most keys in one `Fetch` request.
pub(crate) const MAX_FETCH: usize = 1024;
/// Largest catch-up request on the wire (1024 keys of up to 256-byte ids fit).
pub(crate) const MAX_REQUEST_BYTES: u64 = 512 * 1024;
/// Most catch-up requests one connection may have in progress at once, both ways (libp2p's
/// `max_concurrent_streams`). An honest peer has one outstanding request per session (so one
/// each way per connection); each answer can take [`MAX_RESPONSE_BYTES`], so libp2p's 100 (or
/// our earlier 64) let one connection hold up to a GiB of answers. Overflow policy: a
/// further request is dropped, inbound (its asker sees it fail) or outbound (ours fails and
/// that catch-up round ends; the next one asks again).
pub(crate) const MAX_SYNC_STREAMS: usize = 8;
/// Largest catch-up response on the wire (20 MiB): a full [`RESPONSE_BUDGET`] of events in
/// CBOR, which is at most 9/4 of their JSON (a float, `0.5,`, is 4 bytes of JSON and 9 of
/// CBOR), plus the `too_large` keys ([`MAX_FETCH`] of them at most).
pub(crate) const MAX_RESPONSE_BYTES: u64 = 20 * 1024 * 1024;
/// A responder stops adding events to a `Events` response past this many (JSON) bytes, leaving
/// room under [`MAX_RESPONSE_BYTES`] for the encoding's overhead: the largest valid event, so
/// that any one fits an answer.
pub(crate) const RESPONSE_BUDGET: usize = ksync_core::MAX_EVENT_JSON_BYTES;
const _: () =
    assert!(MAX_RESPONSE_BYTES as usize >= RESPONSE_BUDGET / 4 * 9 + MAX_FETCH * 512 + 64 * 1024);

/// One gossip message: one event, JSON `{"v":1,"events":[<event>]}`, or a batch,
/// `{"v":1,"n":<count>,"events":[...]}` (written with `n` first, see [`BATCH_PREFIX`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPayload<'a> {
    v: u32,
    #[serde(default)]
    n: Option<usize>,
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
}

/// How a batch payload starts. Its message id is then its publisher and sequence number, so
/// a receiver identifies it (and drops the copies it already has) without parsing it.
pub(crate) const BATCH_PREFIX: &[u8] = b"{\"v\":1,\"n\":";

/// Why a gossip message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejected {
    #[error("not a kSync gossip payload: {0}")]
    Malformed(String),
    #[error("protocol version {0} (ours is {PROTOCOL_VERSION})")]
    Version(u32),
    #[error("empty batch")]
    Empty,
    #[error("batch says {said} events, holds {held}")]
    Count { said: usize, held: usize },
    #[error("event of {size} bytes (limit {max})")]
    TooLarge { size: usize, max: usize },
    #[error("invalid event: {0}")]
    Invalid(String),
    #[error("event {id:?} version {version} appears twice with different content")]
    Repeated { id: String, version: u64 },
}

/// Builds the payload from already-encoded events: one event plain, several as a batch with
/// its count.
pub(crate) fn encode_payload(events: &[Vec<u8>]) -> Vec<u8> {
    let total: usize = events.iter().map(|e| e.len() + 1).sum();
    let mut out = Vec::with_capacity(total + 40);
    if events.len() > 1 {
        out.extend_from_slice(
            format!(
                "{{\"v\":{PROTOCOL_VERSION},\"n\":{},\"events\":[",
                events.len()
            )
            .as_bytes(),
        );
    } else {
        out.extend_from_slice(format!("{{\"v\":{PROTOCOL_VERSION},\"events\":[").as_bytes());
    }
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(event);
    }
    out.extend_from_slice(b"]}");
    out
}

/// Parses and checks a gossip payload: every event must parse, pass
/// [`Event::validate_received`] and be at most `max_event_bytes` long. One bad event rejects the whole message, and so does a
/// revision named twice with different content (no honest sender does that, and every such
/// copy would conflict with the stored revision, which the storage clones into each
/// conflict). A repeated identical copy is dropped.
pub(crate) fn decode_payload(data: &[u8], max_event_bytes: usize) -> Result<Vec<Event>, Rejected> {
    let raw: RawPayload<'_> =
        serde_json::from_slice(data).map_err(|e| Rejected::Malformed(e.to_string()))?;
    if raw.v != PROTOCOL_VERSION {
        return Err(Rejected::Version(raw.v));
    }
    if raw.events.is_empty() {
        return Err(Rejected::Empty);
    }
    if let Some(said) = raw.n
        && said != raw.events.len()
    {
        return Err(Rejected::Count {
            said,
            held: raw.events.len(),
        });
    }
    let limits = EventLimits::default();
    let events = raw
        .events
        .into_iter()
        .map(|raw| {
            let size = raw.get().len();
            if size > max_event_bytes {
                return Err(Rejected::TooLarge {
                    size,
                    max: max_event_bytes,
                });
            }
            // Data older builds stored nests deeper than serde_json reads of one event.
            let event: Event = ksync_core::received_json::from_str(raw.get())
                .map_err(|e| Rejected::Malformed(e.to_string()))?;
            // The receive check: a peer of an older build publishes data up to 128 deep, and
            // its peers store it; refused here, it would come by catch-up anyway.
            event
                .validate_received(&limits)
                .map_err(|e| Rejected::Invalid(e.to_string()))?;
            Ok(event)
        })
        .collect::<Result<Vec<Event>, Rejected>>()?;
    if events.len() == 1 {
        return Ok(events);
    }
    // Index of the first copy of each revision.
    let mut first: HashMap<(&str, u64), usize> = HashMap::with_capacity(events.len());
    let mut repeats = Vec::new();
    for (i, event) in events.iter().enumerate() {
        match first.entry((event.id.as_str(), event.version)) {
            Entry::Vacant(v) => {
                v.insert(i);
            }
            Entry::Occupied(o) if events[*o.get()].same_content(event) => repeats.push(i),
            Entry::Occupied(_) => {
                return Err(Rejected::Repeated {
                    id: event.id.clone(),
                    version: event.version,
                });
            }
        }
    }
    if repeats.is_empty() {
        return Ok(events);
    }
    Ok(events
        .into_iter()
        .enumerate()
        .filter(|(i, _)| repeats.binary_search(i).is_err())
        .map(|(_, e)| e)
        .collect())
}

#[derive(Deserialize)]
struct IdView {
    events: Vec<KeyView>,
}

#[derive(Deserialize)]
struct KeyView {
    id: String,
    version: u64,
}

/// The gossipsub message id. One event: `e` + id + NUL + version, so the same revision
/// published again (by anyone) dies in the seen-cache. A batch written with its count
/// ([`BATCH_PREFIX`]): `p` + the publisher's peer id + its sequence number (both covered by
/// the signature), found without parsing the batch, which matters because every copy a peer
/// receives is identified before duplicates are dropped. Any other batch: `b` + a 128-bit
/// digest of its keys; unparsable data: `x` + a digest of the bytes (the message is then
/// rejected by validation).
pub(crate) fn message_id(data: &[u8], source: Option<&[u8]>, seqno: Option<u64>) -> Vec<u8> {
    if data.starts_with(BATCH_PREFIX)
        && let (Some(source), Some(seqno)) = (source, seqno)
    {
        let mut id = Vec::with_capacity(source.len() + 9);
        id.push(b'p');
        id.extend_from_slice(source);
        id.extend_from_slice(&seqno.to_be_bytes());
        return id;
    }
    match serde_json::from_slice::<IdView>(data) {
        Ok(view) if view.events.len() == 1 => {
            let key = &view.events[0];
            let mut id = Vec::with_capacity(key.id.len() + 10);
            id.push(b'e');
            id.extend_from_slice(key.id.as_bytes());
            id.push(0);
            id.extend_from_slice(&key.version.to_be_bytes());
            id
        }
        Ok(view) => {
            let mut a = Fnv::new(FNV_OFFSET);
            let mut b = Fnv::new(FNV_OFFSET_2);
            for key in &view.events {
                for h in [&mut a, &mut b] {
                    h.write(key.id.as_bytes());
                    h.write(&[0]);
                    h.write(&key.version.to_be_bytes());
                }
            }
            let mut id = vec![b'b'];
            id.extend_from_slice(&a.finish().to_be_bytes());
            id.extend_from_slice(&b.finish().to_be_bytes());
            id
        }
        Err(_) => {
            let mut a = Fnv::new(FNV_OFFSET);
            let mut b = Fnv::new(FNV_OFFSET_2);
            a.write(data);
            b.write(data);
            let mut id = vec![b'x'];
            id.extend_from_slice(&a.finish().to_be_bytes());
            id.extend_from_slice(&b.finish().to_be_bytes());
            id
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_OFFSET_2: u64 = 0x6c62_272e_07bb_0142;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a, 64 bits: a stable hash (unlike `DefaultHasher`, fixed across Rust versions).
struct Fnv(u64);

impl Fnv {
    fn new(offset: u64) -> Self {
        Self(offset)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl std::io::Write for Fnv {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Fnv::write(self, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A digest of an event's content (`type`, `data`, `timestamp`; not `origin`). Two replicas
/// whose digests differ for the same `(id, version)` may hold a conflict; the catch-up fetches
/// the revision so that `Replica::ingest` decides (a false difference only costs a fetch).
pub(crate) fn content_hash(event: &Event) -> u64 {
    let mut h = Fnv::new(FNV_OFFSET);
    h.write(event.event_type.as_bytes());
    h.write(&[0]);
    h.write(&event.timestamp.to_be_bytes());
    // The JSON text of `data`, streamed into the hash. Serialising a `Value` cannot fail; a
    // short digest input would only cause a refetch.
    let _ = serde_json::to_writer(&mut h, &event.data);
    h.finish()
}

/// One entry of a `Keys` page: where a revision sits in the responder's log, and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KeyEntry {
    pub seq: u64,
    pub id: String,
    pub version: u64,
    pub hash: u64,
}

impl KeyEntry {
    pub(crate) fn key(&self) -> RevisionKey {
        RevisionKey {
            id: self.id.clone(),
            version: self.version,
        }
    }
}

/// Catch-up requests (CBOR over `/ksync/sync/1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum SyncRequest {
    /// "Which revisions sit in your log after `after`?" (at most `limit`, capped at [`MAX_PAGE`]).
    Keys {
        network: String,
        after: u64,
        limit: u32,
    },
    /// "Send me these revisions" (at most [`MAX_FETCH`]).
    Fetch {
        network: String,
        keys: Vec<RevisionKey>,
    },
}

/// Catch-up responses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum SyncResponse {
    /// A page of the responder's log. `log_id` names the log (a new one, e.g. a fresh in-memory
    /// store, restarts the requester's cursor at 0); `len` is its length. `entries` list the
    /// revisions the responder's filter lets out; `through` is the last sequence number the
    /// page covers (past the last entry's when events kept home follow it; `None` from peers
    /// that list every revision: the last entry's).
    Keys {
        log_id: u64,
        len: u64,
        entries: Vec<KeyEntry>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        through: Option<u64>,
    },
    /// The requested revisions the responder holds, in request order, up to
    /// [`RESPONSE_BUDGET`]; `too_large` lists those it will never send (larger than the
    /// budget or its own `max_event_bytes`, or kept home by its filter or outgoing
    /// middleware).
    Events {
        events: Vec<Event>,
        too_large: Vec<RevisionKey>,
    },
    /// The request was refused (other network, too many keys). `busy`: answering would take
    /// the responder over its budget for answers in flight (`max_catch_up_answer_bytes`);
    /// ask again later. Absent (false) from peers before it, and ignored by them.
    Refused {
        reason: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        busy: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc(e: &Event) -> Vec<u8> {
        serde_json::to_vec(e).expect("encode")
    }

    #[test]
    fn payload_round_trips() {
        let a = Event::new("a", "t", json!({"x": 1}), 5);
        let b = Event::new("b", "t", json!([1, 2]), 6).with_version(3);
        let data = encode_payload(&[enc(&a), enc(&b)]);
        assert_eq!(decode_payload(&data, 1024).expect("decodes"), vec![a, b]);
    }

    /// Gossip from an older build (its rules allowed data 128 levels deep) is taken: the
    /// event is stored there, and catch-up would bring it anyway. Past 126 levels an event's
    /// JSON nests deeper than serde_json reads (127): such gossip was refused as malformed,
    /// and the event came only by catch-up. Deeper than any build stored is refused.
    #[test]
    fn gossip_takes_data_as_deep_as_older_builds_stored() {
        let nested =
            |levels: usize| Event::new("deep", "t", ksync_testkit::edge_data::nested(levels), 1);
        for levels in [110, 126, ksync_core::MAX_RECEIVED_DATA_DEPTH] {
            let deep = nested(levels);
            let data = encode_payload(&[enc(&deep)]);
            assert_eq!(decode_payload(&data, 1 << 20).expect("decodes"), vec![deep]);
        }
        let deeper = encode_payload(&[enc(&nested(ksync_core::MAX_RECEIVED_DATA_DEPTH + 1))]);
        assert!(matches!(
            decode_payload(&deeper, 1 << 20),
            Err(Rejected::Invalid(_))
        ));
        let far_deeper = encode_payload(&[enc(&nested(200))]);
        assert!(matches!(
            decode_payload(&far_deeper, 1 << 20),
            Err(Rejected::Malformed(_))
        ));
    }

    #[test]
    fn bad_payloads_are_rejected() {
        assert!(matches!(
            decode_payload(b"garbage", 1024),
            Err(Rejected::Malformed(_))
        ));
        assert!(matches!(
            decode_payload(br#"{"v":1,"events":[]}"#, 1024),
            Err(Rejected::Empty)
        ));
        assert!(matches!(
            decode_payload(br#"{"v":9,"events":[]}"#, 1024),
            Err(Rejected::Version(9))
        ));
        let big = Event::new("a", "t", json!("x".repeat(2000)), 1);
        assert!(matches!(
            decode_payload(&encode_payload(&[enc(&big)]), 1024),
            Err(Rejected::TooLarge { .. })
        ));
        let zero = Event::new("a", "t", json!(1), 1).with_version(0);
        assert!(matches!(
            decode_payload(&encode_payload(&[enc(&zero)]), 1024),
            Err(Rejected::Invalid(_))
        ));
        assert!(matches!(
            decode_payload(br#"{"v":1,"events":[{"id":"a"}]}"#, 1024),
            Err(Rejected::Malformed(_))
        ));
        let one = String::from_utf8(enc(&Event::new("a", "t", json!(1), 1))).expect("utf-8");
        assert!(matches!(
            decode_payload(
                format!(r#"{{"v":1,"n":2,"events":[{one}]}}"#).as_bytes(),
                1024
            ),
            Err(Rejected::Count { said: 2, held: 1 })
        ));
        // A revision twice: with other content the message is refused, the same copy dropped.
        let a2 = String::from_utf8(enc(&Event::new("a", "t", json!(2), 1))).expect("utf-8");
        assert!(matches!(
            decode_payload(
                format!(r#"{{"v":1,"events":[{one},{a2}]}}"#).as_bytes(),
                1024
            ),
            Err(Rejected::Repeated { version: 1, .. })
        ));
        assert_eq!(
            decode_payload(
                format!(r#"{{"v":1,"n":2,"events":[{one},{one}]}}"#).as_bytes(),
                1024
            )
            .expect("decodes")
            .len(),
            1
        );
        // Both forms are accepted: a counted batch of one, an uncounted batch of two.
        assert!(
            decode_payload(
                format!(r#"{{"v":1,"n":1,"events":[{one}]}}"#).as_bytes(),
                1024
            )
            .is_ok()
        );
        assert!(
            decode_payload(
                format!(r#"{{"v":1,"events":[{one},{one}]}}"#).as_bytes(),
                1024
            )
            .is_ok()
        );
    }

    #[test]
    fn message_id_is_the_revision_key() {
        let a = Event::new("a", "t", json!(1), 5);
        let a_other_content = Event::new("a", "u", json!(2), 9).with_origin("x");
        let a2 = a.clone().with_version(2);
        let id = |e: &Event| message_id(&encode_payload(&[enc(e)]), Some(b"src"), Some(1));
        assert_eq!(id(&a), id(&a_other_content));
        assert_ne!(id(&a), id(&a2));
        // A counted batch is its publisher's and sequence number's, whatever it holds.
        let batch = |es: &[&Event], src: &[u8], seqno: u64| {
            let data = encode_payload(&es.iter().map(|e| enc(e)).collect::<Vec<_>>());
            assert!(data.starts_with(BATCH_PREFIX));
            message_id(&data, Some(src), Some(seqno))
        };
        assert_eq!(batch(&[&a, &a2], b"p", 7), batch(&[&a2, &a], b"p", 7));
        assert_ne!(batch(&[&a, &a2], b"p", 7), batch(&[&a, &a2], b"p", 8));
        assert_ne!(batch(&[&a, &a2], b"p", 7), batch(&[&a, &a2], b"q", 7));
        // A batch without the count (or without a source) is identified by its keys.
        let uncounted = |es: &[&Event]| {
            let body: Vec<String> = es
                .iter()
                .map(|e| String::from_utf8(enc(e)).expect("utf-8"))
                .collect();
            let data = format!("{{\"v\":1,\"events\":[{}]}}", body.join(","));
            message_id(data.as_bytes(), Some(b"p"), Some(1))
        };
        assert_eq!(uncounted(&[&a, &a2]), uncounted(&[&a_other_content, &a2]));
        assert_ne!(uncounted(&[&a, &a2]), uncounted(&[&a2, &a]));
        assert_eq!(
            message_id(b"junk", None, None),
            message_id(b"junk", None, None)
        );
        assert_ne!(
            message_id(b"junk", None, None),
            message_id(b"junk2", None, None)
        );
    }

    #[test]
    fn json_len_is_the_encoded_length() {
        let e = Event::new("a\"b", "t", json!({"k": ["é", 1.5, null]}), 5).with_origin("o");
        assert_eq!(e.json_len(), enc(&e).len());
    }

    #[test]
    fn content_hash_is_fnv_of_type_timestamp_and_data_json() {
        let e = Event::new("a", "t", json!({"k": [1, "x"]}), 5);
        let mut h = Fnv::new(FNV_OFFSET);
        h.write(b"t");
        h.write(&[0]);
        h.write(&5u64.to_be_bytes());
        h.write(&serde_json::to_vec(&e.data).expect("encode"));
        assert_eq!(content_hash(&e), h.finish());
    }

    #[test]
    fn content_hash_ignores_origin() {
        let a = Event::new("a", "t", json!({"k": [1, 2]}), 5);
        assert_eq!(
            content_hash(&a),
            content_hash(&a.clone().with_origin("elsewhere"))
        );
        assert_ne!(
            content_hash(&a),
            content_hash(&Event::new("a", "t", json!({"k": [1, 3]}), 5))
        );
    }
}
