//! Test helpers shared by kSync's test suites (a dev-dependency only; never published):
//! capturing what one log target says ([`LogCapture`]), recording the `sync`, `event` or
//! `error` notifications of a client ([`SyncRecorder`], [`EventRecorder`], [`ErrorRecorder`]),
//! the storage methods a test wrapper passes on unchanged ([`storage_pass_through!`]), a storage that fails
//! one chosen append ([`FailAppend`]), one whose appends a test lets finish one by one, as a
//! slow disk would ([`GatedAppends`]), a provider of such logs, one per name, on one slow
//! disk or several ([`GatedProvider`]), one whose metadata writes go through a hook that may
//! hold them up or fail them ([`MetaHook`]), a `KSync` over a storage and a client
//! ([`ksync_over`]), a copy of a fixture directory to work on ([`copy_dir`]), and event data
//! at the edges of the event rules ([`edge_data`]), and a slow but working network link on
//! loopback ([`SlowLink`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ksync_core::{
    BoxFuture, Event, InMemoryStorage, KSync, LogName, MergeOutcome, Notification,
    NotificationKind, Notifier, Storage, StorageError, StorageProvider, Stored, Subscription,
    SyncClient, SyncError,
};
use tracing::Level;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::DefaultGuard;

mod slow_link;
pub use slow_link::{SlowLink, noise};

/// One captured event: its level, its message and its other fields (`name=value `, in order).
#[derive(Debug, Clone)]
pub struct LogLine {
    /// The event's level.
    pub level: Level,
    /// Its `message` field.
    pub message: String,
    /// Its other fields, each `name=value ` (values in their `Debug` form).
    pub fields: String,
}

impl Visit for LogLine {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .push_str(&format!("{}={value:?} ", field.name()));
        }
    }
}

/// Records every event of one target, whatever its level, on the thread that installed it
/// (a test's single-threaded runtime runs the client's tasks there too).
#[derive(Clone)]
pub struct LogCapture {
    target: &'static str,
    lines: Arc<Mutex<Vec<LogLine>>>,
}

/// Keeps a [`LogCapture`] installed; dropping it uninstalls it.
pub struct CaptureGuard {
    _default: DefaultGuard,
    _registered: tracing::Dispatch,
}

impl LogCapture {
    /// Captures `target`'s events on this thread until the guard is dropped.
    pub fn install(target: &'static str) -> (Self, CaptureGuard) {
        let capture = Self {
            target,
            lines: Arc::default(),
        };
        let default = tracing::subscriber::set_default(capture.clone());
        // tracing caches per call site whether anyone wants it. With a single dispatcher
        // registered it asks only the thread that reaches the call site first: another test's
        // thread (no subscriber) would have the `trace` lines cached as unwanted everywhere.
        // A second one, never made a default, makes it ask every registered dispatcher.
        let registered = tracing::Dispatch::new(capture.clone());
        (
            capture,
            CaptureGuard {
                _default: default,
                _registered: registered,
            },
        )
    }

    fn locked(&self) -> MutexGuard<'_, Vec<LogLine>> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lines captured so far.
    pub fn lines(&self) -> Vec<LogLine> {
        self.locked().clone()
    }

    /// How many lines so far have `message`.
    pub fn count(&self, message: &str) -> usize {
        self.locked()
            .iter()
            .filter(|l| l.message == message)
            .count()
    }
}

impl tracing::Subscriber for LogCapture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == self.target
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = LogLine {
            level: *event.metadata().level(),
            message: String::new(),
            fields: String::new(),
        };
        event.record(&mut line);
        self.locked().push(line);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// A [`KSync`] over `storage` with `client` attached, nothing else set (replica id from the
/// storage or the client, system clock): `KSync::builder().storage(..).sync_client(..)
/// .build()`, which is what its error comes from.
pub async fn ksync_over<C: SyncClient>(
    storage: Arc<dyn Storage>,
    client: C,
) -> Result<KSync<C>, SyncError> {
    KSync::builder()
        .storage(storage)
        .sync_client(Arc::new(client))
        .build()
        .await
}

/// The `sync` notifications of one client, each as the ids of its events, in order.
pub struct SyncRecorder {
    batches: Arc<Mutex<Vec<Vec<String>>>>,
    _subscription: Subscription,
}

impl SyncRecorder {
    /// Records `notifier`'s `sync` notifications from now on, until dropped.
    pub fn new(notifier: &Notifier) -> Self {
        let batches: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let seen = Arc::clone(&batches);
        let subscription = notifier.on_kind(NotificationKind::Sync, move |n| {
            if let Notification::Sync(events) = n {
                let ids = events.iter().map(|e| e.id.clone()).collect();
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(ids);
            }
        });
        Self {
            batches,
            _subscription: subscription,
        }
    }

    /// Each notification's event ids, in the order they came.
    pub fn batches(&self) -> Vec<Vec<String>> {
        self.batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every notified event id, in order.
    pub fn ids(&self) -> Vec<String> {
        self.batches().concat()
    }
}

/// The `event` notifications of one client, as the ids of their events, in order.
pub struct EventRecorder {
    ids: Arc<Mutex<Vec<String>>>,
    _subscription: Subscription,
}

impl EventRecorder {
    /// Records `notifier`'s `event` notifications from now on, until dropped.
    pub fn new(notifier: &Notifier) -> Self {
        let ids: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = Arc::clone(&ids);
        let subscription = notifier.on_kind(NotificationKind::Event, move |n| {
            if let Notification::Event(e) = n {
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(e.id.clone());
            }
        });
        Self {
            ids,
            _subscription: subscription,
        }
    }

    /// Every notified event id, in order.
    pub fn ids(&self) -> Vec<String> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The `error` notifications of one client, each as its message, in order.
pub struct ErrorRecorder {
    messages: Arc<Mutex<Vec<String>>>,
    _subscription: Subscription,
}

impl ErrorRecorder {
    /// Records `notifier`'s `error` notifications from now on, until dropped.
    pub fn new(notifier: &Notifier) -> Self {
        let messages: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = Arc::clone(&messages);
        let subscription = notifier.on_kind(NotificationKind::Error, move |n| {
            if let Notification::Error(e) = n {
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(e.to_string());
            }
        });
        Self {
            messages,
            _subscription: subscription,
        }
    }

    /// Each notification's message, in the order they came.
    pub fn messages(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Inside `impl Storage for Wrapper`, the methods a test wrapper passes on unchanged to the
/// storage in its field `$log` (`get`, `latest`, `len`, `state`, `meta`, `set_meta`,
/// `is_closed`): for wrappers that change only `append` or `read_since` (to gate, fail or
/// measure them). Needs
/// `BTreeMap`, `BoxFuture`, `Event`, `StorageError` and `Stored` in scope.
#[macro_export]
macro_rules! storage_pass_through {
    ($log:ident) => {
        fn get(&self, id: &str, version: u64) -> Result<Option<Stored>, StorageError> {
            self.$log.get(id, version)
        }
        fn latest(&self, id: &str) -> Result<Option<Stored>, StorageError> {
            self.$log.latest(id)
        }
        fn len(&self) -> u64 {
            self.$log.len()
        }
        fn state(&self) -> Result<BTreeMap<String, Event>, StorageError> {
            self.$log.state()
        }
        fn state_seqs(&self) -> Result<Vec<u64>, StorageError> {
            self.$log.state_seqs()
        }
        fn meta(&self, key: &str) -> Result<Option<String>, StorageError> {
            self.$log.meta(key)
        }
        fn set_meta(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StorageError>> {
            self.$log.set_meta(key, value)
        }
        fn is_closed(&self) -> bool {
            self.$log.is_closed()
        }
    };
}

/// Picks the appends [`FailAppend`] fails, by their events.
pub type AppendPicker = dyn Fn(&[Event]) -> bool + Send + Sync;

/// A storage that passes everything on to another, except that it fails (once, with an I/O
/// error, storing nothing) the first append whose events `fails` picks: a fault hook for an
/// operation whose later append fails after its earlier ones stored something (a conflict's
/// resolution written after the batch that brought the conflict).
pub struct FailAppend {
    log: Arc<dyn Storage>,
    fails: Box<AppendPicker>,
    failed: AtomicBool,
}

impl FailAppend {
    /// Wraps `log`; the first append of events `fails` picks fails.
    pub fn new(
        log: Arc<dyn Storage>,
        fails: impl Fn(&[Event]) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            log,
            fails: Box::new(fails),
            failed: AtomicBool::new(false),
        }
    }

    /// Whether the append failed yet.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

impl Storage for FailAppend {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        Box::pin(async move {
            if !self.failed() && (self.fails)(&events) && !self.failed.swap(true, Ordering::SeqCst)
            {
                return Err(StorageError::Io {
                    context: "appending (test fault)".into(),
                    source: std::io::Error::other("disk gone"),
                });
            }
            self.log.append(events).await
        })
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.remove_meta(key)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.flush()
    }
    storage_pass_through!(log);
}

/// A log in memory whose every append waits (as a durable one does: it never answers on its
/// first poll) and then takes one permit of a semaphore, which the logs of a test may share:
/// the test lets appends through one by one, as a slow disk finishes them. `started` counts
/// the appends that began (shared too), for the test to await.
pub struct GatedAppends {
    log: InMemoryStorage,
    permits: Arc<tokio::sync::Semaphore>,
    started: tokio::sync::watch::Sender<usize>,
}

impl GatedAppends {
    /// An empty log whose appends take `permits` and count themselves in `started`.
    pub fn new(
        permits: Arc<tokio::sync::Semaphore>,
        started: tokio::sync::watch::Sender<usize>,
    ) -> Self {
        Self {
            log: InMemoryStorage::default(),
            permits,
            started,
        }
    }
}

impl Storage for GatedAppends {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        Box::pin(async move {
            self.started.send_modify(|n| *n += 1);
            // Pends once even with a permit free: callers that commit in place while the
            // storage answers at once must see a disk that does not.
            tokio::task::yield_now().await;
            // Err: the semaphore was closed, which lets every append through.
            if let Ok(permit) = self.permits.acquire().await {
                permit.forget();
            }
            self.log.append(events).await
        })
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.remove_meta(key)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.flush()
    }
    storage_pass_through!(log);
}

/// Picks, for [`GatedProvider`], the semaphore whose permits a log's appends take, by the
/// log's name: which disk (of the test's) the log is on.
pub type GatePicker = dyn Fn(&LogName) -> Arc<tokio::sync::Semaphore> + Send + Sync;

/// A storage provider of [`GatedAppends`] logs, one per name, made at its first open and
/// kept (a room reopened finds its events): slow disks for a relay's tests. `gate` picks the
/// permits each log's appends take (one semaphore for all: one slow disk; another for some
/// names: a second disk); every log counts the appends that began in the one `started`.
pub struct GatedProvider {
    logs: Mutex<HashMap<LogName, Arc<GatedAppends>>>,
    gate: Box<GatePicker>,
    started: tokio::sync::watch::Sender<usize>,
}

impl GatedProvider {
    /// Logs whose appends take the permits `gate` picks by their name.
    pub fn new(
        gate: impl Fn(&LogName) -> Arc<tokio::sync::Semaphore> + Send + Sync + 'static,
    ) -> Self {
        Self {
            logs: Mutex::default(),
            gate: Box::new(gate),
            started: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Every log on one disk: their appends take `permits`.
    pub fn one_disk(permits: Arc<tokio::sync::Semaphore>) -> Self {
        Self::new(move |_| Arc::clone(&permits))
    }

    /// The appends that began in all logs so far, to await (`wait_for`).
    pub fn started(&self) -> tokio::sync::watch::Receiver<usize> {
        self.started.subscribe()
    }

    fn logs(&self) -> MutexGuard<'_, HashMap<LogName, Arc<GatedAppends>>> {
        // A test that panicked while holding it has failed already; its map is still whole.
        self.logs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl StorageProvider for GatedProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        let log = self
            .logs()
            .entry(name.clone())
            .or_insert_with(|| Arc::new(GatedAppends::new((self.gate)(name), self.started.clone())))
            .clone();
        Ok(log)
    }
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        Ok(self
            .logs()
            .get(name)
            .map(|log| Arc::clone(log) as Arc<dyn Storage>))
    }
    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        Ok(Vec::new())
    }
}

/// What [`MetaHook`] runs before each metadata write, given its key: `Ok` lets the write
/// go on (after whatever the future waits for), `Err` fails it (nothing written).
pub type MetaHookFn = dyn Fn(&str) -> BoxFuture<'static, Result<(), StorageError>> + Send + Sync;

/// A storage that passes everything on to another, except that each `set_meta` first runs a
/// hook on its key: a fault hook for cursor and record writes (a full disk on one key, a slow
/// one). The hook is shared ([`Arc`]), so the logs of a provider can share one.
pub struct MetaHook {
    log: Arc<dyn Storage>,
    hook: Arc<MetaHookFn>,
    after: Option<Arc<MetaLandedFn>>,
}

/// What [`MetaHook::with_after`] calls once a metadata write has landed, with its key and
/// value: for a test to await a write it cannot otherwise see end (one left running by a
/// cancelled operation).
pub type MetaLandedFn = dyn Fn(&str, &str) + Send + Sync;

impl MetaHook {
    /// Wraps `log`; every `set_meta` awaits `hook(key)` first.
    pub fn new(log: Arc<dyn Storage>, hook: Arc<MetaHookFn>) -> Self {
        Self {
            log,
            hook,
            after: None,
        }
    }

    /// [`MetaHook::new`], also calling `after(key, value)` once each write succeeded.
    pub fn with_after(
        log: Arc<dyn Storage>,
        hook: Arc<MetaHookFn>,
        after: Arc<MetaLandedFn>,
    ) -> Self {
        Self {
            log,
            hook,
            after: Some(after),
        }
    }

    /// A hook that fails (once, with an I/O error) the first write of a key `picks` picks.
    pub fn fail_once(picks: impl Fn(&str) -> bool + Send + Sync + 'static) -> Arc<MetaHookFn> {
        let armed = AtomicBool::new(true);
        Arc::new(move |key: &str| {
            let fail = picks(key) && armed.swap(false, Ordering::SeqCst);
            Box::pin(async move {
                if fail {
                    return Err(StorageError::Io {
                        context: "writing metadata (test fault)".into(),
                        source: std::io::Error::other("disk full"),
                    });
                }
                Ok(())
            })
        })
    }
}

impl Storage for MetaHook {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        self.log.append(events)
    }
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        self.log.read_since(after, limit)
    }
    fn get(&self, id: &str, version: u64) -> Result<Option<Stored>, StorageError> {
        self.log.get(id, version)
    }
    fn latest(&self, id: &str) -> Result<Option<Stored>, StorageError> {
        self.log.latest(id)
    }
    fn len(&self) -> u64 {
        self.log.len()
    }
    fn state(&self) -> Result<BTreeMap<String, Event>, StorageError> {
        self.log.state()
    }
    fn state_seqs(&self) -> Result<Vec<u64>, StorageError> {
        self.log.state_seqs()
    }
    fn meta(&self, key: &str) -> Result<Option<String>, StorageError> {
        self.log.meta(key)
    }
    fn set_meta(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        let before = (self.hook)(key);
        let (key, value) = (key.to_owned(), value.to_owned());
        Box::pin(async move {
            before.await?;
            self.log.set_meta(&key, &value).await?;
            if let Some(after) = &self.after {
                after(&key, &value);
            }
            Ok(())
        })
    }
    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.remove_meta(key)
    }
    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        self.log.flush()
    }
    fn is_closed(&self) -> bool {
        self.log.is_closed()
    }
}

/// Copies the directory `from` into `to` (made), recursively: tests work on a copy of a
/// fixture, never on the fixture itself. Panics on any failure (a test helper).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create the copy's directory");
    for entry in std::fs::read_dir(from).expect("read the fixture directory") {
        let entry = entry.expect("fixture entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a fixture file");
        }
    }
}

/// Event data at the edges of the event rules, for the tests that carry it through every path.
pub mod edge_data {
    use serde_json::{Value, json};

    /// Doubles that serde_json's default parser (without `float_roundtrip`) read one unit in
    /// the last place off: `0.9941414234139935` came back `...936`.
    pub const MISREAD_FLOATS: [f64; 3] =
        [0.9941414234139935, 408.72700000000003, 954.8880000000001];

    /// The bits of each number of a JSON array of numbers (for exact comparison).
    pub fn float_bits(data: &Value) -> Vec<u64> {
        data.as_array()
            .expect("an array")
            .iter()
            .map(|n| n.as_f64().expect("a number").to_bits())
            .collect()
    }

    /// Panics unless `error` is the refusal of a new event whose data nests past
    /// `ksync_core::MAX_DATA_DEPTH` (what an `update` of such data gets).
    pub fn assert_too_deep(error: &ksync_core::SyncError) {
        assert!(
            matches!(
                error,
                ksync_core::SyncError::InvalidEvent(ksync_core::InvalidEvent::DataTooDeep {
                    max: ksync_core::MAX_DATA_DEPTH
                })
            ),
            "{error:?}"
        );
    }

    /// `data` nested `levels` deep (`[[1]]` is two), arrays and objects in turn.
    pub fn nested(levels: usize) -> Value {
        let mut data = json!("innermost");
        for level in 0..levels {
            data = if level % 2 == 0 {
                json!([data])
            } else {
                json!({ "k": data })
            };
        }
        data
    }
}
