//! The pure log: an in-memory index of revisions with the merge rules of the data model.
//!
//! [`LogIndex`] is the one place that decides what happens to an incoming revision: new,
//! duplicate (dropped silently) or conflict (reported, not stored). Storages wrap it: the
//! in-memory storage directly, the file storage after making the new records durable.

use std::borrow::Cow;
use std::collections::hash_map::{Entry, RandomState};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::ops::Range;
use std::sync::Arc;

use nohash_hasher::BuildNoHashHasher;
use serde::{Deserialize, Serialize};

use crate::conflict::Conflict;
use crate::event::Event;

/// An event with the sequence number its log gave it (1-based, gap-free, monotonic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// Position in the log; the first event is 1.
    pub seq: u64,
    /// The event.
    pub event: Event,
}

/// What happened to one incoming revision.
#[derive(Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    /// Stored at this sequence number.
    Appended {
        /// The new sequence number.
        seq: u64,
    },
    /// The log already held this exact revision (at `seq`); nothing was stored.
    Duplicate {
        /// Where the identical revision already is.
        seq: u64,
    },
    /// The log holds different content under the same `(id, version)`; nothing was stored.
    Conflict(Box<Conflict>),
}

/// The result of merging a batch into a log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeOutcome {
    /// One outcome per input event, in input order.
    pub outcomes: Vec<AppendOutcome>,
    /// The events that were new, with their sequence numbers, in log order.
    pub appended: Vec<Stored>,
    /// The conflicts found (also present in `outcomes`).
    pub conflicts: Vec<Conflict>,
    /// How many inputs were exact duplicates.
    pub duplicates: usize,
}

impl MergeOutcome {
    /// The new events without their sequence numbers.
    pub fn new_events(&self) -> Vec<Event> {
        self.appended.iter().map(|s| s.event.clone()).collect()
    }

    /// The sequence number of the last appended event, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.appended.last().map(|s| s.seq)
    }
}

/// What a merge did, without copies of the appended events: see
/// [`LogIndex::merge_summary`] and [`Storage::append_summary`](crate::Storage::append_summary).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeSummary {
    /// One outcome per input event, in input order.
    pub outcomes: Vec<AppendOutcome>,
    /// How many events were new and were stored.
    pub appended: usize,
    /// The conflicts found (also present in `outcomes`).
    pub conflicts: Vec<Conflict>,
    /// How many inputs were exact duplicates.
    pub duplicates: usize,
}

impl MergeSummary {
    /// The sequence number of the first appended event, if any.
    pub fn first_seq(&self) -> Option<u64> {
        self.outcomes.iter().find_map(|o| match o {
            AppendOutcome::Appended { seq } => Some(*seq),
            _ => None,
        })
    }

    /// The sequence number of the last appended event, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.outcomes.iter().rev().find_map(|o| match o {
            AppendOutcome::Appended { seq } => Some(*seq),
            _ => None,
        })
    }
}

impl From<MergeOutcome> for MergeSummary {
    fn from(outcome: MergeOutcome) -> Self {
        Self {
            appended: outcome.appended.len(),
            outcomes: outcome.outcomes,
            conflicts: outcome.conflicts,
            duplicates: outcome.duplicates,
        }
    }
}

/// A planned merge: computed against the current log without changing it.
///
/// Durable storages write `plan.appended` to disk first and only then call
/// [`LogIndex::commit`], so the index never shows what is not durable.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergePlan {
    /// The outcome the merge will have once committed.
    pub outcome: MergeOutcome,
}

/// Reads the `(id, version)` of an encoded event: see [`EventCodec::key`].
pub type KeyFn = fn(&[u8]) -> Option<(&[u8], u64)>;

/// How a durable storage's encoded event records are read back: see
/// [`LogIndex::push_encoded`]. Plain functions, so a log index stays `Clone` and `Debug`.
#[derive(Debug, Clone, Copy)]
pub struct EventCodec {
    /// Decodes a whole record; `None` when it does not decode (never for a record the storage
    /// checked before pushing it).
    pub decode: fn(&[u8]) -> Option<Event>,
    /// The `(id, version)` of a record without decoding the rest: the id's bytes (UTF-8 for
    /// a checked record) and the version.
    pub key: KeyFn,
}

/// An event kept as the bytes of its record: a range of a shared buffer (a chunk of a log
/// file, or the records a storage wrote in one go), decoded by the log's [`EventCodec`].
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    bytes: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl EncodedEvent {
    /// The record at `range` of `bytes`; `None` when the range is not inside `bytes`.
    pub fn new(bytes: Arc<Vec<u8>>, range: Range<usize>) -> Option<Self> {
        bytes.get(range.clone())?;
        Some(Self {
            bytes,
            start: range.start,
            end: range.end,
        })
    }

    /// The record's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.get(self.start..self.end).unwrap_or_default()
    }
}

/// Hashes ids as one [`LogIndex`] does ([`LogIndex::id_hasher`]), so that a bulk load can
/// key its records on other threads: see [`LogIndex::push_encoded_keyed`].
#[derive(Debug, Clone, Default)]
pub struct IdHasher {
    // Random per log, like `HashMap`'s own.
    state: RandomState,
    // Tests: every id hashes alike, to exercise ids that share a hash.
    #[cfg(test)]
    all_collide: bool,
}

impl IdHasher {
    /// The key of the revision `(id, version)` for the log this hasher came from.
    pub fn key(&self, id: &[u8], version: u64) -> EncodedKey {
        EncodedKey {
            hash: self.hash_id(id),
            version,
        }
    }

    fn hash_id(&self, id: &[u8]) -> u64 {
        #[cfg(test)]
        if self.all_collide {
            return 7;
        }
        self.state.hash_one(id)
    }
}

/// A record's `(id, version)` as its log indexes it: made by [`IdHasher::key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodedKey {
    hash: u64,
    version: u64,
}

impl EncodedKey {
    /// A hash of the whole revision `(id, version)` (equal revisions, equal hashes).
    pub fn revision_hash(&self) -> u64 {
        self.hash ^ self.version.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// One event of the log, as it was given: decoded, or as its record.
///
/// A record is decoded on every read, straight into what the reader gets, and the result is
/// not kept: a reader gets its own copy anyway (decoding costs about what cloning a decoded
/// event does), and a process that reads its whole log once (a catch-up, a push) would
/// otherwise hold every event twice, record and decoded, for good.
#[derive(Debug, Clone)]
enum Slot {
    // Boxed: a slot costs 24 bytes either way, not the size of an `Event`.
    Decoded(Box<Event>),
    Encoded(EncodedEvent),
}

impl Slot {
    /// The slot for a record and, if the caller has it, its decoded form (kept instead).
    #[inline(always)] // keeps a replay's per-record push as cheap as before (measured)
    fn new(encoded: EncodedEvent, event: Option<Event>) -> Self {
        match event {
            Some(event) => Slot::Decoded(Box::new(event)),
            None => Slot::Encoded(encoded),
        }
    }
}

/// In-memory index of a log. Pure data; no IO, no clock.
///
/// Events are kept decoded, or (from a durable storage, see [`LogIndex::push_encoded`]) as
/// the bytes of their records, decoded whenever read. Reopening a big log then costs
/// checking and indexing its records, not allocating every event; reading it costs what
/// copying decoded events would, and leaves nothing behind.
#[derive(Debug, Clone, Default)]
pub struct LogIndex {
    slots: Vec<Slot>,
    // hash(id) -> the revisions of the id(s) with that hash. Keyed by the hash rather than
    // the id so that indexing an event copies no string; ids (and, for a single revision,
    // its version) are read from the slots. 16 bytes an entry: a replay of a million events
    // inserts at random into this table, and its size decides the cache and TLB misses.
    by_id: HashMap<u64, IdRef, BuildNoHashHasher<u64>>,
    // The rare hashes with more than one revision (several versions of an id, or several
    // ids): `IdRef::multi` indexes here. Never shrinks, like the log.
    multi: Vec<Ids>,
    // Keys the id hash.
    hasher: IdHasher,
    codec: Option<EventCodec>,
}

/// A revision of a batch being planned, with its id's hash (so the map need not hash the id
/// again); equal when id and version are.
struct BatchKey<'a> {
    hash: u64,
    id: &'a str,
    version: u64,
}

impl PartialEq for BatchKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version && self.id == other.id
    }
}

impl Eq for BatchKey<'_> {}

// Its `Hash` writes one `u64`, already a hash: no need to hash it again.
impl nohash_hasher::IsEnabled for BatchKey<'_> {}

impl std::hash::Hash for BatchKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Equal keys have equal ids, hence equal id hashes.
        state.write_u64(self.hash ^ self.version.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
}

/// The ids that share one 64-bit hash (almost always one), when there is more than one
/// revision under the hash.
#[derive(Debug, Clone)]
enum Ids {
    One(Versions),
    Several(Vec<Versions>),
}

impl Ids {
    fn all(&self) -> &[Versions] {
        match self {
            Ids::One(versions) => std::slice::from_ref(versions),
            Ids::Several(list) => list.as_slice(),
        }
    }
}

/// What `by_id` holds for a hash: the seq of its only revision, or (top bit set) an index
/// into `multi`.
#[derive(Debug, Clone, Copy)]
struct IdRef(u64);

impl IdRef {
    const MULTI: u64 = 1 << 63;

    fn single(seq: u64) -> Self {
        Self(seq)
    }

    fn multi(index: usize) -> Self {
        Self(index as u64 | Self::MULTI)
    }

    /// The seq of the only revision, if it is one.
    fn seq(self) -> Option<u64> {
        (self.0 & Self::MULTI == 0).then_some(self.0)
    }

    /// The index into `multi`, if it is one.
    fn index(self) -> Option<usize> {
        (self.0 & Self::MULTI != 0)
            .then(|| usize::try_from(self.0 & !Self::MULTI).ok())
            .flatten()
    }
}

/// The `(id, version)` of the event at `seq`, the id as bytes (split from `LogIndex` so it
/// can be called while `by_id` is borrowed).
fn slot_key<'a>(
    slots: &'a [Slot],
    codec: Option<&EventCodec>,
    seq: u64,
) -> Option<(&'a [u8], u64)> {
    match slots.get(usize::try_from(seq.checked_sub(1)?).ok()?)? {
        Slot::Decoded(event) => Some((event.id.as_bytes(), event.version)),
        Slot::Encoded(encoded) => (codec?.key)(encoded.bytes()),
    }
}

/// The id of the event at `seq`, as bytes.
fn id_bytes<'a>(slots: &'a [Slot], codec: Option<&EventCodec>, seq: u64) -> Option<&'a [u8]> {
    slot_key(slots, codec, seq).map(|(id, _)| id)
}

impl LogIndex {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty log that can hold encoded events read back with `codec`.
    pub fn with_codec(codec: EventCodec) -> Self {
        Self {
            codec: Some(codec),
            ..Self::default()
        }
    }

    /// Reserves room for `additional` more events, so a bulk load (replaying a log file)
    /// does not rehash and regrow as it goes.
    pub fn reserve(&mut self, additional: usize) {
        self.slots.reserve(additional);
        self.by_id.reserve(additional);
    }

    /// The number of events, which is also the last sequence number.
    pub fn len(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The event at `seq`: borrowed when the log holds it decoded, else decoded from its
    /// record into a copy of the caller's (kept by nobody else).
    pub fn at(&self, seq: u64) -> Option<Cow<'_, Event>> {
        seq.checked_sub(1)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.slots.get(i))
            .and_then(|slot| self.event(slot))
    }

    /// A slot's event: borrowed, or decoded (every time: see [`Slot`]).
    fn event<'a>(&'a self, slot: &'a Slot) -> Option<Cow<'a, Event>> {
        let encoded = match slot {
            Slot::Decoded(event) => return Some(Cow::Borrowed(event)),
            Slot::Encoded(encoded) => encoded,
        };
        let decode = self.codec?.decode;
        match decode(encoded.bytes()) {
            Some(event) => Some(Cow::Owned(event)),
            None => {
                // Storages check records before pushing them, so this is a bug, not damage.
                tracing::error!("an encoded event in the log index does not decode");
                debug_assert!(false, "undecodable encoded event");
                None
            }
        }
    }

    /// How this log hashes ids (see [`LogIndex::push_encoded_keyed`]).
    pub fn id_hasher(&self) -> IdHasher {
        self.hasher.clone()
    }

    /// The versions of `id` (made up on the spot for an id with one revision, which `by_id`
    /// holds as its seq alone).
    fn versions(&self, id: &str) -> Option<Cow<'_, Versions>> {
        self.versions_hashed(self.hasher.hash_id(id.as_bytes()), id)
    }

    /// [`LogIndex::versions`] for an id whose hash is known.
    fn versions_hashed(&self, hash: u64, id: &str) -> Option<Cow<'_, Versions>> {
        let id = id.as_bytes();
        let codec = self.codec.as_ref();
        let id_ref = *self.by_id.get(&hash)?;
        if let Some(seq) = id_ref.seq() {
            let (held, version) = slot_key(&self.slots, codec, seq)?;
            return (held == id).then_some(Cow::Owned(Versions::One(version, seq)));
        }
        self.multi
            .get(id_ref.index()?)?
            .all()
            .iter()
            .find(|v| id_bytes(&self.slots, codec, v.any_seq()).is_some_and(|i| i == id))
            .map(Cow::Borrowed)
    }

    /// The seq of the latest revision of every id.
    fn latest_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        let singles = self.by_id.values().filter_map(|r| r.seq());
        let multis = self
            .multi
            .iter()
            .flat_map(Ids::all)
            .map(|versions| versions.latest().1);
        singles.chain(multis)
    }

    /// The seq of the latest revision of every id, in the order of their ids (the order of
    /// [`LogIndex::state`]'s keys): the state as positions in the log, from the index alone,
    /// without decoding or copying an event.
    pub fn state_seqs(&self) -> Vec<u64> {
        let codec = self.codec.as_ref();
        let mut by_id: Vec<(&[u8], u64)> = self
            .latest_seqs()
            .filter_map(|seq| Some((id_bytes(&self.slots, codec, seq)?, seq)))
            .collect();
        // A `String`'s order is its UTF-8 bytes' order.
        by_id.sort_unstable_by(|a, b| a.0.cmp(b.0));
        by_id.into_iter().map(|(_, seq)| seq).collect()
    }

    /// The revision `(id, version)` and its sequence number.
    pub fn get(&self, id: &str, version: u64) -> Option<Stored> {
        self.stored(self.versions(id)?.get(version)?)
    }

    /// The highest version of `id`.
    pub fn latest(&self, id: &str) -> Option<Stored> {
        self.stored(self.versions(id)?.latest().1)
    }

    /// The event at `seq`, copied out with its seq.
    fn stored(&self, seq: u64) -> Option<Stored> {
        self.at(seq).map(|e| Stored {
            seq,
            event: e.into_owned(),
        })
    }

    /// Up to `limit` events with `seq > after`, in order.
    pub fn read_since(&self, after: u64, limit: usize) -> Vec<Stored> {
        self.iter_since(after, limit)
            .map(|(seq, e)| Stored {
                seq,
                event: e.into_owned(),
            })
            .collect()
    }

    /// The materialised state: the highest version of every id.
    pub fn state(&self) -> BTreeMap<String, Event> {
        self.latest_seqs()
            .filter_map(|seq| {
                self.at(seq).map(|e| {
                    let e = e.into_owned();
                    (e.id.clone(), e)
                })
            })
            .collect()
    }

    /// Plans merging `batch` into this log (see [`MergePlan`]). Duplicates inside the batch are
    /// treated like duplicates of the log.
    pub fn plan(&self, batch: Vec<Event>) -> MergePlan {
        // What happens to each input. Decided first, borrowing the batch's ids (no key copy
        // per event), then carried out by moving the events.
        enum Decision<'a> {
            New { seq: u64 },
            Duplicate { seq: u64 },
            // Collides with this revision of the log (decoded once, if held as a record).
            ConflictWithLog(Cow<'a, Event>),
            // Collides with the batch's new revision at this position of `outcome.appended`.
            ConflictWithBatch { appended: usize },
        }
        let mut decisions = Vec::with_capacity(batch.len());
        {
            // (id, version) -> (input index, position in `appended`) of the batch's new
            // revisions. None for a batch of one, which has no repeats to find (an entry
            // would allocate the map even when nothing is inserted).
            let mut in_batch: Option<
                HashMap<BatchKey<'_>, (usize, usize), BuildNoHashHasher<BatchKey<'_>>>,
            > = (batch.len() > 1).then(|| {
                HashMap::with_capacity_and_hasher(batch.len(), BuildHasherDefault::default())
            });
            let mut appended = 0;
            for (input, event) in batch.iter().enumerate() {
                // One hash of the id serves the log lookup and the batch map.
                let hash = self.hasher.hash_id(event.id.as_bytes());
                let in_log = self
                    .versions_hashed(hash, &event.id)
                    .and_then(|v| v.get(event.version))
                    .and_then(|seq| self.at(seq).map(|held| (seq, held)));
                let key = BatchKey {
                    hash,
                    id: &event.id,
                    version: event.version,
                };
                let decision = match in_log {
                    Some((seq, held)) if held.same_content(event) => Decision::Duplicate { seq },
                    Some((_, held)) => Decision::ConflictWithLog(held),
                    None => match in_batch.as_mut().map(|map| map.entry(key)) {
                        Some(Entry::Occupied(o)) => {
                            let (first, position) = *o.get();
                            if batch
                                .get(first)
                                .is_some_and(|held| held.same_content(event))
                            {
                                Decision::Duplicate {
                                    seq: self.len() + position as u64 + 1,
                                }
                            } else {
                                Decision::ConflictWithBatch { appended: position }
                            }
                        }
                        // New to the batch (remembered, unless the batch is of one).
                        not_seen => {
                            if let Some(Entry::Vacant(v)) = not_seen {
                                v.insert((input, appended));
                            }
                            appended += 1;
                            Decision::New {
                                seq: self.len() + appended as u64,
                            }
                        }
                    },
                };
                decisions.push(decision);
            }
        }
        let mut outcome = MergeOutcome {
            outcomes: Vec::with_capacity(batch.len()),
            appended: Vec::with_capacity(batch.len()),
            ..MergeOutcome::default()
        };
        for (event, decision) in batch.into_iter().zip(decisions) {
            let held = match decision {
                Decision::New { seq } => {
                    outcome.outcomes.push(AppendOutcome::Appended { seq });
                    outcome.appended.push(Stored { seq, event });
                    continue;
                }
                Decision::Duplicate { seq } => {
                    outcome.duplicates += 1;
                    outcome.outcomes.push(AppendOutcome::Duplicate { seq });
                    continue;
                }
                Decision::ConflictWithLog(held) => Some(held.into_owned()),
                Decision::ConflictWithBatch { appended } => {
                    outcome.appended.get(appended).map(|s| s.event.clone())
                }
            };
            // The lookup succeeds: the decision was made on this batch.
            let held = held.unwrap_or_else(|| event.clone());
            let conflict = Conflict::concurrent_edit(held, event);
            outcome.conflicts.push(conflict.clone());
            outcome
                .outcomes
                .push(AppendOutcome::Conflict(Box::new(conflict)));
        }
        MergePlan { outcome }
    }

    /// Applies a plan made by [`LogIndex::plan`] on this same, unchanged log.
    ///
    /// # Panics
    /// Never for a plan made on the current state; a stale plan is a programming error and
    /// is caught by a debug assertion.
    pub fn commit(&mut self, plan: &MergePlan) {
        for stored in &plan.outcome.appended {
            debug_assert_eq!(stored.seq, self.len() + 1, "stale merge plan");
            self.push(stored.event.clone());
        }
    }

    /// Merges `batch` into the log: plan then commit.
    pub fn merge(&mut self, batch: Vec<Event>) -> MergeOutcome {
        let plan = self.plan(batch);
        self.commit(&plan);
        plan.outcome
    }

    /// Merges `batch` like [`LogIndex::merge`] but moves the new events into the log instead
    /// of copying them, and reports what happened without them.
    pub fn merge_summary(&mut self, batch: Vec<Event>) -> MergeSummary {
        let MergeOutcome {
            outcomes,
            appended,
            conflicts,
            duplicates,
        } = self.plan(batch).outcome;
        let count = appended.len();
        for stored in appended {
            debug_assert_eq!(stored.seq, self.len() + 1, "fresh merge plan");
            self.push(stored.event);
        }
        MergeSummary {
            outcomes,
            appended: count,
            conflicts,
            duplicates,
        }
    }

    /// Up to `limit` events with `seq > after`, in order: [`LogIndex::read_since`] without
    /// copies of the events the log holds decoded (those it holds as records are decoded into
    /// a copy that lives as long as the caller keeps it, see [`LogIndex::at`]).
    pub fn iter_since(
        &self,
        after: u64,
        limit: usize,
    ) -> impl Iterator<Item = (u64, Cow<'_, Event>)> {
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        self.slots
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take(limit)
            .zip(after.saturating_add(1)..)
            .filter_map(|(slot, seq)| self.event(slot).map(|e| (seq, e)))
    }

    /// Calls `visit` with each of [`LogIndex::iter_since`]'s events; returns how many: what a
    /// [`Storage::visit_since`](crate::Storage::visit_since) over an in-memory index does.
    pub fn visit_since(
        &self,
        after: u64,
        limit: usize,
        visit: &mut dyn FnMut(u64, &Event),
    ) -> usize {
        let mut visited = 0;
        for (seq, event) in self.iter_since(after, limit) {
            visit(seq, &event);
            visited += 1;
        }
        visited
    }

    /// Appends an event that is known not to collide (used when replaying a trusted log).
    /// Returns `false` (and stores nothing) when `(id, version)` is already present.
    pub fn push(&mut self, event: Event) -> bool {
        if !self.insert_key(event.id.as_bytes(), event.version) {
            return false;
        }
        self.slots.push(Slot::Decoded(Box::new(event)));
        true
    }

    /// Appends an event kept as its encoded record, read back with the log's [`EventCodec`]
    /// (see [`LogIndex::with_codec`]) whenever it is read; `event`, when given, is its decoded
    /// form, which the log keeps instead of the record (reads then only copy it). Returns
    /// `false` (and stores nothing) when `(id, version)` is already present, or when there is
    /// no codec or it cannot read the record's key.
    pub fn push_encoded(&mut self, encoded: EncodedEvent, event: Option<Event>) -> bool {
        let Some(codec) = self.codec else {
            return false;
        };
        let Some((id, version)) = (codec.key)(encoded.bytes()) else {
            return false;
        };
        debug_assert!(
            event
                .as_ref()
                .is_none_or(|e| e.id.as_bytes() == id && e.version == version),
            "the decoded event is not the encoded one"
        );
        // The key borrows `encoded`, which moves into the log below: hash and check first.
        if !self.insert_key(id, version) {
            return false;
        }
        self.slots.push(Slot::new(encoded, event));
        true
    }

    /// [`LogIndex::push_encoded`] for a record whose key was computed elsewhere (a replay
    /// keys records on its decoder threads) with this log's [`LogIndex::id_hasher`]: the
    /// common case, an id not seen before, then costs no parsing and no hashing here. `key`
    /// must be the record's own key (checked in debug builds); `event` is as in
    /// [`LogIndex::push_encoded`].
    pub fn push_encoded_keyed(
        &mut self,
        encoded: EncodedEvent,
        key: EncodedKey,
        event: Option<Event>,
    ) -> bool {
        let Some(codec) = self.codec else {
            return false;
        };
        debug_assert!(
            (codec.key)(encoded.bytes())
                .is_some_and(|(id, version)| self.hasher.key(id, version) == key),
            "the key is not the record's"
        );
        let seq = self.len() + 1;
        if let Entry::Vacant(slot) = self.by_id.entry(key.hash) {
            slot.insert(IdRef::single(seq));
            self.slots.push(Slot::new(encoded, event));
            return true;
        }
        // Another version of this id, or another id with the same hash: the full path.
        self.push_encoded(encoded, event)
    }

    /// Records `(id, version)` at the next seq; `false` if it is already present.
    fn insert_key(&mut self, id: &[u8], version: u64) -> bool {
        let seq = self.len() + 1;
        let hash = self.hasher.hash_id(id);
        let Self {
            by_id,
            multi,
            slots,
            codec,
            ..
        } = self;
        let key_at = |s: u64| slot_key(slots, codec.as_ref(), s);
        // One hash lookup; most ids are new (a replay inserts a million of them).
        let mut entry = match by_id.entry(hash) {
            Entry::Vacant(slot) => {
                slot.insert(IdRef::single(seq));
                return true;
            }
            Entry::Occupied(entry) => entry,
        };
        let id_ref = *entry.get();
        if let Some(held) = id_ref.seq() {
            // A second revision under this hash: move it to `multi`.
            let Some((held_id, held_version)) = key_at(held) else {
                return false; // never: every indexed seq has a slot with a key
            };
            let ids = if held_id == id {
                if held_version == version {
                    return false;
                }
                let mut versions = Versions::One(held_version, held);
                versions.insert(version, seq);
                Ids::One(versions)
            } else {
                Ids::Several(vec![
                    Versions::One(held_version, held),
                    Versions::One(version, seq),
                ])
            };
            multi.push(ids);
            *entry.get_mut() = IdRef::multi(multi.len() - 1);
            return true;
        }
        let Some(ids) = id_ref.index().and_then(|i| multi.get_mut(i)) else {
            return false; // never: `multi` entries are not removed
        };
        let is_id = |v: &Versions| key_at(v.any_seq()).is_some_and(|(i, _)| i == id);
        let same = match ids {
            Ids::One(versions) => is_id(versions).then_some(versions),
            Ids::Several(list) => list.iter_mut().find(|v| is_id(v)),
        };
        match same {
            Some(versions) => {
                if versions.get(version).is_some() {
                    return false;
                }
                versions.insert(version, seq);
            }
            // Another id with the same 64-bit hash.
            None => match ids {
                Ids::One(other) => {
                    let other = other.clone();
                    *ids = Ids::Several(vec![other, Versions::One(version, seq)]);
                }
                Ids::Several(list) => list.push(Versions::One(version, seq)),
            },
        }
        true
    }

    /// All distinct ids.
    pub fn ids(&self) -> HashSet<&str> {
        self.latest_seqs()
            .filter_map(|seq| {
                id_bytes(&self.slots, self.codec.as_ref(), seq)
                    .and_then(|id| std::str::from_utf8(id).ok())
            })
            .collect()
    }
}

/// The versions of one id and their seqs. Most ids have a single version, so it is stored
/// inline: a map per id would cost an allocation (and ~200 bytes) per event on replay.
#[derive(Debug, Clone)]
enum Versions {
    /// `(version, seq)`.
    One(u64, u64),
    /// version -> seq; the latest version is the last entry.
    Many(BTreeMap<u64, u64>),
}

impl Versions {
    fn get(&self, version: u64) -> Option<u64> {
        match self {
            Versions::One(v, seq) => (*v == version).then_some(*seq),
            Versions::Many(map) => map.get(&version).copied(),
        }
    }

    /// The seq of one of the versions (any: they all name the same id).
    fn any_seq(&self) -> u64 {
        self.latest().1
    }

    fn latest(&self) -> (u64, u64) {
        match self {
            Versions::One(v, seq) => (*v, *seq),
            // A `Many` is never empty: it is made from a `One` plus one more entry.
            Versions::Many(map) => map.last_key_value().map_or((0, 0), |(v, seq)| (*v, *seq)),
        }
    }

    fn insert(&mut self, version: u64, seq: u64) {
        match self {
            Versions::One(v, s) => {
                *self = Versions::Many(BTreeMap::from([(*v, *s), (version, seq)]));
            }
            Versions::Many(map) => {
                map.insert(version, seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn ev(id: &str, version: u64, data: i64) -> Event {
        Event::new(id, "t", json!(data), 1).with_version(version)
    }

    // A toy encoding: id length (u8), id, version (u64 LE), then the event as JSON.
    fn toy_encode(event: &Event) -> Vec<u8> {
        let mut out = vec![u8::try_from(event.id.len()).expect("short id")];
        out.extend_from_slice(event.id.as_bytes());
        out.extend_from_slice(&event.version.to_le_bytes());
        out.extend_from_slice(&serde_json::to_vec(event).expect("json"));
        out
    }

    fn toy_key(bytes: &[u8]) -> Option<(&[u8], u64)> {
        let len = usize::from(*bytes.first()?);
        let id = bytes.get(1..1 + len)?;
        let version = u64::from_le_bytes(bytes.get(1 + len..9 + len)?.try_into().ok()?);
        Some((id, version))
    }

    fn toy_decode(bytes: &[u8]) -> Option<Event> {
        let len = usize::from(*bytes.first()?);
        serde_json::from_slice(bytes.get(9 + len..)?).ok()
    }

    const TOY: EventCodec = EventCodec {
        decode: toy_decode,
        key: toy_key,
    };

    /// `events` pushed encoded, in one shared buffer: the even ones with their decoded form,
    /// the odd ones keyed by the caller (as a replay does).
    fn encoded_log(events: &[Event], all_collide: bool) -> (LogIndex, Vec<bool>) {
        let mut bytes = Vec::new();
        let mut ranges = Vec::new();
        for e in events {
            let start = bytes.len();
            bytes.extend_from_slice(&toy_encode(e));
            ranges.push(start..bytes.len());
        }
        let bytes = Arc::new(bytes);
        let mut log = LogIndex::with_codec(TOY);
        log.hasher.all_collide = all_collide;
        let pushed = events
            .iter()
            .zip(ranges)
            .enumerate()
            .map(|(i, (e, range))| {
                let encoded = EncodedEvent::new(Arc::clone(&bytes), range).expect("in range");
                if i % 2 == 0 {
                    log.push_encoded(encoded, Some(e.clone()))
                } else {
                    let key = log.id_hasher().key(e.id.as_bytes(), e.version);
                    log.push_encoded_keyed(encoded, key, None)
                }
            })
            .collect();
        (log, pushed)
    }

    #[test]
    fn encoded_events_read_back_like_decoded_ones() {
        let events = vec![
            ev("a", 1, 1),
            ev("b", 1, 2),
            ev("a", 2, 3),
            ev("a", 1, 9), // repeats (a, 1): refused
            ev("c", 1, 4),
        ];
        for all_collide in [false, true] {
            let (encoded, pushed) = encoded_log(&events, all_collide);
            assert_eq!(pushed, vec![true, true, true, false, true]);
            let mut plain = LogIndex::new();
            plain.hasher.all_collide = all_collide;
            for e in &events {
                plain.push(e.clone());
            }
            assert_eq!(encoded.len(), 4);
            assert_eq!(encoded.read_since(0, 10), plain.read_since(0, 10));
            assert_eq!(encoded.state(), plain.state());
            assert_eq!(encoded.ids(), plain.ids());
            assert_eq!(encoded.latest("a").map(|s| s.seq), Some(3));
            assert_eq!(encoded.get("a", 1).map(|s| s.event.data), Some(json!(1)));
            assert_eq!(encoded.get("c", 1).map(|s| s.seq), Some(4));
            assert_eq!(encoded.get("d", 1), None);
            // Records are decoded into each read's own copy, every time (nothing cached);
            // events pushed with their decoded form are lent.
            let kinds: Vec<(u64, bool)> = encoded
                .iter_since(0, 10)
                .map(|(seq, e)| (seq, matches!(e, Cow::Owned(_))))
                .collect();
            assert_eq!(kinds, vec![(1, false), (2, true), (3, false), (4, false)]);
            for _ in 0..2 {
                assert!(matches!(encoded.at(2), Some(Cow::Owned(e)) if e == events[1]));
            }
            let mut visited = Vec::new();
            encoded.visit_since(1, 2, &mut |seq, e| visited.push((seq, e.clone())));
            assert_eq!(
                visited,
                vec![(2, events[1].clone()), (3, events[2].clone())]
            );
            // Merging against encoded events dedups and conflicts as usual.
            let mut merged = encoded.clone();
            let out = merged.merge(vec![ev("b", 1, 2), ev("b", 1, 5), ev("d", 1, 6)]);
            assert_eq!(out.duplicates, 1);
            assert_eq!(out.conflicts.len(), 1);
            assert_eq!(out.last_seq(), Some(5));
        }
        // Without a codec nothing encoded is taken.
        let mut log = LogIndex::new();
        let bytes = Arc::new(toy_encode(&ev("a", 1, 1)));
        let len = bytes.len();
        let encoded = EncodedEvent::new(bytes, 0..len).expect("in range");
        assert!(!log.push_encoded(encoded.clone(), None));
        assert!(EncodedEvent::new(Arc::new(vec![1, 2]), 1..3).is_none());
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_slot_is_three_words() {
        // A million-event log holds a million slots: no room for a cache beside the record.
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }

    #[test]
    fn new_duplicate_conflict() {
        let mut log = LogIndex::new();
        let out = log.merge(vec![ev("a", 1, 1), ev("b", 1, 1)]);
        assert_eq!(out.appended.len(), 2);
        assert_eq!(out.last_seq(), Some(2));
        let out = log.merge(vec![ev("a", 1, 1), ev("a", 1, 2), ev("a", 2, 3)]);
        assert_eq!(out.duplicates, 1);
        assert_eq!(out.conflicts.len(), 1);
        assert_eq!(out.conflicts[0].ours.data, json!(1));
        assert_eq!(out.conflicts[0].theirs.data, json!(2));
        assert_eq!(out.outcomes[2], AppendOutcome::Appended { seq: 3 });
        assert_eq!(log.len(), 3);
        assert_eq!(log.latest("a").map(|s| s.event.version), Some(2));
        assert_eq!(log.state().len(), 2);
    }

    #[test]
    fn duplicates_inside_one_batch() {
        let mut log = LogIndex::new();
        let out = log.merge(vec![ev("a", 1, 1), ev("a", 1, 1), ev("a", 1, 9)]);
        assert_eq!(out.appended.len(), 1);
        assert_eq!(out.duplicates, 1);
        assert_eq!(out.conflicts.len(), 1);
    }

    #[test]
    fn read_since_pages() {
        let mut log = LogIndex::new();
        log.merge((0..10).map(|i| ev(&format!("e{i}"), 1, i)).collect());
        let page = log.read_since(3, 4);
        assert_eq!(
            page.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![4, 5, 6, 7]
        );
        assert!(log.read_since(10, 5).is_empty());
        assert!(log.read_since(u64::MAX, 5).is_empty());
    }

    #[test]
    fn iter_since_borrows_the_same_page() {
        let mut log = LogIndex::new();
        log.merge((0..10).map(|i| ev(&format!("e{i}"), 1, i)).collect());
        let borrowed: Vec<(u64, Event)> = log
            .iter_since(3, 4)
            .map(|(seq, e)| {
                assert!(matches!(e, Cow::Borrowed(_)), "held decoded: not copied");
                (seq, e.into_owned())
            })
            .collect();
        let copied: Vec<(u64, Event)> = log
            .read_since(3, 4)
            .into_iter()
            .map(|s| (s.seq, s.event))
            .collect();
        assert_eq!(borrowed, copied);
        assert_eq!(log.iter_since(10, 5).count(), 0);
        assert_eq!(log.iter_since(u64::MAX, 5).count(), 0);
    }

    // Events whose content is a function of (id, version), so sets never conflict.
    fn arb_events() -> impl Strategy<Value = Vec<Event>> {
        prop::collection::vec((0u8..8, 1u64..4), 0..40).prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(id, v)| ev(&format!("id{id}"), v, i64::from(id) * 10 + v as i64))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn merging_is_idempotent(batch in arb_events()) {
            let mut log = LogIndex::new();
            log.merge(batch.clone());
            let before = log.state();
            let len = log.len();
            let again = log.merge(batch);
            prop_assert!(again.appended.is_empty());
            prop_assert!(again.conflicts.is_empty());
            prop_assert_eq!(log.len(), len);
            prop_assert_eq!(log.state(), before);
        }

        #[test]
        fn merge_summary_is_merge_without_the_events(
            first in prop::collection::vec((0u8..6, 1u64..3, 0i64..2), 0..20),
            second in prop::collection::vec((0u8..6, 1u64..3, 0i64..2), 0..20),
        ) {
            // Contents vary per (id, version), so collisions with the log and inside a batch
            // both happen.
            let evs = |v: &[(u8, u64, i64)]| -> Vec<Event> {
                v.iter().map(|&(id, ver, d)| ev(&format!("id{id}"), ver, d)).collect()
            };
            let mut full = LogIndex::new();
            let mut summed = LogIndex::new();
            for batch in [evs(&first), evs(&second)] {
                let outcome = full.merge(batch.clone());
                let summary = summed.merge_summary(batch);
                prop_assert_eq!(summary.first_seq(), outcome.appended.first().map(|s| s.seq));
                prop_assert_eq!(summary.last_seq(), outcome.last_seq());
                prop_assert_eq!(summary, MergeSummary::from(outcome));
            }
            prop_assert_eq!(full.read_since(0, 100), summed.read_since(0, 100));
        }

        #[test]
        fn ids_sharing_a_hash_are_kept_apart(batch in arb_events(), more in arb_events()) {
            let mut normal = LogIndex::new();
            let mut colliding = LogIndex::new();
            colliding.hasher.all_collide = true;
            for b in [batch, more] {
                prop_assert_eq!(normal.merge(b.clone()), colliding.merge(b));
            }
            prop_assert_eq!(normal.state(), colliding.state());
            prop_assert_eq!(normal.ids(), colliding.ids());
            for id in normal.ids() {
                prop_assert_eq!(normal.latest(id), colliding.latest(id));
            }
        }

        #[test]
        fn any_merge_order_converges(a in arb_events(), b in arb_events(), c in arb_events(), split in 0usize..40) {
            // Replica 1 merges a, b, c; replica 2 merges c, then b in two pieces, then a.
            let mut one = LogIndex::new();
            one.merge(a.clone());
            one.merge(b.clone());
            one.merge(c.clone());
            let mut two = LogIndex::new();
            two.merge(c);
            let cut = split.min(b.len());
            two.merge(b[cut..].to_vec());
            two.merge(b[..cut].to_vec());
            two.merge(a.into_iter().rev().collect());
            prop_assert_eq!(one.state(), two.state());
            prop_assert_eq!(one.len(), two.len());
        }
    }
}
