//! Rooms close once nobody uses them and reopen from their log: a client asking for many
//! room names (everyone may, without auth) cannot keep a log and a task open per name.

use crate::common;

use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use ksync_core::{AllowAll, InMemoryProvider, StorageProvider};
use ksync_storage_file::FileProvider;
use ksync_ws::server::RelayConfig;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn leave(mut ws: Raw) {
    ws.send(Message::Close(None)).await.expect("close");
    // Until the server's answer (or the end): the connection is then gone on its side too.
    while let Some(Ok(message)) = ws.next().await {
        if message.is_close() {
            break;
        }
    }
}

/// Joins `room`, publishes `events` (if any) and returns the acknowledged seqs.
async fn publish(url: &str, events: Vec<Value>) -> Vec<u64> {
    let (mut ws, _) = join(url, hello()).await;
    send_json(
        &mut ws,
        json!({"type": "publish", "ref": 1, "events": events}),
    )
    .await;
    let ack = recv_json(&mut ws).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let seqs = ack["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["seq"].as_u64().expect("stored"))
        .collect();
    leave(ws).await;
    seqs
}

/// Everything the room holds, by catch-up from 0.
async fn history(url: &str) -> Vec<(u64, String)> {
    let (mut ws, welcome) = join(url, json!({"type": "hello", "protocol": 1, "since": 0})).await;
    let last = welcome["serverVersion"].as_u64().expect("serverVersion");
    let mut seen = Vec::new();
    while seen.last().map_or(0, |(seq, _)| *seq) < last {
        let page = recv_json(&mut ws).await;
        for entry in page["events"].as_array().expect("events") {
            seen.push((
                entry["seq"].as_u64().expect("seq"),
                entry["event"]["id"].as_str().expect("id").to_owned(),
            ));
        }
    }
    leave(ws).await;
    seen
}

async fn connect_to_many_names(server: &Server, names: usize) {
    let relay = &server.relay;
    let mut most_open = 0;
    for batch in 0..names / 50 {
        let mut open = Vec::new();
        for n in 0..50 {
            let url = server.url(Some(&format!("r{batch}-{n}")));
            open.push(join(&url, hello()).await.0);
        }
        // Some never finish their handshake: they leave without a `hello`.
        let silent = raw_connect(&server.url(Some(&format!("silent{batch}"))), &[])
            .await
            .expect("connect");
        most_open = most_open.max(relay.open_rooms());
        for ws in open {
            leave(ws).await;
        }
        drop(silent);
        eventually("every room to close", || relay.open_rooms() == 0).await;
    }
    // One batch's rooms at a time, never thousands.
    assert!(most_open <= 51, "{most_open} rooms open at once");
    assert!(most_open >= 50, "the joined rooms were open: {most_open}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_nobody_uses_close_and_reopen_with_their_history_in_memory() {
    let server = start(RelayConfig::default()).await;
    closed_rooms_reopen_with_their_history(&server).await;
    connect_to_many_names(&server, 2000).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_nobody_uses_close_and_reopen_with_their_history_from_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider: Arc<dyn StorageProvider> =
        Arc::new(FileProvider::new(dir.path()).expect("provider"));
    let server = start_with(RelayConfig::default(), provider, Arc::new(AllowAll)).await;
    closed_rooms_reopen_with_their_history(&server).await;
    connect_to_many_names(&server, 500).await;
    server.stop().await;
}

async fn closed_rooms_reopen_with_their_history(server: &Server) {
    let relay = &server.relay;
    let url = server.url(Some("kept"));
    let mut expected = Vec::new();
    for round in 0..3u64 {
        let events: Vec<Value> = (0..3).map(|n| event(&format!("e{round}-{n}"), n)).collect();
        let ids: Vec<String> = events
            .iter()
            .map(|e| e["id"].as_str().expect("id").to_owned())
            .collect();
        let seqs = publish(&url, events).await;
        expected.extend(seqs.into_iter().zip(ids));
        eventually("the room to close", || relay.open_rooms() == 0).await;
        assert_eq!(history(&url).await, expected, "round {round}");
        eventually("the room to close", || relay.open_rooms() == 0).await;
    }
}

/// Joins racing the room's closing (the last subscriber leaving while others join) miss
/// nothing: each joiner either joins the closing room before it closes or the room opened
/// anew after its last commit, and sees every event stored before it joined, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_racing_a_closing_room_see_all_history() {
    let provider = Arc::new(InMemoryProvider::new());
    let server = start_with(RelayConfig::default(), provider, Arc::new(AllowAll)).await;
    let url = server.url(Some("race"));
    let mut stored = 0u64;
    for round in 0..100u64 {
        stored += publish(&url, vec![event(&format!("a{round}"), round)])
            .await
            .len() as u64;
        // The publisher just left: the room is closing while these join.
        let joins = (0..3).map(|_| {
            let url = url.clone();
            tokio::spawn(async move { history(&url).await })
        });
        for joined in joins {
            let seen = joined.await.expect("join");
            let seqs: Vec<u64> = seen.iter().map(|(seq, _)| *seq).collect();
            assert_eq!(seqs, (1..=stored).collect::<Vec<_>>(), "round {round}");
        }
    }
    eventually("every room to close", || server.relay.open_rooms() == 0).await;
    server.stop().await;
}

/// Joins `room` with `key` (hello, welcome) and leaves.
async fn visit(server: &Server, room: &str, key: &str) {
    let url = server.url(Some(room));
    let mut ws = raw_connect(&url, &[("x-api-key", key)])
        .await
        .unwrap_or_else(|status| panic!("join {room}: HTTP {status}"));
    send_json(&mut ws, hello()).await;
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    leave(ws).await;
}

/// A read-only grant may subscribe to any room name it is allowed; the rooms it only looked
/// at leave no log behind once they close (on disk or in memory), so the data directory grows
/// with what was written, not with the names asked for. A room with events keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_only_looked_at_leave_no_log_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let on_disk: Arc<dyn StorageProvider> =
        Arc::new(FileProvider::new(dir.path()).expect("provider"));
    let in_memory: Arc<dyn StorageProvider> = Arc::new(InMemoryProvider::new());
    for provider in [on_disk, in_memory] {
        let server = start_with(
            RelayConfig::default(),
            Arc::clone(&provider),
            Arc::new(TestKeys),
        )
        .await;
        // Written to, then only looked at: it keeps its event through every close.
        let url = server.url(Some("kept"));
        let (mut ws, _) = {
            let mut ws = raw_connect(&url, &[("x-api-key", "rw-key")])
                .await
                .expect("join");
            send_json(&mut ws, hello()).await;
            let welcome = recv_json(&mut ws).await;
            (ws, welcome)
        };
        send_json(
            &mut ws,
            json!({"type": "publish", "ref": 1, "events": [event("k", 1)]}),
        )
        .await;
        assert_eq!(recv_json(&mut ws).await["type"], "ack");
        leave(ws).await;
        for n in 0..100 {
            visit(&server, &format!("peek{n}"), "ro-key").await;
        }
        // A writer that joins and writes nothing leaves nothing either.
        visit(&server, "quiet", "rw-key").await;
        visit(&server, "kept", "ro-key").await;
        let relay = &server.relay;
        eventually("every room to close", || relay.open_rooms() == 0).await;
        let kept = vec![ksync_core::LogName::Room(
            ksync_core::Name::new("kept").expect("name"),
        )];
        eventually("the empty logs to go", || {
            provider.list().expect("list") == kept
        })
        .await;
        let mut ws = raw_connect(&url, &[("x-api-key", "ro-key")])
            .await
            .expect("join");
        send_json(&mut ws, json!({"type": "hello", "protocol": 1, "since": 0})).await;
        let welcome = recv_json(&mut ws).await;
        assert_eq!(
            welcome["serverVersion"], 1,
            "the written room keeps its event"
        );
        let page = recv_json(&mut ws).await;
        assert_eq!(page["events"][0]["event"]["id"], "k", "{page}");
        leave(ws).await;
        server.stop().await;
    }
    let files: Vec<_> = std::fs::read_dir(dir.path().join("rooms"))
        .expect("rooms dir")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(files, vec![std::ffi::OsString::from("kept.log")]);
}

/// With the file storage, a room name that differs only in case from a stored one (`notes`
/// beside `Notes`) is refused as a bad room name (one file where the file system ignores
/// case: the two rooms would share a log); the stored room works as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_name_that_differs_only_in_case_from_a_stored_one_is_a_bad_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider: Arc<dyn StorageProvider> =
        Arc::new(FileProvider::new(dir.path()).expect("provider"));
    let server = start_with(RelayConfig::default(), provider, Arc::new(AllowAll)).await;
    assert_eq!(
        publish(&server.url(Some("Notes")), vec![event("a", 1)]).await,
        [1]
    );
    let mut ws = raw_connect(
        &server.url(Some("notes")),
        &[("sec-websocket-protocol", "ksync.v1")],
    )
    .await
    .expect("upgraded to be refused in-band");
    let error = recv_json(&mut ws).await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("bad_room")),
        "{error}"
    );
    let message = error["message"].as_str().expect("message");
    assert!(message.contains("\"Notes\""), "{message}");
    assert_eq!(recv_close(&mut ws).await.0, 4400);
    assert_eq!(history(&server.url(Some("Notes"))).await.len(), 1);
    server.stop().await;
}

/// A provider whose first open waits until `gate` opens (a long log replay, say).
struct SlowFirstOpen {
    inner: InMemoryProvider,
    entered: std::sync::atomic::AtomicBool,
    gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl StorageProvider for SlowFirstOpen {
    fn open(
        &self,
        name: &ksync_core::LogName,
    ) -> Result<Arc<dyn ksync_core::Storage>, ksync_core::StorageError> {
        if !self.entered.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let (lock, opened) = &*self.gate;
            let mut open = lock.lock().expect("lock");
            while !*open {
                open = opened.wait(open).expect("wait");
            }
        }
        self.inner.open(name)
    }
    fn existing(
        &self,
        name: &ksync_core::LogName,
    ) -> Result<Option<Arc<dyn ksync_core::Storage>>, ksync_core::StorageError> {
        self.inner.existing(name)
    }
    fn list(&self) -> Result<Vec<ksync_core::LogName>, ksync_core::StorageError> {
        self.inner.list()
    }
}

/// `max_open_rooms` counts rooms, not joins: a second connection to a room whose log a first
/// one is still opening waits for that open, as it would join the room once open. At the cap
/// it took a place of its own and was refused with 503 `too many open rooms`, though only
/// one room was opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_of_a_room_being_opened_waits_for_it_at_the_cap() {
    let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let provider = Arc::new(SlowFirstOpen {
        inner: InMemoryProvider::new(),
        entered: std::sync::atomic::AtomicBool::new(false),
        gate: Arc::clone(&gate),
    });
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.max_open_rooms = 1;
            relay_config
        },
        provider.clone(),
        Arc::new(AllowAll),
    )
    .await;
    let url = server.url(Some("a"));
    let join = |url: String| tokio::spawn(async move { raw_connect(&url, &[]).await });
    let first = join(url.clone());
    eventually("the first open started", || {
        provider.entered.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let second = join(url.clone());
    // Not an assertion: only gives the second join the time to be refused, as it was.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    {
        let (lock, opened) = &*gate;
        *lock.lock().expect("lock") = true;
        opened.notify_all();
    }
    let mut first = first.await.expect("joined").expect("the first join");
    let second = second.await.expect("joined");
    assert_eq!(second.as_ref().err(), None, "the second join was refused");
    let mut second = second.expect("the second join");
    for ws in [&mut first, &mut second] {
        send_json(ws, hello()).await;
        assert_eq!(recv_json(ws).await["type"], "welcome");
    }
    assert_eq!(server.relay.open_rooms(), 1);
    // Still one room at most: another one is refused.
    assert_eq!(
        raw_connect(&server.url(Some("b")), &[]).await.err(),
        Some(503)
    );
    drop((first, second));
    server.stop().await;
}

/// Every room stored is a file kept until deleted by hand: past the provider's cap on stored
/// rooms a new room is refused before the upgrade with 507 (which clients retry later) and no
/// file is made, while the stored rooms take joins and events as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_room_past_the_stored_rooms_cap_is_refused_with_507() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider: Arc<dyn StorageProvider> = Arc::new(
        FileProvider::new(dir.path())
            .expect("provider")
            .with_limits(ksync_storage_file::StoreLimits::new(2, 2)),
    );
    let server = start_with(RelayConfig::default(), provider, Arc::new(AllowAll)).await;
    assert_eq!(
        publish(&server.url(Some("a")), vec![event("x", 1)]).await,
        [1]
    );
    assert_eq!(
        publish(&server.url(Some("b")), vec![event("x", 1)]).await,
        [1]
    );
    let request = {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        server
            .url(Some("c"))
            .into_client_request()
            .expect("request")
    };
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 507);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or(b""))
                .expect("a JSON body");
            assert_eq!(body, json!({"error": "too many rooms stored (at most 2)"}));
        }
        other => panic!("a third room: {:?}", other.map(|_| ())),
    }
    assert!(!dir.path().join("rooms").join("c.log").exists());
    assert_eq!(
        publish(&server.url(Some("a")), vec![event("y", 2)]).await,
        [2]
    );
    server.stop().await;
}
