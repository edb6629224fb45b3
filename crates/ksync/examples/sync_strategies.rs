//! The spec's sync strategies: event-level, batch and state-based.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --example sync_strategies`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ksync::{InMemoryStorage, KSync, Strategy, WebSocketSyncClient};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let url = common::ws_url("strategies");

    // Event-level: { strategy: 'event-level', batchSize: 1 }. Each event goes out at once.
    let event_level = WebSocketSyncClient::builder(url.as_str())
        .strategy(Strategy::EventLevel { batch_size: 1 })
        .build()?;

    // Batch: { strategy: 'batch', batchSize: 50, batchInterval: 5000 }. Events go out 50 at a
    // time, or every 5 seconds, whichever comes first.
    let batch = WebSocketSyncClient::builder(url.as_str())
        .strategy(Strategy::Batch {
            batch_size: 50,
            batch_interval: Duration::from_secs(5),
        })
        .build()?;

    // State-based: { strategy: 'state-based', snapshotInterval: 300000 }. The client starts
    // from the server's snapshot and sends the latest version of what changed every 5 minutes
    // (here every second, so the example finishes quickly).
    let state_based = WebSocketSyncClient::builder(url.as_str())
        .strategy(Strategy::StateBased {
            snapshot_interval: Duration::from_secs(1),
        })
        .build()?;

    let observer = replica(WebSocketSyncClient::new(url.as_str())?).await?;
    observer.connect().await?;

    let mut ids = Vec::new();
    for (name, client) in [
        ("event-level", event_level),
        ("batch", batch),
        ("state-based", state_based),
    ] {
        let ksync = replica(client).await?;
        ksync.connect().await?;
        // Several revisions of one record: state-based sends only the latest.
        let first = ksync
            .emit("counter", json!({"strategy": name, "n": 1}))
            .await?;
        for n in 2..=3 {
            ksync
                .update(&first.id, "counter", json!({"strategy": name, "n": n}))
                .await?;
        }
        ids.push((name, first.id.clone(), ksync));
    }

    // The batch client flushes within its 5 s interval; the state-based one within 1 s.
    common::wait_until(Duration::from_secs(15), || {
        let state = observer.state().unwrap_or_default();
        ids.iter()
            .all(|(_, id, _)| state.get(id).is_some_and(|e| e.version == 3))
    })
    .await?;
    for (name, id, ksync) in &ids {
        println!(
            "{name:<12} -> observer holds version {} of {id}",
            observer.state()?[id].version
        );
        ksync.disconnect().await?;
    }
    observer.disconnect().await?;
    Ok(())
}

async fn replica(client: WebSocketSyncClient) -> anyhow::Result<KSync<WebSocketSyncClient>> {
    Ok(KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(client))
        .build()
        .await?)
}
