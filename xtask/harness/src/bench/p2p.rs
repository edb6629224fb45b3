//! `cargo xtask bench p2p`: four `P2PSyncClient` peers in one process over TCP + Noise + Yamux
//! on loopback (full mesh, manual discovery). One peer broadcasts 10,000 ~200-byte events
//! at full speed, then at a steady 500/s; we measure the rate at which events are delivered
//! to all three other peers, the p50/p99 latency from `broadcast` to delivery, and how long a
//! fresh peer that missed all 10,000 takes to catch up from one neighbour.
//!
//! Baseline in the same run: the kSync WebSocket relay (`ksync-ws`) with one publishing client
//! and three subscribers, the same events, the same two rates.
//!
//! Targets (from the issue): >= 20,000 events/s delivered to all peers; catch-up of 10,000
//! events <= 1 s.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ksync_core::{
    AllowAll, Event, InMemoryProvider, InMemoryStorage, Notification, NotificationKind, Replica,
    Subscription, SyncClient,
};
use ksync_p2p::{DiscoveryMethod, P2PSyncClient};
use ksync_ws::server::{Relay, RelayConfig};
use ksync_ws::{Strategy, WebSocketSyncClient};
use serde_json::json;

use super::{Report, Series, percentile};

/// Events per run.
const EVENTS: usize = 10_000;
/// Receiving peers (plus one publisher).
const RECEIVERS: usize = 3;
/// The steady rate.
const STEADY_PER_SEC: u64 = 500;
/// Full-speed rounds (medians over these).
const FULL_ROUNDS: usize = 3;
/// How long one run may take before it counts as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Microseconds since the bench started: latency is measured in one process, one clock.
fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A ~200-byte event carrying its send time.
fn event(run: &str, i: usize) -> Event {
    Event::new(
        format!("{run}-{i:08}"),
        "message",
        json!({
            "sent_us": now_us(),
            "room": "general",
            "user": format!("user-{}", i % 100),
            "text": "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod",
        }),
        1_700_000_000_000 + i as u64,
    )
    .with_origin("bench-publisher")
}

/// Counts deliveries of one run's events and records their latencies.
struct Deliveries {
    prefix: String,
    count: AtomicUsize,
    latencies_us: Mutex<Vec<u64>>,
    last_us: Mutex<u64>,
}

impl Deliveries {
    fn new(prefix: &str) -> Arc<Self> {
        Arc::new(Self {
            prefix: prefix.to_owned(),
            count: AtomicUsize::new(0),
            latencies_us: Mutex::new(Vec::with_capacity(EVENTS * RECEIVERS)),
            last_us: Mutex::new(0),
        })
    }

    fn record(&self, event: &Event) {
        if !event.id.starts_with(&self.prefix) {
            return;
        }
        let now = now_us();
        if let Some(sent) = event.data.get("sent_us").and_then(|v| v.as_u64()) {
            lock(&self.latencies_us).push(now.saturating_sub(sent));
        }
        *lock(&self.last_us) = now;
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn delivered(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Subscribes `record` to every receiver's `event` notifications.
fn watch<'a>(
    receivers: impl Iterator<Item = &'a dyn SyncClient>,
    deliveries: &Arc<Deliveries>,
) -> Vec<Subscription> {
    receivers
        .map(|c| {
            let d = Arc::clone(deliveries);
            c.notifier().on_kind(NotificationKind::Event, move |n| {
                if let Notification::Event(e) = n {
                    d.record(e);
                }
            })
        })
        .collect()
}

/// What one run measured.
struct RunResult {
    /// Events delivered to all receivers per second (first send to last delivery).
    rate: f64,
    /// Fraction of the expected deliveries that arrived.
    delivered: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Sends `EVENTS` events through `send` (at `per_sec`, or as fast as it goes when `None`) and
/// waits until all receivers have them (or the timeout).
async fn measure<F, Fut>(
    prefix: &str,
    deliveries: Arc<Deliveries>,
    per_sec: Option<u64>,
    send: F,
) -> Result<RunResult>
where
    F: Fn(Event) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let start = now_us();
    let t0 = tokio::time::Instant::now();
    for i in 0..EVENTS {
        if let Some(rate) = per_sec {
            let due = t0 + Duration::from_micros(i as u64 * 1_000_000 / rate);
            tokio::time::sleep_until(due).await;
        }
        send(event(prefix, i)).await?;
    }
    let expected = EVENTS * RECEIVERS;
    let deadline = tokio::time::Instant::now() + RUN_TIMEOUT;
    while deliveries.delivered() < expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let delivered = deliveries.delivered();
    let elapsed_s = (*lock(&deliveries.last_us)).saturating_sub(start) as f64 / 1e6;
    let mut lat: Vec<f64> = lock(&deliveries.latencies_us)
        .iter()
        .map(|us| *us as f64 / 1000.0)
        .collect();
    Ok(RunResult {
        rate: EVENTS as f64 / elapsed_s,
        delivered: delivered as f64 / expected as f64,
        p50_ms: percentile(&mut lat, 50.0),
        p99_ms: percentile(&mut lat, 99.0),
    })
}

/// Four P2P peers in a full mesh; `peers[0]` publishes.
async fn p2p_mesh(dir: &std::path::Path) -> Result<Vec<Arc<P2PSyncClient>>> {
    let mut peers = Vec::new();
    for i in 0..=RECEIVERS {
        let client = P2PSyncClient::builder(format!("bench-{i}"), DiscoveryMethod::Manual)
            .listen_host([127, 0, 0, 1].into())
            .key_dir(dir)
            .build()?;
        client.start().await?;
        peers.push(Arc::new(client));
    }
    for i in 0..peers.len() {
        for j in i + 1..peers.len() {
            let addr = peers[j].addresses()[0].to_string();
            peers[i].connect_to_peer(&addr).await?;
        }
    }
    // Let subscriptions propagate and the mesh form (one gossipsub heartbeat).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Ok(peers)
}

/// A relay on 127.0.0.1:0 and four clients in one room; `clients[0]` publishes.
async fn ws_room() -> Result<(Vec<Arc<WebSocketSyncClient>>, tokio::task::JoinHandle<()>)> {
    let relay = Relay::new(
        RelayConfig::default(),
        Arc::new(InMemoryProvider::new()),
        Arc::new(AllowAll),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let router = relay.router();
    let server = tokio::spawn(async move {
        // As `ksync serve` does: without TCP_NODELAY on accepted sockets, Nagle's algorithm
        // and the peer's delayed ACK hold small frames back by ~40 ms.
        let _ = axum::serve(ksync_ws::server::nodelay(listener), router).await;
    });
    let mut clients = Vec::new();
    for i in 0..=RECEIVERS {
        let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws/bench"))
            .outbox_capacity(EVENTS * 2)
            // Batched like the P2P side (which packs what is queued, lingering 2 ms under
            // load); the default event-level strategy sends one message per event.
            .strategy(Strategy::Batch {
                batch_size: 256,
                batch_interval: Duration::from_millis(2),
            })
            .build()?;
        // The publisher's replica id is the events' origin: only its own events are pending.
        client.attach(if i == 0 {
            Replica::with_id(Arc::new(InMemoryStorage::new()), "bench-publisher")
        } else {
            Replica::in_memory()
        });
        client.connect().await?;
        clients.push(Arc::new(client));
    }
    Ok((clients, server))
}

pub fn run(report: &mut Report) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let keys = tempfile::tempdir()?;
    let mut p2p_full = Vec::new();
    let mut p2p_full_p50 = Vec::new();
    let mut p2p_full_p99 = Vec::new();
    let mut ws_full = Vec::new();
    let mut ws_full_p50 = Vec::new();
    let mut ws_full_p99 = Vec::new();
    let mut catch_up_ms = Vec::new();
    let mut notes = Vec::new();

    // Each transport is measured on its own (P2P first, then the relay), so neither's idle
    // peers, clients or server share the two cores with the other's rounds.
    let p2p_steady = rt.block_on(async {
        let peers = p2p_mesh(keys.path()).await.context("starting the P2P mesh")?;
        for round in 0..FULL_ROUNDS {
            let prefix = format!("p2p-full-{round}");
            let d = Deliveries::new(&prefix);
            let subs = watch(peers[1..].iter().map(|p| p.as_ref() as &dyn SyncClient), &d);
            let publisher = Arc::clone(&peers[0]);
            let r = measure(&prefix, Arc::clone(&d), None, |e| {
                let p = Arc::clone(&publisher);
                async move { p.broadcast(e).await.map_err(anyhow::Error::from) }
            })
            .await?;
            drop(subs);
            if r.delivered < 1.0 {
                notes.push(format!("p2p full-speed round {round}: only {:.4} of deliveries arrived", r.delivered));
            }
            p2p_full.push(r.rate);
            p2p_full_p50.push(r.p50_ms);
            p2p_full_p99.push(r.p99_ms);
            eprintln!("  p2p full speed round {round}: {:.0} events/s to all, p50 {:.1} ms, p99 {:.1} ms", r.rate, r.p50_ms, r.p99_ms);

            // Catch-up: a fresh peer that missed everything meets one neighbour. The first
            // round's log holds 10,000 events; later rounds' logs hold more, so only the
            // first-round figure is the 10,000-event catch-up.
            if round == 0 {
                for attempt in 0..3 {
                    let late = P2PSyncClient::builder(format!("late-{attempt}"), DiscoveryMethod::Manual)
                        .listen_host([127, 0, 0, 1].into())
                        .key_dir(keys.path())
                        .build()?;
                    late.start().await?;
                    let want = peers[1].replica().storage().len();
                    let t = Instant::now();
                    late.connect_to_peer(&peers[1].addresses()[0].to_string()).await?;
                    let deadline = Instant::now() + RUN_TIMEOUT;
                    while late.replica().storage().len() < want {
                        if Instant::now() > deadline {
                            bail!("catch-up of {want} events did not finish");
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    catch_up_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                    eprintln!("  p2p catch-up of {want} events: {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
                    late.stop().await?;
                }
            }
        }

        // Steady 500/s (20 s).
        let prefix = "p2p-steady";
        let d = Deliveries::new(prefix);
        let subs = watch(peers[1..].iter().map(|p| p.as_ref() as &dyn SyncClient), &d);
        let publisher = Arc::clone(&peers[0]);
        let p2p_steady = measure(prefix, Arc::clone(&d), Some(STEADY_PER_SEC), |e| {
            let p = Arc::clone(&publisher);
            async move { p.broadcast(e).await.map_err(anyhow::Error::from) }
        })
        .await?;
        drop(subs);
        eprintln!("  p2p steady: delivered {:.4}, p50 {:.1} ms, p99 {:.1} ms", p2p_steady.delivered, p2p_steady.p50_ms, p2p_steady.p99_ms);

        let stats = peers[1].stats();
        notes.push(format!(
            "receiver 1: {} gossip messages accepted carrying {} events, {} events by catch-up, {} duplicates dropped",
            stats.accepted_messages, stats.gossip_events, stats.catch_up_events, stats.duplicate_events
        ));
        for p in &peers {
            p.stop().await?;
        }
        Ok::<_, anyhow::Error>(p2p_steady)
    })?;

    let ws_steady = rt.block_on(async {
        let (ws, server) = ws_room().await.context("starting the WebSocket relay")?;
        for round in 0..FULL_ROUNDS {
            let prefix = format!("ws-full-{round}");
            let d = Deliveries::new(&prefix);
            let subs = watch(ws[1..].iter().map(|c| c.as_ref() as &dyn SyncClient), &d);
            let publisher = Arc::clone(&ws[0]);
            let r = measure(&prefix, Arc::clone(&d), None, |e| {
                let p = Arc::clone(&publisher);
                async move { p.send(e).await.map_err(anyhow::Error::from) }
            })
            .await?;
            drop(subs);
            if r.delivered < 1.0 {
                notes.push(format!(
                    "ws full-speed round {round}: only {:.4} of deliveries arrived",
                    r.delivered
                ));
            }
            ws_full.push(r.rate);
            ws_full_p50.push(r.p50_ms);
            ws_full_p99.push(r.p99_ms);
            eprintln!(
                "  ws  full speed round {round}: {:.0} events/s to all, p50 {:.1} ms, p99 {:.1} ms",
                r.rate, r.p50_ms, r.p99_ms
            );
        }
        let prefix = "ws-steady";
        let d = Deliveries::new(prefix);
        let subs = watch(ws[1..].iter().map(|c| c.as_ref() as &dyn SyncClient), &d);
        let publisher = Arc::clone(&ws[0]);
        let ws_steady = measure(prefix, Arc::clone(&d), Some(STEADY_PER_SEC), |e| {
            let p = Arc::clone(&publisher);
            async move { p.send(e).await.map_err(anyhow::Error::from) }
        })
        .await?;
        drop(subs);
        eprintln!(
            "  ws  steady: delivered {:.4}, p50 {:.1} ms, p99 {:.1} ms",
            ws_steady.delivered, ws_steady.p50_ms, ws_steady.p99_ms
        );
        for c in &ws {
            c.disconnect().await?;
        }
        server.abort();
        Ok::<_, anyhow::Error>(ws_steady)
    })?;

    let s = report.scenario("p2p");
    s.note(format!(
        "{EVENTS} events of ~200 bytes per run; 1 publisher + {RECEIVERS} receivers; P2P: full mesh over TCP+Noise+Yamux on 127.0.0.1, gossipsub; baseline: ksync-ws relay, 1 publishing client (batch strategy, 256 events or 2 ms) + {RECEIVERS} subscribers in one room; {FULL_ROUNDS} full-speed rounds, one steady run at {STEADY_PER_SEC}/s each; P2P measured first, then the relay (never both running)"
    ));
    for n in notes {
        s.note(n);
    }
    let p2p_rate = s.series(Series::new(
        "p2p full speed: delivered to all",
        "events/s",
        true,
        p2p_full,
    ));
    let ws_rate = s.series(Series::new(
        "ws relay full speed: delivered to all 3",
        "events/s",
        true,
        ws_full,
    ));
    s.series(Series::new(
        "p2p full speed p50 latency",
        "ms",
        false,
        p2p_full_p50,
    ));
    s.series(Series::new(
        "p2p full speed p99 latency",
        "ms",
        false,
        p2p_full_p99,
    ));
    s.series(Series::new(
        "ws relay full speed p50 latency",
        "ms",
        false,
        ws_full_p50,
    ));
    s.series(Series::new(
        "ws relay full speed p99 latency",
        "ms",
        false,
        ws_full_p99,
    ));
    s.series(Series::new(
        "p2p steady 500/s: delivered",
        "%",
        true,
        vec![p2p_steady.delivered * 100.0],
    ));
    s.series(Series::new(
        "p2p steady 500/s p50 latency",
        "ms",
        false,
        vec![p2p_steady.p50_ms],
    ));
    let p2p_steady_p99 = s.series(Series::new(
        "p2p steady 500/s p99 latency",
        "ms",
        false,
        vec![p2p_steady.p99_ms],
    ));
    s.series(Series::new(
        "ws relay steady 500/s: delivered",
        "%",
        true,
        vec![ws_steady.delivered * 100.0],
    ));
    s.series(Series::new(
        "ws relay steady 500/s p50 latency",
        "ms",
        false,
        vec![ws_steady.p50_ms],
    ));
    let ws_steady_p99 = s.series(Series::new(
        "ws relay steady 500/s p99 latency",
        "ms",
        false,
        vec![ws_steady.p99_ms],
    ));
    let catch_up = s.series(Series::new(
        "p2p catch-up of 10,000 events (fresh peer)",
        "ms",
        false,
        catch_up_ms,
    ));
    s.ratio(
        "p2p full speed / 20,000 events/s target",
        p2p_rate,
        20_000.0,
        Some(1.0),
    );
    s.ratio_max("p2p catch-up / 1,000 ms target", catch_up, 1000.0, 1.0);
    s.ratio(
        "p2p full speed / ws relay full speed",
        p2p_rate,
        ws_rate,
        None,
    );
    s.ratio(
        "p2p steady p99 / ws relay steady p99",
        p2p_steady_p99,
        ws_steady_p99,
        None,
    );
    Ok(())
}
