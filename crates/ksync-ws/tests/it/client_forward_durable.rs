//! WebSocketSyncClient as a bridge: another replica's event handed to `send` after the client
//! had acknowledged past it reaches the room, also when that publish fails or the process
//! restarts before it goes out.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use ksync_core::{
    AllowAll, BoxFuture, Event, InMemoryProvider, InMemoryStorage, KSync, LogName, MergeOutcome,
    Storage, StorageError, StorageProvider, Stored, SyncClient,
};
use ksync_storage_file::FileStorage;
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;
use serde_json::json;

fn quick(url: &str) -> WebSocketSyncClient {
    WebSocketSyncClient::builder(url)
        .reconnect_delay(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .expect("client")
}

async fn ksync_over(storage: Arc<dyn Storage>, url: &str) -> KSync<WebSocketSyncClient> {
    ksync_testkit::ksync_over(storage, quick(url))
        .await
        .expect("ksync")
}

/// An event another replica made, which this one only received.
fn foreign() -> Event {
    Event::new("x", "note", json!({"n": 1}), 1).with_origin("other-replica")
}

/// Waits until the bridge acknowledged everything up to `seq`.
async fn acked_upto(bridge: &KSync<WebSocketSyncClient>, url: &str, seq: u64) {
    let name = format!("ws:{url}/acked");
    eventually("the bridge's events acknowledged", || {
        bridge.replica().cursor(&name).expect("cursor") >= seq
    })
    .await;
}

/// Reads the room from its start with a fresh client until it holds `id`; panics after 10 s.
async fn room_gets(url: &str, id: &str) {
    let reader = ksync_over(Arc::new(InMemoryStorage::new()), url).await;
    reader.connect().await.expect("reader connects");
    let storage = Arc::clone(reader.replica().storage());
    eventually(&format!("{id} in the room"), || {
        storage.latest(id).ok().flatten().is_some()
    })
    .await;
    reader.disconnect().await.expect("disconnect");
}

#[tokio::test]
async fn a_forward_behind_the_ack_cursor_goes_out_after_a_restart() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("bridge-restart"));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bridge.log");
    {
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&path).expect("open"));
        let bridge = ksync_over(storage, &url).await;
        // Received (not to be sent on), then one of our own after it.
        bridge
            .replica()
            .ingest(vec![foreign()])
            .await
            .expect("ingest");
        bridge.emit("mine", json!(2)).await.expect("emit");
        bridge.connect().await.expect("connect");
        acked_upto(&bridge, &url, 2).await;
        bridge.disconnect().await.expect("disconnect");
        // Now handed over to be sent on; the process stops before any session publishes it.
        bridge.client().send(foreign()).await.expect("forward");
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&path).expect("reopen"));
    let bridge = ksync_over(storage, &url).await;
    bridge.connect().await.expect("connect");
    room_gets(&url, "x").await;
    bridge.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// A room log whose first append holding event `x` fails.
struct FailsX {
    log: Arc<dyn Storage>,
    failed: Arc<AtomicBool>,
}

impl Storage for FailsX {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        Box::pin(async move {
            if events.iter().any(|e| e.id == "x") && !self.failed.swap(true, Ordering::SeqCst) {
                return Err(StorageError::Io {
                    context: "appending (test)".into(),
                    source: std::io::Error::other("disk gone"),
                });
            }
            self.log.append(events).await
        })
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    ksync_testkit::storage_pass_through!(log);
}

struct FailsXProvider {
    inner: InMemoryProvider,
    failed: Arc<AtomicBool>,
}

impl StorageProvider for FailsXProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(Arc::new(FailsX {
            log: self.inner.open(name)?,
            failed: Arc::clone(&self.failed),
        }))
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        Ok(self.inner.existing(name)?.map(|log| {
            Arc::new(FailsX {
                log,
                failed: Arc::clone(&self.failed),
            }) as Arc<dyn Storage>
        }))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.inner.list()
    }
}

#[tokio::test]
async fn a_forward_behind_the_ack_cursor_goes_out_again_after_a_failed_publish() {
    let failed = Arc::new(AtomicBool::new(false));
    let provider = Arc::new(FailsXProvider {
        inner: InMemoryProvider::new(),
        failed: Arc::clone(&failed),
    });
    let server = start_with(RelayConfig::default(), provider, Arc::new(AllowAll)).await;
    let url = server.url(Some("bridge-failure"));
    let bridge = ksync_over(Arc::new(InMemoryStorage::new()), &url).await;
    let rec = Recorder::attach(bridge.client().as_ref());
    bridge
        .replica()
        .ingest(vec![foreign()])
        .await
        .expect("ingest");
    let mine = bridge.emit("mine", json!(2)).await.expect("emit");
    bridge.connect().await.expect("connect");
    acked_upto(&bridge, &url, 2).await;
    bridge.client().send(foreign()).await.expect("forward");
    room_gets(&url, "x").await;
    assert!(
        failed.load(Ordering::SeqCst),
        "the first publish of x failed"
    );
    // Sent again with x, our own event is a duplicate in the room, not news to us.
    let seen = rec.event_ids();
    assert!(
        !seen.contains(&mine.id) && !seen.iter().any(|id| id == "x"),
        "{seen:?}"
    );
    bridge.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// Another replica's event handed over that collides with a revision held here is settled
/// by the conflict policy, as a received one is: the application hears of the conflict (a
/// `conflict` notification, as the P2P client gives), and the settling revision goes out.
#[tokio::test]
async fn a_forward_that_collides_is_reported_as_a_conflict() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("bridge-conflict"));
    let bridge = ksync_over(Arc::new(InMemoryStorage::new()), &url).await;
    bridge
        .replica()
        .ingest(vec![foreign()])
        .await
        .expect("ingest");
    let rec = Recorder::attach(bridge.client().as_ref());
    bridge.connect().await.expect("connect");
    let other = Event::new("x", "note", json!({"n": 2}), 2).with_origin("third-replica");
    bridge.client().send(other).await.expect("forward");
    assert_eq!(
        rec.count(|n| matches!(n, ksync_core::Notification::Conflict(_))),
        1,
        "the collision is reported"
    );
    let storage = Arc::clone(bridge.replica().storage());
    eventually("the settling revision stored", || {
        storage
            .latest("x")
            .ok()
            .flatten()
            .is_some_and(|x| x.event.version == 2)
    })
    .await;
    room_gets(&url, "x").await;
    bridge.disconnect().await.expect("disconnect");
    server.stop().await;
}
