//! `RelayConfig::max_connections_per_client`: one client (its credentials' subject from one
//! address, or its address without auth) cannot take every connection; its places free
//! however its connections end.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use ksync_core::InMemoryProvider;
use ksync_ws::server::{Relay, RelayActivity, RelayConfig};
use serde_json::json;
use tokio::sync::broadcast;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn capped(per_client: usize) -> RelayConfig {
    {
        let mut relay_config = RelayConfig::default();
        relay_config.max_connections_per_client = per_client;
        relay_config
    }
}

const RW: &[(&str, &str)] = &[("x-api-key", "rw-key")];
const RO: &[(&str, &str)] = &[("x-api-key", "ro-key")];

/// Connects with `headers`, says hello, returns the socket once welcomed.
async fn join_as(url: &str, headers: &[(&str, &str)]) -> Raw {
    let mut ws = raw_connect(url, headers).await.expect("connect");
    send_json(&mut ws, hello()).await;
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}

/// The next connection that ends, as the relay's activity feed reports it (after its places
/// were given back: they are dropped with the connection, before it is reported).
async fn next_disconnect(feed: &mut broadcast::Receiver<RelayActivity>) {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("a disconnect within 10 s")
            .expect("feed open");
        if let RelayActivity::Disconnected(_) = item {
            return;
        }
    }
}

#[tokio::test]
async fn a_client_over_its_cap_gets_429_while_another_client_still_gets_in() {
    let server = start_with(
        capped(2),
        Arc::new(InMemoryProvider::new()),
        Arc::new(TestKeys),
    )
    .await;
    let url = server.url(Some("room"));
    let mut feed = server.relay.activity();
    let mut first = join_as(&url, RW).await;
    let _second = join_as(&url, RW).await;
    // The third of the same key: refused before the upgrade, with the documented body.
    assert_eq!(raw_connect(&url, RW).await.err(), Some(429));
    let answer = raw_refusal(server.addr, "/ws/room", "rw-key").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.contains(r#"{"error":"too many connections for this client (at most 2)"}"#),
        "{answer}"
    );
    assert!(
        !answer.contains("rw-key"),
        "the key is never echoed: {answer}"
    );
    // Another key is another client.
    let _other = join_as(&url, RO).await;
    assert_eq!(server.relay.connections(), 3);
    // Closing one of the first client's connections gives its place back.
    first.close(None).await.expect("close");
    next_disconnect(&mut feed).await;
    let _again = join_as(&url, RW).await;
    assert_eq!(raw_connect(&url, RW).await.err(), Some(429));
    server.stop().await;
}

/// The raw HTTP answer to an upgrade of `path` with the API key `key` (status line, headers
/// and body), for what a client that is not kSync's sees.
async fn raw_refusal(addr: SocketAddr, path: &str, key: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-Api-Key: {key}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Up to the end of the JSON body (the connection is kept alive, so no EOF).
    while !answer.ends_with(b"}") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_browser_over_its_cap_is_refused_in_band_and_nothing_it_sends_is_stored() {
    let server = start_with(
        capped(1),
        Arc::new(InMemoryProvider::new()),
        Arc::new(TestKeys),
    )
    .await;
    let url = server.url(Some("room"));
    let mut writer = join_as(&url, RW).await;
    send_json(
        &mut writer,
        json!({"type":"publish","ref":1,"events":[event("e1", 1)]}),
    )
    .await;
    let ack = recv_json(&mut writer).await;
    assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    // The same key as a browser offers it: upgraded only to be told why, then closed 4429.
    let mut request = url.as_str().into_client_request().expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "ksync.v1, ksync.apikey.rw-key".parse().expect("header"),
    );
    let (mut refused, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgraded for the in-band refusal");
    // What it sends meanwhile is read and discarded.
    send_json(&mut refused, hello()).await;
    send_json(
        &mut refused,
        json!({"type":"publish","ref":1,"events":[event("e2", 2)]}),
    )
    .await;
    let error = recv_json(&mut refused).await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert_eq!(
        error["message"], "too many connections for this client (at most 1)",
        "{error}"
    );
    assert_eq!(recv_close(&mut refused).await.0, 4429);
    // Another client sees only what the first one stored.
    let (mut reader, welcome) = {
        let mut ws = raw_connect(&url, RO).await.expect("connect");
        let mut hello = hello();
        hello["since"] = json!(0);
        send_json(&mut ws, hello).await;
        let welcome = recv_json(&mut ws).await;
        (ws, welcome)
    };
    assert_eq!(welcome["serverVersion"], 1, "{welcome}");
    let events = recv_json(&mut reader).await;
    assert_eq!(events["type"], "events", "{events}");
    assert_eq!(
        events["events"].as_array().map(Vec::len),
        Some(1),
        "{events}"
    );
    assert_eq!(events["events"][0]["event"]["id"], "e1", "{events}");
    server.stop().await;
}

#[tokio::test]
async fn places_free_when_connections_end_by_error_drop_or_timeout() {
    let server = start_with(
        {
            let mut relay_config = capped(1);
            relay_config.handshake_timeout = Duration::from_millis(300);
            relay_config
        },
        Arc::new(InMemoryProvider::new()),
        Arc::new(TestKeys),
    )
    .await;
    let url = server.url(Some("room"));
    let mut feed = server.relay.activity();

    // A protocol error: a binary frame without negotiated compression is closed with 1003.
    let mut a = join_as(&url, RW).await;
    assert_eq!(raw_connect(&url, RW).await.err(), Some(429));
    a.send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send");
    let (code, _) = recv_close(&mut a).await;
    assert_eq!(code, 1003);
    next_disconnect(&mut feed).await;

    // A socket that goes away without a close frame.
    let b = join_as(&url, RW).await;
    assert_eq!(raw_connect(&url, RW).await.err(), Some(429));
    drop(b);
    next_disconnect(&mut feed).await;

    // No `hello` within the handshake timeout: closed with 4002.
    let mut c = raw_connect(&url, RW).await.expect("connect");
    assert_eq!(raw_connect(&url, RW).await.err(), Some(429));
    assert_eq!(recv_close(&mut c).await.0, 4002);
    next_disconnect(&mut feed).await;

    let _d = join_as(&url, RW).await;
    assert_eq!(server.relay.connections(), 1);
    server.stop().await;
}

/// A relay served with the peer's address (as `ksync serve` serves it).
async fn start_with_connect_info(
    config: RelayConfig,
    auth: Arc<dyn ksync_core::Authenticator>,
) -> (SocketAddr, Relay) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let relay = Relay::new(config, Arc::new(InMemoryProvider::new()), auth).expect("relay");
    let app = relay
        .router()
        .into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (addr, relay)
}

/// Connects to `addr` from the local address `from` with `headers` and says hello.
async fn join_from(from: &str, addr: SocketAddr, headers: &[(&str, &str)]) -> Result<Raw, u16> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("from"))
        .expect("bind");
    let tcp = socket.connect(addr).await.expect("connect");
    let mut request = format!("ws://{addr}/ws/room")
        .into_client_request()
        .expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            value.parse().expect("header value"),
        );
    }
    match tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)).await {
        Ok((mut ws, _)) => {
            send_json(&mut ws, hello()).await;
            let welcome = recv_json(&mut ws).await;
            assert_eq!(welcome["type"], "welcome", "{welcome}");
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

#[tokio::test]
async fn without_auth_a_client_is_its_address() {
    let (addr, relay) = start_with_connect_info(capped(2), Arc::new(ksync_core::AllowAll)).await;
    let _a = join_from("127.0.0.1", addr, &[]).await.expect("first");
    let _b = join_from("127.0.0.1", addr, &[]).await.expect("second");
    assert_eq!(join_from("127.0.0.1", addr, &[]).await.err(), Some(429));
    // Another address (the loopback network holds all of 127/8 on Linux) still gets in.
    let _c = join_from("127.0.0.2", addr, &[])
        .await
        .expect("another address");
    assert_eq!(relay.connections(), 3);
    relay.shutdown().await;
}

/// One API key in every copy of an app is not one client: the cap is per key and address,
/// so users of a shared key on other machines still get in while one machine is at its cap.
#[tokio::test]
async fn with_auth_a_client_is_its_subject_from_one_address() {
    let (addr, relay) = start_with_connect_info(capped(2), Arc::new(TestKeys)).await;
    let _a = join_from("127.0.0.1", addr, RW).await.expect("first");
    let _b = join_from("127.0.0.1", addr, RW).await.expect("second");
    assert_eq!(join_from("127.0.0.1", addr, RW).await.err(), Some(429));
    // The same key from another machine, and another key from this one, still get in.
    let _c = join_from("127.0.0.2", addr, RW)
        .await
        .expect("the key from another address");
    let _d = join_from("127.0.0.1", addr, RO).await.expect("another key");
    assert_eq!(relay.connections(), 4);
    relay.shutdown().await;
}

#[tokio::test]
async fn without_auth_nor_the_peer_address_only_the_server_cap_applies() {
    // `common::start` serves without connect info: clients cannot be told apart.
    let server = start({
        let mut relay_config = capped(1);
        relay_config.max_connections = 3;
        relay_config
    })
    .await;
    let url = server.url(None);
    let _a = join(&url, hello()).await;
    let _b = join(&url, hello()).await;
    let _c = join(&url, hello()).await;
    assert_eq!(raw_connect(&url, &[]).await.err(), Some(503));
    server.stop().await;
}

#[test]
fn the_cap_must_be_at_least_one() {
    let error = Relay::new(
        capped(0),
        Arc::new(InMemoryProvider::new()),
        Arc::new(ksync_core::AllowAll),
    )
    .err()
    .map(|e| e.to_string());
    assert_eq!(
        error.as_deref(),
        Some("invalid relay configuration: max_connections_per_client must be at least 1")
    );
}

#[tokio::test]
async fn an_upgrade_refused_after_the_count_gives_its_place_back() {
    // One open room at most: a connection to another room is refused with 503 after its
    // client's place was taken, and must give it back.
    let server = start_with(
        {
            let mut relay_config = capped(1);
            relay_config.max_open_rooms = 1;
            relay_config
        },
        Arc::new(InMemoryProvider::new()),
        Arc::new(TestKeys),
    )
    .await;
    let _holder = join_as(&server.url(Some("open")), RW).await;
    for _ in 0..3 {
        assert_eq!(
            raw_connect(&server.url(Some("other")), RO).await.err(),
            Some(503)
        );
    }
    // Not 429: the refusals left the read-only key its one place.
    let _reader = join_as(&server.url(Some("open")), RO).await;
    assert_eq!(server.relay.connections(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_rust_client_over_its_cap_retries_and_gets_in_once_a_place_frees() {
    use ksync_core::SyncClient;
    use ksync_ws::{WebSocketSyncClient, WsError};

    let server = start_with(
        capped(1),
        Arc::new(InMemoryProvider::new()),
        Arc::new(TestKeys),
    )
    .await;
    let url = server.url(Some("room"));
    let mut feed = server.relay.activity();
    let mut holder = join_as(&url, RW).await;
    let client = WebSocketSyncClient::builder(&url)
        .auth(ksync_core::Auth::api_key("rw-key"))
        .reconnect_delay(Duration::from_millis(5), Duration::from_millis(50))
        .build()
        .expect("client");
    let error = client.connect().await.expect_err("over the cap");
    match WsError::find(&error) {
        Some(
            refused @ WsError::Refused {
                status: 429,
                message,
            },
        ) => {
            // The refusal's body, as the client reports every refused upgrade.
            assert!(
                message.contains("too many connections for this client (at most 1)"),
                "{message}"
            );
            assert!(!refused.is_fatal(), "429 is retried");
        }
        other => panic!("expected a 429 refusal, got {other:?}"),
    }
    holder.close(None).await.expect("close");
    // The holder leaves, then one of the client's retries gets in.
    let mut left = false;
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .expect("activity within 10 s")
            .expect("feed open");
        match item {
            RelayActivity::Disconnected(_) => left = true,
            RelayActivity::Connected(info) if left => {
                assert_eq!(info.subject, "rw");
                break;
            }
            _ => {}
        }
    }
    client.disconnect().await.expect("disconnect");
    server.stop().await;
}
