//! Peers the application connected to with `connect_to_peer`, kept connected: when such a
//! peer's last connection closes (a network blip, the peer restarting, the gossip bound
//! letting it go), it is dialed again after a delay that doubles from `redial_delay`'s `min`
//! up to its `max` with jitter ([`ksync_core::backoff_delay`]), and again after each failed
//! attempt, until it is connected or the node stops (this state is the node task's and goes
//! with it; there is no call to let one peer go). The new connection's catch-up round carries
//! what was missed meanwhile. mDNS and DHT discovery have their own ways back (see
//! docs/RELIABILITY.md); a peer they found but the application never asked for is not kept.
//!
//! The attempt count starts again after a connection that stayed up for `max`, so a peer
//! that is let in and dropped at once (a full node, a refusal) is not dialed in a tight loop.
//!
//! Bounded: at most [`MAX_KEPT_PEERS`] peers, each with at most [`MAX_KEPT_ADDRS`] addresses.
//! Overflow policy: a new peer replaces the one least recently asked for among those not
//! connected (or, if all are, among all).

use std::collections::HashMap;
use std::time::Duration;

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use tokio::time::Instant;

/// Most peers kept connected (see the module's overflow policy).
pub(crate) const MAX_KEPT_PEERS: usize = 256;
/// Most addresses remembered per kept peer (newest first; the behaviours know others).
pub(crate) const MAX_KEPT_ADDRS: usize = 8;

#[derive(Debug)]
struct Kept {
    /// Where it was reached, newest first.
    addrs: Vec<Multiaddr>,
    /// When the application last asked for it (a counter, for the overflow policy).
    asked: u64,
    /// Since when it is connected (`None`: not connected).
    connected_since: Option<Instant>,
    /// Attempts since the last connection that stayed up for `max`.
    attempt: u32,
    /// When to dial it next (`None`: connected, or a dial of ours is in flight).
    due: Option<Instant>,
    /// Our dial in flight, whose failure schedules the next one.
    dialing: Option<ConnectionId>,
}

#[derive(Debug)]
pub(crate) struct Redials {
    peers: HashMap<PeerId, Kept>,
    asked: u64,
    min: Duration,
    max: Duration,
}

impl Redials {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self {
            peers: HashMap::new(),
            asked: 0,
            min,
            max,
        }
    }

    /// `connect_to_peer` reached `peer` (connected now), at `addr` when we dialed it.
    pub(crate) fn keep(&mut self, peer: PeerId, addr: Option<Multiaddr>, now: Instant) {
        self.asked += 1;
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_KEPT_PEERS {
            let evict = self
                .peers
                .iter()
                .min_by_key(|(_, k)| (k.connected_since.is_some(), k.asked))
                .map(|(p, _)| *p);
            if let Some(evict) = evict {
                self.peers.remove(&evict);
            }
        }
        let kept = self.peers.entry(peer).or_insert_with(|| Kept {
            addrs: Vec::new(),
            asked: 0,
            connected_since: Some(now),
            attempt: 0,
            due: None,
            dialing: None,
        });
        kept.asked = self.asked;
        if kept.connected_since.is_none() {
            kept.connected_since = Some(now);
        }
        kept.due = None;
        kept.dialing = None;
        if let Some(addr) = addr {
            kept.addrs.retain(|a| *a != addr);
            kept.addrs.insert(0, addr);
            kept.addrs.truncate(MAX_KEPT_ADDRS);
        }
    }

    /// A first connection to `peer` is up (ours or theirs).
    pub(crate) fn connected(&mut self, peer: &PeerId, now: Instant) {
        if let Some(kept) = self.peers.get_mut(peer) {
            kept.connected_since = Some(now);
            kept.due = None;
            kept.dialing = None;
        }
    }

    /// `peer`'s last connection closed: dial it again after the next delay.
    pub(crate) fn disconnected(&mut self, peer: &PeerId, now: Instant, jitter: f64) {
        let (min, max) = (self.min, self.max);
        if let Some(kept) = self.peers.get_mut(peer) {
            if kept
                .connected_since
                .is_some_and(|since| now.saturating_duration_since(since) >= max)
            {
                kept.attempt = 0;
            }
            kept.connected_since = None;
            kept.dialing = None;
            schedule(kept, min, max, now, jitter);
        }
    }

    /// Our dial `id` of `peer` failed (or could not start: `id` `None`): the next one after
    /// a longer delay. A failure of another dial of the peer changes nothing.
    pub(crate) fn dial_failed(
        &mut self,
        peer: &PeerId,
        id: Option<ConnectionId>,
        now: Instant,
        jitter: f64,
    ) {
        let (min, max) = (self.min, self.max);
        if let Some(kept) = self.peers.get_mut(peer)
            && kept.connected_since.is_none()
            && kept.due.is_none()
            && kept.dialing == id
        {
            kept.dialing = None;
            schedule(kept, min, max, now, jitter);
        }
    }

    /// Our dial `id` of `peer` is in flight.
    pub(crate) fn dialing(&mut self, peer: &PeerId, id: ConnectionId) {
        if let Some(kept) = self.peers.get_mut(peer) {
            kept.dialing = Some(id);
        }
    }

    /// When the next dial is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.peers.values().filter_map(|k| k.due).min()
    }

    /// The peers due to be dialed by `now`, with their addresses; each waits for its dial's
    /// outcome (`dialing`, then `connected` or `dial_failed`) before another is due.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut due = Vec::new();
        for (peer, kept) in &mut self.peers {
            if kept.due.is_some_and(|at| at <= now) {
                kept.due = None;
                due.push((*peer, kept.addrs.clone()));
            }
        }
        due
    }
}

fn schedule(kept: &mut Kept, min: Duration, max: Duration, now: Instant, jitter: f64) {
    kept.attempt = kept.attempt.saturating_add(1);
    let delay = ksync_core::backoff_delay(min, max, kept.attempt, jitter);
    kept.due = Some(now + delay);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{port}").parse().expect("addr")
    }

    #[test]
    fn a_dropped_peer_is_due_after_a_doubling_delay_and_a_connection_ends_it() {
        let mut r = Redials::new(MIN, MAX);
        let (peer, t0) = (PeerId::random(), Instant::now());
        r.keep(peer, Some(addr(1)), t0);
        assert_eq!(r.next_due(), None, "connected: nothing due");
        r.disconnected(&peer, t0, 0.0);
        assert_eq!(r.next_due(), Some(t0 + MIN));
        assert!(r.take_due(t0).is_empty());
        let due = r.take_due(t0 + MIN);
        assert_eq!(due, vec![(peer, vec![addr(1)])]);
        assert_eq!(r.next_due(), None, "one dial at a time");
        let id = ConnectionId::new_unchecked(7);
        r.dialing(&peer, id);
        // Another dial of the peer failing does not schedule one more.
        r.dial_failed(&peer, Some(ConnectionId::new_unchecked(8)), t0 + MIN, 0.0);
        assert_eq!(r.next_due(), None);
        r.dial_failed(&peer, Some(id), t0 + MIN, 0.0);
        assert_eq!(r.next_due(), Some(t0 + 3 * MIN), "2 s after the failure");
        r.take_due(t0 + 3 * MIN);
        r.dial_failed(&peer, None, t0 + 3 * MIN, 1.0);
        assert_eq!(
            r.next_due(),
            Some(t0 + 5 * MIN),
            "half of 4 s at most jitter"
        );
        r.connected(&peer, t0 + 4 * MIN);
        assert_eq!(r.next_due(), None);
        // Dropped again soon after: the count goes on (8 s).
        r.disconnected(&peer, t0 + 5 * MIN, 0.0);
        assert_eq!(r.next_due(), Some(t0 + 13 * MIN));
        // Up for `MAX`: from `MIN` again.
        r.connected(&peer, t0 + 6 * MIN);
        r.disconnected(&peer, t0 + 6 * MIN + MAX, 0.0);
        assert_eq!(r.next_due(), Some(t0 + 7 * MIN + MAX));
    }

    #[test]
    fn peers_never_asked_for_are_not_dialed() {
        let mut r = Redials::new(MIN, MAX);
        let t0 = Instant::now();
        let stranger = PeerId::random();
        r.connected(&stranger, t0);
        r.disconnected(&stranger, t0, 0.0);
        r.dial_failed(&stranger, None, t0, 0.0);
        assert_eq!(r.next_due(), None);
    }

    #[test]
    fn past_the_bound_the_least_recently_asked_for_unconnected_peer_goes() {
        let mut r = Redials::new(MIN, MAX);
        let t0 = Instant::now();
        let peers: Vec<PeerId> = (0..MAX_KEPT_PEERS).map(|_| PeerId::random()).collect();
        for p in &peers {
            r.keep(*p, None, t0);
        }
        // The first two are gone; the second was asked for again since.
        r.disconnected(&peers[0], t0, 0.0);
        r.disconnected(&peers[1], t0, 0.0);
        r.keep(peers[1], None, t0);
        r.disconnected(&peers[1], t0, 0.0);
        let newcomer = PeerId::random();
        r.keep(newcomer, None, t0);
        assert_eq!(r.peers.len(), MAX_KEPT_PEERS);
        assert!(!r.peers.contains_key(&peers[0]));
        assert!(r.peers.contains_key(&peers[1]));
        // All connected: the least recently asked for goes.
        r.keep(peers[1], None, t0);
        r.keep(peers[0], None, t0);
        assert!(!r.peers.contains_key(&peers[2]));
        assert_eq!(r.peers.len(), MAX_KEPT_PEERS);
        // At most `MAX_KEPT_ADDRS` addresses, the newest first.
        for port in 0..20 {
            r.keep(newcomer, Some(addr(port)), t0);
        }
        let kept = &r.peers[&newcomer].addrs;
        assert_eq!(kept.len(), MAX_KEPT_ADDRS);
        assert_eq!(kept[0], addr(19));
    }
}
