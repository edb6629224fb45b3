//! Edges of the contract found by reading `docs/PROTOCOL.md` against the service and the
//! client: raw requests written from the protocol text only, and client state after failures.

use crate::common;

use std::io::Write;
use std::time::Duration;

use ksync_core::{Event, PullPushClient, SyncClient};
use ksync_git::{GitError, GitSyncClient};
use serde_json::{Value, json};

use common::{branch_events, call, client, code, http, serve_router, start};

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("<no message>")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// PROTOCOL.md: "Every error answer is `{"error":{"code","message"}}`", so also a path or a
/// method the service does not have, and messages name repositories and branches as written.
#[tokio::test]
async fn every_error_answer_is_a_json_error_body() {
    let server = start(&["r"]).await;
    let http = http();
    for path in [
        "/git/r/unknown",
        "/git/r/branches/main/extra",
        "/git/r/branches/main/events/more",
    ] {
        let (status, body) = call(http.get(server.url(path))).await;
        assert_eq!((status, code(&body)), (404, "not_found"), "{path}");
    }
    for (method, path) in [
        (reqwest::Method::DELETE, "/git/r"),
        (reqwest::Method::POST, "/git/r"),
        (reqwest::Method::PUT, "/git/r/branches/main/events"),
        (reqwest::Method::DELETE, "/git/r/branches/main"),
        (reqwest::Method::GET, "/git/r/merge"),
        (reqwest::Method::PATCH, "/git/r/branches"),
    ] {
        let (status, body) = call(http.request(method.clone(), server.url(path))).await;
        assert_eq!(
            (status, code(&body)),
            (405, "method_not_allowed"),
            "{method} {path}"
        );
    }
    let (status, body) = call(http.get(server.url("/git/r/branches/ghost"))).await;
    assert_eq!((status, code(&body)), (404, "branch_not_found"));
    assert_eq!(
        message(&body),
        "branch \"ghost\" does not exist in repository \"r\""
    );
    let (status, body) = call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "main"})),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "branch_exists"));
    assert_eq!(
        message(&body),
        "branch \"main\" already exists in repository \"r\""
    );
    // The endpoints themselves still answer.
    let (status, body) = call(http.get(server.url("/git/r/branches"))).await;
    assert_eq!(status, 200);
    assert_eq!(body["branches"][0]["name"], "main");
}

/// A gzip body is all gzip: several members make one body (RFC 1952), bytes after a member
/// that start no member are a corrupt body (400, nothing stored), not something to ignore.
#[tokio::test]
async fn a_gzip_body_with_bytes_after_its_member_is_refused() {
    let server = start(&["r"]).await;
    let http = http();
    let url = server.url("/git/r/branches/main/events");
    let body = serde_json::to_vec(&json!({
        "baseVersion": 0,
        "events": [Event::new("a", "t", json!(1), 1)],
    }))
    .expect("json");
    let mut trailing = gzip(&body);
    trailing.extend_from_slice(b"not part of the body");
    let (status, reply) = call(
        http.post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(trailing),
    )
    .await;
    assert_eq!((status, code(&reply)), (400, "malformed_body"));
    assert!(branch_events(&server, "r", "main").is_empty());

    let (head, tail) = body.split_at(body.len() / 2);
    let mut members = gzip(head);
    members.extend_from_slice(&gzip(tail));
    let (status, reply) = call(
        http.post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(members),
    )
    .await;
    assert_eq!((status, reply["appended"].as_u64()), (200, Some(1)));
    assert_eq!(branch_events(&server, "r", "main").len(), 1);
}

/// A clone that fails (no such repository, no such branch) changes nothing: the client still
/// talks to its repository and branch, and what it had pulled and not pushed stays as it was.
#[tokio::test]
async fn a_failed_clone_leaves_the_client_where_it_was() {
    let server = start(&["r", "other"]).await;
    let url = server.repo_url("r");
    let writer = client(&url);
    writer
        .send(Event::new("a", "t", json!(1), 1))
        .await
        .expect("send");
    writer.push().await.expect("push");

    let c = client(&url);
    c.pull().await.expect("pull");
    c.send(Event::new("b", "t", json!(2), 2))
        .await
        .expect("send");
    for (target, branch, status) in [
        (server.repo_url("missing"), "main", 404),
        (server.repo_url("other"), "ghost", 404),
    ] {
        let err = c
            .clone_repo(&target, branch)
            .await
            .expect_err("nothing to clone");
        assert_eq!(
            GitError::of(&err).and_then(GitError::status),
            Some(status),
            "{target} {branch}: {err}"
        );
        assert_eq!(c.url(), url);
        assert_eq!(c.current_branch(), "main");
    }
    let pushed = c.push().await.expect("push goes to r");
    assert_eq!(pushed.pushed_events.len(), 1);
    let ids: Vec<String> = branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(branch_events(&server, "other", "main").is_empty());
}

/// An event the service would refuse (empty id, version 0, an over-long type) is refused by
/// `send` and not stored: stored, it would sit in every later push batch, each refused whole
/// with 400 `invalid_event`, and nothing written after it would ever reach the server.
#[tokio::test]
async fn send_refuses_an_invalid_event_and_later_pushes_go_through() {
    let server = start(&["r"]).await;
    let c = client(&server.repo_url("r"));
    c.send(Event::new("first", "t", json!(1), 1))
        .await
        .expect("send");
    let mut version_zero = Event::new("v0", "t", json!(1), 1);
    version_zero.version = 0;
    for bad in [
        Event::new("", "t", json!(1), 1),
        version_zero,
        Event::new("long-type", "t".repeat(257), json!(1), 1),
    ] {
        let err = c.send(bad.clone()).await.expect_err("invalid");
        assert!(
            matches!(err, ksync_core::SyncError::InvalidEvent(_)),
            "{bad:?}: {err:?}"
        );
    }
    c.send(Event::new("second", "t", json!(2), 2))
        .await
        .expect("send");
    assert_eq!(c.replica().storage().len(), 2, "nothing invalid was stored");
    let pushed = c.push().await.expect("push");
    assert_eq!(pushed.pushed_events.len(), 2);
    let ids: Vec<String> = branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["first", "second"]);
}

/// Serves a new in-memory service with repository `r` on `addr` (once the old one let go).
async fn serve_again_on(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    use std::sync::Arc;
    let mut bound = None;
    for _ in 0..100 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                bound = Some(listener);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let listener = bound.expect("the address is free again");
    let service = ksync_git::server::GitServer::new(
        Arc::new(ksync_core::InMemoryProvider::new()),
        Arc::new(common::TestAuth),
    );
    service
        .create_repo(&ksync_core::Name::new("r").expect("name"))
        .await
        .expect("repo");
    let app = service.router();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
        .expect("serve");
    })
}

/// A replica `a` over `storage` that pushed and pulled 3 events of its own to repository `r`
/// of a server that then lost its data: `r` is served again, empty, on the same address, and
/// replica `b` pushes `others` events to it. Returns the new server's task, `b`, and `a`
/// opened again over its storage.
async fn reset_with_others(
    others: usize,
) -> (
    tokio::task::JoinHandle<()>,
    GitSyncClient,
    ksync_core::KSync<GitSyncClient>,
    String,
) {
    use ksync_core::{KSync, Storage};
    use std::sync::Arc;

    let first = start(&["r"]).await;
    let addr = first.addr;
    let url = first.repo_url("r");
    let storage: Arc<dyn Storage> = Arc::new(ksync_core::InMemoryStorage::new());
    let open = |storage: Arc<dyn Storage>, url: String| async move {
        KSync::builder()
            .storage(storage)
            .sync_client(Arc::new(client(&url)))
            .replica_id("a")
            .build()
            .await
            .expect("ksync")
    };
    let a = open(Arc::clone(&storage), url.clone()).await;
    for i in 0..3 {
        a.emit("t", json!(i)).await.expect("emit");
    }
    a.push().await.expect("push");
    a.pull().await.expect("pull");
    drop(a);

    drop(first);
    let task = serve_again_on(addr).await;
    let other = client(&url);
    for i in 0..others {
        other
            .send(Event::new(format!("b{i}"), "t", json!("b"), 1))
            .await
            .expect("send");
    }
    other.push().await.expect("push");
    // The application restarts over its storage.
    let a = open(Arc::clone(&storage), url.clone()).await;
    (task, other, a, url)
}

/// The service says "the branch was reset or recreated; clone it again" (409): cloning again
/// must work. A clone pulls from 0 whatever the replica pulled before, and the replica's own
/// events, which the reset server lost, are pushed again.
#[tokio::test]
async fn clone_again_recovers_from_a_reset_branch() {
    let (task, other, a, url) = reset_with_others(1).await;
    let err = a.pull().await.expect_err("the branch is another log");
    assert_eq!(
        GitError::of(&err).and_then(GitError::code),
        Some("branch_reset")
    );
    let cloned = a
        .client()
        .clone_repo(&url, "main")
        .await
        .expect("clone again");
    assert_eq!(cloned.new_events.len(), 1, "b is new; nothing else was");
    assert_eq!(cloned.server_version, 1);
    a.emit("t", json!("after")).await.expect("emit");
    let pushed = a.push().await.expect("push");
    assert_eq!(pushed.pushed_events.len(), 4);
    let events = other.pull().await.expect("pull").new_events;
    assert_eq!(events.len(), 4, "a's events are on the server again");
    assert_eq!(a.state().expect("state").len(), 5);
    task.abort();
}

/// The same once the new branch has grown past the replica's cursors: no `version_ahead` can
/// tell then, the branch's `logId` does. Pulling from the old cursor would skip the new
/// branch's first events, and pushing from the old push cursor would never send the replica's
/// own events again.
#[tokio::test]
async fn a_reset_branch_that_grew_past_the_cursors_is_refused_until_cloned_again() {
    let (task, other, a, url) = reset_with_others(8).await;
    let err = a.pull().await.expect_err("the branch is another log");
    assert_eq!(
        GitError::of(&err).and_then(GitError::code),
        Some("branch_reset")
    );
    a.emit("t", json!("after")).await.expect("emit");
    let err = a.push().await.expect_err("pushing to another log");
    assert_eq!(
        GitError::of(&err).and_then(GitError::code),
        Some("branch_reset")
    );
    let cloned = a
        .client()
        .clone_repo(&url, "main")
        .await
        .expect("clone again");
    assert_eq!(cloned.new_events.len(), 8);
    let pushed = a.push().await.expect("push");
    assert_eq!(
        pushed.pushed_events.len(),
        4,
        "a's 3 old events and the new one"
    );
    assert_eq!(other.pull().await.expect("pull").new_events.len(), 4);
    assert_eq!(a.state().expect("state").len(), 12);
    // From now on a syncs with the new branch as usual.
    a.emit("t", json!("later")).await.expect("emit");
    a.push().await.expect("push");
    a.pull().await.expect("pull");
    task.abort();
}

/// The server dies in the middle of a pull page (the answer is cut short after its headers):
/// the pull fails with an error, and the next pull brings the rest. Every event reaches the
/// application exactly once (`event` notifications), and the local log holds each once.
#[tokio::test]
async fn a_pull_cut_off_mid_page_resumes_without_loss_or_duplicates() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::extract::Request;
    use axum::middleware::Next;
    use ksync_core::{InMemoryProvider, KSync, Notification};

    const EVENTS: usize = 100;
    let service = ksync_git::server::GitServer::new(
        Arc::new(InMemoryProvider::new()),
        Arc::new(common::TestAuth),
    );
    service
        .create_repo(&ksync_core::Name::new("r").expect("name"))
        .await
        .expect("repo");
    // While armed, the 4th page request (the first ones travel ahead) gets its headers and
    // half of its body, then the connection ends.
    let armed = Arc::new(AtomicBool::new(false));
    let pages = Arc::new(AtomicUsize::new(0));
    let cut = {
        let armed = Arc::clone(&armed);
        let pages = Arc::clone(&pages);
        move |req: Request, next: Next| {
            let armed = Arc::clone(&armed);
            let pages = Arc::clone(&pages);
            async move {
                let is_page = req.method() == axum::http::Method::GET
                    && req.uri().path().ends_with("/events");
                let response = next.run(req).await;
                if !(is_page && armed.load(Ordering::SeqCst))
                    || pages.fetch_add(1, Ordering::SeqCst) != 3
                {
                    return response;
                }
                let (mut parts, body) = response.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
                parts.headers.insert(
                    axum::http::header::CONTENT_LENGTH,
                    bytes.len().to_string().parse().expect("header"),
                );
                axum::response::Response::from_parts(
                    parts,
                    axum::body::Body::from(bytes.slice(..bytes.len() / 2)),
                )
            }
        }
    };
    let app = service.router().layer(axum::middleware::from_fn(cut));
    let (addr, task) = serve_router(app).await;
    let url = format!("http://{addr}/git/r");
    let writer = client(&url);
    for i in 0..EVENTS {
        writer
            .send(Event::new(
                format!("e{i}"),
                "t",
                json!({"i": i, "pad": "x".repeat(64)}),
                1,
            ))
            .await
            .expect("send");
    }
    writer.push().await.expect("push");

    let reader = KSync::builder()
        .storage(Arc::new(ksync_core::InMemoryStorage::new()))
        .sync_client(Arc::new(
            ksync_git::GitSyncClient::builder(&url)
                .auth(ksync_core::Auth::token("writer"))
                .page_size(10)
                .request_timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
        ))
        .replica_id("reader")
        .build()
        .await
        .expect("ksync");
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let sub = {
        let seen = Arc::clone(&seen);
        reader
            .on("event", move |n| {
                if let Notification::Event(e) = n {
                    *seen.lock().expect("lock").entry(e.id.clone()).or_default() += 1;
                }
            })
            .expect("on")
    };
    armed.store(true, Ordering::SeqCst);
    let err = reader.pull().await.expect_err("the 4th page is cut off");
    assert!(GitError::of(&err).is_some(), "{err:?}");
    let first = reader.client().local_status().expect("status");
    assert!(
        first.pulled_version > 0 && first.pulled_version < EVENTS as u64,
        "{first:?}"
    );
    armed.store(false, Ordering::SeqCst);
    let rest = reader.pull().await.expect("pull again");
    assert_eq!(rest.server_version, EVENTS as u64);
    assert_eq!(
        rest.new_events.len() as u64,
        EVENTS as u64 - first.pulled_version,
        "the second pull brings exactly what the first did not store"
    );
    // Notifications are delivered by a task: wait (bounded) for all of them.
    for _ in 0..200 {
        if seen.lock().expect("lock").len() == EVENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), EVENTS, "every event reached the application");
    assert!(seen.values().all(|&n| n == 1), "none twice: {seen:?}");
    let replica = reader.client().replica();
    assert_eq!(replica.storage().len(), EVENTS as u64, "each stored once");
    drop(sub);
    task.abort();
}

/// A push in batches whose second batch fails: the first batch is on the server, its events
/// are reported (`sync` notification) and no longer pending; the retry sends only the rest.
/// Across both pushes every event is reported once and stored once.
#[tokio::test]
async fn a_push_that_fails_part_way_reports_and_keeps_what_the_server_took() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use axum::extract::Request;
    use axum::middleware::Next;
    use axum::response::IntoResponse;
    use ksync_core::{InMemoryProvider, Notification};

    const EVENTS: usize = 30;
    let provider = Arc::new(InMemoryProvider::new());
    let service = ksync_git::server::GitServer::new(
        Arc::clone(&provider) as Arc<dyn ksync_core::StorageProvider>,
        Arc::new(common::TestAuth),
    );
    service
        .create_repo(&ksync_core::Name::new("r").expect("name"))
        .await
        .expect("repo");
    // While armed, the second push request fails (the server is "down") without being applied:
    // a 500, which the client does not send again (a 503 it would).
    let armed = Arc::new(AtomicBool::new(true));
    let pushes = Arc::new(AtomicUsize::new(0));
    let fail = {
        let armed = Arc::clone(&armed);
        let pushes = Arc::clone(&pushes);
        move |req: Request, next: Next| {
            let armed = Arc::clone(&armed);
            let pushes = Arc::clone(&pushes);
            async move {
                let is_push = req.method() == axum::http::Method::POST
                    && req.uri().path().ends_with("/events");
                if is_push
                    && armed.load(Ordering::SeqCst)
                    && pushes.fetch_add(1, Ordering::SeqCst) == 1
                {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
                }
                next.run(req).await
            }
        }
    };
    let app = service.router().layer(axum::middleware::from_fn(fail));
    let (addr, task) = serve_router(app).await;
    let url = format!("http://{addr}/git/r");
    let c = ksync_git::GitSyncClient::builder(&url)
        .auth(ksync_core::Auth::token("writer"))
        .push_batch_size(10)
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let synced: Arc<Mutex<Vec<String>>> = Arc::default();
    let sub = {
        let synced = Arc::clone(&synced);
        c.on(
            "sync",
            Box::new(move |n: &Notification| {
                if let Notification::Sync(events) = n {
                    synced
                        .lock()
                        .expect("lock")
                        .extend(events.iter().map(|e| e.id.clone()));
                }
            }),
        )
        .expect("on")
    };
    for i in 0..EVENTS {
        c.send(Event::new(format!("e{i}"), "t", json!(i), 1))
            .await
            .expect("send");
    }
    let err = c.push().await.expect_err("the second batch fails");
    assert_eq!(GitError::of(&err).and_then(GitError::status), Some(500));
    assert_eq!(
        branch_ids(provider.as_ref(), "r").len(),
        10,
        "the first batch landed"
    );
    assert_eq!(c.local_status().expect("status").pending_events, 20);
    armed.store(false, Ordering::SeqCst);
    let pushed = c.push().await.expect("push again");
    assert_eq!(pushed.pushed_events.len(), 20, "only what did not land");
    let expected: Vec<String> = (0..EVENTS).map(|i| format!("e{i}")).collect();
    assert_eq!(branch_ids(provider.as_ref(), "r"), expected);
    // Notifications are delivered by a task: wait (bounded) for all of them.
    for _ in 0..200 {
        if synced.lock().expect("lock").len() >= EVENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut reported = synced.lock().expect("lock").clone();
    reported.sort_by_key(|id| id[1..].parse::<usize>().expect("number"));
    assert_eq!(reported, expected, "each pushed event reported once");
    drop(sub);
    task.abort();
}

/// The ids on branch `main` of `repo`, in order, read from the service's storage.
fn branch_ids(provider: &dyn ksync_core::StorageProvider, repo: &str) -> Vec<String> {
    provider
        .existing(&ksync_core::LogName::Branch {
            repo: ksync_core::Name::new(repo).expect("valid"),
            branch: ksync_core::Name::new("main").expect("valid"),
        })
        .expect("provider")
        .expect("branch exists")
        .read_since(0, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|s| s.event.id)
        .collect()
}

/// Accepts every credential until revoked, then refuses them all; counts the refusals.
struct Revocable {
    revoked: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicUsize,
}

impl ksync_core::Authenticator for Revocable {
    fn authenticate(
        &self,
        _: &ksync_core::Credentials,
    ) -> Result<ksync_core::Grant, ksync_core::AuthError> {
        use std::sync::atomic::Ordering;
        if self.revoked.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(ksync_core::AuthError::Invalid("revoked".into()));
        }
        Ok(ksync_core::Grant::anonymous())
    }
}

/// A service with repository `r` behind a [`Revocable`], on 127.0.0.1:0.
async fn revocable_service() -> (
    std::sync::Arc<Revocable>,
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::Arc;
    let auth = Arc::new(Revocable {
        revoked: std::sync::atomic::AtomicBool::new(false),
        refused: std::sync::atomic::AtomicUsize::new(0),
    });
    let service = ksync_git::server::GitServer::new(
        Arc::new(ksync_core::InMemoryProvider::new()),
        Arc::clone(&auth) as Arc<dyn ksync_core::Authenticator>,
    );
    service
        .create_repo(&ksync_core::Name::new("r").expect("name"))
        .await
        .expect("repo");
    let (addr, task) = serve(service.router()).await;
    (auth, addr, task)
}

/// Credentials that stop working (a token revoked or expired) make auto-pull fail with
/// `SyncError::Auth`; it reports that once and stops rather than knocking on every tick
/// (the builder's credentials cannot change by themselves). `connect()` starts it again.
#[tokio::test]
async fn auto_pull_stops_when_the_credentials_are_refused() {
    use std::sync::atomic::Ordering;

    let (auth, addr, task) = revocable_service().await;
    let c = ksync_git::GitSyncClient::builder(format!("http://{addr}/git/r"))
        .auth(ksync_core::Auth::token("app-token"))
        .pull_interval(Duration::from_millis(20))
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = c
        .on(
            "error",
            Box::new(move |n: &ksync_core::Notification| {
                if let ksync_core::Notification::Error(e) = n {
                    let _ = tx.send(e.clone());
                }
            }),
        )
        .expect("on");
    c.connect().await.expect("connect");
    auth.revoked.store(true, Ordering::SeqCst);
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an error is reported")
        .expect("open");
    assert!(
        matches!(*first, ksync_core::SyncError::Auth(_)),
        "{first:?}"
    );
    // Many ticks later: no further attempt was made, nothing more was reported.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(auth.refused.load(Ordering::SeqCst), 1);
    assert!(rx.try_recv().is_err());

    // Once the credentials work again, connect() starts auto-pull again.
    auth.revoked.store(false, Ordering::SeqCst);
    c.connect().await.expect("connect");
    let writer_ok = ksync_git::GitSyncClient::builder(format!("http://{addr}/git/r"))
        .auth(ksync_core::Auth::token("app-token"))
        .build()
        .expect("client");
    writer_ok
        .send(Event::new("late", "t", json!(1), 1))
        .await
        .expect("send");
    writer_ok.push().await.expect("push");
    let mut pulled = false;
    for _ in 0..400 {
        if c.replica()
            .storage()
            .latest("late")
            .expect("read")
            .is_some()
        {
            pulled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(pulled, "auto-pull runs again after connect()");
    drop(sub);
    task.abort();
}

/// Refused credentials are replaced with `set_auth`; `connect()` then checks the new ones and
/// the client syncs with them (a token refreshed after it expired).
#[tokio::test]
async fn set_auth_brings_fresh_credentials_after_a_refusal() {
    let server = start(&["r"]).await;
    let c = ksync_git::GitSyncClient::builder(server.url("/git/r"))
        .auth(ksync_core::Auth::token("stale-token"))
        .build()
        .expect("client");
    let refused = c.connect().await.expect_err("refused");
    assert!(
        matches!(refused, ksync_core::SyncError::Auth(_)),
        "{refused}"
    );
    assert!(
        c.set_auth(Some(ksync_core::Auth::token("bad\ntoken")))
            .is_err(),
        "credentials that cannot be sent are refused"
    );
    c.set_auth(Some(ksync_core::Auth::token("writer")))
        .expect("set_auth");
    c.connect().await.expect("connect with fresh credentials");
    c.send(Event::new("fresh", "t", json!(1), 1))
        .await
        .expect("send");
    assert_eq!(c.push().await.expect("push").pushed_events.len(), 1);
    let stored: Vec<String> = branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(stored, vec!["fresh".to_owned()]);
}

/// `KSync::enable_auto_sync` does what auto-pull does: refused credentials are reported
/// once and stop it (they were retried on every tick, forever, each attempt a failed login
/// on the server); `enable_auto_sync` again starts it again.
#[tokio::test]
async fn ksync_auto_sync_stops_when_the_credentials_are_refused() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use ksync_core::{AutoSync, InMemoryStorage, Notification, SyncError};

    let (auth, addr, task) = revocable_service().await;
    let client = ksync_git::GitSyncClient::builder(format!("http://{addr}/git/r"))
        .auth(ksync_core::Auth::token("app-token"))
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let ksync = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync");
    ksync.connect().await.expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _sub = ksync
        .on("error", move |n: &Notification| {
            if let Notification::Error(e) = n {
                let _ = tx.send(e.clone());
            }
        })
        .expect("on");
    auth.revoked.store(true, Ordering::SeqCst);
    let every = AutoSync {
        push_interval: Duration::from_millis(20),
        pull_interval: Duration::from_millis(20),
    };
    ksync.enable_auto_sync(every);
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an error is reported")
        .expect("open");
    assert!(matches!(*first, SyncError::Auth(_)), "{first:?}");
    // Many ticks later: no further attempt was made, nothing more was reported.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(auth.refused.load(Ordering::SeqCst), 1);
    assert!(rx.try_recv().is_err());

    // Enabled again with working credentials: events move.
    auth.revoked.store(false, Ordering::SeqCst);
    ksync.enable_auto_sync(every);
    let event = ksync.emit("note", json!({"n": 1})).await.expect("emit");
    let reader = ksync_git::GitSyncClient::builder(format!("http://{addr}/git/r"))
        .auth(ksync_core::Auth::token("app-token"))
        .build()
        .expect("reader");
    let pushed = async {
        loop {
            reader.pull().await.expect("pull");
            if reader
                .replica()
                .storage()
                .latest(&event.id)
                .expect("read")
                .is_some()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), pushed)
        .await
        .expect("auto-sync pushes again");
    ksync.disable_auto_sync();
    task.abort();
}

/// Serves `app` on 127.0.0.1:0.
async fn serve(app: axum::Router) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let (addr, task) = serve_router(app).await;
    (addr, task)
}

/// An in-memory service with repository `r` behind `fault` (an axum middleware), served on
/// 127.0.0.1:0: its provider (to look at the branches), URL and task.
async fn faulty_service<F, Fut>(
    fault: F,
) -> (
    std::sync::Arc<ksync_core::InMemoryProvider>,
    String,
    tokio::task::JoinHandle<()>,
)
where
    F: Fn(axum::extract::Request, axum::middleware::Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = axum::response::Response> + Send + 'static,
{
    use std::sync::Arc;
    let provider = Arc::new(ksync_core::InMemoryProvider::new());
    let service = ksync_git::server::GitServer::new(
        Arc::clone(&provider) as Arc<dyn ksync_core::StorageProvider>,
        Arc::new(common::TestAuth),
    );
    service
        .create_repo(&ksync_core::Name::new("r").expect("name"))
        .await
        .expect("repo");
    let (addr, task) = serve(service.router().layer(axum::middleware::from_fn(fault))).await;
    (provider, format!("http://{addr}/git/r"), task)
}

/// A merge whose conflict resolutions cannot be pushed (the server fails the push) returns
/// the error; the server's merge cursor has moved on and will not report the collision
/// again, so the same merge retried must push the resolutions it owes.
#[tokio::test]
async fn a_merge_retried_after_its_resolutions_failed_to_push_sends_them() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::extract::Request;
    use axum::middleware::Next;
    use axum::response::IntoResponse;

    // While armed, pushes to `main` fail (500: the client does not retry it).
    let armed = Arc::new(AtomicBool::new(false));
    let fail = {
        let armed = Arc::clone(&armed);
        move |req: Request, next: Next| {
            let armed = Arc::clone(&armed);
            async move {
                if req.method() == axum::http::Method::POST
                    && req.uri().path().ends_with("/branches/main/events")
                    && armed.load(Ordering::SeqCst)
                {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
                }
                next.run(req).await
            }
        }
    };
    let (provider, url, task) = faulty_service(fail).await;
    let (a, b) = colliding_edits(&url, "feature text", "main text").await;

    armed.store(true, Ordering::SeqCst);
    let err = a
        .client()
        .merge("main", "feature")
        .await
        .expect_err("the resolution cannot be pushed");
    assert_eq!(GitError::of(&err).and_then(GitError::status), Some(500));
    let main_doc = |provider: &dyn ksync_core::StorageProvider| {
        provider
            .existing(&ksync_core::LogName::Branch {
                repo: ksync_core::Name::new("r").expect("valid"),
                branch: ksync_core::Name::new("main").expect("valid"),
            })
            .expect("provider")
            .expect("main")
            .latest("doc")
            .expect("read")
            .expect("doc")
            .event
    };
    assert_eq!(main_doc(provider.as_ref()).data, json!("main text"));

    armed.store(false, Ordering::SeqCst);
    let again = a.client().merge("main", "feature").await.expect("merge");
    assert!(
        again.conflicts.is_empty(),
        "the server reports a collision once"
    );
    let doc = main_doc(provider.as_ref());
    assert_eq!(
        (doc.version, doc.data),
        (2, json!("feature text")),
        "the owed resolution (last write wins: feature's) is on main"
    );
    b.pull().await.expect("pull");
    assert_eq!(b.state().expect("state")["doc"].data, json!("feature text"));
    // Nothing is owed any more: a third merge pushes nothing.
    let third = a.client().merge("main", "feature").await.expect("merge");
    assert_eq!((third.appended, third.resolutions.len()), (0, 0));
    assert_eq!(main_doc(provider.as_ref()).version, 2);
    task.abort();
}

/// A merge whose answer is lost (the service merged, the client got an error): its collisions
/// are past the service's merge cursor. The same merge retried gets them again (same
/// `mergeId`), settles them and pushes the resolutions, so both branches' replicas converge.
#[tokio::test]
async fn a_merge_whose_answer_was_lost_reports_its_collisions_when_retried() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::extract::Request;
    use axum::middleware::Next;
    use axum::response::IntoResponse;

    // While armed, a merge is carried out and its answer replaced by a 502 (a proxy that
    // lost the connection to the service after forwarding the request).
    let armed = Arc::new(AtomicBool::new(false));
    let lose = {
        let armed = Arc::clone(&armed);
        move |req: Request, next: Next| {
            let armed = Arc::clone(&armed);
            async move {
                let merge = req.uri().path().ends_with("/merge");
                let answer = next.run(req).await;
                if merge && armed.load(Ordering::SeqCst) {
                    return axum::http::StatusCode::BAD_GATEWAY.into_response();
                }
                answer
            }
        }
    };
    let (_provider, url, task) = faulty_service(lose).await;
    let (a, b) = colliding_edits(&url, "feature text", "main text").await;

    armed.store(true, Ordering::SeqCst);
    let err = a
        .client()
        .merge("main", "feature")
        .await
        .expect_err("the answer was lost");
    assert_eq!(GitError::of(&err).and_then(GitError::status), Some(502));

    armed.store(false, Ordering::SeqCst);
    let again = a.client().merge("main", "feature").await.expect("merge");
    assert_eq!(again.conflicts.len(), 1, "the lost answer's collision");
    assert_eq!(again.resolutions.len(), 1);
    b.pull().await.expect("pull");
    assert_eq!(b.state().expect("state")["doc"].data, json!("feature text"));
    // Settled: the next merge is a new one, with nothing to report.
    let third = a.client().merge("main", "feature").await.expect("merge");
    assert_eq!((third.conflicts.len(), third.resolutions.len()), (0, 0));
    task.abort();
}

/// The spec's statuses (`connected`, `syncing`, `idle`, `error`), each change reported once
/// and in order: connect, a pull, a push, a merge, clones, a pull of a missing branch, a
/// failed connect.
#[tokio::test]
async fn statuses_follow_connect_pull_push_and_failures() {
    use std::sync::{Arc, Mutex};

    use ksync_core::{Notification, Status, Subscription};

    /// Each client's statuses (one client's notifications arrive in order).
    fn watch(c: &ksync_git::GitSyncClient) -> (Subscription, Arc<Mutex<Vec<Status>>>) {
        let seen: Arc<Mutex<Vec<Status>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let sub = c
            .on(
                "status",
                Box::new(move |n: &Notification| {
                    if let Notification::Status(s) = n {
                        sink.lock().expect("lock").push(*s);
                    }
                }),
            )
            .expect("on");
        (sub, seen)
    }
    /// Waits (bounded: notifications are delivered by a task) for `want`.
    async fn expect(seen: &Mutex<Vec<Status>>, want: &[Status]) {
        for _ in 0..200 {
            if seen.lock().expect("lock").len() >= want.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(*seen.lock().expect("lock"), want);
    }

    let server = start(&["r"]).await;
    let c = ksync_git::GitSyncClient::builder(server.repo_url("r"))
        .auth(ksync_core::Auth::token("writer"))
        .build()
        .expect("client");
    let (_sub, seen) = watch(&c);
    c.connect().await.expect("connect");
    c.pull().await.expect("pull");
    c.send(Event::new("a", "t", json!(1), 1))
        .await
        .expect("send");
    c.push().await.expect("push");
    use Status::{Connected, Error, Idle, Syncing};
    expect(&seen, &[Connected, Syncing, Idle, Syncing, Idle]).await;
    // A clone and a merge sync too.
    c.create_branch("side").await.expect("branch");
    c.merge("side", "main").await.expect("merge");
    c.clone_repo(&server.repo_url("r"), "main")
        .await
        .expect("clone");
    c.clone_repo(&server.repo_url("r"), "ghost")
        .await
        .expect_err("no such branch");
    expect(
        &seen,
        &[
            Connected, Syncing, Idle, Syncing, Idle, Syncing, Idle, Syncing, Idle, Syncing, Error,
        ],
    )
    .await;

    let ghost = ksync_git::GitSyncClient::builder(server.repo_url("r"))
        .auth(ksync_core::Auth::token("writer"))
        .branch("ghost")
        .build()
        .expect("client");
    let (_ghost_sub, ghost_seen) = watch(&ghost);
    ghost.pull().await.expect_err("no such branch");
    expect(&ghost_seen, &[Syncing, Error]).await;

    // Without creating it: connect() would make the repository.
    let nothing = ksync_git::GitSyncClient::builder(server.repo_url("missing"))
        .auth(ksync_core::Auth::token("writer"))
        .create_repo_if_missing(false)
        .build()
        .expect("client");
    let (_nothing_sub, nothing_seen) = watch(&nothing);
    nothing.connect().await.expect_err("no such repository");
    expect(&nothing_seen, &[Error]).await;
}

/// One event larger than the service's body limit (413 even when sent alone) can never be
/// pushed: it comes back in `rejected_events` and stays local, and the events written after
/// it are pushed (they waited behind it forever, every push failing with 413).
#[tokio::test]
async fn an_event_over_the_body_limit_is_rejected_and_does_not_hold_back_the_rest() {
    use std::sync::Arc;

    let server = common::start_with(
        Arc::new(ksync_core::InMemoryProvider::new()),
        {
            let mut git_config = ksync_git::server::GitServerConfig::default();
            git_config.max_body_bytes = 64 * 1024;
            git_config
        },
        &["r"],
    )
    .await;
    let c = ksync_git::GitSyncClient::builder(server.repo_url("r"))
        .auth(ksync_core::Auth::token("writer"))
        .push_batch_bytes(32 * 1024)
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    c.send(Event::new("before", "t", json!(1), 1))
        .await
        .expect("send");
    c.send(Event::new("huge", "t", json!("x".repeat(100 * 1024)), 2))
        .await
        .expect("send");
    c.send(Event::new("after", "t", json!(3), 3))
        .await
        .expect("send");
    let pushed = c.push().await.expect("push");
    let ids = |events: &[Event]| events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&pushed.pushed_events), ["before", "after"]);
    assert_eq!(ids(&pushed.rejected_events), ["huge"]);
    assert_eq!(pushed.server_version, 2);
    assert_eq!(
        ids(&branch_events(&server, "r", "main")),
        ["before", "after"]
    );
    assert!(
        c.replica()
            .storage()
            .latest("huge")
            .expect("read")
            .is_some(),
        "kept locally"
    );
    // Not sent again.
    let again = c.push().await.expect("push");
    assert!(again.pushed_events.is_empty() && again.rejected_events.is_empty());
    // A batch of several events over the limit is sent again in smaller batches (each of
    // these fits alone), and nothing of it is skipped.
    let small_batches = ksync_git::GitSyncClient::builder(server.repo_url("r"))
        .auth(ksync_core::Auth::token("writer"))
        .compression(false)
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    for i in 0..4 {
        small_batches
            .send(Event::new(
                format!("mid{i}"),
                "t",
                json!("y".repeat(20 * 1024)),
                i,
            ))
            .await
            .expect("send");
    }
    let halved = small_batches.push().await.expect("push in smaller batches");
    assert_eq!(ids(&halved.pushed_events), ["mid0", "mid1", "mid2", "mid3"]);
    assert!(halved.rejected_events.is_empty());
    assert_eq!(
        small_batches.local_status().expect("status").pending_events,
        0
    );
}

/// PROTOCOL.md: "a peer announcing another version is refused with a clear error". A service
/// answering with `X-KSync-Protocol: 2` is refused by the client, whatever its body says.
#[tokio::test]
async fn a_service_announcing_another_protocol_version_is_refused() {
    let info = json!({"repo": "r", "defaultBranch": "main", "branches": [
        {"name": "main", "serverVersion": 0, "forkedFrom": null, "forkedAt": null}]});
    let app = axum::Router::new().route(
        "/git/r",
        axum::routing::get(move || {
            let info = info.to_string();
            async move {
                (
                    [
                        ("x-ksync-protocol", "2"),
                        ("content-type", "application/json"),
                    ],
                    info,
                )
            }
        }),
    );
    let (addr, task) = serve(app).await;
    let c = client(&format!("http://{addr}/git/r"));
    let err = c.connect().await.expect_err("another protocol version");
    let git = GitError::of(&err).expect("a git error");
    assert!(
        matches!(git, GitError::UnsupportedProtocol { theirs, .. } if theirs == "2"),
        "{git:?}"
    );
    assert!(git.is_unsupported_protocol());
    task.abort();
}

/// PROTOCOL.md: `X-KSync-Protocol` is "on every answer of the repository service", so also on
/// its refusal of a request announcing another version (400 `unsupported_protocol`): that
/// answer is the one a client of another version reads to learn which one the service speaks.
#[tokio::test]
async fn the_refusal_of_another_protocol_version_announces_ours() {
    let server = start(&["r"]).await;
    for theirs in ["2", "1.0", ""] {
        let response = http()
            .get(server.url("/git/r"))
            .header("authorization", "Bearer writer")
            .header("x-ksync-protocol", theirs)
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        let ours = response.headers().get("x-ksync-protocol").cloned();
        let body: Value = response.json().await.expect("a JSON error body");
        assert_eq!(
            (status, code(&body)),
            (400, "unsupported_protocol"),
            "{theirs:?}"
        );
        assert_eq!(
            ours.as_ref().map(|v| v.as_bytes()),
            Some(ksync_core::PROTOCOL_VERSION.to_string().as_bytes()),
            "{theirs:?}: the refusal names the version the service speaks"
        );
    }
}

/// `merge(into, from)` settles each collision with the policy (`ours` = `into`'s revision):
/// `ours` keeps `into`'s content and `merged` the handler's, each as a new revision on
/// `into` that supersedes both sides; `from` is not written.
#[tokio::test]
async fn merge_settles_collisions_with_ours_and_merged() {
    use ksync_core::Resolution;

    for policy in ["ours", "merged"] {
        let server = start(&["r"]).await;
        let url = server.repo_url("r");
        let (a, b) = colliding_edits(&url, "feature", "main").await;
        match policy {
            "ours" => a.on_conflict(|_| Resolution::Ours),
            _ => a.on_conflict(|c| {
                let mut event = c.ours.clone();
                event.data = json!(format!("{}+{}", c.ours.data, c.theirs.data));
                Resolution::Merged(event)
            }),
        }
        let merged = a.client().merge("main", "feature").await.expect("merge");
        assert_eq!((merged.conflicts.len(), merged.resolutions.len()), (1, 1));
        let latest = |branch: &str| {
            branch_events(&server, "r", branch)
                .into_iter()
                .filter(|e| e.id == "doc")
                .max_by_key(|e| e.version)
                .expect("doc")
        };
        let want = match policy {
            "ours" => json!("main"),
            _ => json!("\"main\"+\"feature\""),
        };
        let main = latest("main");
        assert_eq!((main.version, main.data), (2, want.clone()), "{policy}");
        assert_eq!(
            latest("feature").version,
            1,
            "{policy}: from is not written"
        );
        b.pull().await.expect("pull");
        assert_eq!(b.state().expect("state")["doc"].data, want, "{policy}");
    }
}

/// Any replica may write a revision at `MAX_EVENT_INTEGER` (2^53 - 1, the highest valid
/// version; one above it is refused). A merge collision there has no version
/// above it for a resolution: the merge reports it, leaves it unsettled and does not panic or
/// wrap to version 0.
#[tokio::test]
async fn a_merge_collision_at_the_highest_version_is_reported_not_settled() {
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let (status, _) = call(
        http()
            .post(format!("{url}/branches"))
            .json(&json!({"name": "feature"})),
    )
    .await;
    assert_eq!(status, 201);
    for (branch, data) in [("main", "main text"), ("feature", "feature text")] {
        let event =
            Event::new("doc", "d", json!(data), 1).with_version(ksync_core::MAX_EVENT_INTEGER);
        let (status, body) = call(
            http()
                .post(format!("{url}/branches/{branch}/events"))
                .json(&json!({"baseVersion": 0, "events": [event]})),
        )
        .await;
        assert_eq!(
            (status, body["appended"].as_u64()),
            (200, Some(1)),
            "{body}"
        );
    }
    let merger = client(&url);
    let merged = merger.merge("main", "feature").await.expect("merge");
    assert_eq!(merged.conflicts.len(), 1);
    assert!(merged.resolutions.is_empty(), "{:?}", merged.resolutions);
    let main: Vec<Event> = branch_events(&server, "r", "main");
    assert_eq!(main.len(), 1, "nothing written to main: {main:?}");
    assert_eq!(
        (main[0].version, &main[0].data),
        (ksync_core::MAX_EVENT_INTEGER, &json!("main text"))
    );
}

/// Two replicas over `url`: `a` forks `feature` and writes `doc` there (at t=50), `b` writes
/// `doc` on `main` (at t=40), both pushed. The same revision with other content on each
/// branch: merging them collides (last-write-wins picks `a`'s).
async fn colliding_edits(
    url: &str,
    feature: &str,
    main: &str,
) -> (
    ksync_core::KSync<ksync_git::GitSyncClient>,
    ksync_core::KSync<ksync_git::GitSyncClient>,
) {
    use std::sync::Arc;

    let clock = ksync_core::ManualClock::new(10);
    let node = |id: &'static str| {
        ksync_core::KSync::builder()
            .storage(Arc::new(ksync_core::InMemoryStorage::new()))
            .sync_client(Arc::new(client(url)))
            .replica_id(id)
            .clock(Arc::new(clock.clone()))
            .build()
    };
    let a = node("a").await.expect("ksync a");
    let b = node("b").await.expect("ksync b");
    a.client().create_branch("feature").await.expect("branch");
    a.client().checkout("feature").await.expect("checkout");
    clock.set(50);
    a.update("doc", "d", json!(feature)).await.expect("edit");
    a.push().await.expect("push feature");
    clock.set(40);
    b.update("doc", "d", json!(main)).await.expect("edit");
    b.push().await.expect("push main");
    (a, b)
}
