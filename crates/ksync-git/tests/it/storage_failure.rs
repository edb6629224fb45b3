//! The service's storage failing: over file logs, one of which fails one `fdatasync`, the push
//! that met the failure is refused (nothing of it acknowledged), and the next push reopens the
//! branch log instead of being refused with "storage is closed" until the server restarts; a
//! merge whose answer cannot be kept is retried and counted as the first try would have been.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use ksync_core::{
    Event, InMemoryProvider, LogName, PullPushClient, Storage, StorageError, StorageProvider,
    SyncClient,
};
use ksync_git::GitError;
use ksync_git::server::GitServerConfig;
use ksync_storage_file::{FailNextSync, FileProvider, FileStorageOptions};
use ksync_testkit::{MetaHook, MetaHookFn};
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

/// An in-memory provider whose logs' first write of a merge answer fails (a full disk).
struct MergeAnswerFaults {
    inner: InMemoryProvider,
    hook: Arc<MetaHookFn>,
}

impl MergeAnswerFaults {
    fn wrap(&self, log: Arc<dyn Storage>) -> Arc<dyn Storage> {
        Arc::new(MetaHook::new(log, Arc::clone(&self.hook)))
    }
}

impl StorageProvider for MergeAnswerFaults {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(self.wrap(self.inner.open(name)?))
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        Ok(self.inner.existing(name)?.map(|log| self.wrap(log)))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.inner.list()
    }
}

/// A merge whose answer the service cannot keep (after it stored what it merged) fails (500);
/// the client merges again under the same `mergeId`, and the summary counts what the merge
/// brought as appended, not as duplicates of what its first try stored.
#[tokio::test]
async fn a_merge_retried_after_its_answer_was_not_kept_counts_what_it_appended() {
    let provider = Arc::new(MergeAnswerFaults {
        inner: InMemoryProvider::new(),
        hook: MetaHook::fail_once(|key| key.starts_with("git.merge-answer.")),
    });
    let server = start_with(provider, GitServerConfig::default(), &["r"]).await;
    let client = common::client(&server.repo_url("r"));
    client.create_branch("feature").await.expect("branch");
    client.checkout("feature").await.expect("checkout");
    for n in 0..3 {
        client
            .send(Event::new(format!("f{n}"), "t", json!(n), 1))
            .await
            .expect("send");
    }
    client.push().await.expect("push");

    let err = client
        .merge("main", "feature")
        .await
        .expect_err("the answer was not kept");
    assert_eq!(
        GitError::of(&err).and_then(GitError::status),
        Some(500),
        "{err}"
    );
    assert_eq!(branch_events(&server, "r", "main").len(), 3, "merged");
    let merged = client.merge("main", "feature").await.expect("merge again");
    assert_eq!((merged.appended, merged.duplicates), (3, 0), "{merged:?}");
    // A merge with nothing new still counts nothing.
    let again = client.merge("main", "feature").await.expect("merge again");
    assert_eq!((again.appended, again.duplicates), (0, 0), "{again:?}");
}
