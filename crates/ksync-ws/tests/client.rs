//! WebSocketSyncClient against an in-process relay.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{InMemoryStorage, KSync, Notification, NotificationKind};
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;
use serde_json::json;

async fn ksync(url: &str) -> KSync<WebSocketSyncClient> {
    let client = WebSocketSyncClient::builder(url).build().expect("client");
    KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::new(client))
        .build()
        .await
        .expect("ksync")
}

/// Waits until `f` holds, polling; panics after 5 s.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn spec_complete_example_two_replicas_converge() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(None);
    let a = ksync(&url).await;
    let b = ksync(&url).await;
    let mut b_events = b.notifications();
    a.connect().await.expect("a connects");
    b.connect().await.expect("b connects");
    let sent = a
        .emit(
            "user_action",
            json!({"action": "click", "button": "submit"}),
        )
        .await
        .expect("emit");
    let got = loop {
        if let Notification::Event(e) = b_events
            .next_of(NotificationKind::Event)
            .await
            .expect("event")
        {
            break e;
        }
    };
    assert_eq!(got, sent);
    // Received events are stored before the notification.
    assert!(
        b.replica()
            .storage()
            .get(&sent.id, 1)
            .expect("get")
            .is_some()
    );
    let storage = a.replica().storage().clone();
    eventually("a's ack cursor", || {
        a.replica().pending(0, 10).map(|p| p.len()).unwrap_or(0) == 1 && storage.len() == 1
    })
    .await;
    a.disconnect().await.expect("disconnect");
    b.disconnect().await.expect("disconnect");
    server.stop().await;
}
