//! Upgrading an app in place: this build's `WebSocketSyncClient` over a replica log the
//! client of commit 4aa2aa3 wrote, against this build's relay over that build's data
//! directory (`tests/fixtures/4aa2aa3`; its README says how they were made). The app had 3
//! events acknowledged, then emitted 2 while offline (its offline queue); meanwhile another
//! client published 2. Tests work on copies.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::{Recorder, eventually, start_with};
use ksync_core::{AllowAll, Event, KSync, LogName, Name, Notification, Storage, StorageProvider};
use ksync_storage_file::{FileProvider, FileStorage};
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/4aa2aa3")
}

/// The app's log, moved to `url`: the client keeps its cursors and the room's log id per URL
/// (`ws:URL/room`, `ws:URL/acked`, `ws:URL/log`), and the fixture's relay answered at another
/// address than this test's, so each is copied to `url` as it would read had the relay kept
/// its address.
async fn move_to(log: &FileStorage, old: &str, url: &str) {
    for key in ["cursor/ws:{}/room", "cursor/ws:{}/acked", "ws:{}/log"] {
        let value = log
            .meta(&key.replace("{}", old))
            .expect("meta")
            .unwrap_or_else(|| panic!("the fixture holds {key}"));
        log.set_meta(&key.replace("{}", url), &value)
            .await
            .expect("set meta");
    }
}

/// The relay's room log and the app's replica log written by the old build are taken over:
/// the client resumes from its old room cursor (it receives only the 2 events published while
/// it was offline; no room reset, as the room keeps its log id), sends only its offline queue
/// (the 3 events the old build had acknowledged are not sent again) and ends with both logs
/// holding the same 7 events, once each.
#[tokio::test]
async fn an_old_apps_offline_queue_and_cursors_are_taken_over() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    ksync_testkit::copy_dir(&fixture().join("data"), &data);
    std::fs::copy(fixture().join("app.log"), tmp.path().join("app.log")).expect("copy");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("expected.json")).expect("read"))
            .expect("expected.json is JSON");
    let room_events: Vec<Event> = expected["notes"]["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|stored| serde_json::from_value(stored["event"].clone()).expect("event"))
        .collect();
    assert_eq!(
        room_events.len(),
        5,
        "3 from the app, then 2 from another client"
    );

    let provider = Arc::new(FileProvider::new(&data).expect("provider"));
    let server = start_with(
        RelayConfig::default(),
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(AllowAll),
    )
    .await;
    let url = server.url(Some("notes"));
    let app_log = Arc::new(FileStorage::open(tmp.path().join("app.log")).expect("old app log"));
    move_to(&app_log, expected["url"].as_str().expect("url"), &url).await;
    let queued: Vec<Event> = app_log
        .read_since(3, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|stored| stored.event)
        .collect();
    assert_eq!(queued.len(), 2, "the offline queue");

    let client = WebSocketSyncClient::builder(&url).build().expect("client");
    let recorder = Recorder::attach(&client);
    let app = KSync::builder()
        .storage(Arc::clone(&app_log) as Arc<dyn Storage>)
        .sync_client(Arc::new(client))
        .replica_id("app")
        .build()
        .await
        .expect("ksync");
    app.connect().await.expect("connect");
    let room = provider
        .existing(&LogName::Room(Name::new("notes").expect("name")))
        .expect("provider")
        .expect("the room's log");
    eventually("both logs hold all 7 events", || {
        app_log.len() == 7 && room.len() == 7
    })
    .await;
    let acked = format!("ws:{url}/acked");
    eventually("the offline queue is acknowledged", || {
        app.replica().cursor(&acked).expect("cursor") == 5
    })
    .await;
    app.disconnect().await.expect("disconnect");

    // The room: the old 5, then the app's queue, in the order it was made.
    let in_room: Vec<Event> = room
        .read_since(0, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|stored| stored.event)
        .collect();
    assert_eq!(in_room[..5], room_events[..]);
    assert_eq!(in_room[5..], queued[..]);
    // The app received only what it had not seen, and what went out was only its queue.
    let others: Vec<String> = room_events[3..].iter().map(|e| e.id.clone()).collect();
    assert_eq!(recorder.event_ids(), others);
    let synced: BTreeSet<String> = recorder
        .all()
        .into_iter()
        .filter_map(|n| match n {
            Notification::Sync(events) => Some(events),
            _ => None,
        })
        .flatten()
        .map(|e| e.id)
        .collect();
    let want: BTreeSet<String> = others
        .iter()
        .cloned()
        .chain(queued.iter().map(|e| e.id.clone()))
        .collect();
    assert_eq!(synced, want, "nothing the old build had sent went again");
    assert_eq!(
        recorder.count(|n| matches!(n, Notification::Error(_))),
        0,
        "{:?}",
        recorder.all()
    );
    assert_eq!(
        app.replica()
            .cursor(&format!("ws:{url}/room"))
            .expect("cursor"),
        7
    );
    server.stop().await;
}

/// Events an older build stored with data 110 and 126 levels deep (the event rules allowed
/// 128 until `MAX_DATA_DEPTH` became 100) in the relay's file log reach an upgraded client:
/// its check of received events held them to the publish limit, so it skipped them (a
/// `protocol` error) while older replicas keep them, and an `events` frame holding the
/// deepest could not be read (`malformed message`: every session ended on the same frame). A new event as deep
/// is still refused by `update`, with the typed error.
#[tokio::test]
async fn an_event_older_builds_stored_deeper_than_the_publish_limit_is_received() {
    let old = Event::new("old", "t", ksync_testkit::edge_data::nested(110), 1);
    // 4 levels of an `events` frame around the deepest are 130, past serde_json's 127.
    let deepest = deepest();
    let (_dir, server) = relay_over_room("deep", vec![old.clone(), deepest.clone()]).await;
    let client = WebSocketSyncClient::builder(server.url(Some("deep")))
        .build()
        .expect("client");
    let seen = Recorder::attach(&client);
    let app = ksync_testkit::ksync_over(Arc::new(ksync_core::InMemoryStorage::new()), client)
        .await
        .expect("ksync");
    app.connect().await.expect("connect");
    let held = || {
        app.replica()
            .storage()
            .read_since(0, 10)
            .expect("read")
            .into_iter()
            .map(|stored| stored.event)
            .collect::<Vec<_>>()
    };
    let errors = |n: &Notification| matches!(n, Notification::Error(_));
    eventually("the event, or an error", || {
        !held().is_empty() || seen.count(errors) > 0
    })
    .await;
    assert_eq!(held(), [old, deepest], "{:?}", seen.all());
    assert_eq!(seen.count(errors), 0, "{:?}", seen.all());
    let new = Event::new("new", "t", ksync_testkit::edge_data::nested(110), 1);
    let refused = app
        .update(&new.id, &new.event_type, new.data)
        .await
        .expect_err("too deep");
    ksync_testkit::edge_data::assert_too_deep(&refused);
    app.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// The deepest data an older relay stored: it read 127 levels of a publish, 1 around each
/// event's data once it read the events as raw JSON.
fn deepest() -> Event {
    Event::new("deepest", "t", ksync_testkit::edge_data::nested(126), 1)
}

/// A relay over a file log of `room` holding `events`, appended as an older relay stored
/// them (no publish check).
async fn relay_over_room(room: &str, events: Vec<Event>) -> (tempfile::TempDir, common::Server) {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = Arc::new(FileProvider::new(dir.path()).expect("provider"));
    let log = provider
        .open(&LogName::Room(Name::new(room).expect("name")))
        .expect("open");
    log.append(events).await.expect("append");
    drop(log);
    let server = start_with(RelayConfig::default(), provider, Arc::new(AllowAll)).await;
    (dir, server)
}

/// A state-based client starts from a snapshot holding the deepest event an older relay
/// stored: a `snapshot` page puts 3 levels around an event's data and was read whole, so
/// every session ended `malformed message` on the first page (the client never started).
#[tokio::test]
async fn a_snapshot_holding_the_deepest_data_older_builds_stored_is_received() {
    let (_dir, server) = relay_over_room("deep", vec![deepest()]).await;
    let client = WebSocketSyncClient::builder(server.url(Some("deep")))
        .strategy(ksync_ws::Strategy::StateBased {
            snapshot_interval: std::time::Duration::from_millis(50),
        })
        .build()
        .expect("client");
    let seen = Recorder::attach(&client);
    let app = ksync_testkit::ksync_over(Arc::new(ksync_core::InMemoryStorage::new()), client)
        .await
        .expect("ksync");
    app.connect().await.expect("connect");
    let held = || app.replica().storage().read_since(0, 10).expect("read");
    let errors = |n: &Notification| matches!(n, Notification::Error(_));
    eventually("the event, or an error", || {
        !held().is_empty() || seen.count(errors) > 0
    })
    .await;
    assert_eq!(seen.count(errors), 0, "{:?}", seen.all());
    let held: Vec<Event> = held().into_iter().map(|stored| stored.event).collect();
    assert_eq!(held, [deepest()]);
    app.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// A publish colliding with the deepest event an older relay stored is answered with it as
/// the ack's `held` revision, and the client settles the conflict: the ack puts 4 levels
/// around the held event's data and was read whole, so every session ended `malformed
/// message` on the ack and the publish went out again at every reconnect.
#[tokio::test]
async fn an_ack_holding_the_deepest_data_older_builds_stored_settles_the_conflict() {
    let (_dir, server) = relay_over_room("deep", vec![deepest()]).await;
    let url = server.url(Some("deep"));
    let client = WebSocketSyncClient::builder(url.clone())
        .build()
        .expect("client");
    let seen = Recorder::attach(&client);
    let app = ksync_testkit::ksync_over(Arc::new(ksync_core::InMemoryStorage::new()), client)
        .await
        .expect("ksync");
    // Past the deep event already (as a client that read it before this revision was made
    // offline), so it comes back only in the ack.
    app.replica()
        .set_cursor(&format!("ws:{url}/room"), 1)
        .await
        .expect("cursor");
    app.update("deepest", "t", serde_json::json!("other"))
        .await
        .expect("update");
    app.connect().await.expect("connect");
    let errors = |n: &Notification| matches!(n, Notification::Error(_));
    let conflicts = |n: &Notification| matches!(n, Notification::Conflict(_));
    eventually("the conflict, or an error", || {
        seen.count(conflicts) > 0 || seen.count(errors) > 0
    })
    .await;
    assert_eq!(seen.count(errors), 0, "{:?}", seen.all());
    assert_eq!(seen.count(conflicts), 1, "{:?}", seen.all());
    app.disconnect().await.expect("disconnect");
    server.stop().await;
}
