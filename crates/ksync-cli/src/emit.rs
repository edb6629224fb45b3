//! `--emit TYPE=JSON` of `ksync peer` and `ksync watch`: parsed up front (a bad one is an
//! error before anything connects), emitted once connected (through `KSync`, or straight
//! through the client for `ksync watch --live`).

use anyhow::bail;
use ksync_core::{Clock as _, Event, EventLimits, KSync, SyncClient, SystemClock};

/// Every `--emit` value, as (type, data).
pub(crate) fn parse_all(specs: &[String]) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    specs.iter().map(|spec| parse(spec)).collect()
}

/// Emits `events` through `ksync`, saying each one on stderr.
pub(crate) async fn emit_all<C: SyncClient + ?Sized>(
    ksync: &KSync<C>,
    events: Vec<(String, serde_json::Value)>,
) -> anyhow::Result<()> {
    for (event_type, data) in events {
        let event = ksync.emit(event_type, data).await?;
        eprintln!("emitted {} ({})", event.id, event.event_type);
    }
    Ok(())
}

/// Sends `events` through a client with no replica (`ksync watch --live`), made as
/// [`KSync::emit`] makes them (a UUID v7 id, the clock's time, version 1; the client gives
/// them its id as `origin`), saying each one on stderr.
pub(crate) async fn send_all<C: SyncClient + ?Sized>(
    client: &C,
    events: Vec<(String, serde_json::Value)>,
) -> anyhow::Result<()> {
    for (event_type, data) in events {
        let event = Event::new(
            uuid::Uuid::now_v7().to_string(),
            event_type,
            data,
            SystemClock.now_millis(),
        );
        event.validate(&EventLimits::default())?;
        let (id, event_type) = (event.id.clone(), event.event_type.clone());
        client.send(event).await?;
        eprintln!("emitted {id} ({event_type})");
    }
    Ok(())
}

/// `TYPE=JSON`; JSON that does not parse is taken as a string.
fn parse(spec: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let Some((event_type, data)) = spec.split_once('=') else {
        bail!("--emit wants TYPE=JSON, got {spec:?}");
    };
    if event_type.is_empty() {
        bail!("--emit {spec:?}: the event type is empty");
    }
    let data =
        serde_json::from_str(data).unwrap_or_else(|_| serde_json::Value::String(data.into()));
    // The event rules now, with an id as long as the UUID it will get: one that breaks them
    // was refused only when its turn came, after the ones before it had been sent.
    Event::new(uuid::Uuid::nil().to_string(), event_type, data.clone(), 0)
        .validate(&EventLimits::default())
        .map_err(|e| anyhow::anyhow!("--emit of type {:?}: {e}", shorten(event_type)))?;
    Ok((event_type.to_owned(), data))
}

/// At most 64 characters of `text`, for an error message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_specs() {
        let (t, d) = parse(r#"note={"text":"hi"}"#).expect("parses");
        assert_eq!((t.as_str(), d), ("note", serde_json::json!({"text": "hi"})));
        let (_, d) = parse("note=plain words").expect("parses");
        assert_eq!(d, serde_json::json!("plain words"));
        assert!(parse("no-equals").is_err());
        assert!(parse("=1").is_err());
        // The event rules are checked up front, before anything is sent.
        let long_type = format!("{}=1", "t".repeat(257));
        let err = parse(&long_type).expect_err("a type over 256 bytes");
        assert!(err.to_string().contains("257 bytes"), "{err}");
        assert!(parse(&format!("{}=1", "t".repeat(256))).is_ok());
    }
}
