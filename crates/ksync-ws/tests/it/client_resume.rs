//! WebSocketSyncClient: resuming after the connection or the room went away (room reset,
//! slow-consumer close, `disconnect` then `connect`, backoff across reconnects).

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{
    AllowAll, Event, InMemoryProvider, InMemoryStorage, KSync, LogName, Name, Notification,
    Storage, StorageProvider, SyncClient,
};
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;
use serde_json::json;

fn quick(url: &str) -> WebSocketSyncClient {
    WebSocketSyncClient::builder(url)
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .expect("client")
}

async fn ksync_with(client: WebSocketSyncClient) -> KSync<WebSocketSyncClient> {
    ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync")
}

fn room_log(provider: &Arc<dyn StorageProvider>, room: &str) -> Arc<dyn Storage> {
    provider
        .existing(&LogName::Room(Name::new(room).expect("name")))
        .expect("ok")
        .expect("room exists")
}

fn sorted_keys(storage: &dyn Storage) -> Vec<ksync_core::RevisionKey> {
    let mut keys: Vec<_> = storage
        .read_since(0, 10_000)
        .expect("read")
        .into_iter()
        .map(|s| s.event.key())
        .collect();
    keys.sort();
    keys
}

/// Publishes `events` on a raw connection and waits for the ack.
async fn publish_raw(url: &str, events: Vec<serde_json::Value>) {
    let (mut ws, _) = join(url, hello()).await;
    send_json(
        &mut ws,
        json!({"type": "publish", "ref": 1, "events": events}),
    )
    .await;
    loop {
        let reply = recv_json(&mut ws).await;
        if reply["type"] == "ack" {
            assert!(
                reply["results"]
                    .as_array()
                    .expect("results")
                    .iter()
                    .all(|r| r["status"] == "stored"),
                "{reply}"
            );
            break;
        }
    }
}

/// Stops `server` and serves the provider `open` gives (called once the server stopped) on the
/// same address.
async fn restart_on(server: Server, open: impl FnOnce() -> Arc<dyn StorageProvider>) -> Server {
    let addr = server.addr;
    server.stop().await;
    let provider = open();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("same port");
    serve_on(
        listener,
        RelayConfig::default(),
        provider,
        Arc::new(AllowAll),
    )
}

/// A replica publishes `mine` events; the server comes back with an empty room (another
/// in-memory server on the same address) where someone else publishes `others` events before
/// the replica returns. The replica must sync the whole new room and give it its events back,
/// told once why (`RoomReset`), with each of the others' events notified once.
async fn reset_room_case(room: &str, mine: u64, others: u64) {
    let first: Arc<dyn StorageProvider> = Arc::new(InMemoryProvider::new());
    let server = start_with(RelayConfig::default(), first.clone(), Arc::new(AllowAll)).await;
    let url = server.url(Some(room));
    // Without auto-reconnect: syncing again with the reset room is part of connecting.
    let a = ksync_with(
        WebSocketSyncClient::builder(&url)
            .reconnect(false)
            .build()
            .expect("client"),
    )
    .await;
    let rec = Recorder::attach(a.client().as_ref());
    a.connect().await.expect("connect");
    for i in 0..mine {
        a.emit("before-reset", json!(i)).await.expect("emit");
    }
    let old_room = room_log(&first, room);
    eventually("the first room stored a's events", || {
        old_room.len() == mine
    })
    .await;
    // Stored is not yet acknowledged: until the acks are in, a's cursors are still at 0, and a
    // replica with nothing to rewind rightly reports no reset.
    let acked = format!("ws:{url}/acked");
    let room_cursor = format!("ws:{url}/room");
    eventually("a's events acknowledged", || {
        a.replica().cursor(&acked).is_ok_and(|c| c == mine)
            && a.replica().cursor(&room_cursor).is_ok_and(|c| c == mine)
    })
    .await;
    a.disconnect().await.expect("disconnect");

    let second: Arc<dyn StorageProvider> = Arc::new(InMemoryProvider::new());
    let server = restart_on(server, || second.clone()).await;
    let theirs: Vec<_> = (1..=others)
        .map(|n| event(&format!("other-{n}"), n))
        .collect();
    publish_raw(&url, theirs).await;
    a.connect().await.expect("reconnect");
    let new_room = room_log(&second, room);
    let total = mine + others;
    eventually("a has the new room's events", || {
        a.replica().storage().len() == total
    })
    .await;
    eventually("the new room has a's events back", || {
        new_room.len() == total
    })
    .await;
    assert_eq!(
        sorted_keys(a.replica().storage().as_ref()),
        sorted_keys(new_room.as_ref())
    );
    assert_eq!(
        rec.count(|n| matches!(n, Notification::Error(e) if matches!(ksync_ws::WsError::find(e), Some(ksync_ws::WsError::RoomReset { cursor, server_version }) if *cursor == mine && *server_version == others))),
        1,
        "{:?}",
        rec.all()
    );
    let mut notified = rec.event_ids();
    notified.sort();
    let mut expected: Vec<_> = (1..=others).map(|n| format!("other-{n}")).collect();
    expected.sort();
    assert_eq!(notified, expected);
    assert!(a.client().is_connected());
    a.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// The new room is behind the replica's cursor: the relay says `cursor_ahead`.
#[tokio::test]
async fn a_reset_room_gets_the_replicas_events_back_and_the_replica_gets_the_rooms() {
    reset_room_case("reset", 5, 2).await;
}

/// The new room has grown past the replica's cursor before the replica returns: no
/// `cursor_ahead` can tell, but `welcome.logId` names another log. Resuming from the cursor
/// would skip the room's first events and never republish the replica's own.
#[tokio::test]
async fn a_reset_room_that_grew_past_the_cursor_is_synced_from_the_start() {
    reset_room_case("regrown", 3, 8).await;
}

/// A durable room keeps its log id across server restarts: a replica resumes from its cursor
/// with no resync.
#[tokio::test]
async fn a_durable_room_keeps_its_log_id_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = |dir: &std::path::Path| -> Arc<dyn StorageProvider> {
        Arc::new(ksync_storage_file::FileProvider::new(dir).expect("provider"))
    };
    let server = start_with(
        RelayConfig::default(),
        provider(dir.path()),
        Arc::new(AllowAll),
    )
    .await;
    let url = server.url(Some("kept"));
    let a = ksync_with(quick(&url)).await;
    let rec = Recorder::attach(a.client().as_ref());
    a.connect().await.expect("connect");
    a.emit("mine", json!(1)).await.expect("emit");
    publish_raw(&url, vec![event("other-1", 1)]).await;
    eventually("a has both", || a.replica().storage().len() == 2).await;
    a.disconnect().await.expect("disconnect");
    let server = restart_on(server, || provider(dir.path())).await;
    publish_raw(&url, vec![event("other-2", 1)]).await;
    a.connect().await.expect("reconnect");
    eventually("a has the new event", || a.replica().storage().len() == 3).await;
    assert_eq!(
        rec.count(|n| matches!(n, Notification::Error(_))),
        0,
        "{:?}",
        rec.all()
    );
    assert_eq!(rec.event_ids(), ["other-1", "other-2"]);
    a.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// One connection of [`scripted_server`].
struct Step {
    server_version: u64,
    /// Sent after `welcome`.
    frames: Vec<serde_json::Value>,
    /// Read until the client's first `publish` before closing (never acknowledged).
    wait_for_publish: bool,
    /// Close with this code; `None`: keep the connection open.
    close: Option<u16>,
}

/// A relay stand-in: each connection reads the `hello` (reported), then plays its [`Step`].
async fn scripted_server(
    listener: tokio::net::TcpListener,
    script: Vec<Step>,
    hellos: tokio::sync::mpsc::Sender<serde_json::Value>,
) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    async fn next_text(
        ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    ) -> serde_json::Value {
        loop {
            match ws.next().await.expect("open").expect("frame") {
                Message::Text(t) => break serde_json::from_str(t.as_str()).expect("json"),
                _ => continue,
            }
        }
    }
    let mut open = Vec::new();
    for step in script {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let hello = next_text(&mut ws).await;
        hellos.send(hello).await.expect("report");
        let welcome = json!({"type": "welcome", "protocol": 1, "room": "default",
            "serverVersion": step.server_version, "compression": false, "heartbeatMs": 30000,
            "maxMessageSize": 1048576});
        ws.send(Message::text(welcome.to_string()))
            .await
            .expect("welcome");
        for frame in step.frames {
            ws.send(Message::text(frame.to_string()))
                .await
                .expect("frame");
        }
        if step.wait_for_publish {
            while next_text(&mut ws).await["type"] != "publish" {}
        }
        match step.close {
            Some(code) => {
                let frame = CloseFrame {
                    code: code.into(),
                    reason: "scripted close".into(),
                };
                let _ = ws.close(Some(frame)).await;
                // Let the client read the close before the socket goes.
                while let Some(Ok(_)) = ws.next().await {}
            }
            None => open.push(ws),
        }
    }
    std::future::pending::<()>().await;
}

fn events_frame(from: u64, to: u64) -> serde_json::Value {
    let events: Vec<_> = (from..=to)
        .map(|seq| json!({"seq": seq, "event": event(&format!("e{seq}"), seq)}))
        .collect();
    json!({"type": "events", "events": events})
}

#[tokio::test]
async fn a_slow_consumer_closed_with_4008_resumes_from_its_cursor() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (hellos_tx, mut hellos) = tokio::sync::mpsc::channel(4);
    // The first connection gets seq 11-13 live and is then dropped as a slow consumer; the
    // second must resume after 13 (the relay would catch it up with 14-15).
    let script = vec![
        Step {
            server_version: 10,
            frames: vec![events_frame(11, 13)],
            wait_for_publish: false,
            close: Some(4008),
        },
        Step {
            server_version: 15,
            frames: vec![events_frame(14, 15)],
            wait_for_publish: false,
            close: None,
        },
    ];
    let server = tokio::spawn(scripted_server(listener, script, hellos_tx));
    let client = quick(&format!("ws://{addr}/ws"));
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    let first = hellos.recv().await.expect("first hello");
    assert!(first.get("since").is_none_or(|s| s.is_null()), "{first}");
    let second = tokio::time::timeout(Duration::from_secs(10), hellos.recv())
        .await
        .expect("reconnects")
        .expect("second hello");
    assert_eq!(second["since"], 13, "{second}");
    eventually("every event", || rec.event_ids().len() >= 5).await;
    assert_eq!(rec.event_ids(), ["e11", "e12", "e13", "e14", "e15"]);
    assert!(
        rec.count(|n| matches!(n, Notification::Error(e) if matches!(ksync_ws::WsError::find(e), Some(ksync_ws::WsError::Closed { code: 4008, .. })))) == 1
    );
    client.disconnect().await.expect("disconnect");
    server.abort();
}

#[tokio::test]
async fn disconnect_then_connect_catches_up_and_sends_what_waited() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("again"));
    let a = quick(&url);
    let b = quick(&url);
    let ra = Recorder::attach(&a);
    let rb = Recorder::attach(&b);
    a.connect().await.expect("a");
    b.connect().await.expect("b");
    a.send(Event::new("a1", "t", json!(1), 1))
        .await
        .expect("send");
    eventually("b got a1", || rb.event_ids() == ["a1"]).await;
    b.disconnect().await.expect("b off");
    a.send(Event::new("a2", "t", json!(2), 1))
        .await
        .expect("send");
    // Sent while disconnected: queued, goes out on connect.
    b.send(Event::new("b1", "t", json!(3), 1))
        .await
        .expect("queued");
    assert_eq!(b.outbox_len(), 1);
    eventually("a2 acknowledged", || a.outbox_len() == 0).await;
    b.connect().await.expect("b on again");
    eventually("a got b1", || ra.event_ids() == ["b1"]).await;
    eventually("b caught up with a2", || rb.event_ids() == ["a1", "a2"]).await;
    eventually("b1 acknowledged", || b.outbox_len() == 0).await;
    a.send(Event::new("a3", "t", json!(4), 1))
        .await
        .expect("send");
    eventually("b got a3 live", || rb.event_ids() == ["a1", "a2", "a3"]).await;
    assert_eq!(ra.event_ids(), ["b1"]);
    assert_eq!(rb.count(|n| matches!(n, Notification::Connected)), 2);
    assert_eq!(rb.count(|n| matches!(n, Notification::Disconnected)), 1);
    assert_eq!(rb.count(|n| matches!(n, Notification::Error(_))), 0);
    a.disconnect().await.expect("a off");
    b.disconnect().await.expect("b off");
    server.stop().await;
}

#[tokio::test]
async fn reconnect_attempts_count_again_from_one_after_a_connection_that_stayed_up() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let provider: Arc<dyn StorageProvider> = Arc::new(InMemoryProvider::new());
    let server = serve_on(
        listener,
        RelayConfig::default(),
        provider.clone(),
        Arc::new(AllowAll),
    );
    let client = quick(&server.url(None));
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    let attempts = |rec: &Recorder| rec.reconnect_attempts();
    let mut server = Some(server);
    for round in 1..=2 {
        let before = attempts(&rec).len();
        if let Some(s) = server.take() {
            s.stop().await;
        }
        eventually("three failed attempts", || {
            attempts(&rec).len() >= before + 3
        })
        .await;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("same port");
        server = Some(serve_on(
            listener,
            RelayConfig::default(),
            provider.clone(),
            Arc::new(AllowAll),
        ));
        eventually("connected again", || {
            rec.count(|n| matches!(n, Notification::Connected)) == round + 1
        })
        .await;
        // Up for longer than the longest delay (50 ms): the next loss counts from 1 again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = attempts(&rec);
        assert_eq!(&seen[before..before + 3], &[1, 2, 3], "round {round}");
    }
    client.disconnect().await.expect("disconnect");
    if let Some(s) = server {
        s.stop().await;
    }
}

#[tokio::test]
async fn a_standalone_clients_own_unacknowledged_event_is_not_news_after_a_reconnect() {
    // A bridge forwards events made elsewhere with their origin. One is stored by the room but
    // the connection drops before the ack: after the reconnect the catch-up holds it, and it
    // is still this client's own (in its outbox), not an incoming event.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let ours = Event::new("fwd-1", "t", json!({"n": 1}), 1).with_origin("elsewhere");
    let stored = json!({"seq": 1, "event": serde_json::to_value(&ours).expect("json")});
    let news = json!({"seq": 2, "event": event("news", 2)});
    let script = vec![
        Step {
            server_version: 0,
            frames: Vec::new(),
            wait_for_publish: true,
            close: Some(1001),
        },
        Step {
            server_version: 2,
            frames: vec![json!({"type": "events", "events": [stored, news]})],
            wait_for_publish: false,
            close: None,
        },
    ];
    let (hellos_tx, mut hellos) = tokio::sync::mpsc::channel(4);
    let server = tokio::spawn(scripted_server(listener, script, hellos_tx));
    let client = quick(&format!("ws://{addr}/ws"));
    let rec = Recorder::attach(&client);
    client.send(ours.clone()).await.expect("queued");
    client.connect().await.expect("connect");
    let _first = hellos.recv().await.expect("first hello");
    let second = tokio::time::timeout(Duration::from_secs(10), hellos.recv())
        .await
        .expect("reconnects")
        .expect("second hello");
    assert_eq!(second["since"], 0, "{second}");
    eventually("the other event", || {
        rec.event_ids().contains(&"news".to_owned())
    })
    .await;
    assert_eq!(rec.event_ids(), ["news"]);
    assert_eq!(client.outbox_len(), 1, "still waiting for its ack");
    client.disconnect().await.expect("disconnect");
    server.abort();
}

#[tokio::test]
async fn a_server_that_drops_every_connection_at_once_gets_growing_delays() {
    // Each connection is welcomed and closed at once (as a relay whose storage fails on every
    // catch-up would, 1011): the attempt count, and so the delay, keeps growing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let flaps = 4;
    let mut script: Vec<Step> = (0..flaps)
        .map(|_| Step {
            server_version: 0,
            frames: Vec::new(),
            wait_for_publish: false,
            close: Some(1011),
        })
        .collect();
    script.push(Step {
        server_version: 0,
        frames: Vec::new(),
        wait_for_publish: false,
        close: None,
    });
    let (hellos_tx, mut hellos) = tokio::sync::mpsc::channel(8);
    let server = tokio::spawn(scripted_server(listener, script, hellos_tx));
    // A long `max`: each connection here is shorter, so none counts as having stayed up.
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .reconnect_delay(Duration::from_millis(5), Duration::from_secs(5))
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    for _ in 0..=flaps {
        tokio::time::timeout(Duration::from_secs(10), hellos.recv())
            .await
            .expect("a hello")
            .expect("open");
    }
    eventually("the last connection", || {
        rec.count(|n| matches!(n, Notification::Connected)) == flaps + 1
    })
    .await;
    assert_eq!(rec.reconnect_attempts(), [1, 2, 3, 4]);
    assert_eq!(
        rec.count(|n| matches!(n, Notification::Disconnected)),
        flaps
    );
    client.disconnect().await.expect("disconnect");
    server.abort();
}

#[tokio::test]
async fn a_room_name_the_server_refuses_is_not_retried() {
    // 400 (bad room name): the same request can only be refused again, like a bad URL.
    let server = start(RelayConfig::default()).await;
    let client = quick(&server.url(Some(".hidden")));
    let rec = Recorder::attach(&client);
    let error = client.connect().await.expect_err("refused");
    assert!(
        matches!(
            ksync_ws::WsError::find(&error),
            Some(ksync_ws::WsError::Refused { status: 400, .. })
        ),
        "{error}"
    );
    // The manager stopped: a second connect tries once more and fails the same way.
    let again = client.connect().await.expect_err("refused again");
    assert!(
        matches!(
            ksync_ws::WsError::find(&again),
            Some(ksync_ws::WsError::Refused { status: 400, .. })
        ),
        "{again}"
    );
    assert_eq!(
        rec.count(|n| matches!(n, Notification::Reconnecting { .. })),
        0,
        "{:?}",
        rec.all()
    );
    server.stop().await;
}

#[tokio::test]
async fn connect_during_a_long_backoff_tries_at_once() {
    let addr = closed_port().await;
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .reconnect_delay(Duration::from_secs(60), Duration::from_secs(60))
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    client.connect().await.expect_err("nothing listens");
    eventually("waiting out the first delay (30-60 s)", || {
        rec.count(|n| matches!(n, Notification::Reconnecting { .. })) == 1
    })
    .await;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("same port");
    let server = serve_on(
        listener,
        RelayConfig::default(),
        Arc::new(InMemoryProvider::new()),
        Arc::new(AllowAll),
    );
    // The user asks now (e.g. the network is back): no waiting out the delay.
    tokio::time::timeout(Duration::from_secs(10), client.connect())
        .await
        .expect("connect does not wait for the backoff")
        .expect("connects");
    assert!(client.is_connected());
    client.disconnect().await.expect("disconnect");
    server.stop().await;
}

// Two threads: the application's reconnect runs while the client's task is still ending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_called_from_a_disconnected_handler_connects_again() {
    // Without auto-reconnect the application reconnects itself when told the connection
    // went away: that connect must not race the ending background task (lost or refused).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let script = vec![
        Step {
            server_version: 0,
            frames: Vec::new(),
            wait_for_publish: false,
            close: Some(1001),
        },
        Step {
            server_version: 0,
            frames: Vec::new(),
            wait_for_publish: false,
            close: None,
        },
    ];
    let (hellos_tx, _hellos) = tokio::sync::mpsc::channel(4);
    let server = tokio::spawn(scripted_server(listener, script, hellos_tx));
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .reconnect(false)
        .build()
        .expect("client");
    let (done_tx, mut done) = tokio::sync::mpsc::channel(1);
    {
        let handle = client.clone();
        let runtime = tokio::runtime::Handle::current();
        let _sub = client
            .notifier()
            .on("disconnected", move |_| {
                let handle = handle.clone();
                let done = done_tx.clone();
                let runtime = runtime.clone();
                // From another thread, while the client is still busy with the loss (this
                // handler holding it up a little makes sure of that).
                std::thread::spawn(move || {
                    runtime.block_on(async move {
                        let result = handle.connect().await.map_err(|e| e.to_string());
                        let _ = done.send(result).await;
                    });
                });
                std::thread::sleep(Duration::from_millis(200));
            })
            .expect("kind");
    }
    client.connect().await.expect("first connect");
    let result = tokio::time::timeout(Duration::from_secs(10), done.recv())
        .await
        .expect("the application's connect returns")
        .expect("reported");
    assert_eq!(result, Ok(()));
    assert!(client.is_connected());
    client.disconnect().await.expect("disconnect");
    server.abort();
}

// Two threads: the caller of `connect` could otherwise run ahead of the notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_and_error_are_notified_before_connect_returns() {
    let addr = closed_port().await;
    let refused = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .reconnect(false)
        .build()
        .expect("client");
    let told_error = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let told = told_error.clone();
        let _sub = refused
            .notifier()
            .on("error", move |_| {
                std::thread::sleep(Duration::from_millis(100));
                told.store(true, std::sync::atomic::Ordering::SeqCst);
            })
            .expect("kind");
    }
    refused.connect().await.expect_err("nothing listens");
    assert!(
        told_error.load(std::sync::atomic::Ordering::SeqCst),
        "`error` handlers ran before connect() returned the error"
    );

    let server = start(RelayConfig::default()).await;
    let client = quick(&server.url(None));
    let told = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let told = told.clone();
        let _sub = client
            .notifier()
            .on("connected", move |_| {
                // A handler that takes a moment (logging, UI).
                std::thread::sleep(Duration::from_millis(100));
                told.store(true, std::sync::atomic::Ordering::SeqCst);
            })
            .expect("kind");
    }
    client.connect().await.expect("connect");
    assert!(
        told.load(std::sync::atomic::Ordering::SeqCst),
        "`connected` handlers ran before connect() returned"
    );
    client.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// A server whose ack does not match its publish (too few results, or a seq past its own
/// `serverVersion`) is not believed: the event stays unacknowledged and goes out again on the
/// next connection, until an ack that makes sense.
#[tokio::test]
async fn an_ack_that_does_not_match_its_publish_acknowledges_nothing() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Per connection: the ack for its first publish (given its `ref`).
    let acks: Vec<fn(u64) -> serde_json::Value> = vec![
        |r| json!({"type": "ack", "ref": r, "results": [], "serverVersion": 1}),
        |r| json!({"type": "ack", "ref": r, "results": [{"status": "stored", "seq": 5}], "serverVersion": 1}),
        |r| json!({"type": "ack", "ref": r, "results": [{"status": "stored", "seq": 1}], "serverVersion": 1}),
    ];
    let (published_tx, mut published) = tokio::sync::mpsc::channel(4);
    let server = tokio::spawn(async move {
        let mut open = Vec::new();
        for ack in acks {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
            let welcome = json!({"type": "welcome", "protocol": 1, "room": "default",
                "serverVersion": 0, "compression": false, "heartbeatMs": 30000,
                "maxMessageSize": 1048576});
            let mut welcomed = false;
            while let Some(Ok(message)) = ws.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let value: serde_json::Value = serde_json::from_str(text.as_str()).expect("json");
                if !welcomed {
                    ws.send(Message::text(welcome.to_string()))
                        .await
                        .expect("welcome");
                    welcomed = true;
                } else if value["type"] == "publish" {
                    published_tx
                        .send(value["events"][0]["id"].clone())
                        .await
                        .expect("report");
                    let reference = value["ref"].as_u64().expect("ref");
                    ws.send(Message::text(ack(reference).to_string()))
                        .await
                        .expect("ack");
                    break;
                }
            }
            open.push(ws);
        }
        std::future::pending::<()>().await;
    });
    let client = quick(&format!("ws://{addr}/ws"));
    let rec = Recorder::attach(&client);
    client
        .send(Event::new("once", "t", json!({"n": 1}), 1))
        .await
        .expect("queued");
    client.connect().await.expect("connect");
    for attempt in 0..3 {
        let id = tokio::time::timeout(Duration::from_secs(10), published.recv())
            .await
            .expect("published again")
            .expect("report");
        assert_eq!(id, "once", "publish {attempt}");
    }
    eventually("acknowledged by the third ack", || client.outbox_len() == 0).await;
    let protocol_errors: Vec<String> = rec
        .all()
        .iter()
        .filter_map(|n| match n {
            Notification::Error(e) => match ksync_ws::WsError::find(e) {
                Some(ksync_ws::WsError::Protocol(m)) => Some(m.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(protocol_errors.len(), 2, "{protocol_errors:?}");
    assert!(
        protocol_errors[0].contains("0 results for 1 events"),
        "{protocol_errors:?}"
    );
    assert!(
        protocol_errors[1].contains("past its serverVersion"),
        "{protocol_errors:?}"
    );
    client.disconnect().await.expect("disconnect");
    server.abort();
}
