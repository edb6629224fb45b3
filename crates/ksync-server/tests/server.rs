//! The server in-process on 127.0.0.1:0: health, metrics, clean shutdown.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::net::SocketAddr;

use ksync_server::{Server, ServerConfig};
use serde_json::Value;

fn loopback_config() -> ServerConfig {
    ServerConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        in_memory: true,
        ..ServerConfig::default()
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
    let config = ServerConfig {
        bind: first.local_addr(),
        ..loopback_config()
    };
    let error = Server::bind(config).await.unwrap_err();
    assert!(matches!(error, ksync_server::ServerError::Bind { .. }));
    first.shutdown().await.unwrap();
}
