//! `max_event_bytes` between peers: an event over a peer's own limit is neither published nor
//! served in catch-up (it is listed in `too_large`), and an event over the receiver's limit
//! (the sender's may be larger) is skipped with a typed `error` notification, not taken for a
//! lie: no `PeerMisbehaved`, no `status: error`.

use crate::common;

use std::sync::{Arc, Mutex};

use common::*;
use ksync_core::{
    Event, InMemoryStorage, KSync, Notification, NotificationKind, RevisionKey, Status,
    Subscription, SyncError,
};
use ksync_p2p::{P2PError, P2PSyncClient};
use serde_json::json;

/// The revisions a `ReceivedTooLarge` names, and the limit it gives.
type Skipped = (Vec<RevisionKey>, usize);

/// Every `error` notification a peer gets (as its `P2PError`, where it is one) and whether
/// its status ever said `error`.
struct Watch {
    errors: Arc<Mutex<Vec<String>>>,
    blamed: Arc<Mutex<usize>>,
    too_large: Arc<Mutex<Vec<Skipped>>>,
    status_errors: Arc<Mutex<usize>>,
    _subs: [Subscription; 2],
}

impl Watch {
    fn new(p: &P2PSyncClient) -> Self {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let blamed = Arc::new(Mutex::new(0));
        let too_large = Arc::new(Mutex::new(Vec::new()));
        let status_errors = Arc::new(Mutex::new(0));
        let (e, b, t) = (
            Arc::clone(&errors),
            Arc::clone(&blamed),
            Arc::clone(&too_large),
        );
        let error_sub = p.notifier().on_kind(NotificationKind::Error, move |n| {
            let Notification::Error(error) = n else {
                return;
            };
            e.lock().expect("lock").push(error.to_string());
            let SyncError::Transport(source) = error.as_ref() else {
                return;
            };
            match source.downcast_ref::<P2PError>() {
                Some(P2PError::PeerMisbehaved { .. }) => *b.lock().expect("lock") += 1,
                Some(P2PError::ReceivedTooLarge { keys, max, .. }) => {
                    t.lock().expect("lock").push((keys.clone(), *max));
                }
                _ => {}
            }
        });
        let s = Arc::clone(&status_errors);
        let status_sub = p.notifier().on_kind(NotificationKind::Status, move |n| {
            if let Notification::Status(Status::Error) = n {
                *s.lock().expect("lock") += 1;
            }
        });
        Self {
            errors,
            blamed,
            too_large,
            status_errors,
            _subs: [error_sub, status_sub],
        }
    }
}

/// An event whose JSON is about `kib` KiB.
fn big(id: &str, kib: usize) -> Event {
    Event::new(id, "big", json!("x".repeat(kib * 1024)), 1_700_000_000_000).with_origin("a")
}

/// The spec's flow: `KSync::emit` stores an event over the sender's limit (64 KiB), its
/// `broadcast` refuses it (an `error` notification saying too large); catch-up does not
/// serve it, so the other peer gets the normal events and blames nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_senders_limit_is_not_served_and_nobody_is_blamed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client_a = Arc::new(builder(dir.path(), "peer-a").build().expect("build"));
    let watch_a = Watch::new(&client_a);
    let ka = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::clone(&client_a))
        .replica_id("peer-a")
        .build()
        .await
        .expect("ksync a");
    ka.start().await.expect("start a");
    let oversized = ka
        .emit("big", json!("x".repeat(70 * 1024)))
        .await
        .expect("stored");
    let mut normal = Vec::new();
    for n in 0..3 {
        normal.push(ka.emit("small", json!({ "n": n })).await.expect("emit"));
    }
    assert!(
        ka.replica()
            .storage()
            .get(&oversized.id, 1)
            .expect("read")
            .is_some(),
        "emit stores it"
    );
    let errors = watch_a.errors.lock().expect("lock").clone();
    assert!(
        errors.iter().any(|e| e.contains("the limit is 65536")),
        "{errors:?}"
    );

    let b = peer(dir.path(), "b").await;
    let watch_b = Watch::new(&b);
    link(&b, &client_a).await;
    wait_until(10, "b gets the normal events", || keys(&b).len() == 3).await;
    let held = keys(&b);
    for e in &normal {
        assert!(held.contains(&(e.id.clone(), 1)));
    }
    assert_eq!(*watch_b.blamed.lock().expect("lock"), 0, "nobody is blamed");
    assert_eq!(*watch_b.status_errors.lock().expect("lock"), 0);
    assert!(watch_b.too_large.lock().expect("lock").is_empty());
}

/// Peers with different limits: the sender (256 KiB) serves a 100 KiB event; the receiver
/// (64 KiB) skips it with a `ReceivedTooLarge` error notification, keeps the rest, and
/// neither blames the sender nor says `status: error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_over_the_receivers_limit_is_skipped_not_blamed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = wide_peer(dir.path(), "a").await;
    let oversized = big("a-big", 100);
    a.broadcast(oversized.clone())
        .await
        .expect("within a's limit");
    a.broadcast(event("a", 1)).await.expect("broadcast");

    let b = peer(dir.path(), "b").await;
    let watch_b = Watch::new(&b);
    link(&b, &a).await;
    wait_until(10, "b gets the normal event", || {
        keys(&b).contains(&("a-1".to_owned(), 1))
    })
    .await;
    wait_until(10, "b says it skipped the large one", || {
        !watch_b.too_large.lock().expect("lock").is_empty()
    })
    .await;
    let (skipped, max) = watch_b.too_large.lock().expect("lock")[0].clone();
    assert_eq!(skipped, vec![oversized.key()]);
    assert_eq!(max, 64 * 1024);
    assert!(!keys(&b).contains(&("a-big".to_owned(), 1)));
    assert_eq!(*watch_b.blamed.lock().expect("lock"), 0, "nobody is blamed");
    assert_eq!(*watch_b.status_errors.lock().expect("lock"), 0);
}

/// Gossip between peers with different limits: a message with an event over the receiver's
/// limit only is ignored (not forwarded), not rejected, so the honest sender's score does not
/// drop; the rest comes by catch-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_over_the_receivers_limit_costs_the_sender_no_score() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = wide_peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    let watch_b = Watch::new(&b);
    link(&b, &a).await;
    wait_mesh(&[a.clone(), b.clone()]).await;
    for n in 0..5 {
        a.broadcast(big(&format!("a-big-{n}"), 100))
            .await
            .expect("within a's limit");
    }
    a.broadcast(event("a", 1)).await.expect("broadcast");
    wait_until(10, "b gets the normal event", || {
        keys(&b).contains(&("a-1".to_owned(), 1))
    })
    .await;
    wait_until(10, "b has seen the large messages", || {
        b.stats().rejected_messages >= 1
    })
    .await;
    let score = b.peer_score(a.local_peer_id()).await.expect("score");
    assert!(score.is_none_or(|s| s >= 0.0), "a lost score: {score:?}");
    assert_eq!(keys(&b).len(), 1);
    assert_eq!(*watch_b.blamed.lock().expect("lock"), 0, "nobody is blamed");
}

/// A started peer whose event limit (256 KiB) is four times the default one.
async fn wide_peer(dir: &std::path::Path, name: &str) -> Arc<P2PSyncClient> {
    let client = builder(dir, name)
        .max_event_bytes(256 * 1024)
        .build()
        .expect("build");
    client.start().await.expect("start");
    Arc::new(client)
}

/// Data at the edges of the event rules crosses between peers unchanged, by catch-up (CBOR)
/// and by gossip (JSON): nested as deep as the rules allow, integers at 2^53 - 1 either way,
/// integral floats and `-0.0` kept floats, and floats serde_json's default parser read one
/// unit in the last place off (the gossip receiver then held other data than the publisher
/// under one revision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_at_the_edges_of_the_rules_crosses_unchanged() {
    let edges = |id: &str| {
        let max = ksync_core::MAX_EVENT_INTEGER;
        // `1.0` and `-0.0` too: CBOR may write a float in fewer bytes, never as an integer.
        let mut data = json!([
            0.9941414234139935_f64,
            408.72700000000003,
            1.0,
            -0.0,
            max,
            -(max as i64)
        ]);
        for level in 1..ksync_core::MAX_DATA_DEPTH {
            data = if level % 2 == 0 {
                json!([data])
            } else {
                json!({ "k": data, "s": "\u{0}\u{1f600}" })
            };
        }
        Event::new(id, "edge", data, 1_700_000_000_000).with_origin("a")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let caught_up = edges("caught-up");
    a.broadcast(caught_up.clone()).await.expect("broadcast");
    let b = peer(dir.path(), "b").await;
    link(&b, &a).await;
    wait_mesh(&[Arc::clone(&a), Arc::clone(&b)]).await;
    let gossiped = edges("gossiped");
    a.broadcast(gossiped.clone()).await.expect("broadcast");
    wait_until(10, "b has both", || keys(&b).len() == 2).await;
    for sent in [caught_up, gossiped] {
        let held = b
            .replica()
            .storage()
            .get(&sent.id, 1)
            .expect("read")
            .expect("held");
        assert_eq!(
            serde_json::to_string(&held.event.data).expect("encodes"),
            serde_json::to_string(&sent.data).expect("encodes"),
            "{}",
            sent.id
        );
    }
}

/// Events an older build stored with data 110 and 128 levels deep (the event rules allowed 128
/// until `MAX_DATA_DEPTH` became 100) reach an upgraded peer by catch-up: the peer held
/// answers to the publish limit, so it dropped the event as invalid (blaming the peer that
/// served it) while older peers keep it. A new event as deep is still refused by `broadcast`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_older_builds_stored_deeper_than_the_publish_limit_is_caught_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let old = Event::new("old", "t", ksync_testkit::edge_data::nested(110), 1).with_origin("a");
    // As deep as older builds allowed: past what serde_json reads of one event's JSON.
    let deepest = Event::new(
        "deepest",
        "t",
        ksync_testkit::edge_data::nested(ksync_core::MAX_RECEIVED_DATA_DEPTH),
        1,
    )
    .with_origin("a");
    // As the older build stored them: appended to a's log, no publish check.
    a.replica()
        .storage()
        .append(vec![old.clone(), deepest.clone()])
        .await
        .expect("append");
    a.broadcast(event("a", 1)).await.expect("broadcast");
    let b = peer(dir.path(), "b").await;
    let watch_b = Watch::new(&b);
    link(&b, &a).await;
    wait_until(10, "b has all three, or blames a", || {
        keys(&b).len() == 3 || *watch_b.blamed.lock().expect("lock") > 0
    })
    .await;
    for sent in [old, deepest] {
        let held = b
            .replica()
            .storage()
            .get(&sent.id, 1)
            .expect("read")
            .map(|stored| stored.event);
        assert_eq!(held, Some(sent));
    }
    assert_eq!(*watch_b.blamed.lock().expect("lock"), 0, "nobody is blamed");
    let new = Event::new("new", "t", ksync_testkit::edge_data::nested(110), 1);
    let refused = a.broadcast(new).await.expect_err("too deep");
    assert!(
        matches!(
            refused,
            P2PError::InvalidEvent(ksync_core::InvalidEvent::DataTooDeep { max: 100 })
        ),
        "{refused:?}"
    );
}
