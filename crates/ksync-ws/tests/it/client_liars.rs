//! WebSocketSyncClient against servers that say things no honest relay says, or refuse a
//! publish: nothing the client queued is lost, and a lie is a typed error.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use ksync_core::{
    Auth, Event, InMemoryProvider, InMemoryStorage, LogName, Name, Notification, StorageProvider,
    SyncClient,
};
use ksync_ws::server::RelayConfig;
use ksync_ws::{WebSocketSyncClient, WsError};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Fake = WebSocketStream<tokio::net::TcpStream>;

fn quick(url: &str) -> WebSocketSyncClient {
    WebSocketSyncClient::builder(url)
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .expect("client")
}

/// Accepts the next connection and reads its `hello`.
async fn accept(listener: &TcpListener) -> Fake {
    let (tcp, _) = listener.accept().await.expect("accept");
    let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
    let hello = next_json(&mut ws).await.expect("hello");
    assert_eq!(hello["type"], "hello", "{hello}");
    ws
}

/// The next text message, or `None` once the client went away.
async fn next_json(ws: &mut Fake) -> Option<Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return Some(serde_json::from_str(t.as_str()).expect("json"));
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
            Some(Ok(_)) => continue,
        }
    }
}

async fn send(ws: &mut Fake, value: Value) {
    ws.send(Message::text(value.to_string()))
        .await
        .expect("send");
}

fn welcome(server_version: u64, max_message_size: u64) -> Value {
    json!({"type": "welcome", "protocol": 1, "room": "default",
        "serverVersion": server_version, "compression": false, "heartbeatMs": 30000,
        "maxMessageSize": max_message_size})
}

fn is_server_error(n: &Notification, wanted: &str) -> bool {
    matches!(n, Notification::Error(e)
        if matches!(WsError::find(e), Some(WsError::Server { code, .. }) if code == wanted))
}

#[tokio::test]
async fn a_welcome_with_an_impossible_max_message_size_is_refused_and_nothing_is_settled() {
    // With `maxMessageSize: 0` every publish would be "too large": each queued event would be
    // reported invalid and settled (gone from the outbox, or past a replica's ack cursor).
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen_tx, mut seen) = mpsc::channel(4);
    let fake = tokio::spawn(async move {
        let mut ws = accept(&listener).await;
        send(&mut ws, welcome(0, 0)).await;
        // Everything the client says until it goes away.
        let mut types = Vec::new();
        while let Some(message) = next_json(&mut ws).await {
            types.push(message["type"].clone());
        }
        seen_tx.send(types).await.expect("report");
    });
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .reconnect(false)
        .build()
        .expect("client");
    client
        .send(Event::new("kept", "t", json!({"n": 1}), 1))
        .await
        .expect("queued");
    let error = client.connect().await.expect_err("a broken welcome");
    assert!(
        matches!(WsError::find(&error), Some(WsError::Protocol(why)) if why.contains("maxMessageSize")),
        "{error}"
    );
    assert_eq!(client.outbox_len(), 1, "the event still waits");
    let types = seen.recv().await.expect("the connection ended");
    assert!(types.is_empty(), "nothing published: {types:?}");
    fake.await.expect("fake");
}

/// What a client (with an event queued) did against a server whose every `welcome` is
/// `welcome`: `connect()`'s error, what it said and its close code on the first connection,
/// and whether it connected again (its reconnect delay is 5-10 ms): waited for up to 10 s
/// when `retried` is expected, else 200 ms.
struct Welcomed {
    error: ksync_core::SyncError,
    said: Vec<String>,
    close: Option<u16>,
    reconnected: bool,
    outbox: usize,
    reconnect_attempts: usize,
}

async fn against_welcome(welcome: Value, retried: bool) -> Welcomed {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen_tx, mut seen) = mpsc::channel(4);
    let fake = tokio::spawn(async move {
        loop {
            let mut ws = accept(&listener).await;
            send(&mut ws, welcome.clone()).await;
            // What the client says, and how it closes.
            let mut said = Vec::new();
            let close = loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                    Some(Ok(Message::Text(t))) => said.push(t.to_string()),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break None,
                }
            };
            if seen_tx.send((said, close)).await.is_err() {
                return;
            }
        }
    });
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .reconnect_delay(Duration::from_millis(5), Duration::from_millis(10))
        .build()
        .expect("client");
    let recorder = Recorder::attach(&client);
    client
        .send(Event::new("kept", "t", json!({"n": 1}), 1))
        .await
        .expect("queued");
    let error = client
        .connect()
        .await
        .expect_err("a welcome the client refuses");
    let (said, close) = seen.recv().await.expect("the connection ended");
    let wait = if retried {
        Duration::from_secs(10)
    } else {
        Duration::from_millis(200)
    };
    let reconnected = tokio::time::timeout(wait, seen.recv()).await.is_ok();
    let outbox = client.outbox_len();
    assert!(!client.is_connected());
    client.disconnect().await.expect("disconnect");
    fake.abort();
    Welcomed {
        error,
        said,
        close,
        reconnected,
        outbox,
        reconnect_attempts: recorder.reconnect_attempts().len(),
    }
}

/// PROTOCOL.md: "a peer announcing another version is refused with a clear error". A server
/// whose `welcome` announces protocol 2 is refused as the relay refuses a `hello` of another
/// version: the client closes with 4001, takes nothing of the welcome, settles nothing, and
/// stops (a typed, fatal error) instead of reconnecting to the same server for ever. The
/// version is read first, as the relay reads a `hello`'s: the other fields of a welcome of
/// another version may have other shapes (or a version past `u32`), and it is still that.
#[tokio::test]
async fn a_welcome_of_another_protocol_version_is_refused_and_the_client_stops() {
    let mut newer = welcome(0, 1 << 20);
    newer["protocol"] = json!(2);
    let other_shapes = json!({"type": "welcome", "protocol": 2, "room": ["default"],
        "serverVersion": "42", "maxMessageSize": {"text": 1}});
    let past_u32 = json!({"type": "welcome", "protocol": 1_u64 << 32, "room": "default",
        "serverVersion": 0, "compression": false, "heartbeatMs": 30000,
        "maxMessageSize": 1 << 20});
    for (welcome, version) in [(newer, 2), (other_shapes, 2), (past_u32, 1_u64 << 32)] {
        let seen = against_welcome(welcome.clone(), false).await;
        let found = WsError::find(&seen.error);
        assert!(
            matches!(found, Some(WsError::UnsupportedProtocol { server }) if *server == version),
            "{welcome}: {}",
            seen.error
        );
        assert!(found.is_some_and(WsError::is_fatal), "{welcome}");
        assert!(seen.said.is_empty(), "nothing published: {:?}", seen.said);
        assert_eq!(seen.close, Some(4001), "{welcome}");
        // No second attempt, however long the reconnect delays have passed.
        assert!(!seen.reconnected, "{welcome}: the client connected again");
        assert_eq!(seen.reconnect_attempts, 0, "{welcome}");
        assert_eq!(seen.outbox, 1, "{welcome}: the event still waits");
    }
}

/// A `welcome` without an integer `protocol` >= 0 announces no version: it is a welcome the
/// client cannot follow (`WsError::Protocol`, retried after the reconnect delay, as one with
/// an impossible `maxMessageSize`), not one of another version that stops the client, as the
/// relay answers a `hello` without one with 4000, not 4001 (and as ksync.js does).
#[tokio::test]
async fn a_welcome_without_a_protocol_version_is_a_broken_welcome_and_is_retried() {
    let mut missing = welcome(0, 1 << 20);
    missing
        .as_object_mut()
        .expect("an object")
        .remove("protocol");
    let mut text = welcome(0, 1 << 20);
    text["protocol"] = json!("1");
    let mut negative = welcome(0, 1 << 20);
    negative["protocol"] = json!(-1);
    for welcome in [missing, text, negative] {
        let seen = against_welcome(welcome.clone(), true).await;
        let found = WsError::find(&seen.error);
        assert!(
            matches!(found, Some(WsError::Protocol(_))),
            "{welcome}: {}",
            seen.error
        );
        assert!(!found.is_some_and(WsError::is_fatal), "{welcome}");
        assert!(seen.said.is_empty(), "nothing published: {:?}", seen.said);
        assert_ne!(seen.close, Some(4001), "{welcome}");
        assert!(seen.reconnected, "{welcome}: the client must try again");
        assert_eq!(seen.outbox, 1, "{welcome}: the event still waits");
    }
}

#[tokio::test]
async fn a_publish_refused_as_forbidden_stays_queued_and_goes_out_after_set_auth() {
    let provider: Arc<dyn StorageProvider> = Arc::new(InMemoryProvider::new());
    let server = start_with(RelayConfig::default(), provider.clone(), Arc::new(TestKeys)).await;
    let client = WebSocketSyncClient::builder(server.url(Some("guarded")))
        .auth(Auth::api_key("ro-key"))
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    client
        .send(Event::new("w1", "t", json!({"n": 1}), 1))
        .await
        .expect("queued");
    client
        .connect()
        .await
        .expect("a read-only grant may connect");
    eventually("the refusal", || {
        rec.count(|n| is_server_error(n, "forbidden")) == 1
    })
    .await;
    assert_eq!(client.outbox_len(), 1, "a refused event is not dropped");
    // Queued while publishing is refused: waits too (publishing now would be refused again).
    client
        .send(Event::new("w2", "t", json!({"n": 2}), 1))
        .await
        .expect("queued");
    assert_eq!(client.outbox_len(), 2);
    // Write credentials: the refused connection gives way to one that may publish.
    client
        .set_auth(Some(Auth::api_key("rw-key")))
        .expect("set_auth");
    eventually("both acknowledged", || client.outbox_len() == 0).await;
    let room = provider
        .existing(&LogName::Room(Name::new("guarded").expect("name")))
        .expect("ok")
        .expect("room exists");
    let mut ids: Vec<String> = room
        .read_since(0, 100)
        .expect("read")
        .into_iter()
        .map(|s| s.event.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["w1", "w2"]);
    assert_eq!(
        rec.count(|n| is_server_error(n, "forbidden")),
        1,
        "nothing more was published on the refused connection"
    );
    client.disconnect().await.expect("disconnect");
    server.stop().await;
}

#[tokio::test]
async fn a_storage_refusal_ends_the_session_and_the_events_go_again() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (publishes_tx, mut publishes) = mpsc::channel(4);
    let fake = tokio::spawn(async move {
        // First connection: the publish is refused, nothing stored.
        let mut ws = accept(&listener).await;
        send(&mut ws, welcome(0, 1 << 20)).await;
        let publish = next_json(&mut ws).await.expect("publish");
        publishes_tx.send(publish.clone()).await.expect("report");
        send(
            &mut ws,
            json!({"type": "error", "code": "storage", "message": "disk full; nothing was stored",
                "ref": publish["ref"]}),
        )
        .await;
        while next_json(&mut ws).await.is_some() {}
        // Second connection: the same events again, stored this time.
        let mut ws = accept(&listener).await;
        send(&mut ws, welcome(0, 1 << 20)).await;
        let publish = next_json(&mut ws).await.expect("publish again");
        publishes_tx.send(publish.clone()).await.expect("report");
        send(
            &mut ws,
            json!({"type": "ack", "ref": publish["ref"], "serverVersion": 1,
                "results": [{"status": "stored", "seq": 1}]}),
        )
        .await;
        while next_json(&mut ws).await.is_some() {}
    });
    let client = quick(&format!("ws://{addr}/ws"));
    let rec = Recorder::attach(&client);
    client
        .send(Event::new("s1", "t", json!({"n": 1}), 1))
        .await
        .expect("queued");
    client.connect().await.expect("connect");
    let first = publishes.recv().await.expect("first publish");
    assert_eq!(first["events"][0]["id"], "s1", "{first}");
    let second = tokio::time::timeout(Duration::from_secs(10), publishes.recv())
        .await
        .expect("published again after the reconnect")
        .expect("second publish");
    assert_eq!(second["events"][0]["id"], "s1", "{second}");
    eventually("acknowledged", || client.outbox_len() == 0).await;
    assert_eq!(rec.count(|n| is_server_error(n, "storage")), 1);
    client.disconnect().await.expect("disconnect");
    fake.await.expect("fake");
}

#[tokio::test]
async fn received_events_that_break_the_event_rules_are_skipped_and_the_cursor_moves_on() {
    // Version 0 and an empty type break the event rules: no storage may hold them. Taken in,
    // they were stored as they were (or refused by the storage on every reconnect).
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = tokio::spawn(async move {
        let mut ws = accept(&listener).await;
        send(&mut ws, welcome(2, 1 << 20)).await;
        let bad = json!({"id": "bad", "type": "t", "data": 1, "timestamp": 1, "version": 0});
        send(
            &mut ws,
            json!({"type": "events", "events": [
                {"seq": 1, "event": bad}, {"seq": 2, "event": event("good", 2)}]}),
        )
        .await;
        let untyped = json!({"id": "untyped", "type": "", "data": 1, "timestamp": 1, "version": 1});
        send(
            &mut ws,
            json!({"type": "snapshot", "serverVersion": 2, "last": true,
                "events": [untyped, event("snapped", 3)]}),
        )
        .await;
        while next_json(&mut ws).await.is_some() {}
    });
    let client = quick(&format!("ws://{addr}/ws"));
    let cursor = client.room_cursor_name();
    let rec = Recorder::attach(&client);
    let ksync = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync");
    ksync.connect().await.expect("connect");
    let replica = ksync.replica().clone();
    eventually("the valid events stored", || {
        let ids: Vec<String> = replica
            .storage()
            .read_since(0, 100)
            .expect("read")
            .into_iter()
            .map(|s| s.event.id)
            .collect();
        ids.contains(&"good".to_owned()) && ids.contains(&"snapped".to_owned())
    })
    .await;
    let mut ids: Vec<String> = replica
        .storage()
        .read_since(0, 100)
        .expect("read")
        .into_iter()
        .map(|s| s.event.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["good", "snapped"], "the invalid ones are not stored");
    assert_eq!(replica.cursor(&cursor).expect("cursor"), 2);
    let skipped: Vec<String> = rec
        .all()
        .into_iter()
        .filter_map(|n| match n {
            Notification::Error(e) => match WsError::find(&e) {
                Some(WsError::Protocol(why)) if why.contains("not a valid event") => {
                    Some(why.clone())
                }
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert!(skipped[0].contains("\"bad\""), "{skipped:?}");
    assert!(skipped[1].contains("\"untyped\""), "{skipped:?}");
    ksync.disconnect().await.expect("disconnect");
    fake.await.expect("fake");
}

#[tokio::test]
async fn a_known_message_that_does_not_decode_ends_the_session_and_loses_nothing() {
    // An `events` batch with one broken event does not decode. Skipped, its good event was
    // lost: the next batch moved the cursor past it. The session ends instead, and the next
    // one asks from the cursor it had.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (hellos_tx, mut hellos) = mpsc::channel(4);
    let fake = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        hellos_tx
            .send(next_json(&mut ws).await.expect("hello"))
            .await
            .expect("report");
        send(&mut ws, welcome(0, 1 << 20)).await;
        let broken = json!({"id": 5, "type": "t", "data": 1, "timestamp": 1, "version": 1});
        send(
            &mut ws,
            json!({"type": "events", "events": [
                {"seq": 1, "event": event("first", 1)}, {"seq": 2, "event": broken}]}),
        )
        .await;
        let _ = ws
            .send(Message::text(
                json!({"type": "events", "events": [{"seq": 3, "event": event("third", 3)}]})
                    .to_string(),
            ))
            .await;
        while next_json(&mut ws).await.is_some() {}
        // The next connection gets the room as it really is.
        let (tcp, _) = listener.accept().await.expect("accept again");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        hellos_tx
            .send(next_json(&mut ws).await.expect("hello"))
            .await
            .expect("report");
        send(&mut ws, welcome(3, 1 << 20)).await;
        send(
            &mut ws,
            json!({"type": "events", "events": [
                {"seq": 1, "event": event("first", 1)}, {"seq": 2, "event": event("second", 2)},
                {"seq": 3, "event": event("third", 3)}]}),
        )
        .await;
        while next_json(&mut ws).await.is_some() {}
    });
    let ksync = ksync_testkit::ksync_over(
        Arc::new(InMemoryStorage::new()),
        quick(&format!("ws://{addr}/ws")),
    )
    .await
    .expect("ksync");
    ksync.connect().await.expect("connect");
    let first = hellos.recv().await.expect("first hello");
    assert_eq!(first["type"], "hello", "{first}");
    let again = tokio::time::timeout(Duration::from_secs(10), hellos.recv())
        .await
        .expect("a second connection")
        .expect("second hello");
    assert_eq!(again["since"], 0, "asks again from where it was: {again}");
    let replica = ksync.replica().clone();
    eventually("every event stored", || replica.storage().len() == 3).await;
    ksync.disconnect().await.expect("disconnect");
    fake.await.expect("fake");
}

/// A batch whose seqs go backwards, [5, 3].
fn backwards_batch() -> Value {
    json!({"type": "events", "events": [
        {"seq": 5, "event": event("e5", 5)}, {"seq": 3, "event": event("e3", 3)}]})
}

#[tokio::test]
async fn a_batch_whose_seqs_go_backwards_does_not_move_the_cursor_back() {
    // The cursor was the batch's last seq: after [5, 3] it was 3, and the next batch's 5 was
    // delivered to the application a second time. The cursor is the highest seq seen, and an
    // entry at or below it is skipped (as ksync.js does), also across frames of one commit
    // (the relay splits a large one) and in deflated frames.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = tokio::spawn(async move {
        let mut ws = accept(&listener).await;
        // A client without a cursor starts at `serverVersion`: 2, below the batch.
        let mut welcome = welcome(2, 1 << 20);
        welcome["compression"] = json!(true);
        send(&mut ws, welcome).await;
        send(&mut ws, backwards_batch()).await;
        let next = json!({"type": "events", "events": [
            {"seq": 5, "event": event("e5", 5)}, {"seq": 6, "event": event("e6", 6)}]});
        ws.send(Message::binary(ksync_ws::protocol::deflate(
            next.to_string().as_bytes(),
        )))
        .await
        .expect("send");
        while next_json(&mut ws).await.is_some() {}
    });
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .compression(true)
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    eventually("e6 delivered", || {
        rec.event_ids().contains(&"e6".to_owned())
    })
    .await;
    assert_eq!(rec.event_ids(), ["e5", "e6"], "each seq once, never back");
    client.disconnect().await.expect("disconnect");
    fake.await.expect("fake");
}

#[tokio::test]
async fn a_replica_keeps_the_highest_seq_of_a_backwards_batch_as_its_cursor() {
    // KSync over the client: the stored room cursor was the batch's last seq (3), and the
    // next session asked for 4 and 5 again.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (hellos_tx, mut hellos) = mpsc::channel(4);
    let fake = tokio::spawn(async move {
        let mut ws = accept(&listener).await;
        send(&mut ws, welcome(5, 1 << 20)).await;
        send(&mut ws, backwards_batch()).await;
        // The session ends here; the client reconnects from the cursor it stored.
        ws.close(None).await.expect("close");
        while next_json(&mut ws).await.is_some() {}
        let (tcp, _) = listener.accept().await.expect("accept again");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        hellos_tx
            .send(next_json(&mut ws).await.expect("hello"))
            .await
            .expect("report");
        send(&mut ws, welcome(5, 1 << 20)).await;
        while next_json(&mut ws).await.is_some() {}
    });
    let client = quick(&format!("ws://{addr}/ws"));
    let cursor = client.room_cursor_name();
    let ksync = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync");
    ksync.connect().await.expect("connect");
    let again = tokio::time::timeout(Duration::from_secs(10), hellos.recv())
        .await
        .expect("a second connection")
        .expect("second hello");
    assert_eq!(again["since"], 5, "resumes after the highest seq: {again}");
    let replica = ksync.replica().clone();
    assert_eq!(replica.cursor(&cursor).expect("cursor"), 5);
    let ids: Vec<String> = replica
        .storage()
        .read_since(0, 100)
        .expect("read")
        .into_iter()
        .map(|s| s.event.id)
        .collect();
    assert_eq!(ids, ["e5"], "the entry below the cursor is not taken in");
    ksync.disconnect().await.expect("disconnect");
    fake.await.expect("fake");
}
