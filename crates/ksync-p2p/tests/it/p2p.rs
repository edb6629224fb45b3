//! Real peers on 127.0.0.1 in one process: broadcast, catch-up, identity, encryption,
//! convergence, and KSync driving the client.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{InMemoryStorage, KSync, Notification, NotificationKind, SyncClient};
use ksync_p2p::{DiscoveryMethod, NetworkKey, P2PError, P2PSyncClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_all_peers_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    let c = peer(dir.path(), "c").await;
    let counters: Vec<_> = [&a, &b, &c].iter().map(|p| EventCounter::new(p)).collect();
    // A line a - b - c plus a - c: gossip has to work over a full mesh.
    link(&a, &b).await;
    link(&b, &c).await;
    link(&c, &a).await;
    let peers = [a.clone(), b.clone(), c.clone()];
    wait_mesh(&peers).await;

    for n in 0..60 {
        let from = &peers[n % 3];
        from.broadcast(event(from.peer_id(), n))
            .await
            .expect("broadcast");
    }
    // Each peer is told about the 40 events the others made.
    for (p, counter) in peers.iter().zip(&counters) {
        wait_until(10, "all events delivered", || counter.distinct() == 40).await;
        assert_eq!(keys(p).len(), 60, "{} holds every event", p.peer_id());
    }
    // More catch-up rounds and gossip duplicates must not deliver anything twice.
    for p in &peers {
        p.sync_now().await.expect("sync");
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    for (p, counter) in peers.iter().zip(&counters) {
        assert_eq!(counter.distinct(), 40);
        assert!(counter.all_once(), "{} saw an event twice", p.peer_id());
        assert_eq!(keys(p).len(), 60);
    }
    let gossip: u64 = peers.iter().map(|p| p.stats().gossip_events).sum();
    assert!(gossip > 0, "live events travelled by gossip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_is_forwarded_along_a_line_in_batches_and_single_events() {
    // a - b - c, no a - c link and no periodic catch-up: c gets a's events only if b
    // forwards them (after its hold for IDONTWANT), batched or one by one.
    let dir = tempfile::tempdir().expect("tempdir");
    let quiet = |name: &str| {
        builder(dir.path(), name)
            .anti_entropy_interval(Duration::from_secs(3600))
            .build()
            .expect("build")
    };
    let (a, b, c) = (
        Arc::new(quiet("a")),
        Arc::new(quiet("b")),
        Arc::new(quiet("c")),
    );
    for p in [&a, &b, &c] {
        p.start().await.expect("start");
    }
    link(&a, &b).await;
    link(&b, &c).await;
    let counter = EventCounter::new(&c);
    // Until b's mesh holds both, a probe may stop at b; send probes until one gets through.
    let mut probes = 0;
    while counter.distinct() == 0 {
        assert!(probes < 50, "no probe reached c through b");
        a.broadcast(event("probe", probes)).await.expect("probe");
        probes += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = keys(&c).len();
    let caught_up_before = c.stats().catch_up_events;
    // A burst (packed into batches) and then single events, spaced so each goes alone.
    for n in 0..500 {
        a.broadcast(event("a", n)).await.expect("broadcast");
    }
    for n in 500..510 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        a.broadcast(event("a", n)).await.expect("broadcast");
    }
    wait_until(10, "c has every event through b", || {
        keys(&c).len() == before + 510
    })
    .await;
    assert_eq!(
        c.stats().catch_up_events,
        caught_up_before,
        "all of it came by gossip"
    );
    assert!(
        a.stats().published_messages < a.stats().published_events,
        "the burst went out in batches: {:?}",
        a.stats()
    );
    wait_until(5, "c notified of all", || {
        counter.distinct() == before + 510
    })
    .await;
    assert!(counter.all_once());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_peer_catches_up_on_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    let c = peer(dir.path(), "c").await;
    link(&a, &b).await;
    link(&b, &c).await;
    // Events made while the late peer does not exist, some before the others even met.
    for n in 0..1500 {
        let from = [&a, &b, &c][n % 3];
        from.broadcast(event(from.peer_id(), n))
            .await
            .expect("broadcast");
    }
    let late = peer(dir.path(), "late").await;
    let counter = EventCounter::new(&late);
    // It meets only one peer; everything else arrives through it.
    link(&late, &c).await;
    wait_until(15, "late peer has all 1500", || keys(&late).len() == 1500).await;
    // Notifications follow the store by a moment.
    wait_until(5, "late peer notified of all 1500", || {
        counter.distinct() == 1500
    })
    .await;
    assert!(counter.all_once());
    assert!(late.stats().catch_up_events >= 1500 - late.stats().gossip_events);
    for p in [&a, &b, &c] {
        wait_until(15, "everyone converges", || keys(p) == keys(&late)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_key_dir_keeps_the_peer_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let other = peer(dir.path(), "other").await;
    let first = builder(dir.path(), "stable").build().expect("build");
    first.start().await.expect("start");
    let id = first.local_peer_id();
    let port = first.listen_addrs()[0]
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("tcp port");
    first.stop().await.expect("stop");
    drop(first);

    let again = builder(dir.path(), "stable")
        .port(port)
        .build()
        .expect("rebuild");
    assert_eq!(again.local_peer_id(), id, "same key file, same PeerId");
    again.start().await.expect("restart on the same port");
    // The address others knew (peer id included) still reaches it.
    let old_addr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{id}");
    assert_eq!(
        other
            .connect_to_peer(&old_addr)
            .await
            .expect("dial old address"),
        id
    );
    // Another name gets another identity.
    let stranger = builder(dir.path(), "stranger").build().expect("build");
    assert_ne!(stranger.local_peer_id(), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_network_refuses_peers_without_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = NetworkKey::generate();
    let private = |name: &str, key: NetworkKey| {
        builder(dir.path(), name)
            .encryption(true)
            .network_key(key)
            .connect_timeout(Duration::from_secs(3))
            .build()
            .expect("build")
    };
    let a = Arc::new(private("a", key));
    let b = Arc::new(private("b", key));
    let wrong = Arc::new(private("wrong", NetworkKey::generate()));
    let open = Arc::new(builder(dir.path(), "open").build().expect("build"));
    for p in [&a, &b, &wrong, &open] {
        p.start().await.expect("start");
    }
    link(&a, &b).await;
    a.broadcast(event("a", 1)).await.expect("broadcast");
    wait_until(10, "b gets the event", || keys(&b).len() == 1).await;

    let a_addr = a.addresses()[0].to_string();
    for outsider in [&wrong, &open] {
        let err = outsider
            .connect_to_peer(&a_addr)
            .await
            .expect_err("outsider must not connect");
        assert!(
            matches!(err, P2PError::Dial { .. } | P2PError::Timeout(_)),
            "unexpected error {err:?}"
        );
        // And the other way round.
        assert!(
            a.connect_to_peer(&outsider.addresses()[0].to_string())
                .await
                .is_err()
        );
    }
    a.broadcast(event("a", 2)).await.expect("broadcast");
    wait_until(10, "b gets the second event", || keys(&b).len() == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for outsider in [&wrong, &open] {
        assert!(outsider.connected_peers().is_empty());
        assert!(keys(outsider).is_empty(), "an outsider learned events");
    }
    assert_eq!(a.connected_peers(), vec![b.local_peer_id()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_another_network_are_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let other = builder(dir.path(), "other")
        .network("elsewhere")
        .build()
        .expect("build");
    other.start().await.expect("start");
    a.broadcast(event("a", 1)).await.expect("broadcast");
    // Whichever side reads the other's identify first reports it and hangs up.
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let _subs: Vec<_> = [&a.notifier(), &other.notifier()]
        .into_iter()
        .map(|n| {
            let errors = Arc::clone(&errors);
            n.on_kind(NotificationKind::Error, move |e| {
                if let Notification::Error(e) = e {
                    errors.lock().expect("lock").push(e.to_string());
                }
            })
        })
        .collect();
    // The TCP + Noise connection comes up, identify then tells them apart.
    let _ = other.connect_to_peer(&a.addresses()[0].to_string()).await;
    wait_until(10, "dropped", || {
        other.connected_peers().is_empty() && a.connected_peers().is_empty()
    })
    .await;
    wait_until(5, "an error notification names the other network", || {
        errors
            .lock()
            .expect("lock")
            .iter()
            .any(|e| e.contains("/ksync/1/elsewhere"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(keys(&other).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_broadcasts_disconnects_and_late_joins_converge() {
    for seed in [7u64, 1234] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = StdRng::seed_from_u64(seed);
        let names = ["p0", "p1", "p2", "p3"];
        let peers: Vec<Arc<P2PSyncClient>> = names
            .iter()
            .map(|n| Arc::new(builder(dir.path(), n).build().expect("build")))
            .collect();
        let mut running = [false; 4];
        for i in 0..2 {
            peers[i].start().await.expect("start");
            running[i] = true;
        }
        link(&peers[0], &peers[1]).await;
        let mut made = 0usize;
        for step in 0..40 {
            let i = rng.random_range(0..4);
            match rng.random_range(0..10) {
                // Mostly broadcasts, from any peer (a stopped one stores and waits).
                0..=6 => {
                    let p = &peers[i];
                    let result = p.broadcast(event(p.peer_id(), step)).await;
                    assert!(result.is_ok() || matches!(result, Err(P2PError::NotStarted)));
                    made += 1;
                }
                7 if running[i] && running.iter().filter(|r| **r).count() > 1 => {
                    peers[i].stop().await.expect("stop");
                    running[i] = false;
                }
                _ if !running[i] => {
                    peers[i].start().await.expect("start");
                    running[i] = true;
                    let others: Vec<usize> = (0..4).filter(|&j| j != i && running[j]).collect();
                    if !others.is_empty() {
                        let j = others[rng.random_range(0..others.len())];
                        link(&peers[i], &peers[j]).await;
                    }
                }
                _ => {}
            }
        }
        // Everyone comes back and meets at least one running peer.
        for i in 0..4 {
            if !running[i] {
                peers[i].start().await.expect("start");
                running[i] = true;
            }
        }
        for i in 1..4 {
            link(&peers[i], &peers[rng.random_range(0..i)]).await;
        }
        for p in &peers {
            let p = Arc::clone(p);
            let all = peers.clone();
            wait_until(20, "convergence", move || {
                let mine = keys(&p);
                mine.len() == made && all.iter().all(|q| keys(q) == mine)
            })
            .await;
        }
        for p in &peers {
            p.stop().await.expect("stop");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ksync_drives_a_p2p_client_as_in_the_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let make = |name: &str| Arc::new(builder(dir.path(), name).build().expect("build"));
    let client_a = make("peer-a");
    let client_b = make("peer-b");
    // As the spec writes it: no replica id given, the client's `peerId` is the replica's.
    let ka = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::clone(&client_a))
        .build()
        .await
        .expect("ksync a");
    let kb = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::clone(&client_b))
        .build()
        .await
        .expect("ksync b");
    assert_eq!(ka.replica().id(), "peer-a");
    assert_eq!(kb.replica().id(), "peer-b");
    let mut connected = ka.notifications();
    // Emitted before start: stored, sent when peers meet.
    let early = ka
        .emit("peer_event", serde_json::json!({"data": "before start"}))
        .await
        .expect("emit");
    ka.start().await.expect("start a");
    assert!(connected.next_of(NotificationKind::Connected).await.is_ok());
    kb.start().await.expect("start b");
    let mut at_b = kb.notifications();
    client_b
        .connect_to_peer(&client_a.addresses()[0].to_string())
        .await
        .expect("connect");
    let a_id = client_a.local_peer_id().to_string();
    match tokio::time::timeout(
        Duration::from_secs(5),
        at_b.next_of(NotificationKind::PeerConnected),
    )
    .await
    {
        Ok(Ok(Notification::PeerConnected(peer))) => assert_eq!(peer, a_id),
        other => panic!("expected peer-connected, got {other:?}"),
    }
    let live = ka
        .emit("peer_event", serde_json::json!({"data": "hello peers"}))
        .await
        .expect("emit");
    assert_eq!(live.origin.as_deref(), Some("peer-a"));
    wait_until(10, "b has both events", || {
        kb.state().map(|s| s.len() == 2).unwrap_or(false)
    })
    .await;
    let state = kb.state().expect("state");
    assert_eq!(state[&early.id].data, early.data);
    assert_eq!(state[&live.id].data, live.data);
    assert!(at_b.next_of(NotificationKind::Event).await.is_ok());
    assert!(at_b.next_of(NotificationKind::Sync).await.is_ok());
    // b's own emit reaches a.
    let reply = kb
        .emit("reply", serde_json::json!("hi a"))
        .await
        .expect("emit");
    wait_until(10, "a has b's reply", || {
        ka.state()
            .map(|s| s.contains_key(&reply.id))
            .unwrap_or(false)
    })
    .await;
    ka.disconnect().await.expect("disconnect");
    assert!(client_a.connected_peers().is_empty());
    match tokio::time::timeout(
        Duration::from_secs(5),
        at_b.next_of(NotificationKind::PeerDisconnected),
    )
    .await
    {
        Ok(Ok(Notification::PeerDisconnected(peer))) => assert_eq!(peer, a_id),
        other => panic!("expected peer-disconnected, got {other:?}"),
    }
    assert!(matches!(
        client_a
            .send(ksync_core::Event::new("x", "t", serde_json::json!(1), 1))
            .await,
        Err(ksync_core::SyncError::NotConnected)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_bootstrap_and_lookup_find_peers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dht = |name: &str, bootstrap: Vec<ksync_p2p::Multiaddr>| {
        P2PSyncClient::builder(name, DiscoveryMethod::Dht { bootstrap })
            .listen_host(LOOPBACK)
            .key_dir(dir.path())
            .anti_entropy_interval(Duration::from_millis(400))
            .build()
            .expect("build")
    };
    let boot = Arc::new(dht("boot", vec![]));
    boot.start().await.expect("start");
    let boot_addr = boot.addresses()[0].clone();
    let b = Arc::new(dht("b", vec![boot_addr.clone()]));
    let c = Arc::new(dht("c", vec![boot_addr.clone()]));
    b.start().await.expect("start");
    c.start().await.expect("start");
    {
        let boot = Arc::clone(&boot);
        wait_until(10, "bootstrap peer knows b and c", move || {
            boot.connected_peers().len() == 2
        })
        .await;
    }
    // d knows only the bootstrap peer; Kademlia finds b and c for it.
    let d = Arc::new(dht("d", vec![boot_addr]));
    d.start().await.expect("start");
    let found = d
        .connect_to_peer(&c.local_peer_id().to_string())
        .await
        .expect("lookup and dial c by peer id");
    assert_eq!(found, c.local_peer_id());
    {
        let (d, b_id) = (Arc::clone(&d), b.local_peer_id());
        wait_until(10, "d discovers b through the DHT", move || {
            d.connected_peers().contains(&b_id)
        })
        .await;
    }
    b.broadcast(event("b", 1)).await.expect("broadcast");
    wait_until(10, "d gets b's event", || keys(&d).len() == 1).await;
    // An id nobody has is not found.
    let nobody = libp2p::PeerId::random();
    assert!(d.connect_to_peer(&nobody.to_string()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_invalid_local_events_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = builder(dir.path(), "a")
        .max_event_bytes(1024)
        .build()
        .expect("build");
    let big = ksync_core::Event::new("big", "t", serde_json::json!("x".repeat(2000)), 1);
    assert!(matches!(
        a.broadcast(big).await,
        Err(P2PError::EventTooLarge { .. })
    ));
    let bad = ksync_core::Event::new("", "t", serde_json::json!(1), 1);
    assert!(matches!(
        a.broadcast(bad).await,
        Err(P2PError::InvalidEvent(_))
    ));
    assert!(keys(&a).is_empty(), "refused events are not stored");
    // Before start: stored, and the caller is told it is not sent yet.
    assert!(matches!(
        a.broadcast(event("a", 1)).await,
        Err(P2PError::NotStarted)
    ));
    assert_eq!(keys(&a).len(), 1);
}

/// The port of a TCP multiaddr.
fn tcp_port(addr: &ksync_p2p::Multiaddr) -> u16 {
    addr.iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("a TCP address")
}

/// Our dials leave from a new local port, not the listening one (a simultaneous dial between
/// two peers from their listen ports would merge into one TCP connection that fails Noise).
/// The remote end is a raw libp2p swarm, which reports where the connection came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_peer_dials_from_a_new_port() {
    use futures_util::StreamExt;
    use libp2p::core::ConnectedPoint;
    use libp2p::swarm::SwarmEvent;

    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let mut remote = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| libp2p::swarm::dummy::Behaviour)
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(10)))
        .build();
    let remote_addr = listen_on_loopback(&mut remote).await;
    let a_id = a.local_peer_id();
    let seen_from = tokio::spawn(async move {
        loop {
            if let SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint: ConnectedPoint::Listener { send_back_addr, .. },
                ..
            } = remote.select_next_some().await
                && peer_id == a_id
            {
                return send_back_addr;
            }
        }
    });
    a.connect_to_peer(&remote_addr.to_string())
        .await
        .expect("connect");
    let seen_from = tokio::time::timeout(Duration::from_secs(10), seen_from)
        .await
        .expect("the remote sees the connection in time")
        .expect("remote task");
    let listen_port = tcp_port(&a.listen_addrs()[0]);
    assert_ne!(
        tcp_port(&seen_from),
        listen_port,
        "the dial left from the listen port"
    );
}

/// The spec's `metrics`: every `metrics_interval`, the events published and taken in per
/// second, the bytes per second (gossip and catch-up) and the mean ping round trip to the
/// peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_notified_every_interval() {
    use std::sync::Mutex;

    let dir = tempfile::tempdir().expect("tempdir");
    let metered = |name: &str| {
        builder(dir.path(), name)
            .metrics_interval(Duration::from_millis(200))
            .debug(true)
            .build()
            .expect("build")
    };
    let a = Arc::new(metered("a"));
    let b = Arc::new(metered("b"));
    let seen: Arc<Mutex<Vec<ksync_core::Metrics>>> = Arc::default();
    let _sub = {
        let seen = Arc::clone(&seen);
        b.on(
            "metrics",
            Box::new(move |n: &Notification| {
                if let Notification::Metrics(m) = n {
                    seen.lock().expect("lock").push(*m);
                }
            }),
        )
        .expect("on")
    };
    a.start().await.expect("start");
    b.start().await.expect("start");
    link(&a, &b).await;
    wait_mesh(&[a.clone(), b.clone()]).await;
    for n in 0..20 {
        a.broadcast(event(a.peer_id(), n)).await.expect("broadcast");
    }
    wait_until(10, "b has a's events", || keys(&b).len() == 20).await;
    let any = |f: fn(&ksync_core::Metrics) -> bool| seen.lock().expect("lock").iter().any(f);
    wait_until(10, "metrics with the events", || {
        any(|m| m.events_per_second > 0.0)
    })
    .await;
    wait_until(10, "metrics with a ping", || {
        any(|m| m.average_latency > 0.0)
    })
    .await;
    // The events moved bytes whether they came by gossip or (before the gossip mesh formed,
    // on a busy machine) by catch-up: both count.
    wait_until(10, "metrics with bytes", || {
        any(|m| m.bandwidth_usage > 0.0)
    })
    .await;
    let bad = builder(dir.path(), "c")
        .metrics_interval(Duration::ZERO)
        .build()
        .expect_err("a zero interval is refused");
    assert!(bad.to_string().contains("metrics_interval"), "{bad}");
    // Past a day is refused too: far past it, the node's first tick overflowed and its task
    // panicked, leaving a client that did nothing.
    let huge = Duration::from_secs(u64::MAX);
    let past_a_day = ksync_p2p::MAX_CONFIG_DURATION + Duration::from_secs(1);
    for (field, bad) in [
        (
            "anti_entropy_interval",
            builder(dir.path(), "d").anti_entropy_interval(huge).build(),
        ),
        (
            "metrics_interval",
            builder(dir.path(), "e")
                .metrics_interval(past_a_day)
                .build(),
        ),
    ] {
        let bad = bad.expect_err("past a day is refused");
        assert!(
            bad.to_string().contains(field) && bad.to_string().contains("at most 86400 s"),
            "{bad}"
        );
    }
}

/// Catch-up traffic counts in `metrics` bandwidth: a peer that gets a known amount of data by
/// catch-up alone (stored at the source before the two meet, never broadcast, so nothing is
/// gossiped) reports at least that many bytes moved, and so does the source that served it.
///
/// No assumption on timing: each report is bytes over the node's own period, and the periods
/// up to a report span no more than from before the node started to when the test read that
/// report. So the highest rate reported, times that span, is at least the bytes moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_bytes_count_in_metrics_bandwidth() {
    use std::sync::Mutex;
    use std::time::Instant;

    const EVENTS: usize = 64;
    const BLOB: usize = 8 * 1024;
    const INTERVAL: Duration = Duration::from_millis(200);
    type Seen = Arc<Mutex<Vec<(ksync_core::Metrics, Instant)>>>;

    let dir = tempfile::tempdir().expect("tempdir");
    let metered = |name: &str| {
        builder(dir.path(), name)
            .metrics_interval(INTERVAL)
            .build()
            .expect("build")
    };
    let source = Arc::new(metered("source"));
    let late = Arc::new(metered("late"));
    let record = |p: &P2PSyncClient| {
        let seen: Seen = Arc::default();
        let sink = Arc::clone(&seen);
        // Handlers run on the node's task as it reports, so the receipt time follows the
        // end of the period at once.
        let sub = p
            .on(
                "metrics",
                Box::new(move |n: &Notification| {
                    if let Notification::Metrics(m) = n {
                        sink.lock().expect("lock").push((*m, Instant::now()));
                    }
                }),
            )
            .expect("on");
        (seen, sub)
    };
    let (source_seen, _source_sub) = record(&source);
    let (late_seen, _late_sub) = record(&late);

    // Before either node starts, so before either one's first period.
    let began = Instant::now();
    source.start().await.expect("start");
    late.start().await.expect("start");
    // Each event's data holds BLOB bytes of text: any encoding of it carries them.
    let events: Vec<_> = (0..EVENTS)
        .map(|n| {
            ksync_core::Event::new(
                format!("blob-{n}"),
                "test",
                serde_json::json!({ "blob": "x".repeat(BLOB) }),
                1_700_000_000_000 + n as u64,
            )
        })
        .collect();
    source
        .replica()
        .storage()
        .append(events)
        .await
        .expect("append");
    link(&late, &source).await;
    wait_until(15, "late peer caught up", || keys(&late).len() == EVENTS).await;
    let caught_up = Instant::now();
    assert_eq!(late.stats().gossip_events, 0, "nothing came by gossip");

    let moved = (EVENTS * BLOB) as f64;
    for (who, seen) in [("late", &late_seen), ("source", &source_seen)] {
        // Every catch-up byte was counted before the late peer stored the events. The first
        // report read after that may still close a period that ended before; the second
        // closes one that ended after.
        wait_until(10, "two reports after the catch-up", || {
            let seen = seen.lock().expect("lock");
            seen.iter().filter(|(_, at)| *at > caught_up).count() >= 2
        })
        .await;
        let seen = seen.lock().expect("lock");
        let last = seen
            .iter()
            .filter(|(_, at)| *at > caught_up)
            .nth(1)
            .map(|(_, at)| *at)
            .expect("two reports");
        let reports: Vec<_> = seen.iter().filter(|(_, at)| *at <= last).collect();
        let highest = reports
            .iter()
            .map(|(m, _)| m.bandwidth_usage)
            .fold(0.0, f64::max);
        // A period shorter than 1 ms is counted as 1 ms: allow that much per report.
        let span = (last - began).as_secs_f64() + reports.len() as f64 * 1e-3;
        assert!(
            highest * span >= moved,
            "{who}: highest bandwidth {highest} B/s over {span} s is under the {moved} bytes caught up"
        );
    }
}

/// A storage that already has a replica id keeps it under a P2P client with another `peerId`:
/// the events it made carry that id, and must stay its own (to be sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_keeps_its_replica_id_under_a_new_peer_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage: Arc<dyn ksync_core::Storage> = Arc::new(InMemoryStorage::new());
    let first = ksync_testkit::ksync_over(
        Arc::clone(&storage),
        builder(dir.path(), "first").build().expect("build"),
    )
    .await
    .expect("ksync");
    let made = first
        .emit("note", serde_json::json!({"n": 1}))
        .await
        .expect("emit");
    assert_eq!(made.origin.as_deref(), Some("first"));
    drop(first);
    let again = ksync_testkit::ksync_over(
        storage,
        builder(dir.path(), "renamed").build().expect("build"),
    )
    .await
    .expect("ksync");
    assert_eq!(again.replica().id(), "first");
}
