//! `public-only` with an encrypting middleware, through a real relay: the filter sees the
//! event as the application made it, so a private event stays home even though it would go
//! out encrypted (before, the filter saw only the envelope and let it through).
use crate::common;
use common::{TestRelay, replica, until};
use ksync_core::{Direction, Filter, InMemoryStorage};
use ksync_middleware::{Decrypt, Encrypt, FieldCipher};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_only_holds_back_private_events_that_outgoing_middleware_encrypts() {
    let relay = TestRelay::start().await;
    let url = relay.url("private-encrypted");
    let cipher = FieldCipher::from_key([31; 32]);
    let alice = ksync_testkit::ksync_over(
        Arc::new(InMemoryStorage::new()),
        WebSocketSyncClient::builder(url.as_str())
            .filter(Filter::PublicOnly)
            .build()
            .expect("client"),
    )
    .await
    .expect("ksync");
    alice
        .client()
        .use_middleware(Direction::Outgoing, Encrypt::new(cipher.clone()));
    let bob = replica(&url).await;
    bob.client()
        .use_middleware(Direction::Incoming, Decrypt::new(cipher));
    alice.connect().await.expect("connect");
    bob.connect().await.expect("connect");
    let private = alice
        .emit("note", json!({"private": true, "text": "diary"}))
        .await
        .expect("emit");
    let public = alice
        .emit("note", json!({"text": "hello"}))
        .await
        .expect("emit");
    until(|| bob.state().expect("state").contains_key(&public.id)).await;
    assert!(
        !bob.state().expect("state").contains_key(&private.id),
        "the private event went out: {:?}",
        bob.state().expect("state").get(&private.id)
    );
    relay.stop().await;
}
