//! Edges of the relay's contract (docs/PROTOCOL.md), spoken to with raw WebSocket frames as a
//! client written from the document alone would: frame sizes of the live stream, resuming
//! from odd cursors, state-based starts racing with publishes, exact limits, bad input on an
//! authorised connection.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use ksync_core::{
    BoxFuture, Event, InMemoryStorage, LogName, MergeOutcome, Name, Storage, StorageError,
    StorageProvider, Stored,
};
use ksync_ws::server::RelayConfig;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

/// A log whose appends wait, as a durable storage's wait on the disk: each append waits one
/// poll (so the room commits from its queue, in group commits), and waits while the gate is
/// closed.
struct GatedStorage {
    log: InMemoryStorage,
    appends: AtomicUsize,
    /// Most events one append carried.
    largest_append: AtomicUsize,
    open: Arc<AtomicBool>,
    opened: Arc<Notify>,
}

impl Storage for GatedStorage {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        Box::pin(async move {
            // Every append waits once, as a durable one does.
            self.appends.fetch_add(1, Ordering::SeqCst);
            self.largest_append
                .fetch_max(events.len(), Ordering::SeqCst);
            tokio::task::yield_now().await;
            while !self.open.load(Ordering::SeqCst) {
                let opened = self.opened.notified();
                if self.open.load(Ordering::SeqCst) {
                    break;
                }
                opened.await;
            }
            self.log.append(events).await
        })
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    ksync_testkit::storage_pass_through!(log);
}

/// Every log is a [`GatedStorage`] sharing one gate.
struct GatedProvider {
    logs: std::sync::Mutex<std::collections::HashMap<LogName, Arc<GatedStorage>>>,
    open: Arc<AtomicBool>,
    opened: Arc<Notify>,
}

impl GatedProvider {
    fn new() -> Self {
        Self {
            logs: Default::default(),
            open: Arc::new(AtomicBool::new(true)),
            opened: Arc::new(Notify::new()),
        }
    }

    fn close_gate(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    fn open_gate(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    /// The log of `room`, opened already.
    fn room_log(&self, room: &str) -> Arc<GatedStorage> {
        let name = LogName::Room(Name::new(room).expect("name"));
        let logs = self.logs.lock().expect("lock");
        logs.get(&name).cloned().expect("the room's log")
    }
}

impl StorageProvider for GatedProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        let mut logs = self.logs.lock().expect("lock");
        let log = logs.entry(name.clone()).or_insert_with(|| {
            Arc::new(GatedStorage {
                log: InMemoryStorage::default(),
                appends: AtomicUsize::new(0),
                largest_append: AtomicUsize::new(0),
                open: Arc::clone(&self.open),
                opened: Arc::clone(&self.opened),
            })
        });
        Ok(log.clone())
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        let logs = self.logs.lock().expect("lock");
        Ok(logs.get(name).map(|log| log.clone() as Arc<dyn Storage>))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        Ok(Vec::new())
    }
}

/// The next data frame's text (inflated when binary) and its JSON, skipping pings.
async fn recv_text(ws: &mut Raw) -> (usize, Value) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("stream open")
            .expect("no error");
        match message {
            Message::Text(t) => {
                return (t.len(), serde_json::from_str(t.as_str()).expect("json"));
            }
            Message::Binary(b) => {
                let json = ksync_ws::protocol::inflate(&b, 1 << 26).expect("inflate");
                return (json.len(), serde_json::from_slice(&json).expect("json"));
            }
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

/// Live `events` frames are at most `maxMessageSize` bytes, as catch-up pages are: publishes
/// queued behind a slow append are committed together, and the events the others get for
/// them come in several frames (they came as one frame of any size, which the subscribers'
/// sockets refused: they were reset without a close).
#[tokio::test]
async fn a_group_commit_of_large_publishes_reaches_subscribers_in_bounded_frames() {
    let provider = Arc::new(GatedProvider::new());
    let max = 64 * 1024;
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.max_message_size = max;
            relay_config
        },
        provider.clone(),
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("big"));
    let (mut subscriber, _) = join(&url, hello()).await;
    let (mut compressed, _) = join(
        &url,
        json!({"type":"hello","protocol":1,"compression":true}),
    )
    .await;
    let (mut publisher, _) = join(&url, hello()).await;
    // The first append waits once: the room commits from its queue from now on.
    send_json(
        &mut publisher,
        json!({"type":"publish","ref":0,"events":[event("first",0)]}),
    )
    .await;
    assert_eq!(
        recv_json(&mut publisher).await["results"][0]["status"],
        "stored"
    );
    provider.close_gate();
    let total = 40u64;
    for n in 1..=total {
        let mut e = event(&format!("big{n}"), n);
        e["data"] = json!("z".repeat(max / 3));
        send_json(
            &mut publisher,
            json!({"type":"publish","ref":n,"events":[e]}),
        )
        .await;
    }
    // The first in its append at the gate, the others queued behind it: one group commit.
    eventually("every publish queued", || {
        server
            .relay
            .backlog("big")
            .is_some_and(|b| b.publishes == total as usize)
    })
    .await;
    provider.open_gate();
    for n in 1..=total {
        let ack = recv_json(&mut publisher).await;
        assert_eq!(ack["ref"], n, "{ack}");
        assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    }
    let log = provider.room_log("big");
    // Group commits of many (bounded in bytes, so not all 39 in one).
    let largest = log.largest_append.load(Ordering::SeqCst);
    assert!(largest > 10, "{largest} publishes at most in one append");
    for ws in [&mut subscriber, &mut compressed] {
        let mut seqs = Vec::new();
        while seqs.len() < total as usize + 1 {
            let (len, batch) = recv_text(ws).await;
            assert!(
                len <= max,
                "an events frame of {len} bytes, over maxMessageSize ({max})"
            );
            for e in batch["events"].as_array().expect("events") {
                seqs.push(e["seq"].as_u64().expect("seq"));
            }
        }
        assert_eq!(seqs, (1..=total + 1).collect::<Vec<_>>());
    }
    server.stop().await;
}

/// `since` beyond the head: the documented `cursor_ahead` error (no `ref`), the connection
/// stays, the stream continues from `welcome.serverVersion`.
#[tokio::test]
async fn a_cursor_beyond_the_head_gets_cursor_ahead_and_the_live_stream() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("ahead"));
    let (mut publisher, _) = join(&url, hello()).await;
    send_json(
        &mut publisher,
        json!({"type":"publish","ref":1,"events":[event("a",1), event("b",2)]}),
    )
    .await;
    recv_json(&mut publisher).await;
    let (mut ahead, welcome) = join(&url, json!({"type":"hello","protocol":1,"since":99})).await;
    assert_eq!(welcome["serverVersion"], 2);
    let error = recv_json(&mut ahead).await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "cursor_ahead", "{error}");
    assert!(error["message"].is_string(), "{error}");
    assert!(error.get("ref").is_none(), "{error}");
    // `since` equal to the head: no catch-up at all, then live.
    let (mut at_head, _) = join(&url, json!({"type":"hello","protocol":1,"since":2})).await;
    // `since` 0 on this room: the whole history.
    let (mut whole, _) = join(&url, json!({"type":"hello","protocol":1,"since":0})).await;
    send_json(
        &mut publisher,
        json!({"type":"publish","ref":2,"events":[event("c",3)]}),
    )
    .await;
    recv_json(&mut publisher).await;
    for ws in [&mut ahead, &mut at_head] {
        let batch = recv_json(ws).await;
        assert_eq!(batch["type"], "events", "{batch}");
        assert_eq!(batch["events"][0]["seq"], 3, "{batch}");
    }
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        for e in recv_json(&mut whole).await["events"]
            .as_array()
            .expect("events")
        {
            seqs.push(e["seq"].as_u64().expect("seq"));
        }
    }
    assert_eq!(seqs, [1, 2, 3]);
    // The connection that was ahead still publishes.
    send_json(
        &mut ahead,
        json!({"type":"publish","ref":7,"events":[event("d",4)]}),
    )
    .await;
    assert_eq!(
        recv_json(&mut ahead).await["results"][0],
        json!({"status":"stored","seq":4})
    );
    // An empty room: `since` 0 means nothing to catch up, then live.
    let empty = server.url(Some("empty"));
    let (mut fresh, welcome) = join(&empty, json!({"type":"hello","protocol":1,"since":0})).await;
    assert_eq!(welcome["serverVersion"], 0);
    let (mut p, _) = join(&empty, hello()).await;
    send_json(
        &mut p,
        json!({"type":"publish","ref":1,"events":[event("x",1)]}),
    )
    .await;
    assert_eq!(recv_json(&mut fresh).await["events"][0]["seq"], 1);
    server.stop().await;
}

/// State-based starts while a publisher streams updates of a few ids: each snapshot is the
/// latest version of every id as of its `serverVersion`, and the tail continues right after
/// it, every seq once, in order (commits in place or from the room's queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_subscribers_joining_mid_stream_get_a_consistent_snapshot_and_tail() {
    // Committed in place (in memory), and from the room's queue (appends that wait).
    let providers: [Arc<dyn StorageProvider>; 2] = [
        Arc::new(ksync_core::InMemoryProvider::new()),
        Arc::new(GatedProvider::new()),
    ];
    for provider in providers {
        state_start_racing_publishes(provider).await;
    }
}

async fn state_start_racing_publishes(provider: Arc<dyn StorageProvider>) {
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.page_size = 2;
            relay_config
        },
        provider,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("state"));
    let (mut publisher, _) = join(&url, hello()).await;
    let total = 240u64;
    let ids = 5u64;
    let revision = |n: u64| {
        // Seq n (1-based) is version (n-1)/ids + 1 of id k{(n-1) % ids}.
        let mut e = event(&format!("k{}", (n - 1) % ids), n);
        e["version"] = json!((n - 1) / ids + 1);
        e
    };
    let sender = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut joined = Vec::new();
            for n in 1..=total {
                if n % 40 == 0 {
                    let compression = n % 80 == 0;
                    let h = json!({"type":"hello","protocol":1,"state":true,"since":3,"compression":compression});
                    joined.push(join(&url, h).await);
                }
                tokio::task::yield_now().await;
            }
            joined
        })
    };
    for n in 1..=total {
        send_json(
            &mut publisher,
            json!({"type":"publish","ref":n,"events":[revision(n)]}),
        )
        .await;
        if n % 16 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let joined = sender.await.expect("joiners");
    for n in 1..=total {
        let ack = recv_json(&mut publisher).await;
        assert_eq!(
            ack["results"][0],
            json!({"status":"stored","seq":n}),
            "{ack}"
        );
    }
    for (mut ws, welcome) in joined {
        let version = welcome["serverVersion"].as_u64().expect("serverVersion");
        let mut state = BTreeMap::new();
        loop {
            let page = recv_json(&mut ws).await;
            assert_eq!(page["type"], "snapshot", "{page}");
            assert_eq!(page["serverVersion"], version, "{page}");
            for e in page["events"].as_array().expect("events") {
                let id = e["id"].as_str().expect("id").to_owned();
                assert!(
                    state
                        .insert(id, e["version"].as_u64().expect("v"))
                        .is_none()
                );
            }
            if page["last"] == true {
                assert_eq!(page["events"], json!([]), "{page}");
                break;
            }
        }
        let mut expected = BTreeMap::new();
        for n in 1..=version {
            let e = revision(n);
            expected.insert(
                e["id"].as_str().expect("id").to_owned(),
                e["version"].as_u64().expect("v"),
            );
        }
        assert_eq!(state, expected, "snapshot as of {version}");
        let mut seqs = Vec::new();
        while seqs.len() < (total - version) as usize {
            let batch = recv_json(&mut ws).await;
            assert_eq!(batch["type"], "events", "{batch}");
            for e in batch["events"].as_array().expect("events") {
                seqs.push(e["seq"].as_u64().expect("seq"));
            }
        }
        assert_eq!(seqs, (version + 1..=total).collect::<Vec<_>>());
    }
    server.stop().await;
}

/// A message of exactly `maxMessageSize` bytes is accepted, one byte more closes with 1009;
/// a compressed publish may inflate to exactly the limit, not beyond (`bad_binary`, 1003).
#[tokio::test]
async fn messages_exactly_at_the_size_limit_are_accepted() {
    let max = 16 * 1024;
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.max_message_size = max;
        relay_config
    })
    .await;
    let url = server.url(Some("limit"));
    let (mut other, _) = join(&url, hello()).await;
    let publish_of = |id: &str, len: usize| {
        let mut e = event(id, 1);
        e["data"] = json!("");
        let bare = json!({"type":"publish","ref":1,"events":[e.clone()]}).to_string();
        e["data"] = json!("p".repeat(len - bare.len()));
        let text = json!({"type":"publish","ref":1,"events":[e]}).to_string();
        assert_eq!(text.len(), len);
        text
    };
    let (mut ws, _) = join(&url, hello()).await;
    ws.send(Message::text(publish_of("exact", max)))
        .await
        .expect("send");
    assert_eq!(recv_json(&mut ws).await["results"][0]["status"], "stored");
    assert_eq!(
        recv_json(&mut other).await["events"][0]["event"]["id"],
        "exact"
    );
    ws.send(Message::text(publish_of("over", max + 1)))
        .await
        .expect("send");
    assert_eq!(recv_close(&mut ws).await.0, 1009);

    let (mut deflating, _) = join(
        &url,
        json!({"type":"hello","protocol":1,"compression":true}),
    )
    .await;
    let packed = ksync_ws::protocol::deflate(publish_of("inflated-exact", max).as_bytes());
    deflating.send(Message::binary(packed)).await.expect("send");
    assert_eq!(
        recv_json(&mut deflating).await["results"][0]["status"],
        "stored"
    );
    let packed = ksync_ws::protocol::deflate(publish_of("inflated-over", max + 1).as_bytes());
    deflating.send(Message::binary(packed)).await.expect("send");
    assert_eq!(recv_json(&mut deflating).await["code"], "bad_binary");
    assert_eq!(recv_close(&mut deflating).await.0, 1003);
    assert_eq!(
        recv_json(&mut other).await["events"][0]["event"]["id"],
        "inflated-exact"
    );
    server.stop().await;
}

/// Publishes with a bad `ref` or duplicate keys are `bad_message` (nothing stored, the
/// connection stays); events with duplicate keys or of the wrong shape are `invalid` one by
/// one; ids with path tricks and control characters are just ids, relayed and stored as sent.
#[tokio::test]
async fn bad_publishes_on_an_authorised_connection_are_refused_and_store_nothing() {
    let provider = Arc::new(ksync_core::InMemoryProvider::new());
    let server = start_with(RelayConfig::default(), provider.clone(), Arc::new(TestKeys)).await;
    let url = server.url(Some("bad"));
    let mut ws = raw_connect(&url, &[("x-api-key", "rw-key")])
        .await
        .expect("connect");
    send_json(&mut ws, hello()).await;
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");
    let e = event("e", 1).to_string();
    let bad = [
        format!(r#"{{"type":"publish","ref":18446744073709551616,"events":[{e}]}}"#),
        format!(r#"{{"type":"publish","ref":-1,"events":[{e}]}}"#),
        format!(r#"{{"type":"publish","ref":1.5,"events":[{e}]}}"#),
        format!(r#"{{"type":"publish","ref":"1","events":[{e}]}}"#),
        format!(r#"{{"type":"publish","ref":1,"ref":2,"events":[{e}]}}"#),
        format!(r#"{{"type":"publish","type":"publish","ref":1,"events":[{e}]}}"#),
        format!(r#"{{"type":"publish","ref":1,"events":[{e}],"events":[{e}]}}"#),
        format!(r#"{{"type":"publish","ref":1,"events":{e}}}"#),
        format!(r#"{{"type":"publish","ref":1,"events":[{e}]"#),
    ];
    for message in &bad {
        ws.send(Message::text(message.clone())).await.expect("send");
        let answer = recv_json(&mut ws).await;
        assert_eq!(answer["type"], "error", "{message} -> {answer}");
        assert_eq!(answer["code"], "bad_message", "{message} -> {answer}");
    }
    let room = LogName::Room(Name::new("bad").expect("name"));
    let stored = || {
        provider
            .existing(&room)
            .expect("ok")
            .map_or(0, |log| log.len())
    };
    assert_eq!(stored(), 0);
    // Events one by one.
    let events = [
        r#"{"id":"a","id":"b","type":"t","data":1,"timestamp":1,"version":1}"#,
        r#"{"id":"a","type":"t","data":1,"timestamp":1,"version":-1}"#,
        r#"{"id":"a","type":"t","data":1,"timestamp":1.5,"version":1}"#,
        r#"{"id":"a","type":"t","data":1,"timestamp":1,"version":0}"#,
        // Past 2^53 - 1: ksync.js could not read them (it would skip what others store).
        r#"{"id":"a","type":"t","data":1,"timestamp":9007199254740992,"version":1}"#,
        r#"{"id":"a","type":"t","data":1,"timestamp":1,"version":18446744073709551615}"#,
        r#"{"id":"a","type":"t","data":1,"timestamp":1,"version":1,"extra":true}"#,
        r#"{"id":5,"type":"t","data":1,"timestamp":1,"version":1}"#,
        r#"[1,2]"#,
        r#"null"#,
    ];
    let message = format!(
        r#"{{"type":"publish","ref":5,"events":[{}]}}"#,
        events.join(",")
    );
    ws.send(Message::text(message)).await.expect("send");
    let ack = recv_json(&mut ws).await;
    assert_eq!(ack["ref"], 5, "{ack}");
    let results = ack["results"].as_array().expect("results");
    assert_eq!(results.len(), events.len(), "{ack}");
    for (result, event) in results.iter().zip(events) {
        assert_eq!(result["status"], "invalid", "{event} -> {result}");
        assert!(result["message"].is_string(), "{result}");
    }
    assert_eq!(stored(), 0);
    // Odd but valid ids.
    let odd = [
        "../../etc/passwd",
        "a/b\\c",
        "%2E%2E%2F",
        "nul\u{0}byte",
        "tab\tnew\nline\u{1b}[31m",
        "\u{202e}rtl",
    ];
    let events: Vec<Value> = odd
        .iter()
        .enumerate()
        .map(|(i, id)| event(id, i as u64))
        .collect();
    send_json(&mut ws, json!({"type":"publish","ref":6,"events":events})).await;
    let ack = recv_json(&mut ws).await;
    for (i, result) in ack["results"]
        .as_array()
        .expect("results")
        .iter()
        .enumerate()
    {
        assert_eq!(*result, json!({"status":"stored","seq":i + 1}), "{ack}");
    }
    let (mut reader, _) = {
        let mut r = raw_connect(&url, &[("x-api-key", "ro-key")])
            .await
            .expect("connect");
        send_json(&mut r, json!({"type":"hello","protocol":1,"since":0})).await;
        let w = recv_json(&mut r).await;
        (r, w)
    };
    let batch = recv_json(&mut reader).await;
    let ids: Vec<&str> = batch["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["event"]["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, odd);
    // The read-only reader may not publish, whatever it sends.
    send_json(
        &mut reader,
        json!({"type":"publish","ref":8,"events":[event("ro",1)]}),
    )
    .await;
    let refusal = recv_json(&mut reader).await;
    assert_eq!(
        (refusal["code"].as_str(), refusal["ref"].as_u64()),
        (Some("forbidden"), Some(8))
    );
    assert_eq!(stored(), odd.len() as u64);
    server.stop().await;
}

/// An `ack` carries `held` revisions only while it stays within `maxMessageSize`: many small
/// events of one publish conflicting with one large stored revision made an ack of their
/// product (each `conflict` carried the revision in full: 18 GiB for a 1 MiB publish against
/// a 1 MiB revision). The first conflict carries it, the others come without `held`, the ack
/// is within the documented bound, and the publisher's connection goes on; the same after a
/// reconnect.
#[tokio::test]
async fn an_ack_for_many_conflicts_with_a_large_revision_stays_within_the_message_limit() {
    let max = 16 * 1024;
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.max_message_size = max;
        relay_config
    })
    .await;
    let url = server.url(Some("held"));
    let (mut writer, _) = join(&url, hello()).await;
    // Large stored revisions, each alone nearly a message.
    let docs = 6;
    for n in 0..docs {
        let mut large = event(&format!("doc{n}"), 1);
        large["data"] = json!("h".repeat(max - 300));
        send_json(
            &mut writer,
            json!({"type":"publish","ref":n + 1,"events":[large]}),
        )
        .await;
        assert_eq!(
            recv_json(&mut writer).await["results"][0]["status"],
            "stored"
        );
    }
    // One tiny conflicting revision of each, in one publish.
    let conflicting: Vec<Value> = (0..docs)
        .map(|n| {
            let mut e = event(&format!("doc{n}"), 1);
            e["data"] = json!(n);
            e
        })
        .collect();
    let publish = json!({"type":"publish","ref":99,"events":conflicting});
    assert!(publish.to_string().len() <= max);
    for attempt in 0..2u64 {
        let (mut ws, _) = join(&url, hello()).await;
        send_json(&mut ws, publish.clone()).await;
        let (len, ack) = recv_text(&mut ws).await;
        // With `held` in every result it was `docs` times a near-message revision.
        assert!(len <= 2 * max, "attempt {attempt}: the ack is {len} bytes");
        assert_eq!(ack["ref"], 99);
        assert_eq!(ack["serverVersion"], docs + attempt);
        let results = ack["results"].as_array().expect("results");
        assert_eq!(results.len(), conflicting.len());
        assert!(results.iter().all(|r| r["status"] == "conflict"));
        assert_eq!(
            results[0]["held"]["data"].as_str().map(str::len),
            Some(max - 300),
            "the first held revision fits"
        );
        assert!(
            results[1..].iter().all(|r| r.get("held").is_none()),
            "the others go without"
        );
        // The connection is still usable, and the revisions are in the log for the client.
        send_json(
            &mut ws,
            json!({"type":"publish","ref":100,"events":[event(&format!("after{attempt}"), 1)]}),
        )
        .await;
        assert_eq!(recv_json(&mut ws).await["results"][0]["status"], "stored");
        let (mut reader, _) = join(&url, json!({"type":"hello","protocol":1,"since":0})).await;
        let (_, page) = recv_text(&mut reader).await;
        assert_eq!(
            page["events"][0]["event"]["data"].as_str().map(str::len),
            Some(max - 300)
        );
    }
    server.stop().await;
}

/// A connection that has not said `hello` yet when the relay shuts down is closed with 1001
/// at once, like the others: it neither waits out the handshake timeout nor holds up the
/// shutdown.
#[tokio::test]
async fn a_connection_still_in_its_handshake_is_closed_with_1001_at_shutdown() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.handshake_timeout = Duration::from_secs(60);
        relay_config.write_timeout = Duration::from_secs(60);
        relay_config
    })
    .await;
    let url = server.url(Some("early"));
    let mut silent = raw_connect(&url, &[]).await.expect("connect");
    let (mut joined, _) = join(&url, hello()).await;
    let relay = server.relay.clone();
    let stopping = tokio::spawn(async move { relay.shutdown().await });
    assert_eq!(recv_close(&mut joined).await.0, 1001);
    assert_eq!(recv_close(&mut silent).await.0, 1001);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the shutdown does not wait for the handshake timeout")
        .expect("shutdown");
    server.task.abort();
}

/// One subscriber stops reading while a publisher sends `total` events of 64 KiB to room
/// `room` and a reader per entry of `compression` (asking for deflated batches or not) reads:
/// the readers get every event, in order, and the slow one is closed with 4008.
async fn slow_consumer_case(config: RelayConfig, room: &str, compression: &[bool], total: u64) {
    let server = start(config).await;
    let url = server.url(Some(room));
    let (mut slow, _) = join(&url, hello()).await;
    let mut readers = Vec::new();
    for &compression in compression {
        let h = json!({"type":"hello","protocol":1,"compression":compression});
        let (mut ws, _) = join(&url, h).await;
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            while seqs.len() < total as usize {
                let (_, batch) = recv_text(&mut ws).await;
                assert_eq!(batch["type"], "events", "{batch}");
                for e in batch["events"].as_array().expect("events") {
                    seqs.push(e["seq"].as_u64().expect("seq"));
                }
            }
            seqs
        }));
    }
    let (mut publisher, _) = join(&url, hello()).await;
    for n in 1..=total {
        let mut e = event(&format!("e{n}"), n);
        e["data"] = json!("w".repeat(64 * 1024));
        send_json(
            &mut publisher,
            json!({"type":"publish","ref":n,"events":[e]}),
        )
        .await;
        assert_eq!(recv_json(&mut publisher).await["results"][0]["seq"], n);
    }
    for reader in readers {
        assert_eq!(
            reader.await.expect("reader"),
            (1..=total).collect::<Vec<_>>()
        );
    }
    assert_eq!(recv_close(&mut slow).await.0, 4008);
    server.stop().await;
}

/// While one subscriber stops reading and is closed with 4008, the others (plain and
/// compressed) keep receiving every event, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_dropped_while_the_others_receive_everything() {
    let config = {
        let mut relay_config = RelayConfig::default();
        relay_config.subscriber_queue = 4;
        relay_config
    };
    slow_consumer_case(config, "mixed", &[false, true, false], 150).await;
}

/// Subscribers resuming from a cursor in the middle of the history while a publisher streams
/// into a room whose appends wait (group commits from the room's queue, joins queued between
/// them): each sees every seq after its cursor once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_mid_history_during_group_commits_has_no_gap_and_no_duplicate() {
    let provider = Arc::new(GatedProvider::new());
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.page_size = 5;
            relay_config
        },
        provider,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("seam"));
    let (publisher, _) = join(&url, hello()).await;
    let (mut sink, mut acks) = publisher.split();
    let total = 400u64;
    let sending = tokio::spawn(async move {
        for n in 1..=total {
            let publish = json!({"type":"publish","ref":n,"events":[event(&format!("e{n}"), n)]});
            sink.send(Message::text(publish.to_string()))
                .await
                .expect("send");
        }
        sink
    });
    let mut joined = Vec::new();
    for n in 1..=total {
        let message = tokio::time::timeout(Duration::from_secs(10), acks.next())
            .await
            .expect("an ack within 10 s")
            .expect("open")
            .expect("ok");
        let ack: Value = serde_json::from_str(message.to_text().expect("text")).expect("json");
        assert_eq!(
            ack["results"][0],
            json!({"status":"stored","seq":n}),
            "{ack}"
        );
        if n % 50 == 0 {
            let since = n - 17;
            let compression = n % 100 == 0;
            let h = json!({"type":"hello","protocol":1,"since":since,"compression":compression});
            joined.push((since, join(&url, h).await.0));
        }
    }
    let _sink = sending.await.expect("sender");
    for (since, mut ws) in joined {
        let mut seqs = Vec::new();
        while seqs.len() < (total - since) as usize {
            let (_, batch) = recv_text(&mut ws).await;
            assert_eq!(batch["type"], "events", "{batch}");
            for e in batch["events"].as_array().expect("events") {
                seqs.push(e["seq"].as_u64().expect("seq"));
            }
        }
        assert_eq!(
            seqs,
            (since + 1..=total).collect::<Vec<_>>(),
            "since {since}"
        );
    }
    server.stop().await;
}

/// A client that closes (after `hello`, or before it) gets the close handshake completed
/// (RFC 6455 5.5.1: the server echoes the close frame), not a dropped socket, and its
/// connection slot is freed.
#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("bye"));
    let (joined, _) = join(&url, hello()).await;
    let early = raw_connect(&url, &[]).await.expect("connect");
    for (what, mut ws) in [("after hello", joined), ("before hello", early)] {
        ws.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .expect("close");
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("an answer within 5 s")
            {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("{what}: expected the close echoed, got {other:?}"),
            }
        };
        assert_eq!(answer, Some(1000), "{what}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.relay.connections() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "slots not freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
}

/// A `hello` that does not decode is a bad first message (`protocol`, 4000); one that names
/// another protocol number is `unsupported_protocol` (4001), as PROTOCOL.md says, whatever its
/// other fields: the version is read first, so a client of another version whose `hello`
/// holds fields of other shapes (a `since` that is no longer a number) is told the version
/// differs, not that its message is malformed.
#[tokio::test]
async fn hellos_that_do_not_decode_are_bad_first_messages() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("hello"));
    let cases = [
        (json!({"type":"hello"}), "protocol", 4000),
        (json!({"type":"hello","protocol":"1"}), "protocol", 4000),
        (
            json!({"type":"hello","protocol":1,"since":-1}),
            "protocol",
            4000,
        ),
        (
            json!({"type":"hello","protocol":1,"state":"yes"}),
            "protocol",
            4000,
        ),
        (
            json!({"type":"hello","protocol":2}),
            "unsupported_protocol",
            4001,
        ),
        (
            json!({"type":"hello","protocol":0}),
            "unsupported_protocol",
            4001,
        ),
        (
            json!({"type":"hello","protocol":2,"since":"opaque-v2-cursor"}),
            "unsupported_protocol",
            4001,
        ),
        (
            json!({"type":"hello","protocol":2,"state":{"mode":"full"},"compression":"zstd"}),
            "unsupported_protocol",
            4001,
        ),
        (
            json!({"type":"hello","protocol":4_294_967_297u64}),
            "unsupported_protocol",
            4001,
        ),
        (json!({"type":"hello","protocol":-1}), "protocol", 4000),
        (json!({"type":"hello","protocol":1.5}), "protocol", 4000),
    ];
    for (hello, code, close) in cases {
        let mut ws = raw_connect(&url, &[]).await.expect("connect");
        send_json(&mut ws, hello.clone()).await;
        let error = recv_json(&mut ws).await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some(code)),
            "{hello}"
        );
        assert_eq!(recv_close(&mut ws).await.0, close, "{hello}");
    }
    server.stop().await;
}

/// One publish is one append whatever the group-commit limit: a publish of many more events
/// than `max_batch_events` is acknowledged in one `ack`, seqs in order, and the others get
/// its events in frames of at most `maxMessageSize`.
#[tokio::test]
async fn a_publish_larger_than_the_group_commit_limit_is_one_append() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.max_batch_events = 8;
        relay_config.max_message_size = 64 * 1024;
        relay_config
    })
    .await;
    let url = server.url(Some("many"));
    let (mut other, _) = join(&url, hello()).await;
    let (mut ws, _) = join(&url, hello()).await;
    // Just under the message limit: with their seqs, the events need more than one frame.
    let total = 780u64;
    let events: Vec<Value> = (1..=total).map(|n| event(&format!("m{n}"), n)).collect();
    let publish = json!({"type":"publish","ref":1,"events":events}).to_string();
    assert!(publish.len() < 64 * 1024 && publish.len() + 20 * total as usize > 64 * 1024);
    ws.send(Message::text(publish)).await.expect("send");
    let ack = recv_json(&mut ws).await;
    let results = ack["results"].as_array().expect("results");
    assert_eq!(results.len(), total as usize);
    for (n, result) in (1..=total).zip(results) {
        assert_eq!(*result, json!({"status":"stored","seq":n}));
    }
    assert_eq!(ack["serverVersion"], total);
    let (mut seqs, mut frames) = (Vec::new(), 0);
    while seqs.len() < total as usize {
        let (len, batch) = recv_text(&mut other).await;
        frames += 1;
        assert!(len <= 64 * 1024, "{len}");
        for e in batch["events"].as_array().expect("events") {
            seqs.push(e["seq"].as_u64().expect("seq"));
        }
    }
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    assert!(frames > 1);
    server.stop().await;
}

/// Logs whose opening blocks until released (as a large file log's replay does), for one room
/// name; every other log opens at once.
struct SlowOpening {
    logs: ksync_core::InMemoryProvider,
    slow: &'static str,
    started: AtomicBool,
    released: std::sync::Mutex<bool>,
    release: std::sync::Condvar,
}

impl StorageProvider for SlowOpening {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        if *name == LogName::Room(Name::new(self.slow).expect("name")) {
            self.started.store(true, Ordering::SeqCst);
            let mut released = self.released.lock().expect("lock");
            while !*released {
                released = self.release.wait(released).expect("wait");
            }
        }
        self.logs.open(name)
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        self.logs.existing(name)
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.logs.list()
    }
}

/// A room whose log takes long to open (a big log replayed after a restart) holds up only
/// the connections to that room: the relay runs on its own two-worker runtime, and a client
/// of another room connects, publishes and is acknowledged meanwhile (the opening ran on a
/// runtime worker under the relay's room-map lock: both workers stalled, every room froze).
#[tokio::test]
async fn a_slow_opening_room_does_not_hold_up_other_rooms() {
    let provider = Arc::new(SlowOpening {
        logs: ksync_core::InMemoryProvider::new(),
        slow: "big",
        started: AtomicBool::new(false),
        released: std::sync::Mutex::new(false),
        release: std::sync::Condvar::new(),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let served = Arc::clone(&provider);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _server = serve_on(
                listener,
                RelayConfig::default(),
                served,
                Arc::new(ksync_core::AllowAll),
            );
            std::future::pending::<()>().await;
        });
    });
    let slow = tokio::spawn(async move {
        let url = format!("ws://{addr}/ws/big");
        join(&url, json!({"type":"hello","protocol":1,"since":0})).await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !provider.started.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow room never opened"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let other_room = tokio::time::timeout(Duration::from_secs(10), async {
        for room in ["a", "b", "c"] {
            let (mut ws, _) = join(&format!("ws://{addr}/ws/{room}"), hello()).await;
            send_json(
                &mut ws,
                json!({"type":"publish","ref":1,"events":[event("x", 1)]}),
            )
            .await;
            assert_eq!(recv_json(&mut ws).await["results"][0]["seq"], 1);
        }
    })
    .await;
    *provider.released.lock().expect("lock") = true;
    provider.release.notify_all();
    other_room.expect("other rooms work while one is opening");
    let (_ws, welcome) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the slow room opens once released")
        .expect("join");
    assert_eq!(welcome["room"], "big");
}

/// Logs that cannot build their state nor read their events (a storage failure): a
/// state-based start is closed with 1011 (server storage failure), and the room keeps
/// serving everyone else.
struct NoState(ksync_core::InMemoryProvider);

struct NoStateLog(Arc<dyn Storage>);

impl Storage for NoStateLog {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        self.0.append(events)
    }
    fn read_since(&self, _after: u64, _limit: usize) -> Result<Vec<Stored>, StorageError> {
        Err(StorageError::Format("events unavailable".into()))
    }
    fn get(&self, id: &str, version: u64) -> Result<Option<Stored>, StorageError> {
        self.0.get(id, version)
    }
    fn latest(&self, id: &str) -> Result<Option<Stored>, StorageError> {
        self.0.latest(id)
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn state(&self) -> Result<BTreeMap<String, Event>, StorageError> {
        Err(StorageError::Format("state unavailable".into()))
    }
    fn meta(&self, key: &str) -> Result<Option<String>, StorageError> {
        self.0.meta(key)
    }
    fn set_meta(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.0.set_meta(key, value)
    }
}

impl StorageProvider for NoState {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(Arc::new(NoStateLog(self.0.open(name)?)))
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        self.0.existing(name)
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.0.list()
    }
}

#[tokio::test]
async fn a_storage_failure_while_joining_closes_with_1011() {
    let server = start_with(
        RelayConfig::default(),
        Arc::new(NoState(ksync_core::InMemoryProvider::new())),
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("broken"));
    let (mut ws, _) = join(&url, hello()).await;
    // A snapshot of an empty log reads nothing.
    send_json(
        &mut ws,
        json!({"type":"publish","ref":0,"events":[event("first", 0)]}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["results"][0]["status"], "stored");
    let mut failing = raw_connect(&url, &[]).await.expect("connect");
    send_json(
        &mut failing,
        json!({"type":"hello","protocol":1,"state":true}),
    )
    .await;
    assert_eq!(recv_close(&mut failing).await.0, 1011);
    send_json(
        &mut ws,
        json!({"type":"publish","ref":1,"events":[event("ok", 1)]}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["results"][0]["status"], "stored");
    server.stop().await;
}

/// A connection in the middle of a long catch-up when the relay shuts down stops it and is
/// closed with 1001 (resume later from the cursor), instead of sending the rest of the
/// history first while the shutdown waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_catch_up_stops_at_shutdown_with_1001() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.page_size = 1;
        relay_config
    })
    .await;
    let url = server.url(Some("history"));
    let (mut publisher, _) = join(&url, hello()).await;
    let total = 3000u64;
    for chunk in (1..=total).collect::<Vec<_>>().chunks(100) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|&n| {
                let mut e = event(&format!("h{n}"), n);
                e["data"] = json!("d".repeat(4096));
                e
            })
            .collect();
        send_json(
            &mut publisher,
            json!({"type":"publish","ref":chunk[0],"events":events}),
        )
        .await;
        recv_json(&mut publisher).await;
    }
    let (mut reader, _) = join(&url, json!({"type":"hello","protocol":1,"since":0})).await;
    let mut last = 0;
    let mut stopping = None;
    let code = loop {
        let message = tokio::time::timeout(Duration::from_secs(20), reader.next())
            .await
            .expect("progress")
            .expect("open")
            .expect("ok");
        match message {
            Message::Text(text) => {
                let batch: Value = serde_json::from_str(text.as_str()).expect("json");
                for e in batch["events"].as_array().expect("events") {
                    let seq = e["seq"].as_u64().expect("seq");
                    assert_eq!(seq, last + 1);
                    last = seq;
                }
                if last == 10 {
                    let relay = server.relay.clone();
                    stopping = Some(tokio::spawn(async move { relay.shutdown().await }));
                }
                // A slow reader: the history cannot all be on its way already.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            _ => {}
        }
    };
    assert_eq!(code, Some(1001));
    assert!(last < total, "the whole history was sent before the close");
    stopping.expect("shutdown started").await.expect("shutdown");
    server.task.abort();
}

/// With compression negotiated, `events` frames of at least `DEFLATE_MIN_BYTES` go deflated
/// in binary frames and shorter ones stay text (compression is for batches, not per tiny
/// message); both carry the same JSON.
#[tokio::test]
async fn compression_deflates_batches_and_leaves_tiny_frames_as_text() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("zip"));
    let (mut zipped, welcome) = join(
        &url,
        json!({"type":"hello","protocol":1,"compression":true}),
    )
    .await;
    assert_eq!(welcome["compression"], true);
    let (mut publisher, _) = join(&url, hello()).await;
    let mut big = event("big", 2);
    big["data"] = json!("compressible ".repeat(200));
    for (n, e) in [(1u64, event("small", 1)), (2, big.clone())] {
        send_json(
            &mut publisher,
            json!({"type":"publish","ref":n,"events":[e]}),
        )
        .await;
        assert_eq!(recv_json(&mut publisher).await["results"][0]["seq"], n);
    }
    let mut frames = Vec::new();
    while frames.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(10), zipped.next())
            .await
            .expect("a frame within 10 s")
            .expect("open")
            .expect("no error");
        match message {
            Message::Text(t) => frames.push((
                false,
                serde_json::from_str::<Value>(t.as_str()).expect("json"),
            )),
            Message::Binary(b) => {
                let json = ksync_ws::protocol::inflate(&b, 1 << 20).expect("inflate");
                assert!(json.len() >= ksync_ws::protocol::DEFLATE_MIN_BYTES);
                frames.push((true, serde_json::from_slice(&json).expect("json")));
            }
            _ => {}
        }
    }
    assert!(!frames[0].0, "a one-event frame of ~100 bytes stays text");
    assert_eq!(frames[0].1["events"][0]["event"]["id"], "small");
    assert!(frames[1].0, "a frame over the threshold is deflated");
    assert_eq!(frames[1].1["events"][0]["event"], big);
    server.stop().await;
}

/// One publish naming a revision `(id, version)` more than once: the first copy is taken, the
/// later ones are `invalid` (each copy colliding with a large stored revision would make the
/// storage copy that revision again), and the rest of the publish goes through.
#[tokio::test]
async fn a_revision_repeated_in_one_publish_is_taken_once() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("repeats"));
    let (mut publisher, _) = join(&url, hello()).await;
    let mut other = event("a", 1);
    other["data"] = json!("other content");
    let events = json!([event("a", 1), event("a", 1), other, event("b", 2)]);
    send_json(
        &mut publisher,
        json!({"type":"publish","ref":1,"events":events}),
    )
    .await;
    let ack = recv_json(&mut publisher).await;
    let statuses: Vec<&str> = ack["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["status"].as_str().expect("status"))
        .collect();
    assert_eq!(
        statuses,
        ["stored", "invalid", "invalid", "stored"],
        "{ack}"
    );
    assert!(
        ack["results"][1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("more than once")),
        "{ack}"
    );
    assert_eq!(ack["serverVersion"], 2);
    server.stop().await;
}

/// A subscriber that stops reading is dropped with 4008 once its queue holds
/// `subscriber_queue_bytes`: 250 frames are far fewer than the 1,024 the frame count allows,
/// and far more bytes than the socket buffers and the byte budget hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_dropped_at_its_byte_budget() {
    let config = {
        let mut relay_config = RelayConfig::default();
        relay_config.subscriber_queue_bytes = 256 * 1024;
        relay_config
    };
    slow_consumer_case(config, "bytes", &[false], 250).await;
}

/// Publishes `total` events of `size` bytes of data into `url`'s room, each acknowledged
/// before the next.
async fn publish_sized(url: &str, total: u64, size: usize) {
    let (mut publisher, _) = join(url, hello()).await;
    for n in 1..=total {
        let mut e = event(&format!("e{n}"), n);
        e["data"] = json!("w".repeat(size));
        send_json(
            &mut publisher,
            json!({"type":"publish","ref":n,"events":[e]}),
        )
        .await;
        assert_eq!(recv_json(&mut publisher).await["results"][0]["seq"], n);
    }
}

/// Joins `url`'s room over a socket with a 4 KiB receive buffer, so that what the relay holds
/// for a subscriber that stops reading is its queue, not the kernel's buffers.
async fn join_small_window(url: &str) -> Raw {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let request = url.into_client_request().expect("request");
    let host = request.uri().authority().expect("authority").as_str();
    let addr: std::net::SocketAddr = host.parse().expect("address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(addr).await.expect("connect");
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgrade");
    send_json(&mut ws, hello()).await;
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");
    ws
}

/// Reads a subscriber that had stopped reading: the seqs it was sent, in order and without a
/// gap, until it has `total` or is closed (with the close code).
async fn read_slow(ws: &mut Raw, total: u64) -> (u64, Option<u16>) {
    let mut last = 0;
    while last < total {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("progress within 10 s")
            .expect("open")
            .expect("ok");
        match message {
            Message::Text(t) => {
                let batch: Value = serde_json::from_str(t.as_str()).expect("json");
                for e in batch["events"].as_array().expect("events") {
                    assert_eq!(e["seq"].as_u64(), Some(last + 1), "no gap, no repeat");
                    last += 1;
                }
            }
            Message::Close(frame) => return (last, frame.map(|f| u16::from(f.code))),
            _ => {}
        }
    }
    (last, None)
}

/// Slow subscribers' queues are bounded relay-wide, not only each on its own: 3 rooms each
/// with a subscriber that stopped reading and 6 MiB published into it. The kernel's buffers
/// take 2 to 4.5 MiB of each (the relay's send buffer grows by itself up to `tcp_wmem`'s 4
/// MiB), the rest queues: in all more than the relay's 2 MiB, each far under its own 64 MiB.
/// Those whose frames would pass it are closed with 4008, each having got a gap-free prefix
/// to resume from; the others get everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_in_many_rooms_are_bounded_relay_wide() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.subscriber_queues_total_bytes = 2 << 20;
        relay_config
    })
    .await;
    let total = 12;
    let mut slow = Vec::new();
    for room in 0..3 {
        let url = server.url(Some(&format!("room{room}")));
        slow.push(join_small_window(&url).await);
        publish_sized(&url, total, 512 * 1024).await;
    }
    let mut closed = 0;
    for ws in &mut slow {
        match read_slow(ws, total).await {
            (_, Some(code)) => {
                assert_eq!(code, 4008);
                closed += 1;
            }
            (got, None) => assert_eq!(got, total),
        }
    }
    assert!(
        closed > 0,
        "no subscriber closed at the 2 MiB relay-wide budget"
    );
    server.stop().await;
}

/// The relay-wide budget counts a frame once however many subscribers hold it: 8 slow
/// subscribers of one room, 6 MiB published, of which each queues 1.5 MiB or more (counted
/// per subscriber, at least 12 MiB), stay within 7 MiB and get everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_wide_budget_counts_a_shared_frame_once() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.subscriber_queues_total_bytes = 7 << 20;
        relay_config
    })
    .await;
    let url = server.url(Some("shared"));
    let total = 12;
    let mut slow = Vec::new();
    for _ in 0..8 {
        slow.push(join_small_window(&url).await);
    }
    publish_sized(&url, total, 512 * 1024).await;
    for ws in &mut slow {
        assert_eq!(read_slow(ws, total).await, (total, None));
    }
    server.stop().await;
}

/// Behind a log whose appends wait, a room queues publishes only up to `room_queue_bytes`:
/// the publisher's further publishes wait unread, so no group commit gathers more than the
/// budget, and every publish is still acknowledged once the log moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_queues_publishes_only_up_to_its_byte_budget() {
    room_byte_budget_case("budget", json!("w".repeat(64 * 1024))).await;
}

/// The budget counts publishes as the room holds them, decoded too: 20 KiB of JSON that is
/// 10,000 small numbers (320 KiB decoded) is more than a 100 KiB budget on its own, so these
/// are committed one by one as well (by their JSON alone, five would fit at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_byte_budget_counts_publishes_decoded() {
    room_byte_budget_case("numbers", json!(vec![0u8; 10_000])).await;
}

async fn room_byte_budget_case(room: &str, data: Value) {
    let provider = Arc::new(GatedProvider::new());
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.room_queue_bytes = 100 * 1024;
            relay_config
        },
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some(room));
    let (publisher, _) = join(&url, hello()).await;
    let (mut sink, mut acks) = publisher.split();
    // The first append waits once: from then on the room commits from its queue.
    let first = json!({"type":"publish","ref":0,"events":[event("warm", 1)]});
    sink.send(Message::text(first.to_string()))
        .await
        .expect("send");
    let ack = acks.next().await.expect("open").expect("ok");
    assert!(ack.to_text().expect("text").contains("stored"), "{ack:?}");
    provider.close_gate();
    let total = 10u64;
    let sending = tokio::spawn(async move {
        for n in 1..=total {
            let mut e = event(&format!("e{n}"), 1);
            e["data"] = data.clone();
            let publish = json!({"type":"publish","ref":n,"events":[e]});
            sink.send(Message::text(publish.to_string()))
                .await
                .expect("send");
        }
        sink
    });
    // The publisher waits for room in the queue: all that fit the budget is queued (the
    // connection reads its publishes in order). Without a budget none would ever wait.
    eventually("a publish waiting for the byte budget", || {
        server.relay.backlog(room).is_some_and(|b| b.waiting >= 1)
    })
    .await;
    provider.open_gate();
    for n in 1..=total {
        let message = tokio::time::timeout(Duration::from_secs(10), acks.next())
            .await
            .expect("an ack within 10 s")
            .expect("open")
            .expect("ok");
        let ack: Value = serde_json::from_str(message.to_text().expect("text")).expect("json");
        assert_eq!(ack["ref"], n, "{ack}");
        assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    }
    let _sink = sending.await.expect("sender");
    let log = provider.room_log(room);
    // 100 KiB holds one of these publishes: each was committed on its own.
    assert_eq!(log.largest_append.load(Ordering::SeqCst), 1);
    assert_eq!(log.len(), total + 1);
    server.stop().await;
}

/// `ping` is answered by a `pong` echoing its `ref`, after what the server sent before it
/// (here the ack of the publish before it); before `hello` it is a protocol error like any
/// other first message.
#[tokio::test]
async fn a_ping_message_gets_a_pong_in_order() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("pings"));
    let (mut ws, _) = join(&url, hello()).await;
    send_json(
        &mut ws,
        json!({"type":"publish","ref":7,"events":[event("p1", 1)]}),
    )
    .await;
    send_json(&mut ws, json!({"type":"ping","ref":8})).await;
    send_json(&mut ws, json!({"type":"ping"})).await;
    let ack = recv_json(&mut ws).await;
    assert_eq!(
        (ack["type"].as_str(), ack["ref"].as_u64()),
        (Some("ack"), Some(7))
    );
    assert_eq!(recv_json(&mut ws).await, json!({"type":"pong","ref":8}));
    assert_eq!(recv_json(&mut ws).await, json!({"type":"pong"}));

    let mut early = raw_connect(&url, &[]).await.expect("connect");
    send_json(&mut early, json!({"type":"ping","ref":1})).await;
    assert_eq!(recv_json(&mut early).await["code"], "protocol");
    assert_eq!(recv_close(&mut early).await.0, 4000);
    server.stop().await;
}

/// Catch-up frames are encoded from the log event by event: each is at most
/// `maxMessageSize` (an event too large for it goes alone), small events share frames, and
/// every event comes once, in order, whatever the mix of sizes, from a file log too.
#[tokio::test]
async fn catch_up_frames_stay_within_the_message_size_for_any_mix_of_event_sizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = Arc::new(ksync_storage_file::FileProvider::new(dir.path()).expect("provider"));
    let max = 64 * 1024;
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.max_message_size = max;
            relay_config
        },
        provider,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("mixed"));
    let (mut publisher, _) = join(&url, hello()).await;
    let total = 300u64;
    for n in 1..=total {
        let mut e = event(&format!("m{n}"), n);
        // Mostly small; every 50th nearly a whole frame, every 97th over half of one.
        let size = if n % 50 == 0 {
            max - 200
        } else if n % 97 == 0 {
            max / 2 + 10
        } else {
            100
        };
        e["data"] = json!("y".repeat(size));
        send_json(
            &mut publisher,
            json!({"type":"publish","ref":n,"events":[e]}),
        )
        .await;
        assert_eq!(
            recv_json(&mut publisher).await["results"][0]["status"],
            "stored"
        );
    }
    for compression in [false, true] {
        let hello = json!({"type":"hello","protocol":1,"since":0,"compression":compression});
        let (mut reader, _) = join(&url, hello).await;
        let (mut seqs, mut frames) = (Vec::new(), 0);
        while seqs.len() < total as usize {
            let (len, batch) = recv_text(&mut reader).await;
            let events = batch["events"].as_array().expect("events");
            assert!(len <= max || events.len() == 1, "a frame of {len} bytes");
            seqs.extend(events.iter().map(|e| e["seq"].as_u64().expect("seq")));
            frames += 1;
        }
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
        assert!(
            frames < total as usize / 2,
            "{frames} frames: small events share frames"
        );
    }
    server.stop().await;
}

/// A relay-wide subscriber budget that one largest frame fills on its own is refused at
/// start, naming both values: the first subscriber needing such a frame took it (nothing
/// else held), and every other subscriber of the room needing the same frame was closed
/// with 4008, though holding it for them cost nothing new.
#[test]
fn a_subscriber_budget_below_two_largest_frames_is_a_config_error() {
    use ksync_ws::server::{Relay, RelayError};

    let relay = |subscriber_queues_total_bytes, max_message_size| {
        Relay::new(
            {
                let mut relay_config = RelayConfig::default();
                relay_config.subscriber_queues_total_bytes = subscriber_queues_total_bytes;
                relay_config.max_message_size = max_message_size;
                relay_config
            },
            Arc::new(ksync_core::InMemoryProvider::new()),
            Arc::new(ksync_core::AllowAll),
        )
    };
    for (total, max) in [(1024, 1 << 20), ((2 << 20) - 1, 1 << 20), (2047, 1024)] {
        match relay(total, max) {
            Err(RelayError::Config(message)) => {
                assert!(
                    message.contains(&format!("subscriber_queues_total_bytes ({total})"))
                        && message.contains(&format!("max_message_size ({max})")),
                    "{total}, {max}: {message}"
                );
            }
            Err(other) => panic!("{total}, {max}: not a config error: {other}"),
            Ok(_) => panic!("{total}, {max}: accepted"),
        }
    }
    for (total, max) in [(2 << 20, 1 << 20), (2048, 1024)] {
        assert!(relay(total, max).is_ok(), "{total}, {max} refused");
    }
}

/// `max_message_size` is refused outside 1 KiB..=8 MiB, naming the bounds: above 8 MiB an ack
/// (up to about twice the limit) could outgrow what clients accept, and each reconnect would
/// meet the same refused frame again.
#[test]
fn max_message_size_outside_its_range_is_a_config_error() {
    use ksync_ws::protocol::{CLIENT_MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE_RANGE};
    use ksync_ws::server::{Relay, RelayError};

    assert!(2 * MAX_MESSAGE_SIZE_RANGE.end() <= CLIENT_MAX_MESSAGE_SIZE);
    let relay = |max_message_size| {
        Relay::new(
            {
                let mut relay_config = RelayConfig::default();
                relay_config.max_message_size = max_message_size;
                relay_config
            },
            Arc::new(ksync_core::InMemoryProvider::new()),
            Arc::new(ksync_core::AllowAll),
        )
    };
    for bad in [0, 1023, 8 * 1024 * 1024 + 1, usize::MAX] {
        match relay(bad) {
            Err(RelayError::Config(message)) => {
                assert!(message.contains("from 1024 to 8388608"), "{bad}: {message}")
            }
            Err(other) => panic!("{bad}: not a config error: {other}"),
            Ok(_) => panic!("{bad}: accepted"),
        }
    }
    for good in [1024, 1 << 20, 8 * 1024 * 1024] {
        assert!(relay(good).is_ok(), "{good} refused");
    }
}

/// The relay's timers are refused at zero and past a day: far past it, `Instant + heartbeat`
/// overflowed and panicked every connection's task right after its handshake.
#[test]
fn relay_timers_outside_zero_to_a_day_are_config_errors() {
    use ksync_ws::server::{MAX_CONFIG_DURATION, Relay, RelayError};

    let relay = |config: RelayConfig| {
        Relay::new(
            config,
            Arc::new(ksync_core::InMemoryProvider::new()),
            Arc::new(ksync_core::AllowAll),
        )
    };
    let huge = Duration::from_secs(u64::MAX);
    let past_a_day = MAX_CONFIG_DURATION + Duration::from_secs(1);
    for bad in [Duration::ZERO, past_a_day, huge] {
        let configs = [
            ("heartbeat", {
                let mut relay_config = RelayConfig::default();
                relay_config.heartbeat = bad;
                relay_config
            }),
            ("handshake_timeout", {
                let mut relay_config = RelayConfig::default();
                relay_config.handshake_timeout = bad;
                relay_config
            }),
            ("write_timeout", {
                let mut relay_config = RelayConfig::default();
                relay_config.write_timeout = bad;
                relay_config
            }),
        ];
        for (field, config) in configs {
            match relay(config) {
                Err(RelayError::Config(message)) => assert!(
                    message.contains(field) && message.contains("at most 86400 s"),
                    "{field} {bad:?}: {message}"
                ),
                Err(other) => panic!("{field} {bad:?}: not a config error: {other}"),
                Ok(_) => panic!("{field} {bad:?}: accepted"),
            }
        }
    }
    let a_day = {
        let mut relay_config = RelayConfig::default();
        relay_config.heartbeat = MAX_CONFIG_DURATION;
        relay_config.handshake_timeout = MAX_CONFIG_DURATION;
        relay_config.write_timeout = MAX_CONFIG_DURATION;
        relay_config
    };
    assert!(relay(a_day).is_ok());
}

/// A `room_queue` past what a tokio channel holds (`Semaphore::MAX_PERMITS`) is refused at
/// `Relay::new`: it was taken, and then every connection's task panicked opening its room.
#[tokio::test]
async fn a_room_queue_past_what_a_channel_holds_is_a_config_error() {
    use ksync_ws::server::{Relay, RelayError};

    let relay = |room_queue| {
        Relay::new(
            {
                let mut relay_config = RelayConfig::default();
                relay_config.room_queue = room_queue;
                relay_config
            },
            Arc::new(ksync_core::InMemoryProvider::new()),
            Arc::new(ksync_core::AllowAll),
        )
    };
    let max = tokio::sync::Semaphore::MAX_PERMITS;
    for bad in [max + 1, usize::MAX] {
        match relay(bad) {
            Err(RelayError::Config(message)) => assert!(
                message.contains("room_queue") && message.contains(&max.to_string()),
                "{bad}: {message}"
            ),
            Err(other) => panic!("{bad}: not a config error: {other}"),
            Ok(_) => panic!("{bad}: accepted"),
        }
    }
    assert!(relay(max).is_ok());
    // The largest taken serves a room.
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.room_queue = max;
        relay_config
    })
    .await;
    let (mut ws, _) = join(&server.url(Some("q")), hello()).await;
    send_json(
        &mut ws,
        json!({"type": "publish", "ref": 1, "events": [event("q", 1)]}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["results"][0]["status"], "stored");
    server.stop().await;
}

/// A connection that leaves while its room's queue is full still leaves the room: its
/// unsubscribe waits for room in the queue rather than being dropped. Here the departed
/// subscriber gets no fan-out afterwards (the only publish after it is a duplicate), which
/// was the one other way its departure could be noticed; without the unsubscribe the room
/// stayed open, with its log, after everyone had gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_closes_after_its_last_connection_even_if_one_left_while_the_queue_was_full() {
    let provider = Arc::new(GatedProvider::new());
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.room_queue = 2;
            relay_config
        },
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("full"));
    let (mut publisher, _) = join(&url, hello()).await;
    let (mut leaver, _) = join(&url, hello()).await;
    let publish = json!({"type":"publish","ref":1,"events":[event("x", 1)]});
    send_json(&mut publisher, publish.clone()).await;
    assert_eq!(
        recv_json(&mut publisher).await["results"][0]["status"],
        "stored"
    );
    assert_eq!(recv_json(&mut leaver).await["type"], "events");

    // The room waits in the append of a duplicate; two more (duplicates too: no fan-out)
    // fill its queue of 2. Joins do not go through the queue.
    let log = provider.room_log("full");
    let appends = log.appends.load(Ordering::SeqCst);
    provider.close_gate();
    for reference in 2..=4 {
        let mut again = publish.clone();
        again["ref"] = json!(reference);
        send_json(&mut publisher, again).await;
        if reference == 2 {
            // In its append, out of the queue (else the others would join its group).
            eventually("the append under way", || {
                log.appends.load(Ordering::SeqCst) > appends
            })
            .await;
        }
    }
    eventually("the queue full", || {
        server
            .relay
            .backlog("full")
            .is_some_and(|b| b.publishes == 3)
    })
    .await;
    drop(leaver);
    eventually("the leaver gone", || server.relay.connections() == 1).await;
    provider.open_gate();

    for _ in 2..=4 {
        let ack = recv_json(&mut publisher).await;
        assert_eq!(ack["results"][0]["status"], "duplicate", "{ack}");
    }
    assert_eq!(server.relay.open_rooms(), 1);
    drop(publisher);
    eventually("the room to close after everyone left", || {
        server.relay.open_rooms() == 0
    })
    .await;
    server.stop().await;
}

/// An event is measured as kSync sends it on, not as its publisher wrote it: `1e15` is 4 bytes
/// of a publish and 18 of every catch-up page after (`1000000000000000.0`). A publish well
/// under the message limit whose event re-encodes past 8 MiB is `invalid`: stored, it would
/// have made a catch-up frame over what clients accept, refused again after every reconnect.
#[tokio::test]
async fn an_event_that_re_encodes_past_8_mib_is_invalid_and_the_connection_stays() {
    let config = {
        let mut relay_config = RelayConfig::default();
        relay_config.max_message_size = 8 << 20;
        relay_config
    };
    let server = start(config).await;
    let url = server.url(Some("numbers"));
    let (mut ws, _) = join(&url, hello()).await;
    let count = 450_000;
    let numbers = format!("[{}1e15]", "1e15,".repeat(count - 1));
    let message = format!(
        r#"{{"type":"publish","ref":1,"events":[{{"id":"n","type":"t","data":{numbers},"timestamp":1,"version":1}}]}}"#
    );
    assert!(message.len() < 3 << 20);
    ws.send(Message::text(message)).await.expect("send");
    let ack = recv_json(&mut ws).await;
    assert_eq!(ack["results"][0]["status"], "invalid", "{}", ack["results"]);
    let why = ack["results"][0]["message"].as_str().unwrap_or_default();
    assert!(why.contains("bytes as JSON"), "{why}");
    assert_eq!(ack["serverVersion"], 0);
    send_json(
        &mut ws,
        json!({"type":"publish","ref":2,"events":[event("after", 1)]}),
    )
    .await;
    let ack = recv_json(&mut ws).await;
    assert_eq!(ack["results"][0], json!({"status":"stored","seq":1}));
    server.stop().await;
}

/// A publish of many tiny things that are not events (`[0,0,...]`) would need an ack of fifty
/// times its size (one result with a message each: the connection was reset with no answer
/// past ~84 KB of them). It is refused whole with one `error` carrying its ref, nothing is
/// stored, and the connection goes on. A few such items get their `invalid` results, each
/// message at most 256 bytes.
#[tokio::test]
async fn a_publish_whose_ack_would_be_huge_is_refused_whole_and_the_connection_stays() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("zeros"));
    let (mut ws, _) = join(&url, hello()).await;
    for count in [10_000usize, 300_000] {
        let zeros = vec!["0"; count].join(",");
        let message = format!(r#"{{"type":"publish","ref":{count},"events":[{zeros}]}}"#);
        ws.send(Message::text(message)).await.expect("send");
        let answer = recv_json(&mut ws).await;
        // (An ack of them would be a megabyte: only its start goes in a failure message.)
        let start: String = answer.to_string().chars().take(300).collect();
        assert_eq!(answer["type"], "error", "{start}");
        assert_eq!(answer["code"], "bad_message", "{start}");
        assert_eq!(answer["ref"], count, "{start}");
        let why = answer["message"].as_str().unwrap_or_default();
        assert!(why.contains("nothing was stored"), "{why}");
    }
    // A long unknown field makes a long message: cut.
    let long_field = format!(r#"{{"{}":1}}"#, "f".repeat(5_000));
    let message = format!(
        r#"{{"type":"publish","ref":1,"events":[0,{long_field},{}]}}"#,
        event("ok", 1)
    );
    ws.send(Message::text(message)).await.expect("send");
    let ack = recv_json(&mut ws).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let results = ack["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    for result in &results[..2] {
        assert_eq!(result["status"], "invalid", "{result}");
        let message = result["message"].as_str().expect("message");
        assert!(message.len() <= 256, "{} bytes", message.len());
    }
    assert!(
        results[1]["message"]
            .as_str()
            .is_some_and(|m| m.ends_with("..."))
    );
    assert_eq!(results[2], json!({"status":"stored","seq":1}));
    server.stop().await;
}
