//! Pull, push, sync, clone, conflicts and branches against a real service on 127.0.0.1:0.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ksync_core::{
    AutoSync, Conflict, Event, InMemoryStorage, KSync, ManualClock, PullPushClient, Resolution,
    Storage, SyncClient,
};
use ksync_git::GitSyncClient;
use serde_json::json;

use common::{branch_events, client, start};

type Node = KSync<GitSyncClient>;

async fn node(url: &str, id: &str, clock: &ManualClock) -> Node {
    KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(client(url)))
        .replica_id(id)
        .clock(Arc::new(clock.clone()))
        .build()
        .await
        .expect("ksync")
}

fn count(node: &Node, kind: &str) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let m = Arc::clone(&n);
    let sub = node
        .on(kind, move |_| {
            m.fetch_add(1, Ordering::SeqCst);
        })
        .expect("on");
    std::mem::forget(sub);
    n
}

/// A and B share `x`, then both edit it offline: B first (t=200), A later (t=300); A syncs
/// first. Returns the value of `x` everywhere after B and then A sync, and B's conflict count.
async fn offline_edit_then_sync(policy: Option<Resolution>) -> (serde_json::Value, usize) {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let clock = ManualClock::new(100);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;
    if let Some(policy) = policy {
        b.on_conflict(move |c: &Conflict| match &policy {
            Resolution::Merged(_) => Resolution::Merged(Event::new(
                &c.ours.id,
                "doc",
                json!(format!("{}+{}", c.ours.data, c.theirs.data)),
                400,
            )),
            other => other.clone(),
        });
    }
    let b_conflicts = count(&b, "conflict");
    a.update("x", "doc", json!("base")).await.expect("base");
    a.push().await.expect("push base");
    assert_eq!(b.pull().await.expect("pull base").new_events.len(), 1);

    clock.set(200);
    b.update("x", "doc", json!("b")).await.expect("b edit");
    clock.set(300);
    a.update("x", "doc", json!("a")).await.expect("a edit");

    let a_first = a.sync().await.expect("a sync");
    assert!(a_first.pull.conflicts.is_empty());
    assert_eq!(a_first.push.pushed_events.len(), 1);

    let b_sync = b.sync().await.expect("b sync");
    // B is the side that is behind: B sees the conflict, settles it, pushes the resolution.
    assert_eq!(b_sync.pull.conflicts.len(), 1, "conflict detected at B");
    let conflict = &b_sync.pull.conflicts[0];
    assert_eq!(
        (conflict.ours.data.clone(), conflict.theirs.data.clone()),
        (json!("b"), json!("a"))
    );
    assert_eq!(
        b_sync.push.rejected_events.len(),
        1,
        "B's own v2 is refused"
    );
    assert_eq!(b_sync.push.rejected_events[0].data, json!("b"));
    assert_eq!(
        b_sync.push.pushed_events.len(),
        1,
        "the resolution goes out"
    );
    assert_eq!(b_sync.push.pushed_events[0].version, 3);

    let a_sync = a.sync().await.expect("a sync again");
    assert!(a_sync.pull.conflicts.is_empty(), "no conflict at A");
    assert!(a_sync.push.pushed_events.is_empty());

    // Everybody converged on the same revision.
    let at_a = a.state().expect("state")["x"].clone();
    let at_b = b.state().expect("state")["x"].clone();
    let on_server = branch_events(&server, "r", "main")
        .into_iter()
        .filter(|e| e.id == "x")
        .max_by_key(|e| e.version)
        .expect("x on server");
    assert!(at_a.same_content(&at_b) && at_a.version == at_b.version);
    assert!(at_a.same_content(&on_server) && on_server.version == 3);
    // Nothing more to exchange: both ends are quiet.
    let quiet = b.sync().await.expect("b sync");
    assert!(quiet.pull.new_events.is_empty() && quiet.push.pushed_events.is_empty());
    (at_a.data, b_conflicts.load(Ordering::SeqCst))
}

#[tokio::test]
async fn offline_edits_default_to_last_write_wins() {
    let (value, notified) = offline_edit_then_sync(None).await;
    assert_eq!(value, json!("a"), "A wrote last (t=300)");
    assert_eq!(notified, 1, "the conflict is still reported");
}

#[tokio::test]
async fn offline_edits_resolved_ours() {
    let (value, _) = offline_edit_then_sync(Some(Resolution::Ours)).await;
    assert_eq!(value, json!("b"));
}

#[tokio::test]
async fn offline_edits_resolved_theirs() {
    let (value, _) = offline_edit_then_sync(Some(Resolution::Theirs)).await;
    assert_eq!(value, json!("a"));
}

#[tokio::test]
async fn offline_edits_resolved_merged() {
    let placeholder = Event::new("x", "doc", json!(null), 0);
    let (value, _) = offline_edit_then_sync(Some(Resolution::Merged(placeholder))).await;
    assert_eq!(value, json!("\"b\"+\"a\""));
}

/// Sends events `e{i}` (data and timestamp `i`) for each `i` of `range`.
async fn send_numbered(client: &GitSyncClient, range: std::ops::Range<u64>) {
    for i in range {
        client
            .send(Event::new(format!("e{i}"), "t", json!(i), i))
            .await
            .expect("send");
    }
}

#[tokio::test]
async fn push_reports_server_version_and_pull_pages() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let a = client(&url);
    send_numbered(&a, 0..25).await;
    let before = a.local_status().expect("status");
    assert_eq!(
        (
            before.branch.as_str(),
            before.pending_events,
            before.pulled_version
        ),
        ("main", 25, 0)
    );
    let pushed = a.push().await.expect("push");
    assert_eq!(
        (pushed.pushed_events.len(), pushed.server_version),
        (25, 25)
    );
    let after = a.local_status().expect("status");
    assert_eq!(
        (after.pending_events, after.pulled_version),
        (0, 25),
        "fast-forwarded"
    );
    // Nothing pending: an empty push still tells the server version.
    let again = a.push().await.expect("push");
    assert_eq!((again.pushed_events.len(), again.server_version), (0, 25));

    let b = GitSyncClient::builder(&url)
        .auth(ksync_core::Auth::api_key("key-1"))
        .page_size(7)
        .compression(false)
        .build()
        .expect("client");
    let pages = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&pages);
    b.set_progress(Some(Arc::new(move |_| {
        p.fetch_add(1, Ordering::SeqCst);
    })));
    let pulled = b.clone(&url, "main").await.expect("clone");
    assert_eq!((pulled.new_events.len(), pulled.server_version), (25, 25));
    assert_eq!(pages.load(Ordering::SeqCst), 4, "7+7+7+4");
    let ids: Vec<_> = pulled.new_events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids[0], "e0");
    assert_eq!(ids[24], "e24");
    assert_eq!(b.replica().storage().len(), 25);
    // The cursor over the last page is stored too.
    assert_eq!(b.local_status().expect("status").pulled_version, 25);
    // Pulling again brings nothing new.
    assert!(b.pull().await.expect("pull").new_events.is_empty());
}

/// An in-memory service with repository `r` whose pages hold at most `max_page` events.
async fn start_with_max_page(max_page: usize) -> common::Server {
    let config = {
        let mut git_config = ksync_git::server::GitServerConfig::default();
        git_config.max_page = max_page;
        git_config
    };
    let provider = Arc::new(ksync_core::InMemoryProvider::new());
    common::start_with(provider, config, &["r"]).await
}

/// `max_page: 0` counts as 1: a page of nothing stalled every pull (and panicked the service's
/// `clamp(1, 0)`).
#[tokio::test]
async fn a_service_configured_with_max_page_zero_serves_pages_of_one() {
    let server = start_with_max_page(0).await;
    let url = server.repo_url("r");
    let a = client(&url);
    send_numbered(&a, 0..3).await;
    a.push().await.expect("push");
    let b = client(&url);
    assert_eq!(b.pull().await.expect("pull").new_events.len(), 3);
    assert_eq!(b.replica().storage().len(), 3);
}

#[tokio::test]
async fn pulls_follow_the_server_page_cap_and_a_growing_branch() {
    // Pages requested ahead are placed by the size of the first full page: here the server's
    // cap (4), not the client's page size (100).
    let server = start_with_max_page(4).await;
    let url = server.repo_url("r");
    let a = client(&url);
    send_numbered(&a, 0..25).await;
    a.push().await.expect("push");
    let b = GitSyncClient::builder(&url)
        .auth(ksync_core::Auth::api_key("key-1"))
        .page_size(100)
        .build()
        .expect("client");
    // While the clone runs, the branch grows: the pull goes on past the version it first saw.
    let writer = {
        let a = GitSyncClient::builder(&url)
            .auth(ksync_core::Auth::token("writer"))
            .build()
            .expect("client");
        tokio::spawn(async move {
            for i in 25..40 {
                send_numbered(&a, i..i + 1).await;
                a.push().await.expect("push");
            }
        })
    };
    let pulled = b.clone(&url, "main").await.expect("clone");
    writer.await.expect("writer");
    let pulled_more = b.pull().await.expect("pull");
    let ids: Vec<String> = pulled
        .new_events
        .iter()
        .chain(&pulled_more.new_events)
        .map(|e| e.id.clone())
        .collect();
    let expected: Vec<String> = branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(expected.len(), 40);
    assert_eq!(ids, expected, "every event once, in the branch's order");
    assert_eq!(b.local_status().expect("status").pulled_version, 40);
}

#[tokio::test]
async fn ksync_auto_sync_and_pull_interval_move_events() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let clock = ManualClock::new(1);
    let a = node(&url, "a", &clock).await;
    let reader = GitSyncClient::builder(&url)
        .auth(ksync_core::Auth::jwt("writer"))
        .pull_interval(Duration::from_millis(50))
        .build()
        .expect("client");
    let b: Node = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), reader)
        .await
        .expect("ksync");
    let received = count(&b, "event");
    b.connect().await.expect("connect starts auto-pull");
    a.connect().await.expect("connect");
    a.enable_auto_sync(AutoSync {
        push_interval: Duration::from_millis(50),
        pull_interval: Duration::from_millis(50),
    });
    for i in 0..3 {
        a.emit("tick", json!({"n": i})).await.expect("emit");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "auto sync moved the events"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.state().expect("state").len(), 3);
    a.disconnect().await.expect("disconnect");
    b.disconnect().await.expect("disconnect");
}

#[tokio::test]
async fn branches_create_checkout_list_and_merge_both_ways() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let clock = ManualClock::new(10);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;

    a.emit("e", json!("on main")).await.expect("emit");
    a.push().await.expect("push");
    // The spec's snippet.
    let created = a
        .client()
        .create_branch("feature-branch")
        .await
        .expect("create");
    assert_eq!(
        (
            created.forked_from.as_deref(),
            created.forked_at,
            created.server_version
        ),
        (Some("main"), Some(1), 1)
    );
    a.client()
        .checkout("feature-branch")
        .await
        .expect("checkout");
    assert_eq!(a.client().current_branch(), "feature-branch");
    let names: Vec<_> = a
        .client()
        .list_branches()
        .await
        .expect("list")
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["feature-branch", "main"]);

    // A works on the feature branch, B on main.
    a.emit("f", json!("on feature")).await.expect("emit");
    let pushed = a.push().await.expect("push feature");
    assert_eq!(pushed.server_version, 2);
    b.pull().await.expect("pull main");
    b.emit("m", json!("on main")).await.expect("emit");
    b.push().await.expect("push main");
    let types = |branch: &str| -> Vec<String> {
        branch_events(&server, "r", branch)
            .into_iter()
            .map(|e| e.event_type)
            .collect()
    };
    assert_eq!(types("main"), ["e", "m"]);
    assert_eq!(types("feature-branch"), ["e", "f"]);

    // Merge both ways without conflicts.
    let merged = a
        .client()
        .merge("main", "feature-branch")
        .await
        .expect("merge");
    assert_eq!((merged.appended, merged.conflicts.len()), (1, 0));
    assert_eq!(types("main"), ["e", "m", "f"]);
    let merged = a
        .client()
        .merge("feature-branch", "main")
        .await
        .expect("merge back");
    assert_eq!((merged.appended, merged.conflicts.len()), (1, 0));
    assert_eq!(types("feature-branch"), ["e", "f", "m"]);
    // A has feature-branch checked out: the merge pulled it.
    assert_eq!(a.state().expect("state").len(), 3);
    // Merging again changes nothing.
    let again = a
        .client()
        .merge("main", "feature-branch")
        .await
        .expect("merge");
    assert_eq!((again.appended, again.conflicts.len()), (0, 0));

    // Conflicting edits of one id on each branch.
    clock.set(50);
    a.update("doc", "d", json!("feature text"))
        .await
        .expect("edit");
    a.push().await.expect("push");
    clock.set(40);
    b.update("doc", "d", json!("main text"))
        .await
        .expect("edit");
    b.push().await.expect("push");
    let conflicts = count(&a, "conflict");
    let merged = a
        .client()
        .merge("main", "feature-branch")
        .await
        .expect("merge");
    assert_eq!(merged.conflicts.len(), 1);
    assert_eq!(merged.conflicts[0].ours.data, json!("main text"));
    assert_eq!(merged.conflicts[0].theirs.data, json!("feature text"));
    assert_eq!(merged.resolutions.len(), 1);
    assert_eq!(conflicts.load(Ordering::SeqCst), 1);
    // Last write wins (feature's edit is later), written as v2 on main.
    let main_doc = branch_events(&server, "r", "main")
        .into_iter()
        .filter(|e| e.id == "doc")
        .max_by_key(|e| e.version)
        .expect("doc");
    assert_eq!(
        (main_doc.version, main_doc.data),
        (2, json!("feature text"))
    );
    // The resolution was pushed to main only, and is not pending for feature-branch.
    assert!(
        branch_events(&server, "r", "feature-branch")
            .iter()
            .all(|e| !(e.id == "doc" && e.version == 2))
    );
    assert!(a.push().await.expect("push").pushed_events.is_empty());
    b.pull().await.expect("pull");
    assert_eq!(b.state().expect("state")["doc"].data, json!("feature text"));

    // The other way with a `theirs` policy: main's v2 supersedes the collision, so feature
    // takes it without writing another revision.
    a.on_conflict(|_| Resolution::Theirs);
    let back = a
        .client()
        .merge("feature-branch", "main")
        .await
        .expect("merge");
    assert_eq!((back.conflicts.len(), back.resolutions.len()), (1, 0));
    assert_eq!(a.state().expect("state")["doc"].data, json!("feature text"));
    assert_eq!(a.state().expect("state")["doc"].version, 2);

    // A fresh conflict the other way, settled by `theirs` (main's content wins on feature).
    clock.set(60);
    a.update("note", "n", json!("feature note"))
        .await
        .expect("edit");
    a.push().await.expect("push");
    b.update("note", "n", json!("main note"))
        .await
        .expect("edit");
    b.push().await.expect("push");
    let back = a
        .client()
        .merge("feature-branch", "main")
        .await
        .expect("merge");
    assert_eq!((back.conflicts.len(), back.resolutions.len()), (1, 1));
    assert_eq!(a.state().expect("state")["note"].data, json!("main note"));
    let feature_note = branch_events(&server, "r", "feature-branch")
        .into_iter()
        .filter(|e| e.id == "note")
        .max_by_key(|e| e.version)
        .expect("note");
    assert_eq!(
        (feature_note.version, feature_note.data),
        (2, json!("main note"))
    );

    // Back on main: A's feature events are not pushed there.
    a.client().checkout("main").await.expect("checkout main");
    let main_len = branch_events(&server, "r", "main").len();
    let pushed = a.push().await.expect("push");
    assert!(pushed.pushed_events.is_empty());
    assert_eq!(branch_events(&server, "r", "main").len(), main_len);
}

#[tokio::test]
async fn checkout_survives_restart_and_builder_branch_checks_out() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let storage: Arc<dyn Storage> = Arc::new(InMemoryStorage::new());
    let first = client(&url);
    let ksync = ksync_testkit::ksync_over(Arc::clone(&storage), first)
        .await
        .expect("ksync");
    ksync.client().create_branch("dev").await.expect("create");
    ksync.client().checkout("dev").await.expect("checkout");
    drop(ksync);
    // A new client over the same storage resumes on `dev`.
    let again = ksync_testkit::ksync_over(Arc::clone(&storage), client(&url))
        .await
        .expect("ksync");
    assert_eq!(again.client().current_branch(), "dev");
    again.emit("t", json!(1)).await.expect("emit");
    again.push().await.expect("push");
    assert_eq!(branch_events(&server, "r", "dev").len(), 1);
    drop(again);
    // An explicit branch option checks that branch out.
    let explicit = GitSyncClient::builder(&url)
        .auth(ksync_core::Auth::token("writer"))
        .branch("main")
        .build()
        .expect("client");
    let third = ksync_testkit::ksync_over(storage, explicit)
        .await
        .expect("ksync");
    assert_eq!(third.client().current_branch(), "main");
    third.emit("t", json!(2)).await.expect("emit");
    let pushed = third.push().await.expect("push");
    assert_eq!(pushed.pushed_events.len(), 1, "only the event made on main");
    assert_eq!(branch_events(&server, "r", "main").len(), 1);
}

/// A server with repo `r`, and two replicas on it: `bridge`, which is handed events made
/// elsewhere, and `reader`.
async fn bridge_and_reader() -> (common::Server, String, Node, Node) {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let clock = ManualClock::new(100);
    let bridge = node(&url, "bridge", &clock).await;
    let reader = node(&url, "reader", &clock).await;
    (server, url, bridge, reader)
}

#[tokio::test]
async fn another_replicas_event_handed_to_the_client_is_pushed_with_its_origin() {
    let (_server, url, bridge, reader) = bridge_and_reader().await;
    let relayed = Event::new("from-p2p", "note", json!({"n": 1}), 50).with_origin("peer-p");
    bridge
        .client()
        .send(relayed.clone())
        .await
        .expect("forward");
    assert_eq!(
        bridge
            .client()
            .local_status()
            .expect("status")
            .pending_events,
        1
    );
    let pushed = bridge.push().await.expect("push");
    assert_eq!(pushed.pushed_events.len(), 1);
    // `clone_repo`: the spec's `clone`, callable through the `Arc` that `KSync` hands out.
    let pulled = reader
        .client()
        .clone_repo(&url, "main")
        .await
        .expect("clone");
    assert_eq!(pulled.new_events, vec![relayed]);
    // The reader received it: nothing of its own to push.
    assert_eq!(reader.push().await.expect("push").pushed_events.len(), 0);
    assert_eq!(
        bridge
            .client()
            .local_status()
            .expect("status")
            .pending_events,
        0
    );
}

/// Another replica's event handed over that collides with a revision held here is settled
/// by the conflict policy, as a pulled one is: the application hears of the conflict (a
/// `conflict` notification, as the P2P client gives), and the settling revision is pushed.
#[tokio::test]
async fn a_forward_that_collides_is_reported_as_a_conflict() {
    let (server, _url, bridge, _reader) = bridge_and_reader().await;
    bridge
        .replica()
        .ingest(vec![
            Event::new("x", "note", json!({"n": 1}), 50).with_origin("peer-p"),
        ])
        .await
        .expect("held");
    let conflicts = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&conflicts);
    let _sub = bridge
        .on("conflict", move |_| {
            seen.fetch_add(1, Ordering::SeqCst);
        })
        .expect("on");
    let other = Event::new("x", "note", json!({"n": 2}), 60).with_origin("peer-q");
    bridge.client().send(other).await.expect("forward");
    assert_eq!(
        conflicts.load(Ordering::SeqCst),
        1,
        "the collision is reported"
    );
    bridge.push().await.expect("push");
    let versions: Vec<u64> = branch_events(&server, "r", "main")
        .into_iter()
        .filter(|e| e.id == "x")
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, [2], "the settling revision is pushed");
}

#[tokio::test]
async fn a_push_in_many_batches_fast_forwards_through_all_of_them() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let batches = |url: &str| {
        GitSyncClient::builder(url)
            .auth(ksync_core::Auth::token("writer"))
            .push_batch_size(10)
            .build()
            .expect("client")
    };
    let a = batches(&url);
    for i in 0..35 {
        a.send(Event::new(format!("a{i}"), "t", json!(i), i))
            .await
            .expect("send");
    }
    let pushed = a.push().await.expect("push");
    assert_eq!(
        (pushed.pushed_events.len(), pushed.server_version),
        (35, 35)
    );
    let status = a.local_status().expect("status");
    assert_eq!((status.pending_events, status.pulled_version), (0, 35));
    assert!(a.pull().await.expect("pull").new_events.is_empty());

    // Somebody else pushed first: no batch is a fast-forward, and the next pull brings their
    // event (ours come back as duplicates).
    let b = client(&url);
    b.send(Event::new("b", "t", json!("b"), 1))
        .await
        .expect("send");
    b.push().await.expect("push");
    let c = batches(&url);
    for i in 0..25 {
        c.send(Event::new(format!("c{i}"), "t", json!(i), i))
            .await
            .expect("send");
    }
    let pushed = c.push().await.expect("push");
    assert_eq!(
        (pushed.pushed_events.len(), pushed.server_version),
        (25, 61)
    );
    let status = c.local_status().expect("status");
    assert_eq!((status.pending_events, status.pulled_version), (0, 0));
    let pulled = c.pull().await.expect("pull");
    assert_eq!(pulled.new_events.len(), 36, "a's 35 and b's one");
    assert_eq!(pulled.server_version, 61);
    assert_eq!(branch_events(&server, "r", "main").len(), 61);
}

#[tokio::test]
async fn forwarding_an_event_behind_the_push_cursor_pushes_it() {
    let (_server, _url, bridge, reader) = bridge_and_reader().await;
    // Stored by another transport sharing the storage (e.g. P2P): not the bridge's to push.
    let arrived = Event::new("arrived", "note", json!(1), 50).with_origin("peer-p");
    bridge
        .replica()
        .ingest(vec![arrived.clone()])
        .await
        .expect("ingest");
    let mine = bridge.emit("mine", json!(2)).await.expect("emit");
    let first = bridge.push().await.expect("push");
    assert_eq!(first.pushed_events, vec![mine.clone()]);
    // Handed over after the push cursor passed it: the next push carries it.
    bridge
        .client()
        .send(arrived.clone())
        .await
        .expect("forward");
    let second = bridge.push().await.expect("push");
    assert!(second.pushed_events.contains(&arrived), "{second:?}");
    let pulled = reader.pull().await.expect("pull");
    assert_eq!(pulled.new_events.len(), 2);
    assert!(pulled.new_events.contains(&arrived));
    assert!(pulled.new_events.contains(&mine));
}

/// A branch made right after a push that was not a fast-forward (another replica pushed in
/// between) still holds this replica's pushed events, as `git branch` from the local head
/// does; what the other replica pushed comes with it and is pulled on the new branch.
#[tokio::test]
async fn a_branch_made_after_a_push_holds_the_pushed_events() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let clock = ManualClock::new(10);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;
    a.pull().await.expect("pull");
    b.emit("e", json!("b's")).await.expect("emit");
    b.push().await.expect("push");
    // A pushes without pulling first: its events land after B's, its pull cursor stays at 0.
    a.emit("e", json!("a's 1")).await.expect("emit");
    a.emit("e", json!("a's 2")).await.expect("emit");
    assert_eq!(a.push().await.expect("push").pushed_events.len(), 2);
    let created = a.client().create_branch("feature").await.expect("create");
    assert_eq!(created.forked_at, Some(3), "{created:?}");
    assert_eq!(branch_events(&server, "r", "feature").len(), 3);
    a.client().checkout("feature").await.expect("checkout");
    let pulled = a.pull().await.expect("pull");
    let ids: Vec<_> = pulled.new_events.iter().map(|e| e.data.clone()).collect();
    assert_eq!(ids, [json!("b's")], "only B's event is new to A");
}

/// The `sync` notification is one exchange's events: for a push, the events the service
/// stored (not one it refused as a collision; nothing for a push it refused outright); for a
/// pull, the events taken in.
#[tokio::test]
async fn sync_notifies_what_the_server_stored_and_what_a_pull_took_in() {
    use ksync_core::{Auth, SyncError};
    use ksync_testkit::SyncRecorder;

    fn ids(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_str()).collect()
    }

    let server = start(&["s"]).await;
    let url = server.repo_url("s");
    let other = client(&url);
    other
        .send(Event::new("doc", "note", json!("theirs"), 1))
        .await
        .expect("send");
    other.push().await.expect("push");

    // Other content under the server's (id, version): refused, the rest stored.
    let ours = client(&url);
    let batches = SyncRecorder::new(ours.notifier());
    ours.send(Event::new("doc", "note", json!("ours"), 1))
        .await
        .expect("send");
    ours.send(Event::new("fresh", "note", json!(1), 1))
        .await
        .expect("send");
    let pushed = ours.push().await.expect("push");
    assert_eq!(ids(&pushed.rejected_events), ["doc"]);
    assert_eq!(ids(&pushed.pushed_events), ["fresh"]);
    // Handlers run as the notification is emitted: all of them have run by now.
    assert_eq!(batches.batches(), [["fresh"]]);

    let reader = GitSyncClient::builder(&url)
        .auth(Auth::token("reader"))
        .build()
        .expect("client");
    let refused = SyncRecorder::new(reader.notifier());
    reader
        .send(Event::new("nope", "note", json!(1), 1))
        .await
        .expect("send");
    let err = reader.push().await.expect_err("a reader may not push");
    assert!(matches!(err, SyncError::Auth(_)), "{err}");
    assert!(refused.batches().is_empty());
    assert_eq!(ids(&branch_events(&server, "s", "main")), ["doc", "fresh"]);

    let fresh = client(&url);
    let pulled_batches = SyncRecorder::new(fresh.notifier());
    let pulled = fresh.pull().await.expect("pull");
    assert_eq!(ids(&pulled.new_events), ["doc", "fresh"]);
    assert_eq!(pulled_batches.batches(), [["doc", "fresh"]]);
}

/// A float pushed comes back from the service exactly as it was pushed (serde_json's default
/// parser read ~1 in 8 doubles one unit in the last place off: the branch then held other
/// data than the pusher under the same revision, and every puller got that).
#[tokio::test]
async fn floats_round_trip_bit_for_bit() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let clock = ManualClock::new(100);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;
    let sent = ksync_testkit::edge_data::MISREAD_FLOATS;
    a.update("f", "t", json!(sent)).await.expect("update");
    a.push().await.expect("push");
    b.pull().await.expect("pull");
    let bits = |event: &Event| ksync_testkit::edge_data::float_bits(&event.data);
    let want: Vec<u64> = sent.iter().map(|f| f.to_bits()).collect();
    assert_eq!(
        bits(&branch_events(&server, "r", "main")[0]),
        want,
        "the branch"
    );
    let pulled = b.replica().storage().read_since(0, 10).expect("read");
    assert_eq!(bits(&pulled[0].event), want, "what b pulled");
}

/// Data as deep as the event rules allow is pushed, pulled, and comes back inside a push's
/// conflict (`rejected[].conflict.ours`, 5 levels around the event). The limit was 128
/// while serde_json reads 127 levels of a whole body: such an event, valid where it was
/// made, could never be pushed, and one a little less deep came back in no readable answer.
#[tokio::test]
async fn data_as_deep_as_the_rules_allow_is_pushed_pulled_and_held_in_a_conflict() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let clock = ManualClock::new(100);
    let a = node(&url, "a", &clock).await;
    let b = node(&url, "b", &clock).await;
    let deep = ksync_testkit::edge_data::nested(ksync_core::MAX_DATA_DEPTH);
    a.update("x", "t", deep.clone()).await.expect("update");
    a.push().await.expect("push");
    b.pull().await.expect("pull");
    let pulled = b.replica().storage().read_since(0, 10).expect("read");
    assert_eq!(pulled[0].event.data, deep, "what b pulled");
    // The same revision with other content: the answer holds the branch's as `ours`.
    let rival = Event::new("x", "t", deep.clone(), 1);
    let (status, body) = common::call(
        common::http()
            .post(server.url("/git/r/branches/main/events"))
            .bearer_auth("writer")
            .json(&json!({"baseVersion": 1, "events": [rival]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["rejected"][0]["conflict"]["ours"]["data"], deep,
        "{body}"
    );
    let too_deep = ksync_testkit::edge_data::nested(ksync_core::MAX_DATA_DEPTH + 1);
    let refused = a.update("y", "t", too_deep).await.expect_err("too deep");
    assert!(
        matches!(
            refused,
            ksync_core::SyncError::InvalidEvent(ksync_core::InvalidEvent::DataTooDeep { .. })
        ),
        "{refused:?}"
    );
}

/// An event an older build stored with data 110 levels deep (the event rules allowed 128
/// until `MAX_DATA_DEPTH` became 100) in a branch is pulled by an upgraded client, and settles
/// a conflict with one: the client held received events to the publish limit, so it skipped
/// the event (a `protocol` error), so the conflict with it was never seen, while older
/// replicas kept it. A new event as deep is still refused, by the client and by the service.
#[tokio::test]
async fn an_event_older_builds_stored_deeper_than_the_publish_limit_is_pulled() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let old = Event::new("old", "t", ksync_testkit::edge_data::nested(110), 1);
    // As the older service stored it: appended to the branch's log, no push check.
    let branch = ksync_core::LogName::Branch {
        repo: ksync_core::Name::new("r").expect("name"),
        branch: ksync_core::Name::new("main").expect("name"),
    };
    let log = server.provider.open(&branch).expect("open");
    log.append(vec![old.clone()]).await.expect("append");
    let clock = ManualClock::new(100);
    let b = node(&url, "b", &clock).await;
    let b_errors = count(&b, "error");
    b.pull().await.expect("pull");
    let pulled = b.replica().storage().read_since(0, 10).expect("read");
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    assert_eq!(pulled[0].event, old);
    assert_eq!(b_errors.load(Ordering::SeqCst), 0);
    // Another revision 1 of it, made offline: refused by the push, then the pull brings the
    // deep one as a conflict, settled (the later wins) and pushed as revision 2.
    let c = node(&url, "c", &clock).await;
    let (c_errors, c_conflicts) = (count(&c, "error"), count(&c, "conflict"));
    c.update("old", "t", json!("other")).await.expect("update");
    let pushed = c.push().await.expect("push");
    assert_eq!(pushed.rejected_events.len(), 1, "{pushed:?}");
    c.pull().await.expect("pull");
    assert_eq!(c_conflicts.load(Ordering::SeqCst), 1);
    c.push().await.expect("push");
    assert_eq!(c_errors.load(Ordering::SeqCst), 0);
    let settled = branch_events(&server, "r", "main");
    assert_eq!(
        settled.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(settled[1].data, json!("other"));
    let new = ksync_testkit::edge_data::nested(110);
    let refused = b
        .update("new", "t", new.clone())
        .await
        .expect_err("too deep");
    ksync_testkit::edge_data::assert_too_deep(&refused);
    let (status, body) = common::call(
        common::http()
            .post(server.url("/git/r/branches/main/events"))
            .bearer_auth("writer")
            .json(&json!({"baseVersion": 1, "events": [Event::new("new", "t", new, 1)]})),
    )
    .await;
    assert_eq!(
        (status, common::code(&body)),
        (400, "invalid_event"),
        "{body}"
    );
}

/// Data older builds stored as deep as they allowed (128 levels) in a branch is pulled, and
/// comes back inside a push's conflict: a pull page puts 3 levels around an event's data and
/// a push answer 5, past the 127 levels serde_json reads of a whole body, so every pull of
/// the page failed `undecodable answer` (the client could never pull past it) and so did
/// the push its conflict answered.
#[tokio::test]
async fn data_older_builds_stored_128_levels_deep_is_pulled_and_held_in_a_conflict() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let deepest = Event::new(
        "deepest",
        "t",
        ksync_testkit::edge_data::nested(ksync_core::MAX_RECEIVED_DATA_DEPTH),
        1,
    );
    // As the older service stored it: appended to the branch's log, no push check.
    let branch = ksync_core::LogName::Branch {
        repo: ksync_core::Name::new("r").expect("name"),
        branch: ksync_core::Name::new("main").expect("name"),
    };
    let log = server.provider.open(&branch).expect("open");
    log.append(vec![deepest.clone()]).await.expect("append");
    let clock = ManualClock::new(100);
    let b = node(&url, "b", &clock).await;
    let b_errors = count(&b, "error");
    b.pull().await.expect("pull");
    let pulled = b.replica().storage().read_since(0, 10).expect("read");
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    assert_eq!(pulled[0].event, deepest);
    assert_eq!(b_errors.load(Ordering::SeqCst), 0);
    // Another revision 1 of it, made offline: the push answer holds the deep one as `ours`.
    let c = node(&url, "c", &clock).await;
    let (c_errors, c_conflicts) = (count(&c, "error"), count(&c, "conflict"));
    c.update("deepest", "t", json!("other"))
        .await
        .expect("update");
    let pushed = c.push().await.expect("push");
    assert_eq!(pushed.rejected_events.len(), 1, "{pushed:?}");
    c.pull().await.expect("pull");
    assert_eq!(c_conflicts.load(Ordering::SeqCst), 1);
    c.push().await.expect("push");
    assert_eq!(c_errors.load(Ordering::SeqCst), 0);
    let settled = branch_events(&server, "r", "main");
    assert_eq!(
        settled.iter().map(|e| e.version).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(settled[1].data, json!("other"));
    // A new event that deep is still refused by the service: it reads a push body with
    // serde_json's own limit.
    let (status, body) = common::call(
        common::http()
            .post(server.url("/git/r/branches/main/events"))
            .bearer_auth("writer")
            .json(&json!({"baseVersion": 2, "events": [Event::new("new", "t", deepest.data, 1)]})),
    )
    .await;
    assert_eq!(
        (status, common::code(&body)),
        (400, "malformed_body"),
        "{body}"
    );
}
