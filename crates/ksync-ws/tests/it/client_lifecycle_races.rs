//! WebSocketSyncClient: `connect` and `disconnect` called at the same time (from tasks, or
//! joined) end in the state the last call asked for.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{InMemoryStorage, KSync, SyncClient};
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;

async fn ksync(url: &str) -> KSync<WebSocketSyncClient> {
    let client = WebSocketSyncClient::builder(url)
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .expect("client");
    ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync")
}

#[tokio::test]
async fn connect_joined_with_disconnect_leaves_the_client_connected() {
    let server = start(RelayConfig::default()).await;
    let a = ksync(&server.url(None)).await;
    let client = Arc::clone(a.client());
    for round in 0..50 {
        client.connect().await.expect("connect");
        // The disconnect stops the manager whose session still shows up; the connect that
        // follows must not take that session for its own.
        let (disconnected, connected) = tokio::join!(client.disconnect(), client.connect());
        disconnected.expect("disconnect");
        connected.expect("connect");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            client.is_connected(),
            "round {round}: connect returned Ok, yet the client is not connected"
        );
    }
    client.disconnect().await.expect("disconnect");
    assert!(!client.is_connected());
    server.stop().await;
}

#[tokio::test]
async fn two_disconnects_at_once_both_return_once_disconnected() {
    let server = start(RelayConfig::default()).await;
    let a = ksync(&server.url(None)).await;
    let client = Arc::clone(a.client());
    for round in 0..50 {
        client.connect().await.expect("connect");
        let disconnect = || async {
            client.disconnect().await.expect("disconnect");
            client.is_connected()
        };
        let (first, second) = tokio::join!(disconnect(), disconnect());
        assert!(
            !first && !second,
            "round {round}: a disconnect returned while still connected ({first}, {second})"
        );
    }
    server.stop().await;
}
