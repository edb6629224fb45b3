//! The spec's WebSocket "Complete Example": `KSync` with `InMemoryStorage` and a
//! `WebSocketSyncClient` (JWT auth, reconnect, 30 s heartbeat); events emitted sync in real
//! time.
//!
//! Needs a server without authentication (its second replica connects without credentials):
//! `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --example websocket_complete`. The first replica presents `KSYNC_JWT`
//! (default `your-token`, which such a server accepts).

mod common;

use std::sync::Arc;
use std::time::Duration;

use ksync::{Auth, InMemoryStorage, KSync, WebSocketSyncClient};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let url = common::ws_url("examples");

    let ksync = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(
            WebSocketSyncClient::builder(url.as_str())
                .auth(Auth::jwt(common::secret("KSYNC_JWT", "your-token")))
                .reconnect(true)
                .heartbeat(Duration::from_secs(30))
                .build()?,
        ))
        .build()
        .await?;

    // A second replica in the same room, to watch the event arrive.
    let other = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(WebSocketSyncClient::new(url.as_str())?))
        .build()
        .await?;
    other.connect().await?;

    // Connect and start syncing.
    ksync.connect().await?;

    // Events will automatically sync in real time.
    let event = ksync
        .emit(
            "user_action",
            json!({"action": "click", "button": "submit"}),
        )
        .await?;
    println!("emitted {} ({})", event.id, event.event_type);

    common::wait_until(Duration::from_secs(10), || {
        other.state().is_ok_and(|s| s.contains_key(&event.id))
    })
    .await?;
    println!(
        "the other replica has it: {:?}",
        other.state()?.get(&event.id)
    );

    ksync.disconnect().await?;
    other.disconnect().await?;
    Ok(())
}
