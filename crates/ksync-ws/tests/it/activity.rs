//! `Relay::activity` and `Relay::clients`: what observers (the server's dashboard) see.

use crate::common;

use std::time::Duration;

use common::*;
use ksync_ws::server::{RelayActivity, RelayConfig};
use serde_json::json;
use tokio::sync::broadcast;

async fn next(rx: &mut broadcast::Receiver<RelayActivity>) -> RelayActivity {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("activity within 5 s")
        .expect("feed open")
}

#[tokio::test]
async fn observers_see_connections_and_stored_events() {
    let server = start(RelayConfig::default()).await;
    let mut feed = server.relay.activity();
    assert!(server.relay.clients().is_empty());

    let (mut a, _) = join(&server.url(Some("chat")), hello()).await;
    let joined = match next(&mut feed).await {
        RelayActivity::Connected(info) => info,
        other => panic!("expected a connection, got {other:?}"),
    };
    assert_eq!(joined.room.as_str(), "chat");
    assert_eq!(joined.subject, "anonymous");
    assert_eq!(server.relay.clients(), vec![joined.clone()]);

    send_json(
        &mut a,
        json!({"type":"publish","ref":1,"events":[event("e1",1), event("e2",2)]}),
    )
    .await;
    assert_eq!(recv_json(&mut a).await["type"], "ack");
    match next(&mut feed).await {
        RelayActivity::Stored {
            room,
            events,
            omitted,
        } => {
            assert_eq!(omitted, 0);
            assert_eq!(room.as_str(), "chat");
            let seqs: Vec<u64> = events.iter().map(|s| s.seq).collect();
            assert_eq!(seqs, vec![1, 2]);
            assert_eq!(events[1].event.id, "e2");
        }
        other => panic!("expected stored events, got {other:?}"),
    }
    // A duplicate stores nothing, so observers hear nothing about it.
    send_json(
        &mut a,
        json!({"type":"publish","ref":2,"events":[event("e1",1)]}),
    )
    .await;
    assert_eq!(recv_json(&mut a).await["results"][0]["status"], "duplicate");

    drop(a);
    match next(&mut feed).await {
        RelayActivity::Disconnected(info) => assert_eq!(info, joined),
        other => panic!("expected a disconnection, got {other:?}"),
    }
    assert!(server.relay.clients().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn shutting_down_resolves_when_shutdown_begins() {
    let server = start(RelayConfig::default()).await;
    let relay = server.relay.clone();
    let waiter = tokio::spawn(async move { relay.shutting_down().await });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    let relay = server.relay.clone();
    server.stop().await;
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("resolved within 5 s")
        .expect("task ran");
    // Once shut down, it resolves at once.
    tokio::time::timeout(Duration::from_secs(1), relay.shutting_down())
        .await
        .expect("resolves at once");
}

/// One activity item carries at most `ACTIVITY_ITEM_BYTES` of events: the rest of a large
/// commit is counted in `omitted`, so a slow observer cannot pin gigabytes.
#[tokio::test]
async fn a_large_commit_is_counted_not_carried_past_the_item_bound() {
    use ksync_ws::server::ACTIVITY_ITEM_BYTES;
    let server = start(RelayConfig::default()).await;
    let mut feed = server.relay.activity();
    let (mut a, _) = join(&server.url(Some("big")), hello()).await;
    assert!(matches!(next(&mut feed).await, RelayActivity::Connected(_)));
    // Eight events of ~20 KiB in one publish (one commit): three fit in 64 KiB.
    let events: Vec<_> = (0..8)
        .map(|i| json!({"id": format!("big-{i}"), "type": "blob", "data": "x".repeat(20 * 1024), "timestamp": 1, "version": 1}))
        .collect();
    send_json(&mut a, json!({"type":"publish","ref":1,"events":events})).await;
    let ack = recv_json(&mut a).await;
    assert_eq!(ack["results"].as_array().map(Vec::len), Some(8), "{ack}");
    match next(&mut feed).await {
        RelayActivity::Stored {
            events, omitted, ..
        } => {
            assert_eq!(events.len(), 3);
            assert_eq!(omitted, 5);
            let carried: usize = events
                .iter()
                .map(|s| serde_json::to_string(&s.event).expect("json").len())
                .sum();
            assert!(carried <= ACTIVITY_ITEM_BYTES + 3 * 64, "{carried}");
            let seqs: Vec<u64> = events.iter().map(|s| s.seq).collect();
            assert_eq!(seqs, [1, 2, 3]);
        }
        other => panic!("expected stored events, got {other:?}"),
    }
    drop(a);
    server.stop().await;
}
