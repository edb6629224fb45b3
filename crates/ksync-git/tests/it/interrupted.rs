//! Checkouts, merges and pushes cut short (a failed write, a crash, a cancelled future): the
//! branch map, the merge resolutions and the push cursor stay right.

use crate::common;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use ksync_core::{Event, InMemoryStorage, KSync, PullPushClient, Storage, SyncClient};
use ksync_git::GitSyncClient;
use ksync_storage_file::{FaultHook, FileStorage, WriteFault};
use serde_json::json;

use common::{Server, branch_events, client, start};

/// Lets `left` more writes through once armed, then fails every later one with ENOSPC: a
/// crash at that point, once the state is dropped and the file reopened.
#[derive(Default)]
struct FailAfter {
    armed: AtomicBool,
    left: AtomicUsize,
}

impl FailAfter {
    fn arm(&self, writes: usize) {
        self.left.store(writes, SeqCst);
        self.armed.store(true, SeqCst);
    }

    fn disarm(&self) {
        self.armed.store(false, SeqCst);
    }
}

impl FaultHook for FailAfter {
    fn before_write(&self, _: usize) -> Result<(), WriteFault> {
        if !self.armed.load(SeqCst) {
            return Ok(());
        }
        if self.left.load(SeqCst) == 0 {
            return Err(WriteFault {
                written: 0,
                error: io::Error::from_raw_os_error(28),
            });
        }
        self.left.fetch_sub(1, SeqCst);
        Ok(())
    }
}

async fn open(path: &Path, url: &str, hook: Option<Arc<FailAfter>>) -> KSync<GitSyncClient> {
    let mut builder = FileStorage::builder(path);
    if let Some(hook) = hook {
        builder = builder.fault_hook(hook);
    }
    let storage: Arc<dyn Storage> = Arc::new(builder.open().expect("file storage"));
    ksync_testkit::ksync_over(storage, client(url))
        .await
        .expect("ksync")
}

fn has(server: &Server, branch: &str, id: &str) -> bool {
    branch_events(server, "r", branch)
        .iter()
        .any(|e| e.id == id)
}

fn versions_of(server: &Server, branch: &str, id: &str) -> Vec<u64> {
    branch_events(server, "r", branch)
        .iter()
        .filter(|e| e.id == id)
        .map(|e| e.version)
        .collect()
}

#[tokio::test]
async fn an_interrupted_checkout_leaves_new_events_on_the_checked_out_branch() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("local.log");
    let hook = Arc::new(FailAfter::default());
    let node = open(&path, &url, Some(Arc::clone(&hook))).await;
    node.emit("t", json!({"n": 0})).await.expect("emit");
    node.push().await.expect("push");
    node.client()
        .create_branch("feature")
        .await
        .expect("branch");
    // A checkout writes the branch map, then `git.head`: the second write fails.
    hook.arm(1);
    assert!(node.client().checkout("feature").await.is_err());
    let map = node.replica().storage().meta("git.segments").expect("meta");
    assert!(
        map.is_some_and(|m| m.contains("feature")),
        "the map was written"
    );
    drop(node);

    let node = open(&path, &url, None).await;
    assert_eq!(node.client().current_branch(), "main");
    let event = node.emit("t", json!({"n": 1})).await.expect("emit");
    let pushed = node.push().await.expect("push");
    let ids: Vec<_> = pushed.pushed_events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, vec![event.id.clone()]);
    assert!(has(&server, "main", &event.id));
    assert!(!has(&server, "feature", &event.id));
}

/// A node on `feature` (over `path`, with `hook`), and `x` version 1 with other content on
/// `main` and on `feature` (pushed by others).
async fn diverged(server: &Server, path: &Path, hook: &Arc<FailAfter>) -> KSync<GitSyncClient> {
    let url = server.repo_url("r");
    let node = open(path, &url, Some(Arc::clone(hook))).await;
    node.pull().await.expect("pull");
    node.client()
        .create_branch("feature")
        .await
        .expect("branch");
    node.client().checkout("feature").await.expect("checkout");
    let on_main = client(&url);
    on_main
        .send(Event::new("x", "t", json!("main"), 1))
        .await
        .expect("send");
    on_main.push().await.expect("push main");
    let on_feature = GitSyncClient::builder(&url)
        .auth(ksync_core::Auth::token("writer"))
        .branch("feature")
        .build()
        .expect("client");
    on_feature
        .send(Event::new("x", "t", json!("feature"), 2))
        .await
        .expect("send");
    on_feature.push().await.expect("push feature");
    node
}

/// Merges `main` <- `feature` with `writes` more writes let through: the merge id, the owed
/// mark, the map (to `main`), the resolution, the map (back to `feature`), the merge id cleared.
async fn interrupted_merge(node: &KSync<GitSyncClient>, hook: &FailAfter, writes: usize) {
    hook.arm(writes);
    assert!(node.client().merge("main", "feature").await.is_err());
    let latest = node.replica().storage().latest("x").expect("latest");
    assert_eq!(
        latest.map(|s| s.event.version),
        Some(2),
        "the resolution was recorded"
    );
}

async fn emitted_on_feature_lands_on_feature(server: &Server, node: &KSync<GitSyncClient>) {
    assert_eq!(node.client().current_branch(), "feature");
    let event = node.emit("t", json!({"n": 1})).await.expect("emit");
    let pushed = node.push().await.expect("push");
    assert!(pushed.pushed_events.iter().any(|e| e.id == event.id));
    assert!(has(server, "feature", &event.id));
    assert!(!has(server, "main", &event.id));
    // The resolution is still `main`'s.
    assert_eq!(versions_of(server, "feature", "x"), vec![1]);
}

#[tokio::test]
async fn a_merge_cut_after_its_resolutions_leaves_new_events_on_the_checked_out_branch() {
    let server = start(&["r"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("local.log");
    let hook = Arc::new(FailAfter::default());
    let node = diverged(&server, &path, &hook).await;
    interrupted_merge(&node, &hook, 4).await;
    drop(node);

    let node = open(&path, &server.repo_url("r"), None).await;
    emitted_on_feature_lands_on_feature(&server, &node).await;
    // The owed resolution goes to `main` with the next merge.
    node.client().merge("main", "feature").await.expect("merge");
    assert_eq!(versions_of(&server, "main", "x"), vec![1, 2]);
}

#[tokio::test]
async fn a_merge_failing_after_its_resolutions_leaves_new_events_on_the_checked_out_branch() {
    let server = start(&["r"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("local.log");
    let hook = Arc::new(FailAfter::default());
    let node = diverged(&server, &path, &hook).await;
    interrupted_merge(&node, &hook, 4).await;
    hook.disarm();
    emitted_on_feature_lands_on_feature(&server, &node).await;
    node.client().merge("main", "feature").await.expect("merge");
    assert_eq!(versions_of(&server, "main", "x"), vec![1, 2]);
}

#[tokio::test]
async fn a_merge_retried_after_its_resolutions_were_recorded_settles_once() {
    let server = start(&["r"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("local.log");
    let hook = Arc::new(FailAfter::default());
    let node = diverged(&server, &path, &hook).await;
    // Everything but clearing the merge id.
    interrupted_merge(&node, &hook, 5).await;
    drop(node);

    let node = open(&path, &server.repo_url("r"), None).await;
    let merged = node.client().merge("main", "feature").await.expect("merge");
    assert_eq!(merged.conflicts.len(), 1, "the answer replayed");
    assert_eq!(
        versions_of(&server, "main", "x"),
        vec![1, 2],
        "settled once"
    );
    assert_eq!(
        node.replica()
            .storage()
            .latest("x")
            .expect("latest")
            .map(|s| s.event.version),
        Some(2)
    );
}

#[tokio::test]
async fn a_cancelled_push_does_not_move_the_cursor_past_an_event_sent_after_it() {
    let server = start(&["r"]).await;
    // The push cursor's first write is held (`held` says when) until a forward mark is written,
    // `send`'s first step: a client that does not wait for a cancelled push's cursor write
    // then reads the cursor before that write lands. `landed` counts push cursor writes done.
    let held = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (landed_tx, mut landed) = tokio::sync::watch::channel(0_u32);
    let first = AtomicBool::new(true);
    let hook = {
        let (held, gate) = (Arc::clone(&held), Arc::clone(&gate));
        Arc::new(move |key: &str| {
            let hold = key.contains("pushed") && first.swap(false, SeqCst);
            if key.starts_with("forward/") {
                gate.add_permits(1);
            }
            let (held, gate) = (Arc::clone(&held), Arc::clone(&gate));
            let wait: ksync_core::BoxFuture<'static, _> = Box::pin(async move {
                if hold {
                    held.notify_one();
                    drop(gate.acquire().await.expect("gate"));
                }
                Ok(())
            });
            wait
        })
    };
    let storage: Arc<dyn Storage> = Arc::new(ksync_testkit::MetaHook::with_after(
        Arc::new(InMemoryStorage::new()),
        hook,
        Arc::new(move |key: &str, _: &str| {
            if key.contains("pushed") {
                landed_tx.send_modify(|n| *n += 1);
            }
        }),
    ));
    let k = ksync_testkit::ksync_over(storage, client(&server.repo_url("r")))
        .await
        .expect("ksync");
    // Another replica's event, merely arrived (not ours to send, yet).
    let foreign = Event::new("foreign", "t", json!(0), 1).with_origin("other");
    k.replica()
        .ingest(vec![foreign.clone()])
        .await
        .expect("ingest");
    assert_eq!(k.replica().storage().len(), 1);
    for n in 0..3 {
        k.emit("t", json!({"n": n})).await.expect("emit");
    }
    // Cancelled while its cursor write is held (the batch was acknowledged).
    tokio::select! {
        pushed = k.push() => panic!("the push ended with its cursor write held: {pushed:?}"),
        () = held.notified() => {}
    }
    assert_eq!(branch_events(&server, "r", "main").len(), 3);
    // Now handed over to be sent on: behind the push cursor, which must go back for it.
    k.client().send(foreign.clone()).await.expect("send");
    // The cancelled push's cursor write has landed (awaited by `send`, or on its own).
    landed.wait_for(|&n| n >= 1).await.expect("landed");
    k.push().await.expect("push");
    assert!(
        has(&server, "main", "foreign"),
        "the forwarded event was pushed"
    );
}
