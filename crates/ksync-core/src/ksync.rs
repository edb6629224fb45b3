//! `KSync`: a replica plus a sync client, as in the spec's examples.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::{PullPushClient, PullResult, PushResult, SyncClient, SyncResult};
use crate::clock::{Clock, SystemClock};
use crate::conflict::{Conflict, Resolution};
use crate::error::SyncError;
use crate::event::{Event, EventLimits};
use crate::log::Stored;
use crate::notify::{Notification, NotificationStream, Subscription};
use crate::replica::Replica;
use crate::storage::Storage;

/// The orchestrator: owns a [`Replica`] (storage + identity + conflict policy) and drives one
/// [`SyncClient`].
///
/// `emit` stores first, then sends; events emitted while disconnected stay in storage and go
/// out when the client connects. Received events are stored (deduplicated, conflicts settled)
/// by the client through the replica before any `event` notification.
///
/// ```no_run
/// # async fn demo(client: std::sync::Arc<dyn ksync_core::SyncClient>) -> Result<(), ksync_core::SyncError> {
/// use std::sync::Arc;
/// use ksync_core::{InMemoryStorage, KSync};
/// let ksync = KSync::builder()
///     .storage(Arc::new(InMemoryStorage::new()))
///     .sync_client(client)
///     .build()
///     .await?;
/// ksync.connect().await?;
/// ksync.emit("user_action", serde_json::json!({"action": "click", "button": "submit"})).await?;
/// # Ok(()) }
/// ```
pub struct KSync<C: SyncClient + ?Sized = dyn SyncClient> {
    replica: Replica,
    client: Arc<C>,
    clock: Arc<dyn Clock>,
    auto_sync: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<C: SyncClient + ?Sized> fmt::Debug for KSync<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KSync")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// Builds a [`KSync`].
pub struct KSyncBuilder<C: SyncClient + ?Sized> {
    storage: Option<Arc<dyn Storage>>,
    client: Option<Arc<C>>,
    clock: Arc<dyn Clock>,
    replica_id: Option<String>,
}

impl KSync<dyn SyncClient> {
    /// Starts building a `KSync` over any client (`Arc<dyn SyncClient>` or a concrete one).
    pub fn builder<C: SyncClient + ?Sized>() -> KSyncBuilder<C> {
        KSyncBuilder {
            storage: None,
            client: None,
            clock: Arc::new(SystemClock),
            replica_id: None,
        }
    }
}

impl<C: SyncClient + ?Sized> KSyncBuilder<C> {
    /// Where events are kept (required).
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.storage = Some(storage);
        self
    }

    /// The transport (required).
    pub fn sync_client(mut self, client: Arc<C>) -> Self {
        self.client = Some(client);
        self
    }

    /// The clock for event timestamps (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Fixes the replica id instead of the one kept in storage. Without it, a storage used for
    /// the first time takes the client's [`SyncClient::preferred_replica_id`] (a P2P
    /// `peerId`), else a random id, and keeps it.
    pub fn replica_id(mut self, id: impl Into<String>) -> Self {
        self.replica_id = Some(id.into());
        self
    }

    /// Opens the replica and attaches the client to it.
    pub async fn build(self) -> Result<KSync<C>, SyncError> {
        let storage = self
            .storage
            .ok_or_else(|| SyncError::Config("KSync needs a storage".into()))?;
        let client = self
            .client
            .ok_or_else(|| SyncError::Config("KSync needs a sync client".into()))?;
        let replica = match self.replica_id {
            Some(id) => Replica::with_id(storage, id),
            None => Replica::open_preferring(storage, client.preferred_replica_id()).await?,
        };
        client.attach(replica.clone());
        Ok(KSync {
            replica,
            client,
            clock: self.clock,
            auto_sync: Mutex::new(None),
        })
    }
}

impl<C: SyncClient + ?Sized> KSync<C> {
    /// Connects the client. What follows depends on the transport: a real-time client
    /// (WebSocket, peer-to-peer) sends the pending events and keeps syncing; a pull/push client
    /// (Git-like HTTP) checks its repository and starts its automatic pulls, and pending events
    /// wait for [`push`](Self::push) or [`sync`](Self::sync) (or auto-sync).
    pub async fn connect(&self) -> Result<(), SyncError> {
        self.client.connect().await
    }

    /// The spec's name for `connect` on peer-to-peer clients.
    pub async fn start(&self) -> Result<(), SyncError> {
        self.connect().await
    }

    /// Disconnects the client (and stops auto-sync).
    pub async fn disconnect(&self) -> Result<(), SyncError> {
        self.disable_auto_sync();
        self.client.disconnect().await
    }

    /// Makes a new event (fresh id, version 1, now, our origin), stores it, then sends it.
    ///
    /// Returns once the event is stored. If the client is not connected, the event waits in
    /// storage and goes out on connect; a send failure is reported as an `error` notification.
    /// An event outside the default [`EventLimits`] (empty or over-long `type`) is
    /// [`SyncError::InvalidEvent`] and is not stored: every server would refuse it, and it
    /// would wait in the log forever.
    pub async fn emit(
        &self,
        event_type: impl Into<String>,
        data: serde_json::Value,
    ) -> Result<Event, SyncError> {
        let event = Event {
            id: uuid::Uuid::now_v7().to_string(),
            event_type: event_type.into(),
            data,
            timestamp: self.clock.now_millis(),
            version: 1,
            origin: Some(self.replica.id().to_owned()),
        };
        event.validate(&EventLimits::default())?;
        self.store_and_send(event).await
    }

    /// Writes a new revision of `id` (its latest version + 1, or 1 for an id not held yet)
    /// with new content. An event that breaks the event rules ([`Event::validate`]: an empty
    /// or over-long `id` or `type`, `data` too deep or too large) is
    /// [`SyncError::InvalidEvent`], as for [`KSync::emit`], and nothing is stored.
    pub async fn update(
        &self,
        id: &str,
        event_type: impl Into<String>,
        data: serde_json::Value,
    ) -> Result<Event, SyncError> {
        // Checked once up front, data included: only the version (and the clock) changes
        // between attempts, so the check is of the longest it can be, the highest version.
        let probe = Event {
            id: id.to_owned(),
            event_type: event_type.into(),
            data,
            timestamp: self.clock.now_millis(),
            version: crate::MAX_EVENT_INTEGER,
            origin: Some(self.replica.id().to_owned()),
        };
        probe.validate(&EventLimits::default())?;
        let Event {
            event_type, data, ..
        } = probe;
        let stored = self
            .replica
            .record_local_revision(id, |version| Event {
                id: id.to_owned(),
                event_type: event_type.clone(),
                data: data.clone(),
                timestamp: self.clock.now_millis(),
                version,
                origin: Some(self.replica.id().to_owned()),
            })
            .await?;
        self.send(stored.event).await
    }

    async fn store_and_send(&self, event: Event) -> Result<Event, SyncError> {
        self.replica.record_local(event.clone()).await?;
        self.send(event).await
    }

    /// Hands a locally stored event to the client; not being connected is no error (the event
    /// is in the log and goes out when the client next syncs).
    async fn send(&self, event: Event) -> Result<Event, SyncError> {
        match self.client.send(event.clone()).await {
            Ok(()) | Err(SyncError::NotConnected) => {}
            Err(e) => self
                .client
                .notifier()
                .emit(Notification::Error(Arc::new(e))),
        }
        Ok(event)
    }

    /// Registers a notification handler on the client (`connected`, `event`, `conflict`, ...).
    pub fn on(
        &self,
        kind: &str,
        handler: impl Fn(&Notification) + Send + Sync + 'static,
    ) -> Result<Subscription, SyncError> {
        self.client.notifier().on(kind, handler)
    }

    /// A typed stream of the client's notifications.
    pub fn notifications(&self) -> NotificationStream {
        self.client.notifier().stream()
    }

    /// Sets how conflicts are settled (default: last-write-wins). Conflicts are still reported
    /// as `conflict` notifications. A resolver that panics, or a `Merged` event that is not
    /// valid, means last-write-wins for that conflict; a conflict with a revision this replica
    /// wrote to settle an earlier one is settled by last-write-wins too, so that replicas that
    /// each keep their own side still converge (see [`Replica::ingest`]).
    pub fn on_conflict(&self, resolver: impl Fn(&Conflict) -> Resolution + Send + Sync + 'static) {
        self.replica.set_resolver(Some(Arc::new(resolver)));
    }

    /// The replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The client.
    pub fn client(&self) -> &Arc<C> {
        &self.client
    }

    /// Up to `limit` stored events after `after`.
    pub fn events_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, SyncError> {
        Ok(self.replica.storage().read_since(after, limit)?)
    }

    /// The materialised state: latest version of every id.
    pub fn state(&self) -> Result<std::collections::BTreeMap<String, Event>, SyncError> {
        Ok(self.replica.storage().state()?)
    }

    /// Stops auto-sync if it runs.
    pub fn disable_auto_sync(&self) {
        if let Some(task) = self
            .auto_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// Intervals for [`KSync::enable_auto_sync`]. A zero interval disables that half.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AutoSync {
    /// How often to push (the spec's `pushInterval`).
    pub push_interval: Duration,
    /// How often to pull (the spec's `pullInterval`).
    pub pull_interval: Duration,
}

impl<C: PullPushClient + ?Sized> KSync<C> {
    /// Pulls from the server.
    pub async fn pull(&self) -> Result<PullResult, SyncError> {
        self.client.pull().await
    }

    /// Pushes pending events.
    pub async fn push(&self) -> Result<PushResult, SyncError> {
        self.client.push().await
    }

    /// Pull then push.
    pub async fn sync(&self) -> Result<SyncResult, SyncError> {
        self.client.sync().await
    }

    /// Pushes and pulls on timers until [`KSync::disable_auto_sync`] or `disconnect`: a push
    /// and a pull at once, then one of each per interval (a tick that comes while the last
    /// push or pull still runs waits for it, and the next is an interval after it).
    /// Failures are reported as `error` notifications and retried on the next tick, except
    /// those the client calls final ([`PullPushClient::is_final_error`]): refused credentials
    /// or rights ([`SyncError::Auth`]), which would be refused on every tick (and count as
    /// failed logins on the server), or the client's own (the Git client: a service of another
    /// protocol version). Auto-sync reports such an error once and stops until
    /// `enable_auto_sync` is called again.
    /// Must be called inside a Tokio runtime.
    pub fn enable_auto_sync(&self, intervals: AutoSync) {
        // One lock over the swap: two calls at once each stopped nothing and then stored their
        // task over the other's, which ran on, out of reach of `disable_auto_sync` and drop.
        let mut slot = self.auto_sync.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(previous) = slot.take() {
            previous.abort();
        }
        let client = Arc::clone(&self.client);
        let task = tokio::spawn(async move {
            let mut push = ticker(intervals.push_interval);
            let mut pull = ticker(intervals.pull_interval);
            loop {
                let result = tokio::select! {
                    _ = tick(&mut push) => client.push().await.map(|_| ()),
                    _ = tick(&mut pull) => client.pull().await.map(|_| ()),
                };
                match result {
                    Ok(()) => {}
                    Err(e) if client.is_final_error(&e) => {
                        tracing::warn!(error = %e, "auto-sync refused by the server; auto-sync stopped");
                        client.notifier().emit(Notification::Error(Arc::new(e)));
                        break;
                    }
                    Err(e) => client.notifier().emit(Notification::Error(Arc::new(e))),
                }
            }
        });
        *slot = Some(task);
    }
}

fn ticker(period: Duration) -> Option<tokio::time::Interval> {
    (!period.is_zero()).then(|| {
        let mut interval = tokio::time::interval(period);
        // A slow pull must not be followed by a burst of catch-up pulls.
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    })
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

impl<C: SyncClient + ?Sized> Drop for KSync<C> {
    fn drop(&mut self) {
        self.disable_auto_sync();
    }
}
