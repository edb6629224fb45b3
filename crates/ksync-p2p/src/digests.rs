//! Content digests of the node's own log, kept as the log grows, so a catch-up round reads
//! them instead of copying and hashing every event once per peer and direction. Each also
//! records whether the node's filter lets its event out: `Keys` pages list only those.

use std::collections::HashMap;
use std::sync::Arc;

use ksync_core::{Event, Filter, Storage, StorageError};

use crate::wire::{self, KeyEntry};

/// How many events one storage visit covers.
const REFRESH_PAGE: usize = 1024;

/// What is recorded of every event in the log, by sequence number, and the digests by
/// revision. Memory: one entry per event of the log (the id is shared by both indexes), the
/// same order as the log's own index. The log is append-only with gap-free sequence numbers,
/// so entries never change once recorded.
#[derive(Debug, Default)]
pub(crate) struct Digests {
    /// Index `seq - 1`.
    by_seq: Vec<Recorded>,
    /// `(version, digest)` pairs of each id.
    by_id: HashMap<Arc<str>, Versions>,
    /// The node's filter: events it keeps home are listed in no `Keys` page.
    filter: Option<Filter>,
}

/// One event of the log.
#[derive(Debug)]
struct Recorded {
    id: Arc<str>,
    version: u64,
    digest: u64,
    /// The filter lets the event out (see [`Digests::page`]).
    listed: bool,
}

/// A `Keys` page: its entries, and the last sequence number it covers (entries kept home are
/// skipped, so it may be past the last entry's).
#[derive(Debug, PartialEq)]
pub(crate) struct Page {
    pub(crate) entries: Vec<KeyEntry>,
    pub(crate) through: u64,
}

/// The `(version, digest)` pairs of one id: most ids have a single version, kept inline; an
/// id with many has a map (a list searched per lookup cost O(V²) to look up all V versions
/// of one id, which a peer can make as many as it likes).
#[derive(Debug)]
enum Versions {
    One(u64, u64),
    Many(HashMap<u64, u64>),
}

impl Versions {
    /// Records `version` unless recorded (the log holds each revision once; the first
    /// recorded is kept, as the log keeps it).
    fn push(&mut self, version: u64, digest: u64) {
        match self {
            Versions::One(v, _) if *v == version => {}
            Versions::One(v, d) => {
                *self = Versions::Many(HashMap::from([(*v, *d), (version, digest)]));
            }
            Versions::Many(all) => {
                all.entry(version).or_insert(digest);
            }
        }
    }

    fn get(&self, version: u64) -> Option<u64> {
        match self {
            Versions::One(v, d) => (*v == version).then_some(*d),
            Versions::Many(all) => all.get(&version).copied(),
        }
    }
}

impl Digests {
    /// Digests for a node whose filter is `filter` (a filter is a pure function of the event:
    /// each event is asked once).
    pub(crate) fn new(filter: Option<Filter>) -> Self {
        Self {
            filter,
            ..Self::default()
        }
    }

    /// How many events are recorded (the last sequence number covered).
    pub(crate) fn len(&self) -> u64 {
        self.by_seq.len() as u64
    }

    /// Records the event at `seq` if it is the next one; anything else is left to
    /// [`Digests::refresh`].
    fn record(&mut self, seq: u64, event: &Event) {
        if seq != self.len() + 1 {
            return;
        }
        let id: Arc<str> = Arc::from(event.id.as_str());
        let digest = wire::content_hash(event);
        match self.by_id.get_mut(event.id.as_str()) {
            Some(versions) => versions.push(event.version, digest),
            None => {
                self.by_id
                    .insert(Arc::clone(&id), Versions::One(event.version, digest));
            }
        }
        let listed = self.filter.as_ref().is_none_or(|f| f.allows(event));
        self.by_seq.push(Recorded {
            id,
            version: event.version,
            digest,
            listed,
        });
    }

    /// Records up to `budget` more of what the storage holds beyond what is recorded (in
    /// steps, so a long log that was never read does not stall the node at once). Returns
    /// whether everything is now recorded.
    pub(crate) fn refresh(
        &mut self,
        storage: &dyn Storage,
        budget: usize,
    ) -> Result<bool, StorageError> {
        let target = storage.len().min(self.len().saturating_add(budget as u64));
        while self.len() < target {
            let from = self.len();
            let step = usize::try_from(target - from).map_or(REFRESH_PAGE, |n| n.min(REFRESH_PAGE));
            storage.visit_since(from, step, &mut |seq, event| self.record(seq, event))?;
            if self.len() == from {
                break;
            }
        }
        Ok(self.len() >= storage.len())
    }

    /// The digest of our copy of `(id, version)`, if we hold it.
    pub(crate) fn get(&self, id: &str, version: u64) -> Option<u64> {
        self.by_id.get(id)?.get(version)
    }

    /// Up to `limit` entries the filter lets out with `seq > after`, in order, looking at most
    /// `scan` events (a long run of events kept home gives an empty page that still moves the
    /// requester on).
    pub(crate) fn page(&self, after: u64, limit: usize, scan: usize) -> Page {
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        let mut page = Page {
            entries: Vec::new(),
            through: after,
        };
        let recorded = self.by_seq.get(start..).unwrap_or_default();
        for (event, seq) in recorded.iter().take(scan).zip(after.saturating_add(1)..) {
            if page.entries.len() == limit {
                break;
            }
            page.through = seq;
            if event.listed {
                page.entries.push(KeyEntry {
                    seq,
                    id: event.id.to_string(),
                    version: event.version,
                    hash: event.digest,
                });
            }
        }
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksync_core::InMemoryStorage;
    use serde_json::json;

    #[tokio::test]
    async fn follows_the_log_and_matches_content_hash() {
        let storage = InMemoryStorage::new();
        let a = Event::new("a", "t", json!({"x": 1}), 1);
        let a2 = a.clone().with_version(2);
        let b = Event::new("b", "t", json!([1, 2]), 2);
        storage
            .append(vec![a.clone(), a2.clone()])
            .await
            .expect("append");
        let mut d = Digests::default();
        assert!(!d.refresh(&storage, 1).expect("refresh"), "one step of one");
        assert_eq!(d.len(), 1);
        assert!(d.refresh(&storage, 100).expect("refresh"));
        assert_eq!(d.len(), 2);
        // Recording out of order is ignored; the next refresh fills the gap.
        storage.append(vec![b.clone()]).await.expect("append");
        d.record(5, &b);
        assert_eq!(d.len(), 2);
        assert!(d.refresh(&storage, 100).expect("refresh"));
        assert_eq!(d.len(), 3);
        assert_eq!(d.get("a", 2), Some(wire::content_hash(&a2)));
        assert_eq!(d.get("b", 1), Some(wire::content_hash(&b)));
        assert_eq!(d.get("b", 2), None);
        assert_eq!(d.get("c", 1), None);
        let page = d.page(1, 10, 100).entries;
        assert_eq!(
            page.iter()
                .map(|e| (e.seq, e.id.as_str(), e.version))
                .collect::<Vec<_>>(),
            vec![(2, "a", 2), (3, "b", 1)]
        );
        assert_eq!(page[1].hash, wire::content_hash(&b));
        assert!(d.page(3, 10, 100).entries.is_empty());
        assert!(d.page(u64::MAX, 10, 100).entries.is_empty());
    }

    #[test]
    fn every_version_of_an_id_is_found_in_any_order() {
        let mut d = Digests::default();
        // Versions out of order, as revisions arrive from several peers.
        let versions: Vec<u64> = (1..=2000u64).map(|n| (n * 7919) % 2003 + 1).collect();
        for (seq, version) in (1..).zip(&versions) {
            let event = Event::new("doc", "t", json!(version), *version).with_version(*version);
            d.record(seq, &event);
        }
        assert_eq!(d.len(), 2000);
        for version in &versions {
            let event = Event::new("doc", "t", json!(version), *version).with_version(*version);
            assert_eq!(d.get("doc", *version), Some(wire::content_hash(&event)));
        }
        let held: std::collections::HashSet<u64> = versions.iter().copied().collect();
        let missing = (1..=2003).find(|v| !held.contains(v)).expect("one missing");
        assert_eq!(d.get("doc", missing), None);
    }

    #[tokio::test]
    async fn pages_list_only_what_the_filter_lets_out() {
        let storage = InMemoryStorage::new();
        let public = |id: &str| Event::new(id, "t", json!({"x": 1}), 1);
        let private = |id: &str| Event::new(id, "t", json!({"private": true}), 1);
        storage
            .append(vec![public("a"), private("p1"), private("p2"), public("b")])
            .await
            .expect("append");
        let mut d = Digests::new(Some(Filter::PublicOnly));
        assert!(d.refresh(&storage, 100).expect("refresh"));
        let listed = |page: &Page| -> Vec<(u64, String)> {
            page.entries.iter().map(|e| (e.seq, e.id.clone())).collect()
        };
        let all = d.page(0, 10, 100);
        assert_eq!(listed(&all), vec![(1, "a".into()), (4, "b".into())]);
        assert_eq!(all.through, 4);
        // Full after one entry: covers up to it.
        let first = d.page(0, 1, 100);
        assert_eq!((listed(&first), first.through), (vec![(1, "a".into())], 1));
        // Only kept-home events within the scan: empty, yet past them.
        let hidden = d.page(1, 10, 2);
        assert_eq!((listed(&hidden), hidden.through), (vec![], 3));
        let rest = d.page(3, 10, 100);
        assert_eq!((listed(&rest), rest.through), (vec![(4, "b".into())], 4));
        let end = d.page(4, 10, 100);
        assert_eq!((listed(&end), end.through), (vec![], 4));
        // Our own digests still cover every revision, listed or not.
        assert!(d.get("p1", 1).is_some());
    }
}
