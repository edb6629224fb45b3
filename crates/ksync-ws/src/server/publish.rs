//! Reading a `publish`: each event decoded once (into an [`Event`] for the storage) and kept
//! as the JSON the client sent (relayed as is, never re-encoded).
//!
//! [`read_publish`] does it in one pass over the message: serde_json decodes each event in
//! place and says where it ended, so the event's text is the slice it was decoded from. It
//! reads only plain messages (string keys without escapes, events that decode); anything else
//! gets `None` and goes through [`RawPublish`] (a scan for each event's extent, then a decode
//! of it), which accepts the same messages and gives each bad event its own error.

use std::borrow::Cow;

use ksync_core::{Event, EventLimits};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::room::Incoming;

/// A `publish` as the two-pass reader sees it (see the module docs). Any other message, or a
/// publish this does not read, goes through `protocol::decode`, which gives the precise error.
#[derive(Deserialize)]
struct RawPublish<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "ref")]
    reference: u64,
    #[serde(borrow)]
    events: Vec<&'a serde_json::value::RawValue>,
}

/// Decodes and checks one published event given as its JSON text.
pub(super) fn incoming(json: &str, limits: &EventLimits) -> Result<Incoming, String> {
    let event: Event = serde_json::from_str(json).map_err(|e| e.to_string())?;
    checked(event, json, limits)
}

/// [`incoming`] of JSON the caller owns (kept as the event's JSON, not copied).
pub(super) fn incoming_owned(json: Box<str>, limits: &EventLimits) -> Result<Incoming, String> {
    let event: Event = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    event.validate(limits).map_err(|e| e.to_string())?;
    Ok(Incoming { event, json })
}

fn checked(event: Event, json: &str, limits: &EventLimits) -> Result<Incoming, String> {
    event.validate(limits).map_err(|e| e.to_string())?;
    Ok(Incoming {
        event,
        json: json.into(),
    })
}

/// A publish as read: its `ref`, and its events to commit (each decoded, or why it is
/// invalid, as its ack will say), or why nothing of it is stored (see [`AckBudget`]).
pub(super) struct Read {
    pub(super) reference: u64,
    pub(super) items: Result<Vec<Result<Incoming, String>>, String>,
}

/// A publish's `ref` and its events, read in one pass by [`read_publish`], else by the two-pass
/// [`RawPublish`]. `None` for anything these do not read as a `publish`: the full decoder
/// (`protocol::decode`) then gives the precise answer. `max_results` is the relay's
/// `max_message_size` (see [`AckBudget`]).
pub(super) fn read(json: &str, limits: &EventLimits, max_results: usize) -> Option<Read> {
    let (reference, items) = match read_publish(json, limits) {
        Some(publish) if publish.kind == "publish" => (publish.reference, publish.items),
        Some(_) => return None,
        None => {
            let publish = serde_json::from_str::<RawPublish<'_>>(json).ok()?;
            if publish.kind != "publish" {
                return None;
            }
            // Charged as they are decoded: a publish of a million `0`s stops at the budget
            // instead of holding a million error messages first.
            let mut budget = AckBudget::new(max_results);
            let mut items = Vec::with_capacity(publish.events.len());
            for raw in &publish.events {
                let mut item = incoming(raw.get(), limits);
                if let Err(why) = budget.charge(&mut item) {
                    return Some(Read {
                        reference: publish.reference,
                        items: Err(why),
                    });
                }
                items.push(item);
            }
            (publish.reference, items)
        }
    };
    Some(checked_publish(reference, items, max_results))
}

/// The last checks of a decoded publish, whichever reader read it: later copies of a revision
/// refused, and its ack's results within [`AckBudget`].
pub(super) fn checked_publish(
    reference: u64,
    mut items: Vec<Result<Incoming, String>>,
    max_results: usize,
) -> Read {
    refuse_repeated_revisions(&mut items);
    let mut budget = AckBudget::new(max_results);
    let charged = items.iter_mut().try_for_each(|item| budget.charge(item));
    Read {
        reference,
        items: charged.map(|()| items),
    }
}

/// Longest `message` of an `invalid` result, in bytes (longer ones are cut, marked `...`).
const MAX_INVALID_MESSAGE: usize = 256;

/// Most bytes of an ack result besides an invalid event's message: `{"status":"duplicate",
/// "seq":` with 20 digits and `}`, or `{"status":"invalid","message":""}`, and a comma.
const ACK_RESULT_BYTES: usize = 50;

/// The bytes an ack's results (apart from `held` revisions, which have a budget of their own
/// in the room, `max_message_size` too) may take: `max_message_size`, so that an ack stays
/// within about twice that (PROTOCOL.md, "Frame sizes"). A publish of valid events never comes
/// near it (an event is at least 54 bytes, its result at most 50); one of many tiny non-events
/// (`[0,0,...]`: 2 bytes each, and a result with a message each) would make an ack fifty times
/// the publish, over what the connection may buffer and clients accept. Such a publish is
/// refused whole instead. (A publish only the full decoder reads, `conn::handle`, has all its
/// events decoded before it is charged: bounded by the message size, as that decoding is.)
struct AckBudget {
    left: usize,
    max: usize,
    /// The first invalid event's message, for the refusal.
    first_invalid: Option<String>,
}

impl AckBudget {
    fn new(max: usize) -> Self {
        Self {
            left: max,
            max,
            first_invalid: None,
        }
    }

    /// Charges `item`'s result (cutting a long message first); `Err` once over the budget.
    fn charge(&mut self, item: &mut Result<Incoming, String>) -> Result<(), String> {
        let bytes = match item {
            Ok(_) => ACK_RESULT_BYTES,
            Err(message) => {
                shorten(message);
                if self.first_invalid.is_none() {
                    self.first_invalid = Some(message.clone());
                }
                ACK_RESULT_BYTES + json_string_len(message)
            }
        };
        self.left = self.left.checked_sub(bytes).ok_or_else(|| {
            format!(
                "the ack of this publish would pass {} bytes: too many of its events are not \
                 valid events (the first: {}); nothing was stored",
                self.max,
                self.first_invalid.as_deref().unwrap_or("none")
            )
        })?;
        Ok(())
    }
}

/// Cuts `message` to [`MAX_INVALID_MESSAGE`] bytes (at a character boundary, with `...`).
fn shorten(message: &mut String) {
    if message.len() <= MAX_INVALID_MESSAGE {
        return;
    }
    let mut end = MAX_INVALID_MESSAGE - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str("...");
}

/// The length of `text` as a JSON string's contents, escapes included (as serde_json writes
/// them).
fn json_string_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

/// Refuses the later copies of a revision `(id, version)` that one publish names more than
/// once. No client needs that (a revision is one event), and each copy that collides with a
/// stored revision makes the storage copy that revision into its conflict: ~17,000 tiny
/// copies in one 1 MiB publish against a 1 MiB stored revision would make tens of GiB.
fn refuse_repeated_revisions(items: &mut [Result<Incoming, String>]) {
    if items.len() < 2 {
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    let repeats: Vec<usize> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let event = &item.as_ref().ok()?.event;
            (!seen.insert((event.id.as_str(), event.version))).then_some(i)
        })
        .collect();
    for i in repeats {
        if let Some(item) = items.get_mut(i)
            && let Ok(incoming) = item
        {
            let message = format!(
                "revision ({:?}, {}) appears more than once in this publish",
                incoming.event.id, incoming.event.version
            );
            *item = Err(message);
        }
    }
}

/// A message read by [`read_publish`].
struct ReadPublish<'a> {
    /// Its `type` (the caller checks for `publish`).
    kind: &'a str,
    /// Its `ref`.
    reference: u64,
    /// Each event, or why it is invalid (as [`incoming`] says it).
    items: Vec<Result<Incoming, String>>,
}

/// Reads `{"type": .., "ref": .., "events": [..]}` (keys in any order, others ignored) in one
/// pass; `None` for anything it does not read (see the module docs).
fn read_publish<'a>(json: &'a str, limits: &EventLimits) -> Option<ReadPublish<'a>> {
    let mut at = Cursor { json, pos: 0 };
    at.expect(b'{')?;
    let (mut kind, mut reference, mut items) = (None, None, None);
    if at.peek() == Some(b'}') {
        return None;
    }
    loop {
        let key: &str = at.value()?;
        at.expect(b':')?;
        match key {
            "type" if kind.is_none() => kind = Some(at.value::<&str>()?),
            "ref" if reference.is_none() => reference = Some(at.value::<u64>()?),
            "events" if items.is_none() => items = Some(at.events(limits)?),
            "type" | "ref" | "events" => return None,
            _ => {
                at.value::<IgnoredAny>()?;
            }
        }
        match at.next_byte()? {
            b',' => {}
            b'}' => break,
            _ => return None,
        }
    }
    if at.peek().is_some() {
        return None;
    }
    Some(ReadPublish {
        kind: kind?,
        reference: reference?,
        items: items?,
    })
}

/// A position in the message being read.
struct Cursor<'a> {
    json: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// The next byte that is not JSON whitespace (without taking it).
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.json.as_bytes();
        while let Some(&b) = bytes.get(self.pos) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
        }
        None
    }

    fn next_byte(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next_byte()? == byte).then_some(())
    }

    /// Decodes the JSON value here with serde_json and moves past it; its text with it.
    fn value_text<T: Deserialize<'a>>(&mut self) -> Option<(T, &'a str)> {
        self.peek()?;
        let rest = self.json.get(self.pos..)?;
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<T>();
        let value = values.next()?.ok()?;
        let end = values.byte_offset();
        let text = rest.get(..end)?;
        self.pos += end;
        Some((value, text))
    }

    fn value<T: Deserialize<'a>>(&mut self) -> Option<T> {
        self.value_text().map(|(value, _)| value)
    }

    /// The `events` array: each event decoded where it is, with the text it was decoded from.
    fn events(&mut self, limits: &EventLimits) -> Option<Vec<Result<Incoming, String>>> {
        self.expect(b'[')?;
        let mut items = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Some(items);
        }
        loop {
            let (event, text) = self.value_text::<Event>()?;
            items.push(checked(event, text, limits));
            match self.next_byte()? {
                b',' => {}
                b']' => return Some(items),
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reader made of a message: kind, ref, and per event its text or error.
    type Read = (String, u64, Vec<Result<String, String>>);

    /// What the two-pass reader makes of `json`.
    fn two_pass(json: &str) -> Option<Read> {
        let limits = EventLimits::default();
        let publish = serde_json::from_str::<RawPublish<'_>>(json).ok()?;
        let items = publish
            .events
            .iter()
            .map(|raw| incoming(raw.get(), &limits).map(|i| i.json.to_string()))
            .collect();
        Some((publish.kind.into_owned(), publish.reference, items))
    }

    fn one_pass(json: &str) -> Option<Read> {
        let limits = EventLimits::default();
        let publish = read_publish(json, &limits)?;
        let items = publish
            .items
            .into_iter()
            .map(|item| item.map(|i| i.json.to_string()))
            .collect();
        Some((publish.kind.to_owned(), publish.reference, items))
    }

    const EVENT: &str = r#"{"id":"a","type":"t","data":{"x":[1,2.5,"]},{\"é"],"y":null},"timestamp":1,"version":1}"#;

    #[test]
    fn reads_what_the_two_pass_reader_reads_the_same_way() {
        let messages = [
            format!(r#"{{"type":"publish","ref":7,"events":[{EVENT}]}}"#),
            format!(
                " \n{{ \"events\" : [ {EVENT} ,\t{EVENT} ] , \"ref\" : 0 , \"type\" : \"publish\" }} \r\n"
            ),
            r#"{"type":"publish","ref":1,"events":[]}"#.to_owned(),
            r#"{"type":"publish","ref":1,"events":[ ]}"#.to_owned(),
            format!(
                r#"{{"extra":{{"a":[1,{{"b":"}}"}}]}},"type":"publish","more":-1.5e3,"ref":18446744073709551615,"events":[{EVENT}],"last":"x"}}"#
            ),
            // An event that decodes but is invalid keeps its own error.
            r#"{"type":"publish","ref":2,"events":[{"id":"","type":"t","data":1,"timestamp":1,"version":1}]}"#
                .to_owned(),
            format!(r#"{{"type":"other","ref":3,"events":[{EVENT}]}}"#),
        ];
        for message in &messages {
            let expected = two_pass(message);
            assert!(expected.is_some(), "{message}");
            assert_eq!(one_pass(message), expected, "{message}");
        }
        let one = one_pass(&messages[1]).expect("read");
        assert_eq!(one.2[0].as_deref(), Ok(EVENT));
    }

    #[test]
    fn leaves_everything_else_to_the_two_pass_reader() {
        let messages = [
            // Events that do not decode: the two-pass reader names each one's error.
            format!(r#"{{"type":"publish","ref":1,"events":[5,{EVENT}]}}"#),
            format!(r#"{{"type":"publish","ref":1,"events":[{{"id":"a"}},{EVENT}]}}"#),
            // Escaped keys and values.
            format!(r#"{{"\u0074ype":"publish","ref":1,"events":[{EVENT}]}}"#),
            format!(r#"{{"type":"publi\u0073h","ref":1,"events":[{EVENT}]}}"#),
        ];
        for message in &messages {
            assert!(one_pass(message).is_none(), "{message}");
            assert!(two_pass(message).is_some(), "{message}");
        }
        // Not publishes at all, or broken: neither reader takes them.
        let broken = [
            String::new(),
            "{}".to_owned(),
            "[]".to_owned(),
            r#"{"type":"publish","ref":1}"#.to_owned(),
            r#"{"type":"publish","events":[]}"#.to_owned(),
            r#"{"type":"publish","ref":-1,"events":[]}"#.to_owned(),
            r#"{"type":"publish","ref":1.5,"events":[]}"#.to_owned(),
            r#"{"type":"publish","ref":1,"events":{}}"#.to_owned(),
            r#"{"type":"publish","ref":1,"ref":2,"events":[]}"#.to_owned(),
            r#"{"type":"publish","ref":1,"events":[],}"#.to_owned(),
            r#"{"type":"publish","ref":1,"events":[,]}"#.to_owned(),
            format!(r#"{{"type":"publish","ref":1,"events":[{EVENT},]}}"#),
            format!(r#"{{"type":"publish","ref":1,"events":[{EVENT} {EVENT}]}}"#),
            r#"{"type":"publish","ref":1,"events":[]} x"#.to_owned(),
            r#"{"type":"publish","ref":1,"events":[]"#.to_owned(),
            r#"{"type":"publish","ref":1 "events":[]}"#.to_owned(),
            r#"{"type":"publish","ref":1x,"events":[]}"#.to_owned(),
            r#"{type:"publish","ref":1,"events":[]}"#.to_owned(),
        ];
        for message in &broken {
            assert!(one_pass(message).is_none(), "{message}");
            assert!(two_pass(message).is_none(), "{message}");
        }
    }
}
