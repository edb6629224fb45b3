//! A repository service of another protocol version (docs/PROTOCOL.md, Git-like HTTP:
//! `X-KSync-Protocol`): what repeats it on every try stops after reporting it once.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::response::IntoResponse;
use ksync_core::{AutoSync, InMemoryStorage, KSync, Notification, PullPushClient, SyncClient};
use ksync_git::{GitError, GitSyncClient};
use serde_json::json;

use common::serve_router;

/// A service that answers every request as one of version 2 refusing version 1, announcing
/// its version with `X-KSync-Protocol: announced` (`None`: the header dropped by a proxy, only
/// the 400 `unsupported_protocol` tells); counts the requests.
async fn newer_service(
    announced: Option<&'static str>,
) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = json!({"error": {"code": "unsupported_protocol",
                "message": "this server speaks protocol version 2"}});
            let mut response = (
                axum::http::StatusCode::BAD_REQUEST,
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response();
            if let Some(version) = announced {
                response.headers_mut().insert(
                    "x-ksync-protocol",
                    axum::http::HeaderValue::from_static(version),
                );
            }
            response
        }
    });
    let (addr, task) = serve_router(app).await;
    (format!("http://{addr}/git/r"), requests, task)
}

/// The `error` notifications of a client or `KSync` (`on`), as they come.
type Errors = tokio::sync::mpsc::UnboundedReceiver<Arc<ksync_core::SyncError>>;

fn error_sink() -> (ksync_core::Handler, Errors) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = Box::new(move |n: &Notification| {
        if let Notification::Error(e) = n {
            let _ = tx.send(e.clone());
        }
    });
    (handler, rx)
}

/// A service of another protocol version answers every request alike, whether it announces
/// its version (`X-KSync-Protocol: 2`) or only refuses ours (400 `unsupported_protocol`, the
/// header dropped by a proxy): auto-pull reports that once and stops, as for refused
/// credentials, instead of failing on every tick for ever. `connect()` starts it again.
#[tokio::test]
async fn auto_pull_stops_at_a_service_of_another_protocol_version() {
    for announced in [Some("2"), None] {
        let (url, requests, task) = newer_service(announced).await;
        let c = GitSyncClient::builder(url)
            .pull_interval(Duration::from_millis(20))
            .request_timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        let (handler, mut rx) = error_sink();
        let _sub = c.on("error", handler).expect("on");
        // The first pull starts auto-pull (the spec's flow calls no connect()).
        let err = c.pull().await.expect_err("another protocol version");
        let git = GitError::of(&err).expect("a git error");
        assert!(git.is_unsupported_protocol(), "{announced:?}: {git:?}");
        let after_pull = requests.load(Ordering::SeqCst);
        let reported = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("auto-pull reports it")
            .expect("open");
        assert!(
            GitError::of(&reported).is_some_and(GitError::is_unsupported_protocol),
            "{announced:?}: {reported:?}"
        );
        // Many ticks later: no further attempt was made, nothing more was reported.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            requests.load(Ordering::SeqCst),
            after_pull + 1,
            "{announced:?}: auto-pull went on"
        );
        assert!(rx.try_recv().is_err(), "{announced:?}: reported again");
        task.abort();
    }
}

/// `KSync::enable_auto_sync` stops at a service of another version as it stops at refused
/// credentials: the same answer would come on every tick, for ever.
#[tokio::test]
async fn ksync_auto_sync_stops_at_a_service_of_another_protocol_version() {
    let (url, requests, task) = newer_service(Some("2")).await;
    let client = GitSyncClient::builder(url)
        .request_timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let ksync = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(client))
        .build()
        .await
        .expect("ksync");
    let (handler, mut rx) = error_sink();
    let _sub = ksync.on("error", handler).expect("on");
    ksync.enable_auto_sync(AutoSync {
        push_interval: Duration::from_millis(20),
        pull_interval: Duration::from_millis(20),
    });
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an error is reported")
        .expect("open");
    assert!(
        GitError::of(&first).is_some_and(GitError::is_unsupported_protocol),
        "{first:?}"
    );
    let after_first = requests.load(Ordering::SeqCst);
    // Many ticks later: no further attempt was made, nothing more was reported.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        requests.load(Ordering::SeqCst),
        after_first,
        "auto-sync went on"
    );
    assert!(rx.try_recv().is_err(), "reported again");
    ksync.disable_auto_sync();
    task.abort();
}
