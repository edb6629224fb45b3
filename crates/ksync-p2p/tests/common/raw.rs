//! The catch-up protocol `/ksync/sync/1` as a raw libp2p peer speaks it: CBOR, with the
//! message shapes of docs/PROTOCOL.md written out here (not the crate's own types), so the
//! tests check the document as much as the code.

use std::time::Duration;

use futures_util::StreamExt;
use ksync_core::{Event, RevisionKey};
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Keys {
        network: String,
        after: u64,
        limit: u32,
    },
    Fetch {
        network: String,
        keys: Vec<RevisionKey>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub id: String,
    pub version: u64,
    pub hash: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    Keys {
        log_id: u64,
        len: u64,
        entries: Vec<Entry>,
        /// Where the page ends; absent from peers that list every revision.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        through: Option<u64>,
    },
    Events {
        events: Vec<Event>,
        too_large: Vec<RevisionKey>,
    },
    /// Refused; `busy`: over the node's budget for answers in flight, ask again later.
    Refused {
        reason: String,
        #[serde(default)]
        busy: bool,
    },
    /// Not a message of the protocol.
    Bogus(u64),
}

/// PROTOCOL's catch-up digest: FNV-1a (64) of `type`, NUL, `timestamp` (8 bytes big-endian)
/// and `data` as compact JSON.
pub fn digest(event: &Event) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let data = serde_json::to_vec(&event.data).expect("encode");
    for b in event
        .event_type
        .as_bytes()
        .iter()
        .chain([0u8].iter())
        .chain(event.timestamp.to_be_bytes().iter())
        .chain(data.iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub fn entry(seq: u64, event: &Event, hash: u64) -> Entry {
    Entry {
        seq,
        id: event.id.clone(),
        version: event.version,
        hash,
    }
}

/// A raw peer's swarm.
pub type RawSwarm =
    Swarm<request_response::Behaviour<request_response::cbor::codec::Codec<Request, Response>>>;

/// A libp2p swarm of its own identity over TCP (Noise, Yamux) with `behaviour`, not
/// listening yet: the raw peers these tests play, whatever they speak.
pub fn swarm<B: NetworkBehaviour>(behaviour: impl FnOnce(&Keypair) -> B) -> Swarm<B> {
    swarm_of(Keypair::generate_ed25519(), behaviour)
}

/// [`swarm`] with the identity `key` (the same peer again, e.g. upgraded).
pub fn swarm_of<B: NetworkBehaviour>(
    key: Keypair,
    behaviour: impl FnOnce(&Keypair) -> B,
) -> Swarm<B> {
    SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(behaviour)
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// A raw peer listening on 127.0.0.1:0, and its full address (with `/p2p/`).
pub async fn raw_peer() -> (RawSwarm, Multiaddr) {
    let mut swarm = swarm(|_| {
        // Room to send answers larger than any honest peer's.
        let codec = request_response::cbor::codec::Codec::<Request, Response>::default()
            .set_response_size_maximum(64 * 1024 * 1024);
        request_response::Behaviour::with_codec(
            codec,
            [(StreamProtocol::new("/ksync/sync/1"), ProtocolSupport::Full)],
            // Holds an unanswered request open as long as the requester waits.
            request_response::Config::default().with_request_timeout(Duration::from_secs(60)),
        )
    });
    let listen = super::listen_on_loopback(&mut swarm).await;
    let addr = listen.with(libp2p::multiaddr::Protocol::P2p(*swarm.local_peer_id()));
    (swarm, addr)
}

/// The next answer to one of our requests that `ours` accepts, or why it failed. Meanwhile,
/// requests the peer under test makes of us (an honest peer asks every peer it meets for its
/// pages) are answered as by a peer with an empty log.
pub async fn next_answer(
    swarm: &mut RawSwarm,
    ours: impl Fn(&OutboundRequestId) -> bool,
) -> (OutboundRequestId, Result<Response, OutboundFailure>) {
    loop {
        let SwarmEvent::Behaviour(event) = swarm.select_next_some().await else {
            continue;
        };
        match event {
            request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            } => {
                let empty = Response::Keys {
                    log_id: 1,
                    len: 0,
                    entries: Vec::new(),
                    through: Some(0),
                };
                let _ = swarm.behaviour_mut().send_response(channel, empty);
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } if ours(&request_id) => return (request_id, Ok(response)),
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } if ours(&request_id) => return (request_id, Err(error)),
            _ => {}
        }
    }
}
