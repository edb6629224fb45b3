//! Crash: a child process appends (storage alone) or serves WebSocket clients (the server) and
//! is SIGKILLed at random moments. Acknowledged events lost must be 0, duplicates 0.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ksync_core::{Event, Storage};
use ksync_storage_file::FileStorage;
use ksync_tests::{budget, child, figures, stats};
use rand::Rng;
use serde_json::json;

use crate::common::*;

const STORAGE_CHILD: &str = "KSYNC_TEST_CRASH_STORAGE";
const SERVER_CHILD: &str = "KSYNC_TEST_CRASH_SERVER";
const RUN_ENV: &str = "KSYNC_TEST_CRASH_RUN";
const APPENDERS: usize = 4;

/// Child body: appends with several concurrent tasks and prints `ack <id>` after each append
/// returned Ok. A no-op as an ordinary test.
#[test]
fn storage_child() {
    let Some(path) = std::env::var_os(STORAGE_CHILD) else {
        return;
    };
    let run = std::env::var(RUN_ENV).expect("run");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let storage = Arc::new(FileStorage::open(PathBuf::from(path)).expect("child open"));
        println!("ready");
        let tasks: Vec<_> = (0..APPENDERS)
            .map(|task| {
                let storage = Arc::clone(&storage);
                let run = run.clone();
                tokio::spawn(async move {
                    for i in 0u64.. {
                        // Batches of 1..=3 events, so multi-event appends are killed too. Now
                        // and then two events longer than replay's 1 MiB read chunk, one after
                        // the other (a long record starting a chunk was once lost at reopen).
                        let long = task == 0 && i % 25 == 24;
                        let (n, pad) = if long {
                            (2, 1_200_000)
                        } else {
                            (1 + (i % 3), 64)
                        };
                        let batch: Vec<Event> = (0..n)
                            .map(|k| {
                                Event::new(
                                    format!("r{run}-t{task}-{i}-{k}"),
                                    "crash",
                                    json!({"i": i, "pad": "p".repeat(pad)}),
                                    i,
                                )
                            })
                            .collect();
                        let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
                        storage.append(batch).await.expect("append");
                        for id in ids {
                            println!("ack {id}");
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
    });
}

#[test]
fn storage_sigkill_loses_no_acknowledged_event() {
    let kills = budget(12, 300);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.log");
    let mut acked: HashSet<String> = HashSet::new();
    let mut recoveries = Vec::new();
    let mut rng = rand::rng();
    for run in 0..kills {
        let child = child::spawn(
            "crash::storage_child",
            &[
                (STORAGE_CHILD, path.display().to_string()),
                (RUN_ENV, run.to_string()),
            ],
            &dir.path().join("child.err"),
        )
        .expect("spawn child");
        child
            .expect_line("ready", Duration::from_secs(30))
            .expect("child did not open the log");
        let deadline = Instant::now() + Duration::from_millis(rng.random_range(5..120));
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(line) = child.line(left)
                && let Some(id) = line.strip_prefix("ack ")
            {
                acked.insert(id.to_owned());
            }
        }
        for line in child.kill().expect("kill") {
            if let Some(id) = line.strip_prefix("ack ") {
                acked.insert(id.to_owned());
            }
        }
        let started = Instant::now();
        let storage = FileStorage::open(&path).expect("reopen after SIGKILL");
        recoveries.push(started.elapsed());
        let (lost, duplicates) = check_log(&storage, &acked);
        assert_eq!((lost, duplicates), (0, 0), "run {run}");
    }
    let storage = FileStorage::open(&path).expect("reopen");
    let (lost, duplicates) = check_log(&storage, &acked);
    let suite = "crash (storage)";
    figures::report(suite, "SIGKILLs", kills, "many", kills > 0);
    figures::report(
        suite,
        "acknowledged events lost",
        format!("{lost} of {}", acked.len()),
        "0",
        lost == 0,
    );
    figures::report(suite, "duplicates", duplicates, "0", duplicates == 0);
    figures::report(
        suite,
        "recovery time p99 (reopen + replay)",
        stats::ms(stats::percentile(&recoveries, 99.0)),
        "reported",
        true,
    );
    assert!(!acked.is_empty(), "the child acknowledged nothing");
    assert_eq!((lost, duplicates), (0, 0));
}

/// Acknowledged ids missing from the log, and ids stored more than once.
fn check_log(storage: &FileStorage, acked: &HashSet<String>) -> (usize, usize) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let all = storage.read_since(0, usize::MAX).expect("read");
    for (i, stored) in all.iter().enumerate() {
        assert_eq!(stored.seq, i as u64 + 1, "sequence numbers have a gap");
        *seen.entry(stored.event.id.clone()).or_default() += 1;
    }
    let lost = acked.iter().filter(|id| !seen.contains_key(*id)).count();
    let duplicates = seen.values().filter(|n| **n > 1).count();
    (lost, duplicates)
}

/// Child body: a file-backed server; prints `addr <addr>` once listening.
#[test]
fn server_child() {
    let Some(dir) = std::env::var_os(SERVER_CHILD) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let server = start_server({
            let mut server_config = ksync_server::ServerConfig::default();
            server_config.data_dir = PathBuf::from(dir);
            server_config
        })
        .await;
        println!("addr {}", server.local_addr());
        std::future::pending::<()>().await;
    });
}

#[test]
fn server_sigkill_under_load_loses_no_acknowledged_event() {
    let kills = budget(6, 100);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut recoveries = Vec::new();
    let mut rng = rand::rng();
    let mut lost = 0;
    let mut duplicates = 0;
    for run in 0..=kills {
        let spawned = Instant::now();
        let child = child::spawn(
            "crash::server_child",
            &[(SERVER_CHILD, data.display().to_string())],
            &dir.path().join("server.err"),
        )
        .expect("spawn server");
        let addr = child
            .expect_line("addr ", Duration::from_secs(30))
            .expect("server did not start");
        let url = format!("ws://{addr}/ws/crash");
        // Recovery: from spawn until the whole room (replayed from disk) was read back.
        let log = rt.block_on(read_room(&url));
        recoveries.push(spawned.elapsed());
        let (l, d) = check_room(&log, &acked.lock().expect("lock"));
        (lost, duplicates) = (l, d);
        assert_eq!((l, d), (0, 0), "after restart {run}");
        if run == kills {
            break;
        }
        // Load: publishers with batches, until the kill.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publishers: Vec<_> = (0..4)
            .map(|p| {
                let url = url.clone();
                let acked = Arc::clone(&acked);
                let stop = Arc::clone(&stop);
                rt.spawn(async move { publish_until_dead(&url, run, p, acked, stop).await })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..300)));
        child.kill().expect("kill");
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for p in publishers {
            rt.block_on(p).expect("publisher");
        }
    }
    let total = acked.lock().expect("lock").len();
    let suite = "crash (server under WebSocket load)";
    figures::report(suite, "SIGKILLs", kills, "many", kills > 0);
    figures::report(
        suite,
        "acknowledged events lost",
        format!("{lost} of {total}"),
        "0",
        lost == 0,
    );
    figures::report(suite, "duplicates", duplicates, "0", duplicates == 0);
    figures::report(
        suite,
        "recovery time p99 (spawn to history served)",
        stats::ms(stats::percentile(&recoveries, 99.0)),
        "reported",
        true,
    );
    assert!(total > 0, "nothing was acknowledged");
}

/// Publishes batches until the socket dies; records every id acknowledged `stored`.
async fn publish_until_dead(
    url: &str,
    run: u64,
    publisher: usize,
    acked: Arc<Mutex<HashSet<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    // The kill may land during the handshake: a connection that never opens is a dead server
    // like any other (not a failure of the test).
    let connect = tokio_tungstenite::connect_async_with_config(url, None, true);
    let Ok(Ok((mut ws, _))) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
        return;
    };
    send_json(&mut ws, hello(None)).await;
    if recv_json_or_dead(&mut ws).await.is_none() {
        return;
    }
    for i in 0u64.. {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let ids: Vec<String> = (0..4)
            .map(|k| format!("r{run}-p{publisher}-{i}-{k}"))
            .collect();
        let events: Vec<_> = ids.iter().map(|id| event(id, i)).collect();
        let sent = futures_util::SinkExt::send(
            &mut ws,
            tokio_tungstenite::tungstenite::Message::text(
                json!({"type": "publish", "ref": i, "events": events}).to_string(),
            ),
        )
        .await;
        if sent.is_err() {
            return;
        }
        // Other publishers' events arrive in between; wait for our ack.
        let ack = loop {
            let Some(msg) = recv_json_or_dead(&mut ws).await else {
                return;
            };
            if msg["type"] == "ack" {
                break msg;
            }
        };
        let results = ack["results"].as_array().expect("results");
        let mut acked = acked.lock().expect("lock");
        for (id, result) in ids.iter().zip(results) {
            assert_eq!(result["status"], "stored", "{ack}");
            acked.insert(id.clone());
        }
    }
}

/// Like `recv_json`, but a dead server (reset, timeout) is `None` instead of a panic.
async fn recv_json_or_dead(ws: &mut Ws) -> Option<serde_json::Value> {
    use futures_util::StreamExt;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .ok()??
            .ok()?;
        match msg {
            tokio_tungstenite::tungstenite::Message::Text(t) => {
                return serde_json::from_str(&t).ok();
            }
            tokio_tungstenite::tungstenite::Message::Close(_) => return None,
            _ => {}
        }
    }
}

fn check_room(log: &[(u64, String)], acked: &HashSet<String>) -> (usize, usize) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, (seq, id)) in log.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "sequence numbers have a gap");
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let lost = acked
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .count();
    let duplicates = seen.values().filter(|n| **n > 1).count();
    (lost, duplicates)
}
