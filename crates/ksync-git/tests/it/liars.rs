//! GitSyncClient against a service that says what no honest one says: a lie is a typed error,
//! or (where an honest answer could look the same) a bounded amount of work, never a loop.

use crate::common;

use ksync_testkit::ErrorRecorder;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::routing::{get, post};
use ksync_core::{Event, PullPushClient, SyncClient};
use ksync_git::GitError;
use serde_json::{Value, json};

use common::{client, serve_router};

/// Answers with `body` as a kSync service does (JSON, `X-KSync-Protocol: 1`).
fn answer(body: Value) -> impl axum::response::IntoResponse {
    (
        [
            ("x-ksync-protocol", "1"),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
}

/// A fake service of repository `r` whose branch `feature` is at version `feature_version`
/// and whose merge answer number `n` (from 1) is `merge(n)`.
async fn merge_liar(
    feature_version: u64,
    merge: impl Fn(u64) -> Value + Clone + Send + Sync + 'static,
) -> (String, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let merges = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&merges);
    let app = Router::new()
        .route(
            "/git/r/branches/feature",
            get(move || async move {
                answer(json!({"name": "feature", "serverVersion": feature_version,
                    "forkedFrom": null, "forkedAt": null}))
            }),
        )
        .route(
            "/git/r/merge",
            post(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                let body = merge(n);
                async move { answer(body) }
            }),
        );
    let (addr, task) = serve_router(app).await;
    (format!("http://{addr}/git/r"), merges, task)
}

/// A collision `into` already superseded (`latestVersion` above `ours`): reported, not
/// settled, so no resolution is written or pushed.
fn history_conflict(n: u64) -> Value {
    let side = |data: &str| {
        json!({"id": format!("doc{n}"), "type": "t", "data": data,
        "timestamp": 1, "version": 1})
    };
    json!({"conflict": {"type": "concurrent-edit", "ours": side("ours"), "theirs": side("theirs")},
        "latestVersion": 5})
}

#[tokio::test]
async fn a_merge_answer_saying_more_remains_without_a_collision_is_refused() {
    // An honest service ends a page early only when it is full of collisions. This one says
    // "more" after every empty page, one version further each time (up to 20 here; a liar
    // need not stop).
    let (url, merges, task) = merge_liar(1000, |n| {
        let next = if n < 20 { json!(n) } else { Value::Null };
        json!({"appended": 0, "duplicates": 0, "conflicts": [], "serverVersion": 0,
            "fromVersion": n, "next": next})
    })
    .await;
    let c = client(&url);
    let err = c
        .merge("other", "feature")
        .await
        .expect_err("an empty page that says more remains");
    let git = GitError::of(&err).expect("a git error");
    assert!(
        matches!(git, GitError::Protocol { reason, .. } if reason.contains("held no collision")),
        "{git:?}"
    );
    assert_eq!(merges.load(Ordering::SeqCst), 1, "not asked again");
    task.abort();
}

#[tokio::test]
async fn a_merge_stops_at_the_version_its_source_branch_had_when_it_started() {
    // Each answer holds one made-up collision and says more remains, one version further each
    // time (up to 50 here), past `feature`'s version (3): the merge asks up to there only.
    let (url, merges, task) = merge_liar(3, |n| {
        let next = if n < 50 { json!(n) } else { Value::Null };
        json!({"appended": 0, "duplicates": 0, "conflicts": [history_conflict(n)],
            "serverVersion": 0, "fromVersion": n, "next": next})
    })
    .await;
    let c = client(&url);
    let merged = c.merge("other", "feature").await.expect("merge");
    assert_eq!(merges.load(Ordering::SeqCst), 3);
    assert_eq!(merged.conflicts.len(), 3);
    assert!(merged.resolutions.is_empty());
    task.abort();
}

#[tokio::test]
async fn a_merge_answer_whose_next_is_not_its_from_version_is_refused() {
    let (url, merges, task) = merge_liar(1000, |n| {
        let next = if n < 20 { json!(n + 1) } else { Value::Null };
        json!({"appended": 0, "duplicates": 0, "conflicts": [history_conflict(n)],
            "serverVersion": 0, "fromVersion": n, "next": next})
    })
    .await;
    let c = client(&url);
    let err = c
        .merge("other", "feature")
        .await
        .expect_err("next != fromVersion");
    let git = GitError::of(&err).expect("a git error");
    assert!(
        matches!(git, GitError::Protocol { reason, .. } if reason.contains("is not its fromVersion")),
        "{git:?}"
    );
    assert_eq!(merges.load(Ordering::SeqCst), 1);
    task.abort();
}

#[tokio::test]
async fn pulled_events_that_break_the_event_rules_are_skipped_and_the_cursor_moves_on() {
    // Version 0 and an empty type break the event rules: no storage may hold them. Taken in,
    // they were stored as they were (or refused by the storage at every pull of the page).
    let page = json!({"since": 0, "serverVersion": 3, "next": null, "events": [
        {"id": "bad", "type": "t", "data": 1, "timestamp": 1, "version": 0},
        {"id": "good", "type": "t", "data": 2, "timestamp": 2, "version": 1},
        {"id": "untyped", "type": "", "data": 3, "timestamp": 3, "version": 1}]});
    let app = Router::new().route(
        "/git/r/branches/main/events",
        get(move || {
            let page = page.clone();
            async move { answer(page) }
        }),
    );
    let (addr, task) = serve_router(app).await;
    let c = client(&format!("http://{addr}/git/r"));
    let errors = ErrorRecorder::new(c.notifier());
    let pulled = c.pull().await.expect("pull");
    let ids = |events: Vec<Event>| events.into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(pulled.new_events), ["good"]);
    let stored: Vec<Event> = c
        .replica()
        .storage()
        .read_since(0, 10)
        .expect("read")
        .into_iter()
        .map(|s| s.event)
        .collect();
    assert_eq!(ids(stored), ["good"], "the invalid ones are not stored");
    assert_eq!(pulled.server_version, 3);
    let errors = errors.messages();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].contains("\"bad\""), "{errors:?}");
    assert!(errors[1].contains("\"untyped\""), "{errors:?}");
    task.abort();
}

#[tokio::test]
async fn a_push_answer_fast_forwarding_past_the_batch_is_not_trusted() {
    // An honest fast-forward is to exactly what the client had plus its batch (here 0 + 1).
    // This one names u64::MAX: trusted, it moved the pull cursor past every event of the
    // branch (and overflowed the next pull's arithmetic).
    let asked_since = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = Arc::clone(&asked_since);
    let app = Router::new()
        .route(
            "/git/r/branches/main",
            get(|| async {
                answer(
                    json!({"name": "main", "serverVersion": 0, "forkedFrom": null,
                    "forkedAt": null}),
                )
            }),
        )
        .route(
            "/git/r/branches/main/events",
            post(|| async {
                answer(
                    json!({"serverVersion": 1, "appended": 1, "duplicates": 0, "rejected": [],
                "fastForwardTo": u64::MAX}),
                )
            })
            .get(
                move |query: axum::extract::Query<std::collections::HashMap<String, String>>| {
                    recorded
                        .lock()
                        .expect("lock")
                        .push(query.get("since").cloned().unwrap_or_default());
                    async {
                        answer(
                            json!({"since": 0, "serverVersion": 1, "next": null, "events": [
                        {"id": "mine", "type": "t", "data": 1, "timestamp": 1, "version": 1}]}),
                        )
                    }
                },
            ),
        );
    let (addr, task) = serve_router(app).await;
    let c = client(&format!("http://{addr}/git/r"));
    c.send(Event::new("mine", "t", json!(1), 1))
        .await
        .expect("a local event to push");
    let pushed = c.push().await.expect("push");
    assert_eq!(pushed.pushed_events.len(), 1, "{pushed:?}");
    c.pull().await.expect("pull");
    assert_eq!(
        *asked_since.lock().expect("lock"),
        ["0"],
        "the pull starts where the client really is, not where the lie said"
    );
    task.abort();
}

#[tokio::test]
async fn a_merge_collision_whose_side_breaks_the_event_rules_is_reported_not_resolved() {
    // A resolution made from an invalid side would be refused by the storage (or by the
    // service at every push). The collision is reported, with an error, and left unsettled.
    let (url, _merges, task) = merge_liar(1, |_| {
        let side = |kind: &str| {
            json!({"id": "doc", "type": kind, "data": 1, "timestamp": 1, "version": 1})
        };
        let bad = json!({"conflict": {"type": "concurrent-edit", "ours": side("t"),
            "theirs": side("")}, "latestVersion": 1});
        json!({"appended": 0, "duplicates": 0, "conflicts": [bad], "serverVersion": 1,
            "fromVersion": 1, "next": null})
    })
    .await;
    let c = client(&url);
    let errors = ErrorRecorder::new(c.notifier());
    let merged = c.merge("other", "feature").await.expect("merge");
    assert_eq!(merged.conflicts.len(), 1);
    assert!(merged.resolutions.is_empty(), "{:?}", merged.resolutions);
    assert_eq!(c.replica().storage().len(), 0, "nothing recorded");
    let errors = errors.messages();
    assert!(
        errors.iter().any(|e| e.contains("not a valid event")),
        "{errors:?}"
    );
    task.abort();
}
