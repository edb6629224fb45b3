//! [`FileProvider`]: one [`FileStorage`] per room or branch under a data directory.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ksync_core::{BoxFuture, LogKind, LogName, Name, Storage, StorageError, StorageProvider};

use crate::storage::{FileStorage, FileStorageOptions, io_err, sync_dir, write_file_durably};

/// The provider's map of open logs, locked.
type OpenLogs<'a> = MutexGuard<'a, HashMap<LogName, Arc<FileStorage>>>;

/// The names stored in each directory whose names were checked (see
/// `FileProvider::check_case`): by directory, the names folded to ASCII lower case, each with
/// the names stored under it (one, unless a case-keeping file system got two before the check
/// existed or by hand).
type CaseIndex = HashMap<PathBuf, HashMap<String, Vec<String>>>;

/// File name suffix of every log.
const LOG_SUFFIX: &str = ".log";
/// The file in the data directory that a provider keeps locked while it lives.
const LOCK_FILE: &str = ".lock";
/// The file in the data directory that names its layout (see [`check_layout`]).
const LAYOUT_FILE: &str = "LAYOUT";
/// The layout this build reads and writes: `rooms/<room>.log`, `repos/<repo>/<branch>.log`.
/// A next layout should leave files named `rooms` and `repos` in the data directory: builds
/// from before the marker never read it, but refuse a file where they need a directory (rather
/// than serve the directory empty).
pub const DATA_LAYOUT_VERSION: u32 = 1;
/// What [`LAYOUT_FILE`] holds before the version number.
const LAYOUT_PREFIX: &str = "ksync data directory layout ";
/// The directory of the rooms' logs, in the data directory.
const ROOMS_DIR: &str = "rooms";
/// The directory of the repositories' directories (one per repository, holding its branches'
/// logs), in the data directory.
const REPOS_DIR: &str = "repos";

/// Caps on what a [`FileProvider`] creates in its data directory, where every room is a file
/// and every repository a directory, kept until deleted by hand: without them any client
/// allowed to write could fill the directory with names (a million rooms is a million files,
/// and ~100 B each of the provider's memory). Past a cap, opening a log that would be a new
/// room or repository fails with [`StorageError::TooManyLogs`] and creates nothing; the ones
/// stored stay readable and writable (also when a lower cap is set than the directory holds).
/// A room or repository counts from the moment its log is made (a room joined but never written
/// to, while open), until it is deleted. Branches per repository are the Git service's cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreLimits {
    /// Most rooms kept. Default [`DEFAULT_MAX_ROOMS`].
    pub max_rooms: usize,
    /// Most repositories kept. Default [`DEFAULT_MAX_REPOS`].
    pub max_repos: usize,
}

/// Default [`StoreLimits::max_rooms`]: far above what one application's rooms need, while
/// listing the directory (at start, by `/health`) stays well under a second.
pub const DEFAULT_MAX_ROOMS: usize = 100_000;
/// Default [`StoreLimits::max_repos`]: each may hold up to the Git service's
/// `max_branches_per_repo` (1,000) branches, a file each.
pub const DEFAULT_MAX_REPOS: usize = 10_000;

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_rooms: DEFAULT_MAX_ROOMS,
            max_repos: DEFAULT_MAX_REPOS,
        }
    }
}

impl StoreLimits {
    /// Caps of `max_rooms` rooms and `max_repos` repositories.
    pub fn new(max_rooms: usize, max_repos: usize) -> Self {
        Self {
            max_rooms,
            max_repos,
        }
    }
}

/// Opens a [`FileStorage`] per log under one data directory:
///
/// ```text
/// <dir>/rooms/<room>.log
/// <dir>/repos/<repo>/<branch>.log
/// ```
///
/// Paths are built only from validated [`Name`]s (no separators, no leading dot), so no name
/// can leave the directory. The same `Arc` is returned for a name while the provider holds it;
/// logs stay open until [`FileProvider::close`] or the provider is dropped. A log a failure
/// closed ([`FileStorage::is_closed`]) is opened again by the next `open` or `existing` of
/// its name (replayed as it stood at its last good sync), whoever still holds the closed one.
///
/// One provider per data directory: it holds an exclusive lock on `<dir>/.lock` while it lives
/// (released when it is dropped, or when its process dies), so a second one, in this process
/// or another (a second server started on the same directory by mistake), is refused when it
/// is made, not on each room or branch the first one happens to hold open.
///
/// Opening a log replays it on the calling thread while holding the provider's lock (a large
/// log takes a while: about 3 s per million events on a busy 2-core machine); async callers
/// with big logs should call `open` from `spawn_blocking`.
#[derive(Debug)]
pub struct FileProvider {
    dir: PathBuf,
    options: FileStorageOptions,
    limits: StoreLimits,
    open: Mutex<HashMap<LogName, Arc<FileStorage>>>,
    /// The length of each log this provider closed, as it was then (see
    /// [`StorageProvider::known_len`]). One entry per log closed since the provider started:
    /// bounded by the logs in the directory.
    closed_lens: Mutex<HashMap<LogName, u64>>,
    /// What `FileProvider::check_case` compares a name with, instead of listing the directory
    /// on each open under the map's lock (O(rooms) per open: ~2 ms at 4,000 rooms, every other
    /// open and release waiting). A directory is listed once, when first checked; the provider
    /// then notes the logs and repository directories it makes and deletes (it owns the data
    /// directory: see the lock). About 100 B per name, bounded by the logs in the directory.
    names: Mutex<CaseIndex>,
    /// Holds the directory's lock (see the type's docs) until the provider is dropped.
    _lock: fs::File,
}

/// Checks, before anything is created or locked in `dir`, that the logs can be written where
/// they will go: `dir`, [`ROOMS_DIR`], [`REPOS_DIR`] and each repository's directory, as far
/// as they exist (what is missing is created later in a directory checked here). Otherwise a
/// directory that cannot be written (wrong owner, a read-only mount, a file where a directory
/// must be) was noticed only when the first room or branch opened, by a client.
fn check_writable(dir: &Path) -> Result<(), StorageError> {
    probe(dir)?;
    let rooms = dir.join(ROOMS_DIR);
    if existing_dir(&rooms)? {
        probe(&rooms)?;
    }
    let repos = dir.join(REPOS_DIR);
    if !existing_dir(&repos)? {
        return Ok(());
    }
    probe(&repos)?;
    for repo in dir_entries(&repos)? {
        // Only the names a repository's directory can have: anything else there is not one.
        if valid_name(&repo.file_name()).is_some() && existing_dir(&repo.path())? {
            probe(&repo.path())?;
        }
    }
    Ok(())
}

fn not_writable(path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    io_err(format!("data directory not writable: {}", path.display()))
}

/// Whether `path` is a directory (`false`: not there); something else there is an error.
fn existing_dir(path: &Path) -> Result<bool, StorageError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(true),
        Ok(_) => Err(not_writable(path)(io::Error::new(
            io::ErrorKind::NotADirectory,
            "exists but is not a directory",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(not_writable(path)(e)),
    }
}

/// Creates and removes a probe file in `dir`. Its name (a leading dot, no `.log`) is never
/// taken for a log, and the process id keeps two providers started on one directory at once
/// (the second is refused by the lock right after) from removing each other's probe; one
/// left behind by a crash is taken over (not `create_new`), not an error.
fn probe(dir: &Path) -> Result<(), StorageError> {
    let path = dir.join(format!(".ksync-write-probe-{}", std::process::id()));
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(not_writable(dir))?;
    fs::remove_file(&path).map_err(not_writable(dir))
}

/// Checks the layout `dir` was written in: `Ok(true)` when its marker names this build's,
/// `Ok(false)` when nothing does yet (a new directory, or one from before the marker, which is
/// layout 1: see [`write_layout`]). A directory of a newer layout is refused: this build would
/// find none of its logs where it looks, serve empty rooms and branches, and write new logs
/// beside the real ones.
fn check_layout(dir: &Path) -> Result<bool, StorageError> {
    let path = dir.join(LAYOUT_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let version = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.trim_end().strip_prefix(LAYOUT_PREFIX))
                .and_then(|number| number.parse::<u32>().ok());
            match version {
                Some(DATA_LAYOUT_VERSION) => Ok(true),
                Some(newer) => Err(StorageError::Format(format!(
                    "data directory {} has layout {newer} ({}), written by a newer kSync; this \
                     one reads layout {DATA_LAYOUT_VERSION}",
                    dir.display(),
                    path.display()
                ))),
                None => Err(StorageError::Format(format!(
                    "{} does not name a data directory layout (expected \"{LAYOUT_PREFIX}N\"); \
                     damaged, or not a kSync data directory",
                    path.display()
                ))),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(format!("reading {}", path.display()))(e)),
    }
}

/// Writes [`LAYOUT_FILE`] into `dir`, whole or not at all (then written again at the next
/// open), never empty.
fn write_layout(dir: &Path) -> Result<(), StorageError> {
    write_file_durably(
        &dir.join(LAYOUT_FILE),
        format!("{LAYOUT_PREFIX}{DATA_LAYOUT_VERSION}\n").as_bytes(),
    )
}

/// Takes the exclusive lock on `dir`'s [`LOCK_FILE`] (made if missing; it holds nothing).
fn lock_dir(dir: &Path) -> Result<fs::File, StorageError> {
    let path = dir.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(StorageError::Io {
            context: format!(
                "data directory {} is in use by another ksync process or FileProvider",
                dir.display()
            ),
            source: io::Error::new(io::ErrorKind::WouldBlock, "data directory is locked"),
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_err(format!("locking {}", path.display()))(e)),
    }
}

impl FileProvider {
    /// A provider over `data_dir` (created if missing) with default storage options.
    pub fn new(data_dir: impl AsRef<Path>) -> Result<Self, StorageError> {
        Self::with_options(data_dir, FileStorageOptions::default())
    }

    /// A provider whose logs all open with `options` (durability, fault hook, ...).
    pub fn with_options(
        data_dir: impl AsRef<Path>,
        options: FileStorageOptions,
    ) -> Result<Self, StorageError> {
        let dir = data_dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)
            .map_err(io_err(format!("creating data directory {}", dir.display())))?;
        // The marker first: a newer layout is refused as one before anything here is probed,
        // created or locked (it may keep no `rooms/`, or a file by that name).
        check_layout(&dir)?;
        check_writable(&dir)?;
        let lock = lock_dir(&dir)?;
        // Read again under the lock before naming it: another provider may have named it
        // between the first read and the lock.
        if !check_layout(&dir)? {
            write_layout(&dir)?;
        }
        Ok(Self {
            dir,
            options,
            limits: StoreLimits::default(),
            open: Mutex::new(HashMap::new()),
            closed_lens: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            _lock: lock,
        })
    }

    /// This provider with other caps on the rooms and repositories it creates (default:
    /// [`StoreLimits::default`]).
    pub fn with_limits(mut self, limits: StoreLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The caps on the rooms and repositories this provider creates.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `name`.
    pub fn path_of(&self, name: &LogName) -> PathBuf {
        match name {
            LogName::Room(room) => self
                .dir
                .join(ROOMS_DIR)
                .join(format!("{}{LOG_SUFFIX}", room.as_str())),
            LogName::Branch { repo, branch } => self
                .dir
                .join(REPOS_DIR)
                .join(repo.as_str())
                .join(format!("{}{LOG_SUFFIX}", branch.as_str())),
        }
    }

    /// Forgets the open handle of `name`; the log closes when the last user drops its `Arc`.
    /// The next [`StorageProvider::open`] reopens (and replays) it.
    pub fn close(&self, name: &LogName) {
        let closed = self.lock().remove(name);
        if let Some(storage) = closed {
            self.remember_len(name, storage.len());
        }
    }

    fn remember_len(&self, name: &LogName, len: u64) {
        let mut lens = self.closed_lens.lock().unwrap_or_else(|p| p.into_inner());
        lens.insert(name.clone(), len);
    }

    fn names(&self) -> MutexGuard<'_, CaseIndex> {
        // Only inserted into / removed from, like the map.
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses `name` when the directory `dir` holds an entry `<other><suffix>` where `other`
    /// differs from `name` only in case, and none `<name><suffix>`: on a file system that
    /// ignores case (macOS's and Windows' defaults) the two names are one file, so two rooms
    /// would share a log (and a token for one could read the other). Refused on every file
    /// system, so that a data directory means the same wherever it is. Names are ASCII
    /// ([`Name`]): ASCII case is all there is.
    fn check_case(&self, dir: &Path, name: &str, suffix: &str) -> Result<(), StorageError> {
        let mut index = self.names();
        let stored = match index.entry(dir.to_path_buf()) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(names_in(dir, suffix)?)
            }
        };
        match stored.get(&name.to_ascii_lowercase()) {
            Some(names) if !names.iter().any(|n| n == name) => match names.first() {
                Some(existing) => Err(StorageError::NameClash {
                    requested: name.to_owned(),
                    existing: existing.clone(),
                }),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Refuses to make one more entry in `dir` (checked by `check_case` already, so listed)
    /// when it holds `max`. Summed on each new log, under the map's lock (so two opens cannot
    /// both take the last place): O(names), ~0.1 ms at 100,000, beside the syncs a new log
    /// costs anyway.
    fn check_count(&self, dir: &Path, kind: LogKind, max: usize) -> Result<(), StorageError> {
        let stored: usize = self
            .names()
            .get(dir)
            .map_or(0, |names| names.values().map(Vec::len).sum());
        if stored >= max {
            return Err(StorageError::TooManyLogs { kind, max });
        }
        Ok(())
    }

    /// Notes that `dir` now holds `name` (a log or a repository's directory just made), if
    /// its names were listed already (else they are listed, with it, when first checked).
    fn note_stored(&self, dir: &Path, name: &str) {
        if let Some(stored) = self.names().get_mut(dir) {
            let names = stored.entry(name.to_ascii_lowercase()).or_default();
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
    }

    /// Removes `dir`, the directory of `repo` made by an open that then failed, if it is still
    /// empty. Best effort: one left behind is an empty repository directory, which lists no
    /// branch and counts toward `max_repos` until removed by hand.
    fn remove_new_repo(&self, repo: Option<&Name>, dir: &Path) {
        let Some(repo) = repo else {
            return;
        };
        match fs::remove_dir(dir) {
            Ok(()) => self.note_removed(&self.dir.join(REPOS_DIR), repo.as_str()),
            Err(e) => tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "removing the directory of a repository whose first log failed failed"
            ),
        }
    }

    /// Notes that `dir` no longer holds `name` (a log deleted).
    fn note_removed(&self, dir: &Path, name: &str) {
        let mut index = self.names();
        let Some(stored) = index.get_mut(dir) else {
            return;
        };
        let folded = name.to_ascii_lowercase();
        if let Some(names) = stored.get_mut(&folded) {
            names.retain(|n| n != name);
            if names.is_empty() {
                stored.remove(&folded);
            }
        }
    }

    fn lock(&self) -> OpenLogs<'_> {
        // The map is only inserted into / removed from; a panic cannot leave it inconsistent.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_file(
        &self,
        open: &mut HashMap<LogName, Arc<FileStorage>>,
        name: &LogName,
    ) -> Result<Arc<FileStorage>, StorageError> {
        match name {
            LogName::Room(room) => {
                self.check_case(&self.dir.join(ROOMS_DIR), room.as_str(), LOG_SUFFIX)?;
            }
            LogName::Branch { repo, branch } => {
                let repos = self.dir.join(REPOS_DIR);
                self.check_case(&repos, repo.as_str(), "")?;
                self.check_case(&repos.join(repo.as_str()), branch.as_str(), LOG_SUFFIX)?;
            }
        }
        let path = self.path_of(name);
        match name {
            LogName::Room(_) if !path.exists() => {
                self.check_count(
                    &self.dir.join(ROOMS_DIR),
                    LogKind::Rooms,
                    self.limits.max_rooms,
                )?;
            }
            LogName::Branch { repo, .. }
                if !self.dir.join(REPOS_DIR).join(repo.as_str()).is_dir() =>
            {
                self.check_count(
                    &self.dir.join(REPOS_DIR),
                    LogKind::Repos,
                    self.limits.max_repos,
                )?;
            }
            _ => {}
        }
        let (dir, stem) = match name {
            LogName::Room(room) => (self.dir.join(ROOMS_DIR), room.as_str()),
            LogName::Branch { repo, branch } => (
                self.dir.join(REPOS_DIR).join(repo.as_str()),
                branch.as_str(),
            ),
        };
        // A repository's directory made here, removed again if its first log is not made: it
        // would count toward `StoreLimits::max_repos` as a repository holding nothing.
        let mut new_repo = None;
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            if let LogName::Branch { repo, .. } = name {
                self.note_stored(&self.dir.join(REPOS_DIR), repo.as_str());
                new_repo = Some(repo);
            }
            // The new directory entries must survive a crash along with the log in them.
            let synced = dir
                .parent()
                .map_or(Ok(()), sync_dir)
                .and_then(|()| sync_dir(&self.dir));
            if let Err(e) = synced {
                self.remove_new_repo(new_repo, &dir);
                return Err(e);
            }
        }
        let existed = path.exists();
        let opened = FileStorage::open_with(&path, self.options.clone());
        if let Err(e) = &opened
            && !existed
            && path.is_file()
        {
            // The open made the file and then failed (out of file descriptors or threads,
            // say): it holds no event, so it goes, or every name refused so would be left on
            // disk as an empty log. Best effort: one left behind is an empty log.
            if let Err(removed) = fs::remove_file(&path) {
                tracing::warn!(
                    log = %path.display(),
                    error = %removed,
                    open_error = %e,
                    "removing the log of a failed open failed"
                );
            }
        }
        // Also when the open failed and left the file: the name is taken on disk.
        if opened.is_ok() || path.is_file() {
            self.note_stored(&dir, stem);
        } else {
            self.remove_new_repo(new_repo, &dir);
        }
        let storage = Arc::new(opened?);
        open.insert(name.clone(), Arc::clone(&storage));
        Ok(storage)
    }
}

impl FileProvider {
    /// The map, locked, and the open log of `name` if there is one a failure did not close
    /// ([`FileStorage::is_closed`]). A closed one is forgotten once its file is released, so
    /// that the caller opens the file again (replay finds the log as it was at its last good
    /// sync; those who still hold the closed one get `Closed` and let it go). Without this,
    /// one failed sync closed a room or branch until the server restarted.
    fn lock_live(
        &self,
        name: &LogName,
    ) -> Result<(OpenLogs<'_>, Option<Arc<FileStorage>>), StorageError> {
        loop {
            let open = self.lock();
            let Some(storage) = open.get(name).map(Arc::clone) else {
                return Ok((open, None));
            };
            if !storage.is_closed() {
                return Ok((open, Some(storage)));
            }
            // Waited for outside the map's lock: the closed log's last syncs (long, on a
            // failing disk) must not hold up every other log's open and release. It stays in
            // the map meanwhile, so other opens of this name wait too: one file, one
            // `FileStorage` at a time.
            drop(open);
            storage.wait_released()?;
            let mut open = self.lock();
            if open
                .get(name)
                .is_some_and(|held| Arc::ptr_eq(held, &storage))
            {
                open.remove(name);
                tracing::warn!(log = %storage.path().display(), "reopening a log closed by a failure");
                self.remember_len(name, storage.len());
                return Ok((open, None));
            }
            // Another open of this name got there first: look again.
        }
    }
}

impl StorageProvider for FileProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        let (mut open, live) = self.lock_live(name)?;
        if let Some(storage) = live {
            return Ok(storage as Arc<dyn Storage>);
        }
        Ok(self.open_file(&mut open, name)? as Arc<dyn Storage>)
    }

    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        let (mut open, live) = self.lock_live(name)?;
        if let Some(storage) = live {
            return Ok(Some(storage as Arc<dyn Storage>));
        }
        if !self.path_of(name).is_file() {
            return Ok(None);
        }
        Ok(Some(self.open_file(&mut open, name)? as Arc<dyn Storage>))
    }

    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        let mut names = Vec::new();
        for room in log_names_in(&self.dir.join(ROOMS_DIR))? {
            names.push(LogName::Room(room));
        }
        let repos = self.dir.join(REPOS_DIR);
        for repo in dir_entries(&repos)? {
            let Some(repo_name) = valid_name(&repo.file_name()) else {
                continue;
            };
            if !repo.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            for branch in log_names_in(&repo.path())? {
                names.push(LogName::Branch {
                    repo: repo_name.clone(),
                    branch,
                });
            }
        }
        names.sort();
        Ok(names)
    }

    /// Closes the log (its file handle and writer thread) when nobody but this provider
    /// holds it; a log still in use elsewhere stays open. The log is closed under the map's
    /// lock, so an `open` of the same name waits for the file lock to be released rather than
    /// find it taken.
    fn release(&self, name: &LogName) {
        let mut open = self.lock();
        if open.get(name).is_some_and(|s| Arc::strong_count(s) == 1)
            && let Some(storage) = open.remove(name)
        {
            self.remember_len(name, storage.len());
            // Dropping it here joins its writer thread, which has already answered every
            // append (they were all awaited by whoever held the log).
            drop(storage);
        }
    }

    /// [`release`](Self::release), deleting the file when the log has no events (see the
    /// trait). Under the map's lock, like `release`: an `open` of the same name waits and
    /// then creates the log anew.
    fn release_discarding_empty(&self, name: &LogName) {
        let mut open = self.lock();
        if open.get(name).is_none_or(|s| Arc::strong_count(s) != 1) {
            return;
        }
        let Some(storage) = open.remove(name) else {
            return;
        };
        let len = storage.len();
        drop(storage);
        if len > 0 {
            self.remember_len(name, len);
            return;
        }
        let path = self.path_of(name);
        let removed =
            fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())));
        // Best effort: a file left behind (or brought back by a crash before the directory
        // is synced) is an empty log, which loses nothing and is deleted next time.
        if removed.is_ok()
            && let Some(dir) = path.parent()
        {
            let stem = match name {
                LogName::Room(room) => room.as_str(),
                LogName::Branch { branch, .. } => branch.as_str(),
            };
            self.note_removed(dir, stem);
        }
        match removed.and_then(|()| path.parent().map_or(Ok(()), sync_dir)) {
            Ok(()) => {
                let mut lens = self.closed_lens.lock().unwrap_or_else(|p| p.into_inner());
                lens.remove(name);
            }
            Err(e) => {
                tracing::warn!(log = %path.display(), error = %e, "deleting an empty log failed");
                self.remember_len(name, 0);
            }
        }
    }

    fn opened(&self, name: &LogName) -> Option<Arc<dyn Storage>> {
        self.lock()
            .get(name)
            .map(|storage| Arc::clone(storage) as Arc<dyn Storage>)
    }

    fn known_len(&self, name: &LogName) -> Option<u64> {
        if let Some(storage) = self.lock().get(name) {
            return Some(storage.len());
        }
        let lens = self.closed_lens.lock().unwrap_or_else(|p| p.into_inner());
        lens.get(name).copied()
    }

    fn flush_all(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        // A log closed by a failure has nothing to flush: all it acknowledged was synced.
        let storages: Vec<Arc<FileStorage>> = self
            .lock()
            .values()
            .filter(|s| !s.is_closed())
            .cloned()
            .collect();
        Box::pin(async move {
            let mut first_error = None;
            for storage in storages {
                if let Err(e) = storage.flush().await {
                    tracing::error!(path = %storage.path().display(), error = %e, "flush failed");
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }
}

/// Entries of `dir`, or none when it does not exist.
fn dir_entries(dir: &Path) -> Result<Vec<fs::DirEntry>, StorageError> {
    let read = match fs::read_dir(dir) {
        Ok(read) => read,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("listing {}", dir.display()))(e)),
    };
    read.collect::<Result<Vec<_>, _>>()
        .map_err(io_err(format!("listing {}", dir.display())))
}

/// The names in `dir` as `FileProvider::check_case` keeps them: each entry `<name><suffix>`
/// (any entry for an empty suffix), by `name` folded to lower case. None when `dir` does not
/// exist.
fn names_in(dir: &Path, suffix: &str) -> Result<HashMap<String, Vec<String>>, StorageError> {
    let mut names: HashMap<String, Vec<String>> = HashMap::new();
    for entry in dir_entries(dir)? {
        let entry_name = entry.file_name();
        if let Some(name) = entry_name.to_str().and_then(|n| n.strip_suffix(suffix)) {
            names
                .entry(name.to_ascii_lowercase())
                .or_default()
                .push(name.to_owned());
        }
    }
    Ok(names)
}

fn valid_name(os: &std::ffi::OsStr) -> Option<Name> {
    os.to_str().and_then(|s| Name::new(s).ok())
}

/// The names of the `*.log` files in `dir` (files whose stem is not a valid name, such as
/// temporary files, are skipped).
fn log_names_in(dir: &Path) -> Result<Vec<Name>, StorageError> {
    let mut names = Vec::new();
    for entry in dir_entries(dir)? {
        if !entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(|s| s.strip_suffix(LOG_SUFFIX)) else {
            continue;
        };
        if let Ok(name) = Name::new(stem) {
            names.push(name);
        }
    }
    Ok(names)
}
