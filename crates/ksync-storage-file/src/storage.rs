//! [`FileStorage`]: the log on disk, its writer thread and group commit.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ksync_core::{
    AppendOutcome, BoxFuture, Event, LogIndex, MergeOutcome, MergePlan, Storage, StorageError,
    Stored,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::fault::FaultHook;
use crate::format::{self, HEADER_LEN};
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
/// Default time the writer waits for more appends to join a commit group (see
/// [`FileStorageOptions::group_commit_window`]).
pub const DEFAULT_GROUP_COMMIT_WINDOW: Duration = Duration::from_micros(500);
/// Most requests one commit group takes.
const MAX_GROUP_REQUESTS: usize = 4096;

/// Options of a [`FileStorage`]; `Default` gives the spec's defaults.
#[derive(Clone)]
#[non_exhaustive]
pub struct FileStorageOptions {
    /// When an append counts as done. Default: [`Durability::GroupCommit`].
    pub durability: Durability,
    /// Capacity of the bounded request queue in front of the writer thread (appends,
    /// `set_meta`, flushes). When it is full, callers wait asynchronously for a free slot (no
    /// executor thread blocks, nothing is dropped). Default: [`DEFAULT_QUEUE_CAPACITY`].
    pub queue_capacity: usize,
    /// Under group commit, how long the writer may wait for more appends to join a group once
    /// it has fewer than the previous group had. Bounded wait, never more than this per group;
    /// zero turns waiting off. Default: [`DEFAULT_GROUP_COMMIT_WINDOW`].
    pub group_commit_window: Duration,
    /// Fault injection for reliability tests. Default: none.
    pub fault_hook: Option<Arc<dyn FaultHook>>,
}

impl Default for FileStorageOptions {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            group_commit_window: DEFAULT_GROUP_COMMIT_WINDOW,
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

/// One request to the writer thread.
enum Op {
    Append(
        Vec<Event>,
        oneshot::Sender<Result<MergeOutcome, StorageError>>,
    ),
    Meta(String, String, oneshot::Sender<Result<(), StorageError>>),
    Flush(oneshot::Sender<Result<(), StorageError>>),
}

struct Request {
    op: Op,
    // Held until the writer takes the request: the semaphore is the queue's capacity.
    _slot: OwnedSemaphorePermit,
}

/// An append-only, checksummed event log in one file: the spec's `FileStorage`.
///
/// Reads are served from an in-memory index; appends go through a dedicated writer thread
/// that writes, syncs (per [`Durability`]) and only then publishes the new events, so a read
/// never sees an event that is not durable. Reopening replays the file; a torn tail left by a
/// crash is cut off and reported in [`FileStorage::recovery`], damage anywhere else is refused
/// with [`StorageError::Corrupt`]. The file is locked while open: a second `FileStorage` on
/// the same file (in this or another process) gets an IO error.
///
/// Dropping a `FileStorage` waits for its writer thread to answer what is queued and exit
/// (normally at most one sync), so the file is unlocked when `drop` returns.
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
    requests: Option<Sender<Request>>,
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

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> StorageError {
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
        let mut file = open_or_create(&path)?;
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
            format::check_header(&head)?;
        }
        let replayed = replay(&path, len)?;
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
        let valid_len = replayed.report.valid_len;
        file.seek(SeekFrom::Start(valid_len))
            .map_err(io_err(format!("seeking the end of {}", path.display())))?;

        let state = Arc::new(RwLock::new(State {
            log: replayed.log,
            meta: replayed.meta,
        }));
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = Writer {
            file,
            len: valid_len,
            unsynced: false,
            state: Arc::clone(&state),
            durability: options.durability,
            window: options.group_commit_window,
            hook: options.fault_hook,
            last_group: 1,
            failed: false,
            buf: Vec::new(),
            encoded: Vec::new(),
            spans: Vec::new(),
        };
        let name = format!("ksync-log-writer {}", path.display());
        let handle = std::thread::Builder::new()
            .name(name.chars().take(64).collect())
            .spawn(move || writer.run(rx))
            .map_err(io_err("spawning the log writer thread"))?;
        Ok(Self {
            state,
            requests: Some(tx),
            slots: Arc::new(Semaphore::new(options.queue_capacity.max(1))),
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
        let requests = self.requests.as_ref().ok_or(StorageError::Closed)?;
        requests
            .send(Request {
                op: make(reply),
                _slot: slot,
            })
            .map_err(|_| StorageError::Closed)?;
        answer.await.map_err(|_| StorageError::Closed)?
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // Closing the queue stops the writer once it has answered what was queued; joining it
        // releases the file lock before `drop` returns, so the log can be reopened at once.
        self.requests.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "log writer thread panicked");
        }
    }
}

impl Storage for FileStorage {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        Box::pin(async move {
            if events.is_empty() {
                return Ok(MergeOutcome::default());
            }
            self.submit(|reply| Op::Append(events, reply)).await
        })
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

    fn meta(&self, key: &str) -> Result<Option<String>, StorageError> {
        Ok(self.read().meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        let (key, value) = (key.to_owned(), value.to_owned());
        Box::pin(async move { self.submit(|reply| Op::Meta(key, value, reply)).await })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move { self.submit(Op::Flush).await })
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

/// The writer thread: the only code that writes the file or changes the index.
struct Writer {
    file: File,
    /// Length of the file up to the last written group.
    len: u64,
    /// Whether bytes were written without a sync since (only under `Durability::None`).
    unsynced: bool,
    state: Arc<RwLock<State>>,
    durability: Durability,
    window: Duration,
    hook: Option<Arc<dyn FaultHook>>,
    /// Requests in the previous group: a target for gathering the next one.
    last_group: usize,
    /// Set after a failed sync; every later request gets `Closed`.
    failed: bool,
    /// Bytes of the group being written.
    buf: Vec<u8>,
    /// Encoded records of the batch's events, and each event's span in it.
    encoded: Vec<u8>,
    spans: Vec<Range<usize>>,
}

/// A `set_meta` request of the current group: key, value, reply.
type PendingMeta = (String, String, oneshot::Sender<Result<(), StorageError>>);

/// An append request of the current group: its inputs' range in the group batch.
struct PendingAppend {
    inputs: Range<usize>,
    reply: oneshot::Sender<Result<MergeOutcome, StorageError>>,
}

impl Writer {
    fn run(mut self, requests: Receiver<Request>) {
        while let Ok(first) = requests.recv() {
            let mut group = vec![first];
            self.gather(&requests, &mut group);
            self.commit_group(group);
        }
        if self.unsynced && !self.failed {
            // Clean close under `Durability::None`: sync what was written (best effort).
            if let Err(e) = self.file.sync_data() {
                tracing::warn!(error = %e, "syncing the log on close failed");
            }
        }
    }

    /// Adds what is queued (and, under group commit, what arrives within the window) to
    /// `group`.
    fn gather(&mut self, requests: &Receiver<Request>, group: &mut Vec<Request>) {
        if self.durability == Durability::EveryAppend {
            return;
        }
        while group.len() < MAX_GROUP_REQUESTS {
            match requests.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        // Appenders that were answered together come back together, but not all at the
        // same instant: wait a little for the rest rather than sync half a group now and
        // the other half one sync later.
        if self.durability == Durability::GroupCommit && !self.window.is_zero() {
            let target = self.last_group.min(MAX_GROUP_REQUESTS);
            let deadline = Instant::now() + self.window;
            while group.len() < target {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                match requests.recv_timeout(deadline - now) {
                    Ok(r) => group.push(r),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        self.last_group = group.len();
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn commit_group(&mut self, group: Vec<Request>) {
        let mut batch: Vec<Event> = Vec::new();
        let mut appends: Vec<PendingAppend> = Vec::new();
        let mut metas: Vec<PendingMeta> = Vec::new();
        let mut flushes: Vec<oneshot::Sender<Result<(), StorageError>>> = Vec::new();
        self.encoded.clear();
        self.spans.clear();
        for Request { op, _slot } in group {
            if self.failed {
                reply_closed(op);
                continue;
            }
            match op {
                Op::Append(events, reply) => {
                    let start = batch.len();
                    let enc_start = self.encoded.len();
                    let mut bad = None;
                    for event in &events {
                        let from = self.encoded.len();
                        if let Err(e) = format::encode_event(event, &mut self.encoded) {
                            bad = Some(e);
                            break;
                        }
                        self.spans.push(from..self.encoded.len());
                    }
                    if let Some(e) = bad {
                        // Refuse the whole append; the rest of the group goes on.
                        self.encoded.truncate(enc_start);
                        self.spans.truncate(start);
                        let _ = reply.send(Err(e));
                        continue;
                    }
                    batch.extend(events);
                    appends.push(PendingAppend {
                        inputs: start..batch.len(),
                        reply,
                    });
                }
                Op::Meta(key, value, reply) => metas.push((key, value, reply)),
                Op::Flush(reply) => flushes.push(reply),
            }
        }
        if appends.is_empty() && metas.is_empty() && flushes.is_empty() {
            return;
        }

        let (plan, base) = {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            (state.log.plan(batch), state.log.len())
        };
        self.buf.clear();
        for (outcome, span) in plan.outcome.outcomes.iter().zip(&self.spans) {
            if matches!(outcome, AppendOutcome::Appended { .. })
                && let Some(bytes) = self.encoded.get(span.clone())
            {
                self.buf.extend_from_slice(bytes);
            }
        }
        let mut kept_metas = Vec::with_capacity(metas.len());
        for (key, value, reply) in metas {
            match format::encode_meta(&key, &value, &mut self.buf) {
                Ok(()) => kept_metas.push((key, value, reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }

        if let Err(e) = self.write_and_sync(!flushes.is_empty()) {
            for p in appends {
                let _ = p.reply.send(Err(StorageError::Io {
                    context: "appending to the log".into(),
                    source: copy_io_error(&e),
                }));
            }
            for (_, _, reply) in kept_metas {
                let _ = reply.send(Err(StorageError::Io {
                    context: "writing metadata to the log".into(),
                    source: copy_io_error(&e),
                }));
            }
            for reply in flushes {
                let _ = reply.send(Err(StorageError::Io {
                    context: "flushing the log".into(),
                    source: copy_io_error(&e),
                }));
            }
            return;
        }

        // Durable (per policy): publish.
        {
            let mut state = self.write_state();
            state.log.commit(&plan);
            for (key, value, _) in &kept_metas {
                state.meta.insert(key.clone(), value.clone());
            }
        }
        reply_appends(plan, base, appends);
        for (_, _, reply) in kept_metas {
            let _ = reply.send(Ok(()));
        }
        for reply in flushes {
            let _ = reply.send(Ok(()));
        }
    }

    /// Writes `self.buf` and syncs as the policy (or a flush) asks. On a write error the file
    /// is cut back to its previous length; on a sync error the writer stops for good.
    fn write_and_sync(&mut self, flush: bool) -> io::Result<()> {
        if !self.buf.is_empty() {
            if let Err(e) = self.write_buf() {
                tracing::error!(error = %e, "writing to the log failed");
                // Drop whatever part of the group reached the file so the next group does not
                // land behind garbage.
                let restore = self
                    .file
                    .set_len(self.len)
                    .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(|_| ()));
                if let Err(e2) = restore {
                    tracing::error!(error = %e2, "cutting a failed write failed; closing the log");
                    self.failed = true;
                }
                return Err(e);
            }
            self.len += self.buf.len() as u64;
            self.unsynced = true;
        }
        let sync = match self.durability {
            Durability::EveryAppend | Durability::GroupCommit => self.unsynced,
            Durability::None => flush && self.unsynced,
        };
        if sync {
            let synced = match &self.hook {
                Some(hook) => hook.before_sync(),
                None => Ok(()),
            }
            .and_then(|()| self.file.sync_data());
            if let Err(e) = synced {
                // After a failed fsync the kernel may have dropped the dirty pages: nothing
                // written since the last good sync can be trusted, and retrying could report
                // success for lost data. Stop; a reopen replays what really is on disk.
                tracing::error!(error = %e, "syncing the log failed; closing the log");
                self.failed = true;
                return Err(e);
            }
            self.unsynced = false;
        }
        Ok(())
    }

    fn write_buf(&mut self) -> io::Result<()> {
        if let Some(hook) = &self.hook
            && let Err(fault) = hook.before_write(self.buf.len())
        {
            let torn = fault.written.min(self.buf.len());
            // The torn part is best effort, like a real short write.
            let _ = self.file.write_all(&self.buf[..torn]);
            return Err(fault.error);
        }
        self.file.write_all(&self.buf)
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

/// Splits a group's merge outcome back into one outcome per append request.
fn reply_appends(plan: MergePlan, base: u64, appends: Vec<PendingAppend>) {
    if appends.len() == 1 {
        if let Some(p) = appends.into_iter().next() {
            let _ = p.reply.send(Ok(plan.outcome));
        }
        return;
    }
    let all = plan.outcome;
    for p in appends {
        let mut out = MergeOutcome::default();
        for outcome in all.outcomes.get(p.inputs.clone()).unwrap_or_default() {
            match outcome {
                AppendOutcome::Appended { seq } => {
                    let index = seq
                        .checked_sub(base + 1)
                        .and_then(|i| usize::try_from(i).ok());
                    if let Some(stored) = index.and_then(|i| all.appended.get(i)) {
                        out.appended.push(stored.clone());
                    }
                }
                AppendOutcome::Duplicate { .. } => out.duplicates += 1,
                AppendOutcome::Conflict(conflict) => out.conflicts.push((**conflict).clone()),
            }
            out.outcomes.push(outcome.clone());
        }
        let _ = p.reply.send(Ok(out));
    }
}
