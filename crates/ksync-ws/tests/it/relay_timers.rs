//! The relay's documented timers on tokio's paused clock, against real loopback sockets: a
//! client that sends nothing at all after the server's ping is closed with 4009 when the next
//! ping is due (two heartbeats after it went quiet), a client that upgrades and never says
//! `hello` is closed with 4002 at the handshake timeout, and credentials the wall clock says
//! expired end the connection (4401) by the next heartbeat even when the monotonic clock,
//! which the timers run on, stood still. The clock is virtual: the bounds are exact up to
//! `SLACK`.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use ksync_core::{AuthError, Authenticator, Credentials, Grant, InMemoryProvider};
use ksync_ws::server::RelayConfig;

/// Keeps a timer 1 ms away for the test's life. A paused clock jumps to the next timer
/// whenever the runtime waits with nothing ready, also while a loopback socket's bytes are
/// on their way: with this, each such wait moves it by at most 1 ms.
fn fine_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// What the waits on the sockets (1 ms each, see `fine_clock`) may add to a measured span.
const SLACK: Duration = Duration::from_millis(100);

#[tokio::test(start_paused = true)]
async fn a_client_silent_since_a_ping_is_closed_with_4009_when_the_next_is_due() {
    let _clock = fine_clock();
    let server = start(RelayConfig::default()).await;
    let heartbeat = RelayConfig::default().heartbeat;
    // Not read from here on: the ping is never answered (reading would answer it).
    let (mut ws, _welcome) = join(&server.url(Some("quiet")), hello()).await;
    tokio::time::sleep(2 * heartbeat - SLACK).await;
    assert_eq!(
        server.relay.connections(),
        1,
        "closed before the second ping was due"
    );
    tokio::time::sleep(2 * SLACK).await;
    assert_eq!(
        server.relay.connections(),
        0,
        "still open after the second ping was due"
    );
    assert_eq!(recv_close(&mut ws).await.0, 4009);
    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_says_hello_is_closed_with_4002_at_the_handshake_timeout() {
    let _clock = fine_clock();
    let server = start(RelayConfig::default()).await;
    let timeout = RelayConfig::default().handshake_timeout;
    let mut ws = raw_connect(&server.url(Some("mute")), &[])
        .await
        .expect("upgrade");
    tokio::time::sleep(timeout - SLACK).await;
    assert_eq!(
        server.relay.connections(),
        1,
        "closed before the handshake timeout"
    );
    tokio::time::sleep(2 * SLACK).await;
    assert_eq!(
        server.relay.connections(),
        0,
        "still open after the handshake timeout"
    );
    assert_eq!(recv_close(&mut ws).await.0, 4002);
    server.stop().await;
}

/// Keeps the runtime busy, so the paused clock never moves by itself, only by
/// `tokio::time::advance`, while the wall clock goes on.
fn hold_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    })
}

/// Every credential is valid for `LIFETIME` of wall-clock time from its check.
struct ShortLived;

const LIFETIME: Duration = Duration::from_secs(2);

impl Authenticator for ShortLived {
    fn authenticate(&self, _: &Credentials) -> Result<Grant, AuthError> {
        let mut grant = Grant::anonymous();
        grant.expires_at = Some(SystemTime::now() + LIFETIME);
        Ok(grant)
    }
}

/// The wall clock passes a connection's credential expiry while the monotonic clock stands
/// still (what a suspended host or a step of the wall clock does: the relay's timers run on
/// the monotonic clock, which a suspend does not advance): the relay closes it with 4401 by
/// its next heartbeat, not only once the monotonic timer set at the upgrade is due (after a
/// suspend, up to the suspend's length past the expiry).
#[tokio::test(start_paused = true)]
async fn credentials_expired_by_the_wall_clock_end_the_connection_by_the_next_heartbeat() {
    let _clock = hold_clock();
    let heartbeat = Duration::from_millis(500);
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.heartbeat = heartbeat;
            relay_config
        },
        Arc::new(InMemoryProvider::new()),
        Arc::new(ShortLived),
    )
    .await;
    let (mut ws, _welcome) = join(&server.url(Some("lapsed")), hello()).await;
    // Wall time only: the virtual clock stands still.
    let wall = std::time::Instant::now();
    while wall.elapsed() < LIFETIME + Duration::from_millis(200) {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        server.relay.connections(),
        1,
        "nothing ran on the monotonic clock yet"
    );
    // One heartbeat on the monotonic clock (its expiry timer is still LIFETIME away there).
    tokio::time::advance(heartbeat).await;
    let waiting = std::time::Instant::now();
    while server.relay.connections() > 0 {
        assert!(
            waiting.elapsed() < Duration::from_secs(5),
            "still open a heartbeat after its credentials expired"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(recv_close(&mut ws).await.0, 4401);
}

/// A client that begins a message and never finishes it, answering every ping meanwhile, is
/// closed with 4009 by the second heartbeat after it began: the relay would otherwise hold
/// the message's first part (up to `max_message_size`) for the connection's life. A client
/// that sends nothing but pongs stays open.
#[tokio::test(start_paused = true)]
async fn a_message_begun_and_never_finished_is_closed_with_4009_within_two_heartbeats() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let _clock = fine_clock();
    let server = start(RelayConfig::default()).await;
    let heartbeat = RelayConfig::default().heartbeat;
    let url = server.url(Some("unfinished"));
    let (mut idle, _) = join(&url, hello()).await;
    let (mut partial, _) = join(&url, hello()).await;
    // The first fragment of a publish; the rest never comes.
    let first = Frame::message(
        &br#"{"type":"publish","ref":1,"events":["#[..],
        OpCode::Data(Data::Text),
        false,
    );
    partial.send(Message::Frame(first)).await.expect("send");
    let began = tokio::time::Instant::now();
    // Both read (answering the relay's pings) meanwhile.
    let idle_read = tokio::spawn(async move {
        tokio::time::timeout(4 * heartbeat, read_until_close(&mut idle)).await
    });
    let closed = tokio::time::timeout(4 * heartbeat, read_until_close(&mut partial))
        .await
        .expect("the unfinished message's connection closed");
    assert_eq!(closed, Some(4009));
    assert!(
        began.elapsed() <= 2 * heartbeat + SLACK,
        "{:?}",
        began.elapsed()
    );
    let idle_read = idle_read.await.expect("idle reader");
    assert!(
        idle_read.is_err(),
        "the idle client was closed: {idle_read:?}"
    );
    assert_eq!(server.relay.connections(), 1);
    server.stop().await;
}

/// A message that keeps coming, however slowly, is not cut off: a publish sent in six parts,
/// one every half heartbeat (three heartbeats in all), is stored and acknowledged. Closed
/// like a stalled one, it would be sent again, and again.
#[tokio::test(start_paused = true)]
async fn a_message_that_keeps_coming_slowly_is_let_finish() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let _clock = fine_clock();
    let server = start(RelayConfig::default()).await;
    let heartbeat = RelayConfig::default().heartbeat;
    let (mut ws, _) = join(&server.url(Some("slow-link")), hello()).await;
    let text =
        serde_json::json!({"type": "publish", "ref": 1, "events": [event("slow", 1)]}).to_string();
    let bytes = text.as_bytes();
    let part = bytes.len().div_ceil(6);
    let parts: Vec<&[u8]> = bytes.chunks(part).collect();
    assert_eq!(parts.len(), 6);
    let began = tokio::time::Instant::now();
    for (i, chunk) in parts.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let fin = i + 1 == parts.len();
        ws.send(Message::Frame(Frame::message(chunk.to_vec(), opcode, fin)))
            .await
            .expect("send a part");
        if fin {
            break;
        }
        // Reading answers the relay's pings meanwhile; nothing else comes.
        let pause = tokio::time::sleep(heartbeat / 2);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                message = ws.next() => match message {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    other => panic!("while the message was coming: {other:?}"),
                },
            }
        }
    }
    assert!(began.elapsed() >= 2 * heartbeat + heartbeat / 2);
    let ack = recv_json(&mut ws).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    server.stop().await;
}

/// Reads (answering the relay's pings) until the relay closes: its close code.
async fn read_until_close(ws: &mut Raw) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    loop {
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            _ => return None,
        }
    }
}

/// A publish of about 1 MiB sent as ONE frame (what kSync's clients, browsers and most
/// libraries send), its bytes trickling in over three heartbeats: the client's pong cannot
/// overtake the frame's rest in TCP, so the bytes of the frame are what says the client is
/// alive. The relay stores and acknowledges it; closed with 4009 ("no pong"), the client
/// would send it again, and again, for ever.
#[tokio::test(start_paused = true)]
async fn a_message_sent_as_one_frame_slowly_is_let_finish() {
    use tokio::io::AsyncWriteExt;

    let _clock = fine_clock();
    let heartbeat = Duration::from_secs(1);
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.heartbeat = heartbeat;
        relay_config
    })
    .await;
    let url = server.url(Some("slow-one-frame"));
    let mut tcp = bare_join(&url).await;
    let blob = "x".repeat(1_000_000);
    let text = serde_json::json!({
        "type": "publish", "ref": 7,
        "events": [{"id": "big", "type": "test", "data": {"blob": blob},
                    "timestamp": 1_700_000_000_000u64, "version": 1}],
    })
    .to_string();
    // A text frame's header alone (a 64-bit length); its payload follows slowly.
    tcp.write_all(&masked_header(0x1, text.len()))
        .await
        .expect("header");
    let began = tokio::time::Instant::now();
    const CHUNKS: usize = 12;
    for chunk in text.as_bytes().chunks(text.len().div_ceil(CHUNKS)) {
        tokio::time::sleep(heartbeat / 4).await;
        if tcp.write_all(chunk).await.is_err() {
            let close = bare_next_text(&mut tcp, true).await;
            panic!("closed while the frame kept coming: {close:?}");
        }
    }
    assert!(began.elapsed() >= 3 * heartbeat);
    let ack = match bare_next_text(&mut tcp, true).await {
        Ok(ack) => ack,
        Err(close) => panic!("closed while the frame kept coming: {close:?}"),
    };
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["ref"], 7, "{ack}");
    assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    // Stored: a client joining from the start gets it.
    let (mut late, _) = join(
        &url,
        serde_json::json!({"type": "hello", "protocol": ksync_core::PROTOCOL_VERSION, "since": 0}),
    )
    .await;
    let got = recv_json(&mut late).await;
    assert_eq!(got["type"], "events");
    assert_eq!(got["events"][0]["event"]["id"], "big");
    assert_eq!(
        got["events"][0]["event"]["data"]["blob"]
            .as_str()
            .map(str::len),
        Some(1_000_000)
    );
    server.stop().await;
}

/// A client that began a message as one frame and then sent nothing more (stopped, or its
/// link died: no byte of the frame's rest and, behind it, no pong) is closed with 4009 by the
/// second heartbeat after it began.
#[tokio::test(start_paused = true)]
async fn a_message_begun_as_one_frame_and_stopped_is_closed_with_4009_within_two_heartbeats() {
    use tokio::io::AsyncWriteExt;

    let _clock = fine_clock();
    let heartbeat = Duration::from_secs(1);
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.heartbeat = heartbeat;
        relay_config
    })
    .await;
    let mut tcp = bare_join(&server.url(Some("one-frame-stopped"))).await;
    let mut start = masked_header(0x1, 1000);
    start.extend_from_slice(br#"{"type":"publish","ref":1,"events":["#);
    tcp.write_all(&start).await.expect("the frame's start");
    let began = tokio::time::Instant::now();
    // Reads without answering: a pong now would be read as the frame's payload.
    let closed = tokio::time::timeout(4 * heartbeat, bare_next_text(&mut tcp, false))
        .await
        .expect("closed within four heartbeats");
    assert_eq!(closed.err().flatten().map(|(code, _)| code), Some(4009));
    assert!(
        began.elapsed() <= 2 * heartbeat + SLACK,
        "{:?}",
        began.elapsed()
    );
    server.stop().await;
}

/// Ping and pong frames whose small length is written in the 16- or 64-bit form (RFC 6455
/// asks for the shortest, tungstenite reads any) are not the start of a message: an idle
/// client that sent them, answering every ping, stays open (it was closed with 4009 as "a
/// message stalled", the bytes of their longer header counted as a message being received),
/// and a publish after them is acknowledged.
#[tokio::test(start_paused = true)]
async fn control_frames_with_a_long_length_form_are_no_message_being_received() {
    use tokio::io::AsyncWriteExt;

    let _clock = fine_clock();
    let heartbeat = Duration::from_secs(1);
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.heartbeat = heartbeat;
        relay_config
    })
    .await;
    let mut tcp = bare_join(&server.url(Some("long-control"))).await;
    // A ping of 3 bytes, its length in the 16-bit form; an unsolicited pong of 0 bytes, in
    // the 64-bit form.
    let mut frames = vec![0x89, 0x80 | 126, 0, 3, 0, 0, 0, 0, b'a', b'b', b'c'];
    frames.extend_from_slice(&[0x8a, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    tcp.write_all(&frames).await.expect("control frames");
    // Idle for four heartbeats, answering the relay's pings.
    let idle = tokio::time::timeout(4 * heartbeat, bare_next_text(&mut tcp, true)).await;
    assert!(idle.is_err(), "nothing but pings while idle: {idle:?}");
    assert_eq!(server.relay.connections(), 1);
    let publish =
        serde_json::json!({"type": "publish", "ref": 2, "events": [event("after", 1)]}).to_string();
    bare_send(&mut tcp, 0x1, publish.as_bytes())
        .await
        .expect("publish");
    let ack = bare_next_text(&mut tcp, true).await.expect("an ack");
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    server.stop().await;
}

/// The header of a client frame, fin set, its length in the shortest form, masked with a
/// zero mask (which leaves the payload as it is).
fn masked_header(opcode: u8, len: usize) -> Vec<u8> {
    let mut head = vec![0x80 | opcode];
    match u16::try_from(len) {
        Ok(n) if n < 126 => head.push(0x80 | u8::try_from(n).expect("short")),
        Ok(n) => {
            head.push(0x80 | 126);
            head.extend_from_slice(&n.to_be_bytes());
        }
        Err(_) => {
            head.push(0x80 | 127);
            head.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    head.extend_from_slice(&[0; 4]);
    head
}

/// Sends one masked frame, fin set.
async fn bare_send(
    tcp: &mut tokio::net::TcpStream,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;

    let mut frame = masked_header(opcode, payload.len());
    frame.extend_from_slice(payload);
    tcp.write_all(&frame).await
}

/// Reads the relay's frames up to the next text message (as JSON), or its close frame (`Err`
/// with its code and reason) or the end of the connection (`Err(None)`); answers its pings
/// when `answer`.
async fn bare_next_text(
    tcp: &mut tokio::net::TcpStream,
    answer: bool,
) -> Result<serde_json::Value, Option<(u16, String)>> {
    use tokio::io::AsyncReadExt;

    let mut message = Vec::new();
    loop {
        let mut head = [0u8; 2];
        if tcp.read_exact(&mut head).await.is_err() {
            return Err(None);
        }
        let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
        let length = match head[1] & 0x7f {
            126 => u64::from(tcp.read_u16().await.map_err(|_| None)?),
            127 => tcp.read_u64().await.map_err(|_| None)?,
            n => u64::from(n),
        };
        let mut payload = vec![0; usize::try_from(length).expect("length")];
        tcp.read_exact(&mut payload).await.map_err(|_| None)?;
        match opcode {
            0x8 => {
                let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                return Err(code.map(|code| (code, reason.into_owned())));
            }
            // Not answered once the relay stopped reading: its close frame may follow.
            0x9 if answer => {
                let _ = bare_send(tcp, 0xa, &payload).await;
            }
            0x9 | 0xa => {}
            _ => {
                message.extend_from_slice(&payload);
                if fin {
                    return Ok(serde_json::from_slice(&message).expect("JSON"));
                }
            }
        }
    }
}
