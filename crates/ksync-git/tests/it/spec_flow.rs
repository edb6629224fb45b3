//! The spec's flow as written: `new GitSyncClient({url})`, then `pull()` / `push()`, with no
//! step that creates the repository and no `connect()`.

use crate::common;

use std::time::Duration;

use ksync_core::{Auth, Event, Name, PullPushClient, SyncClient, SyncError};
use ksync_git::server::ServerError;
use ksync_git::{GitError, GitSyncClient};
use serde_json::json;

use common::{branch_events, client, start};

fn exists(server: &common::Server, repo: &str) -> bool {
    match server.service.branches(&Name::new(repo).expect("valid")) {
        Ok(_) => true,
        Err(ServerError::RepoNotFound(_)) => false,
        Err(e) => panic!("listing {repo}: {e}"),
    }
}

/// A fresh client pushes to, and another pulls from, repositories nobody created: the client
/// creates a missing repository and tries once more.
#[tokio::test]
async fn a_fresh_client_pushes_and_pulls_a_repository_that_did_not_exist() {
    let server = start(&[]).await;
    assert!(!exists(&server, "notes"));

    let writer = client(&server.repo_url("notes"));
    writer
        .send(Event::new("a", "note", json!({"text": "hi"}), 1))
        .await
        .expect("send");
    let pushed = writer.push().await.expect("push creates the repository");
    assert_eq!(pushed.pushed_events.len(), 1);
    assert_eq!(pushed.server_version, 1);
    assert!(exists(&server, "notes"));
    assert_eq!(branch_events(&server, "notes", "main").len(), 1);

    // A pull first also creates it (empty).
    let other = client(&server.repo_url("drafts"));
    let pulled = other.pull().await.expect("pull creates the repository");
    assert!(pulled.new_events.is_empty());
    assert_eq!(pulled.server_version, 0);
    assert!(exists(&server, "drafts"));

    // sync() on a fresh client of the pushed repository brings the event.
    let reader = client(&server.repo_url("notes"));
    let synced = reader.sync().await.expect("sync");
    let ids: Vec<&str> = synced
        .pull
        .new_events
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(ids, ["a"]);

    // create_repo() still works, and is fine on an existing repository.
    let info = client(&server.repo_url("notes"))
        .create_repo()
        .await
        .expect("create_repo");
    assert_eq!(info.repo, "notes");
}

/// With `create_repo_if_missing(false)` the typed 404 comes back and nothing is created.
#[tokio::test]
async fn without_create_repo_if_missing_the_typed_not_found_comes_back() {
    let server = start(&[]).await;
    let c = GitSyncClient::builder(server.repo_url("notes"))
        .auth(Auth::token("writer"))
        .request_timeout(Duration::from_secs(10))
        .create_repo_if_missing(false)
        .build()
        .expect("client");
    let err = c.pull().await.expect_err("no such repository");
    let git = GitError::of(&err).expect("a git error");
    assert_eq!(
        (git.status(), git.code()),
        (Some(404), Some("repo_not_found"))
    );
    c.send(Event::new("a", "t", json!(1), 1))
        .await
        .expect("send");
    let err = c.push().await.expect_err("no such repository");
    assert_eq!(
        GitError::of(&err).and_then(GitError::code),
        Some("repo_not_found")
    );
    assert!(!exists(&server, "notes"));
    // Explicitly, it can still be created; then the push goes.
    c.create_repo().await.expect("create_repo");
    assert_eq!(c.push().await.expect("push").pushed_events.len(), 1);
}

/// A read-only credential may not create: the service's 403 comes back as `SyncError::Auth`,
/// saying the repository is missing, and nothing is created.
#[tokio::test]
async fn a_read_only_credential_gets_forbidden_and_creates_nothing() {
    let server = start(&[]).await;
    let reader = GitSyncClient::builder(server.repo_url("notes"))
        .auth(Auth::token("reader"))
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let err = reader.pull().await.expect_err("may not create");
    let SyncError::Auth(reason) = &err else {
        panic!("expected SyncError::Auth, got {err:?}");
    };
    assert!(reason.contains("does not exist"), "{reason}");
    assert!(
        reason.contains("403") && reason.contains("forbidden"),
        "{reason}"
    );
    assert!(!exists(&server, "notes"));
    reader
        .send(Event::new("a", "t", json!(1), 1))
        .await
        .expect("send");
    let err = reader.push().await.expect_err("may not create");
    assert!(matches!(err, SyncError::Auth(_)), "{err:?}");
    assert!(!exists(&server, "notes"));
}

/// Waits (bounded) until `client`'s replica holds an event with `id`.
async fn eventually_holds(client: &GitSyncClient, id: &str) -> bool {
    for _ in 0..400 {
        if client
            .replica()
            .storage()
            .latest(id)
            .expect("read")
            .is_some()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// `pull_interval` works as in the spec's complete example, which never calls `connect()`:
/// auto-pull starts when `KSync` attaches the client, and for a client used on its own at its
/// first push (or pull). Both then receive another client's pushed events by themselves.
#[tokio::test]
async fn pull_interval_pulls_without_connect() {
    use std::sync::Arc;

    use ksync_core::InMemoryStorage;

    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let every = Duration::from_millis(30);
    let attached = GitSyncClient::builder(&url)
        .auth(Auth::token("writer"))
        .pull_interval(every)
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let ksync = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), attached)
        .await
        .expect("ksync");
    let alone = GitSyncClient::builder(&url)
        .auth(Auth::token("writer"))
        .pull_interval(every)
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    alone
        .send(Event::new("mine", "t", json!(1), 1))
        .await
        .expect("send");
    alone.push().await.expect("push");

    let other = client(&url);
    other
        .send(Event::new("theirs", "t", json!(2), 1))
        .await
        .expect("send");
    other.push().await.expect("push");

    assert!(
        eventually_holds(ksync.client(), "theirs").await,
        "auto-pull ran for the client attached to KSync"
    );
    assert!(
        eventually_holds(&alone, "theirs").await,
        "auto-pull ran for the client used on its own"
    );
    assert!(eventually_holds(ksync.client(), "mine").await);
}

/// `disconnect()` stops an auto-pull that started by itself, and a later pull does not start
/// it again (only `connect()` does).
#[tokio::test]
async fn disconnect_stops_an_auto_pull_that_started_by_itself() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let c = GitSyncClient::builder(&url)
        .auth(Auth::token("writer"))
        .pull_interval(Duration::from_millis(20))
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    c.pull().await.expect("pull starts auto-pull");
    c.disconnect().await.expect("disconnect");
    c.pull().await.expect("pull");
    let other = client(&url);
    other
        .send(Event::new("late", "t", json!(1), 1))
        .await
        .expect("send");
    other.push().await.expect("push");
    // Ten periods and more: nothing pulled it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        c.replica()
            .storage()
            .latest("late")
            .expect("read")
            .is_none()
    );
    c.connect().await.expect("connect starts it again");
    assert!(eventually_holds(&c, "late").await);
}

/// The spec's `clone(url, branch?)`: without a branch, the repository's default (`main`).
#[tokio::test]
async fn clone_without_a_branch_clones_main() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let writer = client(&url);
    writer
        .send(Event::new("a", "t", json!(1), 1))
        .await
        .expect("send");
    writer.push().await.expect("push");
    writer.create_branch("side").await.expect("branch");

    let c = client(&server.repo_url("elsewhere"));
    let cloned = c.clone(&url, None).await.expect("clone");
    let ids: Vec<&str> = cloned.new_events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["a"]);
    assert_eq!(c.current_branch(), "main");
    assert_eq!(c.url(), url);
    // A name still works, also as a `&String` (as the CLI passes it) or a `String`.
    let name = String::from("side");
    let side = client(&url);
    side.clone_repo(&url, &name).await.expect("clone side");
    side.clone_repo(&url, name).await.expect("clone side again");
    assert_eq!(side.current_branch(), "side");
}

/// The spec's `metrics` notification: after each pull and push, the events, bytes and mean
/// request round trip since the previous one. (`debug` only changes the log level.)
#[tokio::test]
async fn metrics_are_notified_after_each_pull_and_push() {
    use std::sync::{Arc, Mutex};

    use ksync_core::{Metrics, Notification};

    let server = start(&["m"]).await;
    let writer = GitSyncClient::builder(server.repo_url("m"))
        .auth(Auth::token("writer"))
        .debug(true)
        .build()
        .expect("client");
    let seen: Arc<Mutex<Vec<Metrics>>> = Arc::default();
    let _sub = {
        let seen = Arc::clone(&seen);
        writer
            .on(
                "metrics",
                Box::new(move |n: &Notification| {
                    if let Notification::Metrics(m) = n {
                        seen.lock().expect("lock").push(*m);
                    }
                }),
            )
            .expect("on")
    };
    for i in 0..3 {
        writer
            .send(Event::new(format!("m{i}"), "note", json!({"i": i}), 1))
            .await
            .expect("send");
    }
    writer.push().await.expect("push");
    let after_push = *seen
        .lock()
        .expect("lock")
        .last()
        .expect("metrics after the push");
    assert!(after_push.events_per_second > 0.0, "{after_push:?}");
    assert!(after_push.average_latency > 0.0, "{after_push:?}");
    assert!(after_push.bandwidth_usage > 0.0, "{after_push:?}");

    // Nothing new to pull: no events, but the request still counts.
    writer.pull().await.expect("pull");
    let after_pull = *seen
        .lock()
        .expect("lock")
        .last()
        .expect("metrics after the pull");
    assert_eq!(after_pull.events_per_second, 0.0, "{after_pull:?}");
    assert!(after_pull.average_latency > 0.0, "{after_pull:?}");
    assert_eq!(seen.lock().expect("lock").len(), 2);
}
