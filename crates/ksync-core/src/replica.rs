//! A replica: one storage, one identity, one conflict policy. What a transport syncs.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use crate::conflict::{Conflict, ConflictResolver, Resolution, resolve};
use crate::error::SyncError;
use crate::event::{Event, EventLimits, MAX_EVENT_INTEGER};
use crate::log::{AppendOutcome, Stored};
use crate::notify::{Notification, Notifier};
use crate::storage::{InMemoryStorage, Storage};

const REPLICA_ID_KEY: &str = "replica.id";
/// How many times [`Replica::record_local_revision`] builds a revision again after another
/// revision of the same id took its version meanwhile (one retry almost always suffices: the
/// window is between one read and one append).
pub const REVISION_ATTEMPTS: u32 = 8;
const CURSOR_PREFIX: &str = "cursor/";
/// Meta key prefix recording, per id, the version of the last revision this replica wrote to
/// settle a conflict (see [`Replica::ingest`]).
const SETTLED_PREFIX: &str = "settled/";
/// Meta key prefix marking an event (by sequence number) that this replica passes on although
/// another replica made it.
const FORWARD_PREFIX: &str = "forward/";
/// Meta key set once any event was forwarded: until then `sends` needs no lookup per event.
const FORWARDS_KEY: &str = "forward.any";
/// Page size used when scanning the log for pending events.
const SCAN_PAGE: usize = 1024;

/// The local side of every sync: a [`Storage`], the replica's id (the `origin` of what it
/// writes) and the conflict policy. Cloning shares it.
///
/// Transports use it to store what they receive ([`Replica::ingest`]), find what they still have
/// to send ([`Replica::pending`]) and remember how far they got ([`Replica::cursor`]), all in the
/// storage, so that a process killed at any point and restarted loses nothing and sends
/// nothing twice that the other side cannot deduplicate.
///
/// Contract for transports: send pending events in sequence order and advance a cursor only
/// over a contiguous prefix that the other side acknowledged.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Arc<dyn Storage>,
    id: String,
    resolver: RwLock<Option<ConflictResolver>>,
    // Whether any forward mark may exist (read from the storage when opened, set on the first
    // `record_forward`).
    has_forwards: std::sync::atomic::AtomicBool,
    // One ingest at a time, so resolving a conflict and writing the resolution is atomic with
    // respect to other ingests.
    ingest_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.inner.id)
            .field("events", &self.inner.storage.len())
            .finish_non_exhaustive()
    }
}

/// What [`Replica::ingest`] did with a batch of remote events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ingested {
    /// Events that were new, as stored.
    pub appended: Vec<Stored>,
    /// Exact duplicates dropped.
    pub duplicates: usize,
    /// Conflicts found.
    pub conflicts: Vec<Conflict>,
    /// The new revisions written to settle the conflicts (local events: they are pending).
    pub resolutions: Vec<Stored>,
}

/// What [`Replica::forward`] did with an event handed over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forwarded {
    /// The sequence number of another replica's event that was already stored and is now
    /// marked: it may lie behind a transport's scan position (see
    /// [`Replica::record_forward`]).
    pub marked: Option<u64>,
    /// The conflict found when the event collided with a stored revision (settled as
    /// [`Replica::ingest`] settles it; the settling revision is pending).
    pub conflicts: Vec<Conflict>,
}

impl Ingested {
    /// The new events without sequence numbers.
    pub fn new_events(&self) -> Vec<Event> {
        self.appended.iter().map(|s| s.event.clone()).collect()
    }

    /// Emits `conflict` for each conflict, `event` for each new event and one `sync` with all of
    /// them (when there are any).
    pub fn notify(&self, notifier: &Notifier) {
        for conflict in &self.conflicts {
            notifier.emit(Notification::Conflict(conflict.clone()));
        }
        for stored in &self.appended {
            notifier.emit(Notification::Event(stored.event.clone()));
        }
        if !self.appended.is_empty() {
            notifier.emit(Notification::Sync(self.new_events()));
        }
    }
}

impl Replica {
    /// Opens the replica kept in `storage`: its id is read from the storage, or made and stored
    /// the first time.
    pub async fn open(storage: Arc<dyn Storage>) -> Result<Self, SyncError> {
        Self::open_preferring(storage, None).await
    }

    /// As [`open`](Self::open), but a storage without an id yet takes `preferred` (e.g. a P2P
    /// `peerId`) rather than a random one. A storage that has an id keeps it: its own events
    /// (`origin` = that id) must stay its own, or they would never be sent.
    pub async fn open_preferring(
        storage: Arc<dyn Storage>,
        preferred: Option<String>,
    ) -> Result<Self, SyncError> {
        let id = match storage.meta(REPLICA_ID_KEY)? {
            Some(id) => id,
            None => {
                let id = preferred
                    .filter(|id| !id.is_empty())
                    .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
                storage.set_meta(REPLICA_ID_KEY, &id).await?;
                id
            }
        };
        Ok(Self::with_id(storage, id))
    }

    /// A replica with an explicit id (for example a P2P `peerId`). The id is not stored.
    pub fn with_id(storage: Arc<dyn Storage>, id: impl Into<String>) -> Self {
        // A storage that cannot answer is asked again per event (the safe side).
        let has_forwards = !matches!(storage.meta(FORWARDS_KEY), Ok(None));
        Self {
            inner: Arc::new(Inner {
                has_forwards: std::sync::atomic::AtomicBool::new(has_forwards),
                storage,
                id: id.into(),
                resolver: RwLock::new(None),
                ingest_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// A fresh in-memory replica with a random id: what a client uses when nobody attached one.
    pub fn in_memory() -> Self {
        Self::with_id(
            Arc::new(InMemoryStorage::new()),
            uuid::Uuid::new_v4().simple().to_string(),
        )
    }

    /// The replica id (the `origin` of events made here).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }

    /// Sets the conflict policy. Without one, last-write-wins applies.
    pub fn set_resolver(&self, resolver: Option<ConflictResolver>) {
        *self
            .inner
            .resolver
            .write()
            .unwrap_or_else(|p| p.into_inner()) = resolver;
    }

    /// The resolution the configured policy picks for `conflict` (last-write-wins without a
    /// resolver). For transports that settle conflicts found elsewhere (e.g. a server-side merge).
    ///
    /// A resolver that panics is logged and last-write-wins applies: the same callback on
    /// every replica then still settles the conflict the same way, and the panic does not
    /// kill the transport task that is storing received events.
    pub fn resolution_for(&self, conflict: &Conflict) -> Resolution {
        let resolver = self
            .inner
            .resolver
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(resolver) = resolver else {
            return Resolution::LastWriteWins;
        };
        // Unwind safety: the resolver only sees the conflict by shared reference, and no lock
        // of the replica is held while it runs.
        let call = std::panic::AssertUnwindSafe(|| resolver(conflict));
        std::panic::catch_unwind(call).unwrap_or_else(|_| {
            tracing::error!(
                id = %conflict.ours.id,
                version = conflict.ours.version,
                "the conflict resolver panicked; settled by last-write-wins"
            );
            Resolution::LastWriteWins
        })
    }

    /// Whether `ours` is a revision this replica wrote to settle an earlier conflict.
    fn settled_here(&self, ours: &Event) -> Result<bool, SyncError> {
        if ours.origin.as_deref() != Some(self.id()) {
            return Ok(false);
        }
        let mark = self
            .inner
            .storage
            .meta(&format!("{SETTLED_PREFIX}{}", ours.id))?;
        Ok(mark.is_some_and(|v| v == ours.version.to_string()))
    }

    /// Stores an event made on this replica like [`Replica::record_local`], but moves it into
    /// the log instead of copying it and returns only its sequence number: for callers that
    /// keep no copy (a transport that already encoded it).
    pub async fn record_local_seq(&self, event: Event) -> Result<u64, SyncError> {
        match self.append_one(event).await? {
            AppendOutcome::Appended { seq } | AppendOutcome::Duplicate { seq } => Ok(seq),
            AppendOutcome::Conflict(c) => Err(SyncError::Rejected(format!(
                "event {:?} version {} already exists with other content",
                c.ours.id, c.ours.version
            ))),
        }
    }

    /// Stores an event made on this replica. A different event already stored under the same
    /// `(id, version)` is [`SyncError::Rejected`]; the identical one is returned as it is stored.
    pub async fn record_local(&self, event: Event) -> Result<Stored, SyncError> {
        let seq = self.record_local_seq(event.clone()).await?;
        Ok(Stored { seq, event })
    }

    /// Stores a new revision of `id` made on this replica: the one after the latest revision
    /// held, built by `revision(version)`. A revision of `id` ingested from elsewhere between
    /// reading the latest and appending (the transport ingests on its own task) would make
    /// the append conflict; the revision is then built again on top of the new latest, at
    /// most [`REVISION_ATTEMPTS`] times in all (then [`SyncError::Rejected`]).
    pub async fn record_local_revision(
        &self,
        id: &str,
        revision: impl Fn(u64) -> Event,
    ) -> Result<Stored, SyncError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let version = match self.inner.storage.latest(id)? {
                None => 1,
                // A revision at the highest valid version is the last.
                Some(latest) => latest.event.version.checked_add(1).filter(|v| *v <= MAX_EVENT_INTEGER).ok_or_else(|| {
                    SyncError::Rejected(format!(
                        "event {id:?} is at the highest version ({}); no revision can follow it",
                        latest.event.version
                    ))
                })?,
            };
            let event = revision(version);
            match self.append_one(event.clone()).await? {
                AppendOutcome::Appended { seq } | AppendOutcome::Duplicate { seq } => {
                    return Ok(Stored { seq, event });
                }
                AppendOutcome::Conflict(c) if attempts >= REVISION_ATTEMPTS => {
                    return Err(SyncError::Rejected(format!(
                        "event {:?}: another revision took version {} each of {attempts} times",
                        c.ours.id, c.ours.version
                    )));
                }
                AppendOutcome::Conflict(_) => {}
            }
        }
    }

    /// Appends one event and returns what the log did with it.
    async fn append_one(&self, event: Event) -> Result<AppendOutcome, SyncError> {
        let summary = self.inner.storage.append_summary(vec![event]).await?;
        summary
            .outcomes
            .into_iter()
            .next()
            .ok_or_else(|| SyncError::Protocol("storage returned no outcome".into()))
    }

    /// Stores events received from elsewhere: new ones are appended, duplicates dropped, and each
    /// conflict at the latest version of its id is settled by the policy with a new revision
    /// (see [`resolve`]) that supersedes both sides, written as a local event so it travels on
    /// the next send. Every conflict is reported, settled or not.
    ///
    /// A conflict whose `ours` is a revision this replica wrote to settle an earlier conflict
    /// is settled by last-write-wins, whatever the policy: two replicas that settled the same
    /// conflict at once with a policy that favours one side (`Ours`, `Theirs`, or a callback
    /// that is not deterministic) wrote different revisions; settled by that policy again,
    /// each would keep its own and they would answer each other with ever higher versions,
    /// never converging. The policy had its say; last-write-wins picks the same winner on
    /// both. (The mark is kept in the storage's metadata; lost in a crash right after the
    /// append, the policy applies once more and the other replica's mark still ends it.)
    ///
    /// A failure after the batch's events were appended (while settling a conflict) is
    /// [`SyncError::PartlyIngested`], holding what was stored: those events are in the
    /// storage, so a retry of the batch finds them duplicates and would never report them.
    pub async fn ingest(&self, events: Vec<Event>) -> Result<Ingested, SyncError> {
        let _guard = self.inner.ingest_lock.lock().await;
        let outcome = self.inner.storage.append(events).await?;
        let mut done = Ingested {
            appended: outcome.appended,
            duplicates: outcome.duplicates,
            conflicts: Vec::with_capacity(outcome.conflicts.len()),
            resolutions: Vec::new(),
        };
        for conflict in outcome.conflicts {
            match self.settle(&conflict).await {
                Ok(written) => {
                    done.resolutions.extend(written);
                    done.conflicts.push(conflict);
                }
                // Nothing of the batch stored: a plain failure, the retry does it all.
                Err(error) if done.appended.is_empty() && done.resolutions.is_empty() => {
                    return Err(error);
                }
                Err(error) => {
                    return Err(SyncError::PartlyIngested {
                        stored: Box::new(done),
                        error: Box::new(error),
                    });
                }
            }
        }
        Ok(done)
    }

    /// Settles one conflict [`Replica::ingest`] found (see there): the revision written for
    /// it, if any.
    async fn settle(&self, conflict: &Conflict) -> Result<Option<Stored>, SyncError> {
        let latest = self.inner.storage.latest(&conflict.ours.id)?;
        // A conflict under a revision this replica already superseded (by an earlier
        // resolution, or a newer version that arrived) is history: settling it again would
        // write a new revision every time the same logs are exchanged, and never quiesce.
        if latest
            .as_ref()
            .is_some_and(|l| l.event.version > conflict.ours.version)
        {
            return Ok(None);
        }
        let resolution = if self.settled_here(&conflict.ours)? {
            Resolution::LastWriteWins
        } else {
            self.resolution_for(conflict)
        };
        let mut event = resolve(conflict, &resolution, self.id());
        if let Err(why) = event.validate(&EventLimits::default()) {
            // A merged event with an empty or over-long type would be stored and then
            // refused by every server: keep one of the two sides instead.
            tracing::error!(id = %event.id, %why, "the merged resolution is not a valid event; settled by last-write-wins");
            event = resolve(conflict, &Resolution::LastWriteWins, self.id());
        }
        if let Some(latest) = latest {
            event.version = event
                .version
                .max(latest.event.version.saturating_add(1))
                .min(MAX_EVENT_INTEGER);
        }
        // At MAX_EVENT_INTEGER no revision can supersede the conflict (`resolve` stays
        // there): the append is the conflict again, nothing is written and the conflict
        // stays reported.
        let settled = self.inner.storage.append(vec![event]).await?.appended.pop();
        if let Some(settled) = &settled {
            let marked = self
                .inner
                .storage
                .set_meta(
                    &format!("{SETTLED_PREFIX}{}", settled.event.id),
                    &settled.event.version.to_string(),
                )
                .await;
            // The mark may be lost (see `ingest`), so a failure to write it is not worth
            // failing the whole ingest over: the events appended before would then never
            // be reported (a retry finds them stored: duplicates).
            if let Err(e) = marked {
                tracing::warn!(id = %settled.event.id, error = %e, "writing the settled mark failed; the conflict is settled all the same");
            }
        }
        Ok(settled)
    }

    /// Stores an event handed to a transport's `send`, so that it is pending here. Our own
    /// (no `origin`, which then gets our id, or our id) is stored as by
    /// [`Replica::record_local_seq`]. Another replica's (a bridge between two transports, or an
    /// application relaying what it received) keeps its `origin` and gets a durable mark:
    /// unlike an event that merely arrived through [`Replica::ingest`], it is sent on, also
    /// after a restart. One that conflicts with a stored event is settled as
    /// [`Replica::ingest`] settles it (the resolution is local, so it is pending too).
    ///
    /// Returns the sequence number of another replica's event that was already stored and is
    /// now marked: it may lie behind a transport's scan position, which must then look again
    /// from there. `None` otherwise (new events are at the end of the log).
    ///
    /// The conflict a collision brings is not returned: see [`Replica::forward`].
    pub async fn record_forward(&self, event: Event) -> Result<Option<u64>, SyncError> {
        self.forward(event).await.map(|f| f.marked)
    }

    /// [`Replica::record_forward`], also returning the conflict that settling a collision
    /// with a stored revision found, for the transport to report (`conflict`) as it reports
    /// those of received events.
    pub async fn forward(&self, mut event: Event) -> Result<Forwarded, SyncError> {
        if event.origin.as_deref().is_none_or(|o| o == self.id()) {
            event.origin = Some(self.id().to_owned());
            return self
                .record_local_seq(event)
                .await
                .map(|_| Forwarded::default());
        }
        let (seq, already_stored) = match self.append_one(event.clone()).await? {
            AppendOutcome::Appended { seq } => (seq, false),
            AppendOutcome::Duplicate { seq } => (seq, true),
            AppendOutcome::Conflict(_) => {
                let ingested = self.ingest(vec![event]).await?;
                return Ok(Forwarded {
                    marked: None,
                    conflicts: ingested.conflicts,
                });
            }
        };
        if !self.inner.has_forwards.load(Ordering::Acquire) {
            self.inner.storage.set_meta(FORWARDS_KEY, "1").await?;
            self.inner.has_forwards.store(true, Ordering::Release);
        }
        self.inner
            .storage
            .set_meta(&format!("{FORWARD_PREFIX}{seq}"), "1")
            .await?;
        Ok(Forwarded {
            marked: already_stored.then_some(seq),
            conflicts: Vec::new(),
        })
    }

    /// Whether this replica sends `stored` on: it was made here (origin = our id) or handed
    /// over with [`Replica::record_forward`]. Events that merely arrived are not sent back.
    pub fn sends(&self, stored: &Stored) -> Result<bool, SyncError> {
        if self.made_here(&stored.event) {
            return Ok(true);
        }
        if !self.inner.has_forwards.load(Ordering::Acquire) {
            return Ok(false);
        }
        Ok(self
            .inner
            .storage
            .meta(&format!("{FORWARD_PREFIX}{}", stored.seq))?
            .is_some())
    }

    /// Up to `limit` events this replica sends (see [`Replica::sends`]) with `seq > after`.
    pub fn pending(&self, after: u64, limit: usize) -> Result<Vec<Stored>, SyncError> {
        self.pending_page(after, limit).map(|(events, _)| events)
    }

    /// Whether `event` was made here (its origin is this replica's id).
    fn made_here(&self, event: &Event) -> bool {
        event.origin.as_deref() == Some(self.id())
    }

    /// [`Replica::pending`], plus how far the scan got: the caller may start its next scan
    /// there, so events that only arrived are read once, not on every scan. With fewer than
    /// `limit` events returned, the position is the end of the log.
    pub fn pending_page(&self, after: u64, limit: usize) -> Result<(Vec<Stored>, u64), SyncError> {
        if !self.inner.has_forwards.load(Ordering::Acquire) {
            return self.own_pending_page(after, limit);
        }
        let mut out = Vec::new();
        let mut scanned = after;
        'scan: while out.len() < limit {
            let page = self.inner.storage.read_since(scanned, SCAN_PAGE)?;
            if page.is_empty() {
                break;
            }
            for stored in page {
                scanned = stored.seq;
                if self.sends(&stored)? {
                    out.push(stored);
                    if out.len() == limit {
                        break 'scan;
                    }
                }
            }
        }
        Ok((out, scanned))
    }

    /// [`Replica::pending_page`] when nothing was ever forwarded, so that what is sent is what
    /// was made here: each event is looked at where the storage keeps it and only those sent
    /// are copied (a page of others' large events, which a transport scans past, is never
    /// held at once).
    fn own_pending_page(&self, after: u64, limit: usize) -> Result<(Vec<Stored>, u64), SyncError> {
        let mut out = Vec::new();
        let mut scanned = after;
        while out.len() < limit {
            let mut visited_to = scanned;
            let visited =
                self.inner
                    .storage
                    .visit_since(scanned, SCAN_PAGE, &mut |seq, event| {
                        if out.len() == limit {
                            return;
                        }
                        visited_to = seq;
                        if self.made_here(event) {
                            out.push(Stored {
                                seq,
                                event: event.clone(),
                            });
                        }
                    })?;
            scanned = visited_to;
            if visited == 0 {
                break;
            }
        }
        Ok((out, scanned))
    }

    /// A named cursor (e.g. `ws:ws://host/room/server` or `git:main/pushed`); 0 when never set.
    pub fn cursor(&self, name: &str) -> Result<u64, SyncError> {
        let raw = self.inner.storage.meta(&format!("{CURSOR_PREFIX}{name}"))?;
        raw.map_or(Ok(0), |v| {
            v.parse().map_err(|_| {
                SyncError::Protocol(format!("cursor {name:?} holds {v:?}, not a number"))
            })
        })
    }

    /// Sets a named cursor, durably.
    pub async fn set_cursor(&self, name: &str, value: u64) -> Result<(), SyncError> {
        self.inner
            .storage
            .set_meta(&format!("{CURSOR_PREFIX}{name}"), &value.to_string())
            .await?;
        Ok(())
    }

    /// Deletes a named cursor, durably: it reads 0 again (see [`Storage::remove_meta`]).
    pub async fn remove_cursor(&self, name: &str) -> Result<(), SyncError> {
        self.inner
            .storage
            .remove_meta(&format!("{CURSOR_PREFIX}{name}"))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn identity_survives_reopen() {
        let storage: Arc<dyn Storage> = Arc::new(InMemoryStorage::new());
        let a = Replica::open(Arc::clone(&storage)).await.expect("open");
        let b = Replica::open(storage).await.expect("reopen");
        assert_eq!(a.id(), b.id());
    }

    /// Lands a revision from elsewhere (`remote`, while it is `Some`) right before each append,
    /// as an ingest on the transport's task can between a local update's read of the latest
    /// revision and its append.
    /// Also refuses (IO error) metadata writes of keys starting with `refused_meta`, if set.
    struct IngestBeforeAppend {
        inner: InMemoryStorage,
        remote: std::sync::Mutex<Vec<Event>>,
        refused_meta: Option<&'static str>,
        // An append holding this (id, version) fails.
        refused_append: Option<(&'static str, u64)>,
    }

    impl Storage for IngestBeforeAppend {
        fn append(
            &self,
            events: Vec<Event>,
        ) -> crate::BoxFuture<'_, Result<crate::MergeOutcome, crate::StorageError>> {
            Box::pin(async move {
                if let Some((id, version)) = self.refused_append
                    && events.iter().any(|e| e.id == id && e.version == version)
                {
                    return Err(crate::StorageError::Io {
                        context: "appending".into(),
                        source: std::io::Error::from_raw_os_error(5),
                    });
                }
                let remote = self.remote.lock().expect("lock").pop();
                if let Some(remote) = remote {
                    self.inner.append(vec![remote]).await?;
                }
                self.inner.append(events).await
            })
        }
        fn read_since(&self, after: u64, limit: usize) -> Result<Vec<Stored>, crate::StorageError> {
            self.inner.read_since(after, limit)
        }
        fn get(&self, id: &str, version: u64) -> Result<Option<Stored>, crate::StorageError> {
            self.inner.get(id, version)
        }
        fn latest(&self, id: &str) -> Result<Option<Stored>, crate::StorageError> {
            self.inner.latest(id)
        }
        fn len(&self) -> u64 {
            self.inner.len()
        }
        fn state(&self) -> Result<std::collections::BTreeMap<String, Event>, crate::StorageError> {
            self.inner.state()
        }
        fn meta(&self, key: &str) -> Result<Option<String>, crate::StorageError> {
            self.inner.meta(key)
        }
        fn set_meta(
            &self,
            key: &str,
            value: &str,
        ) -> crate::BoxFuture<'_, Result<(), crate::StorageError>> {
            if self
                .refused_meta
                .is_some_and(|prefix| key.starts_with(prefix))
            {
                return Box::pin(async {
                    Err(crate::StorageError::Io {
                        context: "writing metadata".into(),
                        source: std::io::Error::from_raw_os_error(28),
                    })
                });
            }
            self.inner.set_meta(key, value)
        }
        fn remove_meta(&self, key: &str) -> crate::BoxFuture<'_, Result<(), crate::StorageError>> {
            self.inner.remove_meta(key)
        }
    }

    /// The settled mark is best effort (see `ingest`): failing to write it fails nothing,
    /// and the events of the ingest are reported (they were stored; a retry would find them
    /// duplicates and never report them).
    #[tokio::test]
    async fn a_settled_mark_that_cannot_be_written_fails_no_ingest() {
        let storage = Arc::new(IngestBeforeAppend {
            inner: InMemoryStorage::new(),
            remote: std::sync::Mutex::new(Vec::new()),
            refused_meta: Some(SETTLED_PREFIX),
            refused_append: None,
        });
        let replica = Replica::with_id(storage, "me");
        replica
            .record_local_revision("x", |version| {
                Event {
                    version,
                    ..Event::new("x", "t", json!("mine"), 1)
                }
                .with_origin("me")
            })
            .await
            .expect("local");
        let theirs = Event::new("x", "t", json!("theirs"), 2).with_origin("them");
        let new = Event::new("y", "t", json!("new"), 2).with_origin("them");
        let ingested = replica
            .ingest(vec![new.clone(), theirs])
            .await
            .expect("ingested although the mark failed");
        assert_eq!(ingested.new_events(), vec![new]);
        assert_eq!(ingested.conflicts.len(), 1);
        assert_eq!(ingested.resolutions.len(), 1);
        assert_eq!(
            replica
                .storage()
                .latest("x")
                .expect("read")
                .expect("held")
                .event
                .version,
            2
        );
    }

    /// A resolution that cannot be written fails the ingest after the batch's new events
    /// were stored: the error holds them (a retry finds them duplicates, so this is the only
    /// chance to report them), and the retry settles the conflict.
    #[tokio::test]
    async fn a_resolution_that_cannot_be_written_reports_what_was_stored() {
        let storage = Arc::new(IngestBeforeAppend {
            inner: InMemoryStorage::new(),
            remote: std::sync::Mutex::new(Vec::new()),
            refused_meta: None,
            refused_append: Some(("x", 2)),
        });
        let replica = Replica::with_id(storage, "me");
        replica
            .record_local(Event::new("x", "t", json!("mine"), 1).with_origin("me"))
            .await
            .expect("local");
        let theirs = Event::new("x", "t", json!("theirs"), 2).with_origin("them");
        let new = Event::new("y", "t", json!("new"), 2).with_origin("them");
        let err = replica
            .ingest(vec![new.clone(), theirs.clone()])
            .await
            .expect_err("the resolution failed");
        let stored = err.ingested().expect("partly ingested");
        assert_eq!(stored.new_events(), vec![new.clone()]);
        assert!(stored.conflicts.is_empty() && stored.resolutions.is_empty());
        assert!(
            matches!(&err, SyncError::PartlyIngested { error, .. } if matches!(**error, SyncError::Storage(_)))
        );

        // Nothing stored before the failure: a plain error.
        let err = replica
            .ingest(vec![new.clone(), theirs.clone()])
            .await
            .expect_err("the resolution failed again");
        assert!(matches!(err, SyncError::Storage(_)), "{err}");
    }

    #[tokio::test]
    async fn a_local_revision_goes_on_top_of_one_ingested_meanwhile() {
        let remote = |version: u64| Event {
            version,
            ..Event::new("s0", "t", json!({"by": "them"}), 1).with_origin("them")
        };
        // Two remote revisions land, each just before one of our appends: versions 1 and 2.
        let storage = Arc::new(IngestBeforeAppend {
            inner: InMemoryStorage::new(),
            remote: std::sync::Mutex::new(vec![remote(2), remote(1)]),
            refused_meta: None,
            refused_append: None,
        });
        let replica = Replica::with_id(storage, "me");
        let mine = |version: u64| Event {
            version,
            ..Event::new("s0", "t", json!({"by": "me"}), 2).with_origin("me")
        };
        let stored = replica
            .record_local_revision("s0", mine)
            .await
            .expect("stored on top");
        assert_eq!(stored.event, mine(3));
        let held = replica.storage().latest("s0").expect("read").expect("held");
        assert_eq!(held.event, mine(3));
        assert_eq!(replica.storage().len(), 3);

        // A revision that keeps losing its version gives up with a clear error.
        let storage = Arc::new(IngestBeforeAppend {
            inner: InMemoryStorage::new(),
            remote: std::sync::Mutex::new(
                (1..=u64::from(REVISION_ATTEMPTS))
                    .rev()
                    .map(remote)
                    .collect(),
            ),
            refused_meta: None,
            refused_append: None,
        });
        let replica = Replica::with_id(storage, "me");
        let err = replica
            .record_local_revision("s0", mine)
            .await
            .expect_err("every attempt lost");
        assert!(
            matches!(&err, SyncError::Rejected(why) if why.contains("s0")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn record_local_seq_stores_like_record_local() {
        let replica = Replica::with_id(Arc::new(InMemoryStorage::new()), "me");
        let a = Event::new("a", "t", json!(1), 1).with_origin("me");
        assert_eq!(replica.record_local_seq(a.clone()).await.expect("new"), 1);
        assert_eq!(replica.record_local_seq(a.clone()).await.expect("same"), 1);
        let other = Event::new("a", "t", json!(2), 1).with_origin("me");
        assert!(matches!(
            replica.record_local_seq(other).await,
            Err(SyncError::Rejected(_))
        ));
        let stored = replica.storage().get("a", 1).expect("read").expect("held");
        assert_eq!(stored.event, a);
        assert_eq!(replica.pending(0, 10).expect("pending").len(), 1);
    }

    /// Over several scan pages, with and without forwarded events (two ways of scanning):
    /// the events sent after the cursor, the first `limit` of them, and the scan position
    /// (the last one returned when the page is full, else the end of the log).
    #[tokio::test]
    async fn pending_pages_span_scan_pages_with_and_without_forwards() {
        let replica = Replica::with_id(Arc::new(InMemoryStorage::new()), "me");
        let total = 2 * SCAN_PAGE as u64 + 300;
        for i in 1..=total {
            let origin = if i % 3 == 0 { "me" } else { "other" };
            let event = Event::new(format!("e{i}"), "t", json!(i), i).with_origin(origin);
            if origin == "me" {
                replica.record_local(event).await.expect("local");
            } else {
                replica.ingest(vec![event]).await.expect("remote");
            }
        }
        let check = |sent: &dyn Fn(u64) -> bool| {
            for after in [0, 1, 1023, 1024, 2047, total - 5, total] {
                for limit in [1, 2, 500, 5_000] {
                    let wanted: Vec<u64> = (after + 1..=total)
                        .filter(|&seq| sent(seq))
                        .take(limit)
                        .collect();
                    let scanned = if wanted.len() == limit {
                        wanted.last().copied().unwrap_or(after)
                    } else {
                        total.max(after)
                    };
                    let (page, at) = replica.pending_page(after, limit).expect("page");
                    let seqs: Vec<u64> = page.iter().map(|s| s.seq).collect();
                    assert_eq!(
                        (seqs, at),
                        (wanted, scanned),
                        "after {after}, limit {limit}"
                    );
                }
            }
        };
        check(&|seq| seq % 3 == 0);
        // One of the others' events handed over: scanned the other way, same answers.
        let forwarded = replica
            .storage()
            .read_since(1, 1)
            .expect("read")
            .pop()
            .expect("event 2");
        replica
            .record_forward(forwarded.event)
            .await
            .expect("forward");
        check(&|seq| seq % 3 == 0 || seq == 2);
    }

    #[tokio::test]
    async fn pending_is_local_events_after_the_cursor() {
        let replica = Replica::with_id(Arc::new(InMemoryStorage::new()), "me");
        replica
            .record_local(Event::new("a", "t", json!(1), 1).with_origin("me"))
            .await
            .expect("local");
        replica
            .ingest(vec![Event::new("b", "t", json!(1), 1).with_origin("other")])
            .await
            .expect("remote");
        replica
            .record_local(Event::new("c", "t", json!(1), 1).with_origin("me"))
            .await
            .expect("local");
        let ids: Vec<_> = replica
            .pending(0, 10)
            .expect("pending")
            .into_iter()
            .map(|s| s.event.id)
            .collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(replica.pending(1, 10).expect("pending").len(), 1);
        // The scan position: past the received event when it stops at the end of the log,
        // and at the last returned event when the page is full.
        let (page, scanned) = replica.pending_page(0, 10).expect("page");
        assert_eq!((page.len(), scanned), (2, 3));
        let (page, scanned) = replica.pending_page(0, 1).expect("page");
        assert_eq!((page.len(), scanned), (1, 1));
        let (page, scanned) = replica.pending_page(3, 10).expect("page");
        assert_eq!((page.len(), scanned), (0, 3));
        assert_eq!(replica.pending(0, 1).expect("pending").len(), 1);
        replica.set_cursor("x", 7).await.expect("set");
        assert_eq!(replica.cursor("x").expect("get"), 7);
        assert_eq!(replica.cursor("never").expect("get"), 0);
        replica.remove_cursor("x").await.expect("remove");
        assert_eq!(replica.cursor("x").expect("get"), 0);
        assert_eq!(replica.storage().meta("cursor/x").expect("meta"), None);
    }

    #[tokio::test]
    async fn forwarded_events_are_pending_with_their_origin_and_received_ones_are_not() {
        let storage: Arc<dyn Storage> = Arc::new(InMemoryStorage::new());
        let replica = Replica::with_id(Arc::clone(&storage), "bridge");
        // Arrived from one side: stored, not sent back.
        replica
            .ingest(vec![Event::new("seen", "t", json!(1), 1).with_origin("p")])
            .await
            .expect("ingest");
        // Handed over for the other side: sent, origin kept.
        replica
            .record_forward(Event::new("relay", "t", json!(2), 1).with_origin("p"))
            .await
            .expect("forward");
        // Already stored, then handed over: the mark applies to the stored copy, whose seq is
        // returned (a transport may have scanned past it).
        let marked = replica
            .record_forward(Event::new("seen", "t", json!(1), 1).with_origin("p"))
            .await
            .expect("forward stored");
        assert_eq!(marked, Some(1));
        // No origin: a local event.
        replica
            .record_forward(Event::new("mine", "t", json!(3), 1))
            .await
            .expect("local");
        let pending = replica.pending(0, 10).expect("pending");
        let got: Vec<_> = pending
            .iter()
            .map(|s| (s.event.id.as_str(), s.event.origin.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("seen", Some("p")),
                ("relay", Some("p")),
                ("mine", Some("bridge"))
            ]
        );
        assert_eq!(storage.len(), 3, "the second hand-over stored nothing new");
        // The marks live in the storage: a replica reopened on it still sends them.
        let reopened = Replica::with_id(storage, "bridge");
        assert_eq!(reopened.pending(0, 10).expect("pending").len(), 3);
        // A different event under a stored (id, version) is settled, not refused.
        replica
            .record_forward(Event::new("relay", "t", json!("other"), 5).with_origin("q"))
            .await
            .expect("conflict settled");
        let latest = replica
            .storage()
            .latest("relay")
            .expect("read")
            .expect("present");
        assert_eq!(latest.event.version, 2);
        assert!(replica.sends(&latest).expect("sends"));
    }

    #[tokio::test]
    async fn conflicts_resolve_into_a_new_local_revision_on_both_sides() {
        let a = Replica::with_id(Arc::new(InMemoryStorage::new()), "a");
        let b = Replica::with_id(Arc::new(InMemoryStorage::new()), "b");
        let ea = Event::new("x", "t", json!("from a"), 10).with_origin("a");
        let eb = Event::new("x", "t", json!("from b"), 20).with_origin("b");
        a.record_local(ea.clone()).await.expect("a");
        b.record_local(eb.clone()).await.expect("b");
        let at_a = a.ingest(vec![eb]).await.expect("ingest");
        let at_b = b.ingest(vec![ea]).await.expect("ingest");
        assert_eq!(at_a.conflicts.len(), 1);
        assert_eq!(at_a.resolutions.len(), 1);
        let ra = &at_a.resolutions[0].event;
        let rb = &at_b.resolutions[0].event;
        assert_eq!(
            (ra.version, &ra.data),
            (2, &json!("from b")),
            "later timestamp wins"
        );
        assert!(ra.same_content(rb));
        // Exchanging the resolutions deduplicates: the replicas are equal.
        let again = a.ingest(vec![rb.clone()]).await.expect("ingest");
        assert_eq!((again.duplicates, again.conflicts.len()), (1, 0));
        let sa = a.storage().state().expect("state");
        let sb = b.storage().state().expect("state");
        assert!(sa["x"].same_content(&sb["x"]) && sa["x"].version == sb["x"].version);
    }

    #[tokio::test]
    async fn custom_resolver_is_used() {
        let a = Replica::with_id(Arc::new(InMemoryStorage::new()), "a");
        a.set_resolver(Some(Arc::new(|c: &Conflict| {
            Resolution::Merged(Event::new(&c.ours.id, "merged", json!("both"), 99))
        })));
        a.record_local(Event::new("x", "t", json!(1), 1).with_origin("a"))
            .await
            .expect("a");
        let out = a
            .ingest(vec![Event::new("x", "t", json!(2), 2)])
            .await
            .expect("ingest");
        assert_eq!(out.resolutions[0].event.data, json!("both"));
        assert_eq!(out.resolutions[0].event.origin.as_deref(), Some("a"));
    }
}
