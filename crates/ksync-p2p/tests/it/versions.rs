//! Peers of another protocol version (docs/PROTOCOL.md, P2P: identify announces
//! `/ksync/1/<network>`, "a peer announcing another is disconnected"): a libp2p peer that
//! announces `/ksync/2/ksync` is hung up on and reported, with both versions named, and
//! refused for a while after: discovery does not dial it again every period.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use ksync_core::{Notification, NotificationKind, Subscription};
use ksync_p2p::{DiscoveryMethod, P2PSyncClient};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{StreamProtocol, identify, kad};

/// What a newer version announces in identify.
const NEWER: &str = "/ksync/2/ksync";

/// The `error` notifications of `p` that name the newer version.
fn version_errors(p: &P2PSyncClient) -> (Arc<std::sync::Mutex<Vec<String>>>, Subscription) {
    let errors = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let e2 = Arc::clone(&errors);
    let sub = p.notifier().on_kind(NotificationKind::Error, move |n| {
        if let Notification::Error(e) = n {
            let e = e.to_string();
            if e.contains(NEWER) {
                e2.lock().expect("lock").push(e);
            }
        }
    });
    (errors, sub)
}

/// A peer of the newer version: identify, and (when `dht`) our DHT protocol, as a newer
/// version that kept it would.
#[derive(NetworkBehaviour)]
struct Newer {
    identify: identify::Behaviour,
    kad: libp2p::swarm::behaviour::toggle::Toggle<kad::Behaviour<kad::store::MemoryStore>>,
}

fn newer(dht: bool) -> libp2p::Swarm<Newer> {
    raw::swarm(|key| {
        let local = key.public().to_peer_id();
        let kad = dht.then(|| {
            let config = kad::Config::new(StreamProtocol::new("/ksync/kad/1"));
            let mut kad =
                kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), config);
            kad.set_mode(Some(kad::Mode::Server));
            kad
        });
        Newer {
            identify: identify::Behaviour::new(identify::Config::new(NEWER.into(), key.public())),
            kad: kad.into(),
        }
    })
}

/// Drives the newer peer until a connection of its closes (or its dial fails).
async fn until_closed(newer: &mut libp2p::Swarm<Newer>) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let SwarmEvent::ConnectionClosed { .. }
            | SwarmEvent::OutgoingConnectionError { .. } = newer.select_next_some().await
            {
                return;
            }
        }
    })
    .await
    .expect("the connection closes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_another_protocol_version_is_disconnected_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let (errors, _sub) = version_errors(&a);
    let mut swarm = newer(false);
    let addr = a.addresses()[0].clone();
    swarm.dial(addr).expect("dial");
    // Ours reads the identify, hangs up and reports it.
    until_closed(&mut swarm).await;
    wait_until(10, "ours lists it no longer", || {
        a.connected_peers().is_empty()
    })
    .await;
    let reported = errors.lock().expect("lock").clone();
    assert!(
        reported
            .iter()
            .any(|e| e.contains("\"/ksync/2/ksync\"") && e.contains("\"/ksync/1/ksync\"")),
        "{reported:?}"
    );
}

/// A newer peer that Kademlia knows (our bootstrap peer here, serving the DHT protocol) is
/// dialed, hung up on and reported once: not dialed again, and not reported again, at every
/// discovery period after (each period's lookup would otherwise reach it anew).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_peer_found_through_the_dht_is_refused_once_not_every_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut newer = newer(true);
    let id = *newer.local_peer_id();
    let addr = listen_on_loopback(&mut newer).await.with(Protocol::P2p(id));
    // Every connection the newer peer sees (it never dials: each is a dial of ours).
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    let driver = tokio::spawn(async move {
        loop {
            if let SwarmEvent::ConnectionEstablished { .. } = newer.select_next_some().await {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let ours = P2PSyncClient::builder(
        "ours",
        DiscoveryMethod::Dht {
            bootstrap: vec![addr],
        },
    )
    .listen_host(LOOPBACK)
    .key_dir(dir.path())
    .anti_entropy_interval(Duration::from_millis(200))
    .build()
    .expect("build");
    let (errors, _sub) = version_errors(&ours);
    ours.start().await.expect("start");
    // An honest peer, so that ours runs a catch-up round each period: the rounds count the
    // periods gone by.
    let honest = peer(dir.path(), "honest").await;
    link(&ours, &honest).await;
    wait_until(10, "the newer peer is reported", || {
        !errors.lock().expect("lock").is_empty()
    })
    .await;
    let from = ours.stats().catch_up_rounds;
    wait_until(30, "ten more periods", || {
        ours.stats().catch_up_rounds >= from + 10
    })
    .await;
    driver.abort();
    let reported = errors.lock().expect("lock").clone();
    assert_eq!(reported.len(), 1, "reported again: {reported:?}");
    assert_eq!(connections.load(Ordering::SeqCst), 1, "dialed again");
    assert!(!ours.connected_peers().contains(&id));
}

/// While refused, the newer peer's own dials are turned away without a report, but a
/// `connect_to_peer` the user asks for still goes through (the peer may have been upgraded):
/// it connects, and is hung up on and reported again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_peer_is_turned_away_unreported_but_connect_to_peer_still_dials_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = peer(dir.path(), "ours").await;
    let (errors, _sub) = version_errors(&ours);
    let mut newer = newer(false);
    let id = *newer.local_peer_id();
    let newer_addr = listen_on_loopback(&mut newer).await.with(Protocol::P2p(id));
    let ours_addr = ours.addresses()[0].clone();
    newer.dial(ours_addr.clone()).expect("dial");
    until_closed(&mut newer).await;
    wait_until(10, "the newer peer is reported", || {
        errors.lock().expect("lock").len() == 1
    })
    .await;
    // Again: ours turns it away before identify, so nothing is reported. (It would have
    // reported before hanging up, so the close orders it.)
    newer.dial(ours_addr).expect("dial");
    until_closed(&mut newer).await;
    let reported = errors.lock().expect("lock").clone();
    assert_eq!(reported.len(), 1, "reported again: {reported:?}");

    // The user asks: dialed all the same.
    let driver = tokio::spawn(async move {
        loop {
            newer.select_next_some().await;
        }
    });
    let connected = ours.connect_to_peer(&newer_addr.to_string()).await;
    assert_eq!(connected.expect("connect_to_peer dials it"), id);
    wait_until(10, "the newer peer is reported again", || {
        errors.lock().expect("lock").len() == 2
    })
    .await;
    driver.abort();
}

/// A refused peer that the user upgraded and connected to again (`connect_to_peer`), and that
/// now announces our version, is refused no longer: when that connection drops, it is let in
/// again at once, not turned away for the rest of the ten minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_peer_that_now_speaks_our_version_is_refused_no_longer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = peer(dir.path(), "ours").await;
    let ours_id = ours.local_peer_id();
    let ours_addr = ours.addresses()[0].clone();
    let (errors, _sub) = version_errors(&ours);
    let key = libp2p::identity::Keypair::generate_ed25519();
    let id = key.public().to_peer_id();
    let mut before_upgrade = raw::swarm_of(key.clone(), |key| Newer {
        identify: identify::Behaviour::new(identify::Config::new(NEWER.into(), key.public())),
        kad: None.into(),
    });
    before_upgrade.dial(ours_addr.clone()).expect("dial");
    until_closed(&mut before_upgrade).await;
    wait_until(10, "the newer peer is reported", || {
        errors.lock().expect("lock").len() == 1
    })
    .await;
    drop(before_upgrade);

    // The same peer, upgraded: it speaks our version now.
    let mut upgraded = raw::swarm_of(key, |key| Newer {
        identify: identify::Behaviour::new(
            identify::Config::new("/ksync/1/ksync".into(), key.public())
                .with_agent_version("ksync-p2p/9.9.9 peer/upgraded".into()),
        ),
        kad: None.into(),
    });
    let upgraded_addr = listen_on_loopback(&mut upgraded)
        .await
        .with(Protocol::P2p(id));
    // Once told: it hangs up on ours (a restart, say) and dials ours again, then says whether
    // ours let it in (its identify came) or turned it away (the connection closed first).
    let (redial, mut redial_asked) = tokio::sync::oneshot::channel::<()>();
    let (let_in_tx, let_in) = tokio::sync::oneshot::channel::<bool>();
    let driver = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = upgraded.select_next_some() => {}
                _ = &mut redial_asked => break,
            }
        }
        let _ = upgraded.disconnect_peer_id(ours_id);
        while upgraded.is_connected(&ours_id) {
            upgraded.select_next_some().await;
        }
        upgraded.dial(ours_addr).expect("dial");
        let outcome = loop {
            match upgraded.select_next_some().await {
                SwarmEvent::Behaviour(NewerEvent::Identify(identify::Event::Received {
                    peer_id,
                    ..
                })) if peer_id == ours_id => break true,
                SwarmEvent::ConnectionClosed { peer_id, .. } if peer_id == ours_id => break false,
                SwarmEvent::OutgoingConnectionError { .. } => break false,
                _ => {}
            }
        };
        let _ = let_in_tx.send(outcome);
        loop {
            upgraded.select_next_some().await;
        }
    });
    let connected = ours.connect_to_peer(&upgraded_addr.to_string()).await;
    assert_eq!(connected.expect("connect_to_peer dials it"), id);
    // Ours has read its identify once it knows the name it announces there.
    tokio::time::timeout(Duration::from_secs(10), async {
        while ours.connect_to_peer("upgraded").await.ok() != Some(id) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("ours reads the upgraded peer's identify");
    redial.send(()).expect("driver");
    let let_in = tokio::time::timeout(Duration::from_secs(10), let_in)
        .await
        .expect("the dial ends one way or the other")
        .expect("driver");
    assert!(let_in, "ours turned the upgraded peer away");
    wait_until(10, "ours lists the upgraded peer again", || {
        ours.connected_peers().contains(&id)
    })
    .await;
    assert_eq!(errors.lock().expect("lock").len(), 1, "reported again");
    driver.abort();
}
