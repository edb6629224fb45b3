//! The spec's sync middleware: encrypt `user_data` events on the way out, decrypt them on the
//! way in, so the server only ever stores ciphertext.
//!
//! ```text
//! syncClient.use('outgoing', (event) => { if (event.type === 'user_data') event.data = encrypt(event.data); return event; });
//! syncClient.use('incoming', (event) => { if (event.type === 'user_data') event.data = decrypt(event.data); return event; });
//! ```
//!
//! Here `encrypt`/`decrypt` are ChaCha20-Poly1305 from `ksync::middleware`, keyed by a
//! passphrase every replica shares. A wrong key is an error (reported as an `error`
//! notification and the event is not stored), never garbage.
//!
//! Needs a server: `cargo run --release -p ksync-cli -- serve`, then
//! `cargo run -p ksync --features middleware --example middleware`. The passphrase is
//! `KSYNC_PASSPHRASE` (default `correct horse battery staple`): replicas with another one
//! cannot read the `user_data` events.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ksync::middleware::{Decrypt, Encrypt, FieldCipher, Redact, Tap};
use ksync::{Direction, Event, InMemoryStorage, KSync, Notification, WebSocketSyncClient};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::require_server().await;
    let url = common::ws_url("middleware");

    // Every replica derives the same key from the shared passphrase and salt.
    let cipher = FieldCipher::from_passphrase(
        &common::secret("KSYNC_PASSPHRASE", "correct horse battery staple"),
        b"ksync-example/user_data",
    )?;

    let alice = replica(WebSocketSyncClient::new(url.as_str())?).await?;
    let bob = replica(WebSocketSyncClient::new(url.as_str())?).await?;
    for ksync in [&alice, &bob] {
        let client = ksync.client();
        client.use_middleware(
            Direction::Outgoing,
            Encrypt::new(cipher.clone()).only_types(["user_data"]),
        );
        client.use_middleware(
            Direction::Incoming,
            Decrypt::new(cipher.clone()).only_types(["user_data"]),
        );
    }
    // A plain closure is a middleware too (here: never send a password anywhere).
    alice
        .client()
        .use_middleware(Direction::Outgoing, |mut event: Event| {
            if let Some(data) = event.data.as_object_mut() {
                data.remove("password");
            }
            Some(event)
        });
    // Ready-made redaction and a metrics tap.
    let tap = Tap::new("bob-incoming");
    bob.client()
        .use_middleware(Direction::Incoming, Redact::fields(["card.number"])?);
    bob.client()
        .use_middleware(Direction::Incoming, tap.clone());

    // A replica without the key sees only ciphertext, and its decrypt fails, typed.
    let eve = replica(WebSocketSyncClient::new(url.as_str())?).await?;
    let wrong_key = FieldCipher::from_key([0; 32]);
    eve.client().use_middleware(
        Direction::Incoming,
        Decrypt::new(wrong_key).only_types(["user_data"]),
    );
    let _eve_errors = eve.on("error", |n| {
        if let Notification::Error(e) = n {
            println!("eve: {e}");
        }
    })?;

    for ksync in [&alice, &bob, &eve] {
        ksync.connect().await?;
    }
    let event = alice
        .emit(
            "user_data",
            json!({"email": "alice@example.com", "card": {"number": "4111 1111", "exp": "12/29"}}),
        )
        .await?;

    common::wait_until(Duration::from_secs(10), || {
        bob.state().is_ok_and(|s| s.contains_key(&event.id))
    })
    .await?;
    println!("bob decrypted: {}", bob.state()?[&event.id].data);
    println!("bob's tap: {:?}", tap.stats());
    // Eve's replica never stores what it cannot decrypt.
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("eve stored it: {}", eve.state()?.contains_key(&event.id));

    for ksync in [&alice, &bob, &eve] {
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
