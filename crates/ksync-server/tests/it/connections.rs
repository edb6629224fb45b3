//! The HTTP accept loop's bounds: connections that send no request (or half of one, or go
//! idle between requests) are closed after `request_header_timeout`, and at most
//! `max_http_connections` plain HTTP connections are open at once, without counting
//! WebSockets once upgraded.

use crate::common;

use std::time::Duration;

use common::*;
use ksync_server::{AuthConfig, Limits, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn with_limits(limits: Limits) -> ServerConfig {
    let mut server_config = config(AuthConfig::default());
    server_config.limits = limits;
    server_config
}

/// The default limits with `set` applied (`Limits` is `#[non_exhaustive]`: no struct literal).
fn limits(set: impl FnOnce(&mut Limits)) -> Limits {
    let mut limits = Limits::default();
    set(&mut limits);
    limits
}

/// Reads until the server closes the connection; panics if it is still open after `within`.
/// Returns what was read.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return read,
            Ok(Ok(n)) => read.extend_from_slice(&buffer[..n]),
            Err(_) => panic!(
                "still open after {within:?}; read {:?}",
                String::from_utf8_lossy(&read)
            ),
        }
    }
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Reads one response to `GET /health` (its head and body) off a keep-alive connection.
async fn read_health_response(stream: &mut TcpStream) -> String {
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert!(n > 0, "closed before the response: {read:?}");
        read.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&read).into_owned();
        // /health answers a small JSON object.
        if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
            return text;
        }
    }
}

#[tokio::test]
async fn silent_half_sent_and_idle_connections_are_closed_after_the_header_timeout() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.request_header_timeout = Duration::from_secs(1);
    })))
    .await
    .expect("server");
    let addr = running.local_addr();

    // Connects and sends nothing.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    // Sends part of a request's headers and stops.
    let mut half = TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"GET /health HTTP/1.1\r\nHost: loc")
        .await
        .expect("write");
    // One whole request, answered, then nothing more on the keep-alive connection.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(HEALTH).await.expect("write");
    let response = read_health_response(&mut idle).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // The timeout is 1 s; the margin is for a loaded machine.
    closed_within(&mut silent, Duration::from_secs(10)).await;
    closed_within(&mut half, Duration::from_secs(10)).await;
    let after = closed_within(&mut idle, Duration::from_secs(10)).await;
    assert!(after.is_empty() || String::from_utf8_lossy(&after).starts_with("HTTP/1.1 408"));

    // The server still answers new clients.
    let health = reqwest::get(format!("http://{addr}/health"))
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn past_max_http_connections_new_clients_wait_until_one_closes() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_http_connections = 2;
    })))
    .await
    .expect("server");
    let addr = running.local_addr();

    let mut first = TcpStream::connect(addr).await.expect("connect");
    let second = TcpStream::connect(addr).await.expect("connect");
    // The first two are served.
    first.write_all(HEALTH).await.expect("write");
    assert!(
        read_health_response(&mut first)
            .await
            .starts_with("HTTP/1.1 200")
    );

    // A third is accepted by the kernel (the backlog), not by the server: its request waits.
    let mut third = TcpStream::connect(addr).await.expect("connect");
    third.write_all(HEALTH).await.expect("write");
    let mut buffer = [0u8; 256];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buffer)).await;
    assert!(
        early.is_err(),
        "the third connection was served while two were open: {early:?}"
    );

    // One closes: the third is taken and answered.
    drop(second);
    assert!(
        read_health_response(&mut third)
            .await
            .starts_with("HTTP/1.1 200")
    );
    drop(first);
    running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn websockets_leave_the_http_connection_count_once_upgraded() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_http_connections = 1;
    })))
    .await
    .expect("server");
    let url = format!("ws://{}/ws/room", running.local_addr());

    // Three WebSockets at once through a cap of one HTTP connection, each joined.
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        .expect("upgraded within 10 s")
        .expect("connect");
        send(&mut ws, serde_json::json!({"type": "hello", "protocol": 1})).await;
        assert_eq!(recv(&mut ws).await["type"], "welcome");
        sockets.push(ws);
    }
    assert_eq!(running.connections(), 3);
    // And plain HTTP still gets its one connection.
    let health = reqwest::get(format!("http://{}/health", running.local_addr()))
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    drop(sockets);
    running.shutdown().await.expect("shutdown");
}

/// A request timeout past a day is refused at start, naming it: hyper adds the header
/// timeout to an `Instant`, and `Duration::MAX` made every connection's task panic (the
/// server listened and answered nothing). So is a shutdown timeout past a day (the shutdown
/// adds it to an `Instant` too).
#[tokio::test]
async fn timeouts_past_a_day_are_refused_at_start() {
    let past_a_day = ksync_core::MAX_CONFIG_DURATION + Duration::from_secs(1);
    for (field, limits) in [
        (
            "request_header_timeout",
            limits(|limits| {
                limits.request_header_timeout = Duration::MAX;
            }),
        ),
        (
            "request_body_timeout",
            limits(|limits| {
                limits.request_body_timeout = past_a_day;
            }),
        ),
        (
            "shutdown_timeout",
            limits(|limits| {
                limits.shutdown_timeout = Duration::MAX;
            }),
        ),
    ] {
        let refused = Server::bind(with_limits(limits)).await;
        match refused {
            Err(ksync_server::ServerError::Config(message)) => {
                assert!(message.contains(field), "{message}");
            }
            Err(other) => panic!("{field}: {other}"),
            Ok(_) => panic!("{field}: started"),
        }
    }
    // A day is taken, and the server answers.
    let running = Server::bind(with_limits(limits(|limits| {
        limits.request_header_timeout = ksync_core::MAX_CONFIG_DURATION;
    })))
    .await
    .expect("server");
    let mut stream = TcpStream::connect(running.local_addr())
        .await
        .expect("connect");
    stream.write_all(HEALTH).await.expect("write");
    assert!(
        read_health_response(&mut stream)
            .await
            .starts_with("HTTP/1.1 200")
    );
}

/// Opens a WebSocket to `url` from the local address `from` with `headers`, says hello;
/// returns the socket once welcomed, or the HTTP status and body of the refusal.
async fn join_from(
    from: &str,
    url: &str,
    headers: &[(&'static str, String)],
) -> Result<Ws, (u16, serde_json::Value)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = url.into_client_request().expect("request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, value.parse().expect("header value"));
    }
    let host = request.uri().authority().expect("authority").to_string();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("from"))
        .expect("bind");
    let tcp = socket
        .connect(host.parse().expect("addr"))
        .await
        .expect("connect");
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((mut ws, _)) => {
            send(&mut ws, serde_json::json!({"type": "hello", "protocol": 1})).await;
            assert_eq!(recv(&mut ws).await["type"], "welcome");
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                .expect("JSON body"),
        )),
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

fn over_the_cap(cap: usize) -> (u16, serde_json::Value) {
    (
        429,
        serde_json::json!({"error": format!("too many connections for this client (at most {cap})")}),
    )
}

/// With JWTs, a client is the token's `sub`: a second token of the same subject counts with
/// the first, a token of another subject still gets in.
#[tokio::test]
async fn max_connections_per_client_counts_a_jwt_subject() {
    const SECRET: &str = "per-client-test-secret-0123456789abcdef";
    let token = |sub: &str| {
        let exp = jsonwebtoken::get_current_timestamp() + 300;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": sub, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .expect("token")
    };
    let running = Server::bind({
        let mut server_config = config({
            let mut auth_config = AuthConfig::default();
            auth_config.jwt_keys = vec![ksync_server::JwtKey::hs256(SECRET)];
            auth_config
        });
        server_config.limits = limits(|limits| {
            limits.max_connections_per_client = 2;
        });
        server_config
    })
    .await
    .expect("server");
    let url = format!("ws://{}/ws/room", running.local_addr());
    let bearer = |sub: &str| [("authorization", format!("Bearer {}", token(sub)))];
    // Two connections with alice's token, then a third.
    let _a1 = join_from("127.0.0.1", &url, &bearer("alice"))
        .await
        .expect("alice's first");
    let _a2 = join_from("127.0.0.1", &url, &bearer("alice"))
        .await
        .expect("alice's second");
    assert_eq!(
        join_from("127.0.0.1", &url, &bearer("alice")).await.err(),
        Some(over_the_cap(2))
    );
    let _b = join_from("127.0.0.1", &url, &bearer("bob"))
        .await
        .expect("bob, from the same address");
    assert_eq!(running.connections(), 3);
    running.shutdown().await.expect("shutdown");
}

/// Without auth, a client is its IP address (the server passes the peer's address to the
/// relay).
#[tokio::test]
async fn max_connections_per_client_counts_an_address_without_auth() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_connections_per_client = 1;
    })))
    .await
    .expect("server");
    let url = format!("ws://{}/ws/room", running.local_addr());
    let _first = join_from("127.0.0.1", &url, &[]).await.expect("first");
    assert_eq!(
        join_from("127.0.0.1", &url, &[]).await.err(),
        Some(over_the_cap(1))
    );
    // Linux routes all of 127/8 to the loopback interface.
    let _other = join_from("127.0.0.2", &url, &[])
        .await
        .expect("another address");
    assert_eq!(running.connections(), 2);
    // Operators see the refusal counted.
    let metrics = metrics(running.local_addr()).await;
    assert!(
        metrics.contains("\nksync_ws_client_cap_refusals_total 1\n"),
        "{metrics}"
    );
    running.shutdown().await.expect("shutdown");
}

/// A push from the local address `from` as raw HTTP/1.1 with `Expect: 100-continue`: returns
/// the connection once the server asked for the body (the push holds its place then), and
/// the body to send, or the refusal's status line and body.
async fn push_from(
    from: &str,
    addr: std::net::SocketAddr,
    id: &str,
) -> Result<(TcpStream, String), String> {
    let body = serde_json::json!({"baseVersion": 0, "events": [
        {"id": id, "type": "t", "data": {}, "timestamp": 1, "version": 1}]});
    post_held(from, addr, "/git/r/branches/main/events", body).await
}

/// A POST of `body` to `path` from the local address `from`, as [`push_from`].
async fn post_held(
    from: &str,
    addr: std::net::SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> Result<(TcpStream, String), String> {
    let body = body.to_string();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("from"))
        .expect("bind");
    let mut tcp = socket.connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&read).into_owned();
        if text.contains("100 Continue") {
            return Ok((tcp, body));
        }
        if text.starts_with("HTTP/1.1 4") && text.ends_with('}') {
            return Err(text);
        }
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buffer))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(n > 0, "closed early: {text}");
        read.extend_from_slice(&buffer[..n]);
    }
}

/// `max_merges_per_client` through the composed server: without auth a client is its
/// address; its second branch creation or merge in flight is refused, another address's
/// goes on.
#[tokio::test]
async fn max_merges_per_client_counts_an_address_without_auth() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_merges_per_client = 1;
    })))
    .await
    .expect("server");
    let addr = running.local_addr();
    let created = reqwest::Client::new()
        .put(format!("http://{addr}/git/r"))
        .send()
        .await
        .expect("create");
    assert!(created.status().is_success(), "{}", created.status());
    let fork = |name: &str| serde_json::json!({"name": name});
    let (mut held, held_body) = post_held("127.0.0.1", addr, "/git/r/branches", fork("a"))
        .await
        .expect("the first branch creation");
    for (path, body) in [
        ("/git/r/branches", fork("b")),
        (
            "/git/r/merge",
            serde_json::json!({"into": "main", "from": "a"}),
        ),
    ] {
        let refused = post_held("127.0.0.1", addr, path, body)
            .await
            .expect_err("the address's second one is refused");
        assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
        assert!(refused.contains(r#""code":"too_many_merges""#), "{refused}");
    }
    let (other, _) = post_held("127.0.0.2", addr, "/git/r/branches", fork("c"))
        .await
        .expect("another address");
    // The held one finishes: the address's place comes back.
    held.write_all(held_body.as_bytes()).await.expect("write");
    let answer = read_json_answer(&mut held).await;
    assert!(answer.starts_with("HTTP/1.1 2"), "{answer}");
    let (mut next, body) = post_held("127.0.0.1", addr, "/git/r/branches", fork("d"))
        .await
        .expect("the address's place came back");
    next.write_all(body.as_bytes()).await.expect("write");
    let answer = read_json_answer(&mut next).await;
    assert!(answer.starts_with("HTTP/1.1 2"), "{answer}");
    drop((held, other));
    running.shutdown().await.expect("shutdown");
}

/// Reads one answer with a JSON object body (after a `100 Continue`, if any).
async fn read_json_answer(stream: &mut TcpStream) -> String {
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(n > 0, "closed before the answer: {read:?}");
        read.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&read).into_owned();
        let text = text.trim_start_matches("HTTP/1.1 100 Continue\r\n\r\n");
        if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
            return text.to_owned();
        }
    }
}

/// `max_pushes_per_client` through the composed server: without auth a client is its
/// address, for repository pushes as for WebSockets.
#[tokio::test]
async fn max_pushes_per_client_counts_an_address_without_auth() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_pushes_per_client = 1;
    })))
    .await
    .expect("server");
    let addr = running.local_addr();
    let created = reqwest::Client::new()
        .put(format!("http://{addr}/git/r"))
        .send()
        .await
        .expect("create");
    assert!(created.status().is_success(), "{}", created.status());
    let (mut held, body) = push_from("127.0.0.1", addr, "held")
        .await
        .expect("the first push");
    let refused = push_from("127.0.0.1", addr, "refused")
        .await
        .expect_err("the second push of the address is refused");
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains(r#""code":"too_many_pushes""#), "{refused}");
    // Another address pushes meanwhile (it is held too, then let go).
    let (other, _) = push_from("127.0.0.2", addr, "other")
        .await
        .expect("another address");
    drop(other);
    held.write_all(body.as_bytes()).await.expect("body");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200") {
        let n = tokio::time::timeout(Duration::from_secs(10), held.read(&mut buffer))
            .await
            .expect("answered within 10 s")
            .expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buffer[..n]);
    }
    running.shutdown().await.expect("shutdown");
}

/// A cap of 0 rooms or repositories kept would refuse every new one: refused at start,
/// naming it (`ksync serve` refuses it as a usage error before).
#[tokio::test]
async fn zero_stored_rooms_or_repos_caps_are_refused_at_start() {
    for (field, limits) in [
        (
            "max_rooms",
            limits(|limits| {
                limits.max_rooms = 0;
            }),
        ),
        (
            "max_repos",
            limits(|limits| {
                limits.max_repos = 0;
            }),
        ),
    ] {
        match Server::bind(with_limits(limits)).await {
            Err(ksync_server::ServerError::Config(message)) => {
                assert!(message.contains(field), "{message}");
            }
            Err(other) => panic!("{field}: {other}"),
            Ok(_) => panic!("{field}: started"),
        }
    }
}

/// A client that asks for a large pull and stops reading its answer: past
/// `response_write_timeout` without a byte taken the connection is closed, freeing its slot
/// and the response's memory (before, both were held for good: with every slot taken so, the
/// server stopped accepting until restarted). A request on another connection is answered
/// meanwhile.
#[tokio::test]
async fn a_client_that_stops_reading_a_response_is_closed_after_the_write_timeout() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_http_connections = 2;
        limits.response_write_timeout = Duration::from_millis(300);
    })))
    .await
    .expect("server");
    let addr = running.local_addr();
    let http = reqwest::Client::new();
    let created = http
        .put(format!("http://{addr}/git/r"))
        .send()
        .await
        .expect("create");
    assert!(created.status().is_success(), "{}", created.status());
    // 7 MiB of events: more than a 4 KiB receive window and the kernel's largest send buffer
    // (4 MiB by default on Linux) take, so the server itself holds the rest.
    let big = "x".repeat(512 * 1024);
    let events: Vec<_> = (0..14)
        .map(|i| {
            serde_json::json!({"id": format!("e{i}"), "type": "t", "data": big,
            "timestamp": 1, "version": 1})
        })
        .collect();
    let pushed = http
        .post(format!("http://{addr}/git/r/branches/main/events"))
        .json(&serde_json::json!({"baseVersion": 0, "events": events}))
        .send()
        .await
        .expect("push");
    assert!(pushed.status().is_success(), "{}", pushed.status());
    drop(http);

    // Asks for all of it (no gzip) and reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let mut stalled = socket.connect(addr).await.expect("connect");
    stalled
        .write_all(b"GET /git/r/branches/main/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");

    // Meanwhile a well-behaved client is served on the other slot.
    let mut other = TcpStream::connect(addr).await.expect("connect");
    other.write_all(HEALTH).await.expect("write");
    assert!(
        read_health_response(&mut other)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Both slots are taken: a third client is served once the stalled one is closed.
    let mut third = TcpStream::connect(addr).await.expect("connect");
    third.write_all(HEALTH).await.expect("write");
    assert!(
        read_health_response(&mut third)
            .await
            .starts_with("HTTP/1.1 200"),
        "the third client was not served: the stalled reader still holds its slot"
    );
    // What the stalled client gets is cut short: less than the response's length.
    let read = closed_within(&mut stalled, Duration::from_secs(10)).await;
    assert!(read.starts_with(b"HTTP/1.1 200"));
    assert!(read.len() < 14 * 512 * 1024, "read {} bytes", read.len());
    drop(other);
    running.shutdown().await.expect("shutdown");
}

/// A connection to `addr` from the loopback address `from` (Linux routes all of 127/8 to
/// the loopback interface, so a second client address needs no setup).
async fn connect_from(from: std::net::Ipv4Addr, addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from((from, 0)))
        .expect("bind the client address");
    socket.connect(addr).await.expect("connect")
}

/// One address that opens connections and sends half a request head on each (a slowloris)
/// cannot hold every HTTP slot: past `max_pending_connections_per_ip` waiting connections
/// its oldest are closed, and a client from another address is served long before the
/// header timeout. Before, the 16 slots stayed taken for the whole header timeout (60 s
/// here) and the other client waited in the listen backlog.
#[tokio::test]
async fn one_address_waiting_on_many_connections_cannot_hold_every_slot() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_http_connections = 16;
        limits.max_pending_connections_per_ip = 4;
        limits.request_header_timeout = Duration::from_secs(60);
    })))
    .await
    .expect("server");
    let addr = running.local_addr();
    let slow = std::net::Ipv4Addr::new(127, 0, 0, 1);
    let mut held = Vec::new();
    for _ in 0..24 {
        let mut stream = connect_from(slow, addr).await;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: loc")
            .await
            .expect("write");
        held.push(stream);
    }
    let mut other = connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), addr).await;
    other.write_all(HEALTH).await.expect("write");
    let response = read_health_response(&mut other).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // The 20 that waited longest were closed (the kernel's backlog hands them over in order
    // of arrival, all before the other client's); the 4 newest are still there and are
    // served once they finish their head.
    for stream in &mut held[..20] {
        closed_within(stream, Duration::from_secs(10)).await;
    }
    for stream in &mut held[20..] {
        stream.write_all(b"alhost\r\n\r\n").await.expect("write");
        let response = read_health_response(stream).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    running.shutdown().await.expect("shutdown");
}

/// One address that keeps opening connections with half a request head each cannot hold
/// every HTTP slot with the ones closed for its cap either: those keep their slot for a
/// moment (a head may be on its way) only while a slot is free, and the client of another
/// address is accepted and served at once. Before, each kept its slot a whole second: 150
/// opened at once and then ~200 a second held all 16 slots, the accept loop took ~12 a
/// second off the listen backlog, and the other client, behind them, waited ~10 s.
#[tokio::test]
async fn one_address_opening_connections_all_the_time_cannot_hold_every_slot() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_http_connections = 16;
        limits.max_pending_connections_per_ip = 4;
        limits.request_header_timeout = Duration::from_secs(60);
    })))
    .await
    .expect("server");
    let addr = running.local_addr();
    let slow = std::net::Ipv4Addr::new(127, 0, 0, 1);
    let half_sent = move || async move {
        let mut stream = connect_from(slow, addr).await;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: loc")
            .await
            .expect("write");
        stream
    };
    let mut held = Vec::new();
    for _ in 0..150 {
        held.push(half_sent().await);
    }
    // And on, ~200 a second, while the other client is served.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let opener = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return held,
                () = tokio::time::sleep(Duration::from_millis(5)) => held.push(half_sent().await),
            }
        }
    });
    let mut other = connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), addr).await;
    other.write_all(HEALTH).await.expect("write");
    let response = tokio::time::timeout(Duration::from_secs(5), read_health_response(&mut other))
        .await
        .expect("the other address is served within 5 s");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let _ = stop.send(());
    drop(opener.await.expect("opener"));
    running.shutdown().await.expect("shutdown");
}

/// A reverse proxy (every request from one address) that opens many connections at once,
/// each with a whole request, is served on every one: the cap counts connections waiting
/// for a head, and a connection just opened is given time to have its head read (closed
/// at once as the 5th newer one arrived, the first 36 lost their requests).
#[tokio::test]
async fn many_connections_from_one_address_with_whole_requests_are_all_served() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_pending_connections_per_ip = 4;
    })))
    .await
    .expect("server");
    let addr = running.local_addr();
    // All open before any head is sent: the server may have accepted every one first.
    let mut streams = Vec::new();
    for _ in 0..40 {
        streams.push(TcpStream::connect(addr).await.expect("connect"));
    }
    for stream in &mut streams {
        stream.write_all(HEALTH).await.expect("write");
    }
    for stream in &mut streams {
        let response = read_health_response(stream).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    running.shutdown().await.expect("shutdown");
}

/// An idle keep-alive connection waits for a request too: past the cap, a connection whose
/// last response was written is the one closed (the two newer ones that sent nothing stay
/// and are served), so sending one quick request first does not get around the cap.
#[tokio::test]
async fn an_idle_keep_alive_connection_counts_as_waiting() {
    let running = Server::bind(with_limits(limits(|limits| {
        limits.max_pending_connections_per_ip = 2;
    })))
    .await
    .expect("server");
    let addr = running.local_addr();
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    idle.write_all(HEALTH).await.expect("write");
    let response = read_health_response(&mut idle).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let mut newer = Vec::new();
    for _ in 0..2 {
        newer.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let after = closed_within(&mut idle, Duration::from_secs(10)).await;
    assert!(after.is_empty(), "{after:?}");
    for stream in &mut newer {
        stream.write_all(HEALTH).await.expect("write");
        let response = read_health_response(stream).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    running.shutdown().await.expect("shutdown");
}
