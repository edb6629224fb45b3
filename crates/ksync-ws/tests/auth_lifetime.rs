//! Credentials over a connection's life: a connection is closed (4401) when its credentials
//! expire, and the Rust client stops on close codes that reconnecting cannot fix (it neither
//! hammers the server with an expired token nor with a client the server refuses), reports
//! it once, and tries again on an explicit `connect()` (with fresh credentials from
//! `set_auth`).

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use common::*;
use futures_util::{SinkExt, StreamExt};
use ksync_core::{
    Auth, AuthError, Authenticator, Credentials, Grant, InMemoryProvider, Notification, SyncClient,
};
use ksync_ws::server::RelayConfig;
use ksync_ws::{WebSocketSyncClient, WsError};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

/// Bearer tokens as a JWT issuer would hand them out: "short-N" is valid for `lifetime` from
/// its first use and refused as expired after that; "long" never expires. Counts every check.
struct Expiring {
    lifetime: Duration,
    first_use: std::sync::Mutex<std::collections::HashMap<String, SystemTime>>,
    checks: AtomicUsize,
}

impl Expiring {
    fn new(lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            lifetime,
            first_use: std::sync::Mutex::new(std::collections::HashMap::new()),
            checks: AtomicUsize::new(0),
        })
    }

    fn checks(&self) -> usize {
        self.checks.load(Ordering::SeqCst)
    }
}

impl Authenticator for Expiring {
    fn authenticate(&self, credentials: &Credentials) -> Result<Grant, AuthError> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        let token = credentials.bearer.as_deref().ok_or(AuthError::Missing)?;
        let mut grant = Grant::anonymous();
        grant.subject = token.to_owned();
        if token == "long" {
            return Ok(grant);
        }
        if !token.starts_with("short-") {
            return Err(AuthError::Invalid("unknown token".into()));
        }
        let now = SystemTime::now();
        let first = *self
            .first_use
            .lock()
            .unwrap()
            .entry(token.to_owned())
            .or_insert(now);
        let expires_at = first + self.lifetime;
        if now >= expires_at {
            return Err(AuthError::Expired);
        }
        grant.expires_at = Some(expires_at);
        Ok(grant)
    }
}

#[tokio::test]
async fn a_connection_is_closed_with_4401_when_its_credentials_expire() {
    let auth = Expiring::new(Duration::from_millis(600));
    let server = start_with(
        RelayConfig::default(),
        Arc::new(InMemoryProvider::new()),
        auth.clone(),
    )
    .await;
    let url = server.url(Some("a"));
    let mut long = raw_connect(&url, &[("authorization", "Bearer long")])
        .await
        .unwrap();
    send_json(&mut long, hello()).await;
    assert_eq!(recv_json(&mut long).await["type"], "welcome");
    let mut short = raw_connect(&url, &[("authorization", "Bearer short-1")])
        .await
        .unwrap();
    send_json(&mut short, hello()).await;
    assert_eq!(recv_json(&mut short).await["type"], "welcome");

    assert_eq!(
        recv_close(&mut short).await,
        (4401, "credentials expired".to_owned())
    );
    // The same token is refused from now on (with a challenge saying why) ...
    assert_eq!(
        raw_connect(&url, &[("authorization", "Bearer short-1")])
            .await
            .err(),
        Some(401)
    );
    // ... and a connection whose credentials do not expire goes on.
    send_json(
        &mut long,
        json!({"type": "publish", "ref": 1, "events": [event("after", 1)]}),
    )
    .await;
    let ack = recv_json(&mut long).await;
    assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    server.stop().await;
}

/// The error of each `error` notification that carries a `WsError`.
fn ws_errors(recorder: &Recorder) -> Vec<WsError> {
    recorder
        .all()
        .into_iter()
        .filter_map(|n| match n {
            Notification::Error(e) => WsError::find(&e).cloned(),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_client_stops_on_expired_credentials_and_connects_again_with_fresh_ones() {
    let auth = Expiring::new(Duration::from_millis(600));
    let server = start_with(
        RelayConfig::default(),
        Arc::new(InMemoryProvider::new()),
        auth.clone(),
    )
    .await;
    let client = WebSocketSyncClient::builder(server.url(Some("a")))
        .auth(Auth::jwt("short-1"))
        .reconnect_delay(Duration::from_millis(5), Duration::from_millis(10))
        .build()
        .unwrap();
    let recorder = Recorder::attach(&client);
    client.connect().await.unwrap();

    eventually("the expiry to be reported", || {
        ws_errors(&recorder)
            .iter()
            .any(|e| matches!(e, WsError::Closed { code: 4401, .. }))
    })
    .await;
    eventually("the disconnection", || !client.is_connected()).await;
    // Many reconnect delays later: no attempt with the expired token was made.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(auth.checks(), 1, "the expired token was sent again");
    assert!(recorder.reconnect_attempts().is_empty());
    let errors = ws_errors(&recorder);
    assert_eq!(errors.len(), 1, "reported once: {errors:?}");
    assert!(errors[0].is_fatal());

    // An explicit connect tries again: with the old token it is refused ...
    let refused = client.connect().await.unwrap_err();
    assert!(
        matches!(
            WsError::find(&refused),
            Some(WsError::Refused { status: 401, .. })
        ),
        "{refused}"
    );
    // ... with fresh credentials it connects.
    client.set_auth(Some(Auth::jwt("long"))).unwrap();
    client.connect().await.unwrap();
    assert!(client.is_connected());
    assert!(
        client.set_auth(Some(Auth::jwt("line\nbreak"))).is_err(),
        "credentials that cannot go in a header are refused"
    );
    client.disconnect().await.unwrap();
    server.stop().await;
}

/// A server that answers every `hello` by closing with `code`, after the `error` message
/// the relay sends before that close (`None`: a close alone); counts connections.
async fn closing_server(
    code: u16,
    error: Option<&'static str>,
) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws/a", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let _hello = ws.next().await;
                if let Some(error) = error {
                    let message = json!({"type": "error", "code": error, "message": "test"});
                    let _ = ws.send(Message::text(message.to_string())).await;
                }
                let frame = CloseFrame {
                    code: code.into(),
                    reason: "test close".into(),
                };
                let _ = ws.send(Message::Close(Some(frame))).await;
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
    (url, accepted, task)
}

#[tokio::test]
async fn close_codes_that_reconnecting_cannot_fix_stop_the_client() {
    // As the relay ends them: 1003, 4000 and 4001 come after an `error` message.
    for (code, error) in [
        (1002u16, None),
        (1003, Some("bad_binary")),
        (1003, None),
        (1007, None),
        (4000, Some("protocol")),
        (4000, None),
        (4001, Some("unsupported_protocol")),
        (4001, None),
        (4401, None),
    ] {
        let (url, accepted, server) = closing_server(code, error).await;
        let client = WebSocketSyncClient::builder(url)
            .reconnect_delay(Duration::from_millis(5), Duration::from_millis(10))
            .build()
            .unwrap();
        let recorder = Recorder::attach(&client);
        let error_code = error;
        let error = client.connect().await.unwrap_err();
        let found = WsError::find(&error);
        match (found, error_code) {
            (Some(WsError::Closed { code: got, .. }), None) => assert_eq!(*got, code),
            (Some(WsError::Server { code: got, .. }), Some(sent)) => assert_eq!(got, sent),
            (other, _) => panic!("close {code}: unexpected {other:?}"),
        }
        assert!(found.is_some_and(WsError::is_fatal), "close {code}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "close {code} was retried"
        );
        assert!(recorder.reconnect_attempts().is_empty(), "close {code}");
        assert_eq!(ws_errors(&recorder).len(), 1, "close {code}: one error");
        server.abort();
    }

    // Codes that a reconnect can fix (here: slow consumer) are retried.
    let (url, accepted, server) = closing_server(4008, None).await;
    let client = WebSocketSyncClient::builder(url)
        .reconnect_delay(Duration::from_millis(5), Duration::from_millis(10))
        .build()
        .unwrap();
    assert!(client.connect().await.is_err());
    eventually("a retry after 4008", || {
        accepted.load(Ordering::SeqCst) >= 2
    })
    .await;
    client.disconnect().await.unwrap();
    server.abort();
}
