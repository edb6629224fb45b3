//! A repository service of another protocol version (docs/PROTOCOL.md, Git-like HTTP:
//! `X-KSync-Protocol`): what repeats it on every try stops after reporting it once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::response::IntoResponse;
use ksync_core::{AutoSync, InMemoryStorage, KSync, Notification};
use ksync_git::{GitError, GitSyncClient};
use serde_json::json;

use common::serve_router;

/// A service that answers every request as one of version 2 refusing version 1; counts them.
async fn newer_service() -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let app = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = json!({"error": {"code": "unsupported_protocol",
                "message": "this server speaks protocol version 2"}});
            (
                axum::http::StatusCode::BAD_REQUEST,
                [
                    ("content-type", "application/json"),
                    ("x-ksync-protocol", "2"),
                ],
                body.to_string(),
            )
                .into_response()
        }
    });
    let (addr, task) = serve_router(app).await;
    (format!("http://{addr}/git/r"), requests, task)
}

/// `KSync::enable_auto_sync` stops at a service of another version as it stops at refused
/// credentials: the same answer would come on every tick, for ever.
#[tokio::test]
async fn ksync_auto_sync_stops_at_a_service_of_another_protocol_version() {
    let (url, requests, task) = newer_service().await;
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
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _sub = ksync
        .on(
            "error",
            Box::new(move |n: &Notification| {
                if let Notification::Error(e) = n {
                    let _ = tx.send(e.clone());
                }
            }),
        )
        .expect("on");
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
