//! Middlewares that fail or panic, on real `WebSocketSyncClient`s through a real relay on
//! 127.0.0.1:0: the failure is an `error` notification naming the middleware, the event it
//! failed on is neither stored half-done nor sent, and the client goes on syncing.

use crate::common;

use std::sync::Arc;

use ksync_core::{Direction, Event, InMemoryStorage, KSync};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;

use common::{TestRelay, next_error, replica, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_middleware_is_an_error_and_the_client_keeps_syncing() {
    let relay = TestRelay::start().await;
    let url = relay.url("panics");
    let (alice, bob) = (replica(&url).await, replica(&url).await);
    // Alice's outgoing chain panics on "bang", Bob's incoming chain on "boom".
    alice
        .client()
        .use_middleware(Direction::Outgoing, |event: Event| {
            assert_ne!(event.event_type, "bang", "outgoing middleware bug");
            Some(event)
        });
    bob.client()
        .use_middleware(Direction::Incoming, |event: Event| {
            assert_ne!(event.event_type, "boom", "incoming middleware bug");
            Some(event)
        });
    let (mut alice_notes, mut bob_notes) = (alice.notifications(), bob.notifications());
    alice.connect().await.expect("connect");
    bob.connect().await.expect("connect");

    let bang = alice.emit("bang", json!({"n": 1})).await.expect("emit");
    let alice_error = next_error(&mut alice_notes).await;
    assert!(
        alice_error.contains("panicked") && alice_error.contains("outgoing middleware bug"),
        "{alice_error}"
    );
    let boom = alice.emit("boom", json!({"n": 2})).await.expect("emit");
    let bob_error = next_error(&mut bob_notes).await;
    assert!(
        bob_error.contains("panicked") && bob_error.contains("incoming middleware bug"),
        "{bob_error}"
    );

    // Both clients are still running: later events go both ways.
    let after = alice.emit("note", json!({"n": 3})).await.expect("emit");
    until(|| bob.state().expect("state").contains_key(&after.id)).await;
    let reply = bob.emit("note", json!({"n": 4})).await.expect("emit");
    until(|| alice.state().expect("state").contains_key(&reply.id)).await;

    // Nothing half-applied: Alice keeps "bang" but never sent it; Bob stored no "boom".
    assert_eq!(alice.state().expect("state")[&bang.id], bang);
    assert!(alice.state().expect("state").contains_key(&boom.id));
    let at_bob = bob.state().expect("state");
    assert!(
        !at_bob.contains_key(&bang.id),
        "the panicking send went out"
    );
    assert!(
        !at_bob.contains_key(&boom.id),
        "the panicking receive was stored"
    );
    let room = relay.room("panics");
    assert!(room.get(&bang.id, 1).expect("read").is_none());

    alice.disconnect().await.expect("disconnect");
    bob.disconnect().await.expect("disconnect");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_filter_predicate_holds_the_event_back_and_the_client_keeps_syncing() {
    let relay = TestRelay::start().await;
    let url = relay.url("panicking-filter");
    let predicate = || {
        ksync_core::Filter::predicate(|event: &Event| {
            assert_ne!(event.event_type, "bang", "filter bug");
            true
        })
    };
    let client = |url: &str| {
        Arc::new(
            WebSocketSyncClient::builder(url)
                .filter(predicate())
                .build()
                .expect("client"),
        )
    };
    let alice = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(client(&url))
        .build()
        .await
        .expect("ksync");
    let bob = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(client(&url))
        .build()
        .await
        .expect("ksync");
    let carol = replica(&url).await;
    for k in [&alice, &bob, &carol] {
        k.connect().await.expect("connect");
    }

    // Alice's filter panics on her own "bang" (outgoing), Bob's on Carol's (incoming).
    let bang = alice.emit("bang", json!({"n": 1})).await.expect("emit");
    let carols_bang = carol.emit("bang", json!({"n": 2})).await.expect("emit");
    let after = alice.emit("note", json!({"n": 3})).await.expect("emit");
    let carols_note = carol.emit("note", json!({"n": 4})).await.expect("emit");
    until(|| {
        let state = bob.state().expect("state");
        state.contains_key(&after.id) && state.contains_key(&carols_note.id)
    })
    .await;
    let reply = bob.emit("note", json!({"n": 5})).await.expect("emit");
    until(|| alice.state().expect("state").contains_key(&reply.id)).await;

    let at_bob = bob.state().expect("state");
    assert!(!at_bob.contains_key(&bang.id) && !at_bob.contains_key(&carols_bang.id));
    assert!(alice.state().expect("state").contains_key(&bang.id));
    assert!(
        relay
            .room("panicking-filter")
            .get(&bang.id, 1)
            .expect("read")
            .is_none()
    );

    for k in [&alice, &bob, &carol] {
        k.disconnect().await.expect("disconnect");
    }
    relay.stop().await;
}
