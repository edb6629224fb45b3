//! The spec's sync filters (a predicate and the built-in `public-only`) on real
//! `WebSocketSyncClient`s through a real relay on 127.0.0.1:0, as the `sync_filters`
//! example runs them against `ksync serve`.

use crate::common;

use std::sync::Arc;

use ksync_core::{Filter, InMemoryStorage};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;

use common::{TestRelay, replica, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_clients_send_public_events_only() {
    let relay = TestRelay::start().await;
    let url = relay.url("filters");
    let observer = replica(&url).await;
    observer.connect().await.expect("connect");

    let with_predicate = WebSocketSyncClient::builder(url.as_str())
        .filter(Filter::predicate(|event| {
            event.data.get("private") != Some(&json!(true))
        }))
        .build()
        .expect("client");
    let with_builtin = WebSocketSyncClient::builder(url.as_str())
        .filter("public-only".parse().expect("built-in"))
        .build()
        .expect("client");
    let mut public_ids = Vec::new();
    let mut private_ids = Vec::new();
    let mut replicas = Vec::new();
    for client in [with_predicate, with_builtin] {
        let ksync = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
            .await
            .expect("ksync");
        ksync.connect().await.expect("connect");
        let private = ksync
            .emit("note", json!({"private": true, "text": "mine"}))
            .await
            .expect("emit");
        let public = ksync
            .emit("note", json!({"text": "for everyone"}))
            .await
            .expect("emit");
        let state = ksync.state().expect("state");
        assert!(state.contains_key(&private.id) && state.contains_key(&public.id));
        private_ids.push(private.id);
        public_ids.push(public.id);
        replicas.push(ksync);
    }

    until(|| {
        let state = observer.state().expect("state");
        public_ids.iter().all(|id| state.contains_key(id))
    })
    .await;
    let state = observer.state().expect("state");
    assert!(private_ids.iter().all(|id| !state.contains_key(id)));
    // Each filtered replica received the other's public event, and no private one.
    for (ksync, own_private) in replicas.iter().zip(&private_ids) {
        until(|| {
            let state = ksync.state().expect("state");
            public_ids.iter().all(|id| state.contains_key(id))
        })
        .await;
        let state = ksync.state().expect("state");
        assert_eq!(state.len(), 3, "both public events and its own private one");
        assert!(state.contains_key(own_private));
    }
    assert!(
        relay
            .room("filters")
            .read_since(0, 100)
            .expect("read")
            .len()
            == 2
    );

    for ksync in replicas.iter().chain([&observer]) {
        ksync.disconnect().await.expect("disconnect");
    }
    relay.stop().await;
}
