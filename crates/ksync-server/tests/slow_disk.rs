//! The composed server on a disk whose syncs hang (a stuck or very slow disk): `/health`
//! still answers, a stop is bounded by the shutdown timeout, and nothing the disk did not
//! take is acknowledged.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use ksync_server::{Server, ServerConfig, ServerError, StorageLocation};
use ksync_storage_file::{FaultHook, FileProvider, FileStorageOptions};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// A disk whose syncs hang while the gate is shut (on the storage's sync thread, as a
/// `fdatasync` the device does not answer).
struct SyncGate {
    shut: Mutex<bool>,
    changed: Condvar,
    /// Syncs that found the gate shut.
    held: watch::Sender<usize>,
}

impl SyncGate {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            shut: Mutex::new(false),
            changed: Condvar::new(),
            held: watch::Sender::new(0),
        })
    }

    fn set(&self, shut: bool) {
        *self.shut.lock().unwrap() = shut;
        self.changed.notify_all();
    }
}

impl FaultHook for SyncGate {
    fn before_sync(&self) -> std::io::Result<()> {
        let mut shut = self.shut.lock().unwrap();
        if *shut {
            self.held.send_modify(|n| *n += 1);
        }
        while *shut {
            shut = self.changed.wait(shut).unwrap();
        }
        Ok(())
    }
}

/// Opens the gate however the test ends, so the storage's threads finish.
struct Reopen(Arc<SyncGate>);

impl Drop for Reopen {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// A server over file logs whose syncs pass `gate`, with a 1 s shutdown timeout.
async fn server_on(dir: &std::path::Path, gate: Arc<SyncGate>) -> ksync_server::RunningServer {
    let mut options = FileStorageOptions::default();
    options.fault_hook = Some(gate);
    let provider = Arc::new(FileProvider::with_options(dir, options).unwrap());
    let mut config = {
        let mut server_config = ServerConfig::default();
        server_config.bind = SocketAddr::from(([127, 0, 0, 1], 0));
        server_config.in_memory = false;
        server_config.data_dir = dir.to_owned();
        server_config
    };
    config.limits.shutdown_timeout = Duration::from_secs(1);
    Server::with_provider(config, provider, StorageLocation::Directory(dir.to_owned()))
        .unwrap()
        .start()
        .await
        .unwrap()
}

/// A stop while an append's sync hangs: the relay's drain and the wait for connections were
/// bounded by the shutdown timeout, but the final flush of every log then waited behind the
/// hung sync, so the stop never returned (still running 20 s after a 1 s timeout; for good
/// on a hung disk, until a second signal or SIGKILL). It now waits for the flush at most the
/// timeout again and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_a_sync_hangs_is_bounded_and_health_answers_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let gate = SyncGate::new();
    let _reopen = Reopen(Arc::clone(&gate));
    let server = server_on(dir.path(), Arc::clone(&gate)).await;
    let addr = server.local_addr();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/r"))
        .await
        .unwrap();
    ws.send(Message::text(
        json!({"type":"hello","protocol":1}).to_string(),
    ))
    .await
    .unwrap();
    // The room stores its log id (a sync) before it takes anyone in: once welcomed, the
    // next sync is the publish's.
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(
        welcome.to_text().unwrap().contains("welcome"),
        "{welcome:?}"
    );
    gate.set(true);
    let event = json!({"id":"a","type":"t","data":{},"timestamp":1,"version":1});
    ws.send(Message::text(
        json!({"type":"publish","ref":1,"events":[event]}).to_string(),
    ))
    .await
    .unwrap();
    gate.held.subscribe().wait_for(|n| *n >= 1).await.unwrap();

    // Observers never wait for a log: /health answers while the sync hangs.
    let health = reqwest::get(format!("http://{addr}/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");

    // Bounded (60 s is far past the 1 s drain plus the 1 s flush window: only a hang
    // reaches it).
    let stopped = tokio::time::timeout(Duration::from_secs(60), server.shutdown())
        .await
        .expect("the stop returns while the disk hangs");
    assert!(
        matches!(stopped, Err(ServerError::FlushTimedOut { .. })),
        "{stopped:?}"
    );
    // Nothing was acknowledged for the publish the disk never took.
    while let Some(Some(Ok(message))) = ws.next().now_or_never() {
        if let Message::Text(text) = message {
            assert!(!text.contains("\"ack\""), "acknowledged: {text}");
        }
    }
}
