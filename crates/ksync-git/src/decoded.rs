//! How much memory a request body may take once decoded, known before it is decoded.
//!
//! A JSON body decodes into more memory than its text: `[0,0,0,...]` is 2 bytes of JSON a
//! number and a `serde_json::Value` (32 bytes) decoded, so a 16 MiB body (16 KB gzipped) can
//! become 256 MiB. The service reserves memory for a body before decoding it (see
//! `GitServerConfig::body_memory_bytes`), so it needs a bound that does not build the values.
//!
//! Why a scan and not a bounded decoder: the only unbounded part of a body is an event's
//! `data` (a `Value`); bounding its decode would mean deserialising `Event` by hand, beside
//! the derive in `ksync-core`, and keeping the two in step. One pass over the bytes, with no
//! allocation past a small stack, costs little next to the decode it guards.

use std::mem::size_of;

use serde_json::Value;

/// Deepest nesting serde_json decodes (its recursion limit): it fails at the next level,
/// having built no more than what the scan counted up to there, so the scan stops there too.
const MAX_DEPTH: usize = 128;

/// An upper bound of what `json` takes decoded, in the measure of
/// [`ksync_core::Event::decoded_len`] (strings' bytes and a `Value` per JSON value; an object
/// member also a `String` for its key), whatever serde types it decodes into whose only
/// dynamic parts are strings, `Vec`s, `Value`s and `Event`s:
///
/// - every value in an array (and the top-level one) counts `size_of::<Value>()`;
/// - every object member counts `size_of::<String>() + size_of::<Value>()` and its key's bytes;
/// - every string counts its bytes as written (escapes only shrink when decoded).
///
/// An `Event` is an object of at least five members (so at least 280 bytes here), which
/// covers its `size_of::<Event>()` (120) and the `Vec<Event>` slot it occupies.
///
/// Text that is not JSON gets some number; decoding it then fails, having built no more than
/// the values before the error, which the scan counted.
pub(crate) fn decoded_bound(json: &[u8]) -> usize {
    const NODE: usize = size_of::<Value>();
    const MEMBER: usize = size_of::<String>() + NODE;
    /// What the next token is, where it matters.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Next {
        /// A value (its node is counted here, except in an object: counted with the key).
        Value,
        /// An object member's key.
        Key,
        /// A separator or a closing bracket (or the rest of a number or a literal).
        Other,
    }
    // `true` for an object, `false` for an array.
    let mut stack: Vec<bool> = Vec::with_capacity(16);
    let mut next = Next::Value;
    let mut total: usize = 0;
    let mut at = 0;
    while let Some(&byte) = json.get(at) {
        at += 1;
        // A value's node: in an array (or at the top) here, in an object with its key.
        let node = |stack: &[bool]| if stack.last() == Some(&true) { 0 } else { NODE };
        match byte {
            b'"' => {
                let start = at;
                while let Some(&b) = json.get(at) {
                    match b {
                        b'"' => break,
                        b'\\' => at += 2,
                        _ => at += 1,
                    }
                }
                let len = at.min(json.len()) - start;
                at += 1;
                total = total.saturating_add(len);
                match next {
                    Next::Key => total = total.saturating_add(MEMBER),
                    Next::Value => total = total.saturating_add(node(&stack)),
                    Next::Other => {}
                }
                next = Next::Other;
            }
            b'[' | b'{' => {
                if next == Next::Value {
                    total = total.saturating_add(node(&stack));
                }
                if stack.len() == MAX_DEPTH {
                    break;
                }
                let object = byte == b'{';
                stack.push(object);
                next = if object { Next::Key } else { Next::Value };
            }
            b']' | b'}' => {
                stack.pop();
                next = Next::Other;
            }
            b',' => {
                next = if stack.last() == Some(&true) {
                    Next::Key
                } else {
                    Next::Value
                };
            }
            b':' => next = Next::Value,
            b' ' | b'\t' | b'\n' | b'\r' => {}
            // The first byte of a number or a literal (`true`, `false`, `null`).
            _ => {
                if next == Next::Value {
                    total = total.saturating_add(node(&stack));
                }
                next = Next::Other;
            }
        }
    }
    total
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
            let bound = decoded_bound(&body);
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
        let bound = decoded_bound(&body);
        assert!(
            bound >= measure && bound < measure + 1024,
            "{bound} vs {measure}"
        );
        assert!(bound > 15 * body.len());
    }

    /// Malformed text gets a number without panicking: cut strings, stray brackets, nesting
    /// past serde_json's limit (the scan stops where the decode would).
    #[test]
    fn any_bytes_get_a_number() {
        for text in [
            &b""[..],
            b"\"",
            b"\"abc\\",
            b"]]]}}}",
            b"{\"a\"",
            b"[1,,2:3]",
            b"\xff\xfe",
        ] {
            let _ = decoded_bound(text);
        }
        let deep = vec![b'['; 1_000_000];
        assert!(decoded_bound(&deep) <= (MAX_DEPTH + 1) * size_of::<Value>());
    }
}
