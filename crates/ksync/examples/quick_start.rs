//! The README's quick start, compiled: a replica with a durable local log that syncs in real
//! time with everyone in the room `demo`. Run it in two terminals and watch events cross.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --example quick_start -- my-events-1.log` (and `my-events-2.log` in the
//! second terminal).

mod common;

use std::sync::Arc;

use ksync::{FileStorage, KSync, Notification, WebSocketSyncClient};

// README quick start begins
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::require_server().await;
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "my-events.log".into());
    let ksync = KSync::builder()
        .storage(Arc::new(FileStorage::open(&path)?)) // crash-safe, survives restarts
        // ws://127.0.0.1:8080/ws/demo unless KSYNC_SERVER says otherwise.
        .sync_client(Arc::new(WebSocketSyncClient::new(common::ws_url("demo"))?))
        .build()
        .await?;
    let _events = ksync.on("event", |n| {
        if let Notification::Event(e) = n {
            println!("received {} {}", e.event_type, e.data);
        }
    })?;
    ksync.connect().await?; // events emitted while offline go out now
    ksync
        .emit("user_action", serde_json::json!({"action": "click"}))
        .await?;
    println!("{} events here; Ctrl-C to stop", ksync.state()?.len());
    tokio::signal::ctrl_c().await?;
    ksync.disconnect().await?;
    Ok(())
}
// README quick start ends
