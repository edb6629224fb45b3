//! Size bounds on both sides: the client reads at most `max_response_bytes` of an answer
//! (a hostile server, a gzip bomb), and the service cuts pull pages at a byte budget.

use crate::common;

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

/// The service cuts a pull page at `max_page_bytes` of events (one event larger than that
/// goes alone) and says where the rest starts; a client pulls everything, in order.
#[tokio::test]
async fn pull_pages_stop_at_the_byte_budget_and_the_client_gets_everything_in_order() {
    use std::sync::Arc;

    use ksync_core::{Event, SyncClient};
    use ksync_git::server::GitServerConfig;
    use serde_json::json;

    let budget = 64 * 1024;
    let server = common::start_with(
        Arc::new(ksync_core::InMemoryProvider::new()),
        {
            let mut git_config = GitServerConfig::default();
            git_config.max_page_bytes = budget;
            git_config
        },
        &["r"],
    )
    .await;
    let url = server.repo_url("r");
    let writer = common::client(&url);
    for i in 0..40 {
        // ~10 KiB each, and one of ~100 KiB, over the budget on its own.
        let size = if i == 17 { 100 * 1024 } else { 10 * 1024 };
        writer
            .send(Event::new(
                format!("e{i:02}"),
                "blob",
                json!("x".repeat(size)),
                1,
            ))
            .await
            .expect("send");
    }
    assert_eq!(writer.push().await.expect("push").pushed_events.len(), 40);

    // Raw: the first page asks for 1000 events and gets what fits in the budget.
    let (status, page) = common::call(
        common::http().get(server.url("/git/r/branches/main/events?since=0&limit=1000")),
    )
    .await;
    assert_eq!(status, 200);
    let events = page["events"].as_array().expect("events");
    assert!((1..40).contains(&events.len()), "{} events", events.len());
    assert!(serde_json::to_vec(events).expect("json").len() <= budget + 2);
    assert_eq!(page["next"], json!(events.len()));
    assert_eq!(page["serverVersion"], json!(40));
    // The large event alone.
    let (_, page) = common::call(
        common::http().get(server.url("/git/r/branches/main/events?since=17&limit=1000")),
    )
    .await;
    assert_eq!(page["events"].as_array().expect("events").len(), 1);
    assert_eq!(page["next"], json!(18));

    let reader = common::client(&url);
    let pulled = reader.pull().await.expect("pull");
    let ids: Vec<String> = pulled.new_events.iter().map(|e| e.id.clone()).collect();
    let expected: Vec<String> = (0..40).map(|i| format!("e{i:02}")).collect();
    assert_eq!(ids, expected);
    assert_eq!(pulled.server_version, 40);
    assert_eq!(reader.local_status().expect("status").pulled_version, 40);
}

/// The service keeps at most `max_open_branches` branch logs open: touching more releases
/// the least recently used to the provider (a file log closes), and a released branch
/// reopens with its history at its next request.
#[tokio::test]
async fn the_service_keeps_a_bounded_number_of_branch_logs_open() {
    use std::sync::Arc;

    use ksync_core::{Event, LogName, Name, StorageProvider, SyncClient};
    use ksync_git::server::GitServerConfig;
    use serde_json::json;

    let dir = tempfile::tempdir().expect("tempdir");
    let provider = Arc::new(ksync_storage_file::FileProvider::new(dir.path()).expect("provider"));
    let repos = ["r1", "r2", "r3", "r4"];
    let server = common::start_with(
        provider.clone(),
        {
            let mut git_config = GitServerConfig::default();
            git_config.max_open_branches = 2;
            git_config
        },
        &repos,
    )
    .await;
    for repo in repos {
        let client = common::client(&server.repo_url(repo));
        client
            .send(Event::new(
                format!("{repo}-e"),
                "note",
                json!({"repo": repo}),
                1,
            ))
            .await
            .expect("send");
        assert_eq!(client.push().await.expect("push").pushed_events.len(), 1);
    }
    let main = |repo: &str| LogName::Branch {
        repo: Name::new(repo).expect("name"),
        branch: Name::new("main").expect("name"),
    };
    let open: Vec<&str> = repos
        .iter()
        .copied()
        .filter(|r| provider.opened(&main(r)).is_some())
        .collect();
    assert_eq!(open, ["r3", "r4"], "the two used last stay open");
    // r1 was closed: its next pull opens it again, history intact.
    let reader = common::client(&server.repo_url("r1"));
    let pulled = reader.pull().await.expect("pull");
    assert_eq!(pulled.new_events.len(), 1);
    assert_eq!(pulled.new_events[0].id, "r1-e");
    assert!(provider.opened(&main("r1")).is_some());
}

/// A repository has at most `max_branches_per_repo` branches (`main` included): creating one
/// more gets 409 `too_many_branches` and leaves no log behind; asking again for an existing
/// branch at its fork point still answers it, and other repositories are not limited by it.
#[tokio::test]
async fn branch_creation_stops_at_max_branches_per_repo() {
    use std::sync::Arc;

    use ksync_core::LogName;
    use ksync_git::server::GitServerConfig;
    use serde_json::json;

    let server = common::start_with(
        Arc::new(ksync_core::InMemoryProvider::new()),
        {
            let mut git_config = GitServerConfig::default();
            git_config.max_branches_per_repo = 3;
            git_config
        },
        &["r", "s"],
    )
    .await;
    let http = common::http();
    let create = |repo: &str, name: &str| {
        common::call(
            http.post(server.url(&format!("/git/{repo}/branches")))
                .json(&json!({"name": name, "from": "main", "at": 0})),
        )
    };
    let logs = |repo: &str| -> Vec<String> {
        let mut names: Vec<String> = server
            .provider
            .list()
            .expect("list")
            .into_iter()
            .filter_map(|name| match name {
                LogName::Branch { repo: r, branch } if r.as_str() == repo => {
                    Some(branch.to_string())
                }
                _ => None,
            })
            .collect();
        names.sort();
        names
    };

    assert_eq!(create("r", "b1").await.0, 201);
    assert_eq!(create("r", "b2").await.0, 201);
    let (status, body) = create("r", "b3").await;
    assert_eq!(
        (status, common::code(&body)),
        (409, "too_many_branches"),
        "{body}"
    );
    assert_eq!(logs("r"), ["b1", "b2", "main"], "no log made for b3");
    let (status, listed) = common::call(http.get(server.url("/git/r/branches"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        listed["branches"].as_array().map(Vec::len),
        Some(3),
        "{listed}"
    );

    // The same request for an existing branch is still answered (a retried creation).
    let (status, body) = create("r", "b1").await;
    assert_eq!((status, &body["name"]), (200, &json!("b1")), "{body}");
    // Another repository has its own count.
    assert_eq!(create("s", "b1").await.0, 201);
    assert_eq!(logs("s"), ["b1", "main"]);
    // The client gets the typed error.
    let client = common::client(&server.repo_url("r"));
    let error = client.create_branch("b4").await.expect_err("over the cap");
    let git = GitError::of(&error).expect("a GitError");
    assert_eq!(
        (git.status(), git.code()),
        (Some(409), Some("too_many_branches"))
    );
    assert_eq!(logs("r"), ["b1", "b2", "main"]);
}

/// A server that declares a body of 2^63 bytes (and sends one byte) to a client whose limit is
/// as high: a typed error, not a panic (the client reserved the declared length up front:
/// "capacity overflow").
#[tokio::test]
async fn a_declared_length_past_what_memory_holds_is_not_reserved() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9223372036854775808\r\n\r\n{")
                .await;
            // Closed with the body cut short.
        }
    });
    let pulled = tokio::spawn(async move { client(addr, usize::MAX).pull().await })
        .await
        .expect("the pull does not panic");
    let err = pulled.expect_err("a cut body");
    assert!(
        matches!(GitError::of(&err), Some(GitError::Http { .. })),
        "{err}"
    );
    task.abort();
}

/// Every repository stored is a directory kept until deleted by hand: past the provider's
/// cap on stored repositories, creating one more gets 507 `too_many_repos` and makes nothing,
/// while the stored ones take branches and pushes as before.
#[tokio::test]
async fn repository_creation_stops_at_the_stored_repositories_cap() {
    use std::sync::Arc;

    use ksync_git::server::GitServerConfig;
    use ksync_storage_file::{FileProvider, StoreLimits};
    use serde_json::json;

    let dir = tempfile::tempdir().expect("tempdir");
    let provider = FileProvider::new(dir.path())
        .expect("provider")
        .with_limits(StoreLimits::new(1, 2));
    let server = common::start_with(Arc::new(provider), GitServerConfig::default(), &["r"]).await;
    let http = common::http();
    assert_eq!(common::call(http.put(server.url("/git/s"))).await.0, 201);
    let (status, body) = common::call(http.put(server.url("/git/t"))).await;
    assert_eq!(
        (status, common::code(&body)),
        (507, "too_many_repos"),
        "{body}"
    );
    assert_eq!(
        body["error"]["message"],
        json!("too many repositories stored (at most 2)")
    );
    assert!(!dir.path().join("repos").join("t").exists());
    let (status, _) = common::call(http.get(server.url("/git/t"))).await;
    assert_eq!(status, 404);
    // The stored ones go on: a new branch, a push.
    let (status, body) = common::call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "b1", "from": "main", "at": 0})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = common::call(http.post(server.url("/git/s/branches/main/events")).json(
        &json!({"baseVersion": 0, "events": [
            {"id": "e1", "type": "t", "data": 1, "timestamp": 1, "version": 1}
        ]}),
    ))
    .await;
    assert_eq!(status, 200, "{body}");
}
