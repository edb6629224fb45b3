//! Reading a message that carries events older builds stored, whatever wraps them.
//!
//! serde_json reads at most 127 levels of arrays and objects in one text. New events' data
//! nests at most [`MAX_DATA_DEPTH`](crate::MAX_DATA_DEPTH), so every message that carries
//! one stays under that; but events older builds stored nest up to
//! [`MAX_RECEIVED_DATA_DEPTH`], and a message putting a few levels around one (a relay's
//! `events`, `snapshot` or `ack`, a Git pull page or push answer, a P2P gossip event) can
//! pass it. Each wire format's reader of what a remote sends reads through
//! [`from_slice`] / [`from_str`], so no such event fails every message that carries it.

use serde::de::DeserializeOwned;

use crate::{MAX_RECEIVED_DATA_DEPTH, MAX_WRAPPING_DEPTH};

/// Most levels of a message [`from_slice`] reads: the deepest data a received event may hold
/// plus the most levels any kSync message puts around an event.
pub const MAX_RECEIVED_MESSAGE_DEPTH: usize = MAX_RECEIVED_DATA_DEPTH + MAX_WRAPPING_DEPTH;

/// The most levels serde_json reads of one text.
const SERDE_JSON_DEPTH: usize = 127;

/// Decodes `json` as serde_json does, and a text nesting past serde_json's 127 levels but at
/// most [`MAX_RECEIVED_MESSAGE_DEPTH`] too. Deeper, or not JSON of `T`'s shape: serde_json's
/// error (of the read without its limit, for text it read that way: the error past the
/// levels it could not read before). The deep read goes without serde_json's depth limit only once a scan of the text
/// has bounded its depth, so the recursion stays within a few levels of what serde_json
/// allows (no stack it would not take). Whether each event it holds is valid (its data at
/// most [`MAX_RECEIVED_DATA_DEPTH`] deep) is the caller's check, as for any received event.
pub fn from_slice<T: DeserializeOwned>(json: &[u8]) -> serde_json::Result<T> {
    match serde_json::from_slice(json) {
        Err(_) if too_deep_for_serde_json(json) => {
            deep_read(serde_json::Deserializer::from_slice(json))
        }
        result => result,
    }
}

/// [`from_slice`] of a `str`.
pub fn from_str<T: DeserializeOwned>(json: &str) -> serde_json::Result<T> {
    match serde_json::from_str(json) {
        Err(_) if too_deep_for_serde_json(json.as_bytes()) => {
            deep_read(serde_json::Deserializer::from_str(json))
        }
        result => result,
    }
}

/// Whether `json` nests past what serde_json reads, and not past
/// [`MAX_RECEIVED_MESSAGE_DEPTH`].
fn too_deep_for_serde_json(json: &[u8]) -> bool {
    (SERDE_JSON_DEPTH + 1..=MAX_RECEIVED_MESSAGE_DEPTH).contains(&nesting(json))
}

fn deep_read<'de, R: serde_json::de::Read<'de>, T: DeserializeOwned>(
    mut deserializer: serde_json::Deserializer<R>,
) -> serde_json::Result<T> {
    deserializer.disable_recursion_limit();
    let value = T::deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// The most levels of arrays and objects open at once in `json`, brackets inside strings
/// aside; for text serde_json reads up to some point, at least the levels it opens up to
/// there (text past a point where it fails is never read).
fn nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Event;
    use serde_json::{Value, json};

    fn nested(levels: usize) -> Value {
        let mut data = json!("innermost");
        for level in 0..levels {
            data = if level % 2 == 0 {
                json!([data])
            } else {
                json!({ "k": data })
            };
        }
        data
    }

    /// A message putting `wrapping` levels (the event's object included) around an event
    /// whose data is `levels` deep, as text and as the value it holds.
    fn message(levels: usize, wrapping: usize) -> (String, Value) {
        let event = Event::new("e", "t", nested(levels), 1);
        let mut text = serde_json::to_string(&event).expect("encodes");
        let mut value = serde_json::to_value(&event).expect("encodes");
        for _ in 1..wrapping {
            text = format!("[{text}]");
            value = json!([value]);
        }
        (text, value)
    }

    #[test]
    fn nesting_counts_levels_outside_strings() {
        assert_eq!(nesting(b"1"), 0);
        assert_eq!(nesting(b"[[1],{\"a\":[]}]"), 3);
        assert_eq!(nesting(br#"{"a":"[[[{\"[[["}"#), 1);
        assert_eq!(nesting(br#"["\\",[["\\\"]"]]]"#), 3);
        assert_eq!(nesting(message(10, 1).0.as_bytes()), 11);
    }

    /// Everything serde_json reads is read the same; a message nesting past it up to
    /// `MAX_RECEIVED_MESSAGE_DEPTH` is read too (the deepest received event in the most
    /// wrapping any message has), and deeper or malformed text keeps serde_json's error.
    #[test]
    fn messages_nesting_up_to_the_received_limit_are_read() {
        let (deepest, value) = message(MAX_RECEIVED_DATA_DEPTH, MAX_WRAPPING_DEPTH);
        assert_eq!(nesting(deepest.as_bytes()), MAX_RECEIVED_MESSAGE_DEPTH);
        assert!(serde_json::from_str::<Value>(&deepest).is_err());
        assert_eq!(from_str::<Value>(&deepest).expect("reads"), value);
        assert_eq!(
            from_slice::<Value>(deepest.as_bytes()).expect("reads"),
            value
        );
        let (event, _) = message(MAX_RECEIVED_DATA_DEPTH, 1);
        let event: Event = from_str(&event).expect("reads");
        assert_eq!(event.data, nested(MAX_RECEIVED_DATA_DEPTH));
        let (deeper, _) = message(MAX_RECEIVED_DATA_DEPTH + 1, MAX_WRAPPING_DEPTH);
        let error = from_str::<Value>(&deeper).expect_err("too deep");
        assert!(error.to_string().contains("recursion limit"), "{error}");
        let cut = &deepest[..deepest.len() - 1];
        assert!(from_str::<Value>(cut).is_err());
        assert!(from_str::<Value>(&format!("{deepest} x")).is_err());
        assert_eq!(from_str::<Value>("[1]").expect("reads"), json!([1]));
    }
}
