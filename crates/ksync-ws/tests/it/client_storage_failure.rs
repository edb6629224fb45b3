//! The client's own storage failing while it stores what the room sent: what was stored
//! before the failure is reported, once.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{
    AllowAll, Event, InMemoryProvider, InMemoryStorage, LogName, Name, Notification,
    StorageProvider,
};
use ksync_testkit::FailAppend;
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;
use serde_json::json;

/// The room sends a new event `y` and a revision of `x` that conflicts with one this
/// replica holds, in one frame. Writing the revision that settles the conflict fails, after
/// `y` was stored: the session ends, but `y` is reported (`event` and `sync`) all the same,
/// as the next session's catch-up finds it a duplicate and reports it no more. That session
/// settles the conflict.
#[tokio::test]
async fn received_events_stored_before_a_failed_resolution_are_reported() {
    let provider = Arc::new(InMemoryProvider::new());
    let room = provider
        .open(&LogName::Room(Name::new("partial").expect("name")))
        .expect("room");
    room.append(vec![
        Event::new("y", "t", json!("new"), 2).with_origin("them"),
        Event::new("x", "t", json!("theirs"), 2).with_origin("them"),
    ])
    .await
    .expect("room events");
    let server = start_with(RelayConfig::default(), provider, Arc::new(AllowAll)).await;
    let url = server.url(Some("partial"));

    let storage = Arc::new(FailAppend::new(
        Arc::new(InMemoryStorage::new()),
        // The revision settling the conflict over `x`.
        |events| events.iter().any(|e| e.id == "x" && e.version == 2),
    ));
    let client = WebSocketSyncClient::builder(&url)
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .expect("client");
    let ksync = ksync_testkit::ksync_over(storage.clone(), client)
        .await
        .expect("ksync");
    // Held here already, from a third replica: not ours to send, so nothing is published
    // before the catch-up arrives.
    ksync
        .replica()
        .ingest(vec![
            Event::new("x", "t", json!("elsewhere"), 1).with_origin("other"),
        ])
        .await
        .expect("held");
    let rec = Recorder::attach(ksync.client().as_ref());
    ksync.connect().await.expect("connect");
    let replica = ksync.replica();
    eventually("the conflict settled after the failure", || {
        storage.failed()
            && replica
                .storage()
                .latest("x")
                .ok()
                .flatten()
                .is_some_and(|x| x.event.version == 2)
    })
    .await;
    ksync.disconnect().await.expect("disconnect");
    assert_eq!(rec.event_ids(), ["y"], "y reported once");
    // (The resolution's ack is a `sync` of its own.)
    let synced_y = rec
        .count(|n| matches!(n, Notification::Sync(events) if events.iter().any(|e| e.id == "y")));
    assert_eq!(synced_y, 1, "y synced once");
    server.stop().await;
}
