//! The event: the unit that kSync stores and moves.

use serde::{Deserialize, Serialize};

/// One revision of an application event.
///
/// The JSON shape is exactly the spec's: `{"id","type","data","timestamp","version"}`, plus an
/// optional `origin` naming the replica that made this revision. `(id, version)` identifies a
/// revision; a higher `version` of the same `id` supersedes a lower one in the materialised state.
///
/// ```
/// use ksync_core::Event;
/// let json = r#"{"id":"123","type":"user_created","data":{"name":"John"},"timestamp":1700000000000,"version":1}"#;
/// let event: Event = serde_json::from_str(json).unwrap();
/// assert_eq!(event.event_type, "user_created");
/// assert_eq!(serde_json::to_string(&event).unwrap(), json);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Application-chosen identifier of the logical record this event revises.
    pub id: String,
    /// Application-defined event type, e.g. `user_created`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Any JSON value.
    pub data: serde_json::Value,
    /// Milliseconds since the Unix epoch, as `Date.now()` gives it.
    pub timestamp: u64,
    /// Revision number of `id`, starting at 1.
    pub version: u64,
    /// The replica (client or peer id) that made this revision, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// The identity of one revision: `(id, version)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RevisionKey {
    /// The event id.
    pub id: String,
    /// The revision number.
    pub version: u64,
}

impl Event {
    /// A new event at version 1 with no origin.
    pub fn new(
        id: impl Into<String>,
        event_type: impl Into<String>,
        data: serde_json::Value,
        timestamp: u64,
    ) -> Self {
        Self {
            id: id.into(),
            event_type: event_type.into(),
            data,
            timestamp,
            version: 1,
            origin: None,
        }
    }

    /// Sets the version (builder style).
    #[must_use]
    pub fn with_version(mut self, version: u64) -> Self {
        self.version = version;
        self
    }

    /// Sets the origin (builder style).
    #[must_use]
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// The `(id, version)` that names this revision.
    pub fn key(&self) -> RevisionKey {
        RevisionKey {
            id: self.id.clone(),
            version: self.version,
        }
    }

    /// Whether two revisions carry the same content.
    ///
    /// Content is `type`, `data` and `timestamp`. `origin` is provenance, not content: two replicas
    /// that independently resolve a conflict the same way write the same revision, and it must
    /// deduplicate rather than conflict again.
    pub fn same_content(&self, other: &Event) -> bool {
        self.event_type == other.event_type
            && self.timestamp == other.timestamp
            && self.data == other.data
    }

    /// The length of its JSON encoding, without building it.
    pub fn json_len(&self) -> usize {
        /// Counts the bytes written to it.
        struct Counter(usize);
        impl std::io::Write for Counter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut counter = Counter(0);
        // Writing to a counter cannot fail, and an `Event` (strings, numbers, a `Value`)
        // always encodes.
        let _ = serde_json::to_writer(&mut counter, self);
        counter.0
    }

    /// About how many bytes the event takes in memory, decoded: its strings and every node of
    /// its `data`. For memory budgets that hold decoded events: the JSON length undercounts
    /// them, most for arrays of small numbers (`[1,2,3]` is 2 bytes of JSON a number and
    /// `size_of::<Value>()`, 32, decoded). Allocator overhead and spare capacity are left out.
    pub fn decoded_len(&self) -> usize {
        use serde_json::Value;
        let node = std::mem::size_of::<Value>();
        let mut total = std::mem::size_of::<Event>()
            + self.id.len()
            + self.event_type.len()
            + self.origin.as_ref().map_or(0, String::len);
        // An explicit stack: nesting is as deep as the caller's JSON allowed.
        let mut pending: Vec<&Value> = vec![&self.data];
        while let Some(value) = pending.pop() {
            match value {
                Value::String(text) => total += text.len(),
                Value::Array(items) => {
                    total += items.len() * node;
                    pending.extend(items);
                }
                Value::Object(entries) => {
                    for (key, item) in entries {
                        // The key's `String` and its text, and the value's node.
                        total += std::mem::size_of::<String>() + key.len() + node;
                        pending.push(item);
                    }
                }
                Value::Null | Value::Bool(_) | Value::Number(_) => {}
            }
        }
        total
    }

    /// [`validate_received`](Self::validate_received) with the default limits, for an event
    /// received from a remote: `Err` says which event broke which rule, for a transport's
    /// protocol error (the id cut to 64 characters: an over-long id is part of the fault). No
    /// storage may hold such an event, so a client skips it and reports this.
    pub fn check_received(&self) -> Result<(), String> {
        self.validate_received(&EventLimits::default())
            .map_err(|why| {
                format!(
                    "received event {:?} version {} is not a valid event ({why}): skipped",
                    self.id.chars().take(64).collect::<String>(),
                    self.version
                )
            })
    }

    /// Checks the invariants that every new event must satisfy: the check of a publish, a
    /// push a server receives, a local `update`. `data` nests at most [`MAX_DATA_DEPTH`]
    /// levels.
    pub fn validate(&self, limits: &EventLimits) -> Result<(), InvalidEvent> {
        self.validate_to_depth(limits, MAX_DATA_DEPTH)
    }

    /// [`validate`](Self::validate) for an event that was already stored and sequenced
    /// elsewhere (a relay's `events`, a Git pull, a P2P catch-up or gossip): `data` may nest
    /// up to [`MAX_RECEIVED_DATA_DEPTH`] levels, what older builds accepted and stored.
    pub fn validate_received(&self, limits: &EventLimits) -> Result<(), InvalidEvent> {
        self.validate_to_depth(limits, MAX_RECEIVED_DATA_DEPTH)
    }

    fn validate_to_depth(
        &self,
        limits: &EventLimits,
        max_depth: usize,
    ) -> Result<(), InvalidEvent> {
        if self.id.is_empty() {
            return Err(InvalidEvent::EmptyId);
        }
        if self.id.len() > limits.max_id_len {
            return Err(InvalidEvent::IdTooLong {
                len: self.id.len(),
                max: limits.max_id_len,
            });
        }
        if self.event_type.is_empty() {
            return Err(InvalidEvent::EmptyType);
        }
        if self.event_type.len() > limits.max_type_len {
            return Err(InvalidEvent::TypeTooLong {
                len: self.event_type.len(),
                max: limits.max_type_len,
            });
        }
        if self.version == 0 {
            return Err(InvalidEvent::ZeroVersion);
        }
        if self.version > MAX_EVENT_INTEGER {
            return Err(InvalidEvent::VersionTooLarge {
                max: MAX_EVENT_INTEGER,
            });
        }
        if self.timestamp > MAX_EVENT_INTEGER {
            return Err(InvalidEvent::TimestampTooLarge {
                max: MAX_EVENT_INTEGER,
            });
        }
        let Some(data_bound) = data_json_bound(&self.data, max_depth) else {
            return Err(InvalidEvent::DataTooDeep { max: max_depth });
        };
        // The bound costs nothing beyond the depth walk; only an event it cannot clear (over
        // about 1.3 MiB of strings, or 330,000 numbers) is counted exactly.
        let bound = data_bound
            .saturating_add(string_json_bound(&self.id))
            .saturating_add(string_json_bound(&self.event_type))
            .saturating_add(self.origin.as_deref().map_or(0, string_json_bound))
            .saturating_add(EVENT_JSON_FIXED_BOUND);
        if bound > MAX_EVENT_JSON_BYTES {
            let len = self.json_len();
            if len > MAX_EVENT_JSON_BYTES {
                return Err(InvalidEvent::TooLarge {
                    len,
                    max: MAX_EVENT_JSON_BYTES,
                });
            }
        }
        Ok(())
    }
}

/// Largest event [`Event::validate`] accepts, in bytes of its compact JSON
/// ([`Event::json_len`]): 8 MiB.
///
/// Every kSync transport sends events encoded this way (catch-up pages, Git pulls, P2P
/// answers), and storages size their records from it, so an event that one place accepts,
/// every other can store and send on. The JSON a publisher sent can be shorter than this
/// encoding (`1e15` comes back as `1000000000000000.0`), so a relay's message limit alone does
/// not bound it.
pub const MAX_EVENT_JSON_BYTES: usize = 8 << 20;

/// Largest `version` and `timestamp` [`Event::validate`] accepts: 2^53 - 1, the largest
/// integer a JavaScript number holds exactly. Past it ksync.js (and any JSON reader that
/// takes numbers as doubles) cannot read the event, so replicas in browsers would skip what
/// the others store, and never converge. (As a timestamp it is the year 287,396.)
pub const MAX_EVENT_INTEGER: u64 = (1 << 53) - 1;

/// Most levels of arrays and objects nested in an event's `data` that [`Event::validate`]
/// accepts (`[[1]]` is two).
///
/// Every kSync reader is serde_json, which reads at most 127 levels of a whole message, and
/// events travel inside messages: up to 5 levels around the event itself (a Git push answer's
/// `rejected[].conflict.ours`; a relay `events` frame or an ack's `held` is 4). 128 let an
/// event valid where it was made be refused by the relay, or stored there and then break
/// every Rust subscriber's `events` frame. 100 leaves room for what carries it (see
/// [`MAX_WRAPPING_DEPTH`]). Storages accept at least this much (the file storage's encoding
/// reads 128, what it held before).
pub const MAX_DATA_DEPTH: usize = 100;

/// Most levels of arrays and objects nested in the `data` of a received event, one already
/// stored and sequenced elsewhere, that [`Event::validate_received`] accepts: 128, what
/// [`Event::validate`] accepted before [`MAX_DATA_DEPTH`] became 100.
///
/// Older builds stored such events and older replicas keep them: a reader that refused them
/// would skip what the others hold, and replicas would diverge after an upgrade. The
/// messages that carry one nest past the 127 levels serde_json reads, so every reader of what
/// a remote sends reads through [`received_json`](crate::received_json) (P2P catch-up's CBOR
/// with a deeper budget than its library's). No new event is that deep. New events stay at
/// [`MAX_DATA_DEPTH`].
pub const MAX_RECEIVED_DATA_DEPTH: usize = 128;

const _: () = assert!(MAX_RECEIVED_DATA_DEPTH >= MAX_DATA_DEPTH);

/// Most levels of arrays and objects any kSync message puts around one event (the event's
/// own object included): serde_json reads `MAX_DATA_DEPTH + MAX_WRAPPING_DEPTH` levels and
/// more, so every valid event can be read in every message that carries it.
pub const MAX_WRAPPING_DEPTH: usize = 6;

// serde_json's limit: 127 levels of one text.
const _: () = assert!(MAX_DATA_DEPTH + MAX_WRAPPING_DEPTH <= 127);

/// Longest compact JSON of one number: `-2.2250738585072014e-308` (an `f64`; `u64` and `i64`
/// take at most 20).
const NUMBER_JSON_BOUND: usize = 24;

/// The compact JSON of an event apart from its strings and `data`: the field names, braces,
/// quotes and separators, and two `u64`s.
const EVENT_JSON_FIXED_BOUND: usize = 128;

/// At least the length of `text` as a JSON string: quotes, and every byte escaped at its
/// longest (`\u001f`).
fn string_json_bound(text: &str) -> usize {
    text.len().saturating_mul(6).saturating_add(2)
}

/// `None` when `data` nests arrays and objects more than `max_depth` levels deep; otherwise an
/// upper bound of its compact JSON length.
///
/// Recursive, without allocating (this runs for every published event): the recursion stops
/// `max_depth` levels down, however deep `data` goes.
fn data_json_bound(data: &serde_json::Value, max_depth: usize) -> Option<usize> {
    use serde_json::Value;
    match data {
        Value::Null | Value::Bool(_) => Some("false".len()),
        Value::Number(_) => Some(NUMBER_JSON_BOUND),
        Value::String(text) => Some(string_json_bound(text)),
        Value::Array(items) => {
            let depth = max_depth.checked_sub(1)?;
            // Brackets, and a comma after each item (one too many: a bound).
            items.iter().try_fold(2 + items.len(), |sum, item| {
                Some(sum.saturating_add(data_json_bound(item, depth)?))
            })
        }
        Value::Object(entries) => {
            let depth = max_depth.checked_sub(1)?;
            // Braces, and a colon and a comma for each entry.
            entries
                .iter()
                .try_fold(2 + 2 * entries.len(), |sum, (key, item)| {
                    Some(
                        sum.saturating_add(string_json_bound(key))
                            .saturating_add(data_json_bound(item, depth)?),
                    )
                })
        }
    }
}

/// Size limits applied by [`Event::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    /// Longest accepted `id`, in bytes. Default 256.
    pub max_id_len: usize,
    /// Longest accepted `type`, in bytes. Default 256.
    pub max_type_len: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self {
            max_id_len: 256,
            max_type_len: 256,
        }
    }
}

/// Why an event was refused by [`Event::validate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidEvent {
    /// `id` is the empty string.
    #[error("event id is empty")]
    EmptyId,
    /// `id` is longer than allowed.
    #[error("event id is {len} bytes, the limit is {max}")]
    IdTooLong {
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// `type` is the empty string.
    #[error("event type is empty")]
    EmptyType,
    /// `type` is longer than allowed.
    #[error("event type is {len} bytes, the limit is {max}")]
    TypeTooLong {
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Versions start at 1.
    #[error("event version must be at least 1")]
    ZeroVersion,
    /// `version` is past [`MAX_EVENT_INTEGER`].
    #[error("event version must be at most {max} (2^53 - 1)")]
    VersionTooLarge {
        /// Limit.
        max: u64,
    },
    /// `timestamp` is past [`MAX_EVENT_INTEGER`].
    #[error("event timestamp must be at most {max} (2^53 - 1)")]
    TimestampTooLarge {
        /// Limit.
        max: u64,
    },
    /// `data` nests arrays and objects deeper than [`MAX_DATA_DEPTH`].
    #[error("event data nests arrays and objects more than {max} levels deep")]
    DataTooDeep {
        /// Limit.
        max: usize,
    },
    /// Its compact JSON is longer than [`MAX_EVENT_JSON_BYTES`].
    #[error("event is {len} bytes as JSON, the limit is {max}")]
    TooLarge {
        /// Its length ([`Event::json_len`]).
        len: usize,
        /// Limit.
        max: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decoded_len_counts_every_node_and_string() {
        let node = std::mem::size_of::<serde_json::Value>();
        let base = std::mem::size_of::<Event>() + "e".len() + "t".len();
        let event = |data| Event::new("e", "t", data, 1);
        assert_eq!(event(json!(null)).decoded_len(), base);
        assert_eq!(event(json!("abcd")).decoded_len(), base + 4);
        assert_eq!(event(json!([1, 2, 3])).decoded_len(), base + 3 * node);
        let keyed = std::mem::size_of::<String>() + node;
        assert_eq!(
            event(json!({"ab": [true], "c": {"d": "xyz"}})).decoded_len(),
            base + (keyed + 2 + node) + (keyed + 1) + (keyed + 1 + 3)
        );
        // What the relay's budgets are about: numbers cost far more decoded than as JSON.
        let numbers: Vec<u8> = vec![0; 10_000];
        let many = event(json!(numbers));
        assert!(
            many.decoded_len() > 10 * many.json_len(),
            "{}",
            many.decoded_len()
        );
        let mut deep = json!(1);
        for _ in 0..1_000 {
            deep = json!([deep]);
        }
        assert_eq!(event(deep).decoded_len(), base + 1_000 * node);
    }

    #[test]
    fn floats_read_back_bit_for_bit() {
        // Every kSync reader is serde_json: its default parser (without the workspace's
        // `float_roundtrip`) reads these one unit in the last place off.
        for float in [
            0.9941414234139935_f64,
            408.72700000000003,
            6.162599865641032e196,
        ] {
            let event = Event::new("e", "t", json!(float), 1);
            let text = serde_json::to_string(&event).expect("encodes");
            let back: Event = serde_json::from_str(&text).expect("decodes");
            let read = back.data.as_f64().expect("a float");
            assert_eq!(read.to_bits(), float.to_bits(), "{text}");
        }
    }

    #[test]
    fn data_may_nest_max_data_depth_levels_and_no_more() {
        let nested = |levels: usize, innermost: serde_json::Value| {
            let mut data = innermost;
            for level in 0..levels {
                data = if level % 2 == 0 {
                    json!([1, data, "x"])
                } else {
                    json!({"a": data, "b": null})
                };
            }
            Event::new("e", "t", data, 1)
        };
        let limits = EventLimits::default();
        assert_eq!(nested(MAX_DATA_DEPTH, json!(7)).validate(&limits), Ok(()));
        assert_eq!(
            nested(MAX_DATA_DEPTH - 1, json!([])).validate(&limits),
            Ok(())
        );
        let too_deep = InvalidEvent::DataTooDeep {
            max: MAX_DATA_DEPTH,
        };
        assert_eq!(
            nested(MAX_DATA_DEPTH, json!({})).validate(&limits),
            Err(too_deep.clone())
        );
        assert_eq!(nested(1_000, json!(1)).validate(&limits), Err(too_deep));
        // A valid event reads back inside as many levels as any message puts around it.
        let deepest = nested(MAX_DATA_DEPTH, json!(7));
        let mut message = serde_json::to_value(&deepest).expect("encodes");
        for _ in 1..MAX_WRAPPING_DEPTH {
            message = json!([message]);
        }
        let text = serde_json::to_string(&message).expect("encodes");
        let read: serde_json::Value = serde_json::from_str(&text).expect("reads back");
        assert_eq!(read, message);
    }

    #[test]
    fn received_events_may_nest_as_deep_as_older_builds_stored() {
        let nested = |levels: usize| {
            let mut data = json!(1);
            for _ in 0..levels {
                data = json!([data]);
            }
            Event::new("e", "t", data, 1)
        };
        let limits = EventLimits::default();
        let old = nested(MAX_RECEIVED_DATA_DEPTH);
        assert_eq!(old.validate_received(&limits), Ok(()));
        assert_eq!(old.check_received(), Ok(()));
        // A new event as deep is refused.
        assert_eq!(
            old.validate(&limits),
            Err(InvalidEvent::DataTooDeep {
                max: MAX_DATA_DEPTH
            })
        );
        assert_eq!(
            nested(MAX_RECEIVED_DATA_DEPTH + 1).validate_received(&limits),
            Err(InvalidEvent::DataTooDeep {
                max: MAX_RECEIVED_DATA_DEPTH
            })
        );
    }

    #[test]
    fn events_up_to_8_mib_of_json_are_valid_and_no_larger() {
        let limits = EventLimits::default();
        // A string filled to the limit exactly, then one byte over.
        let base = Event::new("e", "t", json!(""), 1).json_len();
        let sized = |len: usize| Event::new("e", "t", json!("x".repeat(len - base)), 1);
        let at_limit = sized(MAX_EVENT_JSON_BYTES);
        assert_eq!(at_limit.json_len(), MAX_EVENT_JSON_BYTES);
        assert_eq!(at_limit.validate(&limits), Ok(()));
        assert_eq!(
            sized(MAX_EVENT_JSON_BYTES + 1).validate(&limits),
            Err(InvalidEvent::TooLarge {
                len: MAX_EVENT_JSON_BYTES + 1,
                max: MAX_EVENT_JSON_BYTES,
            })
        );
        // Counted as kSync sends it on, not as a publisher wrote it: `1e15,` is 5 bytes of the
        // text below and 19 of the event's JSON.
        let count = MAX_EVENT_JSON_BYTES / 16;
        let text = format!("[{}1e15]", "1e15,".repeat(count - 1));
        assert!(text.len() < MAX_EVENT_JSON_BYTES / 2);
        let data: serde_json::Value = serde_json::from_str(&text).expect("numbers parse");
        let event = Event::new("e", "t", data, 1);
        let len = event.json_len();
        assert!(len > MAX_EVENT_JSON_BYTES);
        assert_eq!(
            event.validate(&limits),
            Err(InvalidEvent::TooLarge {
                len,
                max: MAX_EVENT_JSON_BYTES,
            })
        );
        // Keys, ids and types count too.
        let mut keyed = serde_json::Map::new();
        keyed.insert("k".repeat(MAX_EVENT_JSON_BYTES), json!(null));
        assert!(matches!(
            Event::new("e", "t", serde_json::Value::Object(keyed), 1).validate(&limits),
            Err(InvalidEvent::TooLarge { .. })
        ));
        let long_ids = EventLimits {
            max_id_len: usize::MAX,
            max_type_len: usize::MAX,
        };
        assert!(matches!(
            Event::new("i".repeat(MAX_EVENT_JSON_BYTES), "t", json!(1), 1).validate(&long_ids),
            Err(InvalidEvent::TooLarge { .. })
        ));
    }

    #[test]
    fn the_size_bound_is_never_below_the_json_length() {
        let samples = [
            json!(null),
            json!(true),
            json!(-9_223_372_036_854_775_808_i64),
            json!(u64::MAX),
            json!(-2.2250738585072014e-308),
            json!("\u{1f}\"\\é"),
            json!([[], {}, [1, [2.5, "a"]], {"\u{0}": {"b": [null, false]}}]),
        ];
        for data in samples {
            let json = serde_json::to_string(&data).expect("encodes").len();
            let bound = data_json_bound(&data, MAX_DATA_DEPTH).expect("shallow");
            assert!(bound >= json, "{data}: bound {bound} < {json}");
            let event = Event::new("\u{1}id", "é", data, u64::MAX)
                .with_version(u64::MAX)
                .with_origin("\"");
            let event_bound = data_json_bound(&event.data, MAX_DATA_DEPTH).expect("shallow")
                + string_json_bound(&event.id)
                + string_json_bound(&event.event_type)
                + event.origin.as_deref().map_or(0, string_json_bound)
                + EVENT_JSON_FIXED_BOUND;
            assert!(event_bound >= event.json_len());
        }
    }

    #[test]
    fn version_and_timestamp_stay_within_what_javascript_reads_exactly() {
        let limits = EventLimits::default();
        let mut event = Event::new("x", "t", json!(1), 1);
        event.timestamp = MAX_EVENT_INTEGER;
        event.version = MAX_EVENT_INTEGER;
        assert_eq!(event.validate(&limits), Ok(()));
        event.timestamp = MAX_EVENT_INTEGER + 1;
        assert_eq!(
            event.validate(&limits),
            Err(InvalidEvent::TimestampTooLarge {
                max: MAX_EVENT_INTEGER
            })
        );
        event.timestamp = u64::MAX;
        event.version = u64::MAX;
        assert_eq!(
            event.validate(&limits),
            Err(InvalidEvent::VersionTooLarge {
                max: MAX_EVENT_INTEGER
            })
        );
        // The limit is JavaScript's Number.MAX_SAFE_INTEGER.
        assert_eq!(MAX_EVENT_INTEGER, 9_007_199_254_740_991);
    }

    #[test]
    fn spec_literal_round_trips() {
        // The spec's send() example, with Date.now() replaced by a literal.
        let literal = r#"{"id":"123","type":"user_created","data":{"name":"John"},"timestamp":1732615200000,"version":1}"#;
        let event: Event = serde_json::from_str(literal).expect("spec JSON parses");
        assert_eq!(event.id, "123");
        assert_eq!(event.event_type, "user_created");
        assert_eq!(event.data, json!({"name": "John"}));
        assert_eq!(event.timestamp, 1_732_615_200_000);
        assert_eq!(event.version, 1);
        assert_eq!(event.origin, None);
        assert_eq!(serde_json::to_string(&event).expect("serialises"), literal);
    }

    #[test]
    fn origin_round_trips_and_is_optional() {
        let literal = r#"{"id":"a","type":"t","data":[1,2,null],"timestamp":5,"version":3,"origin":"replica-1"}"#;
        let event: Event = serde_json::from_str(literal).expect("parses");
        assert_eq!(event.origin.as_deref(), Some("replica-1"));
        assert_eq!(serde_json::to_string(&event).expect("serialises"), literal);
    }

    #[test]
    fn any_json_value_is_data() {
        for data in [json!(null), json!(1.5), json!("s"), json!([1, {"a": true}])] {
            let event = Event::new("x", "t", data.clone(), 1);
            let back: Event =
                serde_json::from_str(&serde_json::to_string(&event).expect("ser")).expect("de");
            assert_eq!(back.data, data);
        }
    }

    #[test]
    fn missing_or_unknown_fields_are_errors() {
        assert!(
            serde_json::from_str::<Event>(r#"{"id":"1","type":"t","data":1,"timestamp":1}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<Event>(
                r#"{"id":"1","type":"t","data":1,"timestamp":1,"version":1,"extra":2}"#
            )
            .is_err()
        );
        assert!(
            serde_json::from_str::<Event>(
                r#"{"id":"1","type":"t","data":1,"timestamp":-1,"version":1}"#
            )
            .is_err()
        );
    }

    #[test]
    fn content_ignores_origin() {
        let a = Event::new("x", "t", json!(1), 7).with_origin("a");
        let b = Event::new("x", "t", json!(1), 7).with_origin("b");
        assert!(a.same_content(&b));
        assert!(!a.same_content(&Event::new("x", "t", json!(2), 7)));
    }

    #[test]
    fn validation() {
        let limits = EventLimits::default();
        assert!(Event::new("x", "t", json!(1), 1).validate(&limits).is_ok());
        assert_eq!(
            Event::new("", "t", json!(1), 1).validate(&limits),
            Err(InvalidEvent::EmptyId)
        );
        assert_eq!(
            Event::new("x", "t", json!(1), 1)
                .with_version(0)
                .validate(&limits),
            Err(InvalidEvent::ZeroVersion)
        );
        assert!(matches!(
            Event::new("x".repeat(300), "t", json!(1), 1).validate(&limits),
            Err(InvalidEvent::IdTooLong { len: 300, .. })
        ));
    }
}
