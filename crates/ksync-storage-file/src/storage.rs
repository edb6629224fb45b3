//! [`FileStorage`]: the log on disk, its writer thread and group commit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ksync_core::{
    AppendOutcome, BoxFuture, EncodedEvent, EncodedKey, Event, IdHasher, LogIndex, MergeOutcome,
    MergeSummary, Storage, StorageError, Stored,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::compact;
use crate::fault::FaultHook;
use crate::format::{self, HEADER_LEN, RECORD_HEADER_LEN};
use crate::replay::{RecoveryReport, replay};

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Every append gets its own write and `fdatasync` before it returns.
    EveryAppend,
    /// Appends that arrive together share one write and one `fdatasync`; each append still
    /// returns only after its records are durable. The default.
    #[default]
    GroupCommit,
    /// Appends return once their records are written to the OS (they survive a crash of the
    /// process, not of the machine). [`Storage::flush`] still syncs.
    None,
}

/// Default capacity of the request queue in front of the writer thread.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// Default extra time the writer waits for more appends to join a commit group: none (see
/// [`FileStorageOptions::group_commit_window`]).
pub const DEFAULT_GROUP_COMMIT_WINDOW: Duration = Duration::ZERO;
/// Default number of syncs that may be in flight at once (see
/// [`FileStorageOptions::syncs_in_flight`]).
pub const DEFAULT_SYNCS_IN_FLIGHT: usize = 2;
/// Most requests one commit group takes.
const MAX_GROUP_REQUESTS: usize = 4096;
/// Default of [`FileStorageOptions::compaction_min_bytes`]: 1 MiB of superseded metadata.
/// Below that a rewrite saves too little to be worth copying the log at open.
pub const DEFAULT_COMPACTION_MIN_BYTES: u64 = 1 << 20;
/// Times an open retries when the file it locked was meanwhile replaced at its path (by
/// another open compacting it, or a provider deleting an empty log).
const LOCK_ATTEMPTS: usize = 8;

/// Options of a [`FileStorage`]; `Default` gives the spec's defaults.
#[derive(Clone)]
#[non_exhaustive]
pub struct FileStorageOptions {
    /// When an append counts as done. Default: [`Durability::GroupCommit`].
    pub durability: Durability,
    /// Capacity of the bounded request queue in front of the writer thread (appends,
    /// `set_meta`, flushes). When it is full, callers wait asynchronously for a free slot (no
    /// executor thread blocks, nothing is dropped). At least 1; at most
    /// `tokio::sync::Semaphore::MAX_PERMITS` (more is taken as that). Default:
    /// [`DEFAULT_QUEUE_CAPACITY`].
    pub queue_capacity: usize,
    /// Under group commit, how long the writer may wait for more appends to join a group once
    /// it has fewer than the previous group had. Without a wait (the default) a group is
    /// whatever queued while the previous syncs ran, which adapts to the sync time by itself.
    /// At most [`ksync_core::MAX_CONFIG_DURATION`] (a day; opening refuses a longer one with
    /// `StorageError::Config`). Default: [`DEFAULT_GROUP_COMMIT_WINDOW`].
    pub group_commit_window: Duration,
    /// How many groups may be syncing at once (at least 1), each on its own sync thread and
    /// file descriptor (started when first needed: a log with one appender at a time uses
    /// one). A group is acknowledged only after its own sync and those of all earlier groups
    /// succeeded. Default: [`DEFAULT_SYNCS_IN_FLIGHT`].
    pub syncs_in_flight: usize,
    /// Compaction at open: when the metadata records that no longer count (values overwritten
    /// later, removed keys, the removals themselves) take at least this many bytes and at
    /// least half the log, opening rewrites the log without them (events and each live key's
    /// latest record are kept as they are; see [`RecoveryReport::compacted`]). The half
    /// keeps a big log from being copied whole to save a small part of it. `None` never
    /// compacts. Default: [`DEFAULT_COMPACTION_MIN_BYTES`].
    pub compaction_min_bytes: Option<u64>,
    /// Fault injection for reliability tests. Default: none.
    pub fault_hook: Option<Arc<dyn FaultHook>>,
}

impl Default for FileStorageOptions {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            group_commit_window: DEFAULT_GROUP_COMMIT_WINDOW,
            syncs_in_flight: DEFAULT_SYNCS_IN_FLIGHT,
            compaction_min_bytes: Some(DEFAULT_COMPACTION_MIN_BYTES),
            fault_hook: None,
        }
    }
}

impl fmt::Debug for FileStorageOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStorageOptions")
            .field("durability", &self.durability)
            .field("queue_capacity", &self.queue_capacity)
            .field("group_commit_window", &self.group_commit_window)
            .field("syncs_in_flight", &self.syncs_in_flight)
            .field("compaction_min_bytes", &self.compaction_min_bytes)
            .field("fault_hook", &self.fault_hook.is_some())
            .finish()
    }
}

/// Builds a [`FileStorage`] with non-default options.
///
/// ```no_run
/// use ksync_storage_file::{Durability, FileStorage};
/// let storage = FileStorage::builder("./local-events.json")
///     .durability(Durability::EveryAppend)
///     .open()?;
/// # Ok::<(), ksync_core::StorageError>(())
/// ```
#[derive(Debug)]
pub struct FileStorageBuilder {
    path: PathBuf,
    options: FileStorageOptions,
}

impl FileStorageBuilder {
    /// Sets the durability policy.
    #[must_use]
    pub fn durability(mut self, durability: Durability) -> Self {
        self.options.durability = durability;
        self
    }

    /// Sets the request queue capacity (at least 1).
    #[must_use]
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.options.queue_capacity = capacity;
        self
    }

    /// Sets the group commit window.
    #[must_use]
    pub fn group_commit_window(mut self, window: Duration) -> Self {
        self.options.group_commit_window = window;
        self
    }

    /// Sets how many syncs may be in flight at once (at least 1).
    #[must_use]
    pub fn syncs_in_flight(mut self, syncs: usize) -> Self {
        self.options.syncs_in_flight = syncs;
        self
    }

    /// Sets the compaction threshold at open (`None`: never compact); see
    /// [`FileStorageOptions::compaction_min_bytes`].
    #[must_use]
    pub fn compaction_min_bytes(mut self, min_bytes: Option<u64>) -> Self {
        self.options.compaction_min_bytes = min_bytes;
        self
    }

    /// Installs a fault hook (for tests).
    #[must_use]
    pub fn fault_hook(mut self, hook: Arc<dyn FaultHook>) -> Self {
        self.options.fault_hook = Some(hook);
        self
    }

    /// Replaces all options.
    #[must_use]
    pub fn options(mut self, options: FileStorageOptions) -> Self {
        self.options = options;
        self
    }

    /// Opens (or creates) the log.
    pub fn open(self) -> Result<FileStorage, StorageError> {
        FileStorage::open_with(self.path, self.options)
    }
}

/// What readers see: the committed (durable) log and metadata.
#[derive(Debug, Default)]
struct State {
    log: LogIndex,
    meta: HashMap<String, String>,
}

/// An append's events, already encoded by the caller (so the writer thread only copies bytes).
struct EncodedAppend {
    events: Vec<Event>,
    /// The events' records, back to back.
    bytes: Vec<u8>,
    /// Where each event's record ends in `bytes`; empty for a single event (which ends
    /// where `bytes` does), sparing most appends an allocation.
    ends: Vec<usize>,
    /// Whether the answer carries the appended events ([`Storage::append`]) or the index
    /// keeps them decoded ([`Storage::append_summary`]).
    answer_events: bool,
    /// Each event's key in the index, computed by the caller (off the writer thread).
    keys: Vec<EncodedKey>,
}

/// What the writer answers an append.
struct AppendAnswer {
    /// One outcome per event.
    outcomes: Vec<AppendOutcome>,
    /// The appended events, moved back (the index keeps their records, encoded), when the
    /// caller asked for them: so no event is ever cloned.
    appended: Vec<Stored>,
}

type AppendReply = oneshot::Sender<Result<AppendAnswer, StorageError>>;
type UnitReply = oneshot::Sender<Result<(), StorageError>>;

/// One request to the writer thread.
enum Op {
    Append(EncodedAppend, AppendReply),
    /// Sets (`Some`) or removes (`None`) a metadata key.
    Meta(String, Option<String>, UnitReply),
    Flush(UnitReply),
}

struct Request {
    op: Op,
    // Held until the writer takes the request: the semaphore is the queue's capacity.
    _slot: OwnedSemaphorePermit,
}

/// The queue between callers, the writer thread and its sync threads.
struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the writer (see [`Inner::wake_at`]).
    wake: Condvar,
    /// Wakes those waiting for the writer to stop (see [`Inner::stopped`]).
    stopped: Condvar,
}

struct Inner {
    /// Requests not yet taken by the writer. Bounded by the `slots` semaphore that callers
    /// acquire before pushing (a full queue makes callers wait; nothing is dropped).
    requests: Vec<Request>,
    /// Set when the `FileStorage` is dropped: the writer answers what is queued and stops.
    closed: bool,
    /// While the writer sleeps: the queue length at which a caller wakes it (`usize::MAX`
    /// when it is waiting for syncs only). Callers never wake a busy writer, so a herd of
    /// appenders costs one wake-up per group, not one per append.
    wake_at: usize,
    /// Whether the writer sleeps (sync threads wake it when they finish).
    writer_sleeps: bool,
    /// Finished syncs not yet seen by the writer: (sync thread, job, result). At most one
    /// per sync thread.
    synced: Vec<(usize, u64, io::Result<()>)>,
    /// Set (with `closed`) when a failure stopped the log (see [`FileStorage::is_closed`]).
    failed: bool,
    /// The writer thread has ended; after a failure, the file is cut back to its last
    /// published length and released, unless that failed (`held`).
    stopped: bool,
    /// After a failure: the file, still locked, and the length to cut it back to, when
    /// cutting it back failed. Kept so that nothing reopens a file that may still hold
    /// records nobody was told are stored (see [`FileStorage::wait_released`]).
    held: Option<(File, u64)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing in `Inner` is left half-changed by a panic; a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An append-only, checksummed event log in one file: the spec's `FileStorage`.
///
/// Reads are served from an in-memory index; appends go through a dedicated writer thread
/// that writes, syncs (per [`Durability`]) and only then publishes the new events, so a read
/// never sees an event that is not durable. Reopening replays the file; a torn tail left by a
/// crash is cut off and reported in [`FileStorage::recovery`], damage anywhere else is refused
/// with [`StorageError::Corrupt`]. The file is locked while open: a second `FileStorage` on
/// the same file (in this or another process) gets an IO error. A failure that stops the log
/// ([`FileStorage::is_closed`]) cuts the file back to what was acknowledged and unlocks it, so
/// it can be opened again while this one is still held.
///
/// Dropping a `FileStorage` waits for its writer thread to answer what is queued and exit
/// (normally at most the syncs in flight), so the file is unlocked when `drop` returns.
///
/// ```no_run
/// # async fn demo() -> Result<(), ksync_core::StorageError> {
/// use ksync_core::{Event, Storage};
/// use ksync_storage_file::FileStorage;
/// let storage = FileStorage::open("./local-events.json")?;
/// let out = storage.append(vec![Event::new("1", "t", serde_json::json!({}), 1)]).await?;
/// assert_eq!(out.appended.len(), 1);
/// # Ok(()) }
/// ```
pub struct FileStorage {
    state: Arc<RwLock<State>>,
    /// A copy of the index's id hasher (it never changes): appends key their events with it
    /// before queueing them, without locking `state`.
    hasher: IdHasher,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
    durability: Durability,
    recovery: RecoveryReport,
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStorage")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("len", &self.len())
            .finish()
    }
}

/// Wraps an IO error with what was being done (every `StorageError::Io` of this crate).
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StorageError {
    let context = context.into();
    move |source| StorageError::Io { context, source }
}

/// A copy of an IO error for each of several callers (io::Error is not Clone).
fn copy_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

impl FileStorage {
    /// Opens the log at `path` with default options, creating it (and nothing else: the
    /// directory must exist) when missing. Replays it; see [`FileStorage::recovery`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        Self::open_with(path, FileStorageOptions::default())
    }

    /// A builder for non-default options.
    pub fn builder(path: impl AsRef<Path>) -> FileStorageBuilder {
        FileStorageBuilder {
            path: path.as_ref().to_path_buf(),
            options: FileStorageOptions::default(),
        }
    }

    /// Opens the log at `path` with `options`.
    pub fn open_with(
        path: impl AsRef<Path>,
        options: FileStorageOptions,
    ) -> Result<Self, StorageError> {
        let path = path.as_ref().to_path_buf();
        // Past a day, `Instant + window` overflows: the writer thread died at its first wait.
        if options.group_commit_window > ksync_core::MAX_CONFIG_DURATION {
            return Err(StorageError::Config(format!(
                "group_commit_window must be at most {} s",
                ksync_core::MAX_CONFIG_DURATION.as_secs()
            )));
        }
        let mut file = open_locked(&path)?;
        // Locked, so a `.compact` here is no open's work in progress: a crash left it.
        compact::remove_stale(&path);
        let mut len = file
            .metadata()
            .map_err(io_err(format!("reading metadata of {}", path.display())))?
            .len();
        if len == 0 {
            // An empty file holds nothing to lose (e.g. made by `touch`): make it a log.
            file.write_all(&format::header())
                .and_then(|()| file.sync_all())
                .map_err(io_err(format!("writing the header of {}", path.display())))?;
            len = HEADER_LEN as u64;
        } else {
            let mut head = Vec::with_capacity(HEADER_LEN);
            (&mut file)
                .take(HEADER_LEN as u64)
                .read_to_end(&mut head)
                .map_err(io_err(format!("reading the header of {}", path.display())))?;
            format::check_header(&head).map_err(|e| naming_file(&path, e))?;
        }
        let mut replayed = replay(&path, len).map_err(|e| naming_file(&path, e))?;
        if let Some(cut) = &replayed.report.cut_tail {
            tracing::warn!(
                path = %path.display(),
                offset = cut.offset,
                bytes_cut = cut.bytes_cut,
                reason = %cut.reason,
                "cutting a torn tail off the log"
            );
            file.set_len(cut.offset)
                .and_then(|()| file.sync_all())
                .map_err(io_err(format!(
                    "cutting the torn tail of {}",
                    path.display()
                )))?;
        }
        let mut valid_len = replayed.report.valid_len;
        if compact::worth_it(&replayed, valid_len, options.compaction_min_bytes)
            && let Some((compacted, done)) = compact::compact(&path, &file, valid_len, &replayed)?
        {
            // The old file (now unlinked) is closed and unlocked here; opens that locked it
            // meanwhile see it is no longer the log (`open_locked`).
            file = compacted;
            valid_len = done.bytes_after;
            replayed.report.valid_len = valid_len;
            replayed.report.compacted = Some(done);
        }
        file.seek(SeekFrom::Start(valid_len))
            .map_err(io_err(format!("seeking the end of {}", path.display())))?;

        let hasher = replayed.log.id_hasher();
        let state = Arc::new(RwLock::new(State {
            log: replayed.log,
            meta: replayed.meta,
        }));
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                requests: Vec::new(),
                closed: false,
                wake_at: usize::MAX,
                writer_sleeps: false,
                synced: Vec::new(),
                failed: false,
                stopped: false,
                held: None,
            }),
            wake: Condvar::new(),
            stopped: Condvar::new(),
        });
        let writer = Writer {
            file,
            // Sync threads reopen the file by this path; absolute, so a later change of the
            // working directory does not matter.
            path: std::path::absolute(&path).unwrap_or_else(|_| path.clone()),
            len: valid_len,
            published_len: valid_len,
            dirty: false,
            state: Arc::clone(&state),
            shared: Arc::clone(&shared),
            durability: options.durability,
            window: options.group_commit_window,
            max_syncs: options.syncs_in_flight.max(1),
            hook: options.fault_hook,
            last_group: 1,
            failure: None,
            buf: Vec::new(),
            taken: Vec::new(),
            syncers: Vec::new(),
            next_job: 0,
            syncing: 0,
            in_flight: VecDeque::new(),
            in_flight_appended: 0,
            in_flight_keys: HashMap::default(),
        };
        let name = format!("ksync-log-writer {}", path.display());
        let handle = std::thread::Builder::new()
            .name(name.chars().take(64).collect())
            .spawn(move || writer.run())
            .map_err(io_err("spawning the log writer thread"))?;
        Ok(Self {
            state,
            hasher,
            shared,
            slots: Arc::new(Semaphore::new(
                options.queue_capacity.clamp(1, Semaphore::MAX_PERMITS),
            )),
            writer: Some(handle),
            path,
            durability: options.durability,
            recovery: replayed.report,
        })
    }

    /// What the last open found: events replayed and any torn tail cut off.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The file this log lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durability policy in force.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Whether a failure (a failed sync, or a failed write that could not be cut back)
    /// stopped the log: every append, metadata change and flush now gets
    /// [`StorageError::Closed`], and reads show what was acknowledged before it. Reopen the
    /// file to go on (a [`FileProvider`](crate::FileProvider) does so by itself): the log then
    /// stands as it was at its last good sync.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().failed
    }

    /// For a log that [`is_closed`](Self::is_closed): waits until its writer has cut the file
    /// back to what it acknowledged and unlocked it, so that it can be opened again. An error
    /// when cutting it back failed (tried again here): the file then stays locked, since a
    /// reopen would take records that were never synced for stored.
    pub(crate) fn wait_released(&self) -> Result<(), StorageError> {
        let mut inner = self.shared.lock();
        while !inner.stopped {
            inner = self
                .shared
                .stopped
                .wait(inner)
                .unwrap_or_else(|p| p.into_inner());
        }
        let Some((file, len)) = inner.held.take() else {
            return Ok(());
        };
        match cut_back(&self.path, &file, len) {
            Ok(()) => Ok(()),
            Err(e) => {
                inner.held = Some((file, len));
                Err(StorageError::Io {
                    context: format!(
                        "reopening {}: cutting it back to its last sync after a failure",
                        self.path.display()
                    ),
                    source: e,
                })
            }
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // The writer only changes state through `LogIndex::commit` and map inserts, which
        // leave it consistent even if a panic interrupted them; a poisoned lock is usable.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StorageError>>) -> Op,
    ) -> Result<T, StorageError> {
        let slot = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| StorageError::Closed)?;
        let (reply, answer) = oneshot::channel();
        {
            let mut inner = self.shared.lock();
            if inner.closed {
                return Err(StorageError::Closed);
            }
            inner.requests.push(Request {
                op: make(reply),
                _slot: slot,
            });
            if inner.writer_sleeps && inner.requests.len() >= inner.wake_at {
                inner.wake_at = usize::MAX;
                self.shared.wake.notify_one();
            }
        }
        answer.await.map_err(|_| StorageError::Closed)?
    }
}

impl FileStorage {
    /// Sends `events` (not empty) to the writer; answers one outcome per event (and the
    /// appended events, if `answer_events`) once the new ones are durable (per policy) and
    /// visible.
    async fn append_events(
        &self,
        events: Vec<Event>,
        answer_events: bool,
    ) -> Result<AppendAnswer, StorageError> {
        // Encoding here, on the caller's thread, keeps it off the writer thread, which is the
        // one thing all appends of a log share.
        let mut bytes = Vec::with_capacity(events.len() * 256);
        let mut ends = Vec::new();
        let mut keys = Vec::with_capacity(events.len());
        for event in &events {
            format::encode_event(event, &mut bytes)?;
            keys.push(self.hasher.key(event.id.as_bytes(), event.version));
            if events.len() > 1 {
                ends.push(bytes.len());
            }
        }
        self.submit(|reply| {
            Op::Append(
                EncodedAppend {
                    events,
                    bytes,
                    ends,
                    answer_events,
                    keys,
                },
                reply,
            )
        })
        .await
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Closing the queue stops the writer once it has answered what was queued; joining it
        // releases the file lock before `drop` returns, so the log can be reopened at once.
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "log writer thread panicked");
        }
        let held = self.shared.lock().held.take();
        if let Some((file, len)) = held
            && let Err(e) = cut_back(&self.path, &file, len)
        {
            // Unlocked, the file would be replayed with records that were never synced and
            // never acknowledged: keep it locked until the process ends.
            tracing::error!(path = %self.path.display(), error = %e,
                "cutting the log back after a failure failed; it stays locked");
            std::mem::forget(file);
        }
    }
}

/// Cuts a stopped log back to `len` (the end of what it acknowledged) and makes that durable.
/// The sync goes through a new file description: the writer's may still report the failure
/// that stopped the log (Linux reports a writeback error once per description).
fn cut_back(path: &Path, file: &File, len: u64) -> io::Result<()> {
    file.set_len(len)?;
    OpenOptions::new().write(true).open(path)?.sync_all()
}

impl Storage for FileStorage {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(MergeOutcome::default());
            }
            let answer = self.append_events(events, true).await?;
            Ok(merge_outcome(answer))
        })
    }

    fn append_summary(
        &self,
        events: Vec<Event>,
    ) -> BoxFuture<'_, Result<MergeSummary, StorageError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(MergeSummary::default());
            }
            let outcomes = self.append_events(events, false).await?.outcomes;
            let mut summary = MergeSummary::default();
            for outcome in &outcomes {
                match outcome {
                    AppendOutcome::Appended { .. } => summary.appended += 1,
                    AppendOutcome::Duplicate { .. } => summary.duplicates += 1,
                    AppendOutcome::Conflict(conflict) => {
                        summary.conflicts.push((**conflict).clone());
                    }
                }
            }
            summary.outcomes = outcomes;
            Ok(summary)
        })
    }

    fn visit_since(
        &self,
        after: u64,
        limit: usize,
        visit: &mut dyn FnMut(u64, &Event),
    ) -> Result<usize, StorageError> {
        Ok(self.read().log.visit_since(after, limit, visit))
    }

    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        Ok(self.read().log.read_since(after, limit))
    }

    fn get(&self, id: &str, version: u64) -> Result<Option<Stored>, StorageError> {
        Ok(self.read().log.get(id, version))
    }

    fn latest(&self, id: &str) -> Result<Option<Stored>, StorageError> {
        Ok(self.read().log.latest(id))
    }

    fn len(&self) -> u64 {
        self.read().log.len()
    }

    fn state(&self) -> Result<BTreeMap<String, Event>, StorageError> {
        Ok(self.read().log.state())
    }

    fn state_seqs(&self) -> Result<Vec<u64>, StorageError> {
        Ok(self.read().log.state_seqs())
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StorageError> {
        Ok(self.read().meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        let (key, value) = (key.to_owned(), value.to_owned());
        Box::pin(async move { self.submit(|reply| Op::Meta(key, Some(value), reply)).await })
    }

    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        let key = key.to_owned();
        Box::pin(async move { self.submit(|reply| Op::Meta(key, None, reply)).await })
    }

    fn is_closed(&self) -> bool {
        FileStorage::is_closed(self)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move { self.submit(Op::Flush).await })
    }
}

/// Opens (or creates) the log at `path` and locks it exclusively.
///
/// The lock belongs to the open file, not the path: when the path was renamed over (a
/// compaction by another open) or deleted (an empty log dropped by a provider) between the
/// open and the lock, the lock is on a file that is no longer the log, so it opens again.
fn open_locked(path: &Path) -> Result<File, StorageError> {
    for _ in 0..LOCK_ATTEMPTS {
        let file = open_or_create(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StorageError::Io {
                    context: format!("{} is already open in another FileStorage", path.display()),
                    source: io::Error::new(io::ErrorKind::WouldBlock, "log file is locked"),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io_err(format!("locking {}", path.display()))(e));
            }
        }
        if is_at_path(&file, path)? {
            return Ok(file);
        }
    }
    Err(StorageError::Io {
        context: format!("{} kept being replaced while opening it", path.display()),
        source: io::Error::new(io::ErrorKind::WouldBlock, "log file keeps changing"),
    })
}

/// Whether `file` is the file at `path` (same device and inode).
#[cfg(unix)]
fn is_at_path(file: &File, path: &Path) -> Result<bool, StorageError> {
    use std::os::unix::fs::MetadataExt;
    let at_path = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(format!("reading metadata of {}", path.display()))(e)),
    };
    let open = file
        .metadata()
        .map_err(io_err(format!("reading metadata of {}", path.display())))?;
    Ok(at_path.dev() == open.dev() && at_path.ino() == open.ino())
}

/// Without inode numbers to compare, this is not checked.
#[cfg(not(unix))]
fn is_at_path(_file: &File, _path: &Path) -> Result<bool, StorageError> {
    Ok(true)
}

/// Adds the file's path to a refusal of its contents, so an operator with many logs (a
/// server's data directory) knows which one a newer or damaged file is.
fn naming_file(path: &Path, e: StorageError) -> StorageError {
    match e {
        StorageError::Format(msg) => StorageError::Format(format!("{}: {msg}", path.display())),
        StorageError::Corrupt { offset, reason } => StorageError::Corrupt {
            offset,
            reason: format!("{reason} (in {})", path.display()),
        },
        other => other,
    }
}

/// Opens `path` read-write; when missing, creates it with a header via a temporary file and a
/// rename, so a crash never leaves a half-written header under the real name.
fn open_or_create(path: &Path) -> Result<File, StorageError> {
    let open = || OpenOptions::new().read(true).write(true).open(path);
    match open() {
        Ok(file) => return Ok(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("opening {}", path.display()))(e)),
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".ksync-new-")
        .tempfile_in(&dir)
        .map_err(io_err(format!("creating a new log in {}", dir.display())))?;
    tmp.write_all(&format::header())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_err(format!("writing a new log in {}", dir.display())))?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {}
        // Someone else created it first: use theirs (the temporary file is removed).
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(format!("creating {}", path.display()))(e.error)),
    }
    sync_dir(&dir)?;
    open().map_err(io_err(format!("opening {}", path.display())))
}

/// Replaces the file at `path` with `bytes` so that a crash or power loss leaves the old
/// file or the new one, never an empty or half-written one: a synced temporary file in the same
/// directory (owner-only permissions on Unix), renamed into place, then the directory synced.
/// For small files written whole (a data directory's `LAYOUT`, a working directory's config).
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<(), StorageError> {
    let context = || format!("writing {}", path.display());
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".ksync-new-")
        .tempfile_in(dir)
        .map_err(io_err(context()))?;
    std::io::Write::write_all(&mut tmp, bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_err(context()))?;
    tmp.persist(path).map_err(|e| io_err(context())(e.error))?;
    sync_dir(dir)
}

/// Makes a directory entry change (a new file) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    #[cfg(unix)]
    {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("syncing directory {}", dir.display())))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Builds an append's answer from the writer's.
fn merge_outcome(answer: AppendAnswer) -> MergeOutcome {
    let mut out = MergeOutcome {
        appended: answer.appended,
        ..MergeOutcome::default()
    };
    for outcome in &answer.outcomes {
        match outcome {
            AppendOutcome::Appended { .. } => {}
            AppendOutcome::Duplicate { .. } => out.duplicates += 1,
            AppendOutcome::Conflict(conflict) => out.conflicts.push((**conflict).clone()),
        }
    }
    out.outcomes = answer.outcomes;
    out
}

/// The writer thread: the only code that writes the file or changes the index.
///
/// A group goes: take what is queued, plan it as one batch against the committed log, write
/// its new records in one `write`, hand the sync to a sync thread, and go on to the next group
/// while that sync runs (up to `max_syncs` at once). Groups are published (index commit, then
/// answers) strictly in file order, each only after its own sync and every earlier group's
/// succeeded. Appends that arrive while syncs run form the next group, so group size adapts
/// to the sync time with no fixed wait.
struct Writer {
    file: File,
    /// Where sync threads reopen the file.
    path: PathBuf,
    /// Length of the file up to the last written group.
    len: u64,
    /// Length of the file up to the last published group: what a log stopped by a failure
    /// is cut back to.
    published_len: u64,
    /// Whether bytes were written since the last sync was started.
    dirty: bool,
    state: Arc<RwLock<State>>,
    shared: Arc<Shared>,
    durability: Durability,
    window: Duration,
    max_syncs: usize,
    hook: Option<Arc<dyn FaultHook>>,
    /// Requests in the previous group: the target of the optional window, and (halved) how
    /// many must queue before a group starts while another one syncs.
    last_group: usize,
    /// What stopped the log (a failed sync, or a failed write that could not be cut back);
    /// every later request gets `Closed`.
    failure: Option<io::Error>,
    /// Bytes of the group being written.
    buf: Vec<u8>,
    /// Requests taken for the next group (kept to reuse its allocation).
    taken: Vec<Request>,
    /// Sync threads, started when first needed.
    syncers: Vec<Syncer>,
    next_job: u64,
    /// Syncs started and not yet finished.
    syncing: usize,
    /// Written groups not yet published, in file order.
    in_flight: VecDeque<Group>,
    /// Events the groups in flight append (their seqs follow the committed log's).
    in_flight_appended: u64,
    /// Hashes of the `(id, version)`s the groups in flight append, with their counts. Two
    /// keys may share a hash: then a batch waits for the groups in flight when it need not,
    /// which is slower but never wrong.
    in_flight_keys: HashMap<u64, u32, nohash_hasher::BuildNoHashHasher<u64>>,
}

/// Marks the writer ended when dropped (see [`Inner::stopped`]).
struct Stopped(Arc<Shared>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.lock().stopped = true;
        self.0.stopped.notify_all();
    }
}

/// A sync thread: `fdatasync`s on its own file descriptor when the writer asks.
struct Syncer {
    /// Jobs for it; at most one is outstanding (`busy`), so the channel never grows.
    jobs: Sender<u64>,
    handle: JoinHandle<()>,
    busy: bool,
}

/// A written group waiting to be published.
struct Group {
    /// The sync job that covers it (meaningless when none was needed).
    job: u64,
    /// Where the file ends after it.
    end: u64,
    /// Its sync's result; `None` while the sync runs.
    synced: Option<io::Result<()>>,
    /// The records it wrote (shared with the index, which keeps events encoded).
    bytes: Arc<Vec<u8>>,
    /// Its new events, in log order.
    appended: Vec<GroupEvent>,
    /// Each append's answer, sent once the group is published.
    appends: Vec<(AppendReply, AppendAnswer)>,
    metas: Vec<(String, Option<String>, UnitReply)>,
    flushes: Vec<UnitReply>,
}

/// A new event of a written group.
struct GroupEvent {
    seq: u64,
    /// Where its record's payload is in the group's bytes.
    payload: std::ops::Range<usize>,
    /// Its key in the index (its `revision_hash` is what [`Writer::in_flight_keys`] counts).
    key: EncodedKey,
    /// The event itself, when the index keeps it decoded (its append did not ask for it).
    event: Option<Event>,
}

/// An append request of the group being planned.
struct PendingAppend {
    reply: AppendReply,
    /// How many events of the group batch are its own (they follow the previous request's).
    count: usize,
    bytes: Vec<u8>,
    /// As in [`EncodedAppend::ends`].
    ends: Vec<usize>,
    answer_events: bool,
}

impl Writer {
    fn run(self) {
        // Dropped after `work` has dropped the writer and its file (the lock), also if it
        // panics: whoever waits for the file to be released waits for that.
        let _stopped = Stopped(Arc::clone(&self.shared));
        self.work();
    }

    fn work(mut self) {
        loop {
            let (synced, closed) = self.wait_for_work();
            self.finish_syncs(synced);
            if !self.taken.is_empty() {
                self.join_window();
                self.start_group();
            } else if closed && self.in_flight.is_empty() {
                break;
            }
        }
        for syncer in std::mem::take(&mut self.syncers) {
            drop(syncer.jobs);
            if syncer.handle.join().is_err() {
                tracing::error!("log sync thread panicked");
            }
        }
        if self.dirty && self.failure.is_none() {
            // Clean close under `Durability::None`: sync what was written (best effort).
            if let Err(e) = self.file.sync_data() {
                tracing::warn!(error = %e, "syncing the log on close failed");
            }
        }
        if self.failure.is_some() {
            // Stopped by a failure: whatever follows the last published group was never
            // acknowledged (and after a failed sync the kernel may have dropped it); cut it,
            // so that a reopen finds only what was acknowledged, then let the file go (so
            // it can be reopened while this `FileStorage` is still held).
            let len = self.published_len;
            if let Err(e) = cut_back(&self.path, &self.file, len) {
                tracing::error!(error = %e, "cutting the log back after a failure failed");
                self.shared.lock().held = Some((self.file, len));
            }
        }
    }

    /// Sleeps until requests can be taken (a sync slot is free), a sync finished, or the log
    /// closes with nothing left to do. Takes the requests into `self.taken`; returns the
    /// finished syncs and whether the log is closing.
    fn wait_for_work(&mut self) -> (Vec<(usize, u64, io::Result<()>)>, bool) {
        let shared = Arc::clone(&self.shared);
        let mut inner = shared.lock();
        // With nothing syncing, any request starts a group at once. With a sync running, a
        // second group in parallel only pays off if it is not tiny: wait for half as many
        // requests as the last group had (the running sync's end wakes the writer anyway, and
        // then it takes whatever is queued). Fewer, fuller groups: fewer syncs and wake-ups.
        let start_at = if self.syncing == 0 {
            1
        } else {
            (self.last_group / 2).max(1)
        };
        loop {
            let can_take = self.syncing < self.max_syncs;
            if (can_take && inner.requests.len() >= start_at)
                || !inner.synced.is_empty()
                || (inner.closed && inner.requests.is_empty() && self.in_flight.is_empty())
            {
                break;
            }
            inner.writer_sleeps = true;
            inner.wake_at = if can_take { start_at } else { usize::MAX };
            inner = shared.wake.wait(inner).unwrap_or_else(|p| p.into_inner());
            inner.writer_sleeps = false;
        }
        if self.syncing < self.max_syncs {
            self.take_requests(&mut inner);
        }
        (std::mem::take(&mut inner.synced), inner.closed)
    }

    fn take_requests(&mut self, inner: &mut Inner) {
        let limit = match self.durability {
            Durability::EveryAppend => 1,
            _ => MAX_GROUP_REQUESTS,
        }
        .saturating_sub(self.taken.len());
        if self.taken.is_empty() && inner.requests.len() <= limit {
            std::mem::swap(&mut inner.requests, &mut self.taken);
        } else {
            let n = inner.requests.len().min(limit);
            self.taken.extend(inner.requests.drain(..n));
        }
    }

    /// Under group commit with a window: waits (at most the window) for as many requests as
    /// the previous group had. Callers wake the writer once, when that many are queued.
    fn join_window(&mut self) {
        if self.durability != Durability::GroupCommit || self.window.is_zero() {
            return;
        }
        let target = self.last_group.min(MAX_GROUP_REQUESTS);
        if self.taken.len() < target {
            let deadline = Instant::now() + self.window;
            let shared = Arc::clone(&self.shared);
            let mut inner = shared.lock();
            loop {
                let have = self.taken.len() + inner.requests.len();
                let now = Instant::now();
                if have >= target || inner.closed || now >= deadline {
                    break;
                }
                inner.writer_sleeps = true;
                inner.wake_at = target - self.taken.len();
                inner = shared
                    .wake
                    .wait_timeout(inner, deadline - now)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|p| p.into_inner().0);
                inner.writer_sleeps = false;
            }
            self.take_requests(&mut inner);
        }
        self.last_group = self.taken.len();
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Plans, writes and starts syncing the requests in `self.taken`.
    fn start_group(&mut self) {
        let mut batch: Vec<Event> = Vec::new();
        let mut batch_keys: Vec<EncodedKey> = Vec::new();
        let mut appends: Vec<PendingAppend> = Vec::new();
        let mut metas: Vec<(String, Option<String>, UnitReply)> = Vec::new();
        let mut flushes: Vec<UnitReply> = Vec::new();
        let mut taken = std::mem::take(&mut self.taken);
        self.last_group = taken.len();
        for Request { op, _slot } in taken.drain(..) {
            if self.failure.is_some() {
                reply_closed(op);
                continue;
            }
            match op {
                Op::Append(
                    EncodedAppend {
                        events,
                        bytes,
                        ends,
                        answer_events,
                        keys,
                    },
                    reply,
                ) => {
                    appends.push(PendingAppend {
                        reply,
                        count: events.len(),
                        bytes,
                        ends,
                        answer_events,
                    });
                    batch.extend(events);
                    batch_keys.extend(keys);
                }
                Op::Meta(key, value, reply) => metas.push((key, value, reply)),
                Op::Flush(reply) => flushes.push(reply),
            }
        }
        self.taken = taken;
        if appends.is_empty() && metas.is_empty() && flushes.is_empty() {
            return;
        }

        if self.collides_with_in_flight(&batch_keys) {
            // The same revision is still syncing: judge this batch against the log once that
            // is published, never against a log that lacks it.
            self.wait_for_in_flight();
        }
        let (mut plan, committed) = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            (state.log.plan(batch), state.log.len())
        };
        let offset = self.in_flight_appended;
        if offset > 0 {
            // Planned against the committed log: the groups in flight come first.
            for outcome in &mut plan.outcome.outcomes {
                match outcome {
                    AppendOutcome::Appended { seq } => *seq += offset,
                    AppendOutcome::Duplicate { seq } if *seq > committed => *seq += offset,
                    _ => {}
                }
            }
            for stored in &mut plan.outcome.appended {
                stored.seq += offset;
            }
        }

        // A fresh buffer per group: once written it is shared with the index.
        self.buf = Vec::with_capacity(appends.iter().map(|p| p.bytes.len()).sum());
        // Where each new event's payload lands in `buf`, in log order, with its key.
        let mut payloads = Vec::with_capacity(plan.outcome.appended.len());
        let mut outcomes = plan.outcome.outcomes.iter().zip(batch_keys);
        for p in &appends {
            let mut from = 0;
            let single = [p.bytes.len()];
            let ends = if p.ends.is_empty() {
                &single[..]
            } else {
                &p.ends[..]
            };
            for (&end, (outcome, key)) in ends.iter().zip(outcomes.by_ref().take(p.count)) {
                if matches!(outcome, AppendOutcome::Appended { .. })
                    && let Some(record) = p.bytes.get(from..end)
                {
                    let start = self.buf.len();
                    self.buf.extend_from_slice(record);
                    payloads.push((start + RECORD_HEADER_LEN..self.buf.len(), key));
                }
                from = end;
            }
        }
        let mut kept_metas = Vec::with_capacity(metas.len());
        for (key, value, reply) in metas {
            let encoded = match &value {
                Some(value) => format::encode_meta(&key, value, &mut self.buf),
                None => format::encode_meta_remove(&key, &mut self.buf),
            };
            match encoded {
                Ok(()) => kept_metas.push((key, value, reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }

        // Split the plan per append: its outcomes, and its new events (which follow the
        // previous append's) either back to the caller or into the index.
        let mut outcomes = plan.outcome.outcomes.into_iter();
        let mut new_events = plan.outcome.appended.into_iter().zip(payloads);
        let mut appended = Vec::with_capacity(new_events.len());
        let mut answers = Vec::with_capacity(appends.len());
        for p in appends {
            let outcomes: Vec<AppendOutcome> = outcomes.by_ref().take(p.count).collect();
            let count = outcomes
                .iter()
                .filter(|o| matches!(o, AppendOutcome::Appended { .. }))
                .count();
            let mut answer = AppendAnswer {
                outcomes,
                appended: Vec::with_capacity(if p.answer_events { count } else { 0 }),
            };
            for (stored, (payload, key)) in new_events.by_ref().take(count) {
                let seq = stored.seq;
                let event = if p.answer_events {
                    answer.appended.push(stored);
                    None
                } else {
                    Some(stored.event)
                };
                appended.push(GroupEvent {
                    seq,
                    payload,
                    key,
                    event,
                });
            }
            answers.push((p.reply, answer));
        }
        if !self.buf.is_empty()
            && let Err(e) = self.write_buf()
        {
            fail_group_replies(answers, kept_metas, flushes, &e);
            return;
        }
        let written = std::mem::take(&mut self.buf);
        if !written.is_empty() {
            self.len += written.len() as u64;
            self.dirty = true;
        }
        let mut group = Group {
            job: 0,
            end: self.len,
            synced: Some(Ok(())),
            bytes: Arc::new(written),
            appended,
            appends: answers,
            metas: kept_metas,
            flushes,
        };
        let sync = match self.durability {
            Durability::EveryAppend | Durability::GroupCommit => self.dirty,
            Durability::None => self.dirty && !group.flushes.is_empty(),
        };
        if sync {
            self.dirty = false;
            let (job, synced) = self.start_sync();
            group.job = job;
            group.synced = synced;
        }
        self.in_flight_appended += group.appended.len() as u64;
        for new in &group.appended {
            *self
                .in_flight_keys
                .entry(new.key.revision_hash())
                .or_default() += 1;
        }
        self.in_flight.push_back(group);
        self.publish_ready();
    }

    /// Writes `self.buf`. On an error the file is cut back to its previous length (and if
    /// that fails too, the log stops).
    fn write_buf(&mut self) -> io::Result<()> {
        let result = match &self.hook {
            Some(hook) => match hook.before_write(self.buf.len()) {
                Ok(()) => self.file.write_all(&self.buf),
                Err(fault) => {
                    let torn = fault.written.min(self.buf.len());
                    // The torn part is best effort, like a real short write.
                    let _ = self.file.write_all(&self.buf[..torn]);
                    Err(fault.error)
                }
            },
            None => self.file.write_all(&self.buf),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "writing to the log failed");
            // Drop whatever part of the group reached the file so the next group does not
            // land behind garbage.
            let restore = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()));
            if let Err(e2) = restore {
                tracing::error!(error = %e2, "cutting a failed write failed; closing the log");
                self.stop(e2);
            }
        }
        result
    }

    /// Starts a sync of everything written so far: on a free sync thread, or here when no
    /// sync thread can be had. Returns the job and, if it already ran, its result.
    fn start_sync(&mut self) -> (u64, Option<io::Result<()>>) {
        let job = self.next_job;
        self.next_job += 1;
        if let Some(index) = self.free_syncer()
            && self.syncers[index].jobs.send(job).is_ok()
        {
            self.syncers[index].busy = true;
            self.syncing += 1;
            return (job, None);
        }
        let synced = match &self.hook {
            Some(hook) => hook.before_sync(),
            None => Ok(()),
        }
        .and_then(|()| self.file.sync_data());
        (job, Some(synced))
    }

    fn free_syncer(&mut self) -> Option<usize> {
        if let Some(index) = self.syncers.iter().position(|s| !s.busy) {
            return Some(index);
        }
        if self.syncers.len() >= self.max_syncs {
            return None;
        }
        match self.spawn_syncer() {
            Ok(()) => Some(self.syncers.len() - 1),
            Err(e) => {
                tracing::warn!(error = %e, "starting a log sync thread failed; syncing inline");
                None
            }
        }
    }

    fn spawn_syncer(&mut self) -> io::Result<()> {
        // Its own open file description, not a dup of the writer's: Linux reports a
        // writeback error once per description, so every sync thread sees every error that
        // happened since its last sync, whichever sync ran into it first.
        let file = OpenOptions::new().write(true).open(&self.path)?;
        let (jobs, queue) = std::sync::mpsc::channel();
        let index = self.syncers.len();
        let shared = Arc::clone(&self.shared);
        let hook = self.hook.clone();
        let handle = std::thread::Builder::new()
            .name(format!("ksync-log-sync-{index}"))
            .spawn(move || sync_loop(index, &file, hook.as_deref(), &queue, &shared))?;
        self.syncers.push(Syncer {
            jobs,
            handle,
            busy: false,
        });
        Ok(())
    }

    /// Records finished syncs and publishes what they complete.
    fn finish_syncs(&mut self, synced: Vec<(usize, u64, io::Result<()>)>) {
        for (index, job, result) in synced {
            if let Some(syncer) = self.syncers.get_mut(index) {
                syncer.busy = false;
            }
            self.syncing = self.syncing.saturating_sub(1);
            if let Some(group) = self
                .in_flight
                .iter_mut()
                .find(|g| g.synced.is_none() && g.job == job)
            {
                group.synced = Some(result);
            }
        }
        self.publish_ready();
    }

    /// Whether a key of the batch being planned (by hash) may be one that a group in flight
    /// appends. (Its duplicates and conflicts with the committed log are `plan`'s business.)
    fn collides_with_in_flight(&self, keys: &[EncodedKey]) -> bool {
        !self.in_flight_keys.is_empty()
            && keys
                .iter()
                .any(|k| self.in_flight_keys.contains_key(&k.revision_hash()))
    }

    /// Waits until every group in flight is published (or failed).
    fn wait_for_in_flight(&mut self) {
        let shared = Arc::clone(&self.shared);
        while !self.in_flight.is_empty() {
            let synced = {
                let mut inner = shared.lock();
                while inner.synced.is_empty() {
                    inner.writer_sleeps = true;
                    inner.wake_at = usize::MAX;
                    inner = shared.wake.wait(inner).unwrap_or_else(|p| p.into_inner());
                    inner.writer_sleeps = false;
                }
                std::mem::take(&mut inner.synced)
            };
            self.finish_syncs(synced);
        }
    }

    /// Publishes the groups at the front whose syncs are done, in file order.
    fn publish_ready(&mut self) {
        while self.in_flight.front().is_some_and(|g| g.synced.is_some()) {
            let Some(mut group) = self.in_flight.pop_front() else {
                break;
            };
            self.in_flight_appended -= group.appended.len() as u64;
            for new in &group.appended {
                let hash = new.key.revision_hash();
                if let Some(count) = self.in_flight_keys.get_mut(&hash) {
                    *count -= 1;
                    if *count == 0 {
                        self.in_flight_keys.remove(&hash);
                    }
                }
            }
            if let Some(Err(e)) = group.synced.take() {
                // After a failed fsync the kernel may have dropped the dirty pages: nothing
                // written since the last good sync can be trusted, and retrying could report
                // success for lost data. Stop; a reopen replays what really is on disk.
                tracing::error!(error = %e, "syncing the log failed; closing the log");
                self.stop(e);
            }
            match &self.failure {
                // A group behind a failure is never published: its seqs would follow
                // events that are not there.
                Some(e) => fail_group(group, e),
                None => self.publish(group),
            }
        }
    }

    /// Stops the log after `error`: refuses new requests at once (before the failed ones
    /// are answered, so a caller told of the failure finds the log closed), answers those
    /// queued with `Closed`, then ends (see [`Writer::run`]).
    fn stop(&mut self, error: io::Error) {
        self.failure.get_or_insert(error);
        let mut inner = self.shared.lock();
        inner.failed = true;
        inner.closed = true;
    }

    /// Durable (per policy): commit to the index, then answer.
    fn publish(&mut self, group: Group) {
        self.published_len = group.end;
        let mut meta_replies = Vec::with_capacity(group.metas.len());
        {
            let mut state = self.write_state();
            for new in group.appended {
                let seq = new.seq;
                // The index keeps the record (and the event itself if the caller did not
                // take it back): no event is cloned.
                let pushed = EncodedEvent::new(Arc::clone(&group.bytes), new.payload).is_some_and(
                    |encoded| state.log.push_encoded_keyed(encoded, new.key, new.event),
                );
                if !pushed || state.log.len() != seq {
                    tracing::error!(seq, "a planned event did not land at its seq");
                    debug_assert!(false, "stale merge plan at seq {seq}");
                }
            }
            for (key, value, reply) in group.metas {
                match value {
                    Some(value) => state.meta.insert(key, value),
                    None => state.meta.remove(&key),
                };
                meta_replies.push(reply);
            }
        }
        for (reply, answer) in group.appends {
            let _ = reply.send(Ok(answer));
        }
        for reply in meta_replies {
            let _ = reply.send(Ok(()));
        }
        for reply in group.flushes {
            let _ = reply.send(Ok(()));
        }
    }
}

/// A sync thread's loop: sync when asked, report to the writer.
fn sync_loop(
    index: usize,
    file: &File,
    hook: Option<&dyn FaultHook>,
    jobs: &Receiver<u64>,
    shared: &Shared,
) {
    for job in jobs {
        let sync = || {
            match hook {
                Some(hook) => hook.before_sync(),
                None => Ok(()),
            }
            .and_then(|()| file.sync_data())
        };
        // A panic (in a fault hook) must still answer the writer, which waits for every sync.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(sync))
            .unwrap_or_else(|_| Err(io::Error::other("the log sync thread panicked")));
        let mut inner = shared.lock();
        inner.synced.push((index, job, result));
        if inner.writer_sleeps {
            shared.wake.notify_one();
        }
    }
}

/// Answers every request of a group that will not be published with `error`.
fn fail_group(group: Group, error: &io::Error) {
    fail_group_replies(group.appends, group.metas, group.flushes, error);
}

/// [`fail_group`] for a group not yet made.
fn fail_group_replies(
    appends: Vec<(AppendReply, AppendAnswer)>,
    metas: Vec<(String, Option<String>, UnitReply)>,
    flushes: Vec<UnitReply>,
    error: &io::Error,
) {
    for (reply, _) in appends {
        let _ = reply.send(Err(StorageError::Io {
            context: "appending to the log".into(),
            source: copy_io_error(error),
        }));
    }
    for (_, _, reply) in metas {
        let _ = reply.send(Err(StorageError::Io {
            context: "writing metadata to the log".into(),
            source: copy_io_error(error),
        }));
    }
    for reply in flushes {
        let _ = reply.send(Err(StorageError::Io {
            context: "flushing the log".into(),
            source: copy_io_error(error),
        }));
    }
}

fn reply_closed(op: Op) {
    match op {
        Op::Append(_, reply) => {
            let _ = reply.send(Err(StorageError::Closed));
        }
        Op::Meta(_, _, reply) | Op::Flush(reply) => {
            let _ = reply.send(Err(StorageError::Closed));
        }
    }
}
