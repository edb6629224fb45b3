//! Bad input gets a typed error or a close code; the server stays up and other clients are
//! unaffected.

use crate::common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use ksync_ws::server::RelayConfig;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// A healthy pair in the same room keeps working while others misbehave.
async fn still_fine(url: &str, n: u64) {
    let (mut a, _) = join(url, hello()).await;
    let (mut b, _) = join(url, hello()).await;
    send_json(
        &mut a,
        json!({"type":"publish","ref":1,"events":[event(&format!("ok{n}"), n)]}),
    )
    .await;
    assert_eq!(recv_json(&mut a).await["results"][0]["status"], "stored");
    assert_eq!(
        recv_json(&mut b).await["events"][0]["event"]["id"],
        format!("ok{n}")
    );
}

#[tokio::test]
async fn malformed_json_and_unknown_types_get_typed_errors_and_the_connection_stays() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("bad"));
    let (mut ws, _) = join(&url, hello()).await;
    ws.send(Message::text("{this is not json"))
        .await
        .expect("send");
    let e = recv_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_message"))
    );
    send_json(&mut ws, json!({"type":"subscribe","room":"x"})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "unknown_type");
    send_json(&mut ws, json!({"type":"publish","events":"nope"})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "bad_message");
    send_json(&mut ws, hello()).await;
    assert_eq!(recv_json(&mut ws).await["code"], "protocol");
    // Same connection, still usable.
    send_json(
        &mut ws,
        json!({"type":"publish","ref":3,"events":[event("e",1)]}),
    )
    .await;
    assert_eq!(recv_json(&mut ws).await["results"][0]["status"], "stored");
    still_fine(&url, 2).await;
    server.stop().await;
}

#[tokio::test]
async fn first_message_must_be_hello_in_a_known_version() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let mut ws = raw_connect(&url, &[]).await.expect("connect");
    send_json(&mut ws, json!({"type":"publish","ref":1,"events":[]})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "protocol");
    assert_eq!(recv_close(&mut ws).await.0, 4000);
    let mut ws = raw_connect(&url, &[]).await.expect("connect");
    send_json(&mut ws, json!({"type":"hello","protocol":99})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "unsupported_protocol");
    assert_eq!(recv_close(&mut ws).await.0, 4001);
    still_fine(&url, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn binary_garbage_is_closed_with_1003() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let (mut plain, _) = join(&url, hello()).await;
    plain
        .send(Message::binary(vec![0xde, 0xad, 0xbe, 0xef]))
        .await
        .expect("send");
    assert_eq!(recv_json(&mut plain).await["code"], "bad_binary");
    assert_eq!(recv_close(&mut plain).await.0, 1003);
    // With compression negotiated, binary must inflate to JSON.
    let mut h = hello();
    h["compression"] = json!(true);
    let (mut compressed, welcome) = join(&url, h).await;
    assert_eq!(welcome["compression"], true);
    compressed
        .send(Message::binary(vec![0xff; 64]))
        .await
        .expect("send");
    assert_eq!(recv_json(&mut compressed).await["code"], "bad_binary");
    assert_eq!(recv_close(&mut compressed).await.0, 1003);
    still_fine(&url, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn compressed_publish_is_accepted() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let mut h = hello();
    h["compression"] = json!(true);
    let (mut ws, _) = join(&url, h).await;
    let (mut other, _) = join(&url, hello()).await;
    let publish = json!({"type":"publish","ref":1,"events":[event("z",1)]}).to_string();
    ws.send(Message::binary(ksync_ws::protocol::deflate(
        publish.as_bytes(),
    )))
    .await
    .expect("send");
    assert_eq!(recv_json(&mut ws).await["results"][0]["status"], "stored");
    // A client without compression gets the same batch as text.
    assert_eq!(recv_json(&mut other).await["events"][0]["event"]["id"], "z");
    server.stop().await;
}

#[tokio::test]
async fn oversized_messages_are_closed_with_1009() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.max_message_size = 64 * 1024;
        relay_config
    })
    .await;
    let url = server.url(None);
    let (mut ws, welcome) = join(&url, hello()).await;
    assert_eq!(welcome["maxMessageSize"], 64 * 1024);
    let mut big = event("big", 1);
    big["data"] = json!("x".repeat(100 * 1024));
    send_json(&mut ws, json!({"type":"publish","ref":1,"events":[big]})).await;
    assert_eq!(recv_close(&mut ws).await.0, 1009);
    still_fine(&url, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn silent_connections_hit_the_handshake_timeout() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.handshake_timeout = Duration::from_millis(200);
        relay_config
    })
    .await;
    let mut ws = raw_connect(&server.url(None), &[]).await.expect("connect");
    assert_eq!(recv_close(&mut ws).await.0, 4002);
    server.stop().await;
}

#[tokio::test]
async fn bad_room_names_and_the_connection_cap_are_refused_before_the_upgrade() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.max_connections = 2;
        relay_config
    })
    .await;
    assert_eq!(
        raw_connect(&server.url(Some("..")), &[]).await.err(),
        Some(400)
    );
    assert_eq!(
        raw_connect(&server.url(Some("a%2Fb")), &[]).await.err(),
        Some(400)
    );
    let (_a, _) = join(&server.url(None), hello()).await;
    let (_b, _) = join(&server.url(None), hello()).await;
    assert_eq!(raw_connect(&server.url(None), &[]).await.err(), Some(503));
    assert_eq!(server.relay.connections(), 2);
    drop(_a);
    // The slot frees once the relay notices the close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.relay.connections() > 1 {
        assert!(tokio::time::Instant::now() < deadline, "slot not freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_c, _) = join(&server.url(None), hello()).await;
    server.stop().await;
}

/// The answer to a raw upgrade request for `path` (headers and body), read up to its
/// `Content-Length`.
async fn raw_upgrade_answer(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let read = async {
        loop {
            let text = String::from_utf8_lossy(&answer).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    return;
                }
            }
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await.expect("read") {
                0 => return,
                n => answer.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer within 5 s");
    String::from_utf8(answer).expect("UTF-8 answer")
}

/// A room that is not UTF-8 once percent-decoded is a bad room name like any other: axum's own
/// path rejection (400, plain text) answered it before, which a browser (`ksync.v1`) only saw
/// as a failed connection and retried for ever.
#[tokio::test]
async fn a_room_name_that_is_not_utf8_gets_the_bad_room_refusal() {
    let server = start(RelayConfig::default()).await;
    let answer = raw_upgrade_answer(server.addr, "/ws/%FF").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{answer}"
    );
    let body = answer.split_once("\r\n\r\n").expect("body").1;
    let body: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("bad room name")),
        "{body}"
    );
    // A browser gets the refusal in-band, as for any other bad name.
    let mut ws = raw_connect(
        &server.url(Some("%FF")),
        &[("sec-websocket-protocol", "ksync.v1")],
    )
    .await
    .expect("upgraded to be refused in-band");
    let error = recv_json(&mut ws).await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "bad_room", "{error}");
    assert_eq!(recv_close(&mut ws).await.0, 4400);
    still_fine(&server.url(None), 1).await;
    server.stop().await;
}

#[tokio::test]
async fn server_pings_and_drops_a_client_that_never_answers() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.heartbeat = Duration::from_millis(150);
        relay_config
    })
    .await;
    let (mut mute, _) = join(&server.url(None), hello()).await;
    // Not polling the socket means tungstenite never answers the pings (reading it would:
    // so wait for the relay to drop it before reading the close).
    eventually("the mute client dropped", || {
        server.relay.connections() == 0
    })
    .await;
    assert_eq!(recv_close(&mut mute).await.0, 4009);
    server.stop().await;

    // A client that reads (and so answers pings) stays, over several heartbeats. The
    // heartbeat is longer here: a pong is late only if this test's runtime stalls longer.
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.heartbeat = Duration::from_millis(500);
        relay_config
    })
    .await;
    let (mut live, _) = join(&server.url(None), hello()).await;
    let outcome = tokio::time::timeout(Duration::from_secs(3), recv_json(&mut live)).await;
    assert!(
        outcome.is_err(),
        "no close and no data while answering pings"
    );
    assert_eq!(server.relay.connections(), 1);
    server.stop().await;
}

#[tokio::test]
async fn slow_consumers_are_closed_with_4008_and_resume_without_loss() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.subscriber_queue = 4;
        relay_config
    })
    .await;
    let url = server.url(None);
    let (mut slow, _) = join(&url, json!({"type":"hello","protocol":1,"since":0})).await;
    let (mut publisher, _) = join(&url, hello()).await;
    // Enough bytes to fill the socket buffers and then the 4-frame queue.
    let total = 200u64;
    for n in 1..=total {
        let mut e = event(&format!("e{n}"), n);
        e["data"] = json!("y".repeat(64 * 1024));
        send_json(
            &mut publisher,
            json!({"type":"publish","ref":n,"events":[e]}),
        )
        .await;
        assert_eq!(
            recv_json(&mut publisher).await["results"][0]["status"],
            "stored"
        );
    }
    // The slow client reads what it was sent, then the close.
    let mut last = 0;
    let code = loop {
        let message = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::StreamExt::next(&mut slow),
        )
        .await
        .expect("progress")
        .expect("open")
        .expect("ok");
        match message {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                for e in v["events"].as_array().expect("events") {
                    let seq = e["seq"].as_u64().expect("seq");
                    assert_eq!(seq, last + 1, "no gap before the close");
                    last = seq;
                }
            }
            Message::Close(Some(frame)) => break u16::from(frame.code),
            _ => {}
        }
    };
    assert_eq!(code, 4008);
    assert!(
        last < total,
        "the queue overflowed before everything was delivered"
    );
    // Resuming from the cursor delivers the rest exactly once.
    let (mut resumed, welcome) =
        join(&url, json!({"type":"hello","protocol":1,"since":last})).await;
    assert_eq!(welcome["serverVersion"], total);
    while last < total {
        for e in recv_json(&mut resumed).await["events"]
            .as_array()
            .expect("events")
        {
            let seq = e["seq"].as_u64().expect("seq");
            assert_eq!(seq, last + 1);
            last = seq;
        }
    }
    server.stop().await;
}

/// Messages that arrive together (read in one go, the publishes committed together) are
/// answered in the order they were sent: publishes before a bad message are acknowledged
/// before its error, and publishes before a fatal frame are stored and acknowledged before
/// the close.
#[tokio::test]
async fn answers_keep_the_order_of_messages_sent_back_to_back() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("burst"));
    let (mut ws, _) = join(&url, hello()).await;
    let (mut other, _) = join(&url, hello()).await;
    // Fed without flushing, then flushed at once: one write, one read on the server.
    for message in [
        json!({"type":"publish","ref":1,"events":[event("b1",1)]}).to_string(),
        json!({"type":"publish","ref":2,"events":[event("b2",2)]}).to_string(),
        "{not json".to_owned(),
        json!({"type":"publish","ref":3,"events":[event("b3",3)]}).to_string(),
    ] {
        ws.feed(Message::text(message)).await.expect("feed");
    }
    ws.feed(Message::binary(vec![0xde, 0xad]))
        .await
        .expect("feed");
    ws.flush().await.expect("flush");
    let mut answers = Vec::new();
    for _ in 0..5 {
        let answer = recv_json(&mut ws).await;
        answers.push(match answer["type"].as_str() {
            Some("ack") => format!("ack {} seq {}", answer["ref"], answer["results"][0]["seq"]),
            _ => format!("error {}", answer["code"].as_str().unwrap_or("?")),
        });
    }
    assert_eq!(
        answers,
        [
            "ack 1 seq 1",
            "ack 2 seq 2",
            "error bad_message",
            "ack 3 seq 3",
            "error bad_binary"
        ]
    );
    assert_eq!(recv_close(&mut ws).await.0, 1003);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let batch = recv_json(&mut other).await;
        for e in batch["events"].as_array().expect("events") {
            seen.push(e["event"]["id"].as_str().expect("id").to_owned());
        }
    }
    assert_eq!(seen, ["b1", "b2", "b3"]);
    server.stop().await;
}

/// A relay router mounted alone (`Relay::router()`, no ksync-server around it) answers the
/// requests it does not serve (a path it has no route for, a method the upgrade does not
/// take) 404 or 405 readable from any origin, with one `Access-Control-Allow-Origin: *`:
/// ksync.js in a page of another origin asks for the URL with a plain `GET` after a
/// refused upgrade and stops (`no_endpoint`) only if it may read that answer. Without the
/// header it retried for ever. Other answers (a plain `GET` of a room) stay same-origin.
#[tokio::test]
async fn requests_the_relay_router_does_not_serve_are_readable_from_another_origin() {
    let server = start(RelayConfig::default()).await;
    for (method, path, status) in [
        ("GET", "/no/such/path", 404),
        ("GET", "/ws/room/more", 404),
        ("POST", "/ws/room", 405),
        ("PUT", "/ws", 405),
    ] {
        let head = plain_answer_head(server.addr, method, path).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{method} {path}: {head}"
        );
        assert_eq!(allow_origin(&head), vec!["*"], "{method} {path}: {head}");
    }
    let head = plain_answer_head(server.addr, "GET", "/ws/room").await;
    assert!(!head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(allow_origin(&head).is_empty(), "{head}");
    server.stop().await;
}

/// The `Access-Control-Allow-Origin` values of an answer's head.
fn allow_origin(head: &str) -> Vec<&str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.eq_ignore_ascii_case("access-control-allow-origin"))
        .map(|(_, value)| value.trim())
        .collect()
}

/// The head of the answer to a plain (not upgrade) `method` request for `path`, sent with an
/// `Origin` of another site, as a page's `fetch` sends it.
async fn plain_answer_head(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://app.example\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer
        .split_once("\r\n\r\n")
        .map_or(answer.clone(), |(head, _)| head.to_owned())
}
