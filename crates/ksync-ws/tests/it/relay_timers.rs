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
        RelayConfig {
            heartbeat,
            ..RelayConfig::default()
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
