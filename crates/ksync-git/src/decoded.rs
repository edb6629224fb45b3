//! How much memory a request body may take once decoded, known before it is decoded.
//!
//! A JSON body decodes into more memory than its text: `[0,0,0,...]` is 2 bytes of JSON a
//! number and a `serde_json::Value` (32 bytes) decoded, so a 16 MiB body (16 KB gzipped) can
//! become 256 MiB. The service reserves memory for a body before decoding it (see
//! `GitServerConfig::body_memory_bytes`), so it needs a bound that does not build the values.
//!
//! serde_json's own parser walks the body into a visitor that only adds up sizes (as
//! `serde::de::IgnoredAny` walks and keeps nothing): the same grammar, escapes and depth limit
//! as the decode it guards, and text it refuses is refused here first, before anything is
//! built. Why not a bounded decoder instead: the only unbounded part of a body is an event's
//! `data` (a `Value`); bounding its decode would mean deserialising `Event` by hand, beside
//! the derive in `ksync-core`.

use std::fmt;
use std::mem::size_of;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// An upper bound of what `json` takes decoded, in the measure of
/// [`ksync_core::Event::decoded_len`] (strings' bytes and a `Value` per JSON value; an object
/// member also a `String` for its key), whatever serde types it decodes into whose only
/// dynamic parts are strings, `Vec`s, `Value`s and `Event`s:
///
/// - every value counts `size_of::<Value>()`, a string also its decoded bytes;
/// - every object member also counts `size_of::<String>()` and its key's bytes.
///
/// An `Event` is an object of at least five members (so at least 280 bytes here), which
/// covers its `size_of::<Event>()` (120) and the `Vec<Event>` slot it occupies.
///
/// Errs, as decoding it would, when `json` is not JSON (or nests deeper than serde_json
/// decodes).
pub(crate) fn decoded_bound(json: &[u8]) -> Result<usize, serde_json::Error> {
    serde_json::from_slice::<Size>(json).map(|size| size.0)
}

/// A JSON value's decoded size (see [`decoded_bound`]); deserializing one keeps nothing else.
struct Size(usize);

/// An object key's decoded bytes.
struct KeyBytes(usize);

const NODE: usize = size_of::<Value>();

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl<'de> Deserialize<'de> for KeyBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct SizeVisitor;

impl<'de> Visitor<'de> for SizeVisitor {
    type Value = Size;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Size, E> {
        Ok(Size(NODE))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Size, E> {
        Ok(Size(NODE))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Size, E> {
        Ok(Size(NODE))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Size, E> {
        Ok(Size(NODE))
    }

    fn visit_str<E>(self, text: &str) -> Result<Size, E> {
        Ok(Size(NODE.saturating_add(text.len())))
    }

    fn visit_unit<E>(self) -> Result<Size, E> {
        Ok(Size(NODE))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Size, A::Error> {
        let mut total = NODE;
        while let Some(Size(item)) = items.next_element()? {
            total = total.saturating_add(item);
        }
        Ok(Size(total))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<Size, A::Error> {
        let mut total = NODE;
        while let Some(KeyBytes(key)) = members.next_key()? {
            let Size(value) = members.next_value()?;
            total = total
                .saturating_add(size_of::<String>())
                .saturating_add(key)
                .saturating_add(value);
        }
        Ok(Size(total))
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = KeyBytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<KeyBytes, E> {
        Ok(KeyBytes(key.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksync_core::Event;
    use serde_json::json;

    use crate::wire::PushRequest;

    fn push_of(events: &[Event]) -> Vec<u8> {
        serde_json::to_vec(&json!({"baseVersion": 0, "events": events})).expect("json")
    }

    fn measured(events: &[Event]) -> usize {
        events.iter().map(Event::decoded_len).sum()
    }

    /// The bound is at least what the events measure decoded, and not far above it.
    #[test]
    fn bounds_what_events_measure_decoded() {
        let typical = |i: u64| {
            Event::new(
                format!("evt-{i}"),
                "message",
                json!({"room": "general", "text": "hello world", "n": i}),
                1_700_000_000_000,
            )
        };
        let cases: Vec<Vec<Event>> = vec![
            vec![],
            (0..100).map(typical).collect(),
            vec![Event::new("a", "t", json!(vec![0; 10_000]), 1)],
            vec![Event::new("a", "t", json!(null), 1).with_origin("replica")],
            vec![Event::new(
                "q\"uote\\d",
                "ünï\ncode",
                json!({"k\"ey": ["x\\y", {"": [[], {}]}, 1.5, -3, true]}),
                1,
            )],
            vec![Event::new("deep", "t", json!([[[[[[[[[[1]]]]]]]]]]), 1)],
        ];
        for events in cases {
            let body = push_of(&events);
            let decoded: PushRequest = serde_json::from_slice(&body).expect("decodes");
            assert_eq!(decoded.events, events);
            let bound = decoded_bound(&body).expect("json");
            let measure = measured(&events);
            assert!(bound >= measure, "{bound} < {measure} for {events:?}");
            assert!(
                bound <= 2 * measure + 512,
                "{bound} is far above {measure} for {events:?}"
            );
        }
    }

    /// Small JSON that decodes large is counted by its values, not its bytes.
    #[test]
    fn numbers_count_as_values() {
        let mut body = br#"{"baseVersion":0,"events":[{"id":"a","type":"t","data":["#.to_vec();
        for i in 0..100_000 {
            if i > 0 {
                body.push(b',');
            }
            body.push(b'0');
        }
        body.extend_from_slice(br#"],"timestamp":1,"version":1}]}"#);
        let decoded: PushRequest = serde_json::from_slice(&body).expect("decodes");
        let measure = measured(&decoded.events);
        assert!(measure >= 100_000 * size_of::<Value>());
        let bound = decoded_bound(&body).expect("json");
        assert!(
            bound >= measure && bound < measure + 1024,
            "{bound} vs {measure}"
        );
        assert!(bound > 15 * body.len());
    }

    /// Text the decode would refuse is refused here too, before anything is built: cut
    /// strings, stray brackets, nesting past serde_json's limit.
    #[test]
    fn what_is_not_json_is_refused() {
        for text in [
            &b""[..],
            b"\"",
            b"\"abc\\",
            b"]]]}}}",
            b"{\"a\"",
            b"[1,,2:3]",
            b"\xff\xfe",
        ] {
            assert!(
                decoded_bound(text).is_err(),
                "{:?}",
                String::from_utf8_lossy(text)
            );
            assert!(serde_json::from_slice::<Value>(text).is_err());
        }
        let deep = vec![b'['; 1_000_000];
        assert!(decoded_bound(&deep).is_err());
    }

    /// Escapes count as the bytes they decode to.
    #[test]
    fn strings_count_their_decoded_bytes() {
        let bound = decoded_bound(br#"["\u00e9\n"]"#).expect("json");
        assert_eq!(bound, 2 * NODE + "é\n".len());
    }
}
