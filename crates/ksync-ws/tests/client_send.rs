//! WebSocketSyncClient::send: what it refuses, and what it queues.

use std::sync::Arc;

use ksync_core::{Event, InMemoryStorage, InvalidEvent, KSync, Storage, SyncClient, SyncError};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;

fn invalid_events() -> Vec<(Event, InvalidEvent)> {
    vec![
        (Event::new("", "t", json!(1), 1), InvalidEvent::EmptyId),
        (Event::new("x", "", json!(1), 1), InvalidEvent::EmptyType),
        (
            Event::new("x", "t", json!(1), 1).with_version(0),
            InvalidEvent::ZeroVersion,
        ),
    ]
}

#[tokio::test]
async fn send_refuses_an_event_the_relay_would_refuse_and_queues_nothing() {
    // Nothing needs to listen: the event is refused before it is queued.
    let standalone = WebSocketSyncClient::new("ws://127.0.0.1:9/ws").expect("client");
    for (event, why) in invalid_events() {
        let error = standalone.send(event).await.expect_err("refused");
        assert!(
            matches!(&error, SyncError::InvalidEvent(e) if *e == why),
            "{error}"
        );
    }
    assert_eq!(standalone.outbox_len(), 0);

    // Attached to a replica: not stored either (the replica would hold what the room never
    // will).
    let storage = Arc::new(InMemoryStorage::new());
    let ksync = KSync::builder()
        .storage(storage.clone())
        .sync_client(Arc::new(
            WebSocketSyncClient::new("ws://127.0.0.1:9/ws").expect("client"),
        ))
        .build()
        .await
        .expect("ksync");
    for (event, why) in invalid_events() {
        let error = ksync.client().send(event).await.expect_err("refused");
        assert!(
            matches!(&error, SyncError::InvalidEvent(e) if *e == why),
            "{error}"
        );
    }
    assert_eq!(storage.len(), 0);
    // A valid one still goes in.
    ksync
        .client()
        .send(Event::new("ok", "t", json!(1), 1))
        .await
        .expect("queued");
    assert_eq!(storage.len(), 1);
}
