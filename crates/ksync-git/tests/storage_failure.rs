//! The service over file logs, one of which fails one `fdatasync`: the push that met the
//! failure is refused (nothing of it acknowledged), and the next push reopens the branch log
//! instead of being refused with "storage is closed" until the server restarts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ksync_core::StorageProvider;
use ksync_git::server::GitServerConfig;
use ksync_storage_file::{FailNextSync, FileProvider, FileStorageOptions};
use serde_json::{Value, json};

use common::{branch_events, call, http, start_with};

fn event(id: &str) -> Value {
    json!({"id": id, "type": "t", "data": {"id": id}, "timestamp": 1, "version": 1})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_log_a_failed_sync_closed_is_reopened_by_the_next_push() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FailNextSync::default());
    let mut options = FileStorageOptions::default();
    options.fault_hook = Some(faults.clone());
    let provider: Arc<dyn StorageProvider> =
        Arc::new(FileProvider::with_options(dir.path(), options).expect("provider"));
    let server = start_with(provider, GitServerConfig::default(), &["r"]).await;
    let http = http();
    let events = server.url("/git/r/branches/main/events");
    let push = |base: u64, id: &str| {
        http.post(&events)
            .json(&json!({"baseVersion": base, "events": [event(id)]}))
    };

    let (status, body) = call(push(0, "a")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["appended"], 1);

    faults.arm();
    let (status, body) = call(push(1, "b")).await;
    assert_eq!(status, 500, "the push that met the failure: {body}");

    // The client pushes b again (its retry); it is stored, soon.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let body = loop {
        let (status, body) = call(push(1, "b")).await;
        if status == 200 {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b is never stored again: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (&body["appended"], &body["serverVersion"]),
        (&json!(1), &json!(2)),
        "{body}"
    );

    // The branch holds a and b, once each, also as a pull from 0 reads it.
    let ids: Vec<String> = branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["a", "b"]);
    let (status, body) = call(http.get(format!("{events}?since=0"))).await;
    assert_eq!(status, 200, "{body}");
    let pulled: Vec<&Value> = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["id"])
        .collect();
    assert_eq!(pulled, [&json!("a"), &json!("b")], "{body}");
}
