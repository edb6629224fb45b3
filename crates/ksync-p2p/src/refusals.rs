//! Peers refused for a while: those that announced another protocol version or network in
//! identify (see `Node::on_behaviour_event`). Such a peer is disconnected and reported once;
//! without this, discovery found it again at every period (a Kademlia lookup reaches the peers
//! in the routing table and those other peers name, an mDNS answer that expired comes back),
//! dialed it, and it was reported again, for as long as both ran.
//!
//! For [`REFUSE_FOR`] after the refusal every connection to or from the peer is denied before
//! it is used (a dial by peer id before any TCP connection is made), without a report; only a
//! dial that `connect_to_peer` asked for goes through (the user may have upgraded the peer:
//! one dial, one answer). Once the time is up the peer may be dialed again, and is refused and
//! reported again if it still speaks another version: at most one report per peer per
//! [`REFUSE_FOR`]. A refused peer that announces our version (reached by `connect_to_peer`
//! after an upgrade) is refused no longer.
//!
//! Bounded: at most [`MAX_REFUSED`] peers (identities are free to make). Overflow policy: a new
//! refusal first drops those whose time is up, then the one that ends soonest.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use tokio::time::Instant;

/// How long a peer of another version or network stays refused.
pub(crate) const REFUSE_FOR: Duration = Duration::from_secs(600);
/// Most peers refused at once (see the module's overflow policy).
pub(crate) const MAX_REFUSED: usize = 1024;

/// Why a connection was denied (the cause of libp2p's `ConnectionDenied`).
#[derive(Debug, thiserror::Error)]
#[error("peer {0} announced another protocol version or network; refused for a while")]
pub(crate) struct Refused(PeerId);

/// The refused peers, as a libp2p behaviour that denies their connections.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    /// Until when each peer is refused.
    until: HashMap<PeerId, Instant>,
    /// Dials `connect_to_peer` asked for, which go through even to a refused peer. Bounded by
    /// those connects (each waits for its answer): an id leaves when its connection is
    /// established or its dial fails.
    asked: HashSet<ConnectionId>,
}

impl Refusals {
    /// Refuses `peer` for [`REFUSE_FOR`] from `now`.
    pub(crate) fn refuse(&mut self, peer: PeerId, now: Instant) {
        if !self.until.contains_key(&peer) && self.until.len() >= MAX_REFUSED {
            self.until.retain(|_, until| *until > now);
            if self.until.len() >= MAX_REFUSED
                && let Some(soonest) = self.until.iter().min_by_key(|(_, u)| **u).map(|(p, _)| *p)
            {
                self.until.remove(&soonest);
            }
        }
        self.until.insert(peer, now + REFUSE_FOR);
    }

    /// Whether `peer` is refused at `now` (forgetting it once its time is up).
    pub(crate) fn is_refused(&mut self, peer: &PeerId, now: Instant) -> bool {
        match self.until.get(peer) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.until.remove(peer);
                false
            }
            None => false,
        }
    }

    /// Ends `peer`'s refusal: it announced our version since (the user upgraded it and
    /// reached it with `connect_to_peer`), so its next connections are let in.
    pub(crate) fn forgive(&mut self, peer: &PeerId) {
        self.until.remove(peer);
    }

    /// Lets the dial `connection` through whoever it reaches (`connect_to_peer`).
    pub(crate) fn asked_for(&mut self, connection: ConnectionId) {
        self.asked.insert(connection);
    }

    fn check(&mut self, connection: ConnectionId, peer: PeerId) -> Result<(), ConnectionDenied> {
        if self.asked.contains(&connection) || !self.is_refused(&peer, Instant::now()) {
            Ok(())
        } else {
            tracing::debug!(%peer, "connection to a refused peer denied");
            Err(ConnectionDenied::new(Refused(peer)))
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }
}

impl NetworkBehaviour for Refusals {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(connection, peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = peer {
            self.check(connection, peer)?;
        }
        Ok(Vec::new())
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let checked = self.check(connection, peer);
        self.asked.remove(&connection);
        checked?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        if let FromSwarm::DialFailure(failure) = event {
            self.asked.remove(&failure.connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal ends after `REFUSE_FOR`; a full set drops the refusals whose time is up, then
    /// the one ending soonest, never growing past `MAX_REFUSED`.
    #[test]
    fn refusals_end_and_stay_bounded() {
        let mut refusals = Refusals::default();
        let start = Instant::now();
        let first = PeerId::random();
        refusals.refuse(first, start);
        assert!(refusals.is_refused(&first, start + REFUSE_FOR - Duration::from_secs(1)));
        assert!(!refusals.is_refused(&first, start + REFUSE_FOR));
        assert_eq!(refusals.len(), 0, "forgotten once its time is up");

        let peers: Vec<PeerId> = (0..MAX_REFUSED).map(|_| PeerId::random()).collect();
        for (n, peer) in peers.iter().enumerate() {
            refusals.refuse(*peer, start + Duration::from_millis(n as u64));
        }
        assert_eq!(refusals.len(), MAX_REFUSED);
        let late = start + Duration::from_millis(MAX_REFUSED as u64);
        let newcomer = PeerId::random();
        refusals.refuse(newcomer, late);
        assert_eq!(refusals.len(), MAX_REFUSED);
        assert!(
            !refusals.is_refused(&peers[0], late),
            "the soonest to end went"
        );
        assert!(refusals.is_refused(&peers[1], late));
        assert!(refusals.is_refused(&newcomer, late));
        // Refused again, the same peer takes no second place.
        refusals.refuse(newcomer, late);
        assert_eq!(refusals.len(), MAX_REFUSED);
        // Past the time of all but the newest: a new refusal drops every one whose time is up.
        let later = late + REFUSE_FOR - Duration::from_millis(1);
        refusals.refuse(PeerId::random(), later);
        assert_eq!(refusals.len(), 2);
    }
}
