//! The spec's sync filters: a predicate (`!event.data.private`) and the built-in
//! `'public-only'`.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --example sync_filters`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ksync::{Filter, InMemoryStorage, KSync, WebSocketSyncClient};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let url = common::ws_url("filters");

    // filter: (event) => !event.data.private
    let with_predicate = WebSocketSyncClient::builder(url.as_str())
        .filter(Filter::predicate(|event| {
            // Only sync public events: `!event.data.private`, truthiness as JavaScript counts.
            match event.data.get("private") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(private)) => !private,
                Some(Value::Number(n)) => n.as_f64() == Some(0.0),
                Some(Value::String(s)) => s.is_empty(),
                Some(Value::Array(_) | Value::Object(_)) => false,
            }
        }))
        .build()?;

    // filter: 'public-only' (built in)
    let with_builtin = WebSocketSyncClient::builder(url.as_str())
        .filter("public-only".parse()?)
        .build()?;

    let observer = replica(WebSocketSyncClient::new(url.as_str())?).await?;
    observer.connect().await?;

    let mut public_ids = Vec::new();
    let mut private_ids = Vec::new();
    // Kept until the observer has their events: a dropped client stops, sent or not.
    let mut senders = Vec::new();
    for client in [with_predicate, with_builtin] {
        let ksync = replica(client).await?;
        ksync.connect().await?;
        let private = ksync
            .emit("note", json!({"private": true, "text": "mine"}))
            .await?
            .id;
        let public = ksync
            .emit("note", json!({"text": "for everyone"}))
            .await?
            .id;
        // Still stored locally: filters decide what syncs, not what is kept. (The room's
        // other public events arrive here too, so more than these two may be stored.)
        let state = ksync.state()?;
        assert!(state.contains_key(&private) && state.contains_key(&public));
        private_ids.push(private);
        public_ids.push(public);
        senders.push(ksync);
    }

    common::wait_until(Duration::from_secs(10), || {
        let state = observer.state().unwrap_or_default();
        public_ids.iter().all(|id| state.contains_key(id))
    })
    .await?;
    let state = observer.state()?;
    println!(
        "observer got {} public events and {} private ones",
        public_ids
            .iter()
            .filter(|id| state.contains_key(*id))
            .count(),
        private_ids
            .iter()
            .filter(|id| state.contains_key(*id))
            .count()
    );
    for ksync in senders.iter().chain([&observer]) {
        ksync.disconnect().await?;
    }
    Ok(())
}

async fn replica(client: WebSocketSyncClient) -> anyhow::Result<KSync<WebSocketSyncClient>> {
    Ok(KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(client))
        .build()
        .await?)
}
