//! The spec's flow as written: `new GitSyncClient({url})`, then `pull()` / `push()`, with no
//! step that creates the repository and no `connect()`.

mod common;

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
