//! Hostile WebSocket framing in the spirit of the Autobahn suite, as raw bytes over TCP
//! against the real relay, plus slowloris (half-open upgrades that never say hello).
//!
//! Every case must end with the relay failing the connection (a close frame with the
//! expected code, or the TCP connection closed), never a panic, and the relay must keep
//! serving well-behaved clients afterwards.

use std::net::SocketAddr;
use std::time::Duration;

use ksync_tests::{budget, figures};
use ksync_ws::server::RelayConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const LIMIT: usize = 64 * 1024;

/// Opens TCP and performs the HTTP upgrade by hand.
async fn upgrade(addr: SocketAddr, room: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /ws/{room} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(ANSWER, tcp.read(&mut byte))
            .await
            .expect("upgrade answer")
            .expect("read");
        assert_eq!(n, 1, "closed during the upgrade");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// One client frame: `first` holds FIN, RSV and opcode; masked unless `unmasked`;
/// `declared` overrides the length field.
fn frame(first: u8, payload: &[u8], unmasked: bool, declared: Option<u64>) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if unmasked { 0 } else { 0x80 };
    let len = declared.unwrap_or(payload.len() as u64);
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    let key = [0x37, 0xfa, 0x21, 0x3d];
    if !unmasked {
        out.extend_from_slice(&key);
    }
    out.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| if unmasked { *b } else { b ^ key[i % 4] }),
    );
    out
}

const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONT: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// How the relay ended a connection.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// A close frame with this code.
    Closed(u16),
    /// The TCP connection closed (or reset) without a close frame.
    Dropped,
    /// A `welcome` (or other text) arrived: the input was accepted.
    Answered(String),
    /// Nothing happened within the wait.
    Open,
}

/// Reads server frames until a close frame, a text frame, EOF or `wait` passes.
async fn outcome(tcp: &mut TcpStream, wait: Duration) -> Outcome {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Parse whatever complete server frames we have (servers do not mask).
        while buf.len() >= 2 {
            let opcode = buf[0] & 0x0f;
            let (len, head) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().expect("8")) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < head + len {
                break;
            }
            let payload = buf[head..head + len].to_vec();
            buf.drain(..head + len);
            match opcode {
                0x8 => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    return Outcome::Closed(code);
                }
                0x1 => return Outcome::Answered(String::from_utf8_lossy(&payload).into()),
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Err(_) => return Outcome::Open,
            Ok(Ok(0) | Err(_)) => return Outcome::Dropped,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn hello_bytes() -> Vec<u8> {
    json!({"type": "hello", "protocol": 1})
        .to_string()
        .into_bytes()
}

/// A hostile case: the bytes sent after the upgrade (and an optional valid hello first) and
/// the close codes that count as a correct refusal.
struct Case {
    name: &'static str,
    after_hello: bool,
    bytes: Vec<u8>,
    /// Close codes accepted; a dropped connection is always accepted (RFC 6455 7.1.7 lets an
    /// endpoint fail the connection by closing TCP).
    codes: &'static [u16],
    /// The input is legal: an answer (here an `ack`) is the right outcome.
    legal: bool,
}

fn cases() -> Vec<Case> {
    let big = vec![b'a'; LIMIT + 1];
    let half = vec![b' '; LIMIT / 2 + 10];
    // 20,000 fragments (one byte each, under the limit in total) then a publish: legal,
    // and must neither stall nor break the relay.
    let mut fragment_flood = frame(TEXT, b" ", false, None);
    for _ in 0..20_000 {
        fragment_flood.extend(frame(CONT, b" ", false, None));
    }
    let publish = json!({"type": "publish", "ref": 9, "events": [event("flood", 1)]});
    fragment_flood.extend(frame(
        FIN | CONT,
        publish.to_string().as_bytes(),
        false,
        None,
    ));
    let mut many_fragments_too_big = frame(TEXT, &[b' '; 1024], false, None);
    for _ in 0..(LIMIT / 1024 + 2) {
        many_fragments_too_big.extend(frame(CONT, &[b' '; 1024], false, None));
    }
    vec![
        Case {
            name: "frame larger than the limit",
            after_hello: false,
            bytes: frame(FIN | TEXT, &big, false, None),
            codes: &[1009],
            legal: false,
        },
        Case {
            name: "declared 2^62 byte frame",
            after_hello: false,
            bytes: frame(FIN | BINARY, b"xx", false, Some(1 << 62)),
            codes: &[1009, 1002],
            legal: false,
        },
        Case {
            name: "64-bit length with the top bit set",
            after_hello: false,
            bytes: frame(FIN | TEXT, b"xx", false, Some(1 << 63)),
            codes: &[1002, 1009],
            legal: false,
        },
        Case {
            name: "message over the limit in two fragments",
            after_hello: true,
            bytes: [
                frame(TEXT, &half, false, None),
                frame(FIN | CONT, &half, false, None),
            ]
            .concat(),
            codes: &[1009],
            legal: false,
        },
        Case {
            name: "message over the limit in many 1 KiB fragments",
            after_hello: true,
            bytes: many_fragments_too_big,
            codes: &[1009],
            legal: false,
        },
        Case {
            name: "fragment flood (20,000 one-byte continuations, then FIN)",
            after_hello: true,
            bytes: fragment_flood,
            codes: &[],
            legal: true,
        },
        Case {
            name: "invalid UTF-8 in a text frame",
            after_hello: false,
            bytes: frame(FIN | TEXT, b"{\"type\":\"hello\xff\xfe\"}", false, None),
            codes: &[1007],
            legal: false,
        },
        Case {
            name: "invalid UTF-8 split across fragments",
            after_hello: true,
            bytes: [
                frame(TEXT, b"{\"a\":\"\xce", false, None),
                frame(FIN | CONT, b"\xff\"}", false, None),
            ]
            .concat(),
            codes: &[1007],
            legal: false,
        },
        Case {
            name: "RSV1 set without an extension",
            after_hello: false,
            bytes: frame(FIN | 0x40 | TEXT, &hello_bytes(), false, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "RSV2 and RSV3 set",
            after_hello: true,
            bytes: frame(FIN | 0x30 | TEXT, b"{}", false, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "reserved data opcode 0x3",
            after_hello: true,
            bytes: frame(FIN | 0x3, b"x", false, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "reserved control opcode 0xB",
            after_hello: true,
            bytes: frame(FIN | 0xB, b"x", false, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "control frame over 125 bytes",
            after_hello: true,
            bytes: frame(FIN | PING, &[b'p'; 126], false, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "fragmented control frame",
            after_hello: true,
            bytes: frame(PING, b"p", false, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "unmasked client frame",
            after_hello: false,
            bytes: frame(FIN | TEXT, &hello_bytes(), true, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "continuation without a start",
            after_hello: true,
            bytes: frame(FIN | CONT, b"{}", false, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "new message inside a fragmented one",
            after_hello: true,
            bytes: [
                frame(TEXT, b"{", false, None),
                frame(FIN | TEXT, b"{}", false, None),
            ]
            .concat(),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "close frame with a 1-byte payload",
            after_hello: true,
            bytes: frame(FIN | CLOSE, b"\x03", false, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "close frame with code 999",
            after_hello: true,
            bytes: frame(FIN | CLOSE, &999u16.to_be_bytes(), false, None),
            codes: &[1002],
            legal: false,
        },
        Case {
            name: "close frame with invalid UTF-8 reason",
            after_hello: true,
            bytes: frame(FIN | CLOSE, b"\x03\xe8\xff\xfe", false, None),
            codes: &[1007, 1002],
            legal: false,
        },
        Case {
            name: "binary frame without negotiated compression",
            after_hello: true,
            bytes: frame(FIN | BINARY, b"\x00\x01", false, None),
            codes: &[1003],
            legal: false,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_fail_the_connection_and_the_relay_stays_up() {
    let (addr, relay) = start_relay({
        let mut relay_config = RelayConfig::default();
        relay_config.max_message_size = LIMIT;
        relay_config.handshake_timeout = Duration::from_secs(5);
        relay_config
    })
    .await;
    let url = format!("ws://{addr}/ws/frames");
    let all = cases();
    let total = all.len();
    let mut passed = 0;
    let mut dropped = 0;
    for case in all {
        let mut tcp = upgrade(addr, "frames").await;
        if case.after_hello {
            tcp.write_all(&frame(FIN | TEXT, &hello_bytes(), false, None))
                .await
                .expect("hello");
            match outcome(&mut tcp, ANSWER).await {
                Outcome::Answered(t) if t.contains("welcome") => {}
                other => panic!("{}: no welcome: {other:?}", case.name),
            }
        }
        // The relay may close before reading everything we send: ignore write errors.
        let _ = tcp.write_all(&case.bytes).await;
        let mut got = outcome(&mut tcp, ANSWER).await;
        // An `error` message may come before the close frame.
        while matches!(&got, Outcome::Answered(t) if t.contains("\"error\"")) {
            got = outcome(&mut tcp, ANSWER).await;
        }
        let ok = match &got {
            Outcome::Closed(code) => case.codes.contains(code),
            Outcome::Dropped => {
                dropped += 1;
                true
            }
            Outcome::Answered(text) => case.legal && text.contains("\"ack\""),
            Outcome::Open => false,
        };
        assert!(
            ok,
            "{}: {got:?}, expected a close with {:?}",
            case.name, case.codes
        );
        passed += 1;
        // Still serving: a healthy client can publish and read back.
        let (mut ws, _) = join(&url, hello(None)).await;
        send_json(
            &mut ws,
            json!({"type":"publish","ref":1,"events":[event(&format!("ok-{passed}"), 1)]}),
        )
        .await;
        let ack = recv_json(&mut ws).await.expect("ack");
        assert_eq!(
            ack["results"][0]["status"], "stored",
            "{}: {ack}",
            case.name
        );
    }
    figures::report(
        "hostile input",
        "raw WebSocket frame cases refused",
        format!("{passed}/{total} ({dropped} by closing TCP)"),
        "N/N",
        passed == total,
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_and_interleaved_control_frames_are_accepted() {
    // The legal side of the same rules: a hello in 1-byte fragments with a ping in between.
    let (addr, _relay) = start_relay(RelayConfig::default()).await;
    let mut tcp = upgrade(addr, "legal").await;
    let hello = hello_bytes();
    let mut bytes = frame(TEXT, &hello[..1], false, None);
    for (i, b) in hello[1..].iter().enumerate() {
        let last = i == hello.len() - 2;
        bytes.extend(frame(
            if last { FIN | CONT } else { CONT },
            &[*b],
            false,
            None,
        ));
        if i == 3 {
            bytes.extend(frame(FIN | PING, b"mid", false, None));
        }
    }
    tcp.write_all(&bytes).await.expect("write");
    match outcome(&mut tcp, ANSWER).await {
        Outcome::Answered(t) => assert!(t.contains("welcome"), "{t}"),
        other => panic!("fragmented hello refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_half_open_upgrades_are_closed_by_the_handshake_timeout() {
    let n = budget(200, 600) as usize;
    let timeout = Duration::from_secs(1);
    let (addr, relay) = start_relay({
        let mut relay_config = RelayConfig::default();
        relay_config.handshake_timeout = timeout;
        relay_config
    })
    .await;
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(upgrade(addr, "slow").await);
    }
    // Each upgraded socket says nothing. After the timeout (+ grace) all must be closed.
    tokio::time::sleep(timeout + Duration::from_millis(500)).await;
    let mut open = 0;
    let mut closed_4002 = 0;
    for tcp in &mut sockets {
        match outcome(tcp, Duration::from_secs(3)).await {
            Outcome::Open | Outcome::Answered(_) => open += 1,
            Outcome::Closed(4002) => closed_4002 += 1,
            Outcome::Closed(_) | Outcome::Dropped => {}
        }
    }
    // The relay's own count agrees once the tasks have finished.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while relay.connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    figures::report(
        "hostile input",
        "slowloris: upgraded connections left open after the handshake timeout",
        format!(
            "{open} of {n} ({closed_4002} closed with 4002; relay counts {})",
            relay.connections()
        ),
        "0",
        open == 0 && relay.connections() == 0,
    );
    assert_eq!(open, 0);
    assert_eq!(relay.connections(), 0);
}
