//! Outgoing middlewares that change or hold back events, on real `WebSocketSyncClient`s
//! through a real relay on 127.0.0.1:0: what leaves, what the relay stores, what the emitter
//! keeps.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use ksync_core::{Direction, InMemoryStorage, ManualClock, Storage};
use ksync_middleware::{Overflow, RateLimit, Redact};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;

use common::{TestRelay, next_error, replica, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_changes_what_leaves_not_the_local_copy() {
    let relay = TestRelay::start().await;
    let url = relay.url("redacted");
    let storage = Arc::new(InMemoryStorage::new());
    let alice = ksync_testkit::ksync_over(
        Arc::clone(&storage) as Arc<dyn Storage>,
        WebSocketSyncClient::new(url.as_str()).expect("client"),
    )
    .await
    .expect("ksync");
    let bob = replica(&url).await;
    alice.client().use_middleware(
        Direction::Outgoing,
        Redact::fields(["password", "card.number"]).expect("paths"),
    );
    alice.connect().await.expect("connect");
    bob.connect().await.expect("connect");

    let signup = alice
        .emit(
            "signup",
            json!({"user": "ann", "password": "hunter2", "card": {"number": "4111", "exp": "12/29"}}),
        )
        .await
        .expect("emit");
    until(|| bob.state().expect("state").contains_key(&signup.id)).await;
    let redacted = json!({"user": "ann", "password": "[redacted]", "card": {"number": "[redacted]", "exp": "12/29"}});
    assert_eq!(bob.state().expect("state")[&signup.id].data, redacted);
    let at_relay = relay
        .room("redacted")
        .get(&signup.id, signup.version)
        .expect("read")
        .expect("stored");
    assert_eq!(at_relay.event.data, redacted);
    assert!(!at_relay.event.data.to_string().contains("hunter2"));
    assert_eq!(
        alice.state().expect("state")[&signup.id],
        signup,
        "local copy kept"
    );

    alice.disconnect().await.expect("disconnect");
    bob.disconnect().await.expect("disconnect");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outgoing_rate_limit_reports_what_it_holds_back() {
    let relay = TestRelay::start().await;
    let url = relay.url("limited");
    let (alice, bob) = (replica(&url).await, replica(&url).await);
    let clock = ManualClock::new(1_000_000);
    let limit = RateLimit::new(1, Duration::from_secs(3600), Overflow::Error)
        .expect("valid")
        .with_clock(Arc::new(clock.clone()));
    alice
        .client()
        .use_middleware(Direction::Outgoing, limit.clone());
    let mut alice_notes = alice.notifications();
    alice.connect().await.expect("connect");
    bob.connect().await.expect("connect");

    let first = alice.emit("note", json!({"n": 1})).await.expect("emit");
    until(|| bob.state().expect("state").contains_key(&first.id)).await;
    let second = alice.emit("note", json!({"n": 2})).await.expect("emit");
    let error = next_error(&mut alice_notes).await;
    assert!(
        error.contains("rate-limit") && error.contains("rate limit exceeded"),
        "{error}"
    );
    assert_eq!(limit.dropped(), 1);
    clock.advance(3_600_000);
    let third = alice.emit("note", json!({"n": 3})).await.expect("emit");
    until(|| bob.state().expect("state").contains_key(&third.id)).await;

    // The event over the rate stays with its emitter and does not go out later.
    assert!(alice.state().expect("state").contains_key(&second.id));
    assert!(!bob.state().expect("state").contains_key(&second.id));
    assert!(
        relay
            .room("limited")
            .get(&second.id, 1)
            .expect("read")
            .is_none()
    );
    alice.disconnect().await.expect("disconnect");
    bob.disconnect().await.expect("disconnect");
    relay.stop().await;
}
