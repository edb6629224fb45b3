//! The `SyncClient` trait every transport implements, and the pull/push extension.

use serde::{Deserialize, Serialize};

use crate::conflict::Conflict;
use crate::error::SyncError;
use crate::event::Event;
use crate::notify::{Handler, HandlerId, NotificationStream, Notifier, Subscription};
use crate::replica::Replica;
use crate::storage::BoxFuture;

/// A way to move events between this replica and others: the spec's `SyncClient`.
///
/// Object safe: use it as `Box<dyn SyncClient>` or `Arc<dyn SyncClient>`. Implementors provide
/// `connect`, `disconnect`, `send` and a [`Notifier`]; `on`, `off` and `notifications` come for
/// free. A client driven by [`KSync`](crate::KSync) is handed the replica (its storage, id and
/// conflict policy) through [`SyncClient::attach`] before `connect`.
pub trait SyncClient: Send + Sync + 'static {
    /// Connects (or starts, for peer-to-peer clients).
    fn connect(&self) -> BoxFuture<'_, Result<(), SyncError>>;

    /// Disconnects. Pending events stay pending.
    fn disconnect(&self) -> BoxFuture<'_, Result<(), SyncError>>;

    /// Sends one event to the other replicas.
    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SyncError>>;

    /// The hub that delivers this client's notifications.
    fn notifier(&self) -> &Notifier;

    /// Gives the client the replica it syncs. Clients that keep no local state may ignore it;
    /// clients that do must store received events there and take pending events from it.
    fn attach(&self, replica: Replica) {
        let _ = replica;
    }

    /// The replica id this client would have its replica use (a P2P client's `peerId`):
    /// `KSync` gives it to a storage used for the first time, so the events made there carry
    /// it as their `origin`. Default `None` (a random id).
    fn preferred_replica_id(&self) -> Option<String> {
        None
    }

    /// Registers a handler for the notification named `kind` (`connected`, `event`, ...).
    /// Returns the unsubscribe handle; unknown names are an error.
    fn on(&self, kind: &str, handler: Handler) -> Result<Subscription, SyncError> {
        self.notifier().on(kind, handler)
    }

    /// Removes a handler registered with [`SyncClient::on`].
    fn off(&self, kind: &str, handler: HandlerId) -> Result<bool, SyncError> {
        self.notifier().off(kind, handler)
    }

    /// A typed stream of this client's notifications.
    fn notifications(&self) -> NotificationStream {
        self.notifier().stream()
    }
}

/// What `pull()` returns (the spec's shape).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullResult {
    /// Events that were new to this replica.
    pub new_events: Vec<Event>,
    /// Conflicts found (each already resolved by the configured policy).
    pub conflicts: Vec<Conflict>,
    /// The server's sequence number after the pull.
    pub server_version: u64,
}

/// What `push()` returns (the spec's shape).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushResult {
    /// Events the server stored (or already held identically).
    pub pushed_events: Vec<Event>,
    /// Events the server refused because it holds other content under the same id and version.
    pub rejected_events: Vec<Event>,
    /// The server's sequence number after the push.
    pub server_version: u64,
}

/// What `sync()` returns: the pull, then the push.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncResult {
    /// The pull half.
    pub pull: PullResult,
    /// The push half.
    pub push: PushResult,
}

/// Clients that sync by explicit pull and push (Git-like).
pub trait PullPushClient: SyncClient {
    /// Fetches and merges what the server has that we lack.
    fn pull(&self) -> BoxFuture<'_, Result<PullResult, SyncError>>;

    /// Sends what we have that the server lacks.
    fn push(&self) -> BoxFuture<'_, Result<PushResult, SyncError>>;

    /// Whether `error` (from this client's `pull` or `push`) would come back on every try, so
    /// that automatic syncing ([`KSync::enable_auto_sync`](crate::KSync::enable_auto_sync))
    /// reports it once and stops instead of repeating it on every tick: refused credentials
    /// ([`SyncError::Auth`]) by default; a transport adds its own (a service of another
    /// protocol version, say).
    fn is_final_error(&self, error: &SyncError) -> bool {
        matches!(error, SyncError::Auth(_))
    }

    /// Pull, then push.
    fn sync(&self) -> BoxFuture<'_, Result<SyncResult, SyncError>> {
        Box::pin(async move {
            let pull = self.pull().await?;
            let push = self.push().await?;
            Ok(SyncResult { pull, push })
        })
    }
}
