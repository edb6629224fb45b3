//! Credentials over a connection's life: a connection is closed (4401) when its credentials
//! expire, and the Rust client stops on close codes that reconnecting cannot fix (it neither
//! hammers the server with an expired token nor with a client the server refuses), reports
//! it once, and tries again on an explicit `connect()` (with fresh credentials from
//! `set_auth`).

#![allow(clippy::unwrap_used)] // tests may unwrap

use crate::common;

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

/// A raw connection to `url` whose socket takes in little at a time (a small receive buffer),
/// so that the relay's writes wait for this reader rather than for the kernel's buffers.
async fn slow_raw_connect(url: &str, bearer: &str) -> Raw {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bearer}").parse().unwrap());
    let host = request.uri().authority().unwrap().as_str().to_owned();
    let addr: std::net::SocketAddr = host.parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap()
        .0
}

/// Credentials that expire during a long catch-up end it there with 4401, as they end a live
/// connection: the expiry used to be watched only from the end of the catch-up, so a slow
/// reader was sent the whole room past its credentials' end (4401 came after it).
#[tokio::test]
async fn credentials_that_expire_during_a_catch_up_end_it_with_4401() {
    use ksync_core::{Event, LogName, Name, StorageProvider};

    let auth = Expiring::new(Duration::from_millis(500));
    let provider = Arc::new(InMemoryProvider::new());
    // About 6 MiB: at a frame (64 KiB) per 30 ms, the whole catch-up takes about 3 s.
    let log = provider
        .open(&LogName::Room(Name::new("big").unwrap()))
        .unwrap();
    let events: Vec<Event> = (0..1500)
        .map(|n| Event::new(format!("e{n}"), "t", json!("x".repeat(4096)), 1))
        .collect();
    let room_bytes: usize = events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap().len())
        .sum();
    log.append(events).await.unwrap();
    drop(log);
    // Small socket buffers on the relay's side too (accepted sockets inherit the listener's):
    // the relay's writes then follow the reader instead of filling megabytes of kernel buffer
    // before the expiry.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(16 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let server = serve_on(
        socket.listen(64).unwrap(),
        {
            let mut relay_config = RelayConfig::default();
            relay_config.max_message_size = 64 * 1024;
            relay_config
        },
        provider,
        auth,
    );
    // A catch-up from a cursor, and a state-based start (snapshot pages): each token's
    // lifetime starts at its upgrade.
    let starts = [
        (
            "short-1",
            json!({"type": "hello", "protocol": 1, "since": 0}),
        ),
        (
            "short-2",
            json!({"type": "hello", "protocol": 1, "state": true}),
        ),
    ];
    for (token, hello) in starts {
        let mut ws = slow_raw_connect(&server.url(Some("big")), token).await;
        send_json(&mut ws, hello.clone()).await;
        assert_eq!(recv_json(&mut ws).await["type"], "welcome");
        let mut received = 0;
        let close = loop {
            let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("progress")
                .expect("open")
                .expect("no error");
            match message {
                Message::Text(t) => received += t.len(),
                Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        };
        assert_eq!(close, Some(4401), "{hello}");
        assert!(
            received < room_bytes / 3,
            "{hello}: {received} bytes of a {room_bytes}-byte room sent before the close"
        );
    }
    server.stop().await;
}

/// Credentials that expire before the `hello` end the connection then (4401), not at the
/// handshake timeout.
#[tokio::test]
async fn credentials_that_expire_before_the_hello_end_the_connection_with_4401() {
    let auth = Expiring::new(Duration::from_millis(300));
    let server = start_with(
        RelayConfig::default(),
        Arc::new(InMemoryProvider::new()),
        auth,
    )
    .await;
    let mut ws = raw_connect(
        &server.url(Some("a")),
        &[("authorization", "Bearer short-1")],
    )
    .await
    .unwrap();
    // The handshake timeout (10 s) is far off; recv_close waits 5 s at most.
    assert_eq!(
        recv_close(&mut ws).await,
        (4401, "credentials expired".to_owned())
    );
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
