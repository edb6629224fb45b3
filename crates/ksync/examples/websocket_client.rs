//! The spec's `WebSocketSyncClient`: constructor options, `connect`, `send`, the event
//! listeners, `disconnect`.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --example websocket_client`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ksync::{Event, Notification, SyncClient, WebSocketSyncClient};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let url = common::ws_url("examples");

    // new WebSocketSyncClient(url, { reconnect: true, heartbeat: 30000, compression: false })
    let sync_client = WebSocketSyncClient::builder(url.as_str())
        .reconnect(true)
        .heartbeat(Duration::from_secs(30))
        .compression(false)
        .build()?;

    // Connection events. `on` returns the unsubscribe handle (keep it, or drop it to keep the
    // handler for the client's lifetime).
    let _connected = sync_client.on("connected", Box::new(|_| println!("Connected to server")))?;
    let _disconnected = sync_client.on(
        "disconnected",
        Box::new(|_| println!("Disconnected from server")),
    )?;
    let _reconnecting = sync_client.on(
        "reconnecting",
        Box::new(|n| {
            if let Notification::Reconnecting { attempt } = n {
                println!("Reconnecting... attempt {attempt}");
            }
        }),
    )?;
    // Data events.
    let _event = sync_client.on(
        "event",
        Box::new(|n| {
            if let Notification::Event(event) = n {
                println!("Received event: {event:?}");
            }
        }),
    )?;
    let _sync = sync_client.on(
        "sync",
        Box::new(|n| {
            if let Notification::Sync(events) = n {
                println!("Synced {} events", events.len());
            }
        }),
    )?;
    // Error events.
    let _error = sync_client.on(
        "error",
        Box::new(|n| {
            if let Notification::Error(error) = n {
                eprintln!("Sync error: {error}");
            }
        }),
    )?;

    // A second client in the same room, to show `event` arriving.
    let listener = Arc::new(WebSocketSyncClient::new(url.as_str())?);
    let mut heard = listener.notifications();
    listener.connect().await?;

    sync_client.connect().await?;
    println!("Connected to sync server");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let id = format!("user-{now}");
    sync_client
        .send(Event::new(
            id.as_str(),
            "user_created",
            json!({"name": "John"}),
            now as u64,
        ))
        .await?;

    // Wait until the other client has it.
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match heard.recv().await {
                Ok(Notification::Event(e)) if e.id == id => return Some(e),
                Ok(_) | Err(ksync::StreamError::Lagged(_)) => {}
                Err(ksync::StreamError::Closed) => return None,
            }
        }
    })
    .await?;
    println!("the other client received: {got:?}");

    sync_client.disconnect().await?;
    listener.disconnect().await?;
    println!("Disconnected from sync server");
    Ok(())
}
