//! The relay's drain at shutdown, against a relay on 127.0.0.1:0 with file storage.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{
    AllowAll, BoxFuture, Event, LogName, MergeOutcome, Storage, StorageError, StorageProvider,
    Stored,
};
use ksync_storage_file::FileProvider;
use ksync_ws::server::RelayConfig;

/// A log whose flush takes `delay` longer (a slow disk): a room flushes its log before it
/// closes its connections at shutdown.
struct SlowFlush {
    log: Arc<dyn Storage>,
    delay: Duration,
}

impl Storage for SlowFlush {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        self.log.append(events)
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.remove_meta(key)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.log.flush().await
        })
    }
    ksync_testkit::storage_pass_through!(log);
}

/// File logs whose flushes are slow.
struct SlowFlushProvider {
    files: FileProvider,
    delay: Duration,
}

impl SlowFlushProvider {
    fn wrap(&self, log: Arc<dyn Storage>) -> Arc<dyn Storage> {
        Arc::new(SlowFlush {
            log,
            delay: self.delay,
        })
    }
}

impl StorageProvider for SlowFlushProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(self.wrap(self.files.open(name)?))
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        Ok(self.files.existing(name)?.map(|log| self.wrap(log)))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.files.list()
    }
    fn flush_all(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.files.flush_all()
    }
}

/// The relay stops reading its clients when the drain begins, so it cannot see their pongs:
/// a room that takes several heartbeats to close (its flush is slow) must still close its
/// connections with 1001, not with the heartbeat's 4009.
#[tokio::test]
async fn a_drain_longer_than_a_heartbeat_still_closes_with_1001() {
    let dir = tempfile::tempdir().expect("dir");
    let provider = Arc::new(SlowFlushProvider {
        files: FileProvider::new(dir.path()).expect("provider"),
        delay: Duration::from_millis(600),
    });
    let server = start_with(
        RelayConfig {
            heartbeat: Duration::from_millis(100),
            ..RelayConfig::default()
        },
        provider,
        Arc::new(AllowAll),
    )
    .await;
    // Reading the socket answers the relay's pings.
    let (mut ws, _) = join(&server.url(None), hello()).await;
    let relay = server.relay.clone();
    let stopping = tokio::spawn(async move { relay.shutdown().await });
    let (code, reason) = recv_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    stopping.await.expect("drained");
    server.task.abort();
}

/// A caller that gives up on `Relay::shutdown` (a timeout of its own around it) leaves the
/// drain half-way: the rooms it had not reached get no shutdown, and their connections, no
/// longer read, were never closed. Each connection closes itself with 1001 by its second
/// heartbeat of the drain.
#[tokio::test]
async fn a_drain_its_caller_abandons_still_closes_every_connection_with_1001() {
    let dir = tempfile::tempdir().expect("dir");
    let provider = Arc::new(SlowFlushProvider {
        files: FileProvider::new(dir.path()).expect("provider"),
        // The drain sits in the first room's flush until the test has ended.
        delay: Duration::from_secs(60),
    });
    let server = start_with(
        RelayConfig {
            heartbeat: Duration::from_millis(100),
            ..RelayConfig::default()
        },
        provider,
        Arc::new(AllowAll),
    )
    .await;
    let (mut first, _) = join(&server.url(Some("first")), hello()).await;
    let (mut second, _) = join(&server.url(Some("second")), hello()).await;
    let relay = server.relay.clone();
    let stopping = tokio::spawn(async move { relay.shutdown().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    stopping.abort();
    for ws in [&mut first, &mut second] {
        let (code, reason) = recv_close(ws).await;
        assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    }
    server.task.abort();
}

/// File logs whose flushes, once armed, each wait until `rooms` of them have started: a
/// drain that flushes one room after the other never gets past the first.
struct FlushTogether {
    files: FileProvider,
    armed: Arc<std::sync::atomic::AtomicBool>,
    together: Arc<tokio::sync::Barrier>,
}

struct FlushTogetherLog {
    log: Arc<dyn Storage>,
    armed: Arc<std::sync::atomic::AtomicBool>,
    together: Arc<tokio::sync::Barrier>,
}

impl Storage for FlushTogetherLog {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        self.log.append(events)
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.remove_meta(key)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            if self.armed.load(std::sync::atomic::Ordering::SeqCst) {
                // Bounded, so a failing run ends instead of hanging.
                let _ = tokio::time::timeout(Duration::from_secs(20), self.together.wait()).await;
            }
            self.log.flush().await
        })
    }
    ksync_testkit::storage_pass_through!(log);
}

impl FlushTogether {
    fn wrap(&self, log: Arc<dyn Storage>) -> Arc<dyn Storage> {
        Arc::new(FlushTogetherLog {
            log,
            armed: Arc::clone(&self.armed),
            together: Arc::clone(&self.together),
        })
    }
}

impl StorageProvider for FlushTogether {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(self.wrap(self.files.open(name)?))
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        Ok(self.files.existing(name)?.map(|log| self.wrap(log)))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        self.files.list()
    }
    fn flush_all(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.files.flush_all()
    }
}

/// The drain shuts every room down at once: a room's flush (an fsync with file storage) does
/// not wait for the other rooms' (one after the other, the drain grew by a flush per room).
#[tokio::test]
async fn the_drain_flushes_every_room_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let provider = Arc::new(FlushTogether {
        files: FileProvider::new(dir.path()).expect("provider"),
        armed: Arc::clone(&armed),
        together: Arc::new(tokio::sync::Barrier::new(2)),
    });
    let server = start_with(RelayConfig::default(), provider, Arc::new(AllowAll)).await;
    let (mut first, _) = join(&server.url(Some("first")), hello()).await;
    let (mut second, _) = join(&server.url(Some("second")), hello()).await;
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let relay = server.relay.clone();
    let stopping = tokio::spawn(async move { relay.shutdown().await });
    for ws in [&mut first, &mut second] {
        let (code, reason) = recv_close(ws).await;
        assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    }
    stopping.await.expect("drained");
    server.task.abort();
}
