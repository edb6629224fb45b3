//! WebSocketSyncClient over a durable replica: the room cursor is written at most about once a
//! second (and when a session ends), not once per frame: each write is a record appended to a
//! file log, which compacts only when reopened, so a watcher that stores nothing used to grow
//! its log for as long as it ran. A cursor that lags what the replica stored only costs events
//! received again, which are duplicates and not notified again.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ksync_core::{Filter, KSync, Notification, Storage};
use ksync_storage_file::FileStorage;
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;
use serde_json::json;

/// The client's `CURSOR_WRITE_INTERVAL`.
const WRITE_INTERVAL: Duration = Duration::from_secs(1);

fn watcher(url: &str) -> ksync_ws::WebSocketSyncClientBuilder {
    WebSocketSyncClient::builder(url)
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(50))
}

async fn ksync_over(
    storage: Arc<dyn Storage>,
    client: WebSocketSyncClient,
) -> KSync<WebSocketSyncClient> {
    ksync_testkit::ksync_over(storage, client)
        .await
        .expect("ksync")
}

fn open(path: &Path) -> Arc<dyn Storage> {
    Arc::new(FileStorage::open(path).expect("open the watcher's log"))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("log file").len()
}

/// The stored room cursor of a client of `url`, read from its storage's metadata.
fn stored_room_cursor(storage: &dyn Storage, url: &str) -> u64 {
    storage
        .meta(&format!("cursor/ws:{url}/room"))
        .expect("meta")
        .map_or(0, |v| v.parse().expect("a number"))
}

/// Publishes each event as its own `publish` on one raw connection, waiting for each ack, so
/// the room commits (and sends its subscribers) one frame per event.
async fn publish_one_per_frame(url: &str, events: impl IntoIterator<Item = serde_json::Value>) {
    let (mut ws, _) = join(url, hello()).await;
    for (reference, event) in (1u64..).zip(events) {
        send_json(
            &mut ws,
            json!({"type": "publish", "ref": reference, "events": [event]}),
        )
        .await;
        loop {
            let reply = recv_json(&mut ws).await;
            if reply["type"] == "ack" {
                assert_eq!(reply["ref"], reference, "{reply}");
                assert_eq!(reply["results"][0]["status"], "stored", "{reply}");
                break;
            }
        }
    }
}

fn private_event(n: u64) -> serde_json::Value {
    json!({"id": format!("secret-{n}"), "type": "test", "data": {"n": n, "private": true},
        "timestamp": 1_700_000_000_000u64 + n, "version": 1})
}

/// The relay keeps every frame queued for a slow watcher (none is closed as a slow consumer
/// and then caught up in fewer, larger frames).
fn roomy_relay() -> RelayConfig {
    {
        let mut relay_config = RelayConfig::default();
        relay_config.subscriber_queue = 8192;
        relay_config
    }
}

#[tokio::test]
async fn a_watcher_that_stores_nothing_does_not_grow_its_log_per_frame() {
    const PRIVATE: u64 = 1_000;
    let server = start(roomy_relay()).await;
    let url = server.url(Some("quiet"));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("watcher.log");
    let w = ksync_over(
        open(&path),
        watcher(&url)
            .filter(Filter::PublicOnly)
            .build()
            .expect("client"),
    )
    .await;
    let rec = Recorder::attach(w.client().as_ref());
    w.connect().await.expect("connect");
    let before = file_len(&path);

    publish_one_per_frame(&url, (1..=PRIVATE).map(private_event)).await;
    // One public event last, so the test knows when the watcher has seen every frame.
    let last = PRIVATE + 1;
    publish_one_per_frame(&url, [event("public", last)]).await;
    let storage = Arc::clone(w.replica().storage());
    eventually("the public event stored", || {
        storage.latest("public").ok().flatten().is_some()
    })
    .await;
    w.disconnect().await.expect("disconnect");
    assert_eq!(storage.len(), 1, "the filter kept the private events out");
    assert_eq!(
        rec.count(|n| matches!(n, Notification::Reconnecting { .. })),
        0,
        "one session received every frame: {:?}",
        rec.all()
    );
    let grown = file_len(&path) - before;

    // A cursor record: length, checksum and kind (9 bytes), then the key and the value, each
    // with its length (at most 2 bytes each here); the value has at most 4 digits.
    let key = format!("cursor/ws:{url}/room");
    let cursor_record = 9 + 2 + key.len() as u64 + 2 + 4;
    // The public event's record is far smaller than its JSON's 1 KiB bound.
    let event_record = 1_024;
    let bound = 100 * cursor_record + event_record;
    assert!(
        grown < bound,
        "the log grew by {grown} bytes for {last} frames (bound {bound}: 100 cursor records of \
         {cursor_record} bytes and the event); one cursor record per frame would be about {}",
        last * cursor_record
    );

    // Nothing lost at the end: the session's last value was written when it ended.
    drop(storage);
    drop(w);
    let reopened = open(&path);
    assert_eq!(stored_room_cursor(reopened.as_ref(), &url), last);
    server.stop().await;
}

fn sorted(ids: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut ids: Vec<String> = ids.into_iter().collect();
    ids.sort();
    ids
}

fn stored_ids(storage: &dyn Storage) -> Vec<String> {
    sorted(
        storage
            .read_since(0, 10_000)
            .expect("read")
            .into_iter()
            .map(|s| s.event.id),
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A watcher killed (its runtime dropped: no `disconnect`, no session end) with its room
/// cursor behind what it stored resumes from that cursor: what comes again is a duplicate, not
/// stored or notified twice, and the rest arrives once.
#[test]
fn a_watcher_killed_mid_stream_resumes_with_every_event_once() {
    const BEFORE: u64 = 30;
    const AFTER: u64 = 20;
    let main = runtime();
    let server = main.block_on(start(roomy_relay()));
    let url = server.url(Some("killed"));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("watcher.log");

    let doomed = runtime();
    let first = doomed.block_on(async {
        let w = ksync_over(open(&path), watcher(&url).build().expect("client")).await;
        w.connect().await.expect("connect");
        w
    });
    let first_rec = Recorder::attach(first.client().as_ref());
    let started = Instant::now();
    // The first frame's cursor is written at once; those that follow within the write interval
    // are only remembered.
    main.block_on(publish_one_per_frame(
        &url,
        (1..=BEFORE).map(|n| event(&format!("e-{n}"), n)),
    ));
    let storage = Arc::clone(first.replica().storage());
    // (Stored, then notified.)
    doomed.block_on(eventually("the first events stored and notified", || {
        storage.len() == BEFORE && first_rec.events().len() as u64 == BEFORE
    }));
    let quick = started.elapsed() < WRITE_INTERVAL.mul_f64(0.8);
    let had = stored_ids(storage.as_ref());
    // Killed: its tasks are dropped where they wait, before anything else is written.
    drop(doomed);
    drop(storage);
    drop(first);
    assert_eq!(sorted(first_rec.event_ids()), had);

    let reopened = open(&path);
    let cursor = stored_room_cursor(reopened.as_ref(), &url);
    assert!(
        cursor <= BEFORE,
        "the cursor {cursor} is past what was stored"
    );
    if quick {
        assert!(
            cursor < BEFORE,
            "killed within the write interval, the stored cursor ({cursor}) should lag the \
             {BEFORE} events stored: this test checks a resume from a lagging cursor"
        );
    } else {
        eprintln!("slow run: the cursor ({cursor}) may not lag; the resume is checked anyway");
    }

    main.block_on(async {
        let total = BEFORE + AFTER;
        publish_one_per_frame(
            &url,
            (BEFORE + 1..=total).map(|n| event(&format!("e-{n}"), n)),
        )
        .await;
        let w = ksync_over(reopened, watcher(&url).build().expect("client")).await;
        let rec = Recorder::attach(w.client().as_ref());
        w.connect().await.expect("reconnect");
        let storage = Arc::clone(w.replica().storage());
        eventually("every event stored", || storage.len() >= total).await;
        // Anything received twice would be in by now, after the last one.
        tokio::time::sleep(Duration::from_millis(100)).await;
        w.disconnect().await.expect("disconnect");

        let all: Vec<String> = sorted((1..=total).map(|n| format!("e-{n}")));
        assert_eq!(stored_ids(storage.as_ref()), all, "each event stored once");
        let notified = rec.event_ids();
        let unique: BTreeSet<&String> = notified.iter().collect();
        assert_eq!(unique.len(), notified.len(), "notified twice: {notified:?}");
        let expected: Vec<String> = all.iter().filter(|id| !had.contains(id)).cloned().collect();
        assert_eq!(
            sorted(notified),
            expected,
            "only what it did not have is news"
        );
        assert_eq!(stored_room_cursor(storage.as_ref(), &url), total);
    });
    main.block_on(server.stop());
}

/// A value held back within the write interval is written by the session's timer, without
/// waiting for another frame or the end of the session.
#[tokio::test]
async fn a_held_back_room_cursor_is_written_while_the_session_stays_up() {
    let server = start(roomy_relay()).await;
    let url = server.url(Some("timer"));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("watcher.log");
    let w = ksync_over(open(&path), watcher(&url).build().expect("client")).await;
    w.connect().await.expect("connect");
    publish_one_per_frame(&url, (1..=5).map(|n| event(&format!("e-{n}"), n))).await;
    let storage = Arc::clone(w.replica().storage());
    eventually("the room cursor stored at the last seq", || {
        stored_room_cursor(storage.as_ref(), &url) == 5
    })
    .await;
    assert!(w.client().is_connected());
    w.disconnect().await.expect("disconnect");
    server.stop().await;
}
