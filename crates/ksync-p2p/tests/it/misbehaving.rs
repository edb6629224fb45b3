//! A raw libp2p swarm joins the topic and publishes malformed and oversized messages; the
//! honest peers reject them (and score the sender down) while they keep syncing.

use crate::common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, SwarmBuilder, noise, tcp, yamux};
use serde_json::json;

/// What the misbehaving peer publishes, each on its own.
fn bad_payloads() -> Vec<(&'static str, Vec<u8>)> {
    let huge_event = json!({
        "id": "evil-big", "type": "t", "data": "x".repeat(100 * 1024),
        "timestamp": 1, "version": 1
    });
    vec![
        ("not json", b"\x00\x01garbage".to_vec()),
        ("wrong shape", br#"{"hello":"world"}"#.to_vec()),
        (
            "invalid event",
            br#"{"v":1,"events":[{"id":"","type":"t","data":1,"timestamp":1,"version":0}]}"#.to_vec(),
        ),
        (
            "oversized event",
            format!(r#"{{"v":1,"events":[{huge_event}]}}"#).into_bytes(),
        ),
        (
            "unknown version",
            br#"{"v":99,"events":[{"id":"evil-v","type":"t","data":1,"timestamp":1,"version":1}]}"#.to_vec(),
        ),
        (
            "batch count that does not match",
            br#"{"v":1,"n":3,"events":[{"id":"evil-n","type":"t","data":1,"timestamp":1,"version":1}]}"#.to_vec(),
        ),
        // Last: a frame over the limit may end the inbound stream it arrives on.
        (
            "over the transmit limit",
            format!(
                r#"{{"v":1,"events":[{{"id":"evil-huge","type":"t","data":"{}","timestamp":1,"version":1}}]}}"#,
                "y".repeat(2 * 1024 * 1024)
            )
            .into_bytes(),
        ),
    ]
}

type EvilSwarm = libp2p::Swarm<
    gossipsub::Behaviour<gossipsub::IdentityTransform, gossipsub::AllowAllSubscriptionFilter>,
>;

/// The misbehaving peer: plain gossipsub with a generous size limit of its own, joined to
/// `a`'s topic through a connection to `a`; returns once `a` has subscribed.
async fn evil_joins(a: &ksync_p2p::P2PSyncClient) -> (EvilSwarm, IdentTopic) {
    let mut evil = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|key| {
            let config = gossipsub::ConfigBuilder::default()
                .max_transmit_size(4 * 1024 * 1024)
                .build()
                .expect("config");
            gossipsub::Behaviour::<
                gossipsub::IdentityTransform,
                gossipsub::AllowAllSubscriptionFilter,
            >::new(MessageAuthenticity::Signed(key.clone()), config)
            .expect("behaviour")
        })
        .expect("behaviour")
        .build();
    let topic = IdentTopic::new(ksync_p2p::gossip_topic(a.network()));
    evil.behaviour_mut().subscribe(&topic).expect("subscribe");
    let a_addr: Multiaddr = a.addresses()[0].clone();
    evil.dial(a_addr).expect("dial");

    // Drive the evil swarm until `a` has subscribed, then publish every bad payload.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, evil.select_next_some())
            .await
            .expect("a subscribes in time");
        if let SwarmEvent::Behaviour(gossipsub::Event::Subscribed { peer_id, .. }) = event
            && peer_id == a.local_peer_id()
        {
            break;
        }
    }
    (evil, topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_gossip_is_rejected_and_honest_peers_keep_syncing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    link(&a, &b).await;
    let (mut evil, topic) = evil_joins(&a).await;
    let evil_id = *evil.local_peer_id();
    let payloads = bad_payloads();
    let sent = payloads.len();
    for (what, data) in payloads {
        evil.behaviour_mut()
            .publish(topic.clone(), data)
            .unwrap_or_else(|e| panic!("publishing {what}: {e}"));
    }
    // Keep the connection alive while the honest peers judge; publish more on request.
    let (publish, mut to_publish) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let evil_topic = topic.clone();
    let evil_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(data) = to_publish.recv() => {
                    let _ = evil.behaviour_mut().publish(evil_topic.clone(), data);
                }
                _ = evil.select_next_some() => {}
            }
        }
    });

    // Each rejection costs the sender score; after two it is graylisted and whatever else it
    // sends is dropped unseen, so at least two (not all) reach validation. The message over
    // the transmit limit dies in the codec. None is stored or forwarded.
    wait_until(10, "a rejects the bad messages", || {
        a.stats().rejected_messages >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rejected = a.stats().rejected_messages;
    assert!(rejected as usize <= sent);
    let score = a.peer_score(evil_id).await.expect("score");
    assert!(
        score.is_some_and(|s| s < 0.0),
        "rejections count against the sender, got {score:?}"
    );
    // Graylisted: even a well-formed event from it is now ignored.
    let valid = json!({"v": 1, "events": [
        {"id": "evil-valid", "type": "t", "data": 1, "timestamp": 1, "version": 1}
    ]});
    publish
        .send(valid.to_string().into_bytes())
        .await
        .expect("evil task runs");
    // Honest traffic still flows both ways.
    for n in 0..20 {
        a.broadcast(event("a", n)).await.expect("broadcast");
        b.broadcast(event("b", n)).await.expect("broadcast");
    }
    wait_until(10, "honest peers converge", || {
        keys(&a).len() == 40 && keys(&b) == keys(&a)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in [&a, &b] {
        assert!(
            keys(p).iter().all(|(id, _)| !id.starts_with("evil")),
            "{} stored a bad event",
            p.peer_id()
        );
        assert!(p.stats().accepted_messages + p.stats().catch_up_events > 0);
    }
    assert_eq!(
        b.stats().rejected_messages,
        0,
        "a did not forward bad messages"
    );
    evil_task.abort();
}

/// A gossip batch naming one revision twice with different content is rejected whole: no
/// honest publisher sends it, and every copy would conflict with the stored revision (the
/// storage clones that revision into each conflict).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_naming_one_revision_twice_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let conflicts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&conflicts);
    let _sub = a
        .notifier()
        .on_kind(ksync_core::NotificationKind::Conflict, move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
    let (mut evil, topic) = evil_joins(&a).await;
    let copies: Vec<serde_json::Value> = (0..50)
        .map(|n| json!({"id": "evil-dup", "type": "t", "data": n, "timestamp": 1, "version": 1}))
        .collect();
    let data = json!({"v": 1, "n": copies.len(), "events": copies}).to_string();
    evil.behaviour_mut()
        .publish(topic, data.into_bytes())
        .expect("publish");
    let evil_task = tokio::spawn(async move {
        loop {
            evil.select_next_some().await;
        }
    });
    wait_until(10, "a judges the batch", || {
        a.stats().rejected_messages + a.stats().accepted_messages >= 1
    })
    .await;
    assert_eq!(a.stats().rejected_messages, 1);
    assert!(keys(&a).is_empty(), "nothing of the batch is stored");
    assert_eq!(conflicts.load(std::sync::atomic::Ordering::SeqCst), 0);
    evil_task.abort();
}
