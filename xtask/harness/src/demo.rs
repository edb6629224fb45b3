//! `cargo xtask demo`: a short live demo a new user can watch: `ksync serve` and two replicas
//! (alice and bob) syncing in real time, then bob going offline, writing, and catching up.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ksync_core::{Auth, InMemoryStorage, KSync, Notification};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;

use crate::integration::{ServerProcess, WRITER_KEY, target_dir};

/// Entry point.
pub fn run(args: &[String]) -> Result<()> {
    anyhow::ensure!(args.is_empty(), "cargo xtask demo takes no arguments");
    // `cargo xtask demo` built the binary.
    let binary = target_dir().join("debug").join("ksync");
    let data = tempfile::tempdir().context("temporary data directory")?;
    let server = ServerProcess::start(&binary, data.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(demo(&server.addr));
    server.stop()?;
    result
}

async fn replica(addr: &str, name: &'static str) -> Result<KSync<WebSocketSyncClient>> {
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws/demo"))
        .auth(Auth::api_key(WRITER_KEY))
        .build()?;
    let ksync = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(client))
        .build()
        .await?;
    // Each replica prints what reaches it. Dropping the handle keeps the handler registered.
    let _ = ksync.on("event", move |n| {
        if let Notification::Event(e) = n {
            println!("  {name:>5} <- {} {}", e.event_type, e.data);
        }
    })?;
    Ok(ksync)
}

async fn demo(addr: &str) -> Result<()> {
    println!("\n1. alice and bob join room `demo` on ws://{addr}");
    let alice = replica(addr, "alice").await?;
    let bob = replica(addr, "bob").await?;
    alice.connect().await?;
    bob.connect().await?;
    pause().await;

    println!("\n2. they chat in real time");
    for (who, text) in [
        (&alice, "hi bob"),
        (&bob, "hi alice"),
        (&alice, "shall we sync?"),
    ] {
        who.emit("message", json!({ "text": text })).await?;
        pause().await;
    }

    println!("\n3. bob goes offline and keeps writing; his events wait in his storage");
    bob.disconnect().await?;
    for text in ["written on the train", "still offline"] {
        bob.emit("message", json!({ "text": text })).await?;
        println!("  bob (offline) wrote {text:?}");
    }
    alice
        .emit("message", json!({ "text": "bob, are you there?" }))
        .await?;
    pause().await;

    println!("\n4. bob reconnects: his events go out, alice's message comes in");
    bob.connect().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while alice.state()?.len() != 6 || bob.state()?.len() != 6 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "replicas did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pause().await;
    println!(
        "\n5. both replicas hold the same {} events: {}",
        alice.state()?.len(),
        alice.state()? == bob.state()?
    );
    alice.disconnect().await?;
    bob.disconnect().await?;
    Ok(())
}

async fn pause() {
    tokio::time::sleep(Duration::from_millis(700)).await;
}
