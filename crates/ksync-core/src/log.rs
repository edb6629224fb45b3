//! The pure log: an in-memory index of revisions with the merge rules of the data model.
//!
//! [`LogIndex`] is the one place that decides what happens to an incoming revision: new,
//! duplicate (dropped silently) or conflict (reported, not stored). Storages wrap it: the
//! in-memory storage directly, the file storage after making the new records durable.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};

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

/// In-memory index of a log. Pure data; no IO, no clock.
#[derive(Debug, Clone, Default)]
pub struct LogIndex {
    events: Vec<Event>,
    // id -> its versions and their seqs.
    by_id: HashMap<String, Versions>,
}

impl LogIndex {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reserves room for `additional` more events, so a bulk load (replaying a log file)
    /// does not rehash and regrow as it goes.
    pub fn reserve(&mut self, additional: usize) {
        self.events.reserve(additional);
        self.by_id.reserve(additional);
    }

    /// The number of events, which is also the last sequence number.
    pub fn len(&self) -> u64 {
        self.events.len() as u64
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The event at `seq`.
    pub fn at(&self, seq: u64) -> Option<&Event> {
        seq.checked_sub(1)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.events.get(i))
    }

    /// The revision `(id, version)` and its sequence number.
    pub fn get(&self, id: &str, version: u64) -> Option<Stored> {
        let seq = self.by_id.get(id)?.get(version)?;
        self.at(seq).map(|e| Stored {
            seq,
            event: e.clone(),
        })
    }

    /// The highest version of `id`.
    pub fn latest(&self, id: &str) -> Option<Stored> {
        let (_, seq) = self.by_id.get(id)?.latest();
        self.at(seq).map(|e| Stored {
            seq,
            event: e.clone(),
        })
    }

    /// Up to `limit` events with `seq > after`, in order.
    pub fn read_since(&self, after: u64, limit: usize) -> Vec<Stored> {
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        self.events
            .iter()
            .enumerate()
            .skip(start)
            .take(limit)
            .map(|(i, e)| Stored {
                seq: i as u64 + 1,
                event: e.clone(),
            })
            .collect()
    }

    /// The materialised state: the highest version of every id.
    pub fn state(&self) -> BTreeMap<String, Event> {
        self.by_id
            .iter()
            .filter_map(|(id, versions)| {
                let (_, seq) = versions.latest();
                self.at(seq).map(|e| (id.clone(), e.clone()))
            })
            .collect()
    }

    /// Plans merging `batch` into this log (see [`MergePlan`]). Duplicates inside the batch are
    /// treated like duplicates of the log.
    pub fn plan(&self, batch: Vec<Event>) -> MergePlan {
        // What happens to each input. Decided first, borrowing the batch's ids (no key copy
        // per event), then carried out by moving the events.
        enum Decision {
            New { seq: u64 },
            Duplicate { seq: u64 },
            // Collides with the log's revision at this seq.
            ConflictWithLog { seq: u64 },
            // Collides with the batch's new revision at this position of `outcome.appended`.
            ConflictWithBatch { appended: usize },
        }
        let mut decisions = Vec::with_capacity(batch.len());
        {
            // (id, version) -> (input index, position in `appended`) of the batch's new
            // revisions.
            let mut in_batch: HashMap<(&str, u64), (usize, usize)> =
                HashMap::with_capacity(batch.len());
            let mut next_seq = self.len();
            let mut appended = 0;
            for (input, event) in batch.iter().enumerate() {
                let in_log = self
                    .by_id
                    .get(event.id.as_str())
                    .and_then(|v| v.get(event.version))
                    .and_then(|seq| self.at(seq).map(|held| (seq, held)));
                let decision = match in_log {
                    Some((seq, held)) if held.same_content(event) => Decision::Duplicate { seq },
                    Some((seq, _)) => Decision::ConflictWithLog { seq },
                    None => match in_batch.entry((event.id.as_str(), event.version)) {
                        Entry::Occupied(o) => {
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
                        Entry::Vacant(v) => {
                            v.insert((input, appended));
                            appended += 1;
                            next_seq += 1;
                            Decision::New { seq: next_seq }
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
                Decision::ConflictWithLog { seq } => self.at(seq),
                Decision::ConflictWithBatch { appended } => {
                    outcome.appended.get(appended).map(|s| &s.event)
                }
            };
            // Both lookups succeed: the decision was made on this log and this batch.
            let held = held.cloned().unwrap_or_else(|| event.clone());
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

    /// Up to `limit` events with `seq > after`, in order, borrowed: [`LogIndex::read_since`]
    /// without the copies.
    pub fn iter_since(&self, after: u64, limit: usize) -> impl Iterator<Item = (u64, &Event)> {
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        self.events
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take(limit)
            .zip(after.saturating_add(1)..)
            .map(|(e, seq)| (seq, e))
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
            visit(seq, event);
            visited += 1;
        }
        visited
    }

    /// Appends an event that is known not to collide (used when replaying a trusted log).
    /// Returns `false` (and stores nothing) when `(id, version)` is already present.
    pub fn push(&mut self, event: Event) -> bool {
        let seq = self.len() + 1;
        // One hash lookup: most ids are new (a replay inserts a million of them), so the key
        // clone is rarely wasted.
        match self.by_id.entry(event.id.clone()) {
            Entry::Occupied(mut versions) => {
                if versions.get().get(event.version).is_some() {
                    return false;
                }
                versions.get_mut().insert(event.version, seq);
            }
            Entry::Vacant(slot) => {
                slot.insert(Versions::One(event.version, seq));
            }
        }
        self.events.push(event);
        true
    }

    /// All distinct ids.
    pub fn ids(&self) -> HashSet<&str> {
        self.by_id.keys().map(String::as_str).collect()
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
            .map(|(seq, e)| (seq, e.clone()))
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
