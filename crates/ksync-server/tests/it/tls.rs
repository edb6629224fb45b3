//! HTTPS and wss:// with a certificate made for the test (its own root): the WebSocket and
//! Git clients sync through TLS, a client that does not trust the certificate is refused
//! with a typed error, and a client that never finishes its handshake holds nobody up.
#![allow(clippy::unwrap_used)] // tests may unwrap

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ksync_core::{InMemoryStorage, KSync, SyncClient as _, SyncError};
use ksync_git::GitSyncClient;
use ksync_server::{AuthConfig, RunningServer, Server, ServerConfig, ServerError, TlsConfig};
use ksync_ws::{WebSocketSyncClient, WsError};
use serde_json::json;

/// A self-signed certificate for `names`, written as PEM files.
struct TestCert {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    pem: String,
}

fn test_cert_for(names: &[&str]) -> TestCert {
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    TestCert {
        _dir: dir,
        cert: cert_path,
        key: key_path,
        pem: cert.pem(),
    }
}

/// For `localhost` and 127.0.0.1.
fn test_cert() -> TestCert {
    test_cert_for(&["localhost", "127.0.0.1"])
}

fn tls_config(cert: &TestCert) -> ServerConfig {
    {
        let mut server_config = common::config(AuthConfig::default());
        server_config.tls = Some(TlsConfig {
            cert: cert.cert.clone(),
            key: cert.key.clone(),
        });
        server_config
    }
}

async fn start(cert: &TestCert) -> RunningServer {
    let running = Server::bind(tls_config(cert)).await.unwrap();
    assert!(running.tls());
    running
}

async fn ws_replica(url: &str, root_pem: Option<&str>) -> KSync<WebSocketSyncClient> {
    let mut builder = WebSocketSyncClient::builder(url)
        .reconnect(false)
        .connect_timeout(Duration::from_secs(5));
    if let Some(pem) = root_pem {
        builder = builder.tls_root_certificates_pem(pem);
    }
    ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), builder.build().unwrap())
        .await
        .unwrap()
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn websocket_clients_sync_over_wss() {
    let cert = test_cert();
    let running = start(&cert).await;
    let port = running.local_addr().port();
    // By name and by address: the certificate names both.
    let a = ws_replica(&format!("wss://localhost:{port}/ws/tls"), Some(&cert.pem)).await;
    let b = ws_replica(&format!("wss://127.0.0.1:{port}/ws/tls"), Some(&cert.pem)).await;
    a.connect().await.unwrap();
    b.connect().await.unwrap();
    a.emit("note", json!({"from": "a"})).await.unwrap();
    b.emit("note", json!({"from": "b"})).await.unwrap();
    eventually("both replicas hold both events", || {
        a.replica().storage().len() == 2 && b.replica().storage().len() == 2
    })
    .await;
    a.disconnect().await.unwrap();
    b.disconnect().await.unwrap();

    // The same port does not speak plain HTTP: a ws:// client fails, and is not fatal for
    // the server, which still serves wss://.
    let plain = ws_replica(&format!("ws://127.0.0.1:{port}/ws/tls"), None).await;
    assert!(plain.connect().await.is_err());
    let c = ws_replica(&format!("wss://localhost:{port}/ws/tls"), Some(&cert.pem)).await;
    c.connect().await.unwrap();
    eventually("a late replica catches up over wss", || {
        c.replica().storage().len() == 2
    })
    .await;
    c.disconnect().await.unwrap();
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_typed_fatal_error() {
    let cert = test_cert();
    let running = start(&cert).await;
    let url = format!("wss://localhost:{}/ws", running.local_addr().port());
    let client = WebSocketSyncClient::builder(&url)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let error = client.connect().await.unwrap_err();
    match WsError::find(&error) {
        Some(
            e @ WsError::Tls {
                host,
                certificate: true,
                ..
            },
        ) => {
            assert_eq!(host, "localhost");
            assert!(e.is_fatal(), "retrying cannot fix a refused certificate");
        }
        other => panic!("expected a refused certificate, got {other:?} ({error})"),
    }
    assert!(!client.is_connected());

    // A certificate for another name is refused as well, even with its root trusted.
    let other = test_cert_for(&["example.org"]);
    let running_other = start(&other).await;
    let url = format!("wss://localhost:{}/ws", running_other.local_addr().port());
    let client = WebSocketSyncClient::builder(&url)
        .tls_root_certificates_pem(&other.pem)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let error = client.connect().await.unwrap_err();
    assert!(
        matches!(
            WsError::find(&error),
            Some(WsError::Tls {
                certificate: true,
                ..
            })
        ),
        "{error}"
    );
    running.shutdown().await.unwrap();
    running_other.shutdown().await.unwrap();
}

#[tokio::test]
async fn git_clients_push_and_clone_over_https() {
    let cert = test_cert();
    let running = start(&cert).await;
    let url = format!(
        "https://localhost:{}/git/tls-repo",
        running.local_addr().port()
    );
    let git = |pem: Option<&str>| {
        let mut builder = GitSyncClient::builder(&url);
        if let Some(pem) = pem {
            builder = builder.tls_root_certificates_pem(pem);
        }
        builder.build().unwrap()
    };
    let writer = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), git(Some(&cert.pem)))
        .await
        .unwrap();
    writer.client().create_repo().await.unwrap();
    writer.emit("note", json!({"n": 1})).await.unwrap();
    writer.emit("note", json!({"n": 2})).await.unwrap();
    writer.push().await.unwrap();

    let reader = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), git(Some(&cert.pem)))
        .await
        .unwrap();
    reader.client().clone_repo(&url, "main").await.unwrap();
    assert_eq!(reader.replica().storage().len(), 2);

    // Without the root: refused before any request reaches the service.
    let untrusting = git(None);
    let error = untrusting.repo_info().await.unwrap_err();
    assert!(
        error.to_string().to_lowercase().contains("certificate")
            || format!("{error:?}").to_lowercase().contains("certificate"),
        "{error:?}"
    );

    // /health answers over HTTPS too.
    let health = reqwest::Client::builder()
        .tls_certs_merge([reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap()])
        .build()
        .unwrap()
        .get(format!(
            "https://localhost:{}/health",
            running.local_addr().port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_holds_nobody_up() {
    let cert = test_cert();
    let running = start(&cert).await;
    let addr = running.local_addr();
    // Connected, silent: no ClientHello.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Half a ClientHello, then nothing.
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let a = ws_replica(
        &format!("wss://localhost:{}/ws/busy", addr.port()),
        Some(&cert.pem),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), a.connect())
        .await
        .expect("connected while others stall their handshakes")
        .unwrap();
    a.emit("note", json!({})).await.unwrap();
    a.disconnect().await.unwrap();
    drop(silent);
    drop(half);
    running.shutdown().await.unwrap();
}

/// One address stalling more handshakes than `max_pending_connections_per_ip` cannot hold
/// every handshake place: past that many in flight its new connections are closed at once,
/// and a client of another address gets its answer. Before, 1,100 silent connections from
/// one address held all 1,024 places (each for the 10 s handshake timeout) and the other
/// client waited in the listen backlog.
#[tokio::test]
async fn one_address_stalling_handshakes_cannot_hold_every_handshake_place() {
    let cert = test_cert();
    let running = Server::bind({
        let mut config = tls_config(&cert);
        config.limits.max_pending_connections_per_ip = 4;
        config
    })
    .await
    .unwrap();
    let addr = running.local_addr();
    let mut silent = Vec::new();
    for _ in 0..ksync_server::MAX_TLS_HANDSHAKES + 76 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
        silent.push(socket.connect(addr).await.unwrap());
    }
    let health = reqwest::Client::builder()
        .tls_certs_merge([reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap()])
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap()
        .get(format!("https://127.0.0.1:{}/health", addr.port()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("answered within 5 s while one address stalls its handshakes");
    assert_eq!(health.status(), 200);
    drop(silent);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn unusable_certificate_files_are_typed_errors_that_never_quote_the_key() {
    let cert = test_cert();
    let other = test_cert();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate SECRET-MATERIAL").unwrap();
    let cases = [
        // (certificate, key, the file the error must name)
        (
            dir.path().join("missing.pem"),
            cert.key.clone(),
            "missing.pem",
        ),
        (garbage.clone(), cert.key.clone(), "garbage.pem"),
        (cert.cert.clone(), garbage.clone(), "garbage.pem"),
        // Someone else's key.
        (cert.cert.clone(), other.key.clone(), "key.pem"),
    ];
    for (cert_path, key_path, named) in cases {
        let config = {
            let mut server_config = common::config(AuthConfig::default());
            server_config.tls = Some(TlsConfig {
                cert: cert_path.clone(),
                key: key_path.clone(),
            });
            server_config
        };
        let error = Server::new(config).unwrap_err();
        assert!(
            matches!(
                error,
                ServerError::Tls { .. } | ServerError::ReadFile { .. }
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains(named), "{message}");
        assert!(!message.contains("SECRET-MATERIAL"), "{message}");
        assert!(!message.contains("PRIVATE KEY-----"), "{message}");
    }
    // A client builder refuses PEM without a certificate.
    for pem in [
        "",
        "garbage",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ] {
        let ws = WebSocketSyncClient::builder("wss://localhost:1/ws")
            .tls_root_certificates_pem(pem)
            .build();
        assert!(matches!(ws, Err(SyncError::Config(_))), "{pem:?}");
        let git = GitSyncClient::builder("https://localhost:1/git/r")
            .tls_root_certificates_pem(pem)
            .build();
        assert!(matches!(git, Err(SyncError::Config(_))), "{pem:?}");
    }
}

/// Whether connecting `replica` fails because its client refused the server's certificate.
async fn refuses_the_certificate(replica: &KSync<WebSocketSyncClient>) -> bool {
    match replica.connect().await {
        Ok(()) => false,
        Err(error) => matches!(
            WsError::find(&error),
            Some(WsError::Tls {
                certificate: true,
                ..
            })
        ),
    }
}

/// A renewed certificate is served after `reload_tls`, without a restart: new handshakes
/// present it, a connection opened before keeps working, and files that cannot be used leave
/// the current certificate in place.
#[tokio::test]
async fn a_renewed_certificate_is_served_after_a_reload() {
    let (first, renewed) = (test_cert(), test_cert());
    // The server reads one pair of paths, as from Let's Encrypt's `live/` directory.
    let live = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (
        live.path().join("fullchain.pem"),
        live.path().join("privkey.pem"),
    );
    let install = |cert: &TestCert| {
        std::fs::copy(&cert.cert, &cert_path).unwrap();
        std::fs::copy(&cert.key, &key_path).unwrap();
    };
    install(&first);
    let running = Server::bind({
        let mut server_config = common::config(AuthConfig::default());
        server_config.tls = Some(TlsConfig {
            cert: cert_path.clone(),
            key: key_path.clone(),
        });
        server_config
    })
    .await
    .unwrap();
    let url = format!("wss://localhost:{}/ws/renew", running.local_addr().port());
    let before = ws_replica(&url, Some(&first.pem)).await;
    before.connect().await.unwrap();

    // Renewed on disk: until the reload, handshakes still present the first certificate.
    install(&renewed);
    let early = ws_replica(&url, Some(&renewed.pem)).await;
    assert!(refuses_the_certificate(&early).await);
    running.reload_tls().unwrap();
    let after = ws_replica(&url, Some(&renewed.pem)).await;
    after.connect().await.unwrap();
    let stale = ws_replica(&url, Some(&first.pem)).await;
    assert!(refuses_the_certificate(&stale).await);

    // The connection from before the reload still carries events both ways.
    before
        .emit("note", json!({"from": "before"}))
        .await
        .unwrap();
    after.emit("note", json!({"from": "after"})).await.unwrap();
    eventually("both replicas hold both events", || {
        before.replica().storage().len() == 2 && after.replica().storage().len() == 2
    })
    .await;

    // A broken renewal is a typed error, and the working certificate stays.
    std::fs::write(&key_path, "not a key").unwrap();
    let error = running.reload_tls().unwrap_err();
    assert!(matches!(error, ServerError::Tls { .. }), "{error}");
    std::fs::remove_file(&cert_path).unwrap();
    let error = running.reload_tls().unwrap_err();
    assert!(matches!(error, ServerError::ReadFile { .. }), "{error}");
    let still = ws_replica(&url, Some(&renewed.pem)).await;
    still.connect().await.unwrap();

    for replica in [&before, &after, &still] {
        replica.disconnect().await.unwrap();
    }
    running.shutdown().await.unwrap();
}
