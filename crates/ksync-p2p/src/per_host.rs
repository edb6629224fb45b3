//! At most `max_peers_per_ip` peers from one host, and as many connections from it being set
//! up at once: without this one machine could take every connection slot with fresh peer ids
//! (identities are free to make), so that the node synced only with it and refused honest
//! peers (an eclipse), or hold every pending-incoming slot with handshakes it never finishes.
//!
//! - A host is an IPv4 address (an IPv4-mapped IPv6 address is that IPv4 address) or an IPv6
//!   /64 prefix: one machine is usually given a whole /64 and may take any address in it.
//!   A connection whose remote address holds no IP is not counted.
//! - Established connections, both ways (a discovery answer can name many ids at one
//!   address, and we would dial them all), count distinct peers: a peer's second connection
//!   (a simultaneous dial) is let in whenever its first is. A connection from a new peer of a
//!   host that has `max` peers connected is denied once its handshake is done (the peer id is
//!   known only then). A dial `connect_to_peer` asked for is capped too: its error names
//!   `max_peers_per_ip`.
//! - Incoming connections still in their handshake: at most `max` per host; beyond it a
//!   connection is closed as soon as it is accepted, before any handshake work, so it never
//!   takes one of the node's pending slots.
//! - Loopback is counted like any host (several peers on one machine share 127.0.0.1): the
//!   default is well above what a machine runs, and a test can check the cap on loopback.
//! - Overflow policy of the refusals' logs: the first refusal of a host is a `warn`, later
//!   ones `debug`, until the host holds nothing (its entry goes): at most one warning per host
//!   each time it fills its share, however fast it retries.
//!
//! Bounded: an entry per host holding a pending or established connection, so at most the
//! node's pending plus established connections.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::Ipv4Addr;
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};

/// One host for the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Host {
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 address.
    V6([u16; 4]),
}

impl Host {
    /// The host of a remote address; `None` when it holds no IP.
    pub(crate) fn of(addr: &Multiaddr) -> Option<Host> {
        match addr.iter().next()? {
            Protocol::Ip4(ip) => Some(Host::V4(ip)),
            Protocol::Ip6(ip) => Some(match ip.to_ipv4_mapped() {
                Some(v4) => Host::V4(v4),
                None => {
                    let s = ip.segments();
                    Host::V6([s[0], s[1], s[2], s[3]])
                }
            }),
            _ => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::V4(ip) => write!(f, "{ip}"),
            Host::V6([a, b, c, d]) => write!(f, "{a:x}:{b:x}:{c:x}:{d:x}::/64"),
        }
    }
}

/// Why a connection was denied (the cause of libp2p's `ConnectionDenied`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Exceeded {
    #[error("{max} connections from {host} are being set up already (max_peers_per_ip)")]
    Pending { host: Host, max: u32 },
    #[error("{max} peers from {host} are connected already (max_peers_per_ip)")]
    Established { host: Host, max: u32 },
}

#[derive(Debug, Default)]
struct HostState {
    /// Incoming connections in their handshake.
    pending: u32,
    /// Established connections per peer.
    peers: HashMap<PeerId, u32>,
    /// A refusal of this host was logged as a warning.
    warned: bool,
}

/// The per-host cap, as a libp2p behaviour that denies connections over it.
#[derive(Debug)]
pub(crate) struct PerHostLimits {
    max: u32,
    hosts: HashMap<Host, HostState>,
    pending: HashMap<ConnectionId, Host>,
    established: HashMap<ConnectionId, (Host, PeerId)>,
}

impl PerHostLimits {
    /// At most `max` peers, and `max` incoming handshakes, per host (0 counts as 1).
    pub(crate) fn new(max: u32) -> Self {
        Self {
            max: max.max(1),
            hosts: HashMap::new(),
            pending: HashMap::new(),
            established: HashMap::new(),
        }
    }

    fn refuse(&mut self, host: Host, why: Exceeded) -> ConnectionDenied {
        let state = self.hosts.entry(host).or_default();
        if state.warned {
            tracing::debug!(%host, "connection denied: {why}");
        } else {
            state.warned = true;
            tracing::warn!(%host, "connection denied: {why}; later refusals of this host are logged at debug");
        }
        ConnectionDenied::new(why)
    }

    fn check_established(
        &mut self,
        peer: PeerId,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(host) = Host::of(remote) else {
            return Ok(());
        };
        let full = self.hosts.get(&host).is_some_and(|state| {
            !state.peers.contains_key(&peer) && state.peers.len() >= self.max as usize
        });
        if full {
            let max = self.max;
            return Err(self.refuse(host, Exceeded::Established { host, max }));
        }
        Ok(())
    }

    fn end_pending(&mut self, connection: ConnectionId) {
        if let Some(host) = self.pending.remove(&connection)
            && let Some(state) = self.hosts.get_mut(&host)
        {
            state.pending = state.pending.saturating_sub(1);
            self.tidy(host);
        }
    }

    /// Forgets `host` once it holds nothing.
    fn tidy(&mut self, host: Host) {
        if self
            .hosts
            .get(&host)
            .is_some_and(|state| state.pending == 0 && state.peers.is_empty())
        {
            self.hosts.remove(&host);
        }
    }

    #[cfg(test)]
    fn hosts(&self) -> usize {
        self.hosts.len()
    }
}

impl NetworkBehaviour for PerHostLimits {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(host) = Host::of(remote) else {
            return Ok(());
        };
        let state = self.hosts.entry(host).or_default();
        if state.pending >= self.max {
            let max = self.max;
            return Err(self.refuse(host, Exceeded::Pending { host, max }));
        }
        state.pending += 1;
        self.pending.insert(connection, host);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.end_pending(connection);
        self.check_established(peer, remote)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        remote: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check_established(peer, remote)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            // Counted here, not when checked: a behaviour after this one may still deny it.
            FromSwarm::ConnectionEstablished(established) => {
                if let Some(host) = Host::of(established.endpoint.get_remote_address()) {
                    *self
                        .hosts
                        .entry(host)
                        .or_default()
                        .peers
                        .entry(established.peer_id)
                        .or_insert(0) += 1;
                    self.established
                        .insert(established.connection_id, (host, established.peer_id));
                }
            }
            FromSwarm::ConnectionClosed(closed) => {
                if let Some((host, peer)) = self.established.remove(&closed.connection_id)
                    && let Some(state) = self.hosts.get_mut(&host)
                {
                    if let Some(count) = state.peers.get_mut(&peer) {
                        *count = count.saturating_sub(1);
                        if *count == 0 {
                            state.peers.remove(&peer);
                        }
                    }
                    self.tidy(host);
                }
            }
            // Denied by another behaviour, or the handshake failed or timed out.
            FromSwarm::ListenFailure(failure) => self.end_pending(failure.connection_id),
            _ => {}
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

    #[test]
    fn hosts_are_ipv4_addresses_and_ipv6_64s() {
        let host = |a: &str| Host::of(&a.parse().expect("multiaddr"));
        assert_eq!(
            host("/ip6/::ffff:10.0.0.1/tcp/1"),
            host("/ip4/10.0.0.1/tcp/2"),
            "an IPv4-mapped address is its IPv4 host"
        );
        assert_eq!(
            host("/ip6/2001:db8:1:2:aaaa::1/tcp/1"),
            host("/ip6/2001:db8:1:2:bbbb::2/tcp/1"),
            "one /64"
        );
        assert_ne!(
            host("/ip6/2001:db8:1:2::1/tcp/1"),
            host("/ip6/2001:db8:1:3::1/tcp/1")
        );
        assert_eq!(host("/memory/1"), None);
        assert_eq!(
            host("/ip6/2001:db8:1:2::1/tcp/1").map(|h| h.to_string()),
            Some("2001:db8:1:2::/64".to_owned())
        );
    }

    /// Pending handshakes are capped per host and given back however they end; entries go
    /// once a host holds nothing.
    #[test]
    fn pending_handshakes_per_host_are_capped_and_given_back() {
        let mut limits = PerHostLimits::new(2);
        let local: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("addr");
        let attacker: Multiaddr = "/ip4/10.0.0.1/tcp/9".parse().expect("addr");
        let other: Multiaddr = "/ip4/10.0.0.2/tcp/9".parse().expect("addr");
        let ids: Vec<ConnectionId> = (1..=4).map(ConnectionId::new_unchecked).collect();
        assert!(
            limits
                .handle_pending_inbound_connection(ids[0], &local, &attacker)
                .is_ok()
        );
        assert!(
            limits
                .handle_pending_inbound_connection(ids[1], &local, &attacker)
                .is_ok()
        );
        assert!(
            limits
                .handle_pending_inbound_connection(ids[2], &local, &attacker)
                .is_err(),
            "the host's third handshake"
        );
        assert!(
            limits
                .handle_pending_inbound_connection(ids[3], &local, &other)
                .is_ok(),
            "another host"
        );
        let peer = PeerId::random();
        assert!(
            limits
                .handle_established_inbound_connection(ids[0], peer, &local, &attacker)
                .is_ok()
        );
        limits.end_pending(ids[1]);
        limits.end_pending(ids[3]);
        assert_eq!(
            limits.hosts(),
            0,
            "nothing held (the accepted one never reported)"
        );
    }
}
