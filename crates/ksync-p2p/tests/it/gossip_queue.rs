//! Gossip queued to a peer that does not read is bounded in bytes (`max_gossip_queue_bytes`),
//! not only in messages: gossipsub's queue to each peer holds 5,000 messages, up to 320 KiB
//! each at the default event limit (and 8 MiB at the largest), so one stalled subscriber
//! could make a node hold gigabytes. The queue holds at least 256 messages (gossip is mostly
//! small events), so its bound is `max(max_gossip_queue_bytes, 256 x the largest message)`.
//! Overflow: the message is not queued for that peer (its events are stored; catch-up
//! carries them), and a publish no peer could take is reported. All peers' queues together
//! are bounded too (`max_gossip_total_bytes`): past it, the peer furthest behind is
//! disconnected.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use ksync_core::{Event, Notification, NotificationKind, SyncError};
use ksync_p2p::{P2PError, P2PSyncClient};
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::swarm::SwarmEvent;
use serde_json::json;

type Subscriber = libp2p::Swarm<gossipsub::Behaviour>;

/// A plain gossipsub peer subscribed to `a`'s topic; returns once `a` has subscribed too.
/// The caller stops polling it: its connection's events then back up (libp2p's buffer per
/// connection is a few events), its connection stops reading, and TCP pushes back to `a`.
async fn subscriber(a: &P2PSyncClient) -> Subscriber {
    let mut s = common::raw::swarm(|key| {
        let config = gossipsub::ConfigBuilder::default()
            .max_transmit_size(4 * 1024 * 1024)
            .build()
            .expect("config");
        gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), config)
            .expect("behaviour")
    });
    let topic = IdentTopic::new(ksync_p2p::gossip_topic(a.network()));
    s.behaviour_mut().subscribe(&topic).expect("subscribe");
    s.dial(a.addresses()[0].clone()).expect("dial");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, s.select_next_some())
            .await
            .expect("a subscribes in time");
        if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { peer_id, .. }) = event
            && peer_id == a.local_peer_id()
        {
            return s;
        }
    }
}

/// Counts the `P2PError::Publish` errors `a` reports: publishes no peer's queue took.
fn count_overflows(a: &P2PSyncClient) -> (Arc<Mutex<usize>>, ksync_core::Subscription) {
    let overflows = Arc::new(Mutex::new(0usize));
    let o = Arc::clone(&overflows);
    let sub = a.notifier().on_kind(NotificationKind::Error, move |n| {
        if let Notification::Error(e) = n
            && let SyncError::Transport(source) = e.as_ref()
            && let Some(P2PError::Publish(_)) = source.downcast_ref::<P2PError>()
        {
            *o.lock().expect("lock") += 1;
        }
    });
    (overflows, sub)
}

/// Broadcasts events on `a`, one a message (each published before the next is sent), until
/// a publish overflows; returns how many were sent. A stalled subscriber's connection still
/// takes about ten messages (libp2p's buffer of events per connection) and then what its
/// stream's window holds (256 KiB, as it grew no window reading a few small messages): so
/// ten small events, then three of `big` bytes to fill the window, then small ones, which
/// fill the queue (in messages) far faster than big ones would.
async fn publish_until_overflow(a: &P2PSyncClient, overflows: &Mutex<usize>, big: usize) -> u64 {
    let overflowed = || *overflows.lock().expect("lock");
    let mut sent = 0u64;
    while overflowed() == 0 {
        assert!(
            sent < 1000,
            "1,000 messages queued to peers that do not read, and no publish overflowed"
        );
        let size = if (10..13).contains(&sent) { big } else { 100 };
        let event = Event::new(format!("e{sent}"), "t", json!("x".repeat(size)), 1);
        a.broadcast(event).await.expect("broadcast");
        sent += 1;
        // Polled every millisecond (not `wait_until`'s 20): hundreds of these in a row.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while a.stats().published_messages + overflowed() as u64 != sent {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node publishes it, or reports it could not"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_queued_to_a_peer_that_does_not_read_is_bounded_in_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = builder(dir.path(), "a")
        .max_event_bytes(256 * 1024)
        .max_gossip_queue_bytes(1024 * 1024)
        .anti_entropy_interval(Duration::from_secs(3600))
        .build()
        .expect("build");
    a.start().await.expect("start");
    let (overflows, _sub) = count_overflows(&a);
    let stalled = subscriber(&a).await;

    // Gossip to the one subscriber, each event published before the next is sent: past what
    // its connection takes, the rest waits in `a`'s queue to it, and 256 messages fill it
    // (the floor: 1 MiB is fewer). With 5,000 messages allowed there, all of it was queued
    // and nothing overflowed within 1,000.
    let sent = publish_until_overflow(&a, &overflows, 200_000).await;
    // Every event is stored, for catch-up to carry.
    assert_eq!(keys(&a).len() as u64, sent);
    drop(stalled);
}

/// Gossip queued to all peers together is bounded (`max_gossip_total_bytes`): each peer's
/// queue is, but 64 peers that stop reading could make a node hold 64 of them (~5 GiB at the
/// default event limit). A peer whose queue overflowed counts at its worst case (its queue's
/// length in messages, 256 here, times the largest message gossiped since it connected, ~600
/// KB here: ~150 MiB); past the bound (256 MiB: one such peer fits, two do not) the one
/// that dropped the most is disconnected, which frees its queue. Before, both stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_queued_to_all_peers_together_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = builder(dir.path(), "a")
        .max_event_bytes(1024 * 1024)
        .anti_entropy_interval(Duration::from_secs(3600))
        .build()
        .expect("build");
    a.start().await.expect("start");
    let (overflows, _sub) = count_overflows(&a);
    let stalled = [subscriber(&a).await, subscriber(&a).await];
    let ids: Vec<_> = stalled.iter().map(|s| *s.local_peer_id()).collect();

    // Until a publish overflows: neither stalled peer's queue took it.
    let sent = publish_until_overflow(&a, &overflows, 600_000).await;

    // Both queues are full: the node lets one go (at its next gossip heartbeat, 1 s).
    wait_until(5, "one stalled peer is disconnected", || {
        let connected = a.connected_peers();
        ids.iter().filter(|id| connected.contains(id)).count() < 2
    })
    .await;
    let stays = |a: &P2PSyncClient| {
        let connected = a.connected_peers();
        ids.iter().filter(|id| connected.contains(id)).count()
    };
    assert_eq!(stays(&a), 1, "one stalled peer fits the bound");

    // It stays over the next heartbeats, while its queue goes on overflowing (gossipsub
    // reports it at each): the bound is not let go of more peers than it needs. No event
    // says that nothing more happened, so this watches for a bounded 2.5 s (two heartbeats
    // and a half), publishing every 100 ms. Before, a peer let go that gossipsub went on
    // reporting while its connection closed made the other go too (1 run in 3).
    let before = *overflows.lock().expect("lock");
    let mut more = 0u64;
    let until = tokio::time::Instant::now() + Duration::from_millis(2500);
    while tokio::time::Instant::now() < until {
        let event = Event::new(format!("m{more}"), "t", json!("x"), 1);
        a.broadcast(event).await.expect("broadcast");
        more += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(stays(&a), 1, "the other stalled peer stays");
    }
    assert!(
        *overflows.lock().expect("lock") > before,
        "its queue went on overflowing"
    );
    // Every event is stored, for catch-up to carry.
    assert_eq!(keys(&a).len() as u64, sent + more);
    drop(stalled);
}
