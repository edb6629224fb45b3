//! The catch-up cursors kept per peer: bounded, least recently used evicted.
//!
//! A catch-up session walks a peer's log from a cursor (how far we hold that log) that counts
//! in the peer's log id. Both are stored in the replica's metadata so a restart does not walk
//! every log from the start again. Peer identities are free to make (a peer that lies can
//! present a new one on every connection), so one record per peer ever met would grow our
//! state without bound: the records live in at most `cap` slots
//! ([`DEFAULT_MAX_PEER_CURSORS`](crate::DEFAULT_MAX_PEER_CURSORS) by default), meta keys
//! `p2p/cursor-slot/<i>` for `i < cap`, each holding `<peer> <cursor> <log id> <last use>`.
//!
//! Overflow policy: a peer that needs a slot when all are taken takes the one of the least
//! recently used peer (by its last session start or store; the stored stamps order the slots
//! across restarts), whose record is overwritten. That peer has no cursor any more: its next
//! session walks its log from 0, fetches only the revisions we lack (duplicates are dropped on
//! ingest as always) and stores a cursor again. Eviction costs pages walked again, never an
//! event. A slot is one record, so the cursor and its log id are written together: no crash
//! leaves a cursor with another log's id.
//!
//! A slot whose record does not read as one (a later version may write another shape) is left
//! as it is: never taken, evicted or tidied away, and not counted in the cap, which bounds the
//! records this version writes. Overwriting it would destroy a newer version's cursor; leaving
//! it costs that slot's key, nothing more (the peers met take the slots after it).
//!
//! Cursors stored before the slots (`cursor/p2p/<peer>` and `cursor/p2p/<peer>/log-id`,
//! unbounded) are read when their peer's session starts and moved into a slot at its first
//! store (the old records removed); those of peers never met again stay as they were.

use std::collections::HashMap;
use std::str::FromStr;

use ksync_core::{Storage, StorageError};
use libp2p::PeerId;

/// Meta key prefix of the slots.
const SLOT_PREFIX: &str = "p2p/cursor-slot/";

/// A stored cursor: everything in the peer's log `log_id` up to `cursor` is in ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Cursor {
    pub(crate) cursor: u64,
    pub(crate) log_id: u64,
}

/// One slot's place.
#[derive(Debug)]
enum Place {
    /// No record, or a record of ours that may be overwritten (the same peer again).
    Free,
    Taken(Slot),
    /// A record this version cannot read: left as it is (see the module's docs).
    Unreadable,
}

impl Place {
    fn slot(&self) -> Option<&Slot> {
        match self {
            Place::Taken(slot) => Some(slot),
            Place::Free | Place::Unreadable => None,
        }
    }
}

#[derive(Debug)]
struct Slot {
    peer: PeerId,
    at: Cursor,
    /// When it was last used (a stamp of [`PeerCursors::clock`]).
    used: u64,
}

/// The slots as stored, in memory (what [`PeerCursors::stored`] answers is what the storage
/// holds).
#[derive(Debug)]
pub(crate) struct PeerCursors {
    /// The slots up to the highest one taken or unreadable; every index from `slots.len()` on
    /// is free unless its record turns out unreadable when it is taken. Grown as peers take
    /// slots, not sized to `cap`: the cap may be far above the peers ever met (`usize::MAX`
    /// for no practical bound). Slots are taken lowest first and never freed, so the taken
    /// and unreadable ones are a prefix.
    slots: Vec<Place>,
    /// Most slots of ours (taken or free): unreadable ones do not count.
    cap: usize,
    /// How many of `slots` are unreadable.
    unreadable: usize,
    by_peer: HashMap<PeerId, usize>,
    /// The next use stamp (above every stored one).
    clock: u64,
}

fn slot_key(index: usize) -> String {
    format!("{SLOT_PREFIX}{index}")
}

fn parse_slot(value: &str) -> Option<Slot> {
    let mut parts = value.split(' ');
    let peer = PeerId::from_str(parts.next()?).ok()?;
    let cursor = parts.next()?.parse().ok()?;
    let log_id = parts.next()?.parse().ok()?;
    let used = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(Slot {
        peer,
        at: Cursor { cursor, log_id },
        used,
    })
}

impl PeerCursors {
    /// Reads the slots from `storage`. Slots of ours beyond the first `cap` (stored with a
    /// larger cap) are removed; a slot that does not parse is left as it is (see the module's
    /// docs).
    pub(crate) async fn load(storage: &dyn Storage, cap: usize) -> Result<Self, StorageError> {
        let cap = cap.max(1);
        let mut slots: Vec<Place> = Vec::new();
        let mut unreadable = 0;
        let mut by_peer = HashMap::new();
        let mut clock = 0;
        let mut index = 0;
        while slots.len() - unreadable < cap {
            let Some(raw) = storage.meta(&slot_key(index))? else {
                // Taken slots are a prefix: the rest are free.
                break;
            };
            match parse_slot(&raw) {
                // The same peer twice (only a damaged store could do it): keep the first.
                Some(slot) if by_peer.contains_key(&slot.peer) => slots.push(Place::Free),
                Some(slot) => {
                    clock = clock.max(slot.used.saturating_add(1));
                    by_peer.insert(slot.peer, index);
                    slots.push(Place::Taken(slot));
                }
                None => {
                    tracing::warn!(
                        key = slot_key(index),
                        "catch-up cursor slot this version cannot read (a later version's?); left as it is"
                    );
                    unreadable += 1;
                    slots.push(Place::Unreadable);
                }
            }
            index += 1;
        }
        // Beyond the cap: what a larger cap left. Tidying only (they are never read): a
        // removal that fails is logged, and does not keep the node from starting. A record
        // this version cannot read is left as it is here too.
        let mut at = Some(index);
        while let Some(index) = at
            && let Some(raw) = storage.meta(&slot_key(index))?
        {
            if parse_slot(&raw).is_some()
                && let Err(e) = storage.remove_meta(&slot_key(index)).await
            {
                tracing::warn!(key = slot_key(index), error = %e, "removing a catch-up cursor slot beyond the cap failed");
                break;
            }
            at = index.checked_add(1);
        }
        Ok(Self {
            slots,
            cap,
            unreadable,
            by_peer,
            clock,
        })
    }

    /// The cursor stored for `peer`, marking it used.
    pub(crate) fn get(&mut self, peer: &PeerId) -> Option<Cursor> {
        let index = *self.by_peer.get(peer)?;
        let stamp = self.tick();
        let Some(Place::Taken(slot)) = self.slots.get_mut(index) else {
            return None;
        };
        slot.used = stamp;
        Some(slot.at)
    }

    /// The cursor stored for `peer`.
    pub(crate) fn stored(&self, peer: &PeerId) -> Option<Cursor> {
        let index = *self.by_peer.get(peer)?;
        self.slots.get(index)?.slot().map(|slot| slot.at)
    }

    /// How many peers have a stored cursor.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_peer.len()
    }

    fn tick(&mut self) -> u64 {
        let stamp = self.clock;
        self.clock = self.clock.saturating_add(1);
        stamp
    }

    /// Stores `at` for `peer`, durably: in its slot, else a free one, else the least recently
    /// used peer's (returned: it has no cursor any more). Nothing changes if the write fails.
    pub(crate) async fn store(
        &mut self,
        storage: &dyn Storage,
        peer: PeerId,
        at: Cursor,
    ) -> Result<Option<PeerId>, StorageError> {
        let index = match self.by_peer.get(&peer) {
            Some(&index) => index,
            None => match self.slots.iter().position(|p| matches!(p, Place::Free)) {
                Some(free) => free,
                // Past the slots so far: free, while under the cap.
                None if self.slots.len() - self.unreadable < self.cap => {
                    self.past_the_slots(storage)?
                }
                None => {
                    let least_recent = self
                        .slots
                        .iter()
                        .enumerate()
                        .filter_map(|(i, place)| place.slot().map(|s| (s.used, i)))
                        .min();
                    match least_recent {
                        Some((_, i)) => i,
                        // Not reached: the cap is at least 1 and counts only free and taken
                        // slots, and none is free.
                        None => self.past_the_slots(storage)?,
                    }
                }
            },
        };
        let used = self.tick();
        let value = format!("{peer} {} {} {used}", at.cursor, at.log_id);
        storage.set_meta(&slot_key(index), &value).await?;
        if index == self.slots.len() {
            self.slots.push(Place::Free);
        }
        let previous = std::mem::replace(
            &mut self.slots[index],
            Place::Taken(Slot { peer, at, used }),
        );
        let evicted = previous.slot().map(|slot| slot.peer).filter(|&p| p != peer);
        if let Some(evicted) = evicted {
            self.by_peer.remove(&evicted);
        }
        self.by_peer.insert(peer, index);
        Ok(evicted)
    }

    /// The first index past the slots whose record, if any, is not unreadable: those met on
    /// the way are kept as unreadable (a lower cap's tidying leaves them, past a gap load does
    /// not read across).
    fn past_the_slots(&mut self, storage: &dyn Storage) -> Result<usize, StorageError> {
        loop {
            let index = self.slots.len();
            match storage.meta(&slot_key(index))? {
                Some(raw) if parse_slot(&raw).is_none() => {
                    self.unreadable += 1;
                    self.slots.push(Place::Unreadable);
                }
                _ => return Ok(index),
            }
        }
    }
}

/// The catch-up cursor into `peer`'s log and the log id it counts in, as a node stored them in
/// `storage` (its replica's storage), if it stored any: for diagnostics and tests. A running
/// node keeps its own copy and stores it at the end of each round (see `docs/PROTOCOL.md`,
/// P2P catch-up).
pub fn stored_peer_cursor(
    storage: &dyn Storage,
    peer: &PeerId,
) -> Result<Option<(u64, u64)>, StorageError> {
    for index in 0.. {
        let Some(raw) = storage.meta(&slot_key(index))? else {
            break;
        };
        if let Some(slot) = parse_slot(&raw)
            && slot.peer == *peer
        {
            return Ok(Some((slot.at.cursor, slot.at.log_id)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksync_storage_file::FileStorage;

    fn at(cursor: u64) -> Cursor {
        Cursor { cursor, log_id: 7 }
    }

    fn slot_records(storage: &dyn Storage) -> usize {
        (0..64)
            .filter(|&i| storage.meta(&slot_key(i)).expect("meta").is_some())
            .count()
    }

    /// More peers than the cap leave at most cap records, in a real log and after a reopen;
    /// the least recently used peer (here: the one whose session started longest ago) is the
    /// one evicted, and the order survives the reopen.
    #[tokio::test]
    async fn more_peers_than_the_cap_leave_cap_records_least_recently_used_evicted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.log");
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        {
            let storage = FileStorage::open(&path).expect("open");
            let mut cursors = PeerCursors::load(&storage, 3).await.expect("load");
            for (n, peer) in peers[..3].iter().enumerate() {
                let evicted = cursors.store(&storage, *peer, at(n as u64 + 1)).await;
                assert_eq!(evicted.expect("store"), None);
            }
            // Peer 0 is used again: peer 1 is now the least recently used.
            assert_eq!(cursors.get(&peers[0]), Some(at(1)));
            cursors
                .store(&storage, peers[0], at(10))
                .await
                .expect("store");
            let evicted = cursors.store(&storage, peers[3], at(4)).await;
            assert_eq!(evicted.expect("store"), Some(peers[1]));
            assert_eq!(cursors.stored(&peers[1]), None);
            assert_eq!(cursors.len(), 3);
            assert_eq!(slot_records(&storage), 3);
        }
        let storage = FileStorage::open(&path).expect("reopen");
        assert_eq!(slot_records(&storage), 3);
        let mut cursors = PeerCursors::load(&storage, 3).await.expect("load");
        assert_eq!(cursors.stored(&peers[0]), Some(at(10)));
        assert_eq!(cursors.stored(&peers[1]), None);
        assert_eq!(cursors.stored(&peers[2]), Some(at(3)));
        assert_eq!(cursors.stored(&peers[3]), Some(at(4)));
        assert_eq!(
            stored_peer_cursor(&storage, &peers[3]).expect("read"),
            Some((4, 7))
        );
        assert_eq!(stored_peer_cursor(&storage, &peers[1]).expect("read"), None);
        // Peer 2 was stored longest ago (before peer 0's second store): it goes next.
        let evicted = cursors.store(&storage, peers[4], at(5)).await;
        assert_eq!(evicted.expect("store"), Some(peers[2]));
        assert_eq!(cursors.len(), 3);
        assert_eq!(slot_records(&storage), 3);
    }

    /// A smaller cap than the slots stored drops the slots beyond it (their records removed).
    #[tokio::test]
    async fn a_lower_cap_removes_the_slots_beyond_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.log");
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        {
            let storage = FileStorage::open(&path).expect("open");
            let mut cursors = PeerCursors::load(&storage, 8).await.expect("load");
            for peer in &peers {
                cursors.store(&storage, *peer, at(1)).await.expect("store");
            }
            assert_eq!(slot_records(&storage), 4);
            let smaller = PeerCursors::load(&storage, 2).await.expect("load");
            assert_eq!(smaller.len(), 2);
        }
        let storage = FileStorage::open(&path).expect("reopen");
        assert_eq!(slot_records(&storage), 2);
        let cursors = PeerCursors::load(&storage, 2).await.expect("load");
        assert_eq!(cursors.stored(&peers[0]), Some(at(1)));
        assert_eq!(cursors.stored(&peers[2]), None);
    }

    /// A cap far above the peers met costs only their slots: nothing is set aside for it
    /// (`usize::MAX` used to fail to allocate at start), and slots are taken in order.
    #[tokio::test]
    async fn slots_grow_with_the_peers_not_the_cap() {
        let storage = ksync_core::InMemoryStorage::new();
        let peers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let mut cursors = PeerCursors::load(&storage, usize::MAX).await.expect("load");
        assert_eq!(cursors.slots.len(), 0);
        for (n, peer) in peers.iter().enumerate() {
            let evicted = cursors.store(&storage, *peer, at(n as u64)).await;
            assert_eq!(evicted.expect("store"), None);
        }
        assert_eq!(cursors.slots.len(), 3);
        assert_eq!(slot_records(&storage), 3);
        let reloaded = PeerCursors::load(&storage, usize::MAX).await.expect("load");
        assert_eq!(reloaded.slots.len(), 3);
        assert_eq!(reloaded.stored(&peers[2]), Some(at(2)));
        assert_eq!(reloaded.stored(&PeerId::random()), None);
    }

    /// An unreadable slot is left as it is, wherever it is: the peers take the others (as many
    /// as the cap), a lower cap's tidying keeps one beyond it, and one past a gap the tidying
    /// left is stepped over when the slots grow into it.
    #[tokio::test]
    async fn an_unreadable_slot_is_left_as_it_is() {
        let storage = ksync_core::InMemoryStorage::new();
        let unreadable = |storage: &ksync_core::InMemoryStorage, index: usize| {
            storage.meta(&slot_key(index)).expect("meta").as_deref() == Some("not a slot")
        };
        storage
            .set_meta(&slot_key(0), "not a slot")
            .await
            .expect("meta");
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let mut cursors = PeerCursors::load(&storage, 2).await.expect("load");
        assert_eq!(cursors.len(), 0);
        for peer in &peers[..3] {
            cursors.store(&storage, *peer, at(3)).await.expect("store");
        }
        assert!(unreadable(&storage, 0));
        assert_eq!(cursors.len(), 2, "the cap counts only slots of ours");
        assert_eq!(stored_peer_cursor(&storage, &peers[0]).expect("read"), None);
        assert_eq!(
            stored_peer_cursor(&storage, &peers[2]).expect("read"),
            Some((3, 7))
        );
        // Slots 0 (unreadable), 1, 2 (ours), 3 (unreadable, as a larger cap's newer version
        // might leave): a cap of 1 removes slot 2, keeps 3.
        storage
            .set_meta(&slot_key(3), "not a slot")
            .await
            .expect("meta");
        let cursors = PeerCursors::load(&storage, 1).await.expect("load");
        assert_eq!(cursors.len(), 1);
        assert!(unreadable(&storage, 0) && unreadable(&storage, 3));
        assert_eq!(storage.meta(&slot_key(2)).expect("meta"), None);
        // A cap of 3 again: slot 2 is taken, then slot 3 stepped over for slot 4.
        let mut cursors = PeerCursors::load(&storage, 3).await.expect("load");
        for peer in &peers[2..] {
            cursors.store(&storage, *peer, at(4)).await.expect("store");
        }
        assert_eq!(cursors.len(), 3);
        assert!(unreadable(&storage, 0) && unreadable(&storage, 3));
        assert_eq!(
            stored_peer_cursor(&storage, &peers[4]).expect("read"),
            Some((4, 7))
        );
        assert!(storage.meta(&slot_key(4)).expect("meta").is_some());
    }
}
