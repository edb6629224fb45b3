//! The client's credentials never reach the logs, whatever the level: a client connecting
//! with an API key and another with a JWT, through a real relay on 127.0.0.1:0, with every
//! target (and the `log` records of dependencies such as tungstenite) captured at TRACE.
//!
//! A binary of its own: the subscriber is process-wide.

mod common;

use std::io;
use std::sync::{Arc, Mutex};

use common::*;
use ksync_core::{
    Auth, AuthError, Authenticator, Credentials, Grant, InMemoryProvider, SyncClient,
};
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;

/// Collects what the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const API_KEY: &str = "k-live-4f1c9a7e2b";
const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJlLXNlY3JldA";

/// Accepts [`API_KEY`] and [`JWT`].
struct Both;

impl Authenticator for Both {
    fn authenticate(&self, credentials: &Credentials) -> Result<Grant, AuthError> {
        match (
            credentials.api_key.as_deref(),
            credentials.bearer.as_deref(),
        ) {
            (Some(API_KEY), _) | (_, Some(JWT)) => Ok(Grant::anonymous()),
            (None, None) => Err(AuthError::Missing),
            _ => Err(AuthError::Invalid("unknown".into())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let server = start_with(
        RelayConfig::default(),
        Arc::new(InMemoryProvider::new()),
        Arc::new(Both),
    )
    .await;
    for auth in [Auth::api_key(API_KEY), Auth::jwt(JWT)] {
        let client = WebSocketSyncClient::builder(server.url(Some("logged")))
            .auth(auth)
            .debug(true)
            .build()
            .expect("client");
        client.connect().await.expect("connect");
        client.disconnect().await.expect("disconnect");
    }
    // A refused one too (its error is logged and notified).
    let refused = WebSocketSyncClient::builder(server.url(Some("logged")))
        .auth(Auth::api_key(format!("{API_KEY}-wrong")))
        .debug(true)
        .build()
        .expect("client");
    assert!(refused.connect().await.is_err());
    server.stop().await;

    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
    assert!(
        logs.contains("welcome"),
        "the capture works (the client's debug lines are there)"
    );
    for secret in [API_KEY, JWT, "c2lnbmF0dXJlLXNlY3JldA"] {
        let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} logged: {leaks:#?}");
    }
}
