//! The encryption middlewares on real `WebSocketSyncClient`s through a real relay on
//! 127.0.0.1:0: the relay stores only ciphertext, a replica with the key reads the plaintext,
//! a replica with another key stores nothing and is told why.

use std::sync::Arc;
use std::time::Duration;

use ksync_core::{
    Direction, InMemoryProvider, InMemoryStorage, KSync, LogName, Name, Notification,
    StorageProvider,
};
use ksync_middleware::{Decrypt, Encrypt, FieldCipher, Tap};
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::{Relay, RelayConfig};
use serde_json::json;

async fn replica(url: &str) -> KSync<WebSocketSyncClient> {
    KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(WebSocketSyncClient::new(url).expect("client")))
        .build()
        .await
        .expect("ksync")
}

fn with_cipher(ksync: &KSync<WebSocketSyncClient>, cipher: &FieldCipher) {
    ksync.client().use_middleware(
        Direction::Outgoing,
        Encrypt::new(cipher.clone()).only_types(["user_data"]),
    );
    ksync.client().use_middleware(
        Direction::Incoming,
        Decrypt::new(cipher.clone()).only_types(["user_data"]),
    );
}

async fn until(mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition reached within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sees_only_ciphertext() {
    let provider = Arc::new(InMemoryProvider::new());
    let relay = Relay::new(
        RelayConfig::default(),
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .expect("relay");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("ws://{}/ws/secrets", listener.local_addr().expect("addr"));
    let router = relay.router();
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });

    let cipher = FieldCipher::from_key([42; 32]);
    let (alice, bob, eve) = (
        replica(&url).await,
        replica(&url).await,
        replica(&url).await,
    );
    with_cipher(&alice, &cipher);
    with_cipher(&bob, &cipher);
    with_cipher(&eve, &FieldCipher::from_key([7; 32]));
    let tap = Tap::new("bob-in");
    bob.client()
        .use_middleware(Direction::Incoming, tap.clone());
    let mut eve_notes = eve.notifications();
    for k in [&alice, &bob, &eve] {
        k.connect().await.expect("connect");
    }

    let secret = alice
        .emit("user_data", json!({"ssn": "123-45-6789"}))
        .await
        .expect("emit");
    let public = alice
        .emit("page_view", json!({"path": "/home"}))
        .await
        .expect("emit");

    until(|| {
        let s = bob.state().expect("state");
        s.contains_key(&secret.id) && s.contains_key(&public.id)
    })
    .await;
    let at_bob = bob.state().expect("state");
    assert_eq!(
        at_bob[&secret.id], secret,
        "bob reads exactly what alice wrote"
    );
    assert_eq!(at_bob[&public.id], public);
    assert_eq!(tap.stats().events, 2);

    // The relay's log: the secret is an envelope, the page view is plain.
    let room = provider
        .open(&LogName::Room(Name::new("secrets").expect("name")))
        .expect("room");
    let stored = room.get(&secret.id, 1).expect("read").expect("stored");
    assert!(FieldCipher::is_encrypted(&stored.event.data));
    assert!(!stored.event.data.to_string().contains("123-45"));
    assert_eq!(
        room.get(&public.id, 1)
            .expect("read")
            .expect("stored")
            .event
            .data,
        json!({"path": "/home"})
    );

    // Eve (another key) gets the page view, an error for the secret, and never stores it.
    until(|| eve.state().expect("state").contains_key(&public.id)).await;
    let error = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Notification::Error(e)) = eve_notes.recv().await {
                return e;
            }
        }
    })
    .await
    .expect("an error notification");
    assert!(error.to_string().contains("decryption failed"), "{error}");
    assert!(!eve.state().expect("state").contains_key(&secret.id));

    for k in [&alice, &bob, &eve] {
        k.disconnect().await.expect("disconnect");
    }
    relay.shutdown().await;
    server.abort();
}
