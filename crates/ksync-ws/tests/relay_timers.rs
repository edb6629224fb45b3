//! The relay's documented timers on tokio's paused clock, against real loopback sockets: a
//! client that sends nothing at all after the server's ping is closed with 4009 when the next
//! ping is due (two heartbeats after it went quiet), and a client that upgrades and never
//! says `hello` is closed with 4002 at the handshake timeout. The clock is virtual: the
//! bounds are exact up to `SLACK`.

mod common;

use std::time::Duration;

use common::*;
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
