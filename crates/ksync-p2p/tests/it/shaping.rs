//! The spec's options and notifications on P2P: middleware (`use('incoming' | 'outgoing')`,
//! here the field encryption of `ksync-middleware`), the filter, and `status` /
//! `peer-disconnected`, on real peers over loopback, by gossip and by catch-up.

use crate::common;

use std::sync::{Arc, Mutex};

use common::raw::{RawSwarm, Request, Response, next_answer, raw_peer};
use common::*;
use ksync_core::{Direction, Event, Filter, Notification, NotificationKind, Subscription};
use ksync_core::{Status, SyncError};
use ksync_middleware::{Decrypt, Encrypt, FieldCipher};
use ksync_p2p::P2PSyncClient;
use ksync_p2p::PeerId;
use serde_json::json;

/// Every notification of the given kinds, in order.
struct Recorder {
    seen: Arc<Mutex<Vec<Notification>>>,
    _subs: Vec<Subscription>,
}

impl Recorder {
    fn new(p: &P2PSyncClient, kinds: &[NotificationKind]) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subs = kinds
            .iter()
            .map(|kind| {
                let s = Arc::clone(&seen);
                p.notifier().on_kind(*kind, move |n| {
                    s.lock().expect("lock").push(n.clone());
                })
            })
            .collect();
        Self { seen, _subs: subs }
    }

    fn all(&self) -> Vec<Notification> {
        self.seen.lock().expect("lock").clone()
    }
}

fn stored(p: &P2PSyncClient, id: &str) -> Option<Event> {
    p.replica()
        .storage()
        .get(id, 1)
        .expect("read")
        .map(|s| s.event)
}

fn encrypting(p: &P2PSyncClient, key: [u8; 32]) {
    let cipher = FieldCipher::from_key(key);
    p.use_middleware(Direction::Outgoing, Encrypt::new(cipher.clone()));
    p.use_middleware(Direction::Incoming, Decrypt::new(cipher));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypting_middleware_covers_gossip_and_catch_up_and_a_wrong_key_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    let wrong = peer(dir.path(), "wrong").await;
    encrypting(&a, [1; 32]);
    encrypting(&b, [1; 32]);
    encrypting(&wrong, [2; 32]);
    let errors = Recorder::new(&wrong, &[NotificationKind::Error, NotificationKind::Status]);
    link(&b, &a).await;
    link(&wrong, &a).await;
    wait_mesh(&[Arc::clone(&a), Arc::clone(&b)]).await;

    let secret = Event::new("s-1", "note", json!({"pin": 4711}), 1).with_origin("a");
    a.broadcast(secret.clone()).await.expect("broadcast");
    // Gossip: b decrypts and stores the plaintext, as a made it.
    wait_until(10, "b gets the event", || stored(&b, "s-1").is_some()).await;
    assert_eq!(stored(&b, "s-1").expect("held").data, secret.data);
    // The wrong key: a typed error, and no ciphertext stored.
    wait_until(10, "the wrong key is reported", || {
        errors.all().iter().any(|n| {
            matches!(n, Notification::Error(e) if matches!(e.as_ref(), SyncError::Middleware(_)))
        })
    })
    .await;
    assert!(keys(&wrong).is_empty(), "{:?}", keys(&wrong));
    // Each error is announced by `status: error` just before it (the spec's statuses).
    let seen = errors.all();
    for (i, n) in seen.iter().enumerate() {
        if matches!(n, Notification::Error(_)) {
            assert!(
                i > 0 && matches!(seen[i - 1], Notification::Status(Status::Error)),
                "{seen:?}"
            );
        }
    }

    // Catch-up from a to a late relay without middleware: it holds only the ciphertext.
    let relay = peer(dir.path(), "relay").await;
    link(&relay, &a).await;
    wait_until(10, "the relay catches up", || {
        stored(&relay, "s-1").is_some()
    })
    .await;
    let on_the_wire = stored(&relay, "s-1").expect("held");
    assert_eq!(
        on_the_wire.data["enc"], "chacha20poly1305",
        "{on_the_wire:?}"
    );
    assert!(!on_the_wire.data.to_string().contains("4711"));
    // Catch-up from the relay to a late peer with the key: decrypted before it is stored.
    let late = peer(dir.path(), "late").await;
    encrypting(&late, [1; 32]);
    link(&late, &relay).await;
    wait_until(10, "the late peer catches up", || {
        stored(&late, "s-1").is_some()
    })
    .await;
    assert_eq!(stored(&late, "s-1").expect("held").data, secret.data);
    assert!(keys(&wrong).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_keeps_events_home_and_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Arc::new(
        builder(dir.path(), "a")
            .filter(Filter::PublicOnly)
            .build()
            .expect("build"),
    );
    a.start().await.expect("start");
    let b = peer(dir.path(), "b").await;
    link(&b, &a).await;
    wait_mesh(&[Arc::clone(&a), Arc::clone(&b)]).await;
    let public = |n: usize| Event::new(format!("pub-{n}"), "t", json!({"n": n}), 1);
    let private = |n: usize| Event::new(format!("priv-{n}"), "t", json!({"private": true}), 1);
    a.broadcast(public(1)).await.expect("broadcast");
    a.broadcast(private(1)).await.expect("broadcast");
    a.broadcast(public(2)).await.expect("broadcast");
    assert_eq!(keys(&a).len(), 3, "kept home, but kept");
    wait_until(10, "b gets the public events", || keys(&b).len() == 2).await;

    // Catch-up: a late peer gets the public events on both sides of the private one.
    let late = peer(dir.path(), "late").await;
    link(&late, &a).await;
    wait_until(10, "the late peer catches up", || keys(&late).len() == 2).await;

    // Coming in: a private event from b is not taken in by a.
    b.broadcast(private(2)).await.expect("broadcast");
    b.broadcast(public(3)).await.expect("broadcast");
    wait_until(10, "a gets b's public event", || {
        stored(&a, "pub-3").is_some()
    })
    .await;
    a.sync_now().await.expect("sync");
    late.sync_now().await.expect("sync");
    wait_until(10, "late gets b's public event through a", || {
        stored(&late, "pub-3").is_some()
    })
    .await;
    for p in [&b, &late] {
        assert!(
            stored(p, "priv-1").is_none(),
            "{} got a private event",
            p.peer_id()
        );
    }
    assert!(stored(&a, "priv-2").is_none(), "a took in a private event");
}

/// Asks `peer` for the `Keys` page after `after` from a raw peer.
async fn keys_page(swarm: &mut RawSwarm, peer: PeerId, after: u64) -> Response {
    let asked = swarm.behaviour_mut().send_request(
        &peer,
        Request::Keys {
            network: "ksync".into(),
            after,
            limit: 1024,
        },
    );
    let answer = async {
        match next_answer(swarm, |id| *id == asked).await {
            (_, Ok(response)) => response,
            (_, Err(error)) => panic!("the Keys request failed: {error}"),
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("a Keys answer in time")
}

/// `Keys` pages list only what the filter lets out: walking a filtered peer's log page by
/// page, a raw peer sees the ids of its public events and of no private one, and walks past a
/// run of private events longer than one page's scan through an empty page that moves on. An
/// honest late peer gets every public event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_pages_list_only_what_the_filter_lets_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Arc::new(
        builder(dir.path(), "a")
            .filter(Filter::PublicOnly)
            .build()
            .expect("build"),
    );
    let public = |n: usize| Event::new(format!("pub-{n}"), "t", json!({"n": n}), 1);
    let private = |n: usize| Event::new(format!("priv-{n}"), "t", json!({"private": true}), 1);
    // 9,000 private events (more than the 8,192 one page looks at), a public one, 50 private
    // ones, a public one: the log as the application wrote it.
    let log: Vec<Event> = (0..9_000)
        .map(private)
        .chain([public(1)])
        .chain((9_000..9_050).map(private))
        .chain([public(2)])
        .collect();
    a.replica().storage().append(log).await.expect("append");
    a.start().await.expect("start");

    let (mut raw, _) = raw_peer().await;
    let a_addr = a.addresses().into_iter().next().expect("listening");
    raw.add_peer_address(a.local_peer_id(), a_addr);
    let (mut after, mut listed, mut empty_pages_moving_on) = (0, Vec::new(), 0);
    loop {
        let Response::Keys {
            entries,
            through,
            len,
            ..
        } = keys_page(&mut raw, a.local_peer_id(), after).await
        else {
            panic!("not a Keys page");
        };
        assert_eq!(len, 9_052);
        let through = through.expect("a filtering peer says where its page ends");
        if entries.is_empty() && through > after {
            empty_pages_moving_on += 1;
        }
        listed.extend(entries.into_iter().map(|e| e.id));
        if through == after {
            break;
        }
        after = through;
    }
    assert_eq!(
        listed,
        ["pub-1", "pub-2"],
        "pages list what the filter lets out"
    );
    assert_eq!(after, 9_052, "the walk covers the whole log");
    assert!(
        empty_pages_moving_on >= 1,
        "a page of private events only moves on"
    );

    let late = peer(dir.path(), "late").await;
    link(&late, &a).await;
    wait_until(10, "the late peer gets the public events", || {
        keys(&late).len() == 2
    })
    .await;
    assert!(stored(&late, "pub-1").is_some() && stored(&late, "pub-2").is_some());
}

/// `public-only` with an encrypting middleware: the filter sees the event as the application
/// made it, so a private event stays home although it would leave encrypted (the filter used
/// to see only the envelope, which has no `private`, and let it out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_sees_events_before_the_outgoing_middleware() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Arc::new(
        builder(dir.path(), "a")
            .filter(Filter::PublicOnly)
            .build()
            .expect("build"),
    );
    encrypting(&a, [7; 32]);
    a.start().await.expect("start");
    let b = peer(dir.path(), "b").await;
    encrypting(&b, [7; 32]);
    link(&b, &a).await;
    wait_mesh(&[Arc::clone(&a), Arc::clone(&b)]).await;
    a.broadcast(Event::new("secret", "t", json!({"private": true}), 1))
        .await
        .expect("broadcast");
    a.broadcast(Event::new("open", "t", json!({"n": 1}), 1))
        .await
        .expect("broadcast");
    wait_until(10, "b gets the public event", || {
        stored(&b, "open").is_some()
    })
    .await;
    // Catch-up offers what gossip sent: the private event is not among it either.
    b.sync_now().await.expect("sync");
    assert!(stored(&b, "secret").is_none(), "the private event left a");
    assert_eq!(stored(&b, "open").map(|e| e.data), Some(json!({"n": 1})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_catch_up_and_stop_reports_every_peer_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Arc::new(builder(dir.path(), "a").build().expect("build"));
    let seen = Recorder::new(
        &a,
        &[
            NotificationKind::Status,
            NotificationKind::PeerConnected,
            NotificationKind::PeerDisconnected,
        ],
    );
    a.start().await.expect("start");
    let b = peer(dir.path(), "b").await;
    b.broadcast(event("b", 1))
        .await
        .expect("stored, published to nobody");
    let c = peer(dir.path(), "c").await;
    link(&a, &b).await;
    link(&a, &c).await;
    wait_until(10, "a catches up", || keys(&a).len() == 1).await;
    let statuses = || -> Vec<Status> {
        seen.all()
            .into_iter()
            .filter_map(|n| match n {
                Notification::Status(s) => Some(s),
                _ => None,
            })
            .collect()
    };
    wait_until(10, "idle after the catch-up", || {
        statuses().last() == Some(&Status::Idle)
    })
    .await;
    let so_far = statuses();
    assert_eq!(so_far.first(), Some(&Status::Connected), "{so_far:?}");
    assert!(so_far.contains(&Status::Syncing), "{so_far:?}");

    a.stop().await.expect("stop");
    let gone: Vec<String> = seen
        .all()
        .into_iter()
        .filter_map(|n| match n {
            Notification::PeerDisconnected(p) => Some(p),
            _ => None,
        })
        .collect();
    let mut expected = vec![b.local_peer_id().to_string(), c.local_peer_id().to_string()];
    expected.sort();
    let mut gone_sorted = gone.clone();
    gone_sorted.sort();
    assert_eq!(
        gone_sorted, expected,
        "each connected peer is reported gone once"
    );
}
