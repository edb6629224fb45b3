//! Names of rooms, repositories and branches, and the provider that opens one log per name.
//!
//! Names reach file paths, so they are validated once, here, after any percent-decoding:
//! only `[A-Za-z0-9._-]`, 1 to [`MAX_NAME_LEN`] bytes, not starting with `.` (which also rules
//! out `.` and `..`). No `/`, `\`, NUL or absolute paths can get through.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::storage::{InMemoryStorage, Storage, StorageError};

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// Empty.
    #[error("name is empty")]
    Empty,
    /// Too long.
    #[error("name is {0} bytes, the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    /// Starts with a dot (`.`, `..`, hidden files).
    #[error("name must not start with '.'")]
    LeadingDot,
    /// A character outside `[A-Za-z0-9._-]`.
    #[error("name contains {0:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadChar(char),
}

/// A validated room, repository or branch name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Validates `s`.
    pub fn new(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(s.len()));
        }
        if s.starts_with('.') {
            return Err(NameError::LeadingDot);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which log a server wants: a WebSocket room, or one branch of a repository.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogName {
    /// The log of a WebSocket room.
    Room(Name),
    /// The log of `branch` in repository `repo`.
    Branch {
        /// Repository.
        repo: Name,
        /// Branch.
        branch: Name,
    },
}

/// Opens (creating if needed) the storage behind each log a server serves.
///
/// Implementations return the same `Arc` for the same name while it is open, so every
/// connection to a room or branch shares one log.
pub trait StorageProvider: Send + Sync + 'static {
    /// The storage for `name`, created empty when it does not exist.
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError>;

    /// The storage for `name` if it exists (without creating it).
    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError>;

    /// Every log that exists.
    fn list(&self) -> Result<Vec<LogName>, StorageError>;

    /// The storage for `name` if it is open now; never opens (nor replays) a log. For
    /// observers (a dashboard) that must not keep every log in memory. Default:
    /// [`existing`](Self::existing), for providers that keep every log open anyway.
    fn opened(&self, name: &LogName) -> Option<Arc<dyn Storage>> {
        self.existing(name).ok().flatten()
    }

    /// How many events `name` holds, when that is known without opening it: a log that is
    /// open, or one this provider closed (a closed log does not change until it is opened
    /// again through the provider). `None` for a log not opened since the provider started.
    /// Default: the length of [`opened`](Self::opened).
    fn known_len(&self, name: &LogName) -> Option<u64> {
        self.opened(name).map(|storage| storage.len())
    }

    /// Makes every open log durable (for shutdown).
    fn flush_all(&self) -> crate::storage::BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async { Ok(()) })
    }

    /// Says that a server stopped using `name` (e.g. the relay closed an idle room) and
    /// dropped its `Arc`s of it. A provider that keeps logs open (a file handle each) may
    /// close the log once nobody else holds it; the next [`open`](Self::open) reopens it.
    /// Default: nothing (the log stays open; an in-memory log must, or it would be lost).
    fn release(&self, name: &LogName) {
        let _ = name;
    }

    /// [`release`](Self::release), and deletes the log when nobody else holds it and it has
    /// no events: a name that was only looked at (a read-only subscriber's room that nobody
    /// wrote to) then leaves no file or entry behind, so the logs a server keeps grow with
    /// what was written, not with the names asked for. Deleting an empty log loses no event;
    /// its metadata goes with it (a relay's log id: its clients then resync from 0, which
    /// sends them nothing). Not for logs whose existence means something while empty (a
    /// Git branch someone created). Default: [`release`](Self::release).
    fn release_discarding_empty(&self, name: &LogName) {
        self.release(name);
    }
}

/// Keeps every log in memory.
#[derive(Debug, Default)]
pub struct InMemoryProvider {
    logs: Mutex<HashMap<LogName, Arc<InMemoryStorage>>>,
}

impl InMemoryProvider {
    /// No logs yet.
    pub fn new() -> Self {
        Self::default()
    }
}

impl StorageProvider for InMemoryProvider {
    fn open(&self, name: &LogName) -> Result<Arc<dyn Storage>, StorageError> {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let storage = logs.entry(name.clone()).or_default();
        Ok(Arc::clone(storage) as Arc<dyn Storage>)
    }

    fn existing(&self, name: &LogName) -> Result<Option<Arc<dyn Storage>>, StorageError> {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        Ok(logs.get(name).map(|s| Arc::clone(s) as Arc<dyn Storage>))
    }

    fn list(&self) -> Result<Vec<LogName>, StorageError> {
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<_> = logs.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    /// Forgets an empty log nobody else holds (see the trait); every other log stays, as the
    /// memory is its only copy.
    fn release_discarding_empty(&self, name: &LogName) {
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        if logs
            .get(name)
            .is_some_and(|log| Arc::strong_count(log) == 1 && log.len() == 0)
        {
            logs.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_tricks_are_refused() {
        for bad in [
            "", ".", "..", "../etc", "a/b", "a\\b", "/abs", "a\0b", ".hidden", "é",
        ] {
            assert!(Name::new(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(Name::new(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
        for good in ["main", "feature-branch", "v1.2", "my_repo", "a..b"] {
            assert!(Name::new(good).is_ok(), "{good:?} must be accepted");
        }
    }

    #[test]
    fn provider_shares_one_log_per_name() {
        let provider = InMemoryProvider::new();
        let room = LogName::Room(Name::new("r").expect("valid"));
        let a = provider.open(&room).expect("open");
        let b = provider.open(&room).expect("open");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(
            provider
                .existing(&LogName::Room(Name::new("other").expect("valid")))
                .expect("ok")
                .is_none()
        );
        assert_eq!(provider.list().expect("list"), vec![room]);
    }

    #[tokio::test]
    async fn the_memory_provider_forgets_only_empty_logs_nobody_holds() {
        let provider = InMemoryProvider::new();
        let name = |n: &str| LogName::Room(Name::new(n).expect("valid"));
        let (empty, held, written) = (name("empty"), name("held"), name("written"));
        drop(provider.open(&empty).expect("open"));
        let held_log = provider.open(&held).expect("open");
        let written_log = provider.open(&written).expect("open");
        let event = crate::Event::new("e", "t", serde_json::json!({}), 1);
        written_log.append(vec![event]).await.expect("append");
        drop(written_log);
        for log in [&empty, &held, &written] {
            provider.release_discarding_empty(log);
        }
        // The empty one is gone; the one still held and the one with an event stay.
        assert_eq!(provider.list().expect("list"), vec![held.clone(), written]);
        drop(held_log);
        provider.release_discarding_empty(&held);
        assert_eq!(provider.list().expect("list").len(), 1);
    }
}
