//! Bad input gets a clear status and a JSON error, and touches nothing: unknown names, malformed
//! bodies, path tricks, oversized bodies, refused credentials, a stalled server.

use crate::common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use ksync_core::{Auth, Event, PullPushClient, SyncClient, SyncError};
use ksync_git::server::GitServerConfig;
use ksync_git::{GitError, GitSyncClient};
use ksync_storage_file::FileProvider;
use serde_json::{Value, json};

use common::{branch_events, call, client, code, http, start, start_with};

fn push_body(events: &[Event]) -> Value {
    json!({"baseVersion": 0, "events": events})
}

#[tokio::test]
async fn unknown_repo_and_branch_are_404() {
    let server = start(&["r"]).await;
    let http = http();
    let (status, body) = call(http.get(server.url("/git/nope/branches/main/events"))).await;
    assert_eq!((status, code(&body)), (404, "repo_not_found"));
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("nope")
    );
    let (status, body) = call(http.get(server.url("/git/r/branches/ghost/events"))).await;
    assert_eq!((status, code(&body)), (404, "branch_not_found"));
    let (status, body) = call(
        http.post(server.url("/git/r/branches/ghost/events"))
            .json(&push_body(&[])),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "branch_not_found"));
    let (status, _) = call(http.get(server.url("/git/nope"))).await;
    assert_eq!(status, 404);
    let (status, body) = call(
        http.post(server.url("/git/r/merge"))
            .json(&json!({"into": "main", "from": "ghost"})),
    )
    .await;
    assert_eq!((status, code(&body)), (404, "branch_not_found"));

    // The client reports it as a typed error (when it is not to create the repository).
    let c = GitSyncClient::builder(server.repo_url("nope"))
        .auth(Auth::token("writer"))
        .create_repo_if_missing(false)
        .build()
        .expect("client");
    let err = c.pull().await.expect_err("unknown repo");
    let git = GitError::of(&err).expect("a git error");
    assert_eq!(
        (git.status(), git.code()),
        (Some(404), Some("repo_not_found"))
    );
    let err = c.connect().await.expect_err("connect checks the repo");
    assert_eq!(GitError::of(&err).and_then(GitError::status), Some(404));
    let err = client(&server.repo_url("r"))
        .checkout("ghost")
        .await
        .expect_err("unknown branch");
    assert_eq!(
        GitError::of(&err).and_then(GitError::code),
        Some("branch_not_found")
    );
}

#[tokio::test]
async fn malformed_requests_are_400_and_store_nothing() {
    let server = start(&["r"]).await;
    let http = http();
    let url = server.url("/git/r/branches/main/events");
    for body in [
        "not json",
        "{}",
        r#"{"baseVersion":0,"events":[{"id":"x"}]}"#,
        r#"{"baseVersion":-1,"events":[]}"#,
        r#"{"baseVersion":0,"events":[],"extra":1}"#,
    ] {
        let (status, reply) = call(
            http.post(&url)
                .header("content-type", "application/json")
                .body(body),
        )
        .await;
        assert_eq!((status, code(&reply)), (400, "malformed_body"), "{body}");
    }
    // One invalid event refuses the whole batch.
    let good = Event::new("ok", "t", json!(1), 1);
    let bad = Event::new("", "t", json!(1), 1);
    let (status, reply) = call(http.post(&url).json(&push_body(&[good, bad]))).await;
    assert_eq!((status, code(&reply)), (400, "invalid_event"));
    // Not gzip although it says so.
    let (status, reply) = call(
        http.post(&url)
            .header("content-encoding", "gzip")
            .body("plain text"),
    )
    .await;
    assert_eq!((status, code(&reply)), (400, "malformed_body"));
    let (status, reply) = call(http.post(&url).header("content-encoding", "br").body("x")).await;
    assert_eq!((status, code(&reply)), (415, "unsupported_encoding"));
    let (status, reply) = call(http.get(&url).header("x-ksync-protocol", "2")).await;
    assert_eq!((status, code(&reply)), (400, "unsupported_protocol"));
    let (status, reply) = call(http.get(format!("{url}?since=abc"))).await;
    assert_eq!((status, code(&reply)), (400, "malformed_query"));
    let (status, reply) = call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "x", "from": "main", "at": "soon"})),
    )
    .await;
    assert_eq!((status, code(&reply)), (400, "malformed_body"));
    let (status, reply) = call(
        http.post(server.url("/git/r/merge"))
            .json(&json!({"into": "main", "from": "main"})),
    )
    .await;
    assert_eq!((status, code(&reply)), (400, "same_branch"));
    // A merge id is stored under the pair's key: only letters, digits and '-', at most 64.
    for merge_id in [json!(""), json!("../x"), json!("a".repeat(65)), json!(5)] {
        let (status, reply) = call(
            http.post(server.url("/git/r/merge"))
                .json(&json!({"into": "main", "from": "main2", "mergeId": merge_id})),
        )
        .await;
        assert_eq!(
            (status, code(&reply)),
            (400, "malformed_body"),
            "{merge_id}"
        );
    }
    assert!(branch_events(&server, "r", "main").is_empty());
}

#[tokio::test]
async fn version_trouble_is_409() {
    let server = start(&["r"]).await;
    let http = http();
    let url = server.url("/git/r/branches/main/events");
    let (status, reply) = call(http.get(format!("{url}?since=5"))).await;
    assert_eq!((status, code(&reply)), (409, "version_ahead"));
    let (status, reply) = call(
        http.post(&url)
            .json(&json!({"baseVersion": 3, "events": [Event::new("a", "t", json!(1), 1)]})),
    )
    .await;
    assert_eq!((status, code(&reply)), (409, "version_ahead"));
    let (status, reply) = call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "x", "at": 9})),
    )
    .await;
    assert_eq!((status, code(&reply)), (409, "version_ahead"));
    let (status, _) = call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, 200, "the same fork again is fine");
    let (status, reply) = call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "x", "from": "x"})),
    )
    .await;
    assert_eq!((status, code(&reply)), (409, "branch_exists"));
    assert!(branch_events(&server, "r", "main").is_empty());
}

#[tokio::test]
async fn path_tricks_are_400_and_touch_no_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    let provider = Arc::new(FileProvider::new(&data).expect("provider"));
    let server = start_with(provider, GitServerConfig::default(), &["r"]).await;
    let http = http();
    let before = list_tree(root.path());
    let tricks = [
        "/git/..%2F..%2Fetc/branches/main/events",
        "/git/..%2Fescape",
        "/git/%2Fetc%2Fpasswd/branches/main/events",
        "/git/a%00b/branches/main/events",
        "/git/a%5Cb/branches/main/events",
        "/git/.hidden/branches/main/events",
        "/git/r/branches/..%2F..%2Fescape/events",
        "/git/r/branches/caf%C3%A9/events",
    ];
    for path in tricks {
        for method in [
            reqwest::Method::GET,
            reqwest::Method::POST,
            reqwest::Method::PUT,
        ] {
            let (status, reply) = call(
                http.request(method.clone(), server.url(path))
                    .json(&push_body(&[Event::new("a", "t", json!(1), 1)])),
            )
            .await;
            assert!(
                status == 400 || status == 405,
                "{method} {path} gave {status}"
            );
            if status == 400 {
                assert_eq!(code(&reply), "invalid_name", "{method} {path}");
            }
        }
    }
    // Percent-encoded dot segments: HTTP clients resolve them, so send them raw.
    for path in [
        "/git/%2e%2e/branches/main/events",
        "/git/r/branches/%2E%2e/events",
        "/git/%2e%2e%2f%2e%2e%2fetc",
    ] {
        assert_eq!(raw_get_status(server.addr, path).await, 400, "{path}");
    }
    let long = "a".repeat(200);
    let (status, reply) = call(http.put(server.url(&format!("/git/{long}")))).await;
    assert_eq!((status, code(&reply)), (400, "invalid_name"));
    let (status, reply) = call(
        http.post(server.url("/git/r/branches"))
            .json(&json!({"name": "../../escape"})),
    )
    .await;
    assert_eq!((status, code(&reply)), (400, "invalid_name"));
    let (status, reply) = call(
        http.post(server.url("/git/r/merge"))
            .json(&json!({"into": "main", "from": "../x"})),
    )
    .await;
    assert_eq!((status, code(&reply)), (400, "invalid_name"));
    assert_eq!(list_tree(root.path()), before, "no file created or changed");
    assert!(!root.path().join("escape").exists());
    // A client refuses such names before sending anything.
    assert!(matches!(
        client(&server.repo_url("r")).checkout("../x").await,
        Err(SyncError::Config(_))
    ));
    assert!(
        GitSyncClient::builder(server.url("/git/.."))
            .build()
            .is_err()
    );
}

async fn raw_get_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer writer\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.expect("read");
    let reply = String::from_utf8_lossy(&reply);
    reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line")
}

fn list_tree(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let entry = entry.expect("entry");
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                stack.push(entry.path());
            }
            out.push((entry.path().display().to_string(), meta.len()));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let config = {
        let mut git_config = GitServerConfig::default();
        git_config.max_body_bytes = 64 * 1024;
        git_config
    };
    let server = start_with(
        Arc::new(ksync_core::InMemoryProvider::new()),
        config,
        &["r"],
    )
    .await;
    let http = http();
    let url = server.url("/git/r/branches/main/events");
    let big: Vec<Event> = (0..1000)
        .map(|i| Event::new(format!("e{i}"), "t", json!("x".repeat(100)), i))
        .collect();
    let (status, reply) = call(http.post(&url).json(&push_body(&big))).await;
    assert_eq!((status, code(&reply)), (413, "payload_too_large"));
    // A small gzip body that inflates past the limit (a "zip bomb") is refused too.
    let json = serde_json::to_vec(&push_body(&big)).expect("json");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&json).expect("gzip");
    let packed = gz.finish().expect("gzip");
    assert!(packed.len() < 64 * 1024);
    let (status, reply) = call(
        http.post(&url)
            .header("content-encoding", "gzip")
            .header("content-type", "application/json")
            .body(packed),
    )
    .await;
    assert_eq!((status, code(&reply)), (413, "payload_too_large"));
    assert!(branch_events(&server, "r", "main").is_empty());

    // The client sends a batch answered 413 again in halves until they fit (in another
    // repository: the events below have the same ids from another origin).
    let c = GitSyncClient::builder(server.repo_url("halves"))
        .auth(Auth::token("writer"))
        .compression(false)
        .build()
        .expect("client");
    for event in big {
        c.send(event).await.expect("send");
    }
    let halved = c.push().await.expect("push in halves");
    assert_eq!(halved.pushed_events.len(), 1000);
    assert_eq!(branch_events(&server, "halves", "main").len(), 1000);
    // A smaller batch size goes through at once.
    let c = GitSyncClient::builder(server.repo_url("r"))
        .auth(Auth::token("writer"))
        .push_batch_size(100)
        .build()
        .expect("client");
    c.attach(replica_with(1000).await);
    let pushed = c.push().await.expect("push in small batches");
    assert_eq!(pushed.pushed_events.len(), 1000);
    assert_eq!(branch_events(&server, "r", "main").len(), 1000);

    // A byte budget under the limit cuts batches by size, whatever their event count.
    let c = GitSyncClient::builder(server.repo_url("r"))
        .auth(Auth::token("writer"))
        .compression(false)
        .push_batch_bytes(32 * 1024)
        .build()
        .expect("client");
    let replica =
        ksync_core::Replica::with_id(Arc::new(ksync_core::InMemoryStorage::new()), "byte-budget");
    for i in 0..1000 {
        replica
            .record_local(
                Event::new(format!("b{i}"), "t", json!("y".repeat(100)), i)
                    .with_origin("byte-budget"),
            )
            .await
            .expect("record");
    }
    c.attach(replica);
    let pushed = c.push().await.expect("push in batches cut by size");
    assert_eq!(pushed.pushed_events.len(), 1000);
    assert!(pushed.rejected_events.is_empty());
    assert_eq!(branch_events(&server, "r", "main").len(), 2000);
}

async fn replica_with(n: u64) -> ksync_core::Replica {
    let replica = ksync_core::Replica::with_id(
        Arc::new(ksync_core::InMemoryStorage::new()),
        "small-batches",
    );
    for i in 0..n {
        replica
            .record_local(
                Event::new(format!("e{i}"), "t", json!("x".repeat(100)), i)
                    .with_origin("small-batches"),
            )
            .await
            .expect("record");
    }
    replica
}

#[tokio::test]
async fn auth_matrix() {
    let server = start(&["r", "team"]).await;
    let http = http();
    let pull = |repo: &str| server.url(&format!("/git/{repo}/branches/main/events"));
    let body = push_body(&[Event::new("a", "t", json!(1), 1)]);
    let send = |req: reqwest::RequestBuilder| async move {
        let r = req.send().await.expect("send");
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        (status, code(&v).to_owned())
    };
    // Nothing, or a bad credential: 401.
    assert_eq!(
        send(http.get(pull("r"))).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        send(http.get(pull("r")).bearer_auth("wrong")).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        send(
            http.get(pull("r"))
                .header("authorization", "Basic d3JpdGVy")
        )
        .await,
        (401, "unauthorized".into())
    );
    // Read-only credentials read but do not write.
    assert_eq!(send(http.get(pull("r")).bearer_auth("reader")).await.0, 200);
    assert_eq!(
        send(http.post(pull("r")).bearer_auth("reader").json(&body)).await,
        (403, "forbidden".into())
    );
    assert_eq!(
        send(http.put(server.url("/git/new")).bearer_auth("reader")).await,
        (403, "forbidden".into())
    );
    // Scoped credentials reach their repository only.
    assert_eq!(
        send(http.post(pull("team")).bearer_auth("scoped").json(&body))
            .await
            .0,
        200
    );
    assert_eq!(
        send(http.get(pull("r")).bearer_auth("scoped")).await,
        (403, "forbidden".into())
    );
    // API keys work too.
    assert_eq!(
        send(http.get(pull("r")).header("x-api-key", "key-1"))
            .await
            .0,
        200
    );
    assert_eq!(
        send(http.get(pull("r")).header("x-api-key", "nope")).await,
        (401, "unauthorized".into())
    );
    assert!(branch_events(&server, "r", "main").is_empty());

    // The client maps refusals to SyncError::Auth and keeps its events.
    let reader = GitSyncClient::builder(server.repo_url("r"))
        .auth(Auth::jwt("reader"))
        .build()
        .expect("client");
    reader
        .send(Event::new("x", "t", json!(1), 1))
        .await
        .expect("send");
    assert!(matches!(reader.push().await, Err(SyncError::Auth(_))));
    assert!(reader.pull().await.is_ok());
    let anonymous = GitSyncClient::builder(server.repo_url("r"))
        .build()
        .expect("client");
    assert!(matches!(anonymous.pull().await, Err(SyncError::Auth(_))));
    assert_eq!(reader.replica().pending(0, 10).expect("pending").len(), 1);
}

#[tokio::test]
async fn responses_are_gzipped_when_asked() {
    let server = start(&["r"]).await;
    let c = client(&server.repo_url("r"));
    for i in 0..100 {
        c.send(Event::new(format!("e{i}"), "t", json!("some text"), i))
            .await
            .expect("send");
    }
    c.push().await.expect("push");
    let http = http();
    let url = server.url("/git/r/branches/main/events");
    let r = http
        .get(&url)
        .bearer_auth("writer")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.headers().get("content-encoding").map(|v| v.as_bytes()),
        Some(&b"gzip"[..])
    );
    let packed = r.bytes().await.expect("body");
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&packed[..]), &mut plain)
        .expect("gunzip");
    let page: Value = serde_json::from_slice(&plain).expect("json");
    assert_eq!(page["events"].as_array().map(Vec::len), Some(100));
    let r = http
        .get(&url)
        .bearer_auth("writer")
        .send()
        .await
        .expect("send");
    assert!(r.headers().get("content-encoding").is_none());
}

#[tokio::test]
async fn a_stalled_server_gives_a_timeout_error() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let c = GitSyncClient::builder(format!("http://{addr}/git/r"))
        .request_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    c.send(Event::new("x", "t", json!(1), 1))
        .await
        .expect("send");
    assert!(matches!(c.pull().await, Err(SyncError::Timeout(_))));
    assert!(matches!(c.push().await, Err(SyncError::Timeout(_))));
    assert_eq!(
        c.replica().pending(0, 10).expect("pending").len(),
        1,
        "nothing lost"
    );
    hold.abort();
}

/// Credentials that cannot go in an HTTP header (a control character, e.g. a newline pasted
/// with a token) are refused by the builder, as the WebSocket client's are, without the secret
/// in the message; they built a client whose every request failed.
#[test]
fn credentials_that_cannot_be_sent_are_refused_at_build() {
    for auth in [
        Auth::token("s3cret\nline"),
        Auth::jwt("s3cret\r"),
        Auth::api_key("s3cret\u{7f}"),
    ] {
        match GitSyncClient::builder("http://127.0.0.1:9/git/r")
            .auth(auth)
            .build()
        {
            Err(SyncError::Config(message)) => assert!(!message.contains("s3cret"), "{message}"),
            Err(other) => panic!("expected a configuration error, got {other}"),
            Ok(_) => panic!("built a client whose credentials cannot be sent"),
        }
    }
}

/// A repository or branch name that differs only in case from a stored one is refused (409
/// `name_taken`, naming the stored one): where the file system ignores case they would be
/// one file, and two repositories would share their branches' logs.
#[tokio::test]
async fn names_that_differ_only_in_case_from_stored_ones_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = Arc::new(FileProvider::new(dir.path()).expect("provider"));
    let server = start_with(provider, GitServerConfig::default(), &["Notes"]).await;
    let http = http();
    let (status, body) = call(http.put(server.url("/git/notes"))).await;
    assert_eq!((status, code(&body)), (409, "name_taken"), "{body}");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("\"Notes\""), "{message}");
    let (status, body) = call(
        http.post(server.url("/git/Notes/branches"))
            .json(&json!({"name": "MAIN"})),
    )
    .await;
    assert_eq!((status, code(&body)), (409, "name_taken"), "{body}");
    // The stored names work as before.
    let (status, body) = call(http.put(server.url("/git/Notes"))).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        http.post(server.url("/git/Notes/branches"))
            .json(&json!({"name": "feature"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}
