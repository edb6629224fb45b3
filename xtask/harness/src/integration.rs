//! `cargo xtask integration`: the whole of kSync at once, against the real `ksync` binary.
//!
//! 1. builds `ksync` and starts `ksync serve` on a free loopback port with API keys (a writer and
//!    a read-only reader) and a fresh data directory;
//! 2. WebSocket: two writers in room `secure` encrypt `data` with the field-encryption middleware
//!    (outgoing) and decrypt it (incoming); a read-only client sees only ciphertext and cannot
//!    write;
//! 3. Git: a repository with `main` and `feature`, two clients editing the same record offline (a
//!    conflict settled by last-write-wins on pull), a merge of `feature` into `main`;
//! 4. P2P: two peers on a private libp2p network and a `KSync` bridge (one P2P client plus one
//!    WebSocket client) joining them to room `bridge`, where a plain WebSocket client also writes;
//! 5. checks every replica of each group ends equal, stops the server with SIGTERM (clean exit),
//!    restarts it on the same data directory and checks that everything acknowledged is there;
//! 6. runs every example of the `ksync` crate that talks to a server (the spec's snippets,
//!    compiled) against a fresh `ksync serve` without auth, each in its own empty directory:
//!    each must exit 0 (`quick_start` runs until Ctrl-C: it gets SIGINT once it has synced).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ksync_core::{Auth, Direction, InMemoryStorage, KSync, Notification, Storage, SyncClient};
use ksync_git::GitSyncClient;
use ksync_middleware::{Decrypt, Encrypt, FieldCipher};
use ksync_p2p::{DiscoveryMethod, NetworkKey, P2PSyncClient};
use ksync_ws::WebSocketSyncClient;
use serde_json::{Value, json};

pub(crate) const WRITER_KEY: &str = "integration-writer-key";
const READER_KEY: &str = "integration-reader-key";
/// How long replicas get to converge before the run fails.
const CONVERGE: Duration = Duration::from_secs(30);

/// Entry point.
pub fn run(args: &[String]) -> Result<()> {
    if let Some(arg) = args.first() {
        bail!("cargo xtask integration takes no arguments (got {arg:?})");
    }
    // `cargo xtask integration` built the binary and the examples.
    let binary = target_dir().join("debug").join("ksync");
    ensure!(binary.exists(), "{} was not built", binary.display());
    let data = tempfile::tempdir().context("temporary data directory")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(scenario(binary.clone(), data.path().to_path_buf()))?;
    examples(&binary)
}

/// The `ksync` examples that need a server, run to completion. `quick_start` last: it waits
/// for Ctrl-C.
const EXAMPLES: [&str; 13] = [
    "websocket_client",
    "websocket_auth",
    "websocket_complete",
    "sync_strategies",
    "sync_filters",
    "middleware",
    "monitoring",
    "git_pull_push",
    "git_conflicts",
    "git_branching",
    "git_complete",
    "p2p",
    "custom_sync_client",
];
/// Longest an example may take.
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Step 6 (see the module docs).
fn examples(binary: &PathBuf) -> Result<()> {
    let data = tempfile::tempdir().context("temporary data directory")?;
    let server = ServerProcess::start_open(binary, data.path())?;
    let dir = target_dir().join("debug").join("examples");
    for name in EXAMPLES {
        let cwd = tempfile::tempdir().context("example directory")?;
        let mut child = Command::new(dir.join(name))
            .current_dir(cwd.path())
            .env("KSYNC_SERVER", &server.addr)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting example {name}"))?;
        let status =
            wait_within(&mut child, EXAMPLE_TIMEOUT).with_context(|| format!("example {name}"))?;
        ensure!(status.success(), "example {name} exited with {status}");
        println!("example {name}: ok");
    }
    // Syncs, prints "N events here; Ctrl-C to stop", then waits for Ctrl-C.
    let cwd = tempfile::tempdir().context("example directory")?;
    let mut child = Command::new(dir.join("quick_start"))
        .current_dir(cwd.path())
        .env("KSYNC_SERVER", &server.addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting example quick_start")?;
    let stdout = child.stdout.take().context("quick_start stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let synced = lines.find_map(|line| line.ok().filter(|l| l.contains("Ctrl-C to stop")));
    ensure!(synced.is_some(), "quick_start ended before it synced");
    // The example prints before its first poll of `ctrl_c()`, which is when tokio installs the
    // handler: a SIGINT sent in between kills it. Wait until the kernel says it catches SIGINT.
    wait_for_sigint_handler(child.id(), EXAMPLE_TIMEOUT).context("example quick_start")?;
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status()?;
    ensure!(sent.success(), "kill -INT {pid} failed");
    let status = wait_within(&mut child, EXAMPLE_TIMEOUT).context("example quick_start")?;
    ensure!(
        status.success(),
        "example quick_start exited with {status} after SIGINT"
    );
    println!("example quick_start: ok");
    server.stop()?;
    println!("examples: {} ran against ksync serve", EXAMPLES.len() + 1);
    Ok(())
}

/// Waits until process `pid` has a handler for SIGINT (bit 2 of `SigCgt` in
/// `/proc/PID/status`), so that a SIGINT asks it to stop instead of killing it.
fn wait_for_sigint_handler(pid: u32, limit: Duration) -> Result<()> {
    const SIGINT_MASK: u64 = 1 << (2 - 1);
    let deadline = std::time::Instant::now() + limit;
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let caught = status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .with_context(|| format!("no SigCgt in /proc/{pid}/status"))?;
        if caught & SIGINT_MASK != 0 {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no SIGINT handler within {} s",
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` to exit; kills it (and fails) after `limit`.
fn wait_within(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            // The harness lives two levels below the workspace root.
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .ancestors()
                .nth(2)
                .map_or_else(|| PathBuf::from("target"), |root| root.join("target"))
        },
        PathBuf::from,
    )
}

/// A running `ksync serve` child.
pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) addr: String,
}

impl ServerProcess {
    pub(crate) fn start(binary: &PathBuf, data_dir: &std::path::Path) -> Result<Self> {
        Self::spawn(
            binary,
            data_dir,
            Some(&format!("writer={WRITER_KEY},reader:read={READER_KEY}")),
        )
    }

    /// A server without auth (what the examples' fallback credentials expect).
    fn start_open(binary: &PathBuf, data_dir: &std::path::Path) -> Result<Self> {
        Self::spawn(binary, data_dir, None)
    }

    fn spawn(binary: &PathBuf, data_dir: &std::path::Path, api_keys: Option<&str>) -> Result<Self> {
        let mut command = Command::new(binary);
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("KSYNC_API_KEYS");
        if let Some(keys) = api_keys {
            command.env("KSYNC_API_KEYS", keys);
        }
        let mut child = command
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting ksync serve")?;
        let stdout = child.stdout.take().context("ksync serve stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .next()
            .context("ksync serve exited before listening")??;
        // "ksync listening on ws://ADDR (http://ADDR/health), auth off, data in DIR"
        let addr = line
            .split("ws://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .with_context(|| format!("unexpected first line from ksync serve: {line:?}"))?
            .to_owned();
        println!("server: {line}");
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self { child, addr })
    }

    /// SIGTERM, then wait for a clean exit.
    pub(crate) fn stop(mut self) -> Result<()> {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        ensure!(status.success(), "kill -TERM {pid} failed");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(
                    status.success(),
                    "ksync serve exited with {status} after SIGTERM"
                );
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("ksync serve did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Only reached when a step failed before `stop`: do not leave the server running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(id → (version, type, data, timestamp))`: the materialised state without provenance.
type State = BTreeMap<String, (u64, String, Value, u64)>;

fn state_of(storage: &dyn Storage) -> Result<State> {
    Ok(storage
        .state()?
        .into_values()
        .map(|e| (e.id, (e.version, e.event_type, e.data, e.timestamp)))
        .collect())
}

/// Waits until every storage holds the same state with `expected` ids, or fails with a diff.
async fn converge(what: &str, replicas: &[(&str, &dyn Storage)], expected: usize) -> Result<State> {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let states: Vec<State> = replicas
            .iter()
            .map(|(_, s)| state_of(*s))
            .collect::<Result<_>>()?;
        if states
            .iter()
            .all(|s| s.len() == expected && *s == states[0])
        {
            println!(
                "{what}: {} replicas equal, {expected} records each",
                replicas.len()
            );
            return Ok(states.into_iter().next().unwrap_or_default());
        }
        if tokio::time::Instant::now() > deadline {
            let sizes: Vec<String> = replicas
                .iter()
                .zip(&states)
                .map(|((name, _), s)| format!("{name}={}", s.len()))
                .collect();
            bail!(
                "{what}: replicas did not converge to {expected} records: {}",
                sizes.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ws(addr: &str, room: &str, key: &str) -> Result<WebSocketSyncClient> {
    Ok(
        WebSocketSyncClient::builder(format!("ws://{addr}/ws/{room}"))
            .auth(Auth::api_key(key))
            .build()?,
    )
}

async fn ksync_over<C: SyncClient>(client: C) -> Result<KSync<C>> {
    Ok(KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(client))
        .build()
        .await?)
}

async fn scenario(binary: PathBuf, data_dir: PathBuf) -> Result<()> {
    let server = ServerProcess::start(&binary, &data_dir)?;
    let addr = server.addr.clone();

    let secure = websocket_with_middleware(&addr).await?;
    let (git_state, repo) = git(&addr).await?;
    let bridge = p2p_bridge(&addr).await?;

    server.stop()?;
    println!("server stopped cleanly (SIGTERM)");

    // Everything acknowledged before the stop is on disk: a restarted server serves it all.
    let server = ServerProcess::start(&binary, &data_dir)?;
    let addr = server.addr.clone();
    for (room, expected) in [("secure", &secure), ("bridge", &bridge)] {
        let reader = ksync_over(ws(&addr, room, READER_KEY)?).await?;
        reader.connect().await?;
        let got = converge(
            &format!("room {room} after restart"),
            &[("reader", reader.replica().storage().as_ref())],
            expected.len(),
        )
        .await?;
        // The reader holds what the server stored: ciphertext in `secure`, so compare ids and versions.
        let ids = |s: &State| {
            s.iter()
                .map(|(id, v)| (id.clone(), v.0))
                .collect::<Vec<_>>()
        };
        ensure!(
            ids(&got) == ids(expected),
            "room {room} lost or changed events across the restart"
        );
        reader.disconnect().await?;
    }
    let fresh = GitSyncClient::builder(format!("http://{addr}/git/{repo}"))
        .auth(Auth::api_key(READER_KEY))
        .build()?;
    let cloned = ksync_over(fresh).await?;
    GitSyncClient::clone(
        cloned.client(),
        &format!("http://{addr}/git/{repo}"),
        "main",
    )
    .await?;
    ensure!(
        state_of(cloned.replica().storage().as_ref())? == git_state,
        "git main differs after the restart"
    );
    println!("after restart: rooms and repository intact");
    server.stop()?;
    println!("integration: all replicas equal, nothing lost, clean shutdowns");
    Ok(())
}

/// Room `secure`: encrypted on the wire and at rest on the server; a read-only client cannot
/// write and sees only ciphertext.
async fn websocket_with_middleware(addr: &str) -> Result<State> {
    let cipher = FieldCipher::from_key([7; 32]);
    let mut writers = Vec::new();
    for _ in 0..2 {
        let client = ws(addr, "secure", WRITER_KEY)?;
        client.use_middleware(Direction::Outgoing, Encrypt::new(cipher.clone()));
        client.use_middleware(Direction::Incoming, Decrypt::new(cipher.clone()));
        let ksync = ksync_over(client).await?;
        ksync.connect().await?;
        writers.push(ksync);
    }
    let reader = ksync_over(ws(addr, "secure", READER_KEY)?).await?;
    let mut reader_errors = reader.notifications();
    reader.connect().await?;
    for i in 0..20 {
        for (w, writer) in writers.iter().enumerate() {
            writer
                .emit(
                    "user_data",
                    json!({"writer": w, "n": i, "secret": format!("s-{w}-{i}")}),
                )
                .await?;
        }
    }
    let state = converge(
        "websocket room secure (decrypted)",
        &[
            ("writer-0", writers[0].replica().storage().as_ref()),
            ("writer-1", writers[1].replica().storage().as_ref()),
        ],
        40,
    )
    .await?;
    // The reader got every event, encrypted.
    let seen = converge(
        "websocket room secure (reader)",
        &[("reader", reader.replica().storage().as_ref())],
        40,
    )
    .await?;
    ensure!(
        seen.values()
            .all(|(_, _, data, _)| FieldCipher::is_encrypted(data)),
        "the read-only client saw plaintext: the relay did not carry ciphertext"
    );
    // A read-only credential cannot write: the relay refuses and stores nothing.
    reader.emit("user_data", json!({"from": "reader"})).await?;
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match reader_errors.recv().await {
                Ok(Notification::Error(e)) => break Ok::<_, anyhow::Error>(e.to_string()),
                Ok(_) | Err(ksync_core::StreamError::Lagged(_)) => {}
                Err(e) => bail!("reader notifications ended: {e}"),
            }
        }
    })
    .await
    .context("the read-only client's write was not refused within 10 s")??;
    println!("read-only write refused: {refused}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for writer in &writers {
        ensure!(
            writer.state()?.len() == 40,
            "a refused write reached another client"
        );
    }
    for writer in &writers {
        writer.disconnect().await?;
    }
    reader.disconnect().await?;
    Ok(state)
}

/// Repository `integration`: pushes, pulls, a conflict settled by last-write-wins, a branch
/// merged into main; both clients end with main's state.
async fn git(addr: &str) -> Result<(State, String)> {
    let repo = "integration".to_owned();
    let url = format!("http://{addr}/git/{repo}");
    let client = || -> Result<GitSyncClient> {
        Ok(GitSyncClient::builder(url.as_str())
            .auth(Auth::api_key(WRITER_KEY))
            .build()?)
    };
    let alice = ksync_over(client()?).await?;
    alice.client().create_repo().await?;
    for i in 0..10 {
        alice.emit("page", json!({"n": i})).await?;
    }
    let pushed = alice.push().await?;
    ensure!(
        pushed.pushed_events.len() == 10,
        "alice pushed {} of 10",
        pushed.pushed_events.len()
    );

    let bob = ksync_over(client()?).await?;
    GitSyncClient::clone(bob.client(), &url, "main").await?;
    ensure!(
        bob.state()?.len() == 10,
        "bob's clone holds {} of 10",
        bob.state()?.len()
    );

    // Both edit the same record "offline"; alice pushes first, bob meets the conflict on pull.
    let shared = alice
        .state()?
        .into_keys()
        .next()
        .context("alice has no records")?;
    alice
        .update(&shared, "page", json!({"title": "alice's"}))
        .await?;
    alice.push().await?;
    tokio::time::sleep(Duration::from_millis(5)).await; // bob's edit is the later write
    bob.update(&shared, "page", json!({"title": "bob's"}))
        .await?;
    let pulled = bob.pull().await?;
    ensure!(
        pulled.conflicts.len() == 1,
        "bob saw {} conflicts, expected 1",
        pulled.conflicts.len()
    );
    bob.push().await?;
    alice.pull().await?;
    let winner = &alice.state()?[&shared];
    ensure!(
        winner.data == json!({"title": "bob's"}),
        "last-write-wins should keep bob's later edit, alice has {}",
        winner.data
    );

    // A feature branch, merged into main.
    alice.client().create_branch("feature").await?;
    alice.client().checkout("feature").await?;
    for i in 0..5 {
        alice.emit("draft", json!({"n": i})).await?;
    }
    alice.push().await?;
    let merged = alice.client().merge("main", "feature").await?;
    ensure!(
        merged.conflicts.is_empty(),
        "merge reported conflicts: {:?}",
        merged.conflicts
    );
    alice.client().checkout("main").await?;
    alice.pull().await?;
    bob.pull().await?;
    let state = converge(
        "git main",
        &[
            ("alice", alice.replica().storage().as_ref()),
            ("bob", bob.replica().storage().as_ref()),
        ],
        15,
    )
    .await?;
    let branches = alice.client().list_branches().await?;
    ensure!(
        branches.len() == 2,
        "expected main and feature, got {branches:?}"
    );
    Ok((state, repo))
}

/// Room `bridge`: P2P peers and WebSocket clients see the same events through a KSync bridge.
async fn p2p_bridge(addr: &str) -> Result<State> {
    let keys = tempfile::tempdir()?;
    let network = NetworkKey::generate();
    let peer = |id: &str| -> Result<P2PSyncClient> {
        Ok(P2PSyncClient::builder(id, DiscoveryMethod::Manual)
            .listen_host([127, 0, 0, 1].into())
            .encryption(true)
            .network_key(network)
            .key_dir(keys.path())
            // Events emitted right after a connect can miss gossip (the new peer's
            // subscription has not arrived); catch-up then carries them, and a bridge path may
            // take two rounds: 1 s rounds keep that well inside CONVERGE.
            .anti_entropy_interval(Duration::from_secs(1))
            .build()?)
    };
    // The bridge: a KSync replica on the P2P network, plus a WebSocket client in room `bridge`.
    let bridge = Arc::new(
        KSync::builder()
            .storage(Arc::new(InMemoryStorage::new()))
            .sync_client(Arc::new(peer("bridge")?))
            .replica_id("bridge")
            .build()
            .await?,
    );
    bridge.start().await?;
    // Not attached to a replica: it forwards what it is given (its bounded outbox) and reports
    // what it receives; the bridge's KSync replica is the one that stores.
    let bridge_ws = Arc::new(ws(addr, "bridge", WRITER_KEY)?);
    bridge_ws.connect().await?;
    let forward = |from: ksync_core::NotificationStream, to: Arc<dyn SyncClient>| {
        tokio::spawn(async move {
            let mut from = from;
            loop {
                match from.recv().await {
                    Ok(Notification::Event(event)) => {
                        if let Err(e) = to.send(event).await {
                            eprintln!("bridge: forwarding failed: {e}");
                        }
                    }
                    Ok(_) | Err(ksync_core::StreamError::Lagged(_)) => {}
                    Err(ksync_core::StreamError::Closed) => break,
                }
            }
        })
    };
    let p2p_side: Arc<dyn SyncClient> = Arc::clone(bridge.client()) as Arc<dyn SyncClient>;
    let ws_side: Arc<dyn SyncClient> = Arc::clone(&bridge_ws) as Arc<dyn SyncClient>;
    let to_ws = forward(bridge.notifications(), Arc::clone(&ws_side));
    let to_p2p = forward(bridge_ws.notifications(), Arc::clone(&p2p_side));

    let address = bridge
        .client()
        .addresses()
        .first()
        .cloned()
        .context("the bridge peer has no address")?;
    let mut peers = Vec::new();
    for id in ["peer-1", "peer-2"] {
        let ksync = KSync::builder()
            .storage(Arc::new(InMemoryStorage::new()))
            .sync_client(Arc::new(peer(id)?))
            .replica_id(id)
            .build()
            .await?;
        ksync.start().await?;
        ksync.client().connect_to_peer(&address.to_string()).await?;
        peers.push(ksync);
    }
    let web = ksync_over(ws(addr, "bridge", WRITER_KEY)?).await?;
    web.connect().await?;

    for i in 0..10 {
        peers[0].emit("sensor", json!({"peer": 1, "n": i})).await?;
        peers[1].emit("sensor", json!({"peer": 2, "n": i})).await?;
        web.emit("command", json!({"web": true, "n": i})).await?;
    }
    let state = converge(
        "p2p + websocket room bridge",
        &[
            ("peer-1", peers[0].replica().storage().as_ref()),
            ("peer-2", peers[1].replica().storage().as_ref()),
            ("bridge", bridge.replica().storage().as_ref()),
            ("web", web.replica().storage().as_ref()),
        ],
        30,
    )
    .await?;
    to_ws.abort();
    to_p2p.abort();
    bridge_ws.disconnect().await?;
    for p in &peers {
        p.disconnect().await?;
    }
    bridge.disconnect().await?;
    // The events a peer made were stamped by it; the bridge changed nothing.
    let origins: std::collections::BTreeSet<_> = web
        .replica()
        .storage()
        .read_since(0, usize::MAX)?
        .into_iter()
        .filter_map(|s: ksync_core::Stored| s.event.origin)
        .collect();
    web.disconnect().await?;
    ensure!(
        origins.contains("peer-1") && origins.contains("peer-2"),
        "origins lost on the bridge: {origins:?}"
    );
    Ok(state)
}
