//! The client's documented schedules on tokio's paused clock, against real loopback sockets:
//! the reconnect backoff (doubling from `min`, capped at `max`, each delay between half and
//! all of it; the count starting again only after a connection that stayed up for `max`), the
//! heartbeat finding a silent server within `heartbeat + heartbeat_timeout`, a batch going
//! out by `batch_interval`, and `connect_timeout` ending a connect that gets no `welcome`.
//! The clock is virtual, so the bounds are exact up to `SLACK` (what the runtime's waits on
//! the sockets may add, see `fine_clock`), not timing guesses.

use crate::common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use ksync_core::{Event, Notification, NotificationKind, SyncClient};
use ksync_ws::protocol::{ServerMessage, Welcome};
use ksync_ws::server::RelayConfig;
use ksync_ws::{Strategy, WebSocketSyncClient, WsError};
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Keeps a timer 1 ms away for the test's life. A paused clock jumps to the next timer
/// whenever the runtime waits with nothing ready, also while a loopback socket's bytes are
/// on their way: without a near timer that jump went to the client's connect timeout or
/// heartbeat. With it, each wait moves the clock by at most 1 ms.
fn fine_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// What the waits on the sockets (1 ms each, see `fine_clock`) may add to a measured span.
const SLACK: Duration = Duration::from_millis(100);

/// `true` when `span` is a delay the backoff may pick for `full`: between half and all of it.
fn jittered(span: Duration, full: Duration) -> bool {
    span >= full / 2 && span <= full + SLACK
}

/// When each connection was accepted and when the server let it go.
#[derive(Default)]
struct Seen {
    accepted: Vec<Instant>,
    dropped: Vec<Instant>,
}

/// A server that answers each connection's `hello` with a `welcome`, then, for the n-th
/// connection, holds it `hold(n)` (`None`: never lets go, and never reads again, so no pong)
/// and drops it.
async fn scripted_server(
    hold: impl Fn(usize) -> Option<Duration> + Send + 'static,
) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        for n in 0.. {
            let (socket, _) = listener.accept().await.expect("accept");
            log.lock().expect("lock").accepted.push(Instant::now());
            let mut ws = tokio_tungstenite::accept_async(socket)
                .await
                .expect("upgrade");
            let _hello = ws.next().await;
            let welcome = ServerMessage::Welcome(Welcome {
                protocol: ksync_core::PROTOCOL_VERSION,
                room: "r".into(),
                server_version: 0,
                compression: false,
                heartbeat_ms: 30_000,
                max_message_size: 1 << 20,
                log_id: Some("log".into()),
            });
            let text = serde_json::to_string(&welcome).expect("encode");
            ws.send(Message::text(text)).await.expect("welcome");
            match hold(n) {
                Some(hold) => {
                    tokio::time::sleep(hold).await;
                    drop(ws);
                    log.lock().expect("lock").dropped.push(Instant::now());
                }
                None => held.push(ws),
            }
        }
    });
    (addr, seen)
}

/// Attempts that never get a connection: the n-th delay is `min * 2^(n-1)` capped at `max`,
/// then jittered into its upper half.
#[tokio::test(start_paused = true)]
async fn reconnect_delays_double_from_min_up_to_max_with_jitter() {
    let _clock = fine_clock();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let log = accepted.clone();
    // Accepts and drops at once: every upgrade fails.
    tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.expect("accept");
            log.lock().expect("lock").push(Instant::now());
            drop(socket);
        }
    });
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws/r"))
        .reconnect_delay(Duration::from_secs(1), Duration::from_secs(8))
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    assert!(client.connect().await.is_err(), "nothing to connect to");
    while accepted.lock().expect("lock").len() < 8 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.disconnect().await.expect("disconnect");
    let at = accepted.lock().expect("lock").clone();
    for (n, pair) in at.windows(2).take(7).enumerate() {
        // 1, 2, 4, 8, 8, 8, 8 s.
        let full = Duration::from_secs(1 << n.min(3));
        let gap = pair[1] - pair[0];
        assert!(
            jittered(gap, full),
            "delay {}: {gap:?}, not within {full:?} jittered",
            n + 1
        );
    }
    assert_eq!(
        rec.reconnect_attempts()[..7],
        [1, 2, 3, 4, 5, 6, 7],
        "the attempt count grows while nothing connects"
    );
}

/// Connections that drop soon after `welcome` keep counting; one that stayed up for `max`
/// starts the count again from `min`, and one that stayed up for less does not.
#[tokio::test(start_paused = true)]
async fn the_backoff_starts_again_only_after_a_connection_that_stayed_up_for_max() {
    let _clock = fine_clock();
    let max = Duration::from_secs(8);
    let holds = [0, 0, 0, 9, 7, 0];
    let (addr, seen) =
        scripted_server(move |n| Some(Duration::from_secs(holds.get(n).copied().unwrap_or(0))))
            .await;
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws/r"))
        .reconnect_delay(Duration::from_secs(1), max)
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    while seen.lock().expect("lock").accepted.len() < 7 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.disconnect().await.expect("disconnect");
    let seen = seen.lock().expect("lock");
    // The delay after each drop: 1 s, 2 s, 4 s (dropping at once keeps counting), then 1 s
    // after the connection held 9 s (>= max), then 2 s after the one held 7 s (< max), 4 s.
    let expected = [1, 2, 4, 1, 2, 4];
    for (n, full) in expected.into_iter().enumerate() {
        let gap = seen.accepted[n + 1] - seen.dropped[n];
        let full = Duration::from_secs(full);
        assert!(
            jittered(gap, full),
            "delay after connection {n}: {gap:?}, not within {full:?} jittered"
        );
    }
    assert_eq!(rec.reconnect_attempts()[..6], [1, 2, 3, 1, 2, 3]);
}

/// A server that stops answering (no pong, nothing else) is given up at `heartbeat +
/// heartbeat_timeout` after the last thing it sent (defaults: 30 s + 10 s).
#[tokio::test(start_paused = true)]
async fn the_heartbeat_gives_up_a_silent_server_at_heartbeat_plus_timeout() {
    let _clock = fine_clock();
    let (addr, _seen) = scripted_server(|_| None).await;
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws/r"))
        .reconnect(false)
        .build()
        .expect("client");
    let gone = Arc::new(Mutex::new(None::<Instant>));
    let at = gone.clone();
    let _subscription = client
        .notifier()
        .on("disconnected", move |_| {
            at.lock().expect("lock").get_or_insert(Instant::now());
        })
        .expect("known kind");
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    let up = Instant::now();
    while gone.lock().expect("lock").is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = gone.lock().expect("lock").expect("set") - up;
    let due = Duration::from_secs(30 + 10);
    assert!(
        took >= due && took <= due + SLACK,
        "given up after {took:?}, due at {due:?}"
    );
    assert!(
        rec.all().iter().any(|n| matches!(n, Notification::Error(e)
            if matches!(WsError::find(e), Some(WsError::HeartbeatTimeout(_))))),
        "the error says why: {:?}",
        rec.all()
    );
}

/// `Strategy::Batch`: an event waits at most `batch_interval` (ticks counted from the
/// connection), unless `batch_size` are waiting, which go out at once.
#[tokio::test(start_paused = true)]
async fn a_batch_goes_out_by_batch_interval_or_once_batch_size_wait() {
    let _clock = fine_clock();
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("b"));
    let interval = Duration::from_secs(5);
    let sender = WebSocketSyncClient::builder(&url)
        .strategy(Strategy::Batch {
            batch_size: 3,
            batch_interval: interval,
        })
        .build()
        .expect("client");
    let watcher = WebSocketSyncClient::builder(&url).build().expect("client");
    let mut seen = watcher.notifier().stream();
    watcher.connect().await.expect("watcher connects");
    sender.connect().await.expect("sender connects");
    let up = Instant::now();
    let mut next_event = async || loop {
        if let Ok(Notification::Event(e)) = seen.next_of(NotificationKind::Event).await {
            break (e.id, Instant::now());
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent = Instant::now();
    let event = |id: &str| Event::new(id, "note", json!({}), 1);
    sender.send(event("alone")).await.expect("send");
    let (id, arrived) = next_event().await;
    assert_eq!(id, "alone");
    // Held until the tick (5 s after the connection), never longer than the interval.
    assert!(
        arrived - up >= interval,
        "went out {:?} after the connection",
        arrived - up
    );
    assert!(
        arrived - sent <= interval + SLACK,
        "waited {:?}",
        arrived - sent
    );
    // A full batch does not wait for the tick.
    let sent = Instant::now();
    for id in ["a", "b", "c"] {
        sender.send(event(id)).await.expect("send");
    }
    for id in ["a", "b", "c"] {
        let (got, arrived) = next_event().await;
        assert_eq!(got, id);
        assert!(
            arrived - sent <= SLACK,
            "a full batch waited {:?}",
            arrived - sent
        );
    }
    server.stop().await;
}

/// `connect_timeout` bounds TCP connect + upgrade + `welcome`: a server that takes the
/// connection and never answers the upgrade fails `connect()` with `ConnectTimeout` then.
#[tokio::test(start_paused = true)]
async fn connect_fails_at_connect_timeout_on_a_server_that_never_answers() {
    let _clock = fine_clock();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (socket, _) = listener.accept().await.expect("accept");
            held.push(socket);
        }
    });
    let timeout = Duration::from_secs(10);
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws/r"))
        .reconnect(false)
        .connect_timeout(timeout)
        .build()
        .expect("client");
    let started = Instant::now();
    let error = client.connect().await.expect_err("no welcome ever");
    let took = started.elapsed();
    assert!(
        matches!(WsError::find(&error), Some(WsError::ConnectTimeout(_))),
        "{error}"
    );
    assert!(
        took >= timeout && took <= timeout + SLACK,
        "gave up after {took:?}"
    );
}
