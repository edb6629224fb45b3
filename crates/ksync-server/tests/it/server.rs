//! The server in-process on 127.0.0.1:0: health, metrics, clean shutdown.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::net::SocketAddr;
use std::time::Duration;

use ksync_server::{Server, ServerConfig};
use serde_json::Value;

fn loopback_config() -> ServerConfig {
    {
        let mut server_config = ServerConfig::default();
        server_config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        server_config.in_memory = true;
        server_config
    }
}

async fn get(url: String) -> reqwest::Response {
    reqwest::Client::new().get(url).send().await.unwrap()
}

#[tokio::test]
async fn health_and_metrics_answer_and_shutdown_is_clean() {
    let running = Server::bind(loopback_config()).await.unwrap();
    let addr = running.local_addr();
    assert_ne!(addr.port(), 0, "the real port is reported");

    let response = get(format!("http://{addr}/health")).await;
    assert_eq!(response.status(), 200);
    let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        body["commit"],
        serde_json::json!(ksync_server::BUILD_COMMIT)
    );
    assert_eq!(body["rooms"], 0);
    assert_eq!(body["repos"], 0);
    assert!(body["uptimeSeconds"].is_u64());

    // A log created through the provider shows up in the counts.
    let room = ksync_core::LogName::Room(ksync_core::Name::new("lobby").unwrap());
    running.provider().open(&room).unwrap();
    let body: Value = serde_json::from_str(
        &get(format!("http://{addr}/health"))
            .await
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(body["rooms"], 1);

    let metrics = get(format!("http://{addr}/metrics")).await;
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("ksync_rooms 1"), "{text}");
    assert!(text.contains("ksync_http_requests_total "), "{text}");

    running.shutdown().await.unwrap();
    assert!(
        reqwest::Client::new()
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .is_err(),
        "no longer accepting after shutdown"
    );
}

#[tokio::test]
async fn bad_auth_configuration_fails_to_start() {
    let mut config = loopback_config();
    config
        .auth
        .jwt_keys
        .push(ksync_server::JwtKey::hs256("too-short"));
    let error = Server::bind(config).await.unwrap_err();
    assert!(matches!(
        error,
        ksync_server::ServerError::InvalidKey { .. }
    ));
}

#[tokio::test]
async fn a_taken_port_is_a_bind_error() {
    let first = Server::bind(loopback_config()).await.unwrap();
    let config = {
        let mut server_config = loopback_config();
        server_config.bind = first.local_addr();
        server_config
    };
    let error = Server::bind(config).await.unwrap_err();
    assert!(matches!(error, ksync_server::ServerError::Bind { .. }));
    first.shutdown().await.unwrap();
}

/// Repository requests are bounded: past `max_git_requests` in flight the next is answered
/// 503 `busy` at once, and a client that stops sending its body mid-way gets 408 once
/// `request_body_timeout` passes, which frees its slot.
#[tokio::test]
async fn git_requests_are_shed_past_the_limit_and_stalled_bodies_time_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = loopback_config();
    config.limits.max_git_requests = 1;
    // Long enough for the requests below to meet the stalled one on a busy machine.
    config.limits.request_body_timeout = Duration::from_secs(3);
    let running = Server::bind(config).await.unwrap();
    let addr = running.local_addr();
    let client = reqwest::Client::new();
    let created = client
        .put(format!("http://{addr}/git/slow"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);

    // A push that announces 1000 bytes and sends 10: it holds the only slot.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /git/slow/branches/main/events HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"baseVersi"
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    // Until its body times out, every other repository request is shed.
    let mut busy = None;
    for _ in 0..100 {
        let response = client
            .get(format!("http://{addr}/git/slow"))
            .send()
            .await
            .unwrap();
        if response.status() == 503 {
            busy = Some(response);
            break;
        }
        // The stalled request may not hold its slot yet.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let busy = busy.expect("a request shed while the stalled one holds the only slot");
    assert_eq!(busy.headers()["retry-after"], "1");
    let body: serde_json::Value = busy.json().await.unwrap();
    assert_eq!(body["error"]["code"], "busy", "{body}");
    // Other routes are not limited.
    assert_eq!(get(format!("http://{addr}/health")).await.status(), 200);

    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut answer))
        .await
        .expect("the stalled request is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"body_incomplete\""), "{answer}");
    // Its slot is free again.
    let info = client
        .get(format!("http://{addr}/git/slow"))
        .send()
        .await
        .unwrap();
    assert_eq!(info.status(), 200);
    running.shutdown().await.unwrap();
}

/// Sends `body` as a push to `/git/{repo}` a `piece` of bytes every `every`, until the server
/// answers (or the body is all sent and answered); returns the answer and the bytes sent.
async fn trickle_push(
    addr: SocketAddr,
    repo: &str,
    body: Vec<u8>,
    piece: usize,
    every: Duration,
) -> (String, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /git/{repo}/branches/main/events HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let mut answer = Vec::new();
    let mut sent = 0;
    let mut tick = tokio::time::interval(every);
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut buffer = [0u8; 4096];
        tokio::select! {
            read = reader.read(&mut buffer) => match read.unwrap() {
                0 => break,
                n => answer.extend_from_slice(&buffer[..n]),
            },
            _ = tick.tick(), if sent < body.len() => {
                let end = (sent + piece).min(body.len());
                // The server may have answered and closed meanwhile.
                if writer.write_all(&body[sent..end]).await.is_err() {
                    continue;
                }
                sent = end;
            }
            _ = tokio::time::sleep_until(give_up) => {
                panic!("no answer within 10 s ({sent} of {} bytes sent)", body.len())
            }
        }
    }
    (String::from_utf8_lossy(&answer).into_owned(), sent)
}

/// A push body that keeps coming, a byte at a time, but far below `request_body_min_rate`
/// gets 408 once its grace (`request_body_timeout`) is spent, which frees its repository
/// request slot; before, one byte a little more often than every `request_body_timeout`
/// held the slot for as long as the client cared to (256 such clients shed every other
/// repository request with 503). A body that keeps the rate is let finish however long it
/// takes, and other routes are answered meanwhile.
#[tokio::test]
async fn a_body_trickled_below_the_minimum_rate_gets_408_and_one_above_it_finishes() {
    let mut config = loopback_config();
    config.limits.max_git_requests = 1;
    config.limits.request_body_timeout = Duration::from_millis(300);
    config.limits.request_body_min_rate = 1000;
    let running = Server::bind(config).await.unwrap();
    let addr = running.local_addr();
    let client = reqwest::Client::new();
    let created = client
        .put(format!("http://{addr}/git/slow"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let body = serde_json::json!({"baseVersion": 0, "events": [
        {"id": "e1", "type": "t", "data": "x".repeat(1000), "timestamp": 1, "version": 1}]})
    .to_string();

    // 20 bytes a second: each byte well within the 300 ms between pieces.
    let slow = tokio::spawn(trickle_push(
        addr,
        "slow",
        body.clone().into_bytes(),
        1,
        Duration::from_millis(50),
    ));
    // Other routes are answered meanwhile.
    assert_eq!(get(format!("http://{addr}/health")).await.status(), 200);
    let (answer, sent) = slow.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"body_incomplete\""), "{answer}");
    assert!(sent < body.len(), "all {sent} bytes were sent");

    // 2,000 bytes a second: past the 300 ms grace (over half a second), and let finish.
    let (answer, sent) = trickle_push(
        addr,
        "slow",
        body.clone().into_bytes(),
        100,
        Duration::from_millis(50),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(sent, body.len());
    running.shutdown().await.unwrap();
}

/// A configuration that cannot start (here a bad key, or a certificate file that is not
/// there) leaves no data directory behind and holds no lock on it.
#[tokio::test]
async fn a_bad_configuration_does_not_create_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut bad_key = {
        let mut server_config = loopback_config();
        server_config.in_memory = false;
        server_config.data_dir = data_dir.clone();
        server_config
    };
    bad_key
        .auth
        .jwt_keys
        .push(ksync_server::JwtKey::hs256("too-short"));
    let mut bad_tls = bad_key.clone();
    bad_tls.auth = ksync_server::AuthConfig::default();
    bad_tls.tls = Some(ksync_server::TlsConfig {
        cert: dir.path().join("missing-cert.pem"),
        key: dir.path().join("missing-key.pem"),
    });
    for config in [bad_key, bad_tls] {
        let error = Server::new(config).unwrap_err();
        assert!(
            !data_dir.exists(),
            "created for a config failing with {error}"
        );
    }
    // The directory is free: a good configuration takes it.
    let good = {
        let mut server_config = loopback_config();
        server_config.in_memory = false;
        server_config.data_dir = data_dir.clone();
        server_config
    };
    let running = Server::bind(good).await.unwrap();
    assert!(data_dir.is_dir());
    running.shutdown().await.unwrap();
}

/// `rooms/` (where room logs go) being a file is refused when the server is made, naming it,
/// before the data directory is locked; a directory that can be written is served.
#[tokio::test]
async fn a_data_directory_the_server_cannot_write_in_is_refused_when_made() {
    let dir = tempfile::tempdir().unwrap();
    let rooms = dir.path().join("rooms");
    std::fs::write(&rooms, "not a directory").unwrap();
    let config = {
        let mut server_config = loopback_config();
        server_config.in_memory = false;
        server_config.data_dir = dir.path().to_owned();
        server_config
    };
    match Server::new(config.clone()) {
        Err(ksync_server::ServerError::Storage(ksync_core::StorageError::Io {
            context,
            source,
        })) => {
            assert_eq!(
                context,
                format!("data directory not writable: {}", rooms.display())
            );
            assert_eq!(source.kind(), std::io::ErrorKind::NotADirectory);
        }
        other => panic!("expected a storage IO error naming rooms/, got {other:?}"),
    }
    assert!(!dir.path().join(".lock").exists(), "locked anyway");
    std::fs::remove_file(&rooms).unwrap();
    std::fs::create_dir(&rooms).unwrap();
    let running = Server::bind(config).await.unwrap();
    running.shutdown().await.unwrap();
    let left: Vec<_> = std::fs::read_dir(&rooms).unwrap().collect();
    assert!(left.is_empty(), "the probe is removed: {left:?}");
}

/// A build from a git checkout names its commit (`/health`'s `commit`, `ksync --version`):
/// one of this repository's commits, HEAD or one before it (HEAD may have moved since the
/// build). Every build had reported just `0.1.0`.
#[test]
fn a_build_from_a_checkout_names_its_commit() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .is_ok_and(|out| out.status.success())
    };
    // Given by the builder, or no checkout to compare with (git gone, a source tree).
    if env!("KSYNC_BUILD_COMMIT_SOURCE") == "environment"
        || !git(&["ls-files", "--error-unmatch", "build.rs"])
    {
        return;
    }
    let commit = ksync_server::BUILD_COMMIT.expect("a commit, built in a checkout");
    assert_eq!(commit.len(), 12, "{commit}");
    assert!(commit.bytes().all(|b| b.is_ascii_hexdigit()), "{commit}");
    assert!(
        git(&["merge-base", "--is-ancestor", commit, "HEAD"]),
        "{commit} is not HEAD or before it"
    );
    assert_eq!(
        ksync_server::VERSION,
        format!("{} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

/// A page of another origin can read that there is no endpoint at a URL: ksync.js, after a
/// refused upgrade (which a browser hides), asks for the URL with a plain `GET` and stops with
/// `no_endpoint` on 404, 405 or 410, but a browser shows a page of another origin such an
/// answer only with `Access-Control-Allow-Origin`. They carry `*`, as `/ksync.js` does (they
/// hold nothing); the answers that hold something stay same-origin. The relay's own router
/// adds the header too (for library users who mount it alone): composed here, its answers
/// still carry it once.
#[tokio::test]
async fn not_found_and_method_not_allowed_are_readable_from_another_origin() {
    let running = Server::bind(loopback_config()).await.unwrap();
    let addr = running.local_addr();
    let client = reqwest::Client::new();
    let origin = "https://app.example";
    for (method, path, status) in [
        (reqwest::Method::GET, "/no/such/path", 404),
        (reqwest::Method::GET, "/wss/room", 404),
        (reqwest::Method::POST, "/health", 405),
        (reqwest::Method::GET, "/ws/room/more", 404),
        (reqwest::Method::POST, "/ws/room", 405),
        (reqwest::Method::PUT, "/ws", 405),
    ] {
        let response = client
            .request(method.clone(), format!("http://{addr}{path}"))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let allowed: Vec<_> = response
            .headers()
            .get_all("access-control-allow-origin")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(allowed, ["*"], "{method} {path}");
    }
    let health = client
        .get(format!("http://{addr}/health"))
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        health
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    running.shutdown().await.unwrap();
}
