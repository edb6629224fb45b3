//! A load driver for profiling the broadcast path: four peers in one process (full mesh on
//! 127.0.0.1, manual discovery), one publisher, rounds of events at full speed; prints, per
//! round, the rate at which events reached all three receivers and the node counters.
//!
//! `cargo run --release -p ksync-p2p --example mesh_load -- [rounds] [events] [threads]
//! [late peers] [anti-entropy seconds]` (defaults 3, 10000, 2, 0, 15; 0 threads: a
//! current-thread runtime). For instruction counts run the release binary under
//! `valgrind --tool=callgrind` with a small `events`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ksync_core::{Event, Notification, NotificationKind};
use ksync_p2p::{DiscoveryMethod, P2PSyncClient};
use serde_json::json;

const RECEIVERS: usize = 3;

fn event(round: usize, i: usize) -> Event {
    Event::new(
        format!("load-{round}-{i:08}"),
        "message",
        json!({
            "sent_us": i as u64,
            "room": "general",
            "user": format!("user-{}", i % 100),
            "text": "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod",
        }),
        1_700_000_000_000 + i as u64,
    )
    .with_origin("load-publisher")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let rounds = args.first().copied().unwrap_or(3);
    let events = args.get(1).copied().unwrap_or(10_000);
    let threads = args.get(2).copied().unwrap_or(2);
    let late_peers = args.get(3).copied().unwrap_or(0);
    let anti_entropy = Duration::from_secs(args.get(4).copied().unwrap_or(15) as u64);
    let rt = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    // `RUST_LOG=libp2p_gossipsub=debug` shows duplicates ("already received") and skipped
    // forwards ("doesn't want").
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let keys = tempfile::tempdir()?;
    rt.block_on(async {
        let mut peers = Vec::new();
        for i in 0..=RECEIVERS {
            let client = P2PSyncClient::builder(format!("load-{i}"), DiscoveryMethod::Manual)
                .listen_host([127, 0, 0, 1].into())
                .anti_entropy_interval(anti_entropy)
                .key_dir(keys.path())
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
        let delivered = Arc::new(AtomicUsize::new(0));
        let _subs: Vec<_> = peers[1..]
            .iter()
            .map(|p| {
                let d = Arc::clone(&delivered);
                p.notifier().on_kind(NotificationKind::Event, move |n| {
                    if let Notification::Event(_) = n {
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for round in 0..rounds {
            let before = delivered.load(Ordering::Relaxed);
            let start = Instant::now();
            for i in 0..events {
                peers[0].broadcast(event(round, i)).await?;
            }
            let sent = start.elapsed();
            let want = before + events * RECEIVERS;
            let deadline = Instant::now() + Duration::from_secs(120);
            while delivered.load(Ordering::Relaxed) < want && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let took = start.elapsed();
            let got = delivered.load(Ordering::Relaxed) - before;
            println!(
                "round {round}: {got}/{} deliveries, sent in {:.0} ms, all in {:.0} ms: {:.0} events/s",
                events * RECEIVERS,
                sent.as_secs_f64() * 1000.0,
                took.as_secs_f64() * 1000.0,
                events as f64 / took.as_secs_f64()
            );
            for (i, p) in peers.iter().enumerate() {
                println!("  peer {i}: {:?}", p.stats());
            }
            if round == 0 {
                // Fresh peers that missed everything catch up from one receiver, then leave.
                for n in 0..late_peers {
                    let late = P2PSyncClient::builder(format!("late-{n}"), DiscoveryMethod::Manual)
                        .listen_host([127, 0, 0, 1].into())
                        .key_dir(keys.path())
                        .build()?;
                    late.start().await?;
                    let want = peers[1].replica().storage().len();
                    let t = Instant::now();
                    late.connect_to_peer(&peers[1].addresses()[0].to_string())
                        .await?;
                    while late.replica().storage().len() < want {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    println!(
                        "  catch-up of {want} events: {:.0} ms",
                        t.elapsed().as_secs_f64() * 1000.0
                    );
                    late.stop().await?;
                }
            }
        }
        for p in &peers {
            p.stop().await?;
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
