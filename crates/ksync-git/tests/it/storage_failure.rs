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

/// Two merges of the same pair at once (two clients), the first held up on its disk: between
/// them, `from`'s events are reported appended once and its collision once. The second one
/// took the first one's appends for its own (both began at the same length of `into`) and
/// reported them again, with the collision, which both clients then settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_merges_of_a_pair_report_its_events_once() {
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let held_tx = std::sync::Mutex::new(Some(held_tx));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let hook: Arc<MetaHookFn> = {
        let release = Arc::clone(&release);
        Arc::new(move |key: &str| {
            // The first merge's pending record: it waits there until the test lets it go.
            let first = key.starts_with("git.merge-pending.")
                && held_tx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .map(|tx| tx.send(()))
                    .is_some();
            let release = Arc::clone(&release);
            Box::pin(async move {
                if first {
                    let _ = release.acquire().await.map(|p| p.forget());
                }
                Ok(())
            })
        })
    };
    let provider = Arc::new(MergeAnswerFaults {
        inner: InMemoryProvider::new(),
        hook,
    });
    let server = start_with(provider, GitServerConfig::default(), &["r"]).await;
    let http = http();
    let (status, body) = call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "feature", "at": 0})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let push = |branch: &str, events: Vec<Value>| {
        http.post(server.url(&format!("/git/r/branches/{branch}/events")))
            .json(&json!({"baseVersion": 0, "events": events}))
    };
    let mut main_x = event("x");
    main_x["data"] = json!("main");
    let (status, body) = call(push("main", vec![main_x])).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(push(
        "feature",
        vec![event("f0"), event("f1"), event("f2"), event("x")],
    ))
    .await;
    assert_eq!(status, 200, "{body}");

    let merge = |id: &str| {
        call(
            http.post(server.url("/git/r/merge"))
                .json(&json!({"into": "main", "from": "feature", "mergeId": id})),
        )
    };
    let mut first = tokio::spawn(merge("first"));
    held_rx
        .await
        .expect("the first merge reaches its pending record");
    let mut second = tokio::spawn(merge("second"));
    // The second merge either waits for the first (then it cannot end while the first is
    // held: the bound is how long it is given) or ends on its own.
    let second_done = tokio::time::timeout(Duration::from_millis(500), &mut second)
        .await
        .ok();
    release.add_permits(1);
    let first = (&mut first).await.expect("first");
    let second = match second_done {
        Some(done) => done,
        None => second.await,
    }
    .expect("second");
    assert_eq!((first.0, second.0), (200, 200), "{first:?} {second:?}");
    let appended: Vec<u64> = [&first.1, &second.1]
        .iter()
        .map(|b| b["appended"].as_u64().expect("appended"))
        .collect();
    let conflicts: usize = [&first.1, &second.1]
        .iter()
        .map(|b| b["conflicts"].as_array().expect("conflicts").len())
        .sum();
    assert_eq!(
        (appended.iter().sum::<u64>(), conflicts),
        (3, 1),
        "{first:?} {second:?}"
    );
    assert_eq!(branch_events(&server, "r", "main").len(), 4);
}

/// Fails every write with ENOSPC while `full` is set: a full disk, until space is freed.
#[derive(Default)]
struct DiskFull {
    full: std::sync::atomic::AtomicBool,
}

impl ksync_storage_file::FaultHook for DiskFull {
    fn before_write(&self, _: usize) -> Result<(), ksync_storage_file::WriteFault> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ksync_storage_file::WriteFault {
                written: 0,
                error: std::io::Error::from_raw_os_error(28),
            });
        }
        Ok(())
    }
}

/// A push that meets a full disk is refused with 507 `storage_full` (the operator's to fix,
/// the client's to retry later), not 500; nothing of it is stored, the service stays up, and
/// once space is freed the same push is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_meets_a_full_disk_is_refused_with_507_and_stored_once_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(DiskFull::default());
    let mut options = FileStorageOptions::default();
    options.fault_hook = Some(disk.clone());
    let provider: Arc<dyn StorageProvider> =
        Arc::new(FileProvider::with_options(dir.path(), options).expect("provider"));
    let server = start_with(provider, GitServerConfig::default(), &["r"]).await;
    let http = http();
    let events = server.url("/git/r/branches/main/events");
    let push = |id: &str| {
        http.post(&events)
            .json(&json!({"baseVersion": 0, "events": [event(id)]}))
    };

    disk.full.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = call(push("a")).await;
    assert_eq!(
        (status, common::code(&body)),
        (507, "storage_full"),
        "{body}"
    );
    assert!(branch_events(&server, "r", "main").is_empty());

    disk.full.store(false, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = call(push("a")).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> = branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["a"]);
}
