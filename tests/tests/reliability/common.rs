//! Shared pieces: a raw protocol WebSocket client, in-process servers, event builders.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ksync_core::{AllowAll, InMemoryProvider};
use ksync_server::{RunningServer, Server, ServerConfig};
use ksync_ws::server::{Relay, RelayConfig};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for any single answer before failing.
pub const ANSWER: Duration = Duration::from_secs(10);

/// One event in the spec's JSON shape.
pub fn event(id: &str, n: u64) -> Value {
    json!({"id": id, "type": "test", "data": {"n": n}, "timestamp": 1_700_000_000_000u64 + n, "version": 1})
}

/// `hello` resuming after `since` (None: live only).
pub fn hello(since: Option<u64>) -> Value {
    match since {
        Some(s) => json!({"type": "hello", "protocol": 1, "since": s}),
        None => json!({"type": "hello", "protocol": 1}),
    }
}

/// Opens a WebSocket to `url` with optional extra headers; returns the socket or the HTTP
/// status of a refused upgrade.
pub async fn ws_connect(url: &str, headers: &[(&str, String)]) -> Result<Ws, u16> {
    let mut request = url.into_client_request().expect("request");
    for (k, v) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    // With TCP_NODELAY, as kSync's own clients connect.
    let connect = tokio_tungstenite::connect_async_with_config(request, None, true);
    match tokio::time::timeout(ANSWER, connect).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => Err(resp.status().as_u16()),
        Ok(Err(e)) => panic!("connect {url}: {e}"),
        Err(_) => panic!("connect {url}: timed out"),
    }
}

/// Connects, sends `hello`, returns the socket and the `welcome`.
pub async fn join(url: &str, hello: Value) -> (Ws, Value) {
    let mut ws = ws_connect(url, &[]).await.expect("upgrade refused");
    send_json(&mut ws, hello).await;
    let welcome = recv_json(&mut ws).await.expect("welcome");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

pub async fn send_json(ws: &mut Ws, value: Value) {
    ws.send(Message::text(value.to_string()))
        .await
        .expect("send");
}

/// The next JSON message (pings and pongs skipped); `None` when the socket closed.
pub async fn recv_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(ANSWER, ws.next())
            .await
            .expect("no answer in time")?;
        match msg {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("json")),
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(other) => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Every `(seq, id)` of a room, read with `since: 0` up to the `welcome`'s serverVersion.
pub async fn read_room(url: &str) -> Vec<(u64, String)> {
    let (mut ws, welcome) = join(url, hello(Some(0))).await;
    let last = welcome["serverVersion"].as_u64().expect("serverVersion");
    let mut out = Vec::new();
    while out.last().map_or(0, |(s, _)| *s) < last {
        let msg = recv_json(&mut ws).await.expect("catch-up ended early");
        if msg["type"] != "events" {
            continue;
        }
        for stored in msg["events"].as_array().expect("events") {
            let seq = stored["seq"].as_u64().expect("seq");
            let id = stored["event"]["id"].as_str().expect("id").to_owned();
            out.push((seq, id));
        }
    }
    let _ = ws.close(None).await;
    out
}

/// An in-process server on 127.0.0.1:0 with `config` (bind is overridden).
pub async fn start_server(mut config: ServerConfig) -> RunningServer {
    config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    Server::bind(config).await.expect("server")
}

/// A bare relay (in memory, no auth) on 127.0.0.1:0, served like `ksync-server` serves it:
/// with TCP_NODELAY (without it, deliveries wait on delayed ACKs).
pub async fn start_relay(config: RelayConfig) -> (SocketAddr, Relay) {
    let relay = Relay::new(
        config,
        Arc::new(InMemoryProvider::new()),
        Arc::new(AllowAll),
    )
    .expect("relay");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = relay.router();
    tokio::spawn(async move {
        axum::serve(ksync_ws::server::nodelay(listener), router)
            .await
            .expect("serve")
    });
    (addr, relay)
}
