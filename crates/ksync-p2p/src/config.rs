//! Options of the P2P client: discovery, network key, limits.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::pnet::PreSharedKey;

use crate::error::P2PError;

/// How a peer finds others (the spec's `discoveryMethod`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryMethod {
    /// Multicast DNS on the local network: peers on the same LAN find each other and connect.
    Mdns,
    /// Kademlia DHT: join through the bootstrap peers (full multiaddrs ending in `/p2p/<id>`),
    /// then find others by lookups; discovered peers are dialed.
    Dht {
        /// Where to join.
        bootstrap: Vec<Multiaddr>,
    },
    /// Connect only where told (`connect_to_peer` with a full multiaddr); such peers are
    /// dialed again after a drop (see `P2PSyncClientBuilder::redial_delay`).
    Manual,
}

impl DiscoveryMethod {
    /// The spec's name: `mdns`, `dht` or `manual`.
    pub fn name(&self) -> &'static str {
        match self {
            DiscoveryMethod::Mdns => "mdns",
            DiscoveryMethod::Dht { .. } => "dht",
            DiscoveryMethod::Manual => "manual",
        }
    }
}

/// Parses the spec's names; `dht` starts with no bootstrap peers.
impl FromStr for DiscoveryMethod {
    type Err = P2PError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mdns" => Ok(DiscoveryMethod::Mdns),
            "dht" => Ok(DiscoveryMethod::Dht {
                bootstrap: Vec::new(),
            }),
            "manual" => Ok(DiscoveryMethod::Manual),
            other => Err(P2PError::Config(format!(
                "unknown discovery method {other:?} (known: mdns, dht, manual)"
            ))),
        }
    }
}

/// The pre-shared key of a private network (`encryption: true`).
///
/// Peers only complete a connection with peers that hold the same key (libp2p `pnet`): the
/// whole byte stream, handshake included, is encrypted with it before Noise runs. `Debug` and
/// `Display` show only the fingerprint.
#[derive(Clone, Copy)]
pub struct NetworkKey(PreSharedKey);

impl NetworkKey {
    /// A key from 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(PreSharedKey::new(bytes))
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        Self::from_bytes(rand::random())
    }

    /// Parses 64 hex digits, or a go-libp2p `swarm.key` file
    /// (`/key/swarm/psk/1.0.0/`, `/base16/`, hex).
    pub fn parse(text: &str) -> Result<Self, P2PError> {
        let text = text.trim();
        let hex = match text.strip_prefix("/key/") {
            // Read here rather than by libp2p-pnet's parser, which slices the hex line by
            // bytes (a multi-byte character there panicked) and takes signs as digits.
            Some(_) => match text.lines().map(str::trim).collect::<Vec<_>>()[..] {
                ["/key/swarm/psk/1.0.0/", "/base16/", hex] => hex,
                _ => {
                    return Err(P2PError::NetworkKey(
                        "not a swarm.key file (/key/swarm/psk/1.0.0/, /base16/, 64 hex digits)"
                            .into(),
                    ));
                }
            },
            None => text,
        };
        if hex.len() != 64 {
            return Err(P2PError::NetworkKey(format!(
                "expected 64 hex digits, got {} characters",
                hex.len()
            )));
        }
        let mut bytes = [0u8; 32];
        // By bytes: a 64-byte text may hold multi-byte characters (slicing it could cut one),
        // and `from_str_radix` alone would take a sign ("+1").
        for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            *byte = std::str::from_utf8(pair)
                .ok()
                .filter(|pair| pair.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| P2PError::NetworkKey("not hex".into()))?;
        }
        Ok(Self::from_bytes(bytes))
    }

    /// The key as a go-libp2p `swarm.key` file (the secret, unredacted).
    pub fn to_key_file(&self) -> String {
        self.0.to_key_file()
    }

    /// A fingerprint that identifies the key without revealing it.
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_string()
    }

    pub(crate) fn psk(&self) -> PreSharedKey {
        self.0
    }
}

impl fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkKey")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

/// Everything the node needs; filled by the builder.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub peer_id: String,
    pub discovery: DiscoveryMethod,
    pub port: u16,
    pub listen_host: IpAddr,
    pub network: String,
    pub network_key: Option<NetworkKey>,
    pub key_dir: PathBuf,
    pub anti_entropy_interval: Duration,
    pub max_peers: u32,
    /// Most peers connected from one host, and incoming handshakes from it at once (see
    /// `per_host.rs`).
    pub max_peers_per_ip: u32,
    /// Most peers whose catch-up cursor is stored (see `cursors.rs`).
    pub max_peer_cursors: usize,
    pub max_event_bytes: usize,
    /// Most bytes of catch-up answers held at once for all peers (see `Node::response_to`).
    pub max_catch_up_answer_bytes: usize,
    /// Most bytes of gossip queued to one peer (see `node::gossip_queue_len`).
    pub max_gossip_queue_bytes: usize,
    /// Most bytes of gossip queued to peers that fell behind, all together (see
    /// `node::SlowPeers`).
    pub max_gossip_total_bytes: usize,
    pub command_capacity: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Period of the `metrics` notification.
    pub metrics_interval: Duration,
    /// The spec's `debug`: gossip and catch-up logged at `debug` instead of `trace`.
    pub debug: bool,
    /// Delays between dials of a peer `connect_to_peer` reached, after it dropped (see
    /// `redial.rs`).
    pub redial_min: Duration,
    pub redial_max: Duration,
}

/// Default network name (the gossipsub topic and the sync protocol's network).
pub const DEFAULT_NETWORK: &str = "ksync";
/// Default listen host: every interface, since a peer nobody can reach syncs with nobody.
/// Tests and single-host setups pass `127.0.0.1`.
pub const DEFAULT_LISTEN_HOST: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
/// Default period of the anti-entropy round with every connected peer.
pub const DEFAULT_ANTI_ENTROPY_INTERVAL: Duration = Duration::from_secs(15);
/// Default period of the `metrics` notification (as the WebSocket client's).
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(5);
/// Default cap on established connections (all peers together).
pub const DEFAULT_MAX_PEERS: u32 = 64;
/// Default cap on the peers connected from one host (an IPv4 address or an IPv6 /64), and on
/// the incoming connections from it in their handshake at once: one machine cannot take all
/// `max_peers` slots with fresh peer ids and eclipse the node, while a machine running a few
/// peers (or a NAT in front of a few) is let in. Overflow: the connection is denied (see
/// `P2PSyncClientBuilder::max_peers_per_ip`).
pub const DEFAULT_MAX_PEERS_PER_IP: u32 = 8;
/// Default cap on the peers whose catch-up cursor is kept in the replica's metadata: beyond
/// it, the least recently used peer's cursor is dropped and that peer is walked from the
/// start of its log at its next session (nothing is lost; what we hold is not fetched again).
pub const DEFAULT_MAX_PEER_CURSORS: usize = 1024;
/// Default largest event, JSON-encoded. Larger events are refused locally and rejected from
/// peers.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;
/// Default cap on the catch-up answers this node holds at once for all peers, counted as the
/// JSON bytes of their events: an answer a requester does not read is held until
/// `request_timeout`, up to 8 per connection, so without a node-wide cap a few such peers
/// could make a node hold gigabytes; one peer's, and one host's, answers hold at most an
/// eighth of it. Overflow: a request is answered busy and asked again in a later round (see
/// `P2PSyncClientBuilder::max_catch_up_answer_bytes`).
pub const DEFAULT_MAX_CATCH_UP_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Default cap on the gossip queued to one peer, in bytes: gossipsub bounds its queue to each
/// peer only in messages (5,000 by default, each up to `max(256 KiB, max_event_bytes)` + 64
/// KiB), so a peer that stops reading could make a node hold gigabytes. The queue is never
/// shorter than 256 messages, so below 256 largest messages (80 MiB at the default event
/// limit) this does not bind. Overflow: as gossipsub's (see
/// `P2PSyncClientBuilder::max_gossip_queue_bytes`).
pub const DEFAULT_MAX_GOSSIP_QUEUE_BYTES: usize = 16 * 1024 * 1024;
/// Default cap on the gossip queued to all peers together, in bytes: each peer's queue is
/// bounded (`max_gossip_queue_bytes`, really 256 of the largest message: 80 MiB at the
/// default event limit), but 64 peers that stop reading could make a node hold 64 of them
/// (~5 GiB). A peer whose queue overflowed is counted at its queue's worst case (its length in
/// messages times the largest message gossiped recently, see `node::SlowPeers`); past this
/// bound the one that dropped the most messages is disconnected, which frees its queue (its
/// events are stored here; catch-up carries them once it connects again). See
/// `P2PSyncClientBuilder::max_gossip_total_bytes`.
pub const DEFAULT_MAX_GOSSIP_TOTAL_BYTES: usize = 256 * 1024 * 1024;
/// Default range of the delay before dialing again a peer `connect_to_peer` reached, once its
/// connection dropped: from 1 s, doubling at each failed attempt, up to 60 s (see
/// `P2PSyncClientBuilder::redial_delay`).
pub const DEFAULT_REDIAL_DELAY: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(60));
/// Default capacity of the command channel from the client handle to the node task.
pub const DEFAULT_COMMAND_CAPACITY: usize = 1024;

/// The default directory of identity key files: `$KSYNC_HOME/p2p`, else `$HOME/.ksync/p2p`,
/// else `.ksync/p2p` under the working directory.
pub fn default_key_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("KSYNC_HOME") {
        return PathBuf::from(home).join("p2p");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".ksync").join("p2p");
    }
    PathBuf::from(".ksync").join("p2p")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_keys_parse_from_hex_and_refuse_anything_else_without_panicking() {
        let hex = "00ff".repeat(16);
        let key = NetworkKey::parse(&hex).expect("64 hex digits");
        assert_eq!(
            NetworkKey::parse(&key.to_key_file())
                .expect("swarm.key")
                .fingerprint(),
            key.fingerprint()
        );
        // 64 bytes, but '€' is three of them: slicing the text by bytes cut inside it.
        let multibyte = format!("0€{}", "a".repeat(60));
        assert_eq!(multibyte.len(), 64);
        let file = |hex: &str| format!("/key/swarm/psk/1.0.0/\n/base16/\n{hex}\n");
        assert!(matches!(
            NetworkKey::parse(&file(&multibyte)),
            Err(P2PError::NetworkKey(_))
        ));
        assert!(matches!(
            NetworkKey::parse(&file(&"+1".repeat(32))),
            Err(P2PError::NetworkKey(_))
        ));
        assert!(matches!(
            NetworkKey::parse(&format!("/key/swarm/psk/1.0.0/\n/base64/\n{hex}")),
            Err(P2PError::NetworkKey(_))
        ));
        for bad in [
            multibyte.as_str(),
            &"g".repeat(64),
            &"ab".repeat(31),
            "+1".repeat(32).as_str(),
        ] {
            assert!(
                matches!(NetworkKey::parse(bad), Err(P2PError::NetworkKey(_))),
                "{bad:?}"
            );
        }
    }
}
