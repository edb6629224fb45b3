//! Notifications (`connected`, `event`, `sync`, ...) and the hub that delivers them to
//! callbacks registered with `on` and to async streams.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::conflict::Conflict;
use crate::error::SyncError;
use crate::event::Event;

/// Capacity of each notification stream, in notifications. Overflow policy: a stream that
/// falls this far behind loses the oldest notifications and is told how many it missed
/// ([`StreamError::Lagged`]); callbacks, other streams and the client itself are never slowed
/// by a slow stream.
pub const STREAM_CAPACITY: usize = 1024;

/// Capacity of each notification stream, in bytes of the events it holds (as JSON; a
/// notification without events counts 64 bytes), so a stream read slowly during a large
/// catch-up does not hold 1,024 large `sync` batches. Same overflow policy as
/// [`STREAM_CAPACITY`]; the newest notification is always kept, however large.
pub const STREAM_CAPACITY_BYTES: usize = 64 * 1024 * 1024;

/// What a notification without events counts against [`STREAM_CAPACITY_BYTES`].
const SMALL_NOTIFICATION_BYTES: usize = 64;

/// The names that `on` and `off` accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotificationKind {
    /// `connected`
    Connected,
    /// `disconnected`
    Disconnected,
    /// `reconnecting`
    Reconnecting,
    /// `event`
    Event,
    /// `sync`
    Sync,
    /// `error`
    Error,
    /// `conflict`
    Conflict,
    /// `metrics`
    Metrics,
    /// `status`
    Status,
    /// `peer-connected` (P2P)
    PeerConnected,
    /// `peer-disconnected` (P2P)
    PeerDisconnected,
}

impl NotificationKind {
    /// Every kind, for iteration.
    pub const ALL: [NotificationKind; 11] = [
        NotificationKind::Connected,
        NotificationKind::Disconnected,
        NotificationKind::Reconnecting,
        NotificationKind::Event,
        NotificationKind::Sync,
        NotificationKind::Error,
        NotificationKind::Conflict,
        NotificationKind::Metrics,
        NotificationKind::Status,
        NotificationKind::PeerConnected,
        NotificationKind::PeerDisconnected,
    ];

    /// The spec's name.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::Connected => "connected",
            NotificationKind::Disconnected => "disconnected",
            NotificationKind::Reconnecting => "reconnecting",
            NotificationKind::Event => "event",
            NotificationKind::Sync => "sync",
            NotificationKind::Error => "error",
            NotificationKind::Conflict => "conflict",
            NotificationKind::Metrics => "metrics",
            NotificationKind::Status => "status",
            NotificationKind::PeerConnected => "peer-connected",
            NotificationKind::PeerDisconnected => "peer-disconnected",
        }
    }
}

impl FromStr for NotificationKind {
    type Err = SyncError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NotificationKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| SyncError::UnknownNotification(s.to_owned()))
    }
}

impl fmt::Display for NotificationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sync status reported by `status` notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Connected, nothing in flight.
    Connected,
    /// Exchanging events.
    Syncing,
    /// Connected and caught up.
    Idle,
    /// The last operation failed.
    Error,
}

/// Figures reported by `metrics` notifications.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metrics {
    /// Events sent plus received per second over the last reporting period.
    pub events_per_second: f64,
    /// Mean round-trip latency of acknowledged sends, in milliseconds.
    pub average_latency: f64,
    /// Bytes sent plus received per second over the last reporting period.
    pub bandwidth_usage: f64,
}

/// One notification.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Notification {
    /// The client is connected.
    Connected,
    /// The client lost or closed its connection.
    Disconnected,
    /// The client is about to try reconnecting; `attempt` starts at 1.
    Reconnecting {
        /// Attempt number.
        attempt: u32,
    },
    /// An event arrived from elsewhere (after dedup and incoming middleware).
    Event(Event),
    /// A batch of events exchanged with the remote in one exchange, never empty, as the
    /// application has them: the events received from it (one batch, page or message, after
    /// incoming middleware, only those new here), or the events it acknowledged storing, now
    /// safely on it (before outgoing middleware). WebSocket: one per received `events` batch or
    /// `snapshot` page, and one per `ack` with the events whose result is `stored` or
    /// `duplicate` (none for an ack without such results). Git: one per pulled page and one
    /// per acknowledged push batch. P2P has no acknowledgement: received events only.
    Sync(Vec<Event>),
    /// Something failed.
    Error(Arc<SyncError>),
    /// A conflict was found (and resolved by the configured policy; a WebSocket client used
    /// without a replica has none: the room keeps its revision, `theirs`).
    Conflict(Conflict),
    /// Periodic figures.
    Metrics(Metrics),
    /// The status changed.
    Status(Status),
    /// A peer connected (P2P).
    PeerConnected(String),
    /// A peer disconnected (P2P).
    PeerDisconnected(String),
}

impl Notification {
    /// The kind, i.e. the name handlers are registered under.
    pub fn kind(&self) -> NotificationKind {
        match self {
            Notification::Connected => NotificationKind::Connected,
            Notification::Disconnected => NotificationKind::Disconnected,
            Notification::Reconnecting { .. } => NotificationKind::Reconnecting,
            Notification::Event(_) => NotificationKind::Event,
            Notification::Sync(_) => NotificationKind::Sync,
            Notification::Error(_) => NotificationKind::Error,
            Notification::Conflict(_) => NotificationKind::Conflict,
            Notification::Metrics(_) => NotificationKind::Metrics,
            Notification::Status(_) => NotificationKind::Status,
            Notification::PeerConnected(_) => NotificationKind::PeerConnected,
            Notification::PeerDisconnected(_) => NotificationKind::PeerDisconnected,
        }
    }
}

/// A callback registered with `on`.
pub type Handler = Box<dyn Fn(&Notification) + Send + Sync + 'static>;

/// Identifies one registered handler, for `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandlerId(u64);

type HandlerList = Vec<(HandlerId, Arc<dyn Fn(&Notification) + Send + Sync>)>;

struct HubInner {
    handlers: Mutex<HashMap<NotificationKind, HandlerList>>,
    next_id: AtomicU64,
    /// The streams' queues (a stream that is dropped leaves a dead entry, pruned on emit and
    /// when a stream is made: at most one more than the live ones between two of those).
    streams: Mutex<Vec<Weak<StreamQueue>>>,
    /// Streams alive now (lets `emit` and `wants` skip them without a lock).
    live_streams: AtomicUsize,
}

impl Drop for HubInner {
    fn drop(&mut self) {
        let streams = self.streams.get_mut().unwrap_or_else(|p| p.into_inner());
        for queue in streams.iter().filter_map(Weak::upgrade) {
            queue.lock().closed = true;
            queue.ready.notify_one();
        }
    }
}

/// One stream's notifications, oldest first (see [`STREAM_CAPACITY`]).
#[derive(Default)]
struct StreamQueue {
    state: Mutex<QueueState>,
    /// Woken on every push and when the hub goes away.
    ready: Notify,
}

#[derive(Default)]
struct QueueState {
    /// Each notification (shared by every stream it went to) with what it counts.
    items: VecDeque<(Arc<Notification>, usize)>,
    bytes: usize,
    /// Notifications dropped since the stream last read.
    lagged: u64,
    /// The hub is gone: nothing more will come.
    closed: bool,
}

impl StreamQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, notification: Arc<Notification>, bytes: usize) {
        let mut state = self.lock();
        state.items.push_back((notification, bytes));
        state.bytes += bytes;
        while state.items.len() > STREAM_CAPACITY
            || (state.bytes > STREAM_CAPACITY_BYTES && state.items.len() > 1)
        {
            if let Some((_, dropped)) = state.items.pop_front() {
                state.bytes -= dropped;
                state.lagged += 1;
            }
        }
        drop(state);
        self.ready.notify_one();
    }
}

/// What `notification` counts against [`STREAM_CAPACITY_BYTES`]: its events as JSON.
fn notification_bytes(notification: &Notification) -> usize {
    let events: &[Event] = match notification {
        Notification::Event(event) => std::slice::from_ref(event),
        Notification::Sync(events) => events,
        Notification::Conflict(conflict) => {
            return conflict.ours.json_len() + conflict.theirs.json_len();
        }
        _ => return SMALL_NOTIFICATION_BYTES,
    };
    events
        .iter()
        .map(Event::json_len)
        .sum::<usize>()
        .max(SMALL_NOTIFICATION_BYTES)
}

/// Delivers notifications to `on` handlers and to [`NotificationStream`]s.
///
/// Every client embeds one; cloning shares it.
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<HubInner>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    /// A hub with no handlers.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(HubInner {
                handlers: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                streams: Mutex::new(Vec::new()),
                live_streams: AtomicUsize::new(0),
            }),
        }
    }

    /// Registers `handler` for notifications named `kind` (the spec's names). Returns a
    /// [`Subscription`] that unsubscribes; an unknown name is [`SyncError::UnknownNotification`].
    pub fn on(
        &self,
        kind: &str,
        handler: impl Fn(&Notification) + Send + Sync + 'static,
    ) -> Result<Subscription, SyncError> {
        let kind: NotificationKind = kind.parse()?;
        Ok(self.on_kind(kind, handler))
    }

    /// Like [`Notifier::on`] with a typed kind.
    pub fn on_kind(
        &self,
        kind: NotificationKind,
        handler: impl Fn(&Notification) + Send + Sync + 'static,
    ) -> Subscription {
        let id = HandlerId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        self.lock_handlers()
            .entry(kind)
            .or_default()
            .push((id, Arc::new(handler)));
        Subscription {
            kind,
            id,
            hub: Arc::downgrade(&self.inner),
        }
    }

    /// Removes a handler. Returns whether it was registered; an unknown name is an error.
    pub fn off(&self, kind: &str, id: HandlerId) -> Result<bool, SyncError> {
        let kind: NotificationKind = kind.parse()?;
        Ok(remove(&self.inner, kind, id))
    }

    /// A stream of every notification from now on.
    pub fn stream(&self) -> NotificationStream {
        let queue = Arc::new(StreamQueue::default());
        {
            let mut streams = self.lock_streams();
            // Dropped streams are pruned here too, not only on `emit`: an application that
            // takes a stream per view and drops it, with nothing emitted meanwhile (emit skips
            // the list when no stream lives), grew the list by one dead entry each time.
            streams.retain(|queue| queue.strong_count() > 0);
            streams.push(Arc::downgrade(&queue));
        }
        self.inner.live_streams.fetch_add(1, Ordering::AcqRel);
        NotificationStream {
            queue,
            hub: Arc::downgrade(&self.inner),
        }
    }

    /// Delivers a notification: handlers run synchronously on the caller's task, in
    /// registration order; streams get a copy. Handlers must be quick.
    ///
    /// A handler that panics is logged and skipped: the panic reaches neither the other
    /// handlers nor the caller (often a transport's connection task, which it would kill,
    /// or `emit`, which would panic after storing the event). The handler stays registered.
    pub fn emit(&self, notification: Notification) {
        let handlers: Vec<_> = self
            .lock_handlers()
            .get(&notification.kind())
            .map(|list| list.iter().map(|(_, h)| Arc::clone(h)).collect())
            .unwrap_or_default();
        for handler in handlers {
            // Unwind safety: the handler sees the notification by shared reference only, and
            // nothing of the hub is borrowed or locked while it runs.
            let call = std::panic::AssertUnwindSafe(|| handler(&notification));
            if std::panic::catch_unwind(call).is_err() {
                tracing::error!(
                    kind = %notification.kind(),
                    "a notification handler panicked; the panic was contained"
                );
            }
        }
        if self.inner.live_streams.load(Ordering::Acquire) == 0 {
            return;
        }
        let queues: Vec<Arc<StreamQueue>> = {
            let mut streams = self.lock_streams();
            streams.retain(|queue| queue.strong_count() > 0);
            streams.iter().filter_map(Weak::upgrade).collect()
        };
        if queues.is_empty() {
            return;
        }
        let bytes = notification_bytes(&notification);
        let shared = Arc::new(notification);
        for queue in queues {
            queue.push(Arc::clone(&shared), bytes);
        }
    }

    /// Whether anything listens for `kind` (lets hot paths skip building notifications).
    pub fn wants(&self, kind: NotificationKind) -> bool {
        self.inner.live_streams.load(Ordering::Acquire) > 0
            || self
                .lock_handlers()
                .get(&kind)
                .is_some_and(|l| !l.is_empty())
    }

    fn lock_streams(&self) -> MutexGuard<'_, Vec<Weak<StreamQueue>>> {
        self.inner.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_handlers(&self) -> std::sync::MutexGuard<'_, HashMap<NotificationKind, HandlerList>> {
        self.inner
            .handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

fn remove(inner: &HubInner, kind: NotificationKind, id: HandlerId) -> bool {
    let mut handlers = inner.handlers.lock().unwrap_or_else(|p| p.into_inner());
    let Some(list) = handlers.get_mut(&kind) else {
        return false;
    };
    let before = list.len();
    list.retain(|(h, _)| *h != id);
    before != list.len()
}

/// The handle `on` returns; the spec's unsubscribe function.
#[derive(Debug)]
#[must_use = "keep the subscription to unsubscribe later; dropping it keeps the handler registered"]
pub struct Subscription {
    kind: NotificationKind,
    id: HandlerId,
    hub: Weak<HubInner>,
}

impl Subscription {
    /// The handler's id (for `off`).
    pub fn id(&self) -> HandlerId {
        self.id
    }

    /// The kind it listens to.
    pub fn kind(&self) -> NotificationKind {
        self.kind
    }

    /// Removes the handler. Returns whether it was still registered.
    pub fn unsubscribe(self) -> bool {
        self.hub
            .upgrade()
            .is_some_and(|inner| remove(&inner, self.kind, self.id))
    }
}

/// Why [`NotificationStream::recv`] returned no notification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The stream fell behind and lost this many notifications; the next `recv` continues.
    #[error("notification stream lagged and lost {0} notifications")]
    Lagged(u64),
    /// The client is gone.
    #[error("notification stream closed")]
    Closed,
}

/// Typed notifications for async code: every notification from its creation on, in order,
/// each stream with its own queue (see [`STREAM_CAPACITY`] and [`STREAM_CAPACITY_BYTES`] for
/// the overflow policy).
pub struct NotificationStream {
    queue: Arc<StreamQueue>,
    hub: Weak<HubInner>,
}

impl fmt::Debug for NotificationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.queue.lock();
        f.debug_struct("NotificationStream")
            .field("queued", &state.items.len())
            .field("bytes", &state.bytes)
            .finish_non_exhaustive()
    }
}

impl Drop for NotificationStream {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.live_streams.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl NotificationStream {
    /// The next notification; [`StreamError::Lagged`] first when some were dropped since the
    /// last one (the next `recv` continues with the oldest kept).
    pub async fn recv(&mut self) -> Result<Notification, StreamError> {
        loop {
            {
                let mut state = self.queue.lock();
                if state.lagged > 0 {
                    return Err(StreamError::Lagged(std::mem::take(&mut state.lagged)));
                }
                if let Some((notification, bytes)) = state.items.pop_front() {
                    state.bytes -= bytes;
                    return Ok(Arc::unwrap_or_clone(notification));
                }
                if state.closed {
                    return Err(StreamError::Closed);
                }
            }
            // A push between the check and here leaves a permit: no wake-up is lost.
            self.queue.ready.notified().await;
        }
    }

    /// The next notification of one kind, skipping others (and lag notices).
    pub async fn next_of(&mut self, kind: NotificationKind) -> Result<Notification, StreamError> {
        loop {
            match self.recv().await {
                Ok(n) if n.kind() == kind => return Ok(n),
                Ok(_) | Err(StreamError::Lagged(_)) => {}
                Err(StreamError::Closed) => return Err(StreamError::Closed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn streams_taken_and_dropped_leave_no_entries_behind() {
        let hub = Notifier::new();
        let kept = hub.stream();
        for _ in 0..1000 {
            drop(hub.stream());
        }
        // Emitting nothing meanwhile (each used to leave a dead entry until an emit).
        assert_eq!(
            hub.lock_streams().len(),
            2,
            "the kept stream and the last dropped one"
        );
        drop(kept);
        drop(hub.stream());
        assert!(hub.lock_streams().len() <= 1);
    }

    #[test]
    fn on_off_and_unknown_names() {
        let hub = Notifier::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        let sub = hub
            .on("connected", move |_| {
                h.fetch_add(1, Ordering::SeqCst);
            })
            .expect("known name");
        hub.emit(Notification::Connected);
        hub.emit(Notification::Disconnected);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert!(hub.off("connected", sub.id()).expect("known"));
        hub.emit(Notification::Connected);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert!(!sub.unsubscribe(), "already removed");
        assert!(
            matches!(hub.on("conected", |_| {}), Err(SyncError::UnknownNotification(n)) if n == "conected")
        );
        assert!(hub.off("nope", HandlerId(1)).is_err());
    }

    #[test]
    fn subscription_unsubscribes() {
        let hub = Notifier::new();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = Arc::clone(&hits);
        let sub = hub.on_kind(NotificationKind::Event, move |_| {
            h.fetch_add(1, Ordering::SeqCst);
        });
        assert!(sub.unsubscribe());
        hub.emit(Notification::Event(crate::Event::new(
            "1",
            "t",
            serde_json::json!(1),
            1,
        )));
        assert_eq!(hits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn stream_sees_notifications_and_reports_lag() {
        let hub = Notifier::new();
        let mut stream = hub.stream();
        hub.emit(Notification::Reconnecting { attempt: 3 });
        assert!(matches!(
            stream.recv().await,
            Ok(Notification::Reconnecting { attempt: 3 })
        ));
        for _ in 0..STREAM_CAPACITY + 5 {
            hub.emit(Notification::Status(Status::Idle));
        }
        assert!(matches!(stream.recv().await, Err(StreamError::Lagged(5))));
        assert!(matches!(
            stream.recv().await,
            Ok(Notification::Status(Status::Idle))
        ));
    }

    /// A `sync` of one event with `bytes` of data.
    fn big_sync(n: usize, bytes: usize) -> Notification {
        let data = serde_json::json!({"n": n, "pad": "x".repeat(bytes)});
        Notification::Sync(vec![crate::Event::new(format!("e{n}"), "t", data, 1)])
    }

    #[tokio::test]
    async fn a_stream_holds_at_most_its_byte_capacity_and_a_slow_one_slows_no_other() {
        let hub = Notifier::new();
        let mut slow = hub.stream();
        let mut fast = hub.stream();
        let size = notification_bytes(&big_sync(0, 1 << 20));
        let sent = 70;
        for n in 0..sent {
            hub.emit(big_sync(n, 1 << 20));
            // The fast stream reads each as it comes: it never lags.
            match fast.recv().await {
                Ok(Notification::Sync(events)) => assert_eq!(events[0].id, format!("e{n}")),
                other => panic!("fast stream got {other:?}"),
            }
        }
        let kept = STREAM_CAPACITY_BYTES / size;
        assert!(
            kept >= 1 && kept < sent,
            "the test needs a bound below {sent}"
        );
        {
            let state = slow.queue.lock();
            assert_eq!(state.items.len(), kept);
            assert!(
                state.bytes <= STREAM_CAPACITY_BYTES,
                "{} bytes held",
                state.bytes
            );
        }
        // The slow one is told what it lost, then gets the newest `kept`, in order.
        let lost = (sent - kept) as u64;
        assert!(matches!(slow.recv().await, Err(StreamError::Lagged(n)) if n == lost));
        for n in sent - kept..sent {
            match slow.recv().await {
                Ok(Notification::Sync(events)) => assert_eq!(events[0].id, format!("e{n}")),
                other => panic!("slow stream got {other:?}"),
            }
        }
        // The hub gone: what is queued still arrives, then the stream ends.
        hub.emit(Notification::Connected);
        drop(hub);
        assert!(matches!(slow.recv().await, Ok(Notification::Connected)));
        assert!(matches!(slow.recv().await, Err(StreamError::Closed)));
        assert!(matches!(fast.recv().await, Ok(Notification::Connected)));
    }

    #[tokio::test]
    async fn a_waiting_stream_is_woken_by_the_next_notification_and_dropped_streams_cost_nothing() {
        let hub = Notifier::new();
        let dropped = hub.stream();
        assert!(hub.wants(NotificationKind::Metrics));
        drop(dropped);
        assert!(
            !hub.wants(NotificationKind::Metrics),
            "no stream, no handler"
        );
        let mut stream = hub.stream();
        let waiting = tokio::spawn(async move { stream.recv().await });
        tokio::task::yield_now().await;
        hub.emit(Notification::Status(Status::Syncing));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("task");
        assert!(matches!(got, Ok(Notification::Status(Status::Syncing))));
        assert_eq!(hub.lock_streams().len(), 1, "the dropped stream was pruned");
    }
}
