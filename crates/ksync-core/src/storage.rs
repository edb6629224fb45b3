//! The storage trait and the in-memory storage.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};

use crate::event::Event;
use crate::log::{LogIndex, MergeOutcome, MergeSummary, Stored};

/// A boxed, sendable future, as returned by the object-safe async methods of kSync's traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors from a [`Storage`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An IO operation failed; nothing from the failed call was acknowledged.
    #[error("storage IO failed: {context}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The on-disk data is damaged at a place recovery must not cut.
    #[error("storage is corrupt at byte offset {offset}: {reason}")]
    Corrupt {
        /// Byte offset of the damaged record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The file is not a kSync log, or a format this version cannot read.
    #[error("unsupported storage format: {0}")]
    Format(String),
    /// The storage was closed (or its writer stopped after an earlier failure).
    #[error("storage is closed")]
    Closed,
    /// Encoding or decoding a record failed.
    #[error("storage codec error: {0}")]
    Codec(String),
    /// The storage does not implement this operation (e.g. [`Storage::remove_meta`] on a
    /// storage written before it existed).
    #[error("storage does not support {0}")]
    Unsupported(&'static str),
    /// The storage's options are out of range (which option, and its range).
    #[error("storage options: {0}")]
    Config(String),
    /// A log name that differs only in case from one already stored (`Notes` beside
    /// `notes`): file systems that ignore case (macOS's and Windows' defaults) would keep both
    /// in one file, so a storage that names files after logs refuses the second everywhere.
    #[error(
        "{requested:?} differs only in case from the existing {existing:?}; use that name or another"
    )]
    NameClash {
        /// The name asked for.
        requested: String,
        /// The name already stored.
        existing: String,
    },
    /// Creating the log would take the provider past its cap on the rooms or repositories it
    /// keeps (one file or directory each, kept until deleted by hand): nothing was created.
    #[error("{max} {kind} are stored, the most this server keeps; no new one is created")]
    TooManyLogs {
        /// What is capped.
        kind: LogKind,
        /// The cap.
        max: usize,
    },
}

/// What a provider's cap on stored logs counts ([`StorageError::TooManyLogs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogKind {
    /// Rooms (one log each).
    Rooms,
    /// Repositories (one directory each, holding their branches' logs).
    Repos,
}

impl std::fmt::Display for LogKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogKind::Rooms => "rooms",
            LogKind::Repos => "repositories",
        })
    }
}

impl StorageError {
    /// Whether this is an IO error because the disk (or the user's quota) is full: the
    /// operator's to fix, and a client's to retry later, unlike a failing disk.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }
}

/// Where kSync keeps a log: append-only, idempotent, sequence-numbered.
///
/// Rules every implementation keeps:
/// - `append` merges with the rules of [`LogIndex`]: new revisions get the next sequence
///   numbers, exact duplicates are dropped, conflicting contents are reported and not stored;
/// - when `append` returns `Ok`, the appended events are as durable as the storage promises
///   (for a durable storage: on disk), and visible to every read;
/// - reads see a prefix of the log; sequence numbers are gap-free and never reused.
///
/// Reads are synchronous and cheap (served from memory); writes are async so a durable
/// storage can batch many appends into one `fsync` without blocking an executor thread.
pub trait Storage: Send + Sync + 'static {
    /// Merges `events` into the log.
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>>;

    /// Up to `limit` events with `seq > after`, in order.
    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError>;

    /// Merges `events` like [`Storage::append`], reporting what happened without the appended
    /// events: for callers that do not need them back (a server acknowledging a push), so a
    /// storage that keeps events in memory can move them in instead of copying.
    fn append_summary(
        &self,
        events: Vec<Event>,
    ) -> BoxFuture<'_, Result<MergeSummary, StorageError>> {
        Box::pin(async move { self.append(events).await.map(MergeSummary::from) })
    }

    /// Calls `visit` with `(seq, event)` for up to `limit` events with `seq > after`, in order:
    /// [`Storage::read_since`] for callers that only look at the events (e.g. to encode them),
    /// so a storage that keeps them in memory need not copy them (one that keeps records
    /// decodes each into a temporary that lives for its visit). `visit` may run while the
    /// storage holds a lock: keep it short and do not call back into the storage. Returns how
    /// many events were visited.
    fn visit_since(
        &self,
        after: u64,
        limit: usize,
        visit: &mut dyn FnMut(u64, &Event),
    ) -> Result<usize, StorageError> {
        let page = self.read_since(after, limit)?;
        for stored in &page {
            visit(stored.seq, &stored.event);
        }
        Ok(page.len())
    }

    /// The revision `(id, version)`.
    fn get(&self, id: &str, version: u64) -> Result<Option<Stored>, StorageError>;

    /// The highest version of `id`.
    fn latest(&self, id: &str) -> Result<Option<Stored>, StorageError>;

    /// The number of events (the last sequence number).
    fn len(&self) -> u64;

    /// Whether the log is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The materialised state: the highest version of every id.
    fn state(&self) -> Result<BTreeMap<String, Event>, StorageError>;

    /// The seq of the highest version of every id, in the order of their ids (as
    /// [`Storage::state`]'s keys): the state as positions in the log, for a caller that reads
    /// the events later, a page at a time (a relay's state-based join). The default visits the
    /// whole log; a storage with an index of ids answers from it without reading an event.
    fn state_seqs(&self) -> Result<Vec<u64>, StorageError> {
        /// Events visited at a time.
        const SCAN: usize = 1024;
        // Per id: its highest version so far and that version's seq.
        let mut latest: std::collections::HashMap<String, (u64, u64)> =
            std::collections::HashMap::new();
        let mut after = 0;
        loop {
            let mut seen = after;
            let visited = self.visit_since(after, SCAN, &mut |seq, event| {
                seen = seq;
                match latest.get_mut(event.id.as_str()) {
                    Some(held) if held.0 >= event.version => {}
                    Some(held) => *held = (event.version, seq),
                    None => {
                        latest.insert(event.id.clone(), (event.version, seq));
                    }
                }
            })?;
            if visited == 0 {
                break;
            }
            after = seen;
        }
        let mut by_id: Vec<(String, u64)> =
            latest.into_iter().map(|(id, (_, seq))| (id, seq)).collect();
        by_id.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(by_id.into_iter().map(|(_, seq)| seq).collect())
    }

    /// Reads a small piece of replica metadata (cursors, the replica id).
    fn meta(&self, key: &str) -> Result<Option<String>, StorageError>;

    /// Writes a piece of metadata, as durably as events.
    fn set_meta(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StorageError>>;

    /// Deletes a piece of metadata, as durably as [`Storage::set_meta`] writes one: afterwards
    /// (and after a reopen) [`Storage::meta`] answers `None` for `key`. Removing a key that is
    /// not there is not an error. What callers use to keep metadata bounded (e.g. a cursor
    /// kept per remote peer is dropped when the peer is evicted).
    ///
    /// The provided version fails with [`StorageError::Unsupported`]: a storage that cannot
    /// delete must not pretend it did. Every storage of the workspace implements it.
    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        let _ = key;
        Box::pin(async { Err(StorageError::Unsupported("removing metadata")) })
    }

    /// Makes everything written so far durable (a no-op for storages without durability).
    fn flush(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether a failure stopped this storage for good: every write now gets
    /// [`StorageError::Closed`] until it is opened again (a file log after a failed sync).
    /// Its holder lets it go so that its provider reopens it. The provided version: never.
    fn is_closed(&self) -> bool {
        false
    }
}

/// A [`Storage`] held in memory. Fast, not durable; the spec's `InMemoryStorage`.
///
/// ```
/// # tokio_test_block(async {
/// use ksync_core::{Event, InMemoryStorage, Storage};
/// let storage = InMemoryStorage::new();
/// let out = storage.append(vec![Event::new("1", "t", serde_json::json!({}), 1)]).await.unwrap();
/// assert_eq!(out.last_seq(), Some(1));
/// assert_eq!(storage.len(), 1);
/// # });
/// # fn tokio_test_block<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Debug, Default)]
pub struct InMemoryStorage {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    log: LogIndex,
    meta: HashMap<String, String>,
}

impl InMemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the log half-updated (commit only pushes),
        // so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for InMemoryStorage {
    fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
        let outcome = self.lock().log.merge(events);
        Box::pin(async move { Ok(outcome) })
    }

    fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
        Ok(self.lock().log.read_since(after, limit))
    }

    fn append_summary(
        &self,
        events: Vec<Event>,
    ) -> BoxFuture<'_, Result<MergeSummary, StorageError>> {
        let summary = self.lock().log.merge_summary(events);
        Box::pin(async move { Ok(summary) })
    }

    fn visit_since(
        &self,
        after: u64,
        limit: usize,
        visit: &mut dyn FnMut(u64, &Event),
    ) -> Result<usize, StorageError> {
        Ok(self.lock().log.visit_since(after, limit, visit))
    }

    fn get(&self, id: &str, version: u64) -> Result<Option<Stored>, StorageError> {
        Ok(self.lock().log.get(id, version))
    }

    fn latest(&self, id: &str) -> Result<Option<Stored>, StorageError> {
        Ok(self.lock().log.latest(id))
    }

    fn len(&self) -> u64 {
        self.lock().log.len()
    }

    fn state(&self) -> Result<BTreeMap<String, Event>, StorageError> {
        Ok(self.lock().log.state())
    }

    fn state_seqs(&self) -> Result<Vec<u64>, StorageError> {
        Ok(self.lock().log.state_seqs())
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StorageError> {
        Ok(self.lock().meta.get(key).cloned())
    }

    fn set_meta(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.lock().meta.insert(key.to_owned(), value.to_owned());
        Box::pin(async { Ok(()) })
    }

    fn remove_meta(&self, key: &str) -> BoxFuture<'_, Result<(), StorageError>> {
        self.lock().meta.remove(key);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::AppendOutcome;

    /// A storage with only the required methods: exercises the provided ones.
    struct Plain(InMemoryStorage);

    impl Storage for Plain {
        fn append(&self, events: Vec<Event>) -> BoxFuture<'_, Result<MergeOutcome, StorageError>> {
            self.0.append(events)
        }
        fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, StorageError> {
            self.0.read_since(after, limit)
        }
        fn get(&self, id: &str, version: u64) -> Result<Option<Stored>, StorageError> {
            self.0.get(id, version)
        }
        fn latest(&self, id: &str) -> Result<Option<Stored>, StorageError> {
            self.0.latest(id)
        }
        fn len(&self) -> u64 {
            self.0.len()
        }
        fn state(&self) -> Result<BTreeMap<String, Event>, StorageError> {
            self.0.state()
        }
        fn meta(&self, key: &str) -> Result<Option<String>, StorageError> {
            self.0.meta(key)
        }
        fn set_meta(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StorageError>> {
            self.0.set_meta(key, value)
        }
    }

    #[tokio::test]
    async fn append_summary_and_visit_since_agree_with_the_provided_versions() {
        let ev = |id: &str, data: i64| Event::new(id, "t", serde_json::json!(data), 1);
        let memory = InMemoryStorage::new();
        let plain = Plain(InMemoryStorage::new());
        let storages: [&dyn Storage; 2] = [&memory, &plain];
        let mut summaries = Vec::new();
        let mut visits = Vec::new();
        for storage in storages {
            storage.append(vec![ev("a", 1)]).await.expect("append");
            let summary = storage
                .append_summary(vec![ev("b", 1), ev("a", 1), ev("a", 2), ev("c", 1)])
                .await
                .expect("append");
            assert_eq!(summary.appended, 2);
            assert_eq!(summary.duplicates, 1);
            assert_eq!(summary.conflicts.len(), 1);
            assert_eq!(summary.outcomes[0], AppendOutcome::Appended { seq: 2 });
            assert_eq!(
                (summary.first_seq(), summary.last_seq()),
                (Some(2), Some(3))
            );
            let mut seen = Vec::new();
            let n = storage
                .visit_since(1, 10, &mut |seq, e| seen.push((seq, e.id.clone())))
                .expect("visit");
            assert_eq!(n, 2);
            summaries.push(summary);
            visits.push(seen);
        }
        assert_eq!(summaries[0], summaries[1]);
        assert_eq!(visits[0], visits[1]);
        assert_eq!(visits[0], vec![(2, "b".to_owned()), (3, "c".to_owned())]);
    }

    #[tokio::test]
    async fn state_seqs_from_the_index_are_the_provided_scan_and_the_state() {
        let ev = |id: &str, version: u64| {
            Event::new(id, "t", serde_json::json!({ "v": version }), 1).with_version(version)
        };
        // Ids in an order other than their seqs', several versions, an id past the ASCII
        // range, and a version arriving after a higher one of its id.
        let batches = [
            vec![ev("b", 1), ev("\u{e9}t\u{e9}", 1), ev("a", 1)],
            vec![ev("b", 2), ev("a", 3), ev("c", 1)],
            vec![ev("a", 2), ev("b", 3)],
        ];
        let memory = InMemoryStorage::new();
        let plain = Plain(InMemoryStorage::new());
        for batch in batches {
            memory.append(batch.clone()).await.expect("append");
            plain.append(batch).await.expect("append");
        }
        let indexed = memory.state_seqs().expect("indexed");
        assert_eq!(indexed, plain.state_seqs().expect("scanned"));
        let expected: Vec<(String, u64)> = memory
            .state()
            .expect("state")
            .into_iter()
            .map(|(id, e)| (id, e.version))
            .collect();
        let read: Vec<(String, u64)> = indexed
            .iter()
            .map(|&seq| {
                let page = memory.read_since(seq - 1, 1).expect("read");
                (page[0].event.id.clone(), page[0].event.version)
            })
            .collect();
        assert_eq!(read, expected);
        assert_eq!(
            read,
            [
                ("a".to_owned(), 3),
                ("b".to_owned(), 3),
                ("c".to_owned(), 1),
                ("\u{e9}t\u{e9}".to_owned(), 1)
            ]
        );
        assert!(
            InMemoryStorage::new()
                .state_seqs()
                .expect("empty")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn removed_meta_is_gone_and_the_provided_removal_refuses() {
        let memory = InMemoryStorage::new();
        memory.set_meta("k", "v").await.expect("set");
        memory.set_meta("other", "w").await.expect("set");
        memory.remove_meta("k").await.expect("remove");
        memory
            .remove_meta("never-set")
            .await
            .expect("absent is fine");
        assert_eq!(memory.meta("k").expect("meta"), None);
        assert_eq!(memory.meta("other").expect("meta").as_deref(), Some("w"));
        memory.set_meta("k", "again").await.expect("set");
        assert_eq!(memory.meta("k").expect("meta").as_deref(), Some("again"));

        let plain = Plain(InMemoryStorage::new());
        plain.set_meta("k", "v").await.expect("set");
        let err = plain.remove_meta("k").await.expect_err("not implemented");
        assert!(matches!(err, StorageError::Unsupported(_)), "{err}");
        assert_eq!(plain.meta("k").expect("meta").as_deref(), Some("v"));
    }
}
