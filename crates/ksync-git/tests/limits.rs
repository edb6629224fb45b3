//! Size bounds on both sides: the client reads at most `max_response_bytes` of an answer
//! (a hostile server, a gzip bomb), and the service cuts pull pages at a byte budget.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use ksync_core::{Auth, PullPushClient};
use ksync_git::{GitError, GitSyncClient};

/// A hostile "repository service" on 127.0.0.1:0: every pull answers with what `answer` makes.
async fn hostile(answer: fn() -> Response) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = Router::new().route(
        "/git/{repo}/branches/{branch}/events",
        get(move || async move { answer() }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (addr, task)
}

fn client(addr: SocketAddr, limit: usize) -> GitSyncClient {
    GitSyncClient::builder(format!("http://{addr}/git/r"))
        .auth(Auth::token("writer"))
        .request_timeout(Duration::from_secs(10))
        .create_repo_if_missing(false)
        .max_response_bytes(limit)
        .build()
        .expect("client")
}

const LIMIT: usize = 1024 * 1024;

/// A JSON page padded with whitespace to `bytes`: valid, only too large.
fn padded_page(bytes: usize) -> Vec<u8> {
    let mut json = b"{\"since\":0,\"events\":[],\"serverVersion\":0,\"next\":null}".to_vec();
    json.resize(bytes, b' ');
    json
}

/// Pulls from a hostile server answering with `answer`: a typed error, no panic.
async fn too_large(answer: fn() -> Response) {
    let (addr, task) = hostile(answer).await;
    let err = client(addr, LIMIT)
        .pull()
        .await
        .expect_err("over the limit");
    match GitError::of(&err) {
        Some(GitError::ResponseTooLarge { limit, .. }) => assert_eq!(*limit, LIMIT),
        other => panic!("expected ResponseTooLarge, got {other:?} ({err})"),
    }
    task.abort();
}

/// A body with a `Content-Length` over the limit: refused before it is read.
#[tokio::test]
async fn a_declared_body_over_the_limit_is_a_typed_error() {
    too_large(|| Response::new(Body::from(padded_page(2 * LIMIT)))).await;
    // The same answer under a higher limit is a valid (empty) page.
    let (addr, task) = hostile(|| Response::new(Body::from(padded_page(2 * LIMIT)))).await;
    let pulled = client(addr, 4 * LIMIT)
        .pull()
        .await
        .expect("under the limit");
    assert_eq!(pulled.server_version, 0);
    task.abort();
}

/// A gzip bomb (a few KiB that inflate to 8 MiB; no length is known once decoded): the read
/// stops at the limit.
#[tokio::test]
async fn a_gzip_bomb_is_a_typed_error() {
    too_large(|| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&padded_page(8 * LIMIT)).expect("gzip");
        let mut response = Response::new(Body::from(gz.finish().expect("gzip")));
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, "gzip".parse().expect("value"));
        response
    })
    .await;
}

/// An error answer is bounded as well.
#[tokio::test]
async fn an_oversized_error_body_is_a_typed_error() {
    too_large(|| {
        let mut response = Response::new(Body::from(vec![b'x'; 2 * LIMIT]));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response
    })
    .await;
}

/// Pages of the real service under the limit are read as before.
#[tokio::test]
async fn answers_under_the_limit_are_read() {
    let server = common::start(&["r"]).await;
    let c = GitSyncClient::builder(server.repo_url("r"))
        .auth(Auth::token("writer"))
        .max_response_bytes(64 * 1024)
        .build()
        .expect("client");
    let pulled = c.pull().await.expect("pull");
    assert_eq!(pulled.server_version, 0);
}
