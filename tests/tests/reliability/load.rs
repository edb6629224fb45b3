//! Load: a reconnect storm (1,000 clients reconnecting at once to a server child process whose
//! memory is measured) and a slow consumer (a subscriber reading at a trickle) next to fast
//! subscribers, whose latency is compared with and without it.
//!
//! Latency and memory are figures, not assertions (the machines here are shared and noisy);
//! the test asserts what must hold whatever the load: every client resumes, and the slow
//! client misses nothing once it catches up from its cursor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ksync_tests::{budget, child, figures, stats};
use ksync_ws::server::{Relay, RelayConfig};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_of_a_thousand_clients() {
    let clients = budget(300, 1_000) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = child::spawn(
        "crash::server_child",
        &[(
            "KSYNC_TEST_CRASH_SERVER",
            dir.path().join("data").display().to_string(),
        )],
        &dir.path().join("server.err"),
    )
    .expect("spawn");
    let addr = server
        .expect_line("addr ", Duration::from_secs(30))
        .expect("server did not start");
    let url = format!("ws://{addr}/ws/storm");
    // Some history to resume over.
    let (mut w, _) = join(&url, hello(None)).await;
    for i in 0..20u64 {
        let events: Vec<_> = (0..10).map(|k| event(&format!("h{i}-{k}"), i)).collect();
        send_json(
            &mut w,
            json!({"type": "publish", "ref": i, "events": events}),
        )
        .await;
        recv_json(&mut w).await.expect("ack");
    }
    drop(w);
    let baseline = server.rss_kib().unwrap_or(0);
    // Everyone connects, then everyone drops and reconnects at once resuming from seq 100.
    let mut first = Vec::with_capacity(clients);
    for _ in 0..clients {
        first.push(join(&url, hello(Some(200))).await.0);
    }
    let connected_rss = server.rss_kib().unwrap_or(0);
    drop(first);
    let started = Instant::now();
    let storm: Vec<_> = (0..clients)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let (mut ws, welcome) = join(&url, hello(Some(100))).await;
                // Catch-up: seqs 101..=200.
                let mut got = 0;
                while got < 100 {
                    let msg = recv_json(&mut ws).await.expect("catch-up");
                    got += msg["events"].as_array().map_or(0, Vec::len);
                }
                assert_eq!(welcome["serverVersion"], 200);
                (ws, t.elapsed())
            })
        })
        .collect();
    let mut peak = 0;
    let mut sockets = Vec::new();
    let mut times = Vec::new();
    for task in storm {
        let (ws, t) = task.await.expect("client resumed");
        sockets.push(ws);
        times.push(t);
        peak = peak.max(server.rss_kib().unwrap_or(0));
    }
    let all_in = started.elapsed();
    peak = peak.max(server.rss_kib().unwrap_or(0));
    let per_conn = (peak.saturating_sub(baseline)) / clients as u64;
    // The relay's bound per idle connection: 4 KiB read + 4 KiB write buffers plus task and
    // queue bookkeeping; 64 KiB per connection is the figure's allowance.
    let bound = 64;
    figures::report(
        "load",
        &format!("reconnect storm: {clients} clients resumed (catch-up of 100 events each)"),
        format!(
            "{}/{clients} in {} (p99 per client {})",
            sockets.len(),
            stats::ms(all_in),
            stats::ms(stats::percentile(&times, 99.0))
        ),
        "all",
        sockets.len() == clients,
    );
    figures::report(
        "load",
        "reconnect storm: server RSS growth per connection",
        format!(
            "{per_conn} KiB (baseline {} MiB, {clients} connected {} MiB, storm peak {} MiB)",
            baseline / 1024,
            connected_rss / 1024,
            peak / 1024
        ),
        &format!("<= {bound} KiB"),
        per_conn <= bound,
    );
    assert_eq!(sockets.len(), clients);
}

/// A relay with a small subscriber queue, so the slow-consumer policy is reached quickly, and
/// the base of its room URLs (`ws://ADDR/ws/`).
async fn small_queue_relay() -> (String, Relay) {
    let (addr, relay) = start_relay({
        let mut relay_config = RelayConfig::default();
        relay_config.subscriber_queue = 64;
        relay_config
    })
    .await;
    (format!("ws://{addr}/ws/"), relay)
}

/// Moves `cursor` over the events frames `texts` (in order), failing on a gap.
fn advance(cursor: &mut u64, texts: impl Iterator<Item = String>) {
    for text in texts {
        let msg: serde_json::Value = serde_json::from_str(&text).expect("json");
        for s in msg["events"].as_array().into_iter().flatten() {
            let seq = s["seq"].as_u64().expect("seq");
            assert_eq!(seq, *cursor + 1, "gap in the slow consumer's stream");
            *cursor = seq;
        }
    }
}

/// Joins with a 4 KiB receive buffer, so a slow reader backs up into the relay quickly.
async fn slow_join(url: &str) -> (Ws, serde_json::Value) {
    let addr: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .expect("host")
        .parse()
        .expect("addr");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let tcp = socket.connect(addr).await.expect("connect");
    let (mut ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
            .await
            .expect("upgrade");
    send_json(&mut ws, hello(None)).await;
    let welcome = recv_json(&mut ws).await.expect("welcome");
    (ws, welcome)
}

/// A room's four fast subscribers, each timing the arrival of every event it is sent.
struct FastReaders {
    publisher: Ws,
    sent_at: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    readers: Vec<tokio::task::JoinHandle<Vec<Duration>>>,
}

impl FastReaders {
    /// Joins four fast subscribers and a publisher to `url`'s room; they expect `n` events.
    async fn join(url: &str, n: u64) -> Self {
        let mut fast = Vec::new();
        for _ in 0..4 {
            fast.push(join(url, hello(None)).await.0);
        }
        let (publisher, _) = join(url, hello(None)).await;
        let sent_at = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let readers = fast
            .into_iter()
            .map(|mut ws| {
                let sent_at = Arc::clone(&sent_at);
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while (latencies.len() as u64) < n {
                        let msg = recv_json(&mut ws)
                            .await
                            .expect("fast subscriber was dropped");
                        for s in msg["events"].as_array().into_iter().flatten() {
                            let id = s["event"]["id"].as_str().expect("id");
                            let sent: Option<Instant> =
                                sent_at.lock().expect("lock").get(id).copied();
                            if let Some(t) = sent {
                                latencies.push(t.elapsed());
                            }
                        }
                    }
                    latencies
                })
            })
            .collect();
        Self {
            publisher,
            sent_at,
            readers,
        }
    }

    /// Publishes event `i` (4 KiB of data) and waits for its ack.
    async fn publish(&mut self, tag: &str, i: u64) {
        let id = format!("{tag}-{i}");
        self.sent_at
            .lock()
            .expect("lock")
            .insert(id.clone(), Instant::now());
        let ev = json!({"id": id, "type": "load", "data": {"pad": "x".repeat(4096)}, "timestamp": i, "version": 1});
        send_json(
            &mut self.publisher,
            json!({"type": "publish", "ref": i, "events": [ev]}),
        )
        .await;
        loop {
            let msg = recv_json(&mut self.publisher).await.expect("ack");
            if msg["type"] == "ack" {
                break;
            }
        }
    }

    /// Every fast subscriber's latencies, once each has received all `n` events.
    async fn latencies(self) -> Vec<Duration> {
        let mut all = Vec::new();
        for r in self.readers {
            all.extend(r.await.expect("reader"));
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_neither_slows_fast_subscribers_nor_misses_events() {
    let n = budget(300, 2_000);
    let (base, _relay) = small_queue_relay().await;
    // Two rooms on one relay, published to alternately at a steady pace: the same fast
    // subscribers in each, and in one of them also a subscriber that reads one message every
    // 25 ms. Measured side by side, both rooms see the same load from everything else the
    // machine (and the test binary) is doing at the time, which two rounds one after the
    // other did not.
    let control_url = format!("{base}control");
    let slow_url = format!("{base}slow");
    let mut control = FastReaders::join(&control_url, n).await;
    let mut with_slow = FastReaders::join(&slow_url, n).await;
    // The slow consumer runs on a thread of its own and decodes what it read only once the
    // measurement is over: in this one-process test (a debug build), decoding the large
    // batches it falls behind into would otherwise take CPU from the fast subscribers'
    // readers right when its room's events arrive, and be counted against the relay.
    let measured = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (joined_tx, joined_rx) = tokio::sync::oneshot::channel();
    let slow_thread = {
        let slow_url = slow_url.clone();
        let measured = Arc::clone(&measured);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let (mut slow, welcome) = slow_join(&slow_url).await;
                let mut cursor = welcome["serverVersion"].as_u64().expect("serverVersion");
                let target = cursor + n;
                let _ = joined_tx.send(cursor);
                let mut unread: Vec<String> = Vec::new();
                let mut dropped_with = None;
                while cursor < target {
                    match slow.next().await {
                        Some(Ok(Message::Text(t))) => {
                            unread.push(t.as_str().to_owned());
                            if measured.load(std::sync::atomic::Ordering::Acquire) {
                                advance(&mut cursor, unread.drain(..));
                            }
                            tokio::time::sleep(Duration::from_millis(25)).await;
                        }
                        Some(Ok(Message::Close(frame))) => {
                            dropped_with = frame.map(|f| u16::from(f.code));
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    }
                }
                // What it read before it was dropped counts towards its cursor.
                advance(&mut cursor, unread.drain(..));
                drop(slow);
                (cursor, dropped_with)
            })
        })
    };
    let start_seq = joined_rx.await.expect("the slow consumer joined");
    for i in 0..n {
        // Alternate which room goes first, so neither always waits for the other's commit.
        if i % 2 == 0 {
            control.publish("control", i).await;
            with_slow.publish("slow", i).await;
        } else {
            with_slow.publish("slow", i).await;
            control.publish("control", i).await;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let alone = control.latencies().await;
    let with_slow = with_slow.latencies().await;
    measured.store(true, std::sync::atomic::Ordering::Release);
    let (cursor, dropped_with) = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || slow_thread.join()),
    )
    .await
    .expect("the slow consumer was neither dropped nor done")
    .expect("join task")
    .expect("slow consumer thread");
    // Catch up from the cursor: every event of round 2 must come, in order, no gaps.
    let (mut again, welcome) = join(&slow_url, hello(Some(cursor))).await;
    let last = welcome["serverVersion"].as_u64().expect("serverVersion");
    let mut seq = cursor;
    while seq < last {
        let msg = recv_json(&mut again).await.expect("catch-up");
        for s in msg["events"].as_array().into_iter().flatten() {
            assert_eq!(s["seq"].as_u64(), Some(seq + 1), "gap in catch-up");
            seq += 1;
        }
    }
    let missing = (start_seq + n).saturating_sub(seq);
    let p99_alone = stats::percentile(&alone, 99.0);
    let p99_slow = stats::percentile(&with_slow, 99.0);
    let change = (p99_slow.as_secs_f64() / p99_alone.as_secs_f64().max(1e-9) - 1.0) * 100.0;
    figures::report(
        "load",
        "slow consumer: fast subscribers' p99 latency change",
        format!(
            "{change:+.1}% ({} in a room without it, {} in the room with it)",
            stats::ms(p99_alone),
            stats::ms(p99_slow)
        ),
        "<= +10%",
        change <= 10.0,
    );
    figures::report(
        "load",
        "slow consumer: events missing after it caught up from its cursor",
        format!("{missing} of {n} (it was closed with {dropped_with:?} at seq {cursor})"),
        "0",
        missing == 0,
    );
    assert_eq!(missing, 0);
}
