//! What `broadcast` (the `SyncClient::send` of P2P) stores and publishes, as the other
//! transports' `send` does (`Replica::record_forward`): an event without `origin` is ours
//! and goes out with our id; another replica's event keeps its origin, and one that collides
//! with a stored revision is settled like a received one, not refused.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use ksync_core::{Event, NotificationKind};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_origin_goes_out_as_ours() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    link(&b, &a).await;
    wait_mesh(&[Arc::clone(&a), Arc::clone(&b)]).await;
    a.broadcast(Event::new("no-origin", "t", json!(1), 1))
        .await
        .expect("broadcast");
    wait_until(10, "b gets it", || keys(&b).len() == 1).await;
    for p in [&a, &b] {
        let stored = p
            .replica()
            .storage()
            .get("no-origin", 1)
            .expect("read")
            .expect("held");
        assert_eq!(
            stored.event.origin.as_deref(),
            Some("a"),
            "on {}",
            p.peer_id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_colliding_event_is_settled_not_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    link(&b, &a).await;
    wait_mesh(&[Arc::clone(&a), Arc::clone(&b)]).await;
    let conflicts = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&conflicts);
    let _sub = a.notifier().on_kind(NotificationKind::Conflict, move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    a.broadcast(Event::new("doc", "t", json!("ours"), 10).with_origin("a"))
        .await
        .expect("broadcast");
    // An application bridging another replica's edit of the same revision into the mesh.
    a.broadcast(Event::new("doc", "t", json!("theirs"), 20).with_origin("elsewhere"))
        .await
        .expect("a forwarded collision is settled, not refused");
    assert_eq!(conflicts.load(Ordering::SeqCst), 1);
    let latest = |p: &ksync_p2p::P2PSyncClient| {
        p.replica()
            .storage()
            .latest("doc")
            .expect("read")
            .expect("held")
            .event
    };
    // Last-write-wins: the later timestamp, as a new revision both peers end with.
    assert_eq!(latest(&a).data, json!("theirs"));
    assert!(latest(&a).version > 1);
    wait_until(10, "b ends on the same revision", || {
        b.replica()
            .storage()
            .latest("doc")
            .expect("read")
            .is_some_and(|s| {
                s.event.version == latest(&a).version && s.event.data == json!("theirs")
            })
    })
    .await;
}

/// An event broadcast while no peer is subscribed to the topic is published once a peer
/// subscribes, not left to the next catch-up round (an hour here). The connect-time round
/// would carry it too, so the gossip path is observed through the counters: `a` publishes a
/// message when `b` subscribes, and `b` accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_broadcast_before_any_peer_subscribed_is_published_when_one_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = |name: &'static str| {
        let dir = dir.path().to_owned();
        async move {
            let client = builder(&dir, name)
                .anti_entropy_interval(std::time::Duration::from_secs(3600))
                .build()
                .expect("build");
            client.start().await.expect("start");
            Arc::new(client)
        }
    };
    let a = start("a").await;
    a.broadcast(event("a", 1)).await.expect("broadcast");
    let b = start("b").await;
    link(&b, &a).await;
    wait_until(10, "a publishes the kept event", || {
        a.stats().published_messages == 1
    })
    .await;
    assert_eq!(a.stats().published_events, 1);
    wait_until(10, "b accepts it by gossip", || {
        b.stats().accepted_messages == 1
    })
    .await;
    wait_until(10, "b holds it", || keys(&b).len() == 1).await;
}
