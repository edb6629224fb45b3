//! The relay's drain at shutdown, against a relay on 127.0.0.1:0 with file storage.

use crate::common;

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

/// What a log does before each flush (see [`FlushHookProvider`]).
type BeforeFlush = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// A log that runs `before` ahead of each flush: a room flushes its log before it closes its
/// connections at shutdown.
struct HookedFlush {
    log: Arc<dyn Storage>,
    before: BeforeFlush,
}

impl Storage for HookedFlush {
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
            (self.before)().await;
            self.log.flush().await
        })
    }
    ksync_testkit::storage_pass_through!(log);
}

/// File logs whose flushes run `before` first.
struct FlushHookProvider {
    files: FileProvider,
    before: BeforeFlush,
}

impl FlushHookProvider {
    fn new(dir: &std::path::Path, before: BeforeFlush) -> Arc<Self> {
        Arc::new(Self {
            files: FileProvider::new(dir).expect("provider"),
            before,
        })
    }

    /// File logs whose flushes take `delay` longer (a slow disk).
    fn slow(dir: &std::path::Path, delay: Duration) -> Arc<Self> {
        Self::new(dir, Arc::new(move || Box::pin(tokio::time::sleep(delay))))
    }

    fn wrap(&self, log: Arc<dyn Storage>) -> Arc<dyn Storage> {
        Arc::new(HookedFlush {
            log,
            before: Arc::clone(&self.before),
        })
    }
}

impl StorageProvider for FlushHookProvider {
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
    let provider = FlushHookProvider::slow(dir.path(), Duration::from_millis(600));
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.heartbeat = Duration::from_millis(100);
            relay_config
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
    // The drain sits in the rooms' flushes until the test has ended.
    let flushing = Arc::new(tokio::sync::watch::Sender::new(0usize));
    let provider = FlushHookProvider::new(dir.path(), {
        let flushing = Arc::clone(&flushing);
        Arc::new(move || {
            flushing.send_modify(|n| *n += 1);
            Box::pin(tokio::time::sleep(Duration::from_secs(60)))
        })
    });
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.heartbeat = Duration::from_millis(100);
            relay_config
        },
        provider,
        Arc::new(AllowAll),
    )
    .await;
    let (mut first, _) = join(&server.url(Some("first")), hello()).await;
    let (mut second, _) = join(&server.url(Some("second")), hello()).await;
    let relay = server.relay.clone();
    let stopping = tokio::spawn(async move { relay.shutdown().await });
    // Both rooms are in their flush, the drain stuck there: then its caller gives up.
    let mut flushes = flushing.subscribe();
    flushes.wait_for(|n| *n >= 2).await.expect("flushes");
    stopping.abort();
    for ws in [&mut first, &mut second] {
        let (code, reason) = recv_close(ws).await;
        assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    }
    server.task.abort();
}

/// The drain shuts every room down at once: a room's flush (an fsync with file storage) does
/// not wait for the other rooms' (one after the other, the drain grew by a flush per room).
#[tokio::test]
async fn the_drain_flushes_every_room_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    // Once armed, each flush waits until both rooms' have started: a drain that flushes one
    // room after the other never gets past the first.
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let together = Arc::new(tokio::sync::Barrier::new(2));
    let before: BeforeFlush = {
        let armed = Arc::clone(&armed);
        Arc::new(move || {
            let (armed, together) = (Arc::clone(&armed), Arc::clone(&together));
            Box::pin(async move {
                if armed.load(std::sync::atomic::Ordering::SeqCst) {
                    // Bounded, so a failing run ends instead of hanging.
                    let _ = tokio::time::timeout(Duration::from_secs(20), together.wait()).await;
                }
            })
        })
    };
    let provider = FlushHookProvider::new(dir.path(), before);
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
