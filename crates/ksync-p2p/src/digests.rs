//! Content digests of the node's own log, kept as the log grows, so a catch-up round reads
//! them instead of copying and hashing every event once per peer and direction.

use std::collections::HashMap;
use std::sync::Arc;

use ksync_core::{Event, Storage, StorageError};

use crate::wire::{self, KeyEntry};

/// How many events one storage visit covers.
const REFRESH_PAGE: usize = 1024;

/// `(id, version, digest)` of every event in the log, by sequence number, and the digests by
/// revision. Memory: one entry per event of the log (the id is shared by both indexes), the
/// same order as the log's own index. The log is append-only with gap-free sequence numbers,
/// so entries never change once recorded.
#[derive(Debug, Default)]
pub(crate) struct Digests {
    /// Index `seq - 1`.
    by_seq: Vec<(Arc<str>, u64, u64)>,
    /// `(version, digest)` pairs of each id.
    by_id: HashMap<Arc<str>, Versions>,
}

/// The `(version, digest)` pairs of one id: most ids have a single version, kept inline.
#[derive(Debug)]
enum Versions {
    One(u64, u64),
    Many(Vec<(u64, u64)>),
}

impl Versions {
    fn push(&mut self, version: u64, digest: u64) {
        match self {
            Versions::One(v, d) => *self = Versions::Many(vec![(*v, *d), (version, digest)]),
            Versions::Many(all) => all.push((version, digest)),
        }
    }

    fn get(&self, version: u64) -> Option<u64> {
        match self {
            Versions::One(v, d) => (*v == version).then_some(*d),
            Versions::Many(all) => all.iter().find(|(v, _)| *v == version).map(|(_, d)| *d),
        }
    }
}

impl Digests {
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
        self.by_seq.push((id, event.version, digest));
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

    /// Up to `limit` entries with `seq > after`, in order.
    pub(crate) fn page(&self, after: u64, limit: usize) -> Vec<KeyEntry> {
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        self.by_seq
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take(limit)
            .zip(after.saturating_add(1)..)
            .map(|((id, version, hash), seq)| KeyEntry {
                seq,
                id: id.to_string(),
                version: *version,
                hash: *hash,
            })
            .collect()
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
        let page = d.page(1, 10);
        assert_eq!(
            page.iter()
                .map(|e| (e.seq, e.id.as_str(), e.version))
                .collect::<Vec<_>>(),
            vec![(2, "a", 2), (3, "b", 1)]
        );
        assert_eq!(page[1].hash, wire::content_hash(&b));
        assert!(d.page(3, 10).is_empty());
        assert!(d.page(u64::MAX, 10).is_empty());
    }
}
