//! WebSocketSyncClient against an in-process relay.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use ksync_core::{
    Direction, Event, Filter, InMemoryStorage, KSync, Notification, NotificationKind, Status,
    Storage, SyncClient, SyncError,
};
use ksync_ws::server::RelayConfig;
use ksync_ws::{Strategy, WebSocketSyncClient, WsError};
use serde_json::json;
use tokio_tungstenite::tungstenite::{self, Message};

async fn ksync(url: &str) -> KSync<WebSocketSyncClient> {
    let client = WebSocketSyncClient::builder(url).build().expect("client");
    ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync")
}

/// The next `event` notification, or `Err` after `wait`.
async fn next_event(
    seen: &mut ksync_core::NotificationStream,
    wait: Duration,
) -> Result<Event, tokio::time::error::Elapsed> {
    tokio::time::timeout(wait, async {
        loop {
            if let Notification::Event(e) =
                seen.next_of(NotificationKind::Event).await.expect("event")
            {
                break e;
            }
        }
    })
    .await
}

/// A relay and two connected replicas on its default room, with the second's notifications
/// watched: `(server, first, second, second's notifications)`.
async fn connected_pair() -> (
    Server,
    KSync<WebSocketSyncClient>,
    KSync<WebSocketSyncClient>,
    ksync_core::NotificationStream,
) {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let first = ksync(&url).await;
    let second = ksync(&url).await;
    let seen = second.notifications();
    first.connect().await.expect("first connects");
    second.connect().await.expect("second connects");
    (server, first, second, seen)
}

#[tokio::test]
async fn spec_complete_example_two_replicas_converge() {
    let (server, a, b, mut b_events) = connected_pair().await;
    let sent = a
        .emit(
            "user_action",
            json!({"action": "click", "button": "submit"}),
        )
        .await
        .expect("emit");
    let got = next_event(&mut b_events, Duration::from_secs(5))
        .await
        .expect("b receives the event");
    assert_eq!(got, sent);
    // Received events are stored before the notification.
    assert!(
        b.replica()
            .storage()
            .get(&sent.id, 1)
            .expect("get")
            .is_some()
    );
    let storage = a.replica().storage().clone();
    eventually("a's ack cursor", || {
        a.replica().pending(0, 10).map(|p| p.len()).unwrap_or(0) == 1 && storage.len() == 1
    })
    .await;
    a.disconnect().await.expect("disconnect");
    b.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn an_attached_client_forwards_another_replicas_event_with_its_origin() {
    // The bridge: a KSync whose client is handed events made elsewhere (e.g. a P2P peer).
    let (server, bridge, reader, mut seen) = connected_pair().await;
    let relayed = Event::new("from-p2p", "note", json!({"n": 1}), 7).with_origin("peer-p");
    bridge
        .client()
        .send(relayed.clone())
        .await
        .expect("forward");
    let got = next_event(&mut seen, Duration::from_secs(5))
        .await
        .expect("the forwarded event reaches the reader");
    assert_eq!(got, relayed, "same event, origin kept");
    // What the reader made reaches the bridge, which does not send it back as its own.
    let back = reader.emit("reply", json!(2)).await.expect("emit");
    let bridge_storage = Arc::clone(bridge.replica().storage());
    eventually("the reply at the bridge", || {
        bridge_storage.get(&back.id, 1).ok().flatten().is_some()
    })
    .await;
    let pending: Vec<_> = bridge
        .replica()
        .pending(0, 10)
        .expect("pending")
        .into_iter()
        .map(|s| s.event.id)
        .collect();
    assert_eq!(pending, ["from-p2p"]);
    bridge.disconnect().await.expect("disconnect");
    reader.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn forwarding_an_event_the_client_already_scanned_past_still_sends_it() {
    let (server, bridge, reader, mut seen) = connected_pair().await;
    // Stored by another transport sharing this storage (e.g. P2P): not pending here.
    let arrived = Event::new("arrived", "note", json!(1), 5).with_origin("peer-p");
    bridge
        .replica()
        .ingest(vec![arrived.clone()])
        .await
        .expect("ingest");
    // A local event after it: the client's scan moves past `arrived`.
    let mine = bridge.emit("mine", json!(2)).await.expect("emit");
    assert_eq!(
        next_event(&mut seen, Duration::from_secs(5))
            .await
            .expect("local event"),
        mine
    );
    // Now handed over: the client looks again behind its scan position and sends it.
    bridge
        .client()
        .send(arrived.clone())
        .await
        .expect("forward");
    assert_eq!(
        next_event(&mut seen, Duration::from_secs(5))
            .await
            .expect("the forwarded event"),
        arrived
    );
    bridge.disconnect().await.expect("disconnect");
    reader.disconnect().await.expect("disconnect");
    server.stop().await;
}

async fn ksync_with(client: WebSocketSyncClient) -> KSync<WebSocketSyncClient> {
    ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync")
}

/// Reads `events` frames from a raw observer until `n` events arrived; returns frame sizes
/// and the events.
async fn observe(ws: &mut Raw, n: usize) -> (Vec<usize>, Vec<serde_json::Value>) {
    let mut sizes = Vec::new();
    let mut events = Vec::new();
    while events.len() < n {
        let frame = recv_json(ws).await;
        assert_eq!(frame["type"], "events", "{frame}");
        let batch = frame["events"].as_array().expect("events").clone();
        sizes.push(batch.len());
        events.extend(batch.into_iter().map(|s| s["event"].clone()));
    }
    (sizes, events)
}

#[tokio::test]
async fn offline_emits_go_out_on_connect_in_batches_of_batch_size() {
    // One publish per commit, so the observer sees each publish as its own frame.
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.max_batch_events = 1;
        relay_config
    })
    .await;
    let url = server.url(None);
    let (mut observer, _) = join(&url, hello()).await;
    let a = ksync_with(
        WebSocketSyncClient::builder(&url)
            .strategy(Strategy::EventLevel { batch_size: 2 })
            .build()
            .expect("client"),
    )
    .await;
    let mut emitted = Vec::new();
    for i in 0..5 {
        emitted.push(
            a.emit("offline", json!({"i": i}))
                .await
                .expect("stored while offline"),
        );
    }
    assert_eq!(a.replica().pending(0, 10).expect("pending").len(), 5);
    a.connect().await.expect("connect");
    let (sizes, events) = observe(&mut observer, 5).await;
    assert_eq!(sizes, vec![2, 2, 1]);
    let ids: Vec<_> = events
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        ids,
        emitted.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        "in emit order"
    );
    a.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn batch_strategy_sends_when_full_or_when_the_interval_ends() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.max_batch_events = 1;
        relay_config
    })
    .await;
    let url = server.url(None);
    let (mut observer, _) = join(&url, hello()).await;
    let client = WebSocketSyncClient::builder(&url)
        .strategy(Strategy::Batch {
            batch_size: 3,
            batch_interval: Duration::from_millis(400),
        })
        .build()
        .expect("client");
    client.connect().await.expect("connect");
    for i in 0..3 {
        client
            .send(Event::new(format!("b{i}"), "t", json!(i), 1))
            .await
            .expect("send");
    }
    let (sizes, _) = observe(&mut observer, 3).await;
    assert_eq!(sizes, vec![3], "a full batch goes out as one message");
    client
        .send(Event::new("lonely", "t", json!(1), 1))
        .await
        .expect("send");
    let (sizes, events) = observe(&mut observer, 1).await;
    assert_eq!(sizes, vec![1]);
    assert_eq!(
        events[0]["id"], "lonely",
        "a partial batch goes out at the interval"
    );
    client.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn state_based_starts_from_the_snapshot_and_sends_only_latest_versions() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let (mut publisher, _) = join(&url, hello()).await;
    let mut x2 = event("x", 2);
    x2["version"] = json!(2);
    send_json(
        &mut publisher,
        json!({"type":"publish","ref":1,"events":[event("x",1), x2, event("y",3)]}),
    )
    .await;
    recv_json(&mut publisher).await;
    let a = ksync_with(
        WebSocketSyncClient::builder(&url)
            .strategy(Strategy::StateBased {
                snapshot_interval: Duration::from_millis(300),
            })
            .build()
            .expect("client"),
    )
    .await;
    let rec = Recorder::attach(a.client().as_ref());
    a.connect().await.expect("connect");
    eventually("snapshot received", || rec.events().len() == 2).await;
    let mut got: Vec<_> = rec
        .events()
        .into_iter()
        .map(|e| (e.id, e.version))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![("x".to_owned(), 2), ("y".to_owned(), 1)],
        "state, not history"
    );
    assert_eq!(a.replica().storage().len(), 2);
    // Three quick revisions of z go out as one: the latest.
    a.update("z", "t", json!(1)).await.expect("v1");
    a.update("z", "t", json!(2)).await.expect("v2");
    a.update("z", "t", json!(3)).await.expect("v3");
    let (sizes, events) = observe(&mut publisher, 1).await;
    assert_eq!(sizes, vec![1]);
    assert_eq!(
        (events[0]["id"].as_str(), events[0]["version"].as_u64()),
        (Some("z"), Some(3))
    );
    a.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn filter_and_middleware_apply_in_both_directions() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let (mut observer, _) = join(&url, hello()).await;
    let a = WebSocketSyncClient::builder(&url)
        .filter(Filter::PublicOnly)
        .build()
        .expect("a");
    a.use_middleware(Direction::Outgoing, |mut e: Event| {
        e.data["stamped"] = json!(true);
        Some(e)
    });
    let b = ksync_with(
        WebSocketSyncClient::builder(&url)
            .filter(Filter::predicate(|e: &Event| e.event_type != "noise"))
            .build()
            .expect("b"),
    )
    .await;
    b.client()
        .use_middleware(Direction::Incoming, |mut e: Event| {
            e.data["seen_by_b"] = json!(true);
            Some(e)
        });
    let rec = Recorder::attach(b.client().as_ref());
    a.connect().await.expect("a");
    b.connect().await.expect("b");
    a.send(Event::new("secret", "t", json!({"private": true}), 1))
        .await
        .expect("send");
    a.send(Event::new("open", "t", json!({"private": false}), 2))
        .await
        .expect("send");
    let (_, events) = observe(&mut observer, 1).await;
    assert_eq!(
        events[0]["id"], "open",
        "public-only kept the private event home"
    );
    assert_eq!(
        events[0]["data"],
        json!({"private": false, "stamped": true})
    );
    // b filters incoming "noise" and transforms what it keeps, before storing.
    send_json(
        &mut observer,
        json!({"type":"publish","ref":1,"events":[
        {"id":"n","type":"noise","data":{},"timestamp":1,"version":1},
        {"id":"s","type":"signal","data":{},"timestamp":2,"version":1}]}),
    )
    .await;
    eventually("b got open and s", || rec.events().len() == 2).await;
    let ids: Vec<_> = rec.events().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["open", "s"]);
    let stored = b
        .replica()
        .storage()
        .get("s", 1)
        .expect("get")
        .expect("stored");
    assert_eq!(stored.event.data, json!({"seen_by_b": true}));
    assert!(b.replica().storage().get("n", 1).expect("get").is_none());
    a.disconnect().await.expect("a");
    b.disconnect().await.expect("b");
    server.stop().await;
}

/// One data frame a [`Tap`] forwarded: its direction, whether it was a binary (deflated)
/// frame, its size on the wire and its JSON (inflated first; `None` if it did not decode).
#[derive(Debug, Clone)]
struct TapFrame {
    up: bool,
    binary: bool,
    wire_bytes: usize,
    json: Option<serde_json::Value>,
}

impl TapFrame {
    fn kind(&self) -> Option<&str> {
        self.json.as_ref()?.get("type")?.as_str()
    }

    /// Whether this is a `publish` (up) or `events` batch (down) holding the event `id`.
    fn carries(&self, id: &str) -> bool {
        matches!(self.kind(), Some("publish" | "events"))
            && self.json.as_ref().is_some_and(|json| {
                json["events"].as_array().is_some_and(|events| {
                    // `events` batches wrap each event as {seq, event}.
                    events
                        .iter()
                        .any(|e| e["id"] == id || e["event"]["id"] == id)
                })
            })
    }
}

/// A WebSocket proxy on 127.0.0.1:0 in front of one room of a relay (every connection goes to
/// that room's URL) that records every data frame it forwards, so a test sees what the client
/// and the relay really put on the wire.
struct Tap {
    addr: std::net::SocketAddr,
    frames: Arc<Mutex<Vec<TapFrame>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    async fn start(upstream: String) -> Tap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let frames = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&frames);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(Tap::relay_one(tcp, upstream.clone(), Arc::clone(&log)));
            }
        });
        Tap { addr, frames, task }
    }

    async fn relay_one(
        tcp: tokio::net::TcpStream,
        upstream: String,
        log: Arc<Mutex<Vec<TapFrame>>>,
    ) {
        let Ok(client) = tokio_tungstenite::accept_async(tcp).await else {
            return;
        };
        let Ok((upstream, _)) = tokio_tungstenite::connect_async(upstream.as_str()).await else {
            return;
        };
        let (client_tx, client_rx) = client.split();
        let (upstream_tx, upstream_rx) = upstream.split();
        // Either side closing ends both.
        tokio::select! {
            () = Tap::forward(client_rx, upstream_tx, true, Arc::clone(&log)) => {}
            () = Tap::forward(upstream_rx, client_tx, false, log) => {}
        }
    }

    async fn forward<R, W>(mut from: R, mut to: W, up: bool, log: Arc<Mutex<Vec<TapFrame>>>)
    where
        R: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
        W: futures_util::Sink<Message> + Unpin,
    {
        while let Some(Ok(message)) = from.next().await {
            let json = match &message {
                Message::Text(t) => serde_json::from_str(t.as_str()).ok(),
                Message::Binary(b) => ksync_ws::protocol::inflate(b, 1 << 24)
                    .ok()
                    .and_then(|json| serde_json::from_slice(&json).ok()),
                // Each hop answers pings itself; only data and closes go through.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                Message::Close(_) => {
                    let _ = to.send(message).await;
                    return;
                }
            };
            log.lock().expect("lock").push(TapFrame {
                up,
                binary: message.is_binary(),
                wire_bytes: message.len(),
                json,
            });
            if to.send(message).await.is_err() {
                return;
            }
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn frames(&self) -> Vec<TapFrame> {
        self.frames.lock().expect("lock").clone()
    }

    /// The first frame going `up` (or down) that is of `kind`.
    fn first(&self, up: bool, kind: &str) -> TapFrame {
        self.frames()
            .into_iter()
            .find(|f| f.up == up && f.kind() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} frame went {}", if up { "up" } else { "down" }))
    }

    /// The frame going `up` (or down) that carried event `id`.
    fn carrying(&self, up: bool, id: &str) -> TapFrame {
        let found: Vec<_> = self
            .frames()
            .into_iter()
            .filter(|f| f.up == up && f.carries(id))
            .collect();
        assert_eq!(found.len(), 1, "frames carrying {id} (up: {up}): {found:?}");
        found.into_iter().next().expect("one frame")
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn compression_deflates_big_batches_at_the_wire_both_ways_and_is_off_by_default() {
    let server = start(RelayConfig::default()).await;
    // Each client talks to the relay through its own tap.
    let zipped_tap = Tap::start(server.url(Some("zip"))).await;
    let plain_tap = Tap::start(server.url(Some("zip"))).await;
    let zipped = WebSocketSyncClient::builder(zipped_tap.url())
        .compression(true)
        .build()
        .expect("zipped");
    let plain = WebSocketSyncClient::builder(plain_tap.url())
        .build()
        .expect("plain");
    let rz = Recorder::attach(&zipped);
    let rp = Recorder::attach(&plain);
    zipped.connect().await.expect("connect");
    plain.connect().await.expect("connect");

    // The compressing client asks, and the relay agrees; the default client does not ask.
    assert_eq!(
        zipped_tap.first(true, "hello").json.expect("json")["compression"],
        true
    );
    let welcome = zipped_tap.first(false, "welcome");
    assert!(!welcome.binary);
    assert_eq!(welcome.json.expect("json")["compression"], true);
    let plain_hello = plain_tap.first(true, "hello").json.expect("json");
    assert_ne!(
        plain_hello.get("compression"),
        Some(&json!(true)),
        "{plain_hello}"
    );
    assert_eq!(
        plain_tap.first(false, "welcome").json.expect("json")["compression"],
        false
    );

    // One event each way below the threshold, then one far above it, each received before
    // the next is sent so every batch holds one event.
    let small = json!({"text": "short"});
    let big = json!({"text": "compressible ".repeat(2000)});
    let exchanges = [
        (&plain, "p-small", &small, &rz),
        (&zipped, "z-small", &small, &rp),
        (&plain, "p-big", &big, &rz),
        (&zipped, "z-big", &big, &rp),
    ];
    for (n, (from, id, data, to)) in exchanges.into_iter().enumerate() {
        from.send(Event::new(id, "t", data.clone(), 1))
            .await
            .expect("send");
        eventually("the other client got it", || to.events().len() > n / 2).await;
        assert_eq!(
            to.events().last().map(|e| (e.id.clone(), e.data.clone())),
            Some((id.to_owned(), data.clone()))
        );
    }

    // The compressing client's link: big batches are deflated binary frames both ways (and
    // smaller than their JSON), small ones stay text.
    for (up, id) in [(true, "z-big"), (false, "p-big")] {
        let frame = zipped_tap.carrying(up, id);
        let json_len = frame.json.as_ref().map_or(0, |j| j.to_string().len());
        assert!(frame.binary, "{id} (up: {up}) went as text");
        assert!(
            json_len >= ksync_ws::protocol::DEFLATE_MIN_BYTES,
            "{json_len}"
        );
        assert!(
            frame.wire_bytes * 10 < json_len,
            "{} bytes for {json_len} of JSON",
            frame.wire_bytes
        );
    }
    for (up, id) in [(true, "z-small"), (false, "p-small")] {
        assert!(
            !zipped_tap.carrying(up, id).binary,
            "{id} (up: {up}) went deflated"
        );
    }
    // The default client's link: the same big batches, as text only.
    assert!(!plain_tap.carrying(true, "p-big").binary);
    assert!(!plain_tap.carrying(false, "z-big").binary);
    let binary: Vec<_> = plain_tap
        .frames()
        .into_iter()
        .filter(|f| f.binary)
        .collect();
    assert!(binary.is_empty(), "{binary:?}");
    zipped.disconnect().await.expect("disconnect");
    plain.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn notifications_connected_status_event_sync_metrics_disconnected() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let a = WebSocketSyncClient::builder(&url)
        .metrics_interval(Duration::from_millis(100))
        .build()
        .expect("a");
    let b = WebSocketSyncClient::builder(&url).build().expect("b");
    let ra = Recorder::attach(&a);
    let rb = Recorder::attach(&b);
    a.connect().await.expect("a");
    b.connect().await.expect("b");
    assert!(a.is_connected());
    assert_eq!(ra.count(|n| matches!(n, Notification::Connected)), 1);
    a.send(Event::new("m1", "t", json!(1), 1))
        .await
        .expect("send");
    a.send(Event::new("m2", "t", json!(2), 1))
        .await
        .expect("send");
    eventually("b got both", || rb.events().len() == 2).await;
    assert!(rb.count(|n| matches!(n, Notification::Sync(events) if !events.is_empty())) >= 1);
    eventually("a's outbox drained", || a.outbox_len() == 0).await;
    eventually("a reported metrics with a latency", || {
        ra.count(|n| matches!(n, Notification::Metrics(m) if m.average_latency > 0.0 && m.events_per_second > 0.0 && m.bandwidth_usage > 0.0)) >= 1
    })
    .await;
    let statuses = ra.statuses();
    assert_eq!(statuses.first(), Some(&Status::Connected));
    assert!(statuses.contains(&Status::Syncing), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&Status::Idle), "{statuses:?}");
    a.disconnect().await.expect("disconnect");
    assert!(!a.is_connected());
    assert_eq!(ra.count(|n| matches!(n, Notification::Disconnected)), 1);
    assert_eq!(ra.count(|n| matches!(n, Notification::Error(_))), 0);
    b.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// The events of each `sync` notification a recorder saw, as `(id, data)`, in order.
fn syncs(rec: &Recorder) -> Vec<Vec<(String, serde_json::Value)>> {
    rec.all()
        .into_iter()
        .filter_map(|n| match n {
            Notification::Sync(events) => {
                Some(events.into_iter().map(|e| (e.id, e.data)).collect())
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn sync_is_notified_for_each_acknowledged_send_and_each_received_batch() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("synced"));
    // `a` keeps a replica and stamps what it publishes; `b` is standalone.
    let a = ksync_with(WebSocketSyncClient::builder(&url).build().expect("a")).await;
    a.client()
        .use_middleware(Direction::Outgoing, |mut e: Event| {
            e.data["stamped"] = json!(true);
            Some(e)
        });
    let b = WebSocketSyncClient::builder(&url).build().expect("b");
    let ra = Recorder::attach(a.client().as_ref());
    let rb = Recorder::attach(&b);
    a.connect().await.expect("a");
    b.connect().await.expect("b");

    // Acknowledged (stored): the sender's `sync` has the event as the application made it;
    // the receiver's has the received batch, as it arrived.
    let sent = a.emit("note", json!({"n": 1})).await.expect("emit");
    eventually("a's ack gave a sync", || !syncs(&ra).is_empty()).await;
    assert_eq!(syncs(&ra), vec![vec![(sent.id.clone(), json!({"n": 1}))]]);
    eventually("b's batch gave a sync", || !syncs(&rb).is_empty()).await;
    assert_eq!(
        syncs(&rb),
        vec![vec![(sent.id.clone(), json!({"n": 1, "stamped": true}))]]
    );

    // Acknowledged as a duplicate: the room holds it, so it is synced too.
    let mine = Event::new("mine", "t", json!("b's"), 1);
    b.send(mine.clone()).await.expect("send");
    eventually("b's first ack", || syncs(&rb).len() == 2).await;
    b.send(mine.clone()).await.expect("send again");
    eventually("b's duplicate ack", || syncs(&rb).len() == 3).await;
    // A conflict is not on the server: no `sync` for its ack (the next send's ack, answered
    // after it, shows the conflict's ack was handled).
    b.send(Event::new(sent.id.clone(), "note", json!("other"), 1))
        .await
        .expect("send conflicting");
    b.send(Event::new("last", "t", json!("end"), 1))
        .await
        .expect("send");
    eventually("b's last ack", || {
        syncs(&rb)
            .last()
            .and_then(|s| s.first())
            .is_some_and(|(id, _)| id == "last")
    })
    .await;
    let one = |id: &str, data: serde_json::Value| vec![(id.to_owned(), data)];
    assert_eq!(
        syncs(&rb)[1..],
        [
            one("mine", json!("b's")),
            one("mine", json!("b's")),
            one("last", json!("end"))
        ]
    );
    assert_eq!(
        rb.count(|n| matches!(n, Notification::Conflict(c) if c.theirs.id == sent.id)),
        1,
        "the conflict was reported: {:?}",
        rb.all()
    );
    // `a` got b's two stored events as received batches (the duplicate stored nothing new).
    eventually("a received b's events", || syncs(&ra).len() == 3).await;
    assert_eq!(
        syncs(&ra)[1..],
        [one("mine", json!("b's")), one("last", json!("end"))]
    );
    a.disconnect().await.expect("a");
    b.disconnect().await.expect("b");
    server.stop().await;
}

#[test]
fn heartbeat_defaults_to_the_specs_30000_ms() {
    let default = WebSocketSyncClient::new("ws://127.0.0.1:9/ws").expect("client");
    assert_eq!(default.heartbeat(), Duration::from_millis(30_000));
    let tuned = WebSocketSyncClient::builder("ws://127.0.0.1:9/ws")
        .heartbeat(Duration::from_millis(1_500))
        .build()
        .expect("client");
    assert_eq!(tuned.heartbeat(), Duration::from_millis(1_500));
}

#[tokio::test]
async fn standalone_outbox_is_bounded_and_refuses_the_newest() {
    let client = WebSocketSyncClient::builder("ws://127.0.0.1:9/ws")
        .outbox_capacity(2)
        .build()
        .expect("client");
    client
        .send(Event::new("1", "t", json!(1), 1))
        .await
        .expect("queued");
    client
        .send(Event::new("2", "t", json!(2), 1))
        .await
        .expect("queued");
    let error = client
        .send(Event::new("3", "t", json!(3), 1))
        .await
        .expect_err("full");
    assert!(matches!(
        WsError::find(&error),
        Some(WsError::OutboxFull { capacity: 2 })
    ));
    assert_eq!(client.outbox_len(), 2);
}

#[tokio::test]
async fn bad_urls_and_options_are_refused_at_build() {
    for url in ["http://x", "not a url", "ftp://secure.example/ws"] {
        let err = WebSocketSyncClient::builder(url).build().expect_err(url);
        assert!(
            matches!(WsError::find(&err), Some(WsError::InvalidUrl { .. })),
            "{url}: {err}"
        );
    }
    let err = WebSocketSyncClient::builder("ws://h")
        .strategy(Strategy::EventLevel { batch_size: 0 })
        .build()
        .expect_err("zero batch");
    assert!(matches!(err, SyncError::Config(_)));
    let err = WebSocketSyncClient::builder("ws://h")
        .heartbeat(Duration::ZERO)
        .build()
        .expect_err("zero");
    assert!(matches!(err, SyncError::Config(_)));
}

/// Every timer of the builder is refused past a day, naming it: far past it (e.g.
/// `Duration::MAX`) `build` and `connect` succeeded, then the session task panicked adding the
/// timer to `Instant::now()`, and the client stayed "connected" relaying nothing.
#[tokio::test]
async fn client_timers_past_a_day_are_refused_at_build() {
    use ksync_core::MAX_CONFIG_DURATION;
    use ksync_ws::WebSocketSyncClientBuilder;

    type Set = fn(WebSocketSyncClientBuilder, Duration) -> WebSocketSyncClientBuilder;
    let timers: [(&str, Set); 8] = [
        ("heartbeat", |b, d| b.heartbeat(d)),
        ("heartbeat_timeout", |b, d| b.heartbeat_timeout(d)),
        ("connect_timeout", |b, d| b.connect_timeout(d)),
        ("metrics_interval", |b, d| b.metrics_interval(d)),
        ("batch_interval", |b, d| {
            b.strategy(Strategy::Batch {
                batch_size: 10,
                batch_interval: d,
            })
        }),
        ("snapshot_interval", |b, d| {
            b.strategy(Strategy::StateBased {
                snapshot_interval: d,
            })
        }),
        // Both bounds: a min past a day is past the max too.
        ("reconnect_delay", |b, d| b.reconnect_delay(d, d)),
        ("reconnect_delay", |b, d| {
            b.reconnect_delay(Duration::from_secs(1), d)
        }),
    ];
    for (field, set) in timers {
        for bad in [MAX_CONFIG_DURATION + Duration::from_secs(1), Duration::MAX] {
            let error = set(WebSocketSyncClient::builder("ws://127.0.0.1:9/ws"), bad)
                .build()
                .expect_err(field);
            assert!(matches!(error, SyncError::Config(_)), "{field}: {error}");
            assert!(
                error.to_string().contains(field) && error.to_string().contains("86400 s"),
                "{field}: {error}"
            );
        }
        set(
            WebSocketSyncClient::builder("ws://127.0.0.1:9/ws"),
            MAX_CONFIG_DURATION,
        )
        .build()
        .unwrap_or_else(|e| panic!("{field}: a day refused: {e}"));
    }
}

#[tokio::test]
async fn server_restart_mid_stream_loses_nothing_and_duplicates_nothing() {
    let provider: Arc<dyn ksync_core::StorageProvider> =
        Arc::new(ksync_core::InMemoryProvider::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = serve_on(
        listener,
        RelayConfig::default(),
        provider.clone(),
        Arc::new(ksync_core::AllowAll),
    );
    let url = server.url(Some("restart"));
    let build = || {
        WebSocketSyncClient::builder(&url)
            .reconnect_delay(Duration::from_millis(20), Duration::from_millis(200))
            .build()
            .expect("client")
    };
    let a = ksync_with(build()).await;
    let b = ksync_with(build()).await;
    let ra = Recorder::attach(a.client().as_ref());
    let rb = Recorder::attach(b.client().as_ref());
    a.connect().await.expect("a");
    b.connect().await.expect("b");
    for i in 0..20 {
        a.emit("before", json!(i)).await.expect("emit");
        b.emit("before-b", json!(i)).await.expect("emit");
    }
    server.stop().await;
    eventually("both saw the disconnect", || {
        ra.count(|n| matches!(n, Notification::Disconnected)) == 1
            && rb.count(|n| matches!(n, Notification::Disconnected)) == 1
    })
    .await;
    // Emitted while the server is down: stored, pending.
    for i in 0..20 {
        a.emit("during", json!(i)).await.expect("emit");
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("same port");
    let server = serve_on(
        listener,
        RelayConfig::default(),
        provider.clone(),
        Arc::new(ksync_core::AllowAll),
    );
    eventually("everyone has all 60", || {
        a.replica().storage().len() == 60 && b.replica().storage().len() == 60
    })
    .await;
    assert!(ra.count(|n| matches!(n, Notification::Reconnecting { .. })) >= 1);
    assert!(ra.count(|n| matches!(n, Notification::Connected)) >= 2);
    let room = provider
        .existing(&ksync_core::LogName::Room(
            ksync_core::Name::new("restart").expect("name"),
        ))
        .expect("ok")
        .expect("room");
    eventually("room has all 60", || room.len() == 60).await;
    // Same revisions everywhere, each once; each event notified to the other side once.
    let ids = |s: &dyn Storage| {
        let mut v: Vec<_> = s
            .read_since(0, 1000)
            .expect("read")
            .into_iter()
            .map(|s| s.event.key())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ids(a.replica().storage().as_ref()), ids(room.as_ref()));
    assert_eq!(ids(b.replica().storage().as_ref()), ids(room.as_ref()));
    let mut seen: Vec<_> = rb.events().into_iter().map(|e| e.id).collect();
    assert_eq!(
        seen.len(),
        40,
        "b is told about each of a's 40 events exactly once"
    );
    seen.dedup();
    assert_eq!(seen.len(), 40);
    a.disconnect().await.expect("a");
    b.disconnect().await.expect("b");
    server.stop().await;
}

#[tokio::test]
async fn without_reconnect_the_client_stays_down() {
    let server = start(RelayConfig::default()).await;
    let client = WebSocketSyncClient::builder(server.url(None))
        .reconnect(false)
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    server.stop().await;
    eventually("disconnected", || {
        rec.count(|n| matches!(n, Notification::Disconnected)) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rec.count(|n| matches!(n, Notification::Reconnecting { .. })),
        0
    );
    assert!(!client.is_connected());
    // The server said why: going away.
    assert!(rec.all().iter().any(|n| matches!(n, Notification::Error(e) if matches!(WsError::find(e), Some(WsError::Closed { code: 1001, .. })))));
}

#[tokio::test]
async fn heartbeat_detects_a_server_that_stops_answering() {
    // A "server" that completes the upgrade and the hello, then never reads or answers again.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let _hello = ws.next().await;
        let welcome = json!({"type":"welcome","protocol":1,"room":"default","serverVersion":0,"compression":false,"heartbeatMs":30000,"maxMessageSize":1048576});
        ws.send(Message::text(welcome.to_string()))
            .await
            .expect("welcome");
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(ws);
    });
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .heartbeat(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_millis(200))
        .reconnect(false)
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    eventually("dead server detected", || {
        rec.count(|n| matches!(n, Notification::Disconnected)) == 1
    })
    .await;
    assert!(rec.all().iter().any(|n| matches!(n, Notification::Error(e) if matches!(WsError::find(e), Some(WsError::HeartbeatTimeout(_))))));
    assert_eq!(rec.statuses().last(), Some(&Status::Error));
    fake.abort();
}

#[tokio::test]
async fn connect_times_out_when_the_upgrade_never_completes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let (_tcp, _) = listener.accept().await.expect("accept");
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .connect_timeout(Duration::from_millis(200))
        .reconnect(false)
        .build()
        .expect("client");
    let error = client.connect().await.expect_err("times out");
    assert!(
        matches!(WsError::find(&error), Some(WsError::ConnectTimeout(_))),
        "{error}"
    );
    hold.abort();
}

#[tokio::test]
async fn refused_connections_are_retried_with_reconnecting_attempts() {
    let addr = closed_port().await;
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(40))
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    let error = client.connect().await.expect_err("nothing listens");
    assert!(
        matches!(WsError::find(&error), Some(WsError::Connect { .. })),
        "{error}"
    );
    eventually("three attempts", || {
        rec.count(|n| matches!(n, Notification::Reconnecting { .. })) >= 3
    })
    .await;
    let attempts: Vec<u32> = rec
        .all()
        .into_iter()
        .filter_map(|n| match n {
            Notification::Reconnecting { attempt } => Some(attempt),
            _ => None,
        })
        .collect();
    assert_eq!(&attempts[..3], &[1, 2, 3]);
    client.disconnect().await.expect("stop");
}

/// An HTTP server on 127.0.0.1:0 answering every request with `status`, and how many it got.
async fn answering(status: u16) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    let status = axum::http::StatusCode::from_u16(status).expect("status");
    let router = axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        std::future::ready(status)
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    (format!("ws://{addr}/ws/room"), hits)
}

/// A refused upgrade the same request would get again (a 4xx but 408, 425 and 429; here 404,
/// from the relay itself and from a server without it, and 405, 410) stops the client: one
/// request, `connect` returns `WsError::Refused`, an `error` notification and status `error`,
/// no `reconnecting`. 404 was retried for ever. 429 and 5xx are retried.
#[tokio::test]
async fn upgrade_refusals_that_retrying_cannot_fix_stop_the_client() {
    use std::sync::atomic::Ordering;
    let relay = start(RelayConfig::default()).await;
    // `/ws/a/b` is no endpoint of the relay: 404.
    let mut urls = vec![(format!("ws://{}/ws/a/b", relay.addr), 404, None)];
    for status in [404, 405, 410] {
        let (url, hits) = answering(status).await;
        urls.push((url, status, Some(hits)));
    }
    for (url, status, hits) in urls {
        let client = WebSocketSyncClient::builder(url)
            .reconnect_delay(Duration::from_millis(5), Duration::from_millis(10))
            .build()
            .expect("client");
        let rec = Recorder::attach(&client);
        let error = client.connect().await.expect_err("refused");
        match WsError::find(&error) {
            Some(found @ WsError::Refused { status: got, .. }) => {
                assert_eq!(*got, status);
                assert!(found.is_fatal(), "{status}");
            }
            other => panic!("{status}: expected a refusal, got {other:?} ({error})"),
        }
        // Enough time for dozens of attempts at this reconnect delay.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            rec.reconnect_attempts().is_empty(),
            "{status} was retried: {:?}",
            rec.reconnect_attempts()
        );
        if let Some(hits) = hits {
            assert_eq!(hits.load(Ordering::SeqCst), 1, "{status}");
        }
        let refusals = rec.count(|n| match n {
            Notification::Error(e) => {
                matches!(WsError::find(e), Some(WsError::Refused { status: got, .. }) if *got == status)
            }
            _ => false,
        });
        assert_eq!(refusals, 1, "{status}: one error notification");
        assert_eq!(rec.statuses().last(), Some(&Status::Error), "{status}");
        assert!(!client.is_connected());
    }
    for status in [429, 500, 503] {
        let (url, hits) = answering(status).await;
        let client = WebSocketSyncClient::builder(url)
            .reconnect_delay(Duration::from_millis(5), Duration::from_millis(10))
            .build()
            .expect("client");
        let error = client.connect().await.expect_err("refused");
        assert!(
            WsError::find(&error).is_some_and(|e| !e.is_fatal()),
            "{status}: {error}"
        );
        eventually("retries", || hits.load(Ordering::SeqCst) >= 3).await;
        client.disconnect().await.expect("stop");
    }
    relay.stop().await;
}

#[tokio::test]
async fn jwt_auth_is_sent_as_a_bearer_token() {
    let server = start_with(
        RelayConfig::default(),
        Arc::new(ksync_core::InMemoryProvider::new()),
        Arc::new(TestTokens),
    )
    .await;
    let good = WebSocketSyncClient::builder(server.url(None))
        .auth(ksync_core::Auth::jwt("good-token"))
        .build()
        .expect("client");
    good.connect().await.expect("accepted");
    let bad = WebSocketSyncClient::builder(server.url(None))
        .auth(ksync_core::Auth::jwt("forged"))
        .build()
        .expect("client");
    let err = bad.connect().await.expect_err("refused");
    assert!(matches!(
        WsError::find(&err),
        Some(WsError::Refused { status: 401, .. })
    ));
    good.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn conflicts_from_the_room_are_settled_by_the_replica() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let (mut other, _) = join(&url, hello()).await;
    send_json(&mut other, json!({"type":"publish","ref":1,"events":[{"id":"doc","type":"t","data":"theirs","timestamp":5,"version":1}]})).await;
    recv_json(&mut other).await;
    let a = ksync_with(WebSocketSyncClient::builder(&url).build().expect("client")).await;
    let rec = Recorder::attach(a.client().as_ref());
    // Offline, a writes other content under the same (id, version).
    let ours = Event::new("doc", "t", json!("ours"), 10).with_origin(a.replica().id());
    a.replica().record_local(ours).await.expect("local");
    a.connect().await.expect("connect");
    eventually("conflict reported", || {
        rec.count(|n| matches!(n, Notification::Conflict(_))) >= 1
    })
    .await;
    // Last-write-wins (ours has the later timestamp) writes version 2, which reaches the room.
    let (_, events) = observe(&mut other, 1).await;
    assert_eq!(
        (events[0]["id"].as_str(), events[0]["version"].as_u64()),
        (Some("doc"), Some(2))
    );
    assert_eq!(events[0]["data"], "ours");
    server.stop().await;
}

/// Without a replica there is nothing to settle a conflict with, but the application still
/// hears of it as a conflict (not an error), with both sides in its own form: ours as it sent
/// it (before outgoing middleware), theirs as it would receive it (after incoming middleware).
/// The room keeps theirs.
#[tokio::test]
async fn a_standalone_client_reports_a_conflict_with_both_sides_in_the_applications_form() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("standalone-conflict"));
    let (mut other, _) = join(&url, hello()).await;
    // The room's revision, as an encoding client would have written it.
    send_json(&mut other, json!({"type":"publish","ref":1,"events":[{"id":"doc","type":"t","data":{"wrapped":"theirs"},"timestamp":5,"version":1}]})).await;
    recv_json(&mut other).await;
    let client = WebSocketSyncClient::new(&url).expect("client");
    client.use_middleware(Direction::Outgoing, |mut e: Event| {
        e.data = json!({ "wrapped": e.data });
        Some(e)
    });
    client.use_middleware(Direction::Incoming, |mut e: Event| {
        e.data = e.data["wrapped"].take();
        Some(e)
    });
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    let ours = Event::new("doc", "t", json!("ours"), 10);
    client.send(ours.clone()).await.expect("queued");
    eventually("conflict reported", || {
        rec.count(|n| matches!(n, Notification::Conflict(_))) == 1
    })
    .await;
    let conflict = rec
        .all()
        .into_iter()
        .find_map(|n| match n {
            Notification::Conflict(conflict) => Some(conflict),
            _ => None,
        })
        .expect("conflict");
    assert_eq!(conflict.kind.to_string(), "concurrent-edit");
    // (The client stamps its origin on what it sends.)
    assert!(
        conflict.ours.key() == ours.key() && conflict.ours.same_content(&ours),
        "{:?}",
        conflict.ours
    );
    assert_eq!(
        (conflict.theirs.data, conflict.theirs.timestamp),
        (json!("theirs"), 5)
    );
    assert_eq!(
        rec.count(|n| matches!(n, Notification::Error(_))),
        0,
        "a conflict is not an error"
    );
    // Nothing was stored over the room's revision.
    send_json(&mut other, json!({"type":"publish","ref":2,"events":[{"id":"doc","type":"t","data":{"wrapped":"theirs"},"timestamp":5,"version":1}]})).await;
    let ack = recv_json(&mut other).await;
    assert_eq!(ack["results"][0]["status"], "duplicate", "{ack}");
    client.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn debug_option_turns_on_debug_logs_for_that_client() {
    use tracing_subscriber::fmt::MakeWriter;
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }
    let server = start(RelayConfig::default()).await;
    let mut logs = Vec::new();
    for debug in [false, true] {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(buf.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let client = WebSocketSyncClient::builder(server.url(None))
            .debug(debug)
            .build()
            .expect("client");
        client.connect().await.expect("connect");
        client
            .send(Event::new(format!("d{debug}"), "t", json!(1), 1))
            .await
            .expect("send");
        eventually("sent", || client.outbox_len() == 0).await;
        client.disconnect().await.expect("disconnect");
        logs.push(String::from_utf8_lossy(&buf.0.lock().expect("lock")).into_owned());
    }
    assert!(
        !logs[0].contains("ksync_ws::client"),
        "quiet without debug: {}",
        logs[0]
    );
    assert!(
        logs[1].contains("ksync_ws::client")
            && logs[1].contains("welcome")
            && logs[1].contains("publish"),
        "{}",
        logs[1]
    );
    server.stop().await;
}

#[tokio::test]
async fn standalone_client_receives_only_the_live_stream_and_never_its_own_events() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let (mut old, _) = join(&url, hello()).await;
    send_json(
        &mut old,
        json!({"type":"publish","ref":1,"events":[event("history",1)]}),
    )
    .await;
    recv_json(&mut old).await;
    let client = WebSocketSyncClient::new(&url).expect("client");
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    client
        .send(Event::new("mine", "t", json!(1), 1))
        .await
        .expect("send");
    send_json(
        &mut old,
        json!({"type":"publish","ref":2,"events":[event("live",2)]}),
    )
    .await;
    eventually("live event", || rec.events().len() == 1).await;
    assert_eq!(rec.events()[0].id, "live");
    client.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    let server = start(RelayConfig::default()).await;
    let client = WebSocketSyncClient::new(server.url(None)).expect("client");
    let clone = client.clone();
    client.connect().await.expect("connect");
    assert_eq!(server.relay.connections(), 1);
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.relay.connections(), 1, "a clone still holds it");
    drop(clone);
    eventually("the relay saw the close", || {
        server.relay.connections() == 0
    })
    .await;
    server.stop().await;
}

/// A float arrives exactly as it was sent. `0.9941414234139935` is one of the ~1 in 8
/// doubles (of `Math.random()`'s kind) that serde_json's default parser reads one unit in the
/// last place off: the relay stored, and every subscriber got, `0.9941414234139936`, while
/// the publisher kept what it sent, so replicas held different data under one revision.
#[tokio::test]
async fn floats_arrive_bit_for_bit() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("floats"));
    let a = WebSocketSyncClient::builder(&url).build().expect("a");
    let b = WebSocketSyncClient::builder(&url).build().expect("b");
    let rb = Recorder::attach(&b);
    a.connect().await.expect("a");
    b.connect().await.expect("b");
    let sent = ksync_testkit::edge_data::MISREAD_FLOATS;
    a.send(Event::new("f", "t", json!(sent), 1))
        .await
        .expect("send");
    eventually("b got it", || rb.events().len() == 1).await;
    let bits = ksync_testkit::edge_data::float_bits;
    let want: Vec<u64> = sent.iter().map(|f| f.to_bits()).collect();
    assert_eq!(bits(&rb.events()[0].data), want, "what b received");
    // And a catch-up, read from the relay's log, is exact too.
    let (mut late, _) = join(&url, json!({"type": "hello", "protocol": 1, "since": 0})).await;
    let frame = recv_json(&mut late).await;
    assert_eq!(bits(&frame["events"][0]["event"]["data"]), want, "{frame}");
    a.disconnect().await.expect("disconnect");
    b.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// Data as deep as the event rules allow goes through every message that carries it: the
/// publish, the live `events`, a catch-up page and an ack's `held` revision (4 levels around
/// the event). The limit was 128 while serde_json reads 127 levels of a whole message: the
/// relay refused data 127 deep as `invalid` after `send` had taken it, and stored data 125
/// and 126 deep that no Rust subscriber could read (each session ended on `bad_message` and
/// the next met the same frame: the room stalled for them for ever). One level deeper is
/// refused by `send`, before it leaves.
#[tokio::test]
async fn data_as_deep_as_the_rules_allow_goes_everywhere_and_deeper_is_refused() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("deep"));
    let a = WebSocketSyncClient::builder(&url).build().expect("a");
    let b = WebSocketSyncClient::builder(&url).build().expect("b");
    let rb = Recorder::attach(&b);
    a.connect().await.expect("a");
    b.connect().await.expect("b");
    let deep = Event::new(
        "deep",
        "t",
        ksync_testkit::edge_data::nested(ksync_core::MAX_DATA_DEPTH),
        1,
    );
    a.send(deep.clone()).await.expect("send");
    eventually("b got it", || rb.events().len() == 1).await;
    assert_eq!(rb.events()[0].data, deep.data);
    // A catch-up page from the relay's log, and a conflict's `held` revision.
    let (mut late, _) = join(&url, json!({"type": "hello", "protocol": 1, "since": 0})).await;
    let frame = recv_json(&mut late).await;
    assert_eq!(frame["events"][0]["event"]["data"], deep.data, "{frame}");
    let mut rival = serde_json::to_value(&deep).expect("encodes");
    rival["timestamp"] = json!(2);
    send_json(
        &mut late,
        json!({"type": "publish", "ref": 1, "events": [rival]}),
    )
    .await;
    let ack = recv_json(&mut late).await;
    assert_eq!(ack["results"][0]["held"]["data"], deep.data, "{ack}");
    let too_deep = Event::new(
        "deeper",
        "t",
        ksync_testkit::edge_data::nested(ksync_core::MAX_DATA_DEPTH + 1),
        1,
    );
    let refused = a.send(too_deep).await.expect_err("too deep");
    assert!(
        matches!(
            refused,
            SyncError::InvalidEvent(ksync_core::InvalidEvent::DataTooDeep { .. })
        ),
        "{refused:?}"
    );
    assert_eq!(rb.count(|n| matches!(n, Notification::Error(_))), 0);
    a.disconnect().await.expect("disconnect");
    b.disconnect().await.expect("disconnect");
    server.stop().await;
}
