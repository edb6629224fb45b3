//! The spec's monitoring and debugging: `debug: true`, `metrics` and `status` notifications.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `RUST_LOG=ksync_ws=debug cargo run -p ksync --example monitoring`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ksync::{InMemoryStorage, KSync, Notification, WebSocketSyncClient};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_logging();
    common::require_server().await;
    let url = common::ws_url("monitoring");

    // debug: true turns on this client's debug logging (shown with RUST_LOG=ksync_ws=debug).
    let sync_client = WebSocketSyncClient::builder(url.as_str())
        .debug(true)
        .metrics_interval(Duration::from_secs(1))
        .build()?;
    let ksync = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(sync_client))
        .build()
        .await?;

    // Monitor sync metrics.
    let _metrics = ksync.on("metrics", |n| {
        if let Notification::Metrics(m) = n {
            println!(
                "Sync metrics: eventsPerSecond={:.1} latency={:.1}ms bandwidth={:.0}B/s",
                m.events_per_second, m.average_latency, m.bandwidth_usage
            );
        }
    })?;
    // Track sync status: connected, syncing, idle, error.
    let _status = ksync.on("status", |n| {
        if let Notification::Status(status) = n {
            println!("Sync status: {status:?}");
        }
    })?;

    ksync.connect().await?;
    for i in 0..20 {
        ksync.emit("tick", json!({"i": i})).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let one more metrics report arrive.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    ksync.disconnect().await?;
    Ok(())
}
