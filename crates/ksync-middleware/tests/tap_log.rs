//! The tap's log line, under a process-wide subscriber.
//!
//! A binary of its own: tracing caches each callsite's interest for the whole process, so a
//! thread-local subscriber in a multi-test binary can be missed when another thread registered
//! the callsite first. Here the global subscriber is set before any event is logged.

mod common;

use common::Captured;
use ksync_core::{Event, Middleware};
use ksync_middleware::Tap;
use serde_json::json;

#[test]
fn logs_each_event_with_its_label_id_and_type() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let tap = Tap::new("ws-out");
    tap.process(Event::new("e-17", "chat", json!({"text": "hello"}), 1))
        .expect("ok")
        .expect("kept");
    tap.process(Event::new("e-18", "presence", json!(null), 1))
        .expect("ok");
    let log = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf8");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    for (line, (id, kind)) in lines.iter().zip([("e-17", "chat"), ("e-18", "presence")]) {
        assert!(
            line.contains("DEBUG")
                && line.contains("ksync_middleware::tap")
                && line.contains("tap=ws-out")
                && line.contains(&format!("id={id}"))
                && line.contains(&format!("type={kind}")),
            "{line}"
        );
    }
    assert!(lines[0].contains("bytes=16"), "{}", lines[0]);
}
