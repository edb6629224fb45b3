//! Shared test helpers: an in-process relay on 127.0.0.1:0, a raw protocol client, and small
//! authenticators implementing the core trait.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ksync_core::{AuthError, Authenticator, Credentials, Grant, InMemoryProvider, StorageProvider};
use ksync_ws::server::{Relay, RelayConfig};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A relay served by axum on a real socket.
pub struct Server {
    pub addr: SocketAddr,
    pub relay: Relay,
    pub task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn url(&self, room: Option<&str>) -> String {
        match room {
            Some(r) => format!("ws://{}/ws/{r}", self.addr),
            None => format!("ws://{}/ws", self.addr),
        }
    }

    /// Stops serving: the relay drains, then the listener goes away.
    pub async fn stop(self) {
        self.relay.shutdown().await;
        self.task.abort();
        let _ = self.task.await;
    }
}

pub async fn start(config: RelayConfig) -> Server {
    start_with(
        config,
        Arc::new(InMemoryProvider::new()),
        Arc::new(ksync_core::AllowAll),
    )
    .await
}

pub async fn start_with(
    config: RelayConfig,
    provider: Arc<dyn StorageProvider>,
    auth: Arc<dyn Authenticator>,
) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    serve_on(listener, config, provider, auth)
}

pub fn serve_on(
    listener: tokio::net::TcpListener,
    config: RelayConfig,
    provider: Arc<dyn StorageProvider>,
    auth: Arc<dyn Authenticator>,
) -> Server {
    let addr = listener.local_addr().expect("addr");
    let relay = Relay::new(config, provider, auth).expect("relay");
    let router = relay.router();
    let task = tokio::spawn(async move {
        axum::serve(ksync_ws::server::nodelay(listener), router)
            .await
            .expect("serve");
    });
    Server { addr, relay, task }
}

/// API keys: "rw-key" may read and write every room, "ro-key" may only read, "room-a-key" may
/// read and write room "a" only. Bearer tokens are refused.
pub struct TestKeys;

impl Authenticator for TestKeys {
    fn authenticate(&self, credentials: &Credentials) -> Result<Grant, AuthError> {
        let key = match (&credentials.api_key, &credentials.bearer) {
            (Some(k), _) => k.as_str(),
            (None, Some(_)) => return Err(AuthError::Invalid("bearer tokens not accepted".into())),
            (None, None) => return Err(AuthError::Missing),
        };
        let grant = |subject: &str, rooms: Option<Vec<String>>, write: bool| Grant {
            subject: subject.into(),
            rooms,
            repos: None,
            read: true,
            write,
            expires_at: None,
        };
        match key {
            "rw-key" => Ok(grant("rw", None, true)),
            "ro-key" => Ok(grant("ro", None, false)),
            "room-a-key" => Ok(grant("room-a", Some(vec!["a".into()]), true)),
            _ => Err(AuthError::Invalid("unknown key".into())),
        }
    }
}

/// Accepts one bearer token, "good-token".
pub struct TestTokens;

impl Authenticator for TestTokens {
    fn authenticate(&self, credentials: &Credentials) -> Result<Grant, AuthError> {
        match credentials.bearer.as_deref() {
            Some("good-token") => Ok(Grant::anonymous()),
            Some(_) => Err(AuthError::Invalid("bad token".into())),
            None => Err(AuthError::Missing),
        }
    }
}

pub type Raw = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a raw WebSocket with extra headers; returns the socket or the HTTP status of the
/// refusal.
pub async fn raw_connect(url: &str, headers: &[(&str, &str)]) -> Result<Raw, u16> {
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

pub async fn send_json(ws: &mut Raw, value: Value) {
    ws.send(Message::text(value.to_string()))
        .await
        .expect("send");
}

/// The next JSON message (skipping pings), or panics after 5 s.
pub async fn recv_json(ws: &mut Raw) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("stream open")
            .expect("no error");
        match message {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json"),
            Message::Binary(b) => {
                let json = ksync_ws::protocol::inflate(&b, 1 << 24).expect("inflate");
                return serde_json::from_slice(&json).expect("json");
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The close code the server ends with (skipping data), or panics after 5 s.
pub async fn recv_close(ws: &mut Raw) -> (u16, String) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a close within 5 s");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("socket error before close: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// Connects, says hello, returns the socket and the welcome.
pub async fn join(url: &str, hello: Value) -> (Raw, Value) {
    let mut ws = raw_connect(url, &[]).await.expect("connect");
    send_json(&mut ws, hello).await;
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

pub fn event(id: &str, n: u64) -> Value {
    json!({"id": id, "type": "test", "data": {"n": n}, "timestamp": 1_700_000_000_000u64 + n, "version": 1})
}

pub fn hello() -> Value {
    json!({"type": "hello", "protocol": ksync_core::PROTOCOL_VERSION})
}

/// Records every notification of a client, in order, for assertions on what a user sees.
#[derive(Clone, Default)]
pub struct Recorder(Arc<std::sync::Mutex<Vec<ksync_core::Notification>>>);

impl Recorder {
    pub fn attach(client: &impl ksync_core::SyncClient) -> Self {
        let rec = Recorder::default();
        for kind in [
            "connected",
            "disconnected",
            "reconnecting",
            "event",
            "sync",
            "error",
            "metrics",
            "status",
            "conflict",
        ] {
            let sink = rec.0.clone();
            // The subscription stays registered for the client's life.
            let _sub = client
                .notifier()
                .on(kind, move |n| sink.lock().expect("lock").push(n.clone()))
                .expect("known kind");
        }
        rec
    }

    pub fn all(&self) -> Vec<ksync_core::Notification> {
        self.0.lock().expect("lock").clone()
    }

    pub fn count(&self, f: impl Fn(&ksync_core::Notification) -> bool) -> usize {
        self.all().iter().filter(|n| f(n)).count()
    }

    pub fn events(&self) -> Vec<ksync_core::Event> {
        self.all()
            .into_iter()
            .filter_map(|n| match n {
                ksync_core::Notification::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    pub fn event_ids(&self) -> Vec<String> {
        self.events().into_iter().map(|e| e.id).collect()
    }

    pub fn statuses(&self) -> Vec<ksync_core::Status> {
        self.all()
            .into_iter()
            .filter_map(|n| match n {
                ksync_core::Notification::Status(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The `attempt` of each `reconnecting`, in order.
    pub fn reconnect_attempts(&self) -> Vec<u32> {
        self.all()
            .into_iter()
            .filter_map(|n| match n {
                ksync_core::Notification::Reconnecting { attempt } => Some(attempt),
                _ => None,
            })
            .collect()
    }
}

/// Waits until `f` holds, polling; panics after 10 s.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An address nothing listens on (bound, then dropped): connections to it are refused.
pub async fn closed_port() -> SocketAddr {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// A subscriber as small as a socket (a client's buffers would blur the relay's memory in a
/// test's process) that sees the frames of each message: the HTTP upgrade, a `hello` and the
/// `welcome` by hand.
pub async fn bare_join(url: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rest = url.strip_prefix("ws://").expect("ws url");
    let (host, path) = rest.split_at(rest.find('/').expect("path"));
    let mut tcp = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("response"));
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // A masked text frame (the zero mask leaves the payload as is).
    let hello = hello().to_string();
    let mut frame = vec![0x81, 0x80 | u8::try_from(hello.len()).expect("short hello")];
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(hello.as_bytes());
    tcp.write_all(&frame).await.expect("hello");
    let welcome = bare_read_message(&mut tcp).await;
    assert_eq!(welcome[0].opcode, 1, "a text welcome");
    tcp
}

/// One frame of a data message as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BareFrame {
    pub opcode: u8,
    pub fin: bool,
    pub length: usize,
}

/// Reads one data message (all its frames, skipping control frames; the payload is dropped):
/// its frames.
pub async fn bare_read_message(tcp: &mut tokio::net::TcpStream) -> Vec<BareFrame> {
    use tokio::io::AsyncReadExt;

    let mut buf = [0u8; 4096];
    let mut frames = Vec::new();
    loop {
        let mut head = [0u8; 2];
        tcp.read_exact(&mut head).await.expect("frame");
        let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
        let mut left = match head[1] & 0x7f {
            126 => usize::from(tcp.read_u16().await.expect("length")),
            127 => usize::try_from(tcp.read_u64().await.expect("length")).expect("length"),
            n => usize::from(n),
        };
        if opcode < 8 {
            frames.push(BareFrame {
                opcode,
                fin,
                length: left,
            });
        }
        while left > 0 {
            let n = left.min(buf.len());
            tcp.read_exact(&mut buf[..n]).await.expect("payload");
            left -= n;
        }
        if opcode < 8 && fin {
            return frames;
        }
    }
}
