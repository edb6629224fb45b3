//! One host cannot take a node's every connection slot (`max_peers_per_ip`).
//!
//! The attacker is another "host" on loopback: Linux answers all of 127.0.0.0/8 there, and
//! its dials are bound to 127.0.0.3 (libp2p's TCP transport picks no source address: with
//! port reuse it binds 0.0.0.0:<listen port>, so the kernel picks 127.0.0.1), while the kSync
//! peers dial from 127.0.0.1 as usual.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::core::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, SwarmBuilder, Transport, noise, ping, yamux};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::common::*;

/// The attacker's address.
const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// Where `addr` (`/ip4/<ip>/tcp/<port>[/p2p/..]`) points.
fn socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut parts = addr.iter();
    match (parts.next()?, parts.next()?) {
        (Protocol::Ip4(ip), Protocol::Tcp(port)) => Some(SocketAddr::new(ip.into(), port)),
        _ => None,
    }
}

/// TCP that dials from `source` and never listens.
pub(crate) struct BoundTcp {
    pub(crate) source: IpAddr,
}

impl Transport for BoundTcp {
    type Output = libp2p::tcp::tokio::TcpStream;
    type Error = std::io::Error;
    type ListenerUpgrade = futures_util::future::Pending<Result<Self::Output, Self::Error>>;
    type Dial = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn listen_on(
        &mut self,
        _: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        Err(TransportError::MultiaddrNotSupported(addr))
    }

    fn remove_listener(&mut self, _: ListenerId) -> bool {
        false
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let target = socket_addr(&addr).ok_or(TransportError::MultiaddrNotSupported(addr))?;
        let source = self.source;
        Ok(Box::pin(async move {
            Ok(libp2p::tcp::tokio::TcpStream(
                bound_connect(source, target).await?,
            ))
        }))
    }

    fn poll(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Poll::Pending
    }
}

async fn bound_connect(
    source: IpAddr,
    target: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

/// What became of one attacker identity's connection.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The node took it: its ping handler answered.
    Taken,
    /// Denied or failed.
    Refused,
}

/// Connects `count` fresh identities from [`ATTACKER`] to `target`, each in its own task
/// (kept connected until the set is dropped), and returns what became of each. They go in
/// waves well under the node's pending slots (32), as a patient attacker would.
async fn swarm_from_one_host(target: &Multiaddr, count: usize) -> (JoinSet<()>, Vec<Outcome>) {
    const WAVE: usize = 16;
    let (tx, mut rx) = mpsc::channel(count);
    let mut tasks = JoinSet::new();
    let mut outcomes = Vec::new();
    while outcomes.len() < count {
        let wave = WAVE.min(count - outcomes.len());
        for _ in 0..wave {
            let mut swarm = SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_other_transport(|key| {
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                        BoundTcp { source: ATTACKER }
                            .upgrade(Version::V1Lazy)
                            .authenticate(noise::Config::new(key)?)
                            .multiplex(yamux::Config::default())
                            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))),
                    )
                })
                .expect("transport")
                .with_behaviour(|_| ping::Behaviour::default())
                .expect("behaviour")
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
                .build();
            swarm.dial(target.clone()).expect("dial");
            let tx = tx.clone();
            tasks.spawn(async move {
                let mut reported = false;
                loop {
                    let outcome = match swarm.select_next_some().await {
                        // A ping answered: the node runs handlers for this connection.
                        SwarmEvent::Behaviour(ping::Event { result: Ok(_), .. }) => Outcome::Taken,
                        SwarmEvent::ConnectionClosed { .. }
                        | SwarmEvent::OutgoingConnectionError { .. } => Outcome::Refused,
                        _ => continue,
                    };
                    if !reported {
                        reported = true;
                        let _ = tx.send(outcome).await;
                    }
                }
            });
        }
        for _ in 0..wave {
            outcomes.push(rx.recv().await.expect("every attacker reports"));
        }
    }
    (tasks, outcomes)
}

/// One machine opening a connection per fresh identity took all 64 slots (`max_peers`),
/// and the node then refused every honest peer: it synced with the attacker alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_take_every_connection_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = peer(dir.path(), "node").await;
    let target = node.addresses().into_iter().next().expect("listening");

    let (_attacker, outcomes) =
        swarm_from_one_host(&target, ksync_p2p::DEFAULT_MAX_PEERS as usize).await;

    let honest = peer(dir.path(), "honest").await;
    let addr = node.addresses().into_iter().next().expect("listening");
    let connected = honest.connect_to_peer(&addr.to_string()).await;
    assert!(
        connected.is_ok(),
        "an honest peer could not connect while one host held {} connections: {connected:?}",
        outcomes.iter().filter(|o| **o == Outcome::Taken).count()
    );
    wait_until(5, "the node lists the honest peer", || {
        node.connected_peers().contains(&honest.local_peer_id())
    })
    .await;
    let taken = outcomes.iter().filter(|o| **o == Outcome::Taken).count();
    assert_eq!(taken, ksync_p2p::DEFAULT_MAX_PEERS_PER_IP as usize);
}

/// One machine holding handshakes open (TCP connected, nothing sent) took all 32 pending
/// slots: every honest peer's connection was closed as soon as it was accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_hold_every_pending_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = peer(dir.path(), "node").await;
    let addr = node.addresses().into_iter().next().expect("listening");
    let target = socket_addr(&addr).expect("tcp address");
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(bound_connect(ATTACKER, target).await.expect("connect"));
    }

    let honest = peer(dir.path(), "honest").await;
    let connected = honest.connect_to_peer(&addr.to_string()).await;
    assert!(
        connected.is_ok(),
        "an honest peer could not connect while one host held 40 handshakes open: {connected:?}"
    );
    drop(held);
}

/// Loopback is counted like any host (no exemption): a node with `max_peers_per_ip(2)`
/// takes two peers from 127.0.0.1 and refuses a third, both ways, and says why; a peer
/// that leaves gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_counts_peers_on_loopback_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = builder(dir.path(), "node")
        .max_peers_per_ip(2)
        .build()
        .expect("build");
    node.start().await.expect("start");
    let [a, b, c, d] = [
        peer(dir.path(), "a").await,
        peer(dir.path(), "b").await,
        peer(dir.path(), "c").await,
        peer(dir.path(), "d").await,
    ];
    link(&a, &node).await;
    link(&node, &b).await;

    let addr = node.addresses().into_iter().next().expect("listening");
    // The dialer sees its handshake done before the node denies the connection, so its
    // `connect_to_peer` may return; the connection is closed right after.
    let _ = c.connect_to_peer(&addr.to_string()).await;
    wait_until(5, "the node drops the third peer from 127.0.0.1", || {
        c.connected_peers().is_empty()
    })
    .await;
    let addr = d.addresses().into_iter().next().expect("listening");
    let outbound = node.connect_to_peer(&addr.to_string()).await;
    let error = outbound.expect_err("the node dialed a third peer on 127.0.0.1");
    assert!(
        error.to_string().contains("max_peers_per_ip"),
        "the error says why: {error}"
    );
    let mut connected = node.connected_peers();
    connected.sort();
    let mut expected = vec![a.local_peer_id(), b.local_peer_id()];
    expected.sort();
    assert_eq!(connected, expected);

    // A place given back is taken again.
    a.stop().await.expect("stop");
    wait_until(5, "the node sees a gone", || {
        !node.connected_peers().contains(&a.local_peer_id())
    })
    .await;
    link(&c, &node).await;
}

/// A cap of 0 would refuse every peer: `build` refuses it with a config error.
#[test]
fn a_cap_of_zero_is_refused_by_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Err(err) = builder(dir.path(), "node").max_peers_per_ip(0).build() else {
        panic!("max_peers_per_ip(0) was accepted");
    };
    assert!(
        matches!(&err, ksync_p2p::P2PError::Config(reason) if reason.contains("max_peers_per_ip")),
        "{err:?}"
    );
}
