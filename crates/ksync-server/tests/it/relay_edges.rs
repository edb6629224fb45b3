//! The composed server with on-disk storage at the relay's edges: a shutdown in the middle of
//! pipelined publishes from several connections loses nothing that was acknowledged, and
//! after a restart the same revisions are duplicates at their first seq (other content under
//! the same key a conflict holding the original), odd ids included.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ksync_core::{LogName, Name};
use ksync_server::{Server, ServerConfig};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A loopback server on a free port with in-memory logs.
fn in_memory() -> ServerConfig {
    {
        let mut server_config = ServerConfig::default();
        server_config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        server_config.in_memory = true;
        server_config
    }
}

fn on_disk(dir: &std::path::Path) -> ServerConfig {
    {
        let mut server_config = in_memory();
        server_config.in_memory = false;
        server_config.data_dir = dir.to_owned();
        server_config
    }
}

async fn join(url: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text(
        json!({"type":"hello","protocol":1}).to_string(),
    ))
    .await
    .unwrap();
    let welcome = recv(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("open")
            .unwrap();
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// Publisher `p`'s `n`th event; some ids carry path tricks and control characters.
fn event(p: u64, n: u64) -> Value {
    let id = match n % 7 {
        0 => format!("../p{p}/{n}"),
        3 => format!("p{p}\u{0}{n}\t\u{1b}"),
        _ => format!("p{p}-{n}"),
    };
    json!({"id": id, "type": "entry", "data": {"p": p, "n": n}, "timestamp": 1_732_615_200_000u64 + n, "version": 1})
}

/// The log of `room` as seq -> event JSON.
fn log_of(provider: &Arc<dyn ksync_core::StorageProvider>, room: &str) -> BTreeMap<u64, Value> {
    let log = provider
        .existing(&LogName::Room(Name::new(room).unwrap()))
        .unwrap()
        .expect("the room's log");
    log.read_since(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|s| (s.seq, serde_json::to_value(&s.event).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_mid_stream_keeps_every_ack_and_resending_after_restart_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let running = Server::bind(on_disk(dir.path())).await.unwrap();
    let addr = running.local_addr();
    let rooms = ["journal", "other"];
    let (publishers, per_publisher) = (4u64, 400u64);
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let room = rooms[(p % 2) as usize];
        let ws = join(&format!("ws://{addr}/ws/{room}")).await;
        let acked_tx = acked_tx.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let sender = tokio::spawn(async move {
                for n in 1..=per_publisher {
                    let publish = json!({"type":"publish","ref":n,"events":[event(p, n)]});
                    if sink.send(Message::text(publish.to_string())).await.is_err() {
                        break;
                    }
                }
            });
            // seq -> event, for every `stored` ack read before the close.
            let mut acked = BTreeMap::new();
            let close = loop {
                match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        let ack: Value = serde_json::from_str(&text).unwrap();
                        if ack["type"] == "events" {
                            // The other publisher's, in the same room.
                            continue;
                        }
                        assert_eq!(ack["type"], "ack", "{ack}");
                        let n = ack["ref"].as_u64().unwrap();
                        assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
                        acked.insert(ack["results"][0]["seq"].as_u64().unwrap(), event(p, n));
                        let _ = acked_tx.send(());
                    }
                    Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
                    Ok(Some(Ok(_))) => {}
                    other => panic!("publisher {p}: expected acks then a close, got {other:?}"),
                }
            };
            sender.abort();
            (room, acked, close)
        }));
    }
    drop(acked_tx);
    // Shut down once some publishes are acknowledged, while the others are still coming.
    for _ in 0..100 {
        acked_rx.recv().await.expect("acks before the shutdown");
    }
    running.shutdown().await.unwrap();
    let mut acked: BTreeMap<&str, BTreeMap<u64, Value>> = BTreeMap::new();
    let mut total = 0;
    for task in tasks {
        let (room, by_seq, close) = task.await.unwrap();
        assert_eq!(close, Some(1001), "closed as going away");
        total += by_seq.len();
        acked.entry(room).or_default().extend(by_seq);
    }
    assert!(total >= 100);

    // After a restart every acknowledged event is on disk at its acknowledged seq.
    let running = Server::bind(on_disk(dir.path())).await.unwrap();
    let addr = running.local_addr();
    let provider = running.provider();
    for (room, by_seq) in &acked {
        let log = log_of(&provider, room);
        assert_eq!(
            log.keys().copied().collect::<Vec<_>>(),
            (1..=log.len() as u64).collect::<Vec<_>>()
        );
        for (seq, event) in by_seq {
            assert_eq!(log.get(seq), Some(event), "room {room} seq {seq}");
        }
        // The same revisions again: duplicates at their first seq, nothing stored.
        let mut ws = join(&format!("ws://{addr}/ws/{room}")).await;
        let events: Vec<&Value> = by_seq.values().collect();
        let publish = json!({"type":"publish","ref":1,"events":events});
        ws.send(Message::text(publish.to_string())).await.unwrap();
        let ack = recv(&mut ws).await;
        for ((seq, _), result) in by_seq.iter().zip(ack["results"].as_array().unwrap()) {
            assert_eq!(*result, json!({"status":"duplicate","seq":seq}), "{room}");
        }
        // Other content under an acknowledged key: a conflict that holds the original.
        let (_, original) = by_seq.iter().next().unwrap();
        let mut changed = original.clone();
        changed["data"] = json!("changed");
        let publish = json!({"type":"publish","ref":2,"events":[changed]});
        ws.send(Message::text(publish.to_string())).await.unwrap();
        let ack = recv(&mut ws).await;
        assert_eq!(ack["results"][0]["status"], "conflict", "{ack}");
        assert_eq!(ack["results"][0]["held"], *original, "{ack}");
        assert_eq!(log_of(&provider, room).len(), log.len(), "nothing stored");
    }
    running.shutdown().await.unwrap();
}

/// The body of a refused upgrade, which the doc promises as `{"error": "..."}` JSON.
fn refusal(error: tokio_tungstenite::tungstenite::Error) -> (u16, Value) {
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            let body = response.body().clone().unwrap_or_default();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            (response.status().as_u16(), body)
        }
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

/// Requests to the relay's paths that are not upgrades, and upgrades the relay refuses, get
/// the documented status with the documented JSON body; the connection over the cap is
/// refused while the connections under it keep working.
#[tokio::test]
async fn refusals_have_the_documented_status_and_json_body() {
    let running = Server::bind({
        let mut server_config = in_memory();
        server_config.limits = {
            let mut limits = ksync_server::Limits::default();
            limits.max_connections = 2;
            limits
        };
        server_config
    })
    .await
    .unwrap();
    let addr = running.local_addr();
    let http = reqwest::Client::new();
    for (method, path, status) in [
        (reqwest::Method::GET, "/ws", 400),
        (reqwest::Method::GET, "/ws/room", 400),
        (reqwest::Method::POST, "/ws/room", 405),
    ] {
        let response = http
            .request(method.clone(), format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
    for path in ["/ws/", "/ws/a/b"] {
        let error = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
            .await
            .expect_err("refused");
        assert_eq!(refusal(error).0, 404, "{path}");
    }
    let error = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{}", "r".repeat(129)))
        .await
        .expect_err("refused");
    let (status, body) = refusal(error);
    assert_eq!(status, 400);
    assert!(body["error"].is_string(), "{body}");

    let mut a = join(&format!("ws://{addr}/ws/capped")).await;
    let mut b = join(&format!("ws://{addr}/")).await;
    let error = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/capped"))
        .await
        .expect_err("over the cap");
    let (status, body) = refusal(error);
    assert_eq!(status, 503);
    assert!(body["error"].is_string(), "{body}");
    // The two under the cap are unaffected.
    let publish = json!({"type":"publish","ref":1,"events":[event(1, 1)]});
    a.send(Message::text(publish.to_string())).await.unwrap();
    assert_eq!(recv(&mut a).await["results"][0]["status"], "stored");
    b.send(Message::text(publish.to_string())).await.unwrap();
    assert_eq!(recv(&mut b).await["results"][0]["seq"], 1);
    running.shutdown().await.unwrap();
}

/// `max_open_rooms`: once that many rooms are open (each holds its log: a writer thread, sync
/// threads and their file descriptors), a connection to a room that is not open is refused
/// with 503 and the documented JSON body; the open rooms keep serving and take more
/// connections, and a room that closed (its last connection gone) frees its place. Nothing
/// acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_past_max_open_rooms_are_refused_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let running = Server::bind({
        let mut server_config = on_disk(dir.path());
        server_config.limits = {
            let mut limits = ksync_server::Limits::default();
            limits.max_open_rooms = 3;
            limits
        };
        server_config
    })
    .await
    .unwrap();
    let addr = running.local_addr();
    let url = |room: &str| format!("ws://{addr}/ws/{room}");
    async fn publish(ws: &mut Ws, p: u64, n: u64) {
        let message = json!({"type":"publish","ref":n,"events":[event(p, n)]});
        ws.send(Message::text(message.to_string())).await.unwrap();
        let ack = recv(ws).await;
        assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    }
    let mut open = Vec::new();
    for (p, room) in (1..).zip(["a", "b", "c"]) {
        let mut ws = join(&url(room)).await;
        publish(&mut ws, p, 1).await;
        open.push(ws);
    }
    let error = tokio_tungstenite::connect_async(url("d"))
        .await
        .expect_err("a fourth room");
    assert_eq!(
        refusal(error),
        (503, json!({"error": "too many open rooms"}))
    );
    // An open room takes another connection; the open rooms go on storing.
    let mut second = join(&url("a")).await;
    publish(&mut second, 1, 2).await;
    publish(&mut open[1], 2, 2).await;
    // Room c's last connection leaves: the room closes (in its own time) and frees its place.
    let mut c = open.pop().unwrap();
    c.close(None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut d = loop {
        match tokio_tungstenite::connect_async(url("d")).await {
            Ok(_) => break join(&url("d")).await,
            Err(error) => {
                assert_eq!(refusal(error).0, 503);
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "room c never closed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    publish(&mut d, 4, 1).await;
    drop((open, second, d, c));
    running.shutdown().await.unwrap();
    let provider: Arc<dyn ksync_core::StorageProvider> =
        Arc::new(ksync_storage_file::FileProvider::new(dir.path()).unwrap());
    for (room, events) in [("a", 2), ("b", 2), ("c", 1), ("d", 1)] {
        assert_eq!(log_of(&provider, room).len(), events, "{room}");
    }
}

/// A shutdown timeout too short for the relay's drain (here 0) ends the wait for it, not the
/// drain: every room still commits what it queued and closes its connections with 1001.
/// The drain was cancelled with the wait, and connections in rooms it had not reached yet
/// stayed open, no longer read, with nobody to close them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_timeout_of_zero_still_closes_every_room_with_1001() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = on_disk(dir.path());
    config.limits.shutdown_timeout = Duration::ZERO;
    let running = Server::bind(config).await.unwrap();
    let addr = running.local_addr();
    let mut sockets = Vec::new();
    for room in 0..6 {
        let mut ws = join(&format!("ws://{addr}/ws/r{room}")).await;
        let publish = json!({"type":"publish","ref":1,"events":[event(room, 1)]});
        ws.send(Message::text(publish.to_string())).await.unwrap();
        assert_eq!(recv(&mut ws).await["type"], "ack");
        sockets.push(ws);
    }
    running.shutdown().await.unwrap();
    for (room, ws) in sockets.iter_mut().enumerate() {
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .unwrap_or_else(|_| panic!("room r{room}: no close within 10 s"))
            {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("room r{room}: expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close, Some(1001), "room r{room}");
    }
}

/// A monitor (or a relay connection) that has not said `hello` yet when the server shuts down
/// is closed with 1001 at once, as the doc says of monitors at shutdown.
#[tokio::test]
async fn connections_still_in_their_handshake_are_closed_with_1001_at_shutdown() {
    let running = Server::bind(in_memory()).await.unwrap();
    let addr = running.local_addr();
    let (mut monitor, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/monitor"))
        .await
        .unwrap();
    let (mut relay, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/early"))
        .await
        .unwrap();
    let stopping = tokio::spawn(running.shutdown());
    for ws in [&mut monitor, &mut relay] {
        // Well within the 10 s handshake timeout.
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("closed within 5 s")
            {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close, Some(1001));
    }
    stopping.await.unwrap().unwrap();
}

/// A monitor that closes gets its close frame echoed (RFC 6455 5.5.1), not a dropped socket.
#[tokio::test]
async fn a_monitor_close_is_answered_with_a_close_frame() {
    let running = Server::bind(in_memory()).await.unwrap();
    let addr = running.local_addr();
    for say_hello in [true, false] {
        let (mut monitor, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/monitor"))
            .await
            .unwrap();
        if say_hello {
            let hello = json!({"type":"hello","protocol":1});
            monitor
                .send(Message::text(hello.to_string()))
                .await
                .unwrap();
            assert_eq!(recv(&mut monitor).await["type"], "welcome");
        }
        monitor.close(None).await.unwrap();
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(5), monitor.next())
                .await
                .expect("an answer within 5 s")
            {
                Some(Ok(Message::Close(_))) => break "close",
                Some(Ok(_)) => {}
                other => panic!("hello {say_hello}: expected the close echoed, got {other:?}"),
            }
        };
        assert_eq!(answer, "close");
    }
    running.shutdown().await.unwrap();
}

/// A client refused for too many failed attempts gets 429 with the body each protocol
/// documents: `{"error": "..."}` for WebSocket upgrades (relay and monitor),
/// `{"error": {"code": "rate_limited", ...}}` for `/git`.
#[tokio::test]
async fn rate_limited_refusals_have_the_documented_json_bodies() {
    let running = Server::bind({
        let mut server_config = in_memory();
        server_config.auth = {
            let mut auth_config = ksync_server::AuthConfig::default();
            auth_config.api_keys = vec![ksync_server::ApiKey::new("app", "right-key-0123")];
            auth_config.rate_limit = {
                let mut rate_limit = ksync_server::RateLimit::default();
                rate_limit.max_failures = 1;
                rate_limit
            };
            auth_config
        };
        server_config
    })
    .await
    .unwrap();
    let addr = running.local_addr();
    let upgrade = |path: &str, key: &str| {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{addr}{path}"),
            )
            .unwrap();
        request
            .headers_mut()
            .insert("x-api-key", key.parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    let (status, _) = refusal(upgrade("/ws/lobby", "wrong").await.expect_err("wrong key"));
    assert_eq!(status, 401);
    for path in ["/ws/lobby", "/", "/monitor"] {
        let (status, body) = refusal(upgrade(path, "right-key-0123").await.expect_err("limited"));
        assert_eq!(status, 429, "{path}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let git = reqwest::Client::new()
        .get(format!("http://{addr}/git/notes"))
        .header("x-api-key", "right-key-0123")
        .send()
        .await
        .unwrap();
    assert_eq!(git.status(), 429);
    let body: Value = git.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    running.shutdown().await.unwrap();
}
