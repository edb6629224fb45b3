//! Kademlia keeps a bounded number of addresses per peer: libp2p-kad's entry takes every
//! address it is given (`Addresses::insert` has no cap), and the node gave it every address
//! a peer announced in identify, so a peer announcing hundreds had all of them kept, handed
//! to every peer that looked it up, and dialed by them.

use crate::common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use ksync_p2p::{DiscoveryMethod, P2PSyncClient};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{PeerId, StreamProtocol, identify, kad};

/// Addresses a peer announces: more than any honest peer listens on.
const ANNOUNCED: usize = 100;
/// Most addresses the node keeps per peer (`node::MAX_KAD_ADDRS`).
const KEPT: usize = 8;

/// A peer of our version that speaks the DHT (a lookup names only peers that answered it).
#[derive(NetworkBehaviour)]
struct Liar {
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

/// The addresses `node`'s DHT answers for `target`, asked as a lookup by a fresh peer; `None`
/// while the answer does not name it.
async fn looked_up(node: &P2PSyncClient, target: PeerId) -> Option<Vec<libp2p::Multiaddr>> {
    let mut prober = raw::swarm(|key| {
        let local = key.public().to_peer_id();
        let config = kad::Config::new(StreamProtocol::new("/ksync/kad/1"));
        kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), config)
    });
    prober
        .behaviour_mut()
        .add_address(&node.local_peer_id(), node.addresses()[0].clone());
    prober.behaviour_mut().get_closest_peers(target);
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(result),
                step,
                ..
            }) = prober.select_next_some().await
            {
                let peers = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                if let Some(info) = peers.into_iter().find(|p| p.peer_id == target) {
                    return Some(info.addrs);
                }
                if step.last {
                    return None;
                }
            }
        }
    })
    .await
    .expect("the lookup ends")
}

/// Node `a`, started, on loopback with DHT discovery and no bootstrap peer; its key under `dir`.
async fn dht_node(dir: &tempfile::TempDir) -> P2PSyncClient {
    let node = P2PSyncClient::builder(
        "a",
        DiscoveryMethod::Dht {
            bootstrap: Vec::new(),
        },
    )
    .listen_host(LOOPBACK)
    .key_dir(dir.path())
    .build()
    .expect("build");
    node.start().await.expect("start");
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_announcing_hundreds_of_addresses_has_a_few_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dht_node(&dir).await;

    // A peer of our version listening on ANNOUNCED ports: identify names them all.
    let mut liar = liar();
    let liar_id = *liar.local_peer_id();
    for _ in 0..ANNOUNCED {
        listen_on_loopback(&mut liar).await;
    }
    liar.dial(a.addresses()[0].clone()).expect("dial");
    let driver = tokio::spawn(async move {
        loop {
            liar.select_next_some().await;
        }
    });
    wait_until(10, "a is connected to the peer", || {
        a.connected_peers().contains(&liar_id)
    })
    .await;

    let mut named = None;
    for _ in 0..50 {
        named = looked_up(&a, liar_id).await.map(|addrs| addrs.len());
        if named.is_some() {
            break;
        }
    }
    let named = named.expect("a's DHT answers with the peer once identify is in");
    assert!(
        (1..=KEPT).contains(&named),
        "a's DHT kept {named} of the {ANNOUNCED} addresses the peer announced"
    );
    driver.abort();
}

/// A peer of our version that speaks the DHT, on no address yet.
fn liar() -> libp2p::Swarm<Liar> {
    raw::swarm(|key| {
        let local = key.public().to_peer_id();
        let config = kad::Config::new(StreamProtocol::new("/ksync/kad/1"));
        let mut kad =
            kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), config);
        kad.set_mode(Some(kad::Mode::Server));
        Liar {
            identify: identify::Behaviour::new(identify::Config::new(
                format!("/ksync/{}/ksync", ksync_core::PROTOCOL_VERSION),
                key.public(),
            )),
            kad,
        }
    })
}

/// The address a node dialed a peer on is kept among the few, whatever the peer announces
/// later: the trim dropped the entry's oldest addresses, and the dialed one was the oldest
/// once the peer announced new ones (here: it listens on 100 more ports and pushes them), so a
/// lookup named only addresses it was never reached on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_a_peer_was_dialed_on_is_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dht_node(&dir).await;
    let a_id = a.local_peer_id();
    let mut liar = liar();
    let liar_id = *liar.local_peer_id();
    let dialed = listen_on_loopback(&mut liar).await;
    let (move_tx, mut move_rx) = tokio::sync::mpsc::channel::<()>(1);
    let driver = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = liar.select_next_some() => {}
                Some(()) = move_rx.recv() => {
                    // New listeners, announced by an identify push.
                    for _ in 0..ANNOUNCED {
                        listen_on_loopback(&mut liar).await;
                    }
                    liar.behaviour_mut().identify.push([a_id]);
                }
            }
        }
    });
    a.connect_to_peer(&format!("{dialed}/p2p/{liar_id}"))
        .await
        .expect("a dials the peer");
    // Kademlia's answer ends each address with the peer's id.
    let with_id = dialed
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(liar_id));
    let mut named = None;
    for _ in 0..50 {
        named = looked_up(&a, liar_id).await;
        if named.is_some() {
            break;
        }
    }
    let first = named.expect("a's DHT answers with the peer once identify is in");
    assert!(first.contains(&with_id), "{first:?}");

    move_tx.send(()).await.expect("driver runs");
    let mut named = Vec::new();
    for _ in 0..100 {
        named = looked_up(&a, liar_id).await.unwrap_or_default();
        if named.iter().any(|addr| !first.contains(addr)) {
            break;
        }
    }
    assert!(
        named.iter().any(|addr| !first.contains(addr)),
        "the announced addresses reach a's DHT: {named:?}"
    );
    assert!(named.len() <= KEPT + 1, "{} addresses kept", named.len());
    assert!(
        named.contains(&with_id),
        "the address a reached the peer on is not among those its DHT names: {named:?}"
    );
    driver.abort();
}
