//! The relay over a file log that fails one `fdatasync`: the failed publish is acknowledged
//! `failed`, the room closes (its connections resume from their cursors) and the next join
//! reopens the log, so that publishing goes on while a watcher stays connected.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{AllowAll, InMemoryStorage, KSync, LogName, Name, StorageProvider};
use ksync_storage_file::{FailNextSync, FileProvider, FileStorageOptions};
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;
use serde_json::{Value, json};

/// Publishes `events` with `reference` and returns the ack's results.
async fn publish(ws: &mut Raw, reference: u64, events: Vec<Value>) -> Vec<Value> {
    send_json(
        ws,
        json!({"type": "publish", "ref": reference, "events": events}),
    )
    .await;
    loop {
        let reply = recv_json(ws).await;
        if reply["type"] == "ack" && reply["ref"] == reference {
            return reply["results"].as_array().expect("results").clone();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_reopens_its_log_after_a_failed_sync_while_a_watcher_stays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FailNextSync::default());
    let mut options = FileStorageOptions::default();
    options.fault_hook = Some(faults.clone());
    let provider = Arc::new(FileProvider::with_options(dir.path(), options).expect("provider"));
    let server = start_with(
        RelayConfig::default(),
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(AllowAll),
    )
    .await;
    let url = server.url(Some("flaky"));

    // The watcher: a client with a replica, which resumes from its cursor after a close.
    let client = WebSocketSyncClient::builder(&url)
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .expect("client");
    let watcher = ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
        .await
        .expect("ksync");
    watcher.connect().await.expect("connect");
    let seen = |watcher: &KSync<WebSocketSyncClient>| -> Vec<String> {
        watcher
            .replica()
            .storage()
            .read_since(0, 100)
            .expect("read")
            .into_iter()
            .map(|s| s.event.id)
            .collect()
    };

    let (mut ws, _) = join(&url, hello()).await;
    let results = publish(&mut ws, 1, vec![event("a", 1)]).await;
    assert_eq!(results, [json!({"status": "stored", "seq": 1})]);
    eventually("the watcher has a", || seen(&watcher) == ["a"]).await;

    faults.arm();
    let results = publish(&mut ws, 2, vec![event("b", 2)]).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["status"], "failed", "{results:?}");

    // What the client does next: it sends b again (after its reconnect: the relay closed the
    // room, and with it this connection). It is stored.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let stored = loop {
        let (mut again, _) = join(&url, hello()).await;
        let results = publish(&mut again, 1, vec![event("b", 2)]).await;
        if results[0]["status"] == "stored" {
            break results;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b is never stored again: {results:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stored, [json!({"status": "stored", "seq": 2})]);
    // The publisher's old connection was told to resume (1001), after its failed ack.
    let (code, _) = recv_close(&mut ws).await;
    assert_eq!(code, 1001);

    // The room, read from 0, holds a and b once each; nothing failed shows up.
    let room = provider
        .existing(&LogName::Room(Name::new("flaky").expect("name")))
        .expect("existing")
        .expect("room");
    let ids: Vec<(u64, String)> = room
        .read_since(0, 100)
        .expect("read")
        .into_iter()
        .map(|s| (s.seq, s.event.id))
        .collect();
    assert_eq!(ids, [(1, "a".to_owned()), (2, "b".to_owned())]);
    let (mut reader, welcome) = join(
        &url,
        json!({"type": "hello", "protocol": ksync_core::PROTOCOL_VERSION, "since": 0}),
    )
    .await;
    assert_eq!(welcome["serverVersion"], 2);
    let batch = recv_json(&mut reader).await;
    let relayed: Vec<&Value> = batch["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| &e["event"]["id"])
        .collect();
    assert_eq!(relayed, [&json!("a"), &json!("b")], "{batch}");

    // The watcher (after its own resume) has every stored event, once.
    eventually("the watcher has a and b", || seen(&watcher) == ["a", "b"]).await;
    watcher.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// A file provider on a disk that is full while `full` is set: making a new log fails as
/// `FileProvider` does then (an IO error of kind `StorageFull`, nothing left behind).
struct FullDisk {
    inner: FileProvider,
    full: std::sync::atomic::AtomicBool,
}

impl StorageProvider for FullDisk {
    fn open(
        &self,
        name: &LogName,
    ) -> Result<Arc<dyn ksync_core::Storage>, ksync_core::StorageError> {
        if self.full.load(std::sync::atomic::Ordering::SeqCst)
            && self.inner.existing(name)?.is_none()
        {
            return Err(ksync_core::StorageError::Io {
                context: "writing a new log".into(),
                source: std::io::Error::from_raw_os_error(28),
            });
        }
        self.inner.open(name)
    }
    fn existing(
        &self,
        name: &LogName,
    ) -> Result<Option<Arc<dyn ksync_core::Storage>>, ksync_core::StorageError> {
        self.inner.existing(name)
    }
    fn list(&self) -> Result<Vec<LogName>, ksync_core::StorageError> {
        self.inner.list()
    }
    fn release_discarding_empty(&self, name: &LogName) {
        self.inner.release_discarding_empty(name)
    }
}

/// A new room on a full disk is refused before the upgrade with 507 `storage full` (clients
/// retry it later), not 500; the relay stays up, stored rooms go on, and once space is freed
/// the room opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_room_on_a_full_disk_is_refused_with_507_until_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = Arc::new(FullDisk {
        inner: FileProvider::new(dir.path()).expect("provider"),
        full: std::sync::atomic::AtomicBool::new(false),
    });
    let server = start_with(
        RelayConfig::default(),
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(AllowAll),
    )
    .await;
    let (mut stored, _) = join(&server.url(Some("stored")), hello()).await;
    provider
        .full
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let request = {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        server
            .url(Some("new"))
            .into_client_request()
            .expect("request")
    };
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 507);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or(b""))
                .expect("a JSON body");
            assert_eq!(body, json!({"error": "storage full"}));
        }
        other => panic!("a new room on a full disk: {:?}", other.map(|_| ())),
    }
    // An open room still answers (its writes would meet the full disk, as any write).
    let results = publish(&mut stored, 1, vec![]).await;
    assert!(results.is_empty());
    provider
        .full
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (mut new, _) = join(&server.url(Some("new")), hello()).await;
    let results = publish(&mut new, 1, vec![event("a", 1)]).await;
    assert_eq!(results, [json!({"status": "stored", "seq": 1})]);
}
