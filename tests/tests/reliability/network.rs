//! Network faults on real sockets: a fault proxy (cut, stall, blackhole, refuse) between the
//! real `WebSocketSyncClient` / `GitSyncClient` and a real in-process server, and SIGSTOP of a
//! server child process. Checked like Jepsen's total queue: every event a client emitted is on
//! the server exactly once, and every other replica ends with all of them.
//!
//! The deterministic simulation (turmoil) is in `sim.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ksync_core::{InMemoryStorage, KSync};
use ksync_git::GitSyncClient;
use ksync_tests::proxy::{FaultProxy, ProxyMode};
use ksync_tests::{budget, child, figures};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;

use crate::common::*;

fn ws_client(url: &str) -> WebSocketSyncClient {
    WebSocketSyncClient::builder(url)
        .reconnect(true)
        .reconnect_delay(Duration::from_millis(20), Duration::from_millis(300))
        .heartbeat(Duration::from_millis(300))
        .heartbeat_timeout(Duration::from_millis(300))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("client")
}

async fn ws_node(url: &str) -> KSync<WebSocketSyncClient> {
    ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), ws_client(url))
        .await
        .expect("ksync")
}

/// Counts of each id in a list; (missing from `expected`, ids seen more than once).
fn lost_and_duplicated(expected: &[String], seen: &[String]) -> (usize, usize) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in seen {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let lost = expected
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .count();
    let dup = counts.values().filter(|n| **n > 1).count();
    (lost, dup)
}

/// Polls `check` until it returns true or `limit` passes.
async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_client_through_a_faulty_proxy_loses_and_duplicates_nothing() {
    let rounds = budget(6, 60);
    let server = start_server({
        let mut server_config = ksync_server::ServerConfig::default();
        server_config.in_memory = true;
        server_config
    })
    .await;
    let proxy = FaultProxy::start(server.local_addr()).await.expect("proxy");
    let via_proxy = format!("ws://{}/ws/net", proxy.addr());
    let direct = format!("ws://{}/ws/net", server.local_addr());
    let a = ws_node(&via_proxy).await;
    let b = ws_node(&direct).await;
    a.connect().await.expect("a connects");
    b.connect().await.expect("b connects");
    let mut emitted = Vec::new();
    let faults = [
        ProxyMode::Stall,
        ProxyMode::Blackhole,
        ProxyMode::Refuse,
        ProxyMode::Pass,
    ];
    for round in 0..rounds {
        let fault = faults[round as usize % faults.len()];
        for i in 0..10 {
            emitted.push(
                a.emit("net", json!({"round": round, "i": i}))
                    .await
                    .expect("emit")
                    .id,
            );
            if i == 3 {
                proxy.set(fault);
            }
            if i == 6 {
                proxy.cut_all();
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.set(ProxyMode::Pass);
    }
    // Everything A emitted reaches the room exactly once and B holds all of it.
    let arrived = eventually(Duration::from_secs(30), async || {
        let room: Vec<String> = read_room(&direct)
            .await
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        lost_and_duplicated(&emitted, &room).0 == 0
            && emitted
                .iter()
                .all(|id| b.replica().storage().latest(id).ok().flatten().is_some())
    })
    .await;
    let room: Vec<String> = read_room(&direct)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let (lost, dup) = lost_and_duplicated(&emitted, &room);
    let b_missing = emitted
        .iter()
        .filter(|id| b.replica().storage().latest(id).ok().flatten().is_none())
        .count();
    figures::report(
        "network (real sockets)",
        "WebSocket client via fault proxy: lost / duplicated / missing at a peer",
        format!(
            "{lost} / {dup} / {b_missing} of {} events, {} connections",
            emitted.len(),
            proxy.accepted()
        ),
        "0 / 0 / 0",
        arrived && lost == 0 && dup == 0 && b_missing == 0,
    );
    assert!(arrived && lost == 0 && dup == 0 && b_missing == 0);
    a.disconnect().await.expect("disconnect");
    b.disconnect().await.expect("disconnect");
}

fn git_client(url: &str) -> GitSyncClient {
    GitSyncClient::builder(url)
        .connect_timeout(Duration::from_millis(500))
        .request_timeout(Duration::from_millis(800))
        .build()
        .expect("git client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_client_through_a_faulty_proxy_loses_and_duplicates_nothing() {
    let rounds = budget(6, 60);
    let server = start_server({
        let mut server_config = ksync_server::ServerConfig::default();
        server_config.in_memory = true;
        server_config
    })
    .await;
    let proxy = Arc::new(FaultProxy::start(server.local_addr()).await.expect("proxy"));
    let direct_url = format!("http://{}/git/net", server.local_addr());
    let proxied_url = format!("http://{}/git/net", proxy.addr());
    git_client(&direct_url)
        .create_repo()
        .await
        .expect("create repo");
    let a = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), git_client(&proxied_url))
        .await
        .expect("ksync");
    let faults = [
        ProxyMode::Stall,
        ProxyMode::Blackhole,
        ProxyMode::Refuse,
        ProxyMode::Pass,
    ];
    let mut emitted = Vec::new();
    let mut failed_syncs = 0u32;
    for round in 0..rounds {
        for i in 0..5 {
            emitted.push(
                a.emit("net", json!({"round": round, "i": i}))
                    .await
                    .expect("emit")
                    .id,
            );
        }
        let fault = faults[round as usize % faults.len()];
        proxy.set(fault);
        // Cut every connection a few ms into the sync: a push may land on the server with its
        // answer lost, and must not be stored twice when retried.
        let cutter = {
            let proxy = Arc::clone(&proxy);
            let delay = Duration::from_millis(1 + round % 15);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                proxy.cut_all();
            })
        };
        if a.sync().await.is_err() {
            failed_syncs += 1;
        }
        cutter.await.expect("cutter");
        proxy.set(ProxyMode::Pass);
    }
    // Retry until a sync goes through: the client resends what it is not sure of.
    let synced = eventually(Duration::from_secs(30), async || a.sync().await.is_ok()).await;
    assert!(synced, "sync never succeeded after the faults");
    let reader =
        ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), git_client(&direct_url))
            .await
            .expect("ksync");
    reader.pull().await.expect("pull");
    let server_log: Vec<String> = server
        .provider()
        .open(&ksync_core::LogName::Branch {
            repo: ksync_core::Name::new("net").expect("name"),
            branch: ksync_core::Name::new("main").expect("name"),
        })
        .expect("branch log")
        .read_since(0, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|s| s.event.id)
        .collect();
    let (lost, dup) = lost_and_duplicated(&emitted, &server_log);
    let missing = emitted
        .iter()
        .filter(|id| {
            reader
                .replica()
                .storage()
                .latest(id)
                .ok()
                .flatten()
                .is_none()
        })
        .count();
    figures::report(
        "network (real sockets)",
        "Git client via fault proxy: lost / duplicated / missing at a reader",
        format!(
            "{lost} / {dup} / {missing} of {} events ({failed_syncs} syncs failed under faults)",
            emitted.len()
        ),
        "0 / 0 / 0",
        lost == 0 && dup == 0 && missing == 0,
    );
    assert_eq!((lost, dup, missing), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_server_loses_and_duplicates_nothing() {
    let pauses = budget(2, 20);
    let dir = tempfile::tempdir().expect("tempdir");
    let child = child::spawn(
        "crash::server_child",
        &[(
            "KSYNC_TEST_CRASH_SERVER",
            dir.path().join("data").display().to_string(),
        )],
        &dir.path().join("server.err"),
    )
    .expect("spawn");
    let addr = child
        .expect_line("addr ", Duration::from_secs(30))
        .expect("server did not start");
    let url = format!("ws://{addr}/ws/stop");
    let a = ws_node(&url).await;
    let b = ws_node(&url).await;
    a.connect().await.expect("connect");
    b.connect().await.expect("connect");
    let mut emitted = Vec::new();
    for pause in 0..pauses {
        for i in 0..5 {
            emitted.push(
                a.emit("stop", json!({"pause": pause, "i": i}))
                    .await
                    .expect("emit")
                    .id,
            );
        }
        child.signal("STOP").expect("SIGSTOP");
        // Emitted while the server is frozen: stored locally, sent when it wakes.
        for i in 5..10 {
            emitted.push(
                a.emit("stop", json!({"pause": pause, "i": i}))
                    .await
                    .expect("emit")
                    .id,
            );
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        child.signal("CONT").expect("SIGCONT");
    }
    let done = eventually(Duration::from_secs(30), async || {
        emitted
            .iter()
            .all(|id| b.replica().storage().latest(id).ok().flatten().is_some())
    })
    .await;
    let room: Vec<String> = read_room(&url)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let (lost, dup) = lost_and_duplicated(&emitted, &room);
    figures::report(
        "network (real sockets)",
        "SIGSTOP of the server (1.2 s each): lost / duplicated",
        format!(
            "{lost} / {dup} of {} events over {pauses} pauses",
            emitted.len()
        ),
        "0 / 0",
        done && lost == 0 && dup == 0,
    );
    assert!(done && lost == 0 && dup == 0, "lost {lost}, dup {dup}");
    a.disconnect().await.expect("disconnect");
    b.disconnect().await.expect("disconnect");
}
