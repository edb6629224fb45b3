//! Shared by the examples that talk to `ksync serve`: where the server is, and a clear message
//! when it is not running.

// Each example uses a subset of these helpers.
#![allow(dead_code)]

use std::time::Duration;

use anyhow::Context;

/// The server's address: `KSYNC_SERVER` (host:port), default `127.0.0.1:8080`, where
/// `ksync serve` listens by default.
pub fn server_addr() -> String {
    std::env::var("KSYNC_SERVER").unwrap_or_else(|_| "127.0.0.1:8080".to_owned())
}

/// The WebSocket URL of a room on the server.
pub fn ws_url(room: &str) -> String {
    format!("ws://{}/ws/{room}", server_addr())
}

/// The URL of a repository on the server's Git-like service.
pub fn git_url(repo: &str) -> String {
    format!("http://{}/git/{repo}", server_addr())
}

/// Exits with instructions (status 2) when nothing listens at [`server_addr`].
pub async fn require_server() {
    let addr = server_addr();
    let reachable = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(addr.as_str()),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if !reachable {
        eprintln!(
            "No kSync server at {addr}.\n\
             Start one in another terminal with\n\
             \n    cargo run --release -p ksync-cli -- serve\n\n\
             (or point KSYNC_SERVER=host:port at a running one) and run this example again."
        );
        std::process::exit(2);
    }
}

/// A credential from the environment variable `var`, or `fallback` (which a server without
/// authentication configured accepts).
pub fn secret(var: &str, fallback: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| fallback.to_owned())
}

/// Logs with `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second init (not possible in one example) would fail; nothing to do then.
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

/// Waits up to `within` for `f` to hold, polling; the transports deliver on their own tasks.
pub async fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    tokio::time::timeout(within, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .context("timed out waiting for the other side")
}
