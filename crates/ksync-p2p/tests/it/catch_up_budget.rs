//! The budget for catch-up answers in flight (`max_catch_up_answer_bytes`): answers a
//! requester does not read hold their events until `request_timeout`, 8 per connection, so
//! without a budget a few peers that never read made a node hold gigabytes. One peer's answers
//! hold at most an eighth of it, and so do one host's (all its peer ids together; one answer
//! always goes to a peer with none in flight whose host is under two shares): over a share a
//! request is answered `Refused { busy: true }`, and the asker asks again in a later round
//! and loses nothing. Before the peer's share, one peer that never read took the whole budget
//! and every other peer was answered busy; before the host's, one host did so with 8 peer ids.

use crate::common;
use crate::per_host::BoundTcp;

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::raw::{Request, Response, next_answer, swarm};
use common::*;
use futures_util::{AsyncRead, AsyncReadExt, AsyncWrite, StreamExt};
use ksync_core::{Event, RevisionKey};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::upgrade::Version;
use libp2p::request_response::{self, ProtocolSupport, cbor};
use libp2p::{PeerId, StreamProtocol, SwarmBuilder, Transport, noise, yamux};
use serde_json::json;
use tokio::sync::mpsc;

type Cbor = cbor::codec::Codec<Request, Response>;

/// The CBOR codec, except that an answer is never read: its first byte is, to tell the test
/// that the node has built it and is sending it, and then the stream stalls (the node's
/// write blocks once the stream's window is full, and the answer stays in flight).
#[derive(Clone)]
struct Stalling {
    inner: Cbor,
    started: mpsc::UnboundedSender<()>,
}

impl request_response::Codec for Stalling {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Request> {
        self.inner.read_request(p, io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Response> {
        let mut first = [0u8; 1];
        io.read_exact(&mut first).await?;
        let _ = self.started.send(());
        std::future::pending().await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
        r: Request,
    ) -> io::Result<()> {
        self.inner.write_request(p, io, r).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        p: &StreamProtocol,
        io: &mut T,
        r: Response,
    ) -> io::Result<()> {
        self.inner.write_response(p, io, r).await
    }
}

fn fetch(keys: &[&Event]) -> Request {
    Request::Fetch {
        network: "ksync".into(),
        keys: keys
            .iter()
            .map(|e| RevisionKey {
                id: e.id.clone(),
                version: e.version,
            })
            .collect(),
    }
}

/// A peer that asks `node` for `keys` `requests` times at once (on as many streams) and never
/// reads the answers; returns once the node has started sending all of them. Dropping the
/// task's handle (abort) closes the connection.
async fn stalled_fetches(
    node: PeerId,
    addr: libp2p::Multiaddr,
    keys: &[&Event],
    requests: usize,
) -> tokio::task::JoinHandle<()> {
    let (started, mut told) = mpsc::unbounded_channel();
    let mut staller = swarm(|_| {
        request_response::Behaviour::with_codec(
            Stalling {
                inner: Cbor::default(),
                started,
            },
            [(StreamProtocol::new("/ksync/sync/1"), ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
        )
    });
    staller.add_peer_address(node, addr);
    for _ in 0..requests {
        staller.behaviour_mut().send_request(&node, fetch(keys));
    }
    let task = tokio::spawn(async move {
        loop {
            staller.select_next_some().await;
        }
    });
    for _ in 0..requests {
        tokio::time::timeout(Duration::from_secs(10), told.recv())
            .await
            .expect("the node starts sending its answer")
            .expect("the staller runs");
    }
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_cannot_make_another_peers_request_busy() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Six events of ~300 KB; a budget of 2 MiB (a peer's share: 256 KiB, so one event).
    let a = builder(dir.path(), "a")
        .max_event_bytes(1024 * 1024)
        .max_catch_up_answer_bytes(2 * 1024 * 1024)
        .build()
        .expect("build");
    let events: Vec<Event> = (0..6)
        .map(|i| Event::new(format!("e{i}"), "t", json!("x".repeat(300_000)), 1))
        .collect();
    a.replica()
        .storage()
        .append(events.clone())
        .await
        .expect("append");
    a.start().await.expect("start");
    let a_id = a.local_peer_id();
    let a_addr = a.addresses().into_iter().next().expect("listening");

    // A peer asks for everything on four streams and never reads: its first answer carries
    // one event (its share of the budget; one always goes), the other three are busy. It
    // took the whole budget before (1.8 MB in its first answer).
    let staller =
        stalled_fetches(a_id, a_addr.clone(), &events.iter().collect::<Vec<_>>(), 4).await;
    assert_eq!(
        a.stats().busy_answers,
        3,
        "the staller's answers over its share"
    );

    // A peer on another host is answered with the events, not busy (peers of one host share
    // its share, see the next test).
    let mut asker = raw_peer_on_another_host();
    asker.add_peer_address(a_id, a_addr.clone());
    let id = asker
        .behaviour_mut()
        .send_request(&a_id, fetch(&[&events[5]]));
    let (_, answer) = tokio::time::timeout(
        Duration::from_secs(10),
        next_answer(&mut asker, |r| *r == id),
    )
    .await
    .expect("answered");
    match answer {
        Ok(Response::Events { events: got, .. }) => {
            assert_eq!(got.len(), 1, "the event asked for");
            assert_eq!(got[0].id, events[5].id);
        }
        other => panic!("another peer's request while one peer stalls: {other:?}"),
    }
    assert_eq!(a.stats().busy_answers, 3, "no other peer was answered busy");
    staller.abort();
    let _ = staller.await;
}

/// A raw peer like `raw_peer`, but on another host: its dials are bound to 127.0.0.2 (see
/// `per_host::BoundTcp`).
fn raw_peer_on_another_host() -> common::raw::RawSwarm {
    SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|key| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                BoundTcp {
                    source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
                }
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))),
            )
        })
        .expect("transport")
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                Cbor::default(),
                [(StreamProtocol::new("/ksync/sync/1"), ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_with_many_peer_ids_cannot_take_the_budget_from_another_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One event of ~300 KB (over a share of the 2 MiB budget, 256 KiB, and over the stream's
    // window, so an answer carrying it stalls), and two small ones.
    let a = builder(dir.path(), "a")
        .max_event_bytes(1024 * 1024)
        .max_catch_up_answer_bytes(2 * 1024 * 1024)
        .build()
        .expect("build");
    let big = Event::new("big", "t", json!("x".repeat(300_000)), 1);
    let small: Vec<Event> = (0..2)
        .map(|i| Event::new(format!("s{i}"), "t", json!(i), 1))
        .collect();
    let mut all = vec![big.clone()];
    all.extend(small.iter().cloned());
    a.replica().storage().append(all).await.expect("append");
    a.start().await.expect("start");
    let a_id = a.local_peer_id();
    let a_addr = a.addresses().into_iter().next().expect("listening");

    // Eight peer ids from 127.0.0.1 (max_peers_per_ip) each ask for the big event and never
    // read. The first two are answered, the rest busy: a peer with none in flight gets one
    // answer while its host holds under two shares, each answer counted at most at a share
    // there (so one id that does not read cannot keep its host's other peers waiting; before,
    // only the first was answered and every other peer of the host was busy for as long as it
    // held its answer). Before the host's share, each id was idle and got its answer: 2.4 MB
    // in flight, the whole budget.
    let mut stallers = Vec::new();
    for _ in 0..8 {
        stallers.push(stalled_fetches(a_id, a_addr.clone(), &[&big], 1).await);
    }
    let busy = a.stats().busy_answers;

    // A peer on another host is answered in full: both events it asked for (one was cut
    // off before: nothing was left of the budget).
    let mut asker = raw_peer_on_another_host();
    asker.add_peer_address(a_id, a_addr);
    let id = asker
        .behaviour_mut()
        .send_request(&a_id, fetch(&small.iter().collect::<Vec<_>>()));
    let (_, answer) = tokio::time::timeout(
        Duration::from_secs(10),
        next_answer(&mut asker, |r| *r == id),
    )
    .await
    .expect("answered");
    match answer {
        Ok(Response::Events { events: got, .. }) => {
            let ids: Vec<&str> = got.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(ids, ["s0", "s1"], "both events asked for");
        }
        other => panic!("another host's request while one host stalls: {other:?}"),
    }
    assert_eq!(
        busy, 6,
        "the host's other peer ids are busy while its first two hold two shares"
    );
    assert_eq!(
        a.stats().busy_answers,
        busy,
        "the other host was not answered busy"
    );
    for staller in stallers {
        staller.abort();
        let _ = staller.await;
    }
}
