//! The JSON examples of docs/PROTOCOL.md's WebSocket section are what the relay and the
//! client speak: each decodes as the message its `type` names, and every field it shows
//! survives decoding (a field the types do not know would be skipped silently). And every
//! ```json block of the document is JSON (a reader may feed it to a parser as it is).

use ksync_ws::protocol::{CLIENT_TYPES, ClientMessage, SERVER_TYPES, ServerMessage, decode};
use serde_json::Value;

const DOC: &str = include_str!("../../../../docs/PROTOCOL.md");

/// Every JSON value of the ```json blocks of `text` (a block may hold several).
fn json_blocks(text: &str) -> Vec<Value> {
    let mut rest = text;
    let mut found = Vec::new();
    while let Some(open) = rest.find("```json\n") {
        let block = &rest[open + 8..];
        let close = block.find("```").expect("a closed code block");
        for value in serde_json::Deserializer::from_str(&block[..close]).into_iter::<Value>() {
            found.push(value.unwrap_or_else(|e| panic!("an example is not JSON: {e}")));
        }
        rest = &block[close + 3..];
    }
    found
}

/// The examples of the WebSocket section.
fn examples() -> Vec<Value> {
    let start = DOC.find("## WebSocket").expect("the WebSocket section");
    let end = start + DOC[start..].find("\n## ").expect("the next section");
    json_blocks(&DOC[start..end])
}

#[test]
fn every_json_block_of_the_document_is_json() {
    // `json_blocks` panics on one that is not.
    assert!(json_blocks(DOC).len() >= 18, "the examples were found");
}

/// Whether every field of `example` is in `encoded` with its value, or is a default the
/// encoder leaves out (`false`, `null`).
fn shown_fields_survive(example: &Value, encoded: Option<&Value>) -> bool {
    match (example, encoded) {
        (Value::Bool(false) | Value::Null, None) => true,
        (Value::Object(fields), Some(Value::Object(again))) => fields
            .iter()
            .all(|(key, value)| shown_fields_survive(value, again.get(key))),
        (Value::Array(items), Some(Value::Array(again))) => {
            items.len() == again.len()
                && items
                    .iter()
                    .zip(again)
                    .all(|(item, again)| shown_fields_survive(item, Some(again)))
        }
        (value, Some(again)) => value == again,
        (_, None) => false,
    }
}

#[test]
fn every_websocket_example_decodes_with_all_its_fields() {
    let examples = examples();
    let mut types = Vec::new();
    for example in &examples {
        let text = example.to_string();
        let kind = example["type"].as_str().unwrap_or_default();
        let encoded = if CLIENT_TYPES.contains(&kind) {
            let message: ClientMessage =
                decode(text.as_bytes(), CLIENT_TYPES).unwrap_or_else(|e| panic!("{text}: {e}"));
            serde_json::to_value(message).expect("encode")
        } else {
            let message: ServerMessage =
                decode(text.as_bytes(), SERVER_TYPES).unwrap_or_else(|e| panic!("{text}: {e}"));
            serde_json::to_value(message).expect("encode")
        };
        assert!(
            shown_fields_survive(example, Some(&encoded)),
            "a field of the example is lost in decoding:\n{text}\n{encoded}"
        );
        types.push(kind.to_owned());
    }
    // The section shows each message type (the in-band refusal's `error` comes first).
    for kind in CLIENT_TYPES
        .iter()
        .chain(SERVER_TYPES)
        .filter(|k| **k != "pong")
    {
        assert!(
            types.iter().any(|t| t == kind),
            "no example of {kind}: {types:?}"
        );
    }
}
