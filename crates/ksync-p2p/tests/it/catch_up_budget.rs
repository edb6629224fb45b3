//! The node-wide budget for catch-up answers in flight (`max_catch_up_answer_bytes`): answers
//! a requester does not read hold their events until `request_timeout`, 8 per connection, so
//! without a budget a few peers that never read made a node hold gigabytes. Over the budget a
//! request is answered `Refused { busy: true }`; the asker asks again in a later round and
//! loses nothing.

use crate::common;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use common::raw::{Request, Response, next_answer, raw_peer, swarm};
use common::*;
use futures_util::{AsyncRead, AsyncReadExt, AsyncWrite, StreamExt};
use ksync_core::{Event, RevisionKey};
use libp2p::request_response::{self, ProtocolSupport, cbor};
use libp2p::{PeerId, StreamProtocol};
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

/// A peer that asks `node` for `keys` and never reads the answer; returns once the node has
/// started sending it. Dropping the task's handle (abort) closes the connection.
async fn stalled_fetch(
    node: PeerId,
    addr: libp2p::Multiaddr,
    keys: &[&Event],
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
    staller.behaviour_mut().send_request(&node, fetch(keys));
    let task = tokio::spawn(async move {
        loop {
            staller.select_next_some().await;
        }
    });
    tokio::time::timeout(Duration::from_secs(10), told.recv())
        .await
        .expect("the node starts sending its answer")
        .expect("the staller runs");
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_over_the_node_wide_budget_are_busy_and_the_asker_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Three events of ~700 KB; a budget of 2 MiB holds two of them in flight.
    let a = builder(dir.path(), "a")
        .max_event_bytes(1024 * 1024)
        .max_catch_up_answer_bytes(2 * 1024 * 1024)
        .build()
        .expect("build");
    let events: Vec<Event> = (0..3)
        .map(|i| Event::new(format!("e{i}"), "t", json!("x".repeat(700_000)), 1))
        .collect();
    a.replica()
        .storage()
        .append(events.clone())
        .await
        .expect("append");
    a.start().await.expect("start");
    let a_id = a.local_peer_id();
    let a_addr = a.addresses().into_iter().next().expect("listening");

    // A peer that never reads takes two events' worth of the budget (the third does not fit
    // its answer and is left out for room, as ever).
    let staller = stalled_fetch(a_id, a_addr.clone(), &events.iter().collect::<Vec<_>>()).await;

    // Another peer's request for the third finds the budget spent: busy, not the events and
    // not an empty answer (which would read as "nothing to send").
    let (mut asker, _) = raw_peer().await;
    asker.add_peer_address(a_id, a_addr.clone());
    let id = asker
        .behaviour_mut()
        .send_request(&a_id, fetch(&[&events[2]]));
    let (_, answer) = tokio::time::timeout(
        Duration::from_secs(10),
        next_answer(&mut asker, |r| *r == id),
    )
    .await
    .expect("answered");
    match answer {
        Ok(Response::Refused { busy: true, .. }) => {}
        Ok(Response::Events { events, .. }) => panic!(
            "expected a busy refusal while the budget is spent, got {} events",
            events.len()
        ),
        other => panic!("expected a busy refusal while the budget is spent, got {other:?}"),
    }
    assert_eq!(a.stats().busy_answers, 1);

    // A kSync peer meeting it meanwhile is answered busy too, is not told it misbehaved, and
    // once the budget is free its next round takes everything.
    let late = Arc::new(
        builder(dir.path(), "late")
            .max_event_bytes(1024 * 1024)
            .anti_entropy_interval(Duration::from_secs(3600))
            .build()
            .expect("build"),
    );
    late.start().await.expect("start");
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let e = Arc::clone(&errors);
    let _sub = late
        .notifier()
        .on_kind(ksync_core::NotificationKind::Error, move |n| {
            e.lock().expect("lock").push(format!("{n:?}"));
        });
    link(&late, &a).await;
    wait_until(10, "the late peer's fetch is answered busy", || {
        a.stats().busy_answers >= 2
    })
    .await;
    assert!(keys(&late).len() < 3, "nothing over the budget was sent");

    staller.abort();
    let _ = staller.await;
    wait_until(
        10,
        "the late peer catches up once the budget is free",
        || {
            if keys(&late).len() < 3 {
                let late = Arc::clone(&late);
                tokio::spawn(async move { late.sync_now().await });
                return false;
            }
            true
        },
    )
    .await;
    assert!(
        errors.lock().expect("lock").is_empty(),
        "a busy answer is no error: {:?}",
        errors.lock().expect("lock")
    );
}
