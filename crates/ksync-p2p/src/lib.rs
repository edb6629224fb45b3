//! kSync peer-to-peer sync over libp2p: the spec's `P2PSyncClient`.
//!
//! - **Live broadcast**: gossipsub, one topic per network name ([`gossip_topic`]). Messages are
//!   signed (strict validation); a busy sender packs many events into one message. The id
//!   of a one-event message comes from the event's `(id, version)` so a revision published
//!   again dies in the seen-cache; a batch is identified by its publisher and sequence number
//!   without parsing it. Every message is validated before it is forwarded, and malformed or
//!   oversized ones are rejected, which lowers the sender's score until it is ignored.
//!   Forwards wait a moment so peers that already hold a message say so (IDONTWANT) and are
//!   spared the copy.
//! - **Catch-up**: request-response anti-entropy. On every new connection and periodically, a
//!   peer walks each neighbour's log page by page from a stored cursor, fetches the revisions
//!   it lacks and ingests them through [`ksync_core::Replica::ingest`]. A late or restarted
//!   peer converges even when gossip dropped messages.
//! - **Discovery**: [`DiscoveryMethod::Mdns`] (LAN), [`DiscoveryMethod::Dht`] (Kademlia with
//!   bootstrap peers), [`DiscoveryMethod::Manual`].
//! - **Encryption**: always Noise hop by hop; with `encryption(true)` the network is private
//!   (libp2p `pnet` pre-shared key, see [`NetworkKey`]).
//! - **Identity**: an ed25519 key generated once and kept in a key file, so the node's
//!   [`PeerId`] and addresses survive restarts.
//!
//! Wire details: `docs/PROTOCOL.md`, section "P2P".

mod client;
mod codec;
mod config;
mod cursors;
mod digests;
mod error;
mod identity;
mod node;
mod per_host;
mod redial;
mod refusals;
mod shaping;
mod transport;
mod wire;

pub use client::{MAX_CONFIG_DURATION, P2PStats, P2PSyncClient, P2PSyncClientBuilder};
pub use config::{
    DEFAULT_ANTI_ENTROPY_INTERVAL, DEFAULT_COMMAND_CAPACITY, DEFAULT_LISTEN_HOST,
    DEFAULT_MAX_CATCH_UP_ANSWER_BYTES, DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_GOSSIP_QUEUE_BYTES,
    DEFAULT_MAX_GOSSIP_TOTAL_BYTES, DEFAULT_MAX_PEER_CURSORS, DEFAULT_MAX_PEERS,
    DEFAULT_MAX_PEERS_PER_IP, DEFAULT_NETWORK, DEFAULT_REDIAL_DELAY, DiscoveryMethod, NetworkKey,
    default_key_dir,
};
pub use cursors::stored_peer_cursor;
pub use error::P2PError;
pub use libp2p::{Multiaddr, PeerId};
pub use wire::gossip_topic;
