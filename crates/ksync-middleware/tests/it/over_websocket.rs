//! The encryption middlewares on real `WebSocketSyncClient`s through a real relay on
//! 127.0.0.1:0: the relay stores only ciphertext, a replica with the key reads the plaintext,
//! a replica with another key stores nothing and is told why.

use crate::common;

use std::sync::Arc;

use ksync_core::{Direction, InMemoryStorage, KSync};
use ksync_middleware::{Decrypt, Encrypt, FieldCipher, Tap};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;

use common::{TestRelay, next_error, replica, until};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sees_only_ciphertext() {
    let relay = TestRelay::start().await;
    let url = relay.url("secrets");

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
    let room = relay.room("secrets");
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
    let error = next_error(&mut eve_notes).await;
    assert!(error.to_string().contains("decryption failed"), "{error}");
    assert!(!eve.state().expect("state").contains_key(&secret.id));

    for k in [&alice, &bob, &eve] {
        k.disconnect().await.expect("disconnect");
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_empty_payloads_round_trip_encrypted() {
    let relay = TestRelay::start().await;
    let url = relay.url("sizes");
    let cipher = FieldCipher::from_key([5; 32]);
    let (alice, bob) = (replica(&url).await, replica(&url).await);
    with_cipher(&alice, &cipher);
    with_cipher(&bob, &cipher);
    alice.connect().await.expect("connect");
    bob.connect().await.expect("connect");

    // 600 KiB of text becomes about 800 KiB of base64: still under the relay's 1 MiB.
    let large = json!({"blob": "x".repeat(600 * 1024), "n": 1});
    let mut sent = Vec::new();
    for data in [json!(null), json!({}), json!(""), json!([]), large] {
        sent.push(alice.emit("user_data", data).await.expect("emit"));
    }
    until(|| {
        let state = bob.state().expect("state");
        sent.iter().all(|e| state.contains_key(&e.id))
    })
    .await;
    let (at_bob, room) = (bob.state().expect("state"), relay.room("sizes"));
    for event in &sent {
        assert_eq!(&at_bob[&event.id], event);
        let stored = room.get(&event.id, 1).expect("read").expect("stored");
        assert!(
            FieldCipher::is_encrypted(&stored.event.data),
            "{}",
            event.id
        );
    }

    alice.disconnect().await.expect("disconnect");
    bob.disconnect().await.expect("disconnect");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_given_the_right_key_later_does_not_read_back_what_it_skipped() {
    let relay = TestRelay::start().await;
    let url = relay.url("rekeyed");
    let cipher = FieldCipher::from_key([21; 32]);
    let alice = replica(&url).await;
    with_cipher(&alice, &cipher);
    alice.connect().await.expect("connect");
    let secret = alice
        .emit("user_data", json!({"pin": "0000"}))
        .await
        .expect("emit");

    // Bob first runs with a wrong key: the secret is refused and not stored.
    let storage = Arc::new(InMemoryStorage::new());
    let bob_with = |cipher: FieldCipher| {
        let (storage, url) = (Arc::clone(&storage), url.clone());
        async move {
            let bob = ksync_testkit::ksync_over(
                storage,
                WebSocketSyncClient::new(url.as_str()).expect("client"),
            )
            .await
            .expect("ksync");
            with_cipher(&bob, &cipher);
            bob
        }
    };
    let bob = bob_with(FieldCipher::from_key([22; 32])).await;
    let mut notes = bob.notifications();
    bob.connect().await.expect("connect");
    assert!(next_error(&mut notes).await.contains("decryption failed"));
    assert!(!bob.state().expect("state").contains_key(&secret.id));
    bob.disconnect().await.expect("disconnect");
    drop(bob);

    // With the right key, later events arrive; the skipped one does not come back.
    let bob = bob_with(cipher).await;
    bob.connect().await.expect("connect");
    let later = alice
        .emit("user_data", json!({"pin": "1111"}))
        .await
        .expect("emit");
    until(|| bob.state().expect("state").contains_key(&later.id)).await;
    assert!(!bob.state().expect("state").contains_key(&secret.id));

    alice.disconnect().await.expect("disconnect");
    bob.disconnect().await.expect("disconnect");
    relay.stop().await;
}
