//! Convergence: property tests over many replicas against a real in-process server.
//!
//! - Git: 2-4 `GitSyncClient`s (each a `KSync` over its own storage) run random emits,
//!   updates of shared ids (concurrent edits), pulls, pushes, syncs, branch creation and
//!   checkout, server-side merges and restarts (a new client over the same storage: cursors
//!   and the checked-out branch come back from storage). Then every branch is merged into
//!   `main`, everyone checks out `main` and syncs until quiet: every replica and the server's
//!   `main` must hold the same state.
//! - WebSocket: 2-3 `WebSocketSyncClient`s in one room run random emits, updates of shared
//!   ids and disconnect/reconnect; once all are connected they must reach the same state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ksync_core::{Event, InMemoryStorage, KSync, LogName, Name, Storage};
use ksync_git::GitSyncClient;
use ksync_server::RunningServer;
use ksync_tests::{budget, figures};
use ksync_ws::WebSocketSyncClient;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;

use crate::common::*;

static CASE: AtomicU64 = AtomicU64::new(0);
const BRANCHES: [&str; 3] = ["main", "b1", "b2"];

#[derive(Debug, Clone)]
enum GitOp {
    Emit(usize),
    Update(usize, u8, u8),
    Pull(usize),
    Push(usize),
    Sync(usize),
    Branch(usize, usize),
    Checkout(usize, usize),
    Merge(usize, usize),
    Restart(usize),
}

fn git_op(clients: usize) -> impl Strategy<Value = GitOp> {
    let c = 0..clients;
    prop_oneof![
        3 => c.clone().prop_map(GitOp::Emit),
        3 => (c.clone(), 0..4u8, any::<u8>()).prop_map(|(c, id, v)| GitOp::Update(c, id, v)),
        2 => c.clone().prop_map(GitOp::Pull),
        2 => c.clone().prop_map(GitOp::Push),
        2 => c.clone().prop_map(GitOp::Sync),
        1 => (c.clone(), 1..3usize).prop_map(|(c, b)| GitOp::Branch(c, b)),
        1 => (c.clone(), 0..3usize).prop_map(|(c, b)| GitOp::Checkout(c, b)),
        1 => (c.clone(), 1..3usize).prop_map(|(c, b)| GitOp::Merge(c, b)),
        1 => c.prop_map(GitOp::Restart),
    ]
}

fn git_case() -> impl Strategy<Value = (usize, Vec<GitOp>)> {
    (2..=4usize).prop_flat_map(|n| (Just(n), proptest::collection::vec(git_op(n), 1..30)))
}

type GitNode = KSync<GitSyncClient>;

async fn git_node(url: &str, storage: Arc<dyn Storage>) -> GitNode {
    let client = GitSyncClient::builder(url).build().expect("client");
    ksync_testkit::ksync_over(storage, client)
        .await
        .expect("ksync")
}

/// The materialised state as comparable content: id -> (version, type, data, timestamp).
fn content(state: &BTreeMap<String, Event>) -> BTreeMap<String, (u64, String, String, u64)> {
    state
        .iter()
        .map(|(id, e)| {
            (
                id.clone(),
                (
                    e.version,
                    e.event_type.clone(),
                    e.data.to_string(),
                    e.timestamp,
                ),
            )
        })
        .collect()
}

async fn run_git_case(
    server: &RunningServer,
    clients: usize,
    ops: Vec<GitOp>,
) -> Result<(), String> {
    let case = CASE.fetch_add(1, Ordering::Relaxed);
    let repo = format!("conv-{case}");
    let url = format!("http://{}/git/{repo}", server.local_addr());
    let storages: Vec<Arc<dyn Storage>> = (0..clients)
        .map(|_| Arc::new(InMemoryStorage::new()) as Arc<dyn Storage>)
        .collect();
    let mut nodes = Vec::new();
    for s in &storages {
        nodes.push(git_node(&url, Arc::clone(s)).await);
    }
    nodes[0]
        .client()
        .create_repo()
        .await
        .map_err(|e| e.to_string())?;
    let mut counter = 0u64;
    for op in ops {
        match op {
            GitOp::Emit(c) => {
                counter += 1;
                nodes[c]
                    .emit("t", json!({"n": counter}))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            GitOp::Update(c, id, v) => {
                nodes[c]
                    .update(&format!("shared-{id}"), "t", json!({"v": v, "by": c}))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            GitOp::Pull(c) => drop(nodes[c].pull().await.map_err(|e| format!("pull: {e}"))?),
            GitOp::Push(c) => drop(nodes[c].push().await.map_err(|e| format!("push: {e}"))?),
            GitOp::Sync(c) => drop(nodes[c].sync().await.map_err(|e| format!("sync: {e}"))?),
            GitOp::Branch(c, b) => {
                // Creating an existing branch is fine when it is the same fork; another fork
                // point is refused: not a divergence.
                if let Ok(info) = nodes[c].client().create_branch(BRANCHES[b]).await {
                    let _ = info;
                    nodes[c]
                        .client()
                        .checkout(BRANCHES[b])
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            GitOp::Checkout(c, b) => {
                // A branch nobody created yet is refused (404): fine.
                let _ = nodes[c].client().checkout(BRANCHES[b]).await;
            }
            GitOp::Merge(c, b) => {
                let _ = nodes[c].client().merge("main", BRANCHES[b]).await;
            }
            GitOp::Restart(c) => {
                nodes[c] = git_node(&url, Arc::clone(&storages[c])).await;
            }
        }
    }
    // Bring everything together: push every branch's local events, merge into main, then
    // everyone syncs main until nothing moves.
    // (A branch's local events go only to that branch: push each from a checkout of it.)
    for node in &nodes {
        for b in BRANCHES {
            if node.client().checkout(b).await.is_ok() {
                node.push()
                    .await
                    .map_err(|e| format!("final push to {b}: {e}"))?;
            }
        }
    }
    for b in &BRANCHES[1..] {
        let _ = nodes[0].client().merge("main", b).await;
    }
    for node in &nodes {
        node.client()
            .checkout("main")
            .await
            .map_err(|e| format!("checkout main: {e}"))?;
    }
    for _ in 0..4 {
        for node in &nodes {
            node.sync().await.map_err(|e| format!("final sync: {e}"))?;
        }
    }
    let main = server
        .provider()
        .open(&LogName::Branch {
            repo: Name::new(&repo).expect("name"),
            branch: Name::new("main").expect("name"),
        })
        .map_err(|e| e.to_string())?
        .state()
        .map_err(|e| e.to_string())?;
    let expected = content(&main);
    for (i, node) in nodes.iter().enumerate() {
        let got = content(&node.state().map_err(|e| e.to_string())?);
        if got != expected {
            let only_here: Vec<_> = got
                .iter()
                .filter(|(k, v)| expected.get(*k) != Some(v))
                .collect();
            let only_server: Vec<_> = expected
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(v))
                .collect();
            return Err(format!(
                "replica {i} diverges from the server's main: replica has {only_here:?}, server has {only_server:?}"
            ));
        }
    }
    Ok(())
}

#[test]
fn git_replicas_with_branches_merges_and_restarts_converge() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let server = rt.block_on(start_server(in_memory_server()));
    run_cases(
        budget(24, 10_000),
        git_case(),
        |(clients, ops)| rt.block_on(run_git_case(&server, clients, ops)),
        "Git replicas (2-4, branches, merges, restarts, concurrent edits): cases / divergent",
        ">= 10,000 in chaos / 0",
    );
}

#[derive(Debug, Clone)]
enum WsOp {
    Emit(usize),
    Update(usize, u8, u8),
    Disconnect(usize),
    Connect(usize),
}

fn ws_case() -> impl Strategy<Value = (usize, Vec<WsOp>)> {
    (2..=3usize).prop_flat_map(|n| {
        let c = 0..n;
        let op = prop_oneof![
            3 => c.clone().prop_map(WsOp::Emit),
            3 => (c.clone(), 0..3u8, any::<u8>()).prop_map(|(c, id, v)| WsOp::Update(c, id, v)),
            1 => c.clone().prop_map(WsOp::Disconnect),
            1 => c.prop_map(WsOp::Connect),
        ];
        (Just(n), proptest::collection::vec(op, 1..20))
    })
}

async fn run_ws_case(server: &RunningServer, clients: usize, ops: Vec<WsOp>) -> Result<(), String> {
    let case = CASE.fetch_add(1, Ordering::Relaxed);
    let url = format!("ws://{}/ws/conv-{case}", server.local_addr());
    let mut nodes = Vec::new();
    for _ in 0..clients {
        let client = WebSocketSyncClient::builder(&url)
            .reconnect_delay(Duration::from_millis(10), Duration::from_millis(100))
            .build()
            .map_err(|e| e.to_string())?;
        let node = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
            .await
            .map_err(|e| e.to_string())?;
        node.connect().await.map_err(|e| e.to_string())?;
        nodes.push(node);
    }
    for op in ops {
        match op {
            WsOp::Emit(c) => drop(
                nodes[c]
                    .emit("t", json!({"c": c}))
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            WsOp::Update(c, id, v) => drop(
                nodes[c]
                    .update(&format!("s{id}"), "t", json!({"v": v, "by": c}))
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            WsOp::Disconnect(c) => nodes[c].disconnect().await.map_err(|e| e.to_string())?,
            WsOp::Connect(c) => nodes[c].connect().await.map_err(|e| e.to_string())?,
        }
    }
    for node in &nodes {
        node.connect().await.map_err(|e| e.to_string())?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let states: Vec<_> = nodes
            .iter()
            .map(|n| content(&n.state().expect("state")))
            .collect();
        if states.windows(2).all(|w| w[0] == w[1]) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("WebSocket replicas never converged: {states:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for node in &nodes {
        node.disconnect().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[test]
fn websocket_replicas_with_concurrent_edits_and_reconnects_converge() {
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let server = rt.block_on(start_server(in_memory_server()));
    run_cases(
        budget(12, 1_000),
        ws_case(),
        |(clients, ops)| rt.block_on(run_ws_case(&server, clients, ops)),
        "WebSocket replicas (2-3, concurrent edits, reconnects): cases / divergent",
        "0 divergent",
    );
}

fn in_memory_server() -> ksync_server::ServerConfig {
    {
        let mut server_config = ksync_server::ServerConfig::default();
        server_config.in_memory = true;
        server_config
    }
}

/// Runs `cases` cases of `strategy` through `run_case` (an `Err` is a divergence, which
/// proptest then shrinks), reports the figure `what` against `target`, and fails on a
/// divergence.
fn run_cases<S: Strategy>(
    cases: u64,
    strategy: S,
    run_case: impl Fn(S::Value) -> Result<(), String>,
    what: &str,
    target: &str,
) {
    let mut runner = TestRunner::new(Config {
        cases: u32::try_from(cases).unwrap_or(u32::MAX),
        failure_persistence: None,
        ..Config::default()
    });
    let ran = std::sync::atomic::AtomicU32::new(0);
    let result = runner.run(&strategy, |case| {
        ran.fetch_add(1, Ordering::Relaxed);
        run_case(case).map_err(TestCaseError::fail)
    });
    let divergent = u32::from(result.is_err());
    figures::report(
        "convergence",
        what,
        format!("{} / {divergent}", ran.load(Ordering::Relaxed)),
        target,
        divergent == 0,
    );
    result.expect("divergence");
}
