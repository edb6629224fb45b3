//! The examples of docs/PROTOCOL.md's Git-like HTTP section are what the service and the
//! client speak: each request body and answer decodes with the wire types, and encoding it
//! again gives the same JSON (so the example names no field the types do not know, which
//! decoding an answer would silently skip).

use ksync_git::wire::{MergeRequest, MergeResponse, PullResponse, PushRequest, PushResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const DOC: &str = include_str!("../../../../docs/PROTOCOL.md");

/// One example: the request line, its JSON body (if any) and the `200` answer's JSON.
struct Example<'a> {
    request_line: &'a str,
    body: Option<Value>,
    answer: Value,
}

/// The plain code blocks of the Git section that start with a request line.
fn examples() -> Vec<Example<'static>> {
    let start = DOC.find("## Git-like HTTP").expect("the Git section");
    let end = start + DOC[start..].find("\n## ").expect("the next section");
    let mut rest = &DOC[start..end];
    let mut found = Vec::new();
    while let Some(open) = rest.find("```\n") {
        let block = &rest[open + 4..];
        let close = block.find("```").expect("a closed code block");
        rest = &block[close + 3..];
        let block = &block[..close];
        let Some((request_line, after)) = block.split_once('\n') else {
            continue;
        };
        if !(request_line.starts_with("GET ") || request_line.starts_with("POST ")) {
            continue;
        }
        let (body, answer) = match after.split_once("\n200 ") {
            Some((body, answer)) => (Some(body), answer),
            None => (
                None,
                after
                    .strip_prefix("200 ")
                    .unwrap_or_else(|| panic!("{request_line}: no 200 answer")),
            ),
        };
        let json = |text: &str| {
            serde_json::from_str::<Value>(text)
                .unwrap_or_else(|e| panic!("{request_line}: not JSON ({e}): {text}"))
        };
        found.push(Example {
            request_line,
            body: body.map(json),
            answer: json(answer),
        });
    }
    found
}

/// Decodes `value` as `T` and checks that encoding it gives `value` back.
fn round_trips<T: Serialize + DeserializeOwned>(what: &str, value: &Value) {
    let decoded: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{what} does not decode: {e}\n{value}"));
    let again = serde_json::to_value(&decoded).expect("encode");
    assert_eq!(&again, value, "{what} does not survive decoding");
}

#[test]
fn every_git_example_decodes_and_round_trips() {
    let examples = examples();
    let mut kinds = Vec::new();
    for example in &examples {
        let Example {
            request_line,
            body,
            answer,
        } = example;
        let body = || {
            body.as_ref()
                .unwrap_or_else(|| panic!("{request_line}: a body"))
        };
        if request_line.starts_with("GET ") && request_line.contains("/events?") {
            round_trips::<PullResponse>(request_line, answer);
            kinds.push("pull");
        } else if request_line.starts_with("POST ") && request_line.ends_with("/events") {
            round_trips::<PushRequest>(request_line, body());
            round_trips::<PushResponse>(request_line, answer);
            kinds.push("push");
        } else if request_line.starts_with("POST ") && request_line.ends_with("/merge") {
            round_trips::<MergeRequest>(request_line, body());
            round_trips::<MergeResponse>(request_line, answer);
            kinds.push("merge");
        } else {
            panic!("an example of no known endpoint: {request_line}");
        }
    }
    assert_eq!(kinds, ["pull", "push", "merge"], "the examples found");
}
