//! Helpers shared by the P2P integration tests: peers on 127.0.0.1:0 with their keys in a
//! temporary directory.

#![allow(dead_code)]

pub mod raw;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ksync_core::{Event, Notification, NotificationKind, Subscription};
use ksync_p2p::{DiscoveryMethod, P2PSyncClient, P2PSyncClientBuilder};
use serde_json::json;

pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A builder for a manual-discovery peer on loopback with a short catch-up period.
pub fn builder(dir: &Path, name: &str) -> P2PSyncClientBuilder {
    P2PSyncClient::builder(name, DiscoveryMethod::Manual)
        .listen_host(LOOPBACK)
        .key_dir(dir)
        .anti_entropy_interval(Duration::from_millis(400))
        .connect_timeout(Duration::from_secs(5))
}

/// A started manual peer.
pub async fn peer(dir: &Path, name: &str) -> Arc<P2PSyncClient> {
    let client = builder(dir, name).build().expect("build");
    client.start().await.expect("start");
    Arc::new(client)
}

/// Connects `from` to `to` by its full address.
pub async fn link(from: &P2PSyncClient, to: &P2PSyncClient) {
    let addr = to.addresses().into_iter().next().expect("listening");
    let peer = from
        .connect_to_peer(&addr.to_string())
        .await
        .expect("connect");
    assert_eq!(peer, to.local_peer_id());
}

/// The TCP port `p` listens on (its first listen address), to start it again there.
pub fn port_of(p: &P2PSyncClient) -> u16 {
    p.listen_addrs()[0]
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("tcp port")
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `secs` seconds.
pub async fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every peer sees every other as connected.
pub async fn wait_mesh(peers: &[Arc<P2PSyncClient>]) {
    for p in peers {
        let others: Vec<_> = peers
            .iter()
            .filter(|q| q.local_peer_id() != p.local_peer_id())
            .map(|q| q.local_peer_id())
            .collect();
        let p2 = Arc::clone(p);
        wait_until(10, "full mesh", move || {
            let c = p2.connected_peers();
            others.iter().all(|o| c.contains(o))
        })
        .await;
    }
}

/// An event with a unique id.
pub fn event(origin: &str, n: usize) -> Event {
    Event::new(
        format!("{origin}-{n}"),
        "test",
        json!({ "n": n, "from": origin }),
        1_700_000_000_000 + n as u64,
    )
    .with_origin(origin)
}

/// The `(id, version)` set of a peer's log.
pub fn keys(p: &P2PSyncClient) -> BTreeSet<(String, u64)> {
    p.replica()
        .storage()
        .read_since(0, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|s| (s.event.id, s.event.version))
        .collect()
}

/// Counts `event` notifications per `(id, version)`.
pub struct EventCounter {
    pub counts: Arc<Mutex<HashMap<(String, u64), usize>>>,
    _sub: Subscription,
}

impl EventCounter {
    pub fn new(p: &P2PSyncClient) -> Self {
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let c = Arc::clone(&counts);
        let sub = p.notifier().on_kind(NotificationKind::Event, move |n| {
            if let Notification::Event(e) = n {
                *c.lock()
                    .expect("lock")
                    .entry((e.id.clone(), e.version))
                    .or_insert(0) += 1;
            }
        });
        Self { counts, _sub: sub }
    }

    pub fn distinct(&self) -> usize {
        self.counts.lock().expect("lock").len()
    }

    pub fn all_once(&self) -> bool {
        self.counts.lock().expect("lock").values().all(|&n| n == 1)
    }
}

/// Starts `swarm` listening on 127.0.0.1:0 and returns its address (without `/p2p/`).
pub async fn listen_on_loopback<B: libp2p::swarm::NetworkBehaviour>(
    swarm: &mut libp2p::Swarm<B>,
) -> libp2p::Multiaddr {
    use futures_util::StreamExt;
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
        .expect("listen");
    loop {
        if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
            swarm.select_next_some().await
        {
            return address;
        }
    }
}
