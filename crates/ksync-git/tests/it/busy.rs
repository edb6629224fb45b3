//! The client against a service that sheds load: 503 `busy` with `Retry-After: 1`, as
//! `ksync serve` answers past `--max-git-requests` (its `shed_git_requests`, mirrored here over
//! a real `GitServer`). A request turned away is sent again after `Retry-After`, a bounded
//! number of times.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ksync_core::{InMemoryProvider, InMemoryStorage, KSync, Name};
use ksync_git::server::GitServer;
use ksync_git::wire::DEFAULT_BUSY_ATTEMPTS;
use ksync_git::{GitError, GitSyncClient};
use serde_json::json;
use tokio::sync::Semaphore;

/// What the shedding layer saw: method, path and the status it answered with.
type Log = Arc<Mutex<Vec<(String, String, u16)>>>;

#[derive(Clone)]
struct Shed {
    /// One request at a time (`--max-git-requests 1`): a test holding the permit makes the
    /// service busy for everyone.
    slots: Arc<Semaphore>,
    log: Log,
}

/// As `ksync-server`'s `shed_git_requests`: no free slot, 503 `busy` at once.
async fn shed(State(shed): State<Shed>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_owned();
    let response = match shed.slots.try_acquire() {
        Ok(_slot) => next.run(request).await,
        Err(_) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [
                (axum::http::header::RETRY_AFTER, "1"),
                (axum::http::header::CONTENT_TYPE, "application/json"),
            ],
            json!({"error": {"code": "busy",
                "message": "too many repository requests at once; retry shortly"}})
            .to_string(),
        )
            .into_response(),
    };
    let status = response.status().as_u16();
    shed.log.lock().expect("log").push((method, path, status));
    response
}

struct Busy {
    url: String,
    slots: Arc<Semaphore>,
    log: Log,
    provider: Arc<InMemoryProvider>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Busy {
    /// The statuses answered to `method path`, in order.
    fn statuses(&self, method: &str, path: &str) -> Vec<u16> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|(m, p, _)| m == method && p == path)
            .map(|(_, _, status)| *status)
            .collect()
    }

    /// Waits until `method path` has been turned away at least once.
    async fn until_turned_away(&self, method: &str, path: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.statuses(method, path).contains(&503) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{method} {path} never reached the busy service"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The ids on branch `main` of repository `r`, in order.
    fn ids(&self) -> Vec<String> {
        let log = ksync_core::StorageProvider::existing(
            self.provider.as_ref(),
            &ksync_core::LogName::Branch {
                repo: Name::new("r").expect("valid"),
                branch: Name::new("main").expect("valid"),
            },
        )
        .expect("provider")
        .expect("main exists");
        log.read_since(0, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|s| s.event.id)
            .collect()
    }
}

/// A real service with repository `r`, behind the shedding layer.
async fn start() -> Busy {
    let provider = Arc::new(InMemoryProvider::new());
    let service = GitServer::new(Arc::clone(&provider) as _, Arc::new(common::TestAuth));
    service
        .create_repo(&Name::new("r").expect("valid"))
        .await
        .expect("create repo");
    let state = Shed {
        slots: Arc::new(Semaphore::new(1)),
        log: Log::default(),
    };
    let app = service
        .router()
        .layer(axum::middleware::from_fn_with_state(state.clone(), shed));
    let (addr, task) = common::serve_router(app).await;
    Busy {
        url: format!("http://{addr}/git/r"),
        slots: state.slots,
        log: state.log,
        provider,
        task,
    }
}

async fn node(url: &str, id: &str) -> KSync<GitSyncClient> {
    KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(common::client(url)))
        .replica_id(id)
        .build()
        .await
        .expect("ksync")
}

const EVENTS: &str = "/git/r/branches/main/events";

/// A push made while the service is busy is turned away, sent again after `Retry-After`, and
/// succeeds once the service frees up: every event is reported pushed and stored once.
#[tokio::test]
async fn a_push_while_busy_succeeds_once_the_service_frees_up() {
    let service = start().await;
    let a = node(&service.url, "a").await;
    a.update("x", "doc", json!(1)).await.expect("x");
    a.update("y", "doc", json!(2)).await.expect("y");

    let held = Arc::clone(&service.slots)
        .acquire_owned()
        .await
        .expect("slot");
    let push = tokio::spawn(async move { a.push().await });
    service.until_turned_away("POST", EVENTS).await;
    drop(held);

    let pushed = push
        .await
        .expect("task")
        .expect("push succeeds after retrying");
    let mut ids: Vec<_> = pushed.pushed_events.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["x", "y"]);
    assert!(pushed.rejected_events.is_empty());
    assert_eq!(pushed.server_version, 2);
    let statuses = service.statuses("POST", EVENTS);
    assert_eq!(statuses.first(), Some(&503), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    let mut stored = service.ids();
    stored.sort();
    assert_eq!(stored, ["x", "y"], "each event stored once");
}

/// A pull made while the service is busy gets the branch once the service frees up.
#[tokio::test]
async fn a_pull_while_busy_succeeds_once_the_service_frees_up() {
    let service = start().await;
    let a = node(&service.url, "a").await;
    a.update("x", "doc", json!("from a")).await.expect("x");
    a.push().await.expect("push");
    let b = node(&service.url, "b").await;

    let held = Arc::clone(&service.slots)
        .acquire_owned()
        .await
        .expect("slot");
    let pull = tokio::spawn(async move {
        let pulled = b.pull().await;
        (b, pulled)
    });
    service.until_turned_away("GET", EVENTS).await;
    drop(held);

    let (b, pulled) = pull.await.expect("task");
    let pulled = pulled.expect("pull succeeds after retrying");
    let ids: Vec<_> = pulled.new_events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["x"]);
    let state = b.state().expect("state");
    assert_eq!(state.get("x").map(|e| &e.data), Some(&json!("from a")));
    let statuses = service.statuses("GET", EVENTS);
    assert_eq!(statuses.first(), Some(&503), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
}

/// A service that stays busy: the push is sent `DEFAULT_BUSY_ATTEMPTS` times, then fails with
/// the service's answer (503 `busy`), and nothing was stored; it goes through once the service
/// is free again.
#[tokio::test]
async fn a_service_that_stays_busy_fails_the_call_after_the_bounded_attempts() {
    let service = start().await;
    let a = node(&service.url, "a").await;
    a.update("x", "doc", json!(1)).await.expect("x");

    let held = Arc::clone(&service.slots)
        .acquire_owned()
        .await
        .expect("slot");
    let error = a.push().await.expect_err("the service stayed busy");
    let git = GitError::of(&error).expect("a GitError");
    assert_eq!(
        (git.status(), git.code()),
        (Some(503), Some("busy")),
        "{error}"
    );
    assert_eq!(
        service.statuses("POST", EVENTS),
        vec![503; DEFAULT_BUSY_ATTEMPTS as usize]
    );
    drop(held);
    assert!(service.ids().is_empty());

    let pushed = a.push().await.expect("push once free");
    assert_eq!(pushed.pushed_events.len(), 1);
    assert_eq!(service.ids(), ["x"]);
}

/// With `busy_attempts(1)` a busy answer fails the call at once.
#[tokio::test]
async fn busy_attempts_of_one_does_not_retry() {
    let service = start().await;
    let client = GitSyncClient::builder(service.url.clone())
        .auth(ksync_core::Auth::token("writer"))
        .busy_attempts(1)
        .build()
        .expect("client");
    let held = Arc::clone(&service.slots)
        .acquire_owned()
        .await
        .expect("slot");
    let error = client.repo_info().await.expect_err("busy");
    assert_eq!(GitError::of(&error).and_then(GitError::status), Some(503));
    assert_eq!(service.statuses("GET", "/git/r"), [503]);
    drop(held);
    let info = client.repo_info().await.expect("repo info once free");
    assert_eq!(info.repo, "r");
}
