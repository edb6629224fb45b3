//! The client's own storage failing in the middle of a pull: what was stored before the
//! failure is reported, once.

mod common;

use std::sync::{Arc, Mutex};

use ksync_core::{
    Event, InMemoryStorage, KSync, Notification, PullPushClient, Storage, SyncClient,
};
use ksync_testkit::FailAppend;
use serde_json::json;

use common::{call, http, start};

/// A pull brings a new event `y` and a revision of `x` that conflicts with ours. Writing the
/// revision that settles the conflict fails, after `y` was stored: the pull fails, but `y`
/// is reported (`event` and `sync`) all the same, as the next pull finds it a duplicate and
/// reports it no more. That next pull settles the conflict.
#[tokio::test]
async fn a_pull_whose_resolution_cannot_be_written_reports_what_it_stored() {
    let server = start(&["r"]).await;
    let (status, body) = call(
        http()
            .post(server.url("/git/r/branches/main/events"))
            .json(&json!({"baseVersion": 0, "events": [
                {"id": "y", "type": "t", "data": "new", "timestamp": 2, "version": 1, "origin": "them"},
                {"id": "x", "type": "t", "data": "theirs", "timestamp": 2, "version": 1, "origin": "them"},
            ]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let storage = Arc::new(FailAppend::new(
        Arc::new(InMemoryStorage::new()),
        // The revision settling the conflict over `x`.
        |events| events.iter().any(|e| e.id == "x" && e.version == 2),
    ));
    let ksync = KSync::builder()
        .storage(storage.clone() as Arc<dyn Storage>)
        .sync_client(Arc::new(common::client(&server.repo_url("r"))))
        .build()
        .await
        .expect("ksync");
    let replica = ksync.replica();
    replica
        .record_local(Event::new("x", "t", json!("mine"), 1).with_origin(replica.id()))
        .await
        .expect("local");
    let events = Arc::new(Mutex::new(Vec::new()));
    let synced = ksync_testkit::SyncRecorder::new(ksync.client().notifier());
    let sink = Arc::clone(&events);
    let _sub = ksync
        .client()
        .notifier()
        .on("event", move |n| {
            if let Notification::Event(e) = n {
                sink.lock().expect("lock").push(e.id.clone());
            }
        })
        .expect("event");

    let err = ksync
        .client()
        .pull()
        .await
        .expect_err("the resolution failed");
    assert!(storage.failed(), "the fault was met: {err}");
    let pulled = ksync.client().pull().await.expect("the second pull");
    assert_eq!(pulled.conflicts.len(), 1, "the second pull settles x");
    assert_eq!(
        replica
            .storage()
            .latest("x")
            .expect("read")
            .expect("x")
            .event
            .version,
        2
    );
    assert_eq!(*events.lock().expect("lock"), ["y"], "y reported once");
    assert_eq!(synced.ids(), ["y"], "y synced once");
}
