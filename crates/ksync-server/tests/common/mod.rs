//! Shared by the ksync-server integration tests: the composed server's in-memory loopback
//! configuration and a raw WebSocket client's JSON messages.
#![allow(dead_code)] // each test binary uses a subset

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ksync_server::{AuthConfig, ServerConfig};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An in-memory server on 127.0.0.1:0 with `auth`.
pub fn config(auth: AuthConfig) -> ServerConfig {
    {
        let mut server_config = ServerConfig::default();
        server_config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        server_config.in_memory = true;
        server_config.auth = auth;
        server_config
    }
}

pub async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::text(message.to_string()))
        .await
        .expect("send");
}

/// The next JSON message (pings and pongs skipped); panics after 10 s.
pub async fn recv(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("stream open")
            .expect("frame");
        match frame {
            Message::Text(text) => return serde_json::from_str(&text).expect("json"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The close frame's code, skipping data frames; panics after 10 s.
pub async fn close_code(ws: &mut Ws) -> u16 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("closed within 10 s");
        match frame {
            Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("socket error before the close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// A valid event `id` (version 1) as JSON.
pub fn event(id: &str) -> Value {
    json!({"id": id, "type": "note", "data": {"text": id}, "timestamp": 1_732_615_200_000u64, "version": 1})
}

/// The server's `/metrics` text.
pub async fn metrics(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}
