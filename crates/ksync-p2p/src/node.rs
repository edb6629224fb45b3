//! The node task: owns the libp2p swarm, publishes broadcasts, validates and ingests gossip,
//! runs catch-up (anti-entropy) with every peer, and reports to the notifier.
//!
//! The client handle talks to it through one bounded command channel (see
//! [`crate::config::DEFAULT_COMMAND_CAPACITY`]); everything else the node touches (the replica,
//! the notifier, the shared state) is shared memory.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use ksync_core::{
    Event, EventLimits, MeterTotals, MetricsMeter, Notification, Notifier, Replica, RevisionKey,
    Status, SyncError, debug_log,
};
use libp2p::core::ConnectedPoint;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{
    self, InboundRequestId, OutboundRequestId, ProtocolSupport, ResponseChannel,
};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, connection_limits, identify, kad, mdns,
    ping,
};
use tokio::sync::{mpsc, oneshot};

use crate::codec::CountingCodec;
use crate::config::{DiscoveryMethod, Options};
use crate::cursors::{Cursor, PeerCursors};
use crate::digests::{Digests, Page};
use crate::error::P2PError;
use crate::per_host::{Host, PerHostLimits};
use crate::redial::Redials;
use crate::refusals::Refusals;
use crate::shaping::Shaping;
use crate::transport::{self, BoxError};
use crate::wire::{
    self, KeyEntry, MAX_FETCH, MAX_PAGE, MAX_PAGE_SCAN, MAX_SYNC_STREAMS, RESPONSE_BUDGET,
    SyncRequest, SyncResponse,
};

/// Largest batch of events packed into one gossip message, in encoded bytes (never less than
/// one maximal event).
const MIN_BATCH_BYTES: usize = 256 * 1024;
/// Most events in one gossip message.
const MAX_BATCH_EVENTS: usize = 2048;
/// Under load, broadcasts are collected this long after the previous publish, so one signed
/// message carries many events; an idle node publishes at once.
const BATCH_LINGER: Duration = Duration::from_millis(2);
/// Room for the gossipsub envelope (signature, key, topic, framing) on top of a batch.
const ENVELOPE_BYTES: usize = 64 * 1024;
/// Accepted gossip is forwarded this long after it was validated: the peers that got it
/// directly meanwhile announce so (IDONTWANT) and are skipped. In a dense mesh (every peer
/// hears the publisher) that saves most duplicate copies; a hop costs this much latency.
const FORWARD_HOLD: Duration = Duration::from_millis(20);
/// Most accepted messages waiting for their forward. Overflow policy: the oldest is forwarded
/// at once (never dropped).
const MAX_HELD_FORWARDS: usize = 4096;
/// Most payloads, and bytes of them, kept while no peer is subscribed to the topic (see
/// `Node::keep_unsent`). Overflow policy: the oldest is dropped (catch-up carries its events).
const MAX_UNSENT_PAYLOADS: usize = 64;
const MAX_UNSENT_BYTES: usize = 1024 * 1024;
/// Most events of our own log digested per catch-up step (see `Digests::refresh`): a long
/// log is digested over several steps instead of stalling the node once.
const DIGEST_STEP: usize = 16 * 1024;
/// How long a catch-up session leaves keys of its page to another session's fetch before it
/// fetches them itself: a peer that lists what others hold and never sends it delays them by
/// this much, not by the request timeout.
const IN_FLIGHT_PATIENCE: Duration = Duration::from_secs(1);
/// Most `Keys` pages one catch-up round asks one peer for, whatever its log length says. An
/// honest page that is not the end of the log covers at least `MAX_PAGE` sequence numbers (see
/// `check_page`), so this walks at least a million events per round; a peer that claims an
/// endless log (answering `len = u64::MAX` with pages that do advance) costs this many
/// requests per round, not an endless walk. Overflow policy: the round ends, its cursor is
/// stored, and the next round walks on from it.
const MAX_ROUND_PAGES: u32 = 1024;
/// Pages a round may take beyond what the first answer's `len` says it needs: a restarted
/// walk, the end-of-log page, and what the log grows by during the round (a log growing faster
/// than we walk it is left to the next round, not chased).
const ROUND_SLACK_PAGES: u64 = 16;
/// A long round stores its cursor every this many pages (besides at its end), so a crash
/// costs at most this many pages walked again. Each store is a durable meta record, so it is
/// not done per page.
const CURSOR_SAVE_PAGES: u32 = 64;
/// Most queued commands handled in one turn of the node loop.
const COMMAND_DRAIN: usize = 256;
/// Listening on every interface, `start` waits this long after each reported address for
/// the next interface's (they come in quick succession).
const LISTEN_SETTLE: Duration = Duration::from_millis(100);
/// How often mDNS asks the LAN who is there.
const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(10);

/// Idle connections close after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Most connections being set up at once, each way.
const MAX_PENDING: u32 = 32;
/// Most connections to one peer (a simultaneous dial makes two).
const MAX_PER_PEER: u32 = 2;

/// What the client handle asks of the node.
pub(crate) enum Command {
    /// Publish this (already stored, already encoded) event.
    Broadcast(Vec<u8>),
    /// Connect to a peer.
    Connect {
        target: Target,
        reply: oneshot::Sender<Result<PeerId, P2PError>>,
    },
    /// Run a catch-up round with every connected peer now.
    SyncNow,
    /// The gossipsub score of a peer.
    PeerScore {
        peer: PeerId,
        reply: oneshot::Sender<Option<f64>>,
    },
    /// Stop the node.
    Shutdown,
}

/// Where `connect_to_peer` goes.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Peer(PeerId),
    Addr(Multiaddr),
    /// The spec's `peerId` of a peer this node has met (announced in identify).
    Name(String),
}

/// Most peer names remembered for `connect_to_peer(name)`. Overflow policy: a new name
/// replaces one of a peer that is not connected (or, if all are, an arbitrary one).
const MAX_KNOWN_NAMES: usize = 1024;
/// Most addresses remembered per named peer.
const MAX_NAME_ADDRS: usize = 8;

/// Most addresses Kademlia keeps per peer. libp2p-kad's entry takes every address it is
/// given (`Addresses::insert` has no cap), keeps it while the peer is in the table, answers
/// every lookup with all of them, and a peer that looks it up dials them all; a peer may
/// announce hundreds in one identify message (4 KiB) and new ones in every identify push.
/// Overflow policy: the address of a connection we dialed to the peer is never dropped (we
/// know it works), nor those of the latest announcement (at most `MAX_KAD_ADDRS` of it,
/// reachable ones first); past that the entry's oldest go, so a peer that moved is found at
/// its new address.
const MAX_KAD_ADDRS: usize = 8;

/// `addr` without a trailing `/p2p/<peer id>` (an entry may hold either form).
fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if let Some(Protocol::P2p(_)) = addr.iter().last() {
        addr.pop();
    }
    addr
}

/// Whether `addr` is loopback or link-local: reachable only from this host or link.
fn is_local_only(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback() || ip.is_link_local(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback() || (ip.segments()[0] & 0xffc0) == 0xfe80,
        _ => false,
    }
}

/// Adds `addrs` (at most [`MAX_KAD_ADDRS`] of them: `connected` ones first, then, unless
/// `on_loopback`, ones not loopback or link-local) to `peer`'s Kademlia entry, then drops its
/// oldest addresses beyond [`MAX_KAD_ADDRS`], never one in `connected` (addresses of our
/// dialed connections to it) nor one just added (announced again: fresh, not stale). (An entry
/// waiting for room in a full bucket is not in the table yet and not trimmed; it is replaced
/// or dropped when it gets in or not.)
fn add_kad_addresses(
    kad: &mut kad::Behaviour<kad::store::MemoryStore>,
    peer: &PeerId,
    addrs: impl IntoIterator<Item = Multiaddr>,
    connected: &[Multiaddr],
    on_loopback: bool,
) {
    let is_connected = |a: &Multiaddr| connected.contains(&without_peer_id(a));
    let mut added: Vec<Multiaddr> = addrs.into_iter().collect();
    // Stable: the announcement's order otherwise.
    added.sort_by_key(|a| (!is_connected(a), !on_loopback && is_local_only(a)));
    added.truncate(MAX_KAD_ADDRS);
    let added: Vec<Multiaddr> = added.iter().map(without_peer_id).collect();
    for addr in &added {
        kad.add_address(peer, addr.clone());
    }
    let held: Vec<Multiaddr> = kad
        .kbucket(*peer)
        .and_then(|bucket| {
            bucket
                .iter()
                .find(|entry| entry.node.key.preimage() == peer)
                .map(|entry| entry.node.value.iter().cloned().collect())
        })
        .unwrap_or_default();
    // Oldest first; what is kept never empties the entry (which would drop the peer).
    let mut excess = held.len().saturating_sub(MAX_KAD_ADDRS);
    for old in &held {
        if excess == 0 {
            break;
        }
        if is_connected(old) || added.contains(&without_peer_id(old)) {
            continue;
        }
        kad.remove_address(peer, old);
        excess -= 1;
    }
}

/// Counters the node keeps; read with `P2PSyncClient::stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub published_messages: AtomicU64,
    pub published_events: AtomicU64,
    pub accepted_messages: AtomicU64,
    pub rejected_messages: AtomicU64,
    pub gossip_events: AtomicU64,
    pub catch_up_events: AtomicU64,
    pub new_events: AtomicU64,
    pub duplicate_events: AtomicU64,
    pub catch_up_rounds: AtomicU64,
    /// Catch-up requests answered busy (see `AnswerBudget`).
    pub busy_answers: AtomicU64,
    /// Dials of peers kept connected after their connection dropped (see `redial.rs`).
    pub redials: AtomicU64,
    /// Gossip payload bytes published and received (for `metrics`).
    pub gossip_bytes: AtomicU64,
    /// Catch-up requests and answers sent and received, as encoded on their streams (for
    /// `metrics`). Shared with the catch-up codec, which counts on the connections' tasks.
    pub catch_up_bytes: Arc<AtomicU64>,
    /// Ping round trips measured, and their sum in microseconds (for `metrics`).
    pub pings: AtomicU64,
    pub ping_micros: AtomicU64,
}

/// Target of this file's [`debug_log!`] lines, fixed because users filter on it.
const LOG_TARGET: &str = "ksync_p2p::node";

impl Counters {
    /// The running totals `metrics` reports on: events published or newly stored, gossip
    /// and catch-up bytes, ping round trips.
    fn meter_totals(&self) -> MeterTotals {
        MeterTotals {
            events: self
                .published_events
                .load(Ordering::Relaxed)
                .saturating_add(self.new_events.load(Ordering::Relaxed)),
            bytes: self
                .gossip_bytes
                .load(Ordering::Relaxed)
                .saturating_add(self.catch_up_bytes.load(Ordering::Relaxed)),
            round_trips: self.pings.load(Ordering::Relaxed),
            round_trip_micros: self.ping_micros.load(Ordering::Relaxed),
        }
    }
}

/// State the node publishes for the handle to read without a round trip.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub listen_addrs: Mutex<Vec<Multiaddr>>,
    pub peers: Mutex<BTreeSet<PeerId>>,
    pub counters: Counters,
}

/// The node's behaviours. Discovery behaviours are toggled by the discovery method.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// First, so a refused peer's connection is denied before the others set up for it.
    refusals: Refusals,
    /// Before `limits`, so a host's connections over its share never take a node-wide slot.
    per_host: PerHostLimits,
    limits: connection_limits::Behaviour,
    gossipsub: gossipsub::Behaviour,
    sync: request_response::Behaviour<CountingCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
}

/// What a dial error says, with a denial's reason: libp2p shows `DialError::Denied` as "Dial
/// error" and keeps why (e.g. `max_peers_per_ip`) in its source.
fn dial_error_text(error: &DialError) -> String {
    match error {
        DialError::Denied { cause } => match std::error::Error::source(cause) {
            Some(why) => format!("connection denied: {why}"),
            None => cause.to_string(),
        },
        other => other.to_string(),
    }
}

pub(crate) fn max_batch_bytes(opts: &Options) -> usize {
    MIN_BATCH_BYTES.max(opts.max_event_bytes)
}

/// Gossipsub's own cap on the messages queued to one peer (its default).
const GOSSIPSUB_QUEUE_LEN: usize = 5000;

/// Fewest messages gossipsub's queue to a peer holds, whatever `max_gossip_queue_bytes`: the
/// queue carries our publishes, forwards and IHAVE/IWANT alike, and messages are mostly
/// ~1 KiB events, so a queue sized for the largest message (51 at the defaults) dropped
/// forwards to a peer briefly behind and failed our publish with one slow peer.
const MIN_GOSSIP_QUEUE_LEN: usize = 256;

/// Gossipsub's queue to each peer, in messages, held to `max_gossip_queue_bytes` of the
/// largest message this node sends (gossipsub counts messages, not bytes), but at least
/// [`MIN_GOSSIP_QUEUE_LEN`]: a peer that stops reading holds at most
/// `max(max_gossip_queue_bytes, 256 x the largest message)` here (80 MiB at the default
/// event limit). Overflow is gossipsub's: a message that does not fit is not sent to that
/// peer (catch-up carries its events), and a publish no peer's queue takes fails
/// (`P2PError::Publish`, reported).
pub(crate) fn gossip_queue_len(opts: &Options) -> usize {
    let largest = max_batch_bytes(opts) + ENVELOPE_BYTES;
    (opts.max_gossip_queue_bytes / largest).clamp(MIN_GOSSIP_QUEUE_LEN, GOSSIPSUB_QUEUE_LEN)
}

/// How long a peer whose gossip queue overflowed stays counted against
/// `max_gossip_total_bytes` after its last overflow: gossipsub reports overflows at each
/// heartbeat (1 s) while messages keep failing to fit, so a peer still behind is reported
/// again well within it, and one that caught up stops counting. Also how far back the
/// largest message gossiped is looked for (see [`RecentLargest`]), and how long a peer let go
/// is given to close its connection before its queue counts again (see [`SlowPeers::over`]).
const SLOW_PEER_WINDOW: Duration = Duration::from_secs(10);

/// What a queued message holds beyond its data (signature, key, topic, sequence number),
/// about.
const MESSAGE_OVERHEAD: usize = 256;

/// The largest message (with `MESSAGE_OVERHEAD`) gossiped in each of the last
/// `SLOW_PEER_WINDOW` seconds (and the current one): a fixed ring of one-second slots, so
/// bounded whatever the rate.
#[derive(Debug, Default)]
struct RecentLargest {
    /// Slot `second % len`: the second it holds (since `origin`) and its largest message.
    slots: [(u64, usize); RECENT_SLOTS],
    /// The instant second 0 starts at (the first message's).
    origin: Option<tokio::time::Instant>,
}

const RECENT_SLOTS: usize = SLOW_PEER_WINDOW.as_secs() as usize + 1;

impl RecentLargest {
    fn second(&mut self, now: tokio::time::Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        now.saturating_duration_since(origin).as_secs()
    }

    fn record(&mut self, bytes: usize, now: tokio::time::Instant) {
        let second = self.second(now);
        let slot = &mut self.slots[(second % RECENT_SLOTS as u64) as usize];
        if slot.0 != second {
            *slot = (second, 0);
        }
        slot.1 = slot.1.max(bytes);
    }

    /// The largest message of the last `SLOW_PEER_WINDOW`.
    fn largest(&mut self, now: tokio::time::Instant) -> usize {
        let second = self.second(now);
        self.slots
            .iter()
            .filter(|(at, _)| second.saturating_sub(*at) < RECENT_SLOTS as u64)
            .map(|(_, bytes)| *bytes)
            .max()
            .unwrap_or(0)
    }
}

/// One connected peer, for [`SlowPeers`].
#[derive(Debug, Default)]
struct PeerGossip {
    /// While counted: when gossipsub last reported that the peer's queue overflowed, the
    /// messages it dropped since it was first counted, and the most one message of its queue
    /// may hold: the largest message gossiped from `SLOW_PEER_WINDOW` before it was first
    /// counted until its last report (its queue filled before it overflowed; a queue that
    /// held older large messages and dropped nothing for the window stopped counting).
    slow: Option<Slow>,
    /// Let go for the bound, its connection still closing, since then, counted at its
    /// queue's bytes then: its queue is held until the connection closes. Not chosen again,
    /// and its later reports are not counted (gossipsub goes on reporting it: its heartbeat's
    /// IHAVEs do not fit either; its drops, from zero again, would make a peer that dropped
    /// more go in its place).
    leaving: Option<(tokio::time::Instant, usize)>,
}

#[derive(Debug, Clone, Copy)]
struct Slow {
    at: tokio::time::Instant,
    dropped: u64,
    largest: usize,
}

/// The node-wide bound on gossip queued to peers that fell behind (`max_gossip_total_bytes`).
/// Gossipsub bounds each peer's queue in messages and reports a peer whose queue overflowed
/// (`Event::SlowPeer`), not what the queues hold, so such a peer is counted at its worst
/// case, the queue's length times its `largest` (an estimate: see [`PeerGossip`]). Overflow:
/// the counted peers that dropped the most are disconnected until the rest fit (see
/// `Node::on_slow_peer`). One entry per connected peer.
#[derive(Debug, Default)]
struct SlowPeers {
    peers: HashMap<PeerId, PeerGossip>,
    recent: RecentLargest,
}

impl SlowPeers {
    /// A connection of `peer` came up. A peer let go that is back before its old connection
    /// finished closing starts afresh: otherwise its `leaving` stayed for as long as it stayed
    /// connected, counted at its old queue and never chosen again.
    fn connected(&mut self, peer: PeerId) {
        let state = self.peers.entry(peer).or_default();
        if state.leaving.is_some() {
            *state = PeerGossip::default();
        }
    }

    fn disconnected(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// A message of `bytes` went into gossip (published, or received and so forwarded or
    /// served on IWANT): any peer's queue may hold it.
    fn gossiped(&mut self, bytes: usize, now: tokio::time::Instant) {
        let bytes = bytes.saturating_add(MESSAGE_OVERHEAD);
        self.recent.record(bytes, now);
        for peer in self.peers.values_mut() {
            if let Some(slow) = &mut peer.slow {
                slow.largest = slow.largest.max(bytes);
            }
        }
    }

    /// Gossipsub reported that `dropped` messages did not fit `peer`'s queue.
    fn overflowed(&mut self, peer: &PeerId, dropped: u64, now: tokio::time::Instant) {
        let recent = self.recent.largest(now);
        if let Some(state) = self.peers.get_mut(peer)
            && state.leaving.is_none()
        {
            // Not reported for the window: it had stopped counting.
            if state
                .slow
                .is_some_and(|slow| now.saturating_duration_since(slow.at) > SLOW_PEER_WINDOW)
            {
                state.slow = None;
            }
            let slow = state.slow.get_or_insert(Slow {
                at: now,
                dropped: 0,
                largest: recent,
            });
            slow.at = now;
            slow.dropped = slow.dropped.saturating_add(dropped);
        }
    }

    /// The counted peers to let go so that the rest fit `max`, those that dropped the most
    /// first, each queue holding at most `queue_len` messages. A peer let go is not chosen
    /// again; while its connection closes (`SLOW_PEER_WINDOW`) its queue is taken as freed,
    /// after that (its close hangs: the queue is still held) it counts again, so the others
    /// must fit beside it.
    fn over(&mut self, queue_len: usize, max: usize, now: tokio::time::Instant) -> Vec<PeerId> {
        let mut counted: Vec<(u64, PeerId, usize)> = Vec::new();
        let mut total = 0usize;
        for (id, state) in &mut self.peers {
            if let Some((told, bytes)) = state.leaving {
                if now.saturating_duration_since(told) > SLOW_PEER_WINDOW {
                    total = total.saturating_add(bytes);
                }
            } else if let Some(slow) = state.slow {
                if now.saturating_duration_since(slow.at) > SLOW_PEER_WINDOW {
                    state.slow = None;
                } else {
                    let bytes = queue_len.saturating_mul(slow.largest);
                    total = total.saturating_add(bytes);
                    counted.push((slow.dropped, *id, bytes));
                }
            }
        }
        counted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut out = Vec::new();
        for (_, id, bytes) in counted {
            if total <= max {
                break;
            }
            total = total.saturating_sub(bytes);
            if let Some(state) = self.peers.get_mut(&id) {
                state.slow = None;
                state.leaving = Some((now, bytes));
            }
            out.push(id);
        }
        out
    }
}

fn behaviour(
    key: &Keypair,
    opts: &Options,
    catch_up_bytes: Arc<AtomicU64>,
) -> Result<Behaviour, BoxError> {
    let local = key.public().to_peer_id();
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(opts.max_peers))
        .with_max_established_per_peer(Some(MAX_PER_PEER))
        .with_max_pending_incoming(Some(MAX_PENDING))
        .with_max_pending_outgoing(Some(MAX_PENDING));

    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| {
            let source = m.source.map(|p| p.to_bytes());
            gossipsub::MessageId::new(&wire::message_id(
                &m.data,
                source.as_deref(),
                m.sequence_number,
            ))
        })
        // Every received message, however small, tells the mesh "I have it" (IDONTWANT), so
        // peers that have not forwarded it yet skip us: a duplicate costs its receiver a
        // signature check, far more than the announcement. Forwarding waits `FORWARD_HOLD`
        // to give the announcements time to arrive.
        .idontwant_message_size_threshold(0)
        .max_transmit_size(max_batch_bytes(opts) + ENVELOPE_BYTES)
        .connection_handler_queue_len(gossip_queue_len(opts))
        // go-libp2p's default: rust-libp2p's 5 s put off a new node's first mesh upkeep and
        // its first report of a peer whose queue overflowed (see `SlowPeers`).
        .heartbeat_initial_delay(Duration::from_millis(100))
        .build()?;
    let mut gossipsub =
        gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_config)?;
    let topic = IdentTopic::new(wire::gossip_topic(&opts.network));
    let (params, thresholds) = score_params(&topic);
    gossipsub.with_peer_score(params, thresholds)?;

    // The codec holds requests and answers to their size limits.
    let codec = CountingCodec::new(catch_up_bytes);
    let sync = request_response::Behaviour::with_codec(
        codec,
        [(
            StreamProtocol::new(wire::SYNC_PROTOCOL),
            ProtocolSupport::Full,
        )],
        request_response::Config::default()
            .with_request_timeout(opts.request_timeout)
            .with_max_concurrent_streams(MAX_SYNC_STREAMS),
    );

    let identify = identify::Behaviour::new(
        identify::Config::new(wire::identify_version(&opts.network), key.public())
            .with_agent_version(wire::agent_version(&opts.peer_id)),
    );

    let mdns = match opts.discovery {
        DiscoveryMethod::Mdns => Some(mdns::tokio::Behaviour::new(
            mdns::Config {
                // Ask the LAN again every so often (answers are multicast, so every peer
                // learns from each query): a lost first packet costs seconds, not minutes.
                query_interval: MDNS_QUERY_INTERVAL,
                ..Default::default()
            },
            local,
        )?),
        _ => None,
    };
    let kad = match &opts.discovery {
        DiscoveryMethod::Dht { .. } => {
            let mut config = kad::Config::new(StreamProtocol::new(wire::KAD_PROTOCOL));
            config.set_query_timeout(Duration::from_secs(30));
            // kSync reads no record and no provider (the DHT only finds peers): without this
            // any peer could store up to 1,024 of each here, kept and served to others for
            // their lifetime. Filtered, they come as events the node drops.
            config.set_record_filtering(kad::StoreInserts::FilterBoth);
            let mut kad =
                kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), config);
            // Peers on a LAN or loopback never get a confirmed external address; without
            // server mode they would not answer lookups.
            kad.set_mode(Some(kad::Mode::Server));
            Some(kad)
        }
        _ => None,
    };
    Ok(Behaviour {
        refusals: Refusals::default(),
        per_host: PerHostLimits::new(opts.max_peers_per_ip),
        limits: connection_limits::Behaviour::new(limits),
        gossipsub,
        sync,
        identify,
        ping: ping::Behaviour::default(),
        mdns: Toggle::from(mdns),
        kad: Toggle::from(kad),
    })
}

/// Peer scoring: only invalid messages (P4) count, heavily, so a peer that sends a few
/// malformed or oversized events is graylisted (its messages are ignored) and pruned. Mesh
/// delivery penalties are off (a quiet network is normal here) and so is IP colocation (many
/// peers share one host or NAT on a LAN).
fn score_params(
    topic: &IdentTopic,
) -> (gossipsub::PeerScoreParams, gossipsub::PeerScoreThresholds) {
    let topic_params = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0,
        time_in_mesh_quantum: Duration::from_secs(1),
        first_message_deliveries_weight: 0.1,
        first_message_deliveries_decay: 0.9,
        first_message_deliveries_cap: 100.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -20.0,
        invalid_message_deliveries_decay: 0.99,
        ..Default::default()
    };
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        topic_score_cap: 10.0,
        ..Default::default()
    };
    params.topics.insert(topic.hash(), topic_params);
    (params, gossipsub::PeerScoreThresholds::default())
}

/// Builds the swarm (transport + behaviours); nothing listens yet. The catch-up protocol
/// adds the bytes it moves to `catch_up_bytes`.
pub(crate) fn build_swarm(
    keypair: Keypair,
    opts: &Options,
    catch_up_bytes: Arc<AtomicU64>,
) -> Result<Swarm<Behaviour>, P2PError> {
    let psk = opts.network_key.map(|k| k.psk());
    let setup_timeout = opts.connect_timeout;
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(move |key| transport::build(key, psk, setup_timeout))
        .map_err(|e| P2PError::Build(Box::new(e)))?
        .with_behaviour(|key| behaviour(key, opts, catch_up_bytes))
        .map_err(|e| P2PError::Build(Box::new(e)))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build();
    Ok(swarm)
}

/// A catch-up session with one peer: we walk its log page by page from our cursor, fetch
/// what we lack, and move the cursor (stored in the replica) only past pages we fully hold.
#[derive(Debug, Default)]
struct Session {
    /// Everything in the peer's log up to this sequence number is in ours.
    cursor: u64,
    /// The peer's log id the cursor refers to (0: unknown).
    log_id: u64,
    state: SessionState,
    /// The current page.
    page: Vec<KeyEntry>,
    /// The last sequence number the current page covers (see `SyncResponse::Keys`).
    page_through: u64,
    /// Keys of the page fetched by this session (done, even if ingest found a conflict).
    fetched: HashSet<RevisionKey>,
    /// Run again when the current round ends.
    again: bool,
    /// The log id the peer's first answer of this round named: an honest peer's log id does
    /// not change while it stays connected, and a change restarts the walk, so one that
    /// changed on every answer would restart it forever.
    round_log_id: Option<u64>,
    /// `Keys` answers taken this round, and how many the round may take (see `round_budget`).
    round_pages: u32,
    round_budget: u32,
    /// The cursor came from the records kept before the cursor slots (see `cursors.rs`):
    /// they are removed once it is stored in a slot.
    legacy: bool,
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
enum SessionState {
    #[default]
    Idle,
    AwaitingKeys,
    AwaitingEvents,
    /// Some keys of the page are being fetched from another peer.
    Waiting,
}

/// What an outstanding catch-up request was.
enum Outstanding {
    /// A `Keys` page after this sequence number (and at most `MAX_PAGE` long).
    Keys {
        after: u64,
    },
    Fetch(Vec<RevisionKey>),
}

/// What is left of the node's budget for catch-up answers in flight, for one peer (see
/// `Node::response_to`).
#[derive(Debug, Clone, Copy)]
struct Room {
    /// No answer to this peer is in flight and its host's are under two shares: one goes
    /// whatever its size.
    idle: bool,
    /// Bytes left under `max_catch_up_answer_bytes`, and under this peer's share of it and its
    /// host's.
    left: usize,
}

impl Room {
    /// The room for an answer to a peer holding `peer_held` of answers in flight, whose host
    /// holds `host_held`, under `budget` of which `total` is held.
    /// A peer with none in flight gets one answer (whatever its size) unless its host holds
    /// two shares: a host's sum counts each answer at most at a share (see
    /// `AnswersInFlight::hold`), so one peer that asks and does not read holds at most one
    /// share of its host's and cannot keep the host's other peers waiting; it takes two such
    /// peer ids of one host (`max_peers_per_ip`) to do so.
    fn for_answer(budget: usize, total: usize, peer_held: usize, host_held: usize) -> Room {
        let share = answer_share(budget);
        Room {
            idle: peer_held == 0 && host_held < share.saturating_mul(2),
            left: budget
                .saturating_sub(total)
                .min(share.saturating_sub(peer_held))
                .min(share.saturating_sub(host_held)),
        }
    }
}

/// One peer's share of `max_catch_up_answer_bytes`, and one host's (all its peers together),
/// as a divisor: their answers in flight hold at most an eighth of the budget, so a peer that
/// asks on all its streams and never reads, or a host that does so with `max_peers_per_ip`
/// peer ids, leaves the rest to the others.
const ANSWER_SHARE_DIVISOR: usize = 8;

/// One peer's (and one host's) share of a `budget` of answers in flight: at least 1 byte, so
/// that a budget under `ANSWER_SHARE_DIVISOR` bytes (which `build` accepts) does not leave
/// every request busy.
fn answer_share(budget: usize) -> usize {
    (budget / ANSWER_SHARE_DIVISOR).max(1)
}

/// Who an answer in flight is held for: the peer, and the host its request came from (see
/// `per_host::Host`; `None` when the connection's address holds no IP, then only the peer's
/// share applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    peer: PeerId,
    host: Option<Host>,
}

/// Our catch-up answers in flight (handed to libp2p, not yet sent, failed or timed out), with
/// the bytes each holds, and their sums, node-wide, per peer and per host: bounded by
/// `max_catch_up_answer_bytes` (see `Node::response_to`); the map by libp2p's streams
/// (`MAX_SYNC_STREAMS` per connection). The sums change only with the map, here.
#[derive(Default)]
struct AnswersInFlight {
    /// Each answer's holder, bytes, and what it counts in its host's sum.
    answers: HashMap<InboundRequestId, (Holder, usize, usize)>,
    total: usize,
    /// Only peers with an answer in flight.
    by_peer: HashMap<PeerId, usize>,
    /// Only hosts with an answer in flight; each answer counted at most at a share.
    by_host: HashMap<Host, usize>,
}

/// Adds `bytes` to `key`'s sum.
fn add_to<K: std::hash::Hash + Eq>(sums: &mut HashMap<K, usize>, key: K, bytes: usize) {
    let held = sums.entry(key).or_default();
    *held = held.saturating_add(bytes);
}

/// Takes `bytes` from `key`'s sum, and the entry once it is 0.
fn take_from<K: std::hash::Hash + Eq>(sums: &mut HashMap<K, usize>, key: &K, bytes: usize) {
    if let Some(held) = sums.get_mut(key) {
        *held = held.saturating_sub(bytes);
        if *held == 0 {
            sums.remove(key);
        }
    }
}

impl AnswersInFlight {
    /// Holds an answer of `bytes`; in its host's sum at most `share` (one answer to an idle
    /// peer goes whatever its size: counted whole, one peer's could keep its host over two
    /// shares, and so every other peer of the host waiting; see `Room::for_answer`).
    fn hold(&mut self, request_id: InboundRequestId, holder: Holder, bytes: usize, share: usize) {
        let host_bytes = bytes.min(share);
        self.answers.insert(request_id, (holder, bytes, host_bytes));
        self.total = self.total.saturating_add(bytes);
        add_to(&mut self.by_peer, holder.peer, bytes);
        if let Some(host) = holder.host {
            add_to(&mut self.by_host, host, host_bytes);
        }
    }

    /// The answer was sent, or never will be: what it held is free again.
    fn release(&mut self, request_id: &InboundRequestId) {
        let Some((holder, bytes, host_bytes)) = self.answers.remove(request_id) else {
            return;
        };
        self.total = self.total.saturating_sub(bytes);
        take_from(&mut self.by_peer, &holder.peer, bytes);
        if let Some(host) = holder.host {
            take_from(&mut self.by_host, &host, host_bytes);
        }
    }

    fn held_by(&self, peer: &PeerId) -> usize {
        self.by_peer.get(peer).copied().unwrap_or(0)
    }

    /// What `holder`'s host holds; without a host, what the peer holds.
    fn held_by_host(&self, holder: &Holder) -> usize {
        match &holder.host {
            Some(host) => self.by_host.get(host).copied().unwrap_or(0),
            None => self.held_by(&holder.peer),
        }
    }
}

/// What a `Keys` page holds, counted as an answer in flight: each entry's id and its fixed
/// fields (seq, version, digest, and their encoding).
fn keys_bytes(entries: &[KeyEntry]) -> usize {
    entries.iter().map(|e| e.id.len() + 40).sum()
}

pub(crate) struct Node {
    swarm: Swarm<Behaviour>,
    topic: IdentTopic,
    opts: Options,
    replica: Replica,
    notifier: Notifier,
    shaping: Shaping,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    log_id: u64,
    /// Whether the last `status` said `syncing` (some catch-up round is running).
    syncing: bool,
    limits: EventLimits,
    max_batch_bytes: usize,
    sessions: HashMap<PeerId, Session>,
    requests: HashMap<OutboundRequestId, (PeerId, Outstanding)>,
    /// Our catch-up answers in flight.
    answers: AnswersInFlight,
    /// Peers whose gossip queue overflowed, against `max_gossip_total_bytes`.
    slow_peers: SlowPeers,
    /// Keys being fetched, with when their fetch was sent (bounded by the sessions' pages).
    in_flight: HashMap<RevisionKey, tokio::time::Instant>,
    /// When the earliest session waiting on another's fetch stops waiting (see
    /// `IN_FLIGHT_PATIENCE`).
    wait_deadline: Option<tokio::time::Instant>,
    dials: HashMap<ConnectionId, oneshot::Sender<Result<PeerId, P2PError>>>,
    peer_dials: HashMap<PeerId, Vec<oneshot::Sender<Result<PeerId, P2PError>>>>,
    lookups: HashMap<kad::QueryId, PeerId>,
    /// The address of each connection we dialed, by connection (bounded by the connection
    /// limits): kept in the peer's Kademlia entry (see `add_kad_addresses`).
    dialed_addrs: HashMap<ConnectionId, (PeerId, Multiaddr)>,
    /// The host of each connection's remote address (bounded by the connection limits): a
    /// catch-up request counts against its host's share of the answer budget.
    connection_hosts: HashMap<ConnectionId, Host>,
    /// The spec's `peerId`s of the peers met, with the addresses they listen on (bounded by
    /// `MAX_KNOWN_NAMES`).
    names: HashMap<String, (PeerId, Vec<Multiaddr>)>,
    /// Swarm events that arrived while `start` collected listen addresses (at most
    /// `MAX_PENDING`), handled first thing in `run`.
    backlog: Vec<SwarmEvent<BehaviourEvent>>,
    stopping: bool,
    /// Broadcasts waiting to be published together (bounded by `MAX_BATCH_EVENTS` and
    /// `max_batch_bytes`; published at `batch_deadline` at the latest).
    batch: Vec<Vec<u8>>,
    batch_bytes: usize,
    batch_deadline: Option<tokio::time::Instant>,
    last_publish: tokio::time::Instant,
    /// Payloads (with their event counts) published while no peer was subscribed to the
    /// topic, oldest first, published again when one subscribes (see `keep_unsent`).
    unsent: VecDeque<(Vec<u8>, u64)>,
    /// Digests of our own log for catch-up, extended from storage when catch-up needs them
    /// (not on the delivery path).
    digests: Digests,
    /// Accepted messages whose forward is held (see `FORWARD_HOLD`), oldest first; bounded
    /// by `MAX_HELD_FORWARDS`.
    held: VecDeque<(tokio::time::Instant, gossipsub::MessageId, PeerId)>,
    /// The catch-up cursors stored per peer (at most `Options::max_peer_cursors`, least
    /// recently used evicted).
    cursors: PeerCursors,
    /// Peers `connect_to_peer` reached, dialed again when they drop (bounded, see
    /// `redial.rs`).
    redials: Redials,
}

const LOG_ID_CURSOR: &str = "p2p/log-id";

/// The cursor name of a peer's cursor as stored before the cursor slots (see `cursors.rs`).
fn cursor_name(peer: &PeerId) -> String {
    format!("p2p/{peer}")
}

/// The cursor name of the log id of [`cursor_name`].
fn log_id_name(peer: &PeerId) -> String {
    format!("p2p/{peer}/log-id")
}

impl Node {
    /// Builds the node, listens, joins the topic and dials bootstrap peers. Returns once the
    /// node listens, with its listen addresses.
    pub(crate) async fn start(
        mut swarm: Swarm<Behaviour>,
        opts: Options,
        replica: Replica,
        notifier: Notifier,
        shaping: Shaping,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
    ) -> Result<Self, P2PError> {
        let topic = IdentTopic::new(wire::gossip_topic(&opts.network));
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| P2PError::Build(Box::new(e)))?;
        let mut listen: Multiaddr = Multiaddr::from(opts.listen_host);
        listen.push(Protocol::Tcp(opts.port));
        swarm
            .listen_on(listen.clone())
            .map_err(|e| P2PError::Listen {
                addr: listen.to_string(),
                source: Box::new(e),
            })?;
        // Wait for the listener to come up (or fail) so `listen_addrs` is meaningful at once.
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    lock(&shared.listen_addrs).push(address);
                    break;
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(P2PError::Listen {
                        addr: listen.to_string(),
                        source: match reason {
                            Ok(()) => "listener closed".into(),
                            Err(e) => Box::new(e),
                        },
                    });
                }
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(P2PError::Listen {
                        addr: listen.to_string(),
                        source: Box::new(error),
                    });
                }
                _ => {}
            }
        }
        // On every interface, the listener reports one address per interface, one after the
        // other: take those that come in quick succession too, so `listen_addrs` right after
        // `start` holds the addresses other hosts can reach, not only the first (often
        // loopback). Anything else that happens meanwhile is handled first thing in `run`.
        let mut backlog = Vec::new();
        if opts.listen_host.is_unspecified() {
            while backlog.len() < MAX_PENDING as usize {
                match tokio::time::timeout(LISTEN_SETTLE, swarm.select_next_some()).await {
                    Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                        let mut addrs = lock(&shared.listen_addrs);
                        if !addrs.contains(&address) {
                            addrs.push(address);
                        }
                    }
                    Ok(other) => backlog.push(other),
                    Err(_) => break,
                }
            }
        }
        let log_id = match replica.cursor(LOG_ID_CURSOR).map_err(P2PError::Replica)? {
            0 => {
                let id = rand::random::<u64>().max(1);
                replica
                    .set_cursor(LOG_ID_CURSOR, id)
                    .await
                    .map_err(P2PError::Replica)?;
                id
            }
            id => id,
        };
        let cursors = PeerCursors::load(&**replica.storage(), opts.max_peer_cursors)
            .await
            .map_err(|e| P2PError::Replica(e.into()))?;
        let max_batch_bytes = max_batch_bytes(&opts);
        let (redial_min, redial_max) = (opts.redial_min, opts.redial_max);
        let digests = Digests::new(shaping.filter().cloned());
        let mut node = Node {
            swarm,
            topic,
            opts,
            replica,
            notifier,
            shaping,
            shared,
            commands,
            log_id,
            syncing: false,
            limits: EventLimits::default(),
            max_batch_bytes,
            sessions: HashMap::new(),
            requests: HashMap::new(),
            answers: AnswersInFlight::default(),
            slow_peers: SlowPeers::default(),
            in_flight: HashMap::new(),
            wait_deadline: None,
            dials: HashMap::new(),
            peer_dials: HashMap::new(),
            lookups: HashMap::new(),
            dialed_addrs: HashMap::new(),
            connection_hosts: HashMap::new(),
            names: HashMap::new(),
            backlog,
            stopping: false,
            batch: Vec::new(),
            batch_bytes: 0,
            batch_deadline: None,
            last_publish: tokio::time::Instant::now(),
            unsent: VecDeque::new(),
            held: VecDeque::new(),
            digests,
            cursors,
            redials: Redials::new(redial_min, redial_max),
        };
        node.join_dht();
        Ok(node)
    }

    fn join_dht(&mut self) {
        let DiscoveryMethod::Dht { bootstrap } = self.opts.discovery.clone() else {
            return;
        };
        for addr in bootstrap {
            let mut plain = addr.clone();
            let peer = match plain.pop() {
                Some(Protocol::P2p(peer)) => Some(peer),
                _ => None,
            };
            match peer {
                Some(peer) => {
                    if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                        kad.add_address(&peer, plain);
                    }
                }
                None => {
                    tracing::warn!(%addr, "bootstrap address has no /p2p/<peer id>; dialing it anyway")
                }
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "dialing bootstrap peer failed");
            }
        }
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            // No known peers yet is fine: the periodic round retries.
            let _ = kad.bootstrap();
        }
    }

    /// Runs until shutdown.
    pub(crate) async fn run(mut self) {
        for event in std::mem::take(&mut self.backlog) {
            self.on_swarm_event(event).await;
        }
        let mut round = tokio::time::interval(self.opts.anti_entropy_interval);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        round.tick().await;
        let mut metrics = tokio::time::interval(self.opts.metrics_interval);
        metrics.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        metrics.tick().await;
        let mut meter = MetricsMeter::new(self.shared.counters.meter_totals());
        let mut metered_since = tokio::time::Instant::now();
        while !self.stopping {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => {
                        self.on_command(cmd).await;
                        // Take what else is queued now: a burst of broadcasts costs one pass
                        // over the other branches (the swarm's poll), not one per event.
                        for _ in 1..COMMAND_DRAIN {
                            if self.stopping {
                                break;
                            }
                            match self.commands.try_recv() {
                                Ok(cmd) => self.on_command(cmd).await,
                                Err(_) => break,
                            }
                        }
                    }
                    None => self.stopping = true,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event).await,
                _ = round.tick() => self.periodic().await,
                _ = metrics.tick() => {
                    let now = tokio::time::Instant::now();
                    let totals = self.shared.counters.meter_totals();
                    let report = meter.report(totals, now.duration_since(metered_since));
                    metered_since = now;
                    self.notifier.emit(Notification::Metrics(report));
                }
                _ = sleep_until_some(self.batch_deadline) => self.flush_batch(),
                _ = sleep_until_some(self.held.front().map(|h| h.0)) => {
                    self.release_forwards(tokio::time::Instant::now());
                }
                _ = sleep_until_some(self.wait_deadline) => {
                    self.wait_deadline = None;
                    self.wake_waiting().await;
                }
                _ = sleep_until_some(self.redials.next_due()) => self.redial_due(),
            }
            self.update_status();
        }
        self.flush_batch();
        let walked: Vec<PeerId> = self.sessions.keys().copied().collect();
        for peer in walked {
            self.save_cursor(peer).await;
        }
        // Dropping the swarm closes every connection without a `ConnectionClosed` event: each
        // peer reported connected is reported gone here.
        let peers = std::mem::take(&mut *lock(&self.shared.peers));
        for peer in peers {
            self.notifier
                .emit(Notification::PeerDisconnected(peer.to_string()));
        }
        lock(&self.shared.listen_addrs).clear();
        for (_, reply) in self.dials.drain() {
            let _ = reply.send(Err(P2PError::Stopped));
        }
        for (_, replies) in self.peer_dials.drain() {
            for reply in replies {
                let _ = reply.send(Err(P2PError::Stopped));
            }
        }
    }

    /// `status`: `syncing` while a catch-up round runs with some peer, `idle` once none does
    /// (`error` after a failure, see `report`, until the next of those).
    fn update_status(&mut self) {
        let busy = self
            .sessions
            .values()
            .any(|s| s.state != SessionState::Idle);
        if busy != self.syncing {
            self.syncing = busy;
            self.notifier.emit(Notification::Status(if busy {
                Status::Syncing
            } else {
                Status::Idle
            }));
        }
    }

    /// Runs the incoming middleware, then the filter, over received (valid) events: what they
    /// keep is stored. A failure (e.g. decryption with another key) is an `error`
    /// notification, and that event is not stored.
    fn take_in(&self, events: Vec<Event>) -> Vec<Event> {
        if self.shaping.is_noop() {
            return events;
        }
        let mut kept = Vec::with_capacity(events.len());
        for event in events {
            match self.shaping.incoming(event) {
                Ok(Some(event)) => kept.push(event),
                Ok(None) => {}
                Err(e) => {
                    tracing::info!(error = %e, "incoming middleware refused a received event");
                    self.report(SyncError::Middleware(e));
                }
            }
        }
        kept
    }

    async fn periodic(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            self.start_session(peer).await;
        }
        let local = *self.swarm.local_peer_id();
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            // A lookup of our own id refreshes the routing table and finds new peers.
            kad.get_closest_peers(local);
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Broadcast(event) => {
                if self.batch_bytes + event.len() + 1 > self.max_batch_bytes {
                    self.flush_batch();
                }
                self.batch_bytes += event.len() + 1;
                self.batch.push(event);
                if self.batch.len() >= MAX_BATCH_EVENTS {
                    self.flush_batch();
                } else if self.batch_deadline.is_none() {
                    // Idle: publish at once. Busy (published moments ago): collect for the
                    // rest of the linger so one signed message carries many events.
                    let now = tokio::time::Instant::now();
                    let due = self.last_publish + BATCH_LINGER;
                    if due <= now {
                        self.flush_batch();
                    } else {
                        self.batch_deadline = Some(due);
                    }
                }
            }
            Command::Connect { target, reply } => self.connect(target, reply),
            Command::SyncNow => {
                let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
                for peer in peers {
                    self.start_session(peer).await;
                }
            }
            Command::PeerScore { peer, reply } => {
                let _ = reply.send(self.swarm.behaviour().gossipsub.peer_score(&peer));
            }
            Command::Shutdown => self.stopping = true,
        }
    }

    fn flush_batch(&mut self) {
        self.batch_deadline = None;
        self.batch_bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        self.publish(batch);
        self.last_publish = tokio::time::Instant::now();
    }

    fn publish(&mut self, batch: Vec<Vec<u8>>) {
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        let data = wire::encode_payload(&batch);
        self.publish_payload(data, count);
    }

    /// Publishes one encoded batch of `count` events; kept for later when no peer is
    /// subscribed to the topic yet (gossipsub would refuse it).
    fn publish_payload(&mut self, data: Vec<u8>, count: u64) {
        let bytes = data.len();
        let hash = self.topic.hash();
        let subscribed = self
            .swarm
            .behaviour()
            .gossipsub
            .all_peers()
            .any(|(_, topics)| topics.contains(&&hash));
        if !subscribed {
            self.keep_unsent(data, count);
            return;
        }
        debug_log!(self.opts.debug, target: LOG_TARGET, events = count, bytes, "publishing");
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), data)
        {
            Ok(_) => {
                self.slow_peers.gossiped(bytes, tokio::time::Instant::now());
                let c = &self.shared.counters;
                c.published_messages.fetch_add(1, Ordering::Relaxed);
                c.published_events.fetch_add(count, Ordering::Relaxed);
                c.gossip_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            // Nobody to send to (every subscribed peer scores below the publish threshold),
            // or already sent: the events are stored and catch-up carries them.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic)
            | Err(gossipsub::PublishError::Duplicate) => {}
            Err(e) => {
                tracing::warn!(error = %e, "publishing failed; catch-up will deliver");
                self.report(SyncError::transport(P2PError::Publish(e.to_string())));
            }
        }
    }

    /// Gossipsub reported that messages did not fit `peer`'s queue (at its heartbeat): the
    /// peer is counted against `max_gossip_total_bytes` (see [`SlowPeers`]), and when the
    /// counted peers pass it, those that dropped the most are disconnected, which frees their
    /// queues (no local event is lost: it is stored, and catch-up carries it once the peer
    /// connects again).
    fn on_slow_peer(&mut self, peer: PeerId, failed: gossipsub::FailedMessages) {
        let dropped = failed.priority.saturating_add(failed.non_priority) as u64;
        debug_log!(self.opts.debug, target: LOG_TARGET, %peer, dropped, "gossip queue to a peer overflowed");
        let now = tokio::time::Instant::now();
        self.slow_peers.overflowed(&peer, dropped, now);
        let max = self.opts.max_gossip_total_bytes;
        for peer in self.slow_peers.over(gossip_queue_len(&self.opts), max, now) {
            tracing::warn!(%peer, max, "disconnecting a peer that fell behind on gossip: the queues of peers behind would pass max_gossip_total_bytes; catch-up carries what it missed once it connects again");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Keeps a payload no peer could be sent, to publish it when a peer subscribes: a peer
    /// that just connected may not have said it subscribes yet, and its connect-time
    /// catch-up round may have run before the event was stored, so without this it waited
    /// for the next round. At most `MAX_UNSENT_PAYLOADS` payloads and `MAX_UNSENT_BYTES`,
    /// the oldest dropped first: the events are stored, and catch-up still carries dropped
    /// ones.
    fn keep_unsent(&mut self, data: Vec<u8>, count: u64) {
        self.unsent.push_back((data, count));
        // At most 65 entries: summed, not counted alongside.
        let bytes = |unsent: &VecDeque<(Vec<u8>, u64)>| -> usize {
            unsent.iter().map(|(data, _)| data.len()).sum()
        };
        while self.unsent.len() > MAX_UNSENT_PAYLOADS || bytes(&self.unsent) > MAX_UNSENT_BYTES {
            self.unsent.pop_front();
        }
    }

    /// Publishes the kept payloads (a peer subscribed to the topic). They never reached
    /// gossipsub's `publish` (nor so its duplicate cache, which only a sent message enters),
    /// so none comes back `Duplicate`.
    fn publish_unsent(&mut self) {
        let unsent = std::mem::take(&mut self.unsent);
        for (data, count) in unsent {
            self.publish_payload(data, count);
        }
    }

    fn connect(&mut self, target: Target, reply: oneshot::Sender<Result<PeerId, P2PError>>) {
        match target {
            Target::Addr(addr) => {
                let opts = DialOpts::from(addr.clone());
                let id = opts.connection_id();
                // Asked for: goes through even to a refused peer (see `refusals.rs`).
                self.swarm.behaviour_mut().refusals.asked_for(id);
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(P2PError::Dial {
                            target: addr.to_string(),
                            source: Box::new(e),
                        }));
                    }
                }
            }
            Target::Peer(peer) => {
                if self.swarm.is_connected(&peer) {
                    self.redials.keep(peer, None, tokio::time::Instant::now());
                    let _ = reply.send(Ok(peer));
                    return;
                }
                self.peer_dials.entry(peer).or_default().push(reply);
                self.dial_peer(peer, true);
            }
            Target::Name(name) => {
                let Some((peer, addrs)) = self.names.get(&name).cloned() else {
                    let _ = reply.send(Err(P2PError::UnknownPeer(name)));
                    return;
                };
                if self.swarm.is_connected(&peer) {
                    self.redials.keep(peer, None, tokio::time::Instant::now());
                    let _ = reply.send(Ok(peer));
                    return;
                }
                self.peer_dials.entry(peer).or_default().push(reply);
                if let Err(e) = self.dial_known_peer(peer, Some(addrs)) {
                    self.fail_peer_dials(
                        peer,
                        P2PError::Dial {
                            target: name,
                            source: Box::new(e),
                        },
                    );
                }
            }
        }
    }

    /// Remembers the spec's `peerId` a peer announced, for `connect_to_peer(name)`. A name
    /// another connected peer holds stays with it: anyone may announce any name, and a
    /// takeover would have `connect_to_peer(name)` dial the newcomer. (Once the holder is
    /// gone, the name goes to whoever announces it next: a restarted peer may have a new key.)
    fn learn_name(&mut self, peer: PeerId, name: String, mut addrs: Vec<Multiaddr>) {
        if let Some((holder, _)) = self.names.get(&name)
            && *holder != peer
            && self.swarm.is_connected(holder)
        {
            let holder = *holder;
            self.misbehaved(
                peer,
                format!("it announced the name {name:?}, which connected peer {holder} holds"),
            );
            return;
        }
        if !self.names.contains_key(&name) && self.names.len() >= MAX_KNOWN_NAMES {
            let evict = self
                .names
                .iter()
                .find(|(_, (p, _))| !self.swarm.is_connected(p))
                .or_else(|| self.names.iter().next())
                .map(|(n, _)| n.clone());
            if let Some(evict) = evict {
                self.names.remove(&evict);
            }
        }
        addrs.truncate(MAX_NAME_ADDRS);
        self.names.insert(name, (peer, addrs));
    }

    /// Dials `peer` unless it is connected or being dialed (then there is nothing to do, not an
    /// error): at `found` when given (what mDNS or a lookup just reported), else at the
    /// addresses the behaviours know (mDNS, Kademlia).
    fn dial_known_peer(
        &mut self,
        peer: PeerId,
        found: Option<Vec<Multiaddr>>,
    ) -> Result<(), DialError> {
        let opts = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing);
        let opts = match found {
            Some(addrs) => opts.addresses(addrs).build(),
            None => opts.build(),
        };
        if self.peer_dials.contains_key(&peer) {
            // A `connect_to_peer` waits for this peer: its dial goes through even to a
            // refused peer (see `refusals.rs`); discovery's do not.
            self.swarm
                .behaviour_mut()
                .refusals
                .asked_for(opts.connection_id());
        }
        match self.swarm.dial(opts) {
            Err(DialError::DialPeerConditionFalse(_)) => Ok(()),
            done => done,
        }
    }

    /// Dials a peer by id with the addresses the behaviours know (mDNS, Kademlia). Without
    /// any, a Kademlia lookup runs first (when `lookup` and DHT discovery is on).
    fn dial_peer(&mut self, peer: PeerId, lookup: bool) {
        match self.dial_known_peer(peer, None) {
            Ok(()) => {}
            Err(DialError::NoAddresses) if lookup && self.swarm.behaviour().kad.is_enabled() => {
                if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                    let query = kad.get_closest_peers(peer);
                    self.lookups.insert(query, peer);
                }
            }
            Err(DialError::NoAddresses) => self.fail_peer_dials(peer, P2PError::PeerNotFound(peer)),
            Err(e) => self.fail_peer_dials(
                peer,
                P2PError::Dial {
                    target: peer.to_string(),
                    source: Box::new(e),
                },
            ),
        }
    }

    /// Dials the peers kept connected (see `redial.rs`) whose delay is up: at the addresses
    /// they were reached at, and those the behaviours know (identify's cache, Kademlia, mDNS).
    /// Each dial's outcome sets the next: connected, or a longer delay.
    fn redial_due(&mut self) {
        let now = tokio::time::Instant::now();
        for (peer, addrs) in self.redials.take_due(now) {
            if self.swarm.is_connected(&peer) {
                self.redials.connected(&peer, now);
                continue;
            }
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    debug_log!(self.opts.debug, target: LOG_TARGET, %peer, "dialing a peer connect_to_peer reached again");
                    self.shared.counters.redials.fetch_add(1, Ordering::Relaxed);
                    self.redials.dialing(&peer, id);
                }
                // Not dialed now (no address, refused, another dial of it in flight): again
                // after a longer delay.
                Err(e) => {
                    debug_log!(self.opts.debug, target: LOG_TARGET, %peer, error = %dial_error_text(&e), "could not dial a peer connect_to_peer reached again");
                    self.redials
                        .dial_failed(&peer, None, now, rand::random::<f64>());
                }
            }
        }
    }

    fn fail_peer_dials(&mut self, peer: PeerId, error: P2PError) {
        let Some(replies) = self.peer_dials.remove(&peer) else {
            return;
        };
        let message = error.to_string();
        let mut error = Some(error);
        for reply in replies {
            let e = error.take().unwrap_or_else(|| P2PError::Dial {
                target: peer.to_string(),
                source: message.clone().into(),
            });
            let _ = reply.send(Err(e));
        }
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut addrs = lock(&self.shared.listen_addrs);
                if !addrs.contains(&address) {
                    addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                lock(&self.shared.listen_addrs).retain(|a| a != &address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                num_established,
                endpoint,
                ..
            } => {
                let dialed = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => Some(without_peer_id(address)),
                    ConnectedPoint::Listener { .. } => None,
                };
                if let Some(address) = &dialed {
                    self.dialed_addrs
                        .insert(connection_id, (peer_id, address.clone()));
                }
                if let Some(host) = Host::of(endpoint.get_remote_address()) {
                    self.connection_hosts.insert(connection_id, host);
                }
                // Listed before `connect_to_peer` returns, so `connected_peers` agrees with it.
                if num_established.get() == 1 {
                    lock(&self.shared.peers).insert(peer_id);
                }
                let now = tokio::time::Instant::now();
                if num_established.get() == 1 {
                    self.redials.connected(&peer_id, now);
                }
                // Kept only for a `connect_to_peer` still waiting: one that already gave up
                // (its caller got `Timeout`) did not ask for the peer, and there is no call
                // to let it go again.
                if let Some(reply) = self.dials.remove(&connection_id)
                    && reply.send(Ok(peer_id)).is_ok()
                {
                    self.redials.keep(peer_id, dialed.clone(), now);
                }
                if let Some(replies) = self.peer_dials.remove(&peer_id) {
                    let mut waited = false;
                    for reply in replies {
                        waited |= reply.send(Ok(peer_id)).is_ok();
                    }
                    if waited {
                        self.redials.keep(peer_id, dialed, now);
                    }
                }
                self.slow_peers.connected(peer_id);
                if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, "peer connected");
                    self.notifier
                        .emit(Notification::PeerConnected(peer_id.to_string()));
                    self.start_session(peer_id).await;
                }
            }
            SwarmEvent::ConnectionClosed {
                connection_id,
                num_established,
                ..
            } if num_established > 0 => {
                self.dialed_addrs.remove(&connection_id);
                self.connection_hosts.remove(&connection_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                ..
            } => {
                self.dialed_addrs.remove(&connection_id);
                self.connection_hosts.remove(&connection_id);
                lock(&self.shared.peers).remove(&peer_id);
                self.slow_peers.disconnected(&peer_id);
                self.redials.disconnected(
                    &peer_id,
                    tokio::time::Instant::now(),
                    rand::random::<f64>(),
                );
                // What the round walked so far is kept (see `save_cursor`).
                self.save_cursor(peer_id).await;
                self.sessions.remove(&peer_id);
                tracing::debug!(peer = %peer_id, "peer disconnected");
                self.notifier
                    .emit(Notification::PeerDisconnected(peer_id.to_string()));
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let text = dial_error_text(&error);
                if let Some(reply) = self.dials.remove(&connection_id) {
                    let source: BoxError = match error {
                        DialError::Denied { .. } => text.clone().into(),
                        other => Box::new(other),
                    };
                    let _ = reply.send(Err(P2PError::Dial {
                        target: peer_id.map_or_else(|| "address".to_owned(), |p| p.to_string()),
                        source,
                    }));
                }
                if let Some(peer) = peer_id
                    && !self.swarm.is_connected(&peer)
                {
                    self.redials.dial_failed(
                        &peer,
                        Some(connection_id),
                        tokio::time::Instant::now(),
                        rand::random::<f64>(),
                    );
                    self.fail_peer_dials(
                        peer,
                        P2PError::Dial {
                            target: peer.to_string(),
                            source: text.into(),
                        },
                    );
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event).await,
            _ => {}
        }
    }

    async fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                self.on_gossip(propagation_source, message_id, message)
                    .await
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic, .. }) => {
                tracing::debug!(peer = %peer_id, "peer joined the topic");
                if topic == self.topic.hash() {
                    self.publish_unsent();
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            }) => self.on_slow_peer(peer_id, failed_messages),
            BehaviourEvent::Gossipsub(_) => {}
            BehaviourEvent::Sync(event) => self.on_sync_event(event).await,
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocol_version != wire::identify_version(&self.opts.network) {
                    tracing::info!(peer = %peer_id, theirs = %info.protocol_version, "dropping peer of another network or protocol version");
                    self.report(SyncError::Protocol(format!(
                        "peer {peer_id} speaks {:?}, we speak {:?}; disconnected",
                        info.protocol_version,
                        wire::identify_version(&self.opts.network)
                    )));
                    // Refused for a while (see `refusals.rs`): discovery would find it and
                    // dial it again every period, and each time it was reported anew. Out of
                    // the routing table too, so lookups do not keep trying it.
                    let behaviour = self.swarm.behaviour_mut();
                    behaviour
                        .refusals
                        .refuse(peer_id, tokio::time::Instant::now());
                    if let Some(kad) = behaviour.kad.as_mut() {
                        kad.remove_peer(&peer_id);
                    }
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                // Upgraded since it was refused (reached through `connect_to_peer`): kept
                // refused, it could not reconnect for the rest of the refusal once this
                // connection dropped.
                self.swarm.behaviour_mut().refusals.forgive(&peer_id);
                if let Some(name) = wire::peer_name(&info.agent_version) {
                    self.learn_name(peer_id, name, info.listen_addrs.clone());
                }
                self.add_kad_addresses(&peer_id, info.listen_addrs);
            }
            BehaviourEvent::Ping(ping::Event {
                result: Ok(rtt), ..
            }) => {
                let c = &self.shared.counters;
                c.pings.fetch_add(1, Ordering::Relaxed);
                let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
                c.ping_micros.fetch_add(micros, Ordering::Relaxed);
            }
            BehaviourEvent::Identify(_) | BehaviourEvent::Ping(_) | BehaviourEvent::Limits(_) => {}
            BehaviourEvent::Refusals(never) | BehaviourEvent::PerHost(never) => match never {},
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                // One dial per peer with all its addresses: some (e.g. its loopback) do not
                // reach it from here, and a second dial would be refused while one is pending.
                let local = *self.swarm.local_peer_id();
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                for (peer, addr) in found {
                    if peer != local {
                        by_peer.entry(peer).or_default().push(addr);
                    }
                }
                for (peer, mut addrs) in by_peer {
                    tracing::debug!(%peer, ?addrs, "mDNS found a peer");
                    // mDNS answers are anyone's on the LAN: as few kept and dialed as from
                    // identify.
                    addrs.truncate(MAX_KAD_ADDRS);
                    self.add_kad_addresses(&peer, addrs.iter().cloned());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.dial_known_peer(peer, Some(addrs));
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(_)) => {}
            BehaviourEvent::Kad(event) => self.on_kad_event(event),
        }
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            // DHT discovery: connect to what we learn about, within the connection limits.
            kad::Event::RoutingUpdated { peer, .. }
                if peer != *self.swarm.local_peer_id() && !self.swarm.is_connected(&peer) =>
            {
                self.dial_peer(peer, false);
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetClosestPeers(result),
                step,
                ..
            } => {
                let Some(&target) = self.lookups.get(&id) else {
                    return;
                };
                let peers = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                if let Some(mut info) = peers.into_iter().find(|p| p.peer_id == target) {
                    self.lookups.remove(&id);
                    // What a lookup names comes from other peers' tables: as few kept and
                    // dialed as from identify.
                    info.addrs.truncate(MAX_KAD_ADDRS);
                    self.add_kad_addresses(&target, info.addrs.iter().cloned());
                    if let Err(e) = self.dial_known_peer(target, Some(info.addrs)) {
                        self.fail_peer_dials(
                            target,
                            P2PError::Dial {
                                target: target.to_string(),
                                source: Box::new(e),
                            },
                        );
                    }
                } else if step.last {
                    self.lookups.remove(&id);
                    if self.swarm.is_connected(&target) {
                        return;
                    }
                    // The lookup may have taught Kademlia an address without listing the
                    // peer among the closest: try once more before giving up.
                    if self.dial_known_peer(target, None).is_err() {
                        self.fail_peer_dials(target, P2PError::PeerNotFound(target));
                    }
                }
            }
            _ => {}
        }
    }

    async fn on_gossip(
        &mut self,
        source: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        match wire::decode_payload(&message.data, self.opts.max_event_bytes) {
            Ok(events) => {
                self.slow_peers
                    .gossiped(message.data.len(), tokio::time::Instant::now());
                if self.held.len() >= MAX_HELD_FORWARDS
                    && let Some((_, id, source)) = self.held.pop_front()
                {
                    self.accept(&id, &source);
                }
                self.held
                    .push_back((tokio::time::Instant::now() + FORWARD_HOLD, id, source));
                let counters = &self.shared.counters;
                counters.accepted_messages.fetch_add(1, Ordering::Relaxed);
                counters
                    .gossip_events
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                counters
                    .gossip_bytes
                    .fetch_add(message.data.len() as u64, Ordering::Relaxed);
                debug_log!(self.opts.debug, target: LOG_TARGET, peer = %source, events = events.len(), bytes = message.data.len(), "gossip received");
                // Valid on the wire, so it is forwarded even if our own chain refuses it.
                let events = self.take_in(events);
                // Not stored: catch-up finds them missing and fetches them again.
                let _ = self.ingest(events).await;
            }
            Err(why) => {
                // Reject: not forwarded, and the P4 penalty lands on the peer that sent it.
                // An event over our limit only is Ignore (not forwarded, no penalty): a peer
                // configured with a larger `max_event_bytes` is honest, and catch-up brings the
                // rest of its batch (and skips the large event without blame too).
                let verdict = if matches!(why, wire::Rejected::TooLarge { .. }) {
                    MessageAcceptance::Ignore
                } else {
                    MessageAcceptance::Reject
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&id, &source, verdict);
                self.shared
                    .counters
                    .rejected_messages
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %source, reason = %why, "rejected a gossip message");
            }
        }
    }

    /// Reports a held message valid: gossipsub forwards it to the mesh peers that neither sent
    /// it to us nor said they have it.
    fn accept(&mut self, id: &gossipsub::MessageId, source: &PeerId) {
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, source, MessageAcceptance::Accept);
    }

    /// Forwards the held messages that are due at `now`.
    fn release_forwards(&mut self, now: tokio::time::Instant) {
        while self.held.front().is_some_and(|h| h.0 <= now) {
            if let Some((_, id, source)) = self.held.pop_front() {
                self.accept(&id, &source);
            }
        }
    }

    /// Stores received events; emits `conflict`, `event` and `sync` for what was new. Returns
    /// whether they are stored (a storage failure is reported here; catch-up must then not
    /// count them as held).
    async fn ingest(&mut self, events: Vec<Event>) -> bool {
        if events.is_empty() {
            return true;
        }
        match self.replica.ingest(events).await {
            Ok(ingested) => {
                self.took_in(ingested);
                true
            }
            Err(e) => {
                // Part of the batch may be stored (a conflict's resolution failed after it):
                // reported now, as fetching the batch again finds those events duplicates.
                if let Some(stored) = e.ingested() {
                    self.took_in(stored.clone());
                }
                tracing::warn!(error = %e, "storing received events failed");
                self.report(e);
                false
            }
        }
    }

    /// Counts, reports and publishes (the resolutions) what `Replica::ingest` stored.
    fn took_in(&mut self, ingested: ksync_core::Ingested) {
        let c = &self.shared.counters;
        c.new_events
            .fetch_add(ingested.appended.len() as u64, Ordering::Relaxed);
        c.duplicate_events
            .fetch_add(ingested.duplicates as u64, Ordering::Relaxed);
        // Revisions written to settle conflicts are ours: publish them (they are
        // stored, so catch-up carries them if this fails).
        let resolutions: Vec<Vec<u8>> = ingested
            .resolutions
            .iter()
            .filter_map(|s| {
                if self.shaping.is_noop() {
                    return serde_json::to_vec(&s.event).ok();
                }
                match self.shaping.outgoing(s.event.clone()) {
                    Ok(wire) => wire.and_then(|e| serde_json::to_vec(&e).ok()),
                    Err(e) => {
                        tracing::warn!(error = %e, "outgoing middleware failed on a conflict resolution; not published");
                        None
                    }
                }
            })
            .collect();
        notify(&self.notifier, ingested);
        self.publish(resolutions);
    }

    // ---- catch-up -------------------------------------------------------------------------

    async fn start_session(&mut self, peer: PeerId) {
        if !self.sessions.contains_key(&peer) {
            let (at, legacy) = match self.cursors.get(&peer) {
                Some(at) => (at, false),
                None => {
                    let at = Cursor {
                        cursor: self.replica.cursor(&cursor_name(&peer)).unwrap_or(0),
                        log_id: self.replica.cursor(&log_id_name(&peer)).unwrap_or(0),
                    };
                    (at, at != Cursor::default())
                }
            };
            self.sessions.insert(
                peer,
                Session {
                    cursor: at.cursor,
                    log_id: at.log_id,
                    legacy,
                    ..Default::default()
                },
            );
        }
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if session.state != SessionState::Idle {
            session.again = true;
            return;
        }
        self.shared
            .counters
            .catch_up_rounds
            .fetch_add(1, Ordering::Relaxed);
        self.request_keys(peer);
    }

    fn request_keys(&mut self, peer: PeerId) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        session.state = SessionState::AwaitingKeys;
        let after = session.cursor;
        let request = SyncRequest::Keys {
            network: self.opts.network.clone(),
            after,
            limit: MAX_PAGE,
        };
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.requests
            .insert(id, (peer, Outstanding::Keys { after }));
    }

    async fn end_round(&mut self, peer: PeerId) {
        self.save_cursor(peer).await;
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        session.state = SessionState::Idle;
        session.page.clear();
        session.fetched.clear();
        session.round_log_id = None;
        session.round_pages = 0;
        if std::mem::take(&mut session.again) {
            self.request_keys(peer);
        }
    }

    /// Asks for the next page of the round, unless the round has taken its budget of pages
    /// (then it ends, and the next round walks on from the cursor).
    async fn next_page(&mut self, peer: PeerId) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if session.round_pages >= session.round_budget {
            tracing::debug!(%peer, pages = session.round_pages, cursor = session.cursor,
                "catch-up round took its budget of pages; the next round walks on");
            // A round cut short is not asked again at once: that would make the cap moot.
            session.again = false;
            self.end_round(peer).await;
            return;
        }
        if session.round_pages % CURSOR_SAVE_PAGES == 0 {
            self.save_cursor(peer).await;
        }
        self.request_keys(peer);
    }

    /// Stores the session's cursor and the log id it counts in (one record, see `cursors.rs`)
    /// when they differ from what is stored: at the end of a round, every `CURSOR_SAVE_PAGES`
    /// pages, when the peer goes and when the node stops, never per page. A cursor of 0 with
    /// nothing stored is not stored (a walk from the start is right in any log), so a peer
    /// with nothing to walk takes no slot. Storing a new peer's cursor when every slot is
    /// taken evicts the least recently used peer's.
    async fn save_cursor(&mut self, peer: PeerId) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let at = Cursor {
            cursor: session.cursor,
            log_id: session.log_id,
        };
        let legacy = std::mem::take(&mut session.legacy);
        let write = match self.cursors.stored(&peer) {
            Some(stored) => stored != at,
            None => at.cursor != 0,
        };
        if write {
            let storage = Arc::clone(self.replica.storage());
            match self.cursors.store(&*storage, peer, at).await {
                Ok(Some(evicted)) => {
                    tracing::debug!(%peer, %evicted, "catch-up cursor slots full; the least recently used peer's cursor is dropped");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "storing a catch-up cursor failed");
                    if let Some(session) = self.sessions.get_mut(&peer) {
                        session.legacy = legacy;
                    }
                    return;
                }
            }
        }
        if legacy {
            for name in [cursor_name(&peer), log_id_name(&peer)] {
                if let Err(e) = self.replica.remove_cursor(&name).await {
                    tracing::warn!(%peer, error = %e, "removing a catch-up cursor of the old layout failed");
                    // Tried again at the next save, as when storing the slot fails.
                    if let Some(session) = self.sessions.get_mut(&peer) {
                        session.legacy = true;
                    }
                }
            }
        }
    }

    async fn on_sync_event(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) {
        match event {
            request_response::Event::Message {
                peer,
                connection_id,
                message:
                    request_response::Message::Request {
                        request_id,
                        request,
                        channel,
                    },
            } => {
                let holder = Holder {
                    peer,
                    host: self.connection_hosts.get(&connection_id).copied(),
                };
                self.answer(holder, request_id, request, channel)
            }
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((_, outstanding)) = self.requests.remove(&request_id) else {
                    return;
                };
                match (outstanding, response) {
                    (
                        Outstanding::Keys { after },
                        SyncResponse::Keys {
                            log_id,
                            len,
                            entries,
                            through,
                        },
                    ) => {
                        let page = ReceivedPage {
                            log_id,
                            len,
                            entries,
                            through,
                        };
                        self.on_keys(peer, after, page).await;
                    }
                    (Outstanding::Fetch(keys), SyncResponse::Events { events, too_large }) => {
                        self.on_events(peer, keys, events, too_large).await;
                    }
                    (outstanding, SyncResponse::Refused { reason, busy }) => {
                        // Busy (the peer's answers in flight are at its budget) ends the
                        // round like any refusal: the cursor stays before this page, so the
                        // next round asks again and nothing is lost.
                        tracing::debug!(%peer, %reason, busy, "catch-up request refused");
                        self.forget(outstanding);
                        self.end_round(peer).await;
                    }
                    (outstanding, _) => {
                        tracing::info!(%peer, "catch-up response does not match the request");
                        self.forget(outstanding);
                        self.end_round(peer).await;
                    }
                }
                self.wake_waiting().await;
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "catch-up request failed");
                // An answer that arrived but does not decode (over the response limit, so cut
                // short, or not a message of the protocol) is the peer's doing; a dropped
                // connection or a timeout is not reported.
                if let request_response::OutboundFailure::Io(e) = &error
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::InvalidData
                            | std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::Unsupported
                            | std::io::ErrorKind::Other
                    )
                {
                    self.misbehaved(peer, format!("its catch-up answer could not be read: {e}"));
                }
                if let Some((_, outstanding)) = self.requests.remove(&request_id) {
                    self.forget(outstanding);
                }
                self.end_round(peer).await;
                self.wake_waiting().await;
            }
            // Sent, or never to be (the connection closed, the requester did not read it within
            // `request_timeout`): what the answer held is free again.
            request_response::Event::InboundFailure { request_id, .. }
            | request_response::Event::ResponseSent { request_id, .. } => {
                self.answers.release(&request_id);
            }
        }
    }

    /// [`add_kad_addresses`] with the addresses of our dialed connections to `peer`, if
    /// Kademlia is on.
    fn add_kad_addresses(&mut self, peer: &PeerId, addrs: impl IntoIterator<Item = Multiaddr>) {
        let connected: Vec<Multiaddr> = self
            .dialed_addrs
            .values()
            .filter(|(p, _)| p == peer)
            .map(|(_, a)| a.clone())
            .collect();
        let on_loopback = self.opts.listen_host.is_loopback();
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            add_kad_addresses(kad, peer, addrs, &connected, on_loopback);
        }
    }

    fn forget(&mut self, outstanding: Outstanding) {
        if let Outstanding::Fetch(keys) = outstanding {
            for key in &keys {
                self.in_flight.remove(key);
            }
        }
    }

    fn answer(
        &mut self,
        holder: Holder,
        request_id: InboundRequestId,
        request: SyncRequest,
        channel: ResponseChannel<SyncResponse>,
    ) {
        let peer = holder.peer;
        if let SyncRequest::Keys { after, limit, .. } = &request {
            // Digest up to the end of the requested page, at most `DIGEST_STEP` more events;
            // if that falls short (a long log never digested), the page is read from storage.
            let upto = after.saturating_add(u64::from((*limit).min(MAX_PAGE)));
            let short = upto.saturating_sub(self.digests.len());
            if let Err(e) = self.digests.refresh(
                self.replica.storage().as_ref(),
                usize::try_from(short)
                    .unwrap_or(usize::MAX)
                    .min(DIGEST_STEP),
            ) {
                tracing::warn!(error = %e, "reading the log for catch-up failed");
            }
        }
        let (response, held) = self.response_to(holder, request);
        if matches!(response, SyncResponse::Refused { busy: true, .. }) {
            self.shared
                .counters
                .busy_answers
                .fetch_add(1, Ordering::Relaxed);
            debug_log!(self.opts.debug, target: LOG_TARGET, %peer, held = self.answers.total,
                peer_held = self.answers.held_by(&peer),
                host_held = self.answers.held_by_host(&holder),
                max = self.opts.max_catch_up_answer_bytes,
                "catch-up request answered busy: answers in flight are at max_catch_up_answer_bytes or this peer's or host's share of it");
        }
        if self
            .swarm
            .behaviour_mut()
            .sync
            .send_response(channel, response)
            .is_err()
        {
            tracing::debug!(%peer, "catch-up requester went away before the response");
            return;
        }
        if held > 0 {
            let share = answer_share(self.opts.max_catch_up_answer_bytes);
            self.answers.hold(request_id, holder, held, share);
        }
    }

    /// The answer to `request`, and the bytes it holds until sent (its events as JSON, or
    /// its page's keys). Answers in flight are bounded by `max_catch_up_answer_bytes`, and
    /// one peer's, and one host's (all its peers' together: identities are free to make, and
    /// a host may connect `max_peers_per_ip` of them), by a share of it
    /// (`ANSWER_SHARE_DIVISOR`): one that does not fit what is left of any is cut to what
    /// does (the requester fetches the rest next, as for any answer's size limit), or, when
    /// nothing fits, refused as busy (the requester asks again in a later round). When no
    /// answer to this peer is in flight and its host's are under two shares, one always goes
    /// (a page, or at least one event), so every host's catch-up makes progress whatever
    /// other hosts hold, and a peer's whatever one peer of its host that does not read holds
    /// (see `Room::for_answer`); a host's sum can pass its share, and the node-wide sum the
    /// budget, by one answer per such peer.
    fn response_to(&self, holder: Holder, request: SyncRequest) -> (SyncResponse, usize) {
        let room = Room::for_answer(
            self.opts.max_catch_up_answer_bytes,
            self.answers.total,
            self.answers.held_by(&holder.peer),
            self.answers.held_by_host(&holder),
        );
        let busy = SyncResponse::Refused {
            reason: "busy: this peer's catch-up answers in flight are at its \
                     max_catch_up_answer_bytes, or yours (or your host's) at a share of it; \
                     ask again later"
                .into(),
            busy: true,
        };
        let (response, held) = self.build_response(holder.peer, request, room);
        match &response {
            SyncResponse::Keys { .. } if held > room.left && !room.idle => (busy, 0),
            SyncResponse::Events { events, .. } if events.is_empty() && held > 0 => (busy, 0),
            _ => (response, held),
        }
    }

    /// [`Self::response_to`] before the busy check. An `Events` answer takes the events
    /// asked for that fit `room` (at least one when it is idle); if none fits, it comes
    /// back empty with the size of the first that did not (so, busy).
    fn build_response(
        &self,
        peer: PeerId,
        request: SyncRequest,
        room: Room,
    ) -> (SyncResponse, usize) {
        let storage = self.replica.storage();
        match request {
            SyncRequest::Keys { network, .. } | SyncRequest::Fetch { network, .. }
                if network != self.opts.network =>
            {
                let refused = SyncResponse::Refused {
                    reason: format!("this peer syncs network {:?}", self.opts.network),
                    busy: false,
                };
                (refused, 0)
            }
            SyncRequest::Keys { after, limit, .. } => {
                let limit = limit.min(MAX_PAGE) as usize;
                let len = storage.len();
                let page = if self.digests.len() >= len.min(after.saturating_add(limit as u64)) {
                    self.digests.page(after, limit, MAX_PAGE_SCAN)
                } else {
                    // Digests not there yet: one storage page, filtered the same way.
                    let page = match storage.read_since(after, limit) {
                        Ok(page) => page,
                        Err(e) => {
                            let refused = SyncResponse::Refused {
                                reason: format!("storage: {e}"),
                                busy: false,
                            };
                            return (refused, 0);
                        }
                    };
                    let through = page.last().map_or(after, |s| s.seq);
                    let filter = self.shaping.filter();
                    let entries = page
                        .into_iter()
                        .filter(|s| filter.is_none_or(|f| f.allows(&s.event)))
                        .map(|s| KeyEntry {
                            seq: s.seq,
                            hash: wire::content_hash(&s.event),
                            id: s.event.id,
                            version: s.event.version,
                        })
                        .collect();
                    Page { entries, through }
                };
                // Asked past the end (our log got shorter under the same id: a backup
                // restored, a torn tail cut; re-read, as it may have grown up to `after`):
                // the real length, so the requester walks us again from 0, and no `through`,
                // as the page covers nothing of the log (`after` would be past its end).
                let now = storage.len();
                let held = keys_bytes(&page.entries);
                if page.through == after && after > now {
                    let keys = SyncResponse::Keys {
                        log_id: self.log_id,
                        len: now,
                        entries: page.entries,
                        through: None,
                    };
                    return (keys, held);
                }
                let keys = SyncResponse::Keys {
                    log_id: self.log_id,
                    // The log may have grown since its length was read.
                    len: len.max(page.through),
                    entries: page.entries,
                    through: Some(page.through),
                };
                (keys, held)
            }
            SyncRequest::Fetch { keys, .. } if keys.len() > MAX_FETCH => {
                let refused = SyncResponse::Refused {
                    reason: format!("{} keys requested, the limit is {MAX_FETCH}", keys.len()),
                    busy: false,
                };
                (refused, 0)
            }
            SyncRequest::Fetch { keys, .. } => {
                let mut events = Vec::with_capacity(keys.len());
                let mut too_large = Vec::new();
                // What this answer may carry: the protocol's limit, and what is left of the
                // node's budget for answers in flight.
                let mut budget = RESPONSE_BUDGET.min(room.left);
                let mut held = 0usize;
                for key in keys {
                    let Ok(Some(stored)) = storage.get(&key.id, key.version) else {
                        continue;
                    };
                    let event = if self.shaping.is_noop() {
                        stored.event
                    } else {
                        match self.shaping.outgoing(stored.event) {
                            Ok(Some(event)) => event,
                            // Kept home by the filter or a middleware: never sent.
                            Ok(None) => {
                                too_large.push(key);
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, id = %key.id, "outgoing middleware failed on an event catch-up asked for; not sent");
                                too_large.push(key);
                                continue;
                            }
                        }
                    };
                    let size = event.json_len();
                    // An event over our own limit (stored through `KSync::emit`, which stores
                    // before `broadcast` refuses it, or received under a larger limit) is not
                    // served, as it is not published: listed in `too_large`, so the requester
                    // counts it done instead of taking it for a lie.
                    if size > self.opts.max_event_bytes {
                        tracing::info!(%peer, id = %key.id, version = key.version, size,
                            max = self.opts.max_event_bytes,
                            "an event catch-up asked for is over max_event_bytes; not sent");
                        too_large.push(key);
                        continue;
                    }
                    if size > RESPONSE_BUDGET {
                        too_large.push(key);
                        continue;
                    }
                    if size > budget && !(room.idle && events.is_empty()) {
                        if events.is_empty() {
                            // Nothing fits: busy (see `response_to`).
                            held = size;
                        }
                        break;
                    }
                    budget = budget.saturating_sub(size);
                    held += size;
                    events.push(event);
                }
                (SyncResponse::Events { events, too_large }, held)
            }
        }
    }

    async fn on_keys(&mut self, peer: PeerId, after: u64, page: ReceivedPage) {
        let ReceivedPage {
            log_id,
            len,
            entries,
            through,
        } = page;
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        // The cursor moves to the page's end, so a page that does not rise past the
        // request (or a log id that keeps changing, which restarts the walk) would have us
        // ask again forever: such an answer is refused and the round ends.
        let checked = match session.round_log_id {
            Some(first) if first != log_id => Err(format!(
                "its log id changed from {first} to {log_id} within one catch-up round"
            )),
            // Asked past the end of its log (it got shorter under the same id): an empty page
            // without `through`, or one that stays at `after`, is honest; the restart below
            // walks the log again from 0.
            _ if past_the_end(after, &entries, through, len) => Ok(after),
            _ => check_page(after, MAX_PAGE, &entries, through, len),
        };
        let through = match checked {
            Ok(through) => through,
            Err(reason) => {
                self.misbehaved(peer, reason);
                self.end_round(peer).await;
                return;
            }
        };
        let first = session.round_log_id.is_none();
        session.round_log_id = Some(log_id);
        session.round_pages = session.round_pages.saturating_add(1);
        let mut restart = false;
        if session.log_id != log_id || session.cursor > len {
            // Another log than the one our cursor counts in (the peer lost its storage, or we
            // never met, or its cursor was evicted): walk it from the start. Nothing is stored
            // yet (see `save_cursor`).
            restart = session.cursor != 0;
            session.log_id = log_id;
            session.cursor = 0;
        }
        if first {
            session.round_budget = round_budget(session.cursor, len);
        }
        if restart {
            self.next_page(peer).await;
            return;
        }
        if entries.is_empty() {
            if through > after {
                // Only events the peer keeps home: nothing to fetch, walk on past them.
                session.cursor = through;
                self.next_page(peer).await;
            } else {
                self.end_round(peer).await;
            }
            return;
        }
        session.page = entries;
        session.page_through = through;
        session.fetched.clear();
        self.continue_page(peer).await;
    }

    /// Fetches what the current page lacks, or moves the cursor past it when nothing is
    /// missing.
    async fn continue_page(&mut self, peer: PeerId) {
        let storage = Arc::clone(self.replica.storage());
        // Until the digests cover our whole log, revisions they lack are looked up in storage.
        let complete = match self.digests.refresh(storage.as_ref(), DIGEST_STEP) {
            Ok(complete) => complete,
            Err(e) => {
                tracing::warn!(error = %e, "reading the log for catch-up failed");
                false
            }
        };
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let mut to_fetch = Vec::new();
        let mut elsewhere = false;
        let now = tokio::time::Instant::now();
        let mut wait_until = None;
        for entry in &session.page {
            let ours = match self.digests.get(&entry.id, entry.version) {
                Some(digest) => Some(digest),
                None if complete => None,
                None => match storage.get(&entry.id, entry.version) {
                    Ok(Some(stored)) => Some(wire::content_hash(&stored.event)),
                    _ => None,
                },
            };
            if ours == Some(entry.hash) {
                continue;
            }
            let key = entry.key();
            if session.fetched.contains(&key) {
                continue;
            }
            match self.in_flight.get(&key) {
                Some(sent) if *sent + IN_FLIGHT_PATIENCE > now => {
                    elsewhere = true;
                    let until = *sent + IN_FLIGHT_PATIENCE;
                    wait_until =
                        Some(wait_until.map_or(until, |w: tokio::time::Instant| w.min(until)));
                }
                _ if to_fetch.len() < MAX_FETCH => to_fetch.push(key),
                _ => {}
            }
        }
        if !to_fetch.is_empty() {
            for key in &to_fetch {
                self.in_flight.insert(key.clone(), now);
            }
            session.state = SessionState::AwaitingEvents;
            let request = SyncRequest::Fetch {
                network: self.opts.network.clone(),
                keys: to_fetch.clone(),
            };
            let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
            self.requests
                .insert(id, (peer, Outstanding::Fetch(to_fetch)));
        } else if elsewhere {
            session.state = SessionState::Waiting;
            if let Some(until) = wait_until {
                self.wait_deadline = Some(self.wait_deadline.map_or(until, |w| w.min(until)));
            }
        } else {
            // (An empty page never gets here: `on_keys` walks past it.)
            let last = if session.page.is_empty() {
                session.cursor
            } else {
                session.page_through
            };
            session.cursor = last;
            session.page.clear();
            session.fetched.clear();
            self.next_page(peer).await;
        }
    }

    async fn on_events(
        &mut self,
        peer: PeerId,
        requested: Vec<RevisionKey>,
        events: Vec<Event>,
        too_large: Vec<RevisionKey>,
    ) {
        for key in &requested {
            self.in_flight.remove(key);
        }
        let requested: HashSet<RevisionKey> = requested.into_iter().collect();
        let mut valid = Vec::with_capacity(events.len());
        let mut received = HashSet::with_capacity(events.len());
        let (mut unrequested, mut repeated, mut invalid) = (0usize, 0usize, 0usize);
        let mut oversized = Vec::new();
        for event in events {
            let key = event.key();
            if !requested.contains(&key) {
                unrequested += 1;
                continue;
            }
            // The first copy of a revision is taken. Later ones would each conflict with our
            // copy (and the storage clones our revision into every conflict: a 20 MiB answer of
            // tiny copies of one large revision would cost gigabytes).
            if !received.insert(key) {
                repeated += 1;
                continue;
            }
            // Stored by the peer, maybe under older rules (data 128 deep): the receive check.
            if event.validate_received(&self.limits).is_err() {
                invalid += 1;
                continue;
            }
            // Over our limit is no lie: the peer's limit may be larger. Skipped, and said so.
            if event.json_len() > self.opts.max_event_bytes {
                oversized.push(event.key());
                continue;
            }
            valid.push(event);
        }
        if !oversized.is_empty() {
            tracing::info!(%peer, skipped = oversized.len(), max = self.opts.max_event_bytes,
                "catch-up answer held events over max_event_bytes; skipped");
            // An `error` notification without `status: error`: nothing failed here.
            self.notifier
                .emit(Notification::Error(Arc::new(SyncError::from(
                    P2PError::ReceivedTooLarge {
                        peer,
                        keys: oversized,
                        max: self.opts.max_event_bytes,
                    },
                ))));
        }
        // Only keys we asked for count as too large: others would each be remembered for the
        // page (up to a 20 MiB answer of them) and make an empty answer look like progress, so
        // the same `Fetch` would be sent forever.
        let answered = too_large.len();
        let mut too_large = too_large;
        too_large.retain(|key| requested.contains(key));
        let unrequested_large = answered - too_large.len();
        if unrequested + repeated + invalid + unrequested_large > 0 {
            self.misbehaved(
                peer,
                format!(
                    "its answer held {unrequested} events not asked for, {repeated} repeated \
                     revisions, {invalid} invalid events and {unrequested_large} keys not \
                     asked for called too large (all skipped)"
                ),
            );
        }
        let got_any = !received.is_empty() || !too_large.is_empty();
        self.shared
            .counters
            .catch_up_events
            .fetch_add(valid.len() as u64, Ordering::Relaxed);
        let valid = self.take_in(valid);
        let stored = self.ingest(valid).await;
        if !stored {
            // Nothing of this answer counts as held: the round ends with the cursor before
            // this page, so the next round asks for these events again.
            self.end_round(peer).await;
            return;
        }
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        // Received (even invalid) and too-large keys are done for this page; keys the peer
        // left out for room are fetched again.
        session.fetched.extend(received);
        session.fetched.extend(too_large);
        if got_any {
            self.continue_page(peer).await;
        } else {
            self.end_round(peer).await;
        }
    }

    /// Reports what a peer sent that no honest peer sends (a catch-up answer, a name another
    /// peer holds; see [`P2PError::PeerMisbehaved`]).
    fn misbehaved(&self, peer: PeerId, reason: String) {
        tracing::info!(%peer, %reason, "refused what a peer sent");
        self.report(SyncError::from(P2PError::PeerMisbehaved { peer, reason }));
    }

    /// `status: error`, then the `error` notification. The status says `syncing` or `idle`
    /// again when catch-up next starts or ends (see `update_status`).
    fn report(&self, error: SyncError) {
        self.notifier.emit(Notification::Status(Status::Error));
        self.notifier.emit(Notification::Error(Arc::new(error)));
    }

    /// Sessions waiting on keys another session fetched look at their page again.
    async fn wake_waiting(&mut self) {
        let waiting: Vec<PeerId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.state == SessionState::Waiting)
            .map(|(p, _)| *p)
            .collect();
        for peer in waiting {
            self.continue_page(peer).await;
        }
    }
}

/// A `Keys` answer (see `SyncResponse::Keys`).
struct ReceivedPage {
    log_id: u64,
    len: u64,
    entries: Vec<KeyEntry>,
    through: Option<u64>,
}

/// How many `Keys` pages a round may take, from the cursor it walks from and the log length
/// the peer's first answer gave: the pages an honest walk to that length needs (each page
/// short of the end covers at least `MAX_PAGE` sequence numbers, see `check_page`), plus
/// `ROUND_SLACK_PAGES`, at most `MAX_ROUND_PAGES`.
fn round_budget(cursor: u64, len: u64) -> u32 {
    let need = len
        .saturating_sub(cursor)
        .div_ceil(u64::from(MAX_PAGE))
        .saturating_add(ROUND_SLACK_PAGES);
    u32::try_from(need).map_or(MAX_ROUND_PAGES, |n| n.min(MAX_ROUND_PAGES))
}

/// Checks a `Keys` page against the request it answers: at most `limit` entries, sequence
/// numbers rising, all past `after`, and a `through` (if given) no earlier than the last
/// entry and no later than the log's `len` (a responder that sends `through` counts its
/// length past its page). (Without `through`, not against `len`: such a responder may read
/// its length first, and its log grow before the page is read.) A page that ends before `len`
/// must be full: `limit` entries, or at least `limit` sequence numbers covered (an honest
/// responder stops short of that only at its log's end), else a peer could walk us one
/// sequence number per request through a log it says is endless. Returns where the page ends.
fn check_page(
    after: u64,
    limit: u32,
    entries: &[KeyEntry],
    through: Option<u64>,
    len: u64,
) -> Result<u64, String> {
    if entries.len() > limit as usize {
        return Err(format!(
            "a page of {} keys, at most {limit} were asked for",
            entries.len()
        ));
    }
    let mut previous = after;
    for entry in entries {
        if entry.seq <= previous {
            return Err(format!(
                "a page after seq {after} lists seq {} after seq {previous}",
                entry.seq
            ));
        }
        previous = entry.seq;
    }
    match through {
        None => Ok(previous),
        Some(through) if through < previous => Err(format!(
            "a page after seq {after} ends at seq {through}, before its last entry (seq {previous}) or the request"
        )),
        Some(through) if through > len => Err(format!(
            "a page through seq {through} of a log of {len} events"
        )),
        Some(through) => Ok(through),
    }
    .and_then(|end| {
        let covered = end - after;
        if end < len && entries.len() < limit as usize && covered < u64::from(limit) {
            Err(format!(
                "a page after seq {after} ends at seq {end} with {} keys, short of its log of \
                 {len} events: a page before the end lists {limit} keys or covers {limit} \
                 sequence numbers",
                entries.len()
            ))
        } else {
            Ok(end)
        }
    })
}

/// Whether a `Keys` answer says that `after` is past the end of the responder's log: its
/// `len` is below `after` and the page lists nothing and ends nowhere else. (A page that
/// lists entries or ends elsewhere is left to `check_page`.)
fn past_the_end(after: u64, entries: &[KeyEntry], through: Option<u64>, len: u64) -> bool {
    after > len && entries.is_empty() && through.is_none_or(|through| through == after)
}

/// Like `Ingested::notify` (`conflict`s, one `event` per new event, then one `sync`), but
/// builds only the notifications someone listens to, and moves the new events into their
/// `event` notifications instead of copying them (a `sync` listener gets the only copies).
fn notify(notifier: &Notifier, ingested: ksync_core::Ingested) {
    for conflict in &ingested.conflicts {
        notifier.emit(Notification::Conflict(conflict.clone()));
    }
    if ingested.appended.is_empty() {
        return;
    }
    let sync = notifier
        .wants(ksync_core::NotificationKind::Sync)
        .then(|| ingested.new_events());
    if notifier.wants(ksync_core::NotificationKind::Event) {
        for stored in ingested.appended {
            notifier.emit(Notification::Event(stored.event));
        }
    }
    if let Some(events) = sync {
        notifier.emit(Notification::Sync(events));
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The current connected peers, as the node last saw them.
pub(crate) fn peers_of(shared: &Shared) -> Vec<PeerId> {
    lock(&shared.peers).iter().copied().collect()
}

/// The current listen addresses.
pub(crate) fn listen_addrs_of(shared: &Shared) -> Vec<Multiaddr> {
    lock(&shared.listen_addrs).clone()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use libp2p::core::ConnectedPoint;

    use super::*;
    use crate::config::DEFAULT_NETWORK;

    fn dht_options() -> Options {
        Options {
            peer_id: "port-test".into(),
            discovery: DiscoveryMethod::Dht {
                bootstrap: Vec::new(),
            },
            port: 0,
            listen_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            network: DEFAULT_NETWORK.into(),
            network_key: None,
            key_dir: std::env::temp_dir(),
            anti_entropy_interval: Duration::from_secs(15),
            max_peers: 8,
            max_peers_per_ip: crate::DEFAULT_MAX_PEERS_PER_IP,
            max_peer_cursors: crate::DEFAULT_MAX_PEER_CURSORS,
            max_event_bytes: 64 * 1024,
            max_catch_up_answer_bytes: crate::DEFAULT_MAX_CATCH_UP_ANSWER_BYTES,
            max_gossip_queue_bytes: crate::DEFAULT_MAX_GOSSIP_QUEUE_BYTES,
            max_gossip_total_bytes: crate::DEFAULT_MAX_GOSSIP_TOTAL_BYTES,
            command_capacity: 16,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            metrics_interval: crate::config::DEFAULT_METRICS_INTERVAL,
            debug: false,
            redial_min: crate::DEFAULT_REDIAL_DELAY.0,
            redial_max: crate::DEFAULT_REDIAL_DELAY.1,
        }
    }

    /// Gossipsub's queue to a peer also carries our publishes and IHAVE/IWANT, so it is never
    /// shorter than 256 messages: at 51 (16 MiB of 320 KiB messages) a peer briefly behind on
    /// ordinary ~1 KiB events lost forwards, and one slow peer made a publish fail.
    #[test]
    fn the_gossip_queue_holds_at_least_256_messages() {
        let mut opts = dht_options();
        assert_eq!(gossip_queue_len(&opts), 256, "at the defaults");
        opts.max_gossip_queue_bytes = 1;
        assert_eq!(gossip_queue_len(&opts), 256, "at the smallest byte cap");
        opts.max_gossip_queue_bytes = usize::MAX;
        assert_eq!(gossip_queue_len(&opts), 5000, "gossipsub's own cap");
    }

    /// Peers whose queue overflowed count at queue length x the largest recent message; past
    /// the bound, those that dropped the most go first, just enough of them;
    /// a peer not reported for `SLOW_PEER_WINDOW` stops counting.
    #[test]
    fn slow_peers_over_the_bound_go_those_that_dropped_most_first() {
        let now = tokio::time::Instant::now();
        let [a, b, c, quiet] = [(); 4].map(|_| PeerId::random());
        let mut slow = SlowPeers::default();
        for peer in [a, b, c, quiet] {
            slow.connected(peer);
        }
        slow.gossiped(1000 - MESSAGE_OVERHEAD, now);
        slow.overflowed(&a, 5, now);
        slow.overflowed(&b, 9, now);
        slow.overflowed(&c, 1, now);
        // 3 counted at 10 x 1000 bytes; 25,000 fits two.
        assert_eq!(slow.over(10, 25_000, now), vec![b]);
        slow.overflowed(&b, 50, now);
        assert_eq!(
            slow.over(10, 25_000, now),
            Vec::<PeerId>::new(),
            "b, leaving, no longer counts, even reported again"
        );
        let later = now + SLOW_PEER_WINDOW + Duration::from_secs(1);
        slow.gossiped(1000 - MESSAGE_OVERHEAD, later);
        slow.overflowed(&c, 1, later);
        assert_eq!(
            slow.over(10, 5_000, later),
            vec![c],
            "a, not reported since, no longer counts"
        );
        slow.disconnected(&a);
        slow.overflowed(&a, 100, later);
        assert_eq!(slow.over(10, 0, later), Vec::<PeerId>::new(), "gone");
    }

    /// One large message long ago does not make every peer that falls behind later count as
    /// if its queue held 256 of them: four peers whose queues hold small messages fit the
    /// default bound. Before, each counted at 256 x the largest message since it connected.
    #[test]
    fn slow_peers_count_the_largest_message_of_recent_gossip() {
        let now = tokio::time::Instant::now();
        let peers = [(); 4].map(|_| PeerId::random());
        let mut slow = SlowPeers::default();
        for peer in peers {
            slow.connected(peer);
        }
        slow.gossiped(320 * 1024, now);
        let later = now + Duration::from_secs(3600);
        slow.gossiped(100, later);
        for peer in &peers {
            slow.overflowed(peer, 10, later);
        }
        assert_eq!(
            slow.over(256, crate::DEFAULT_MAX_GOSSIP_TOTAL_BYTES, later),
            Vec::<PeerId>::new(),
            "four queues of small messages fit 256 MiB"
        );
    }

    /// A peer let go stays counted (its queue is held until its connection closes) but is not
    /// chosen again, and its reports after that do not make another peer go while its close
    /// is under way; one whose close hangs past `SLOW_PEER_WINDOW` holds its queue, so the
    /// others must fit beside it.
    #[test]
    fn slow_peers_a_peer_let_go_stays_counted_and_is_not_chosen_again() {
        let now = tokio::time::Instant::now();
        let [a, b] = [(); 2].map(|_| PeerId::random());
        let mut slow = SlowPeers::default();
        for peer in [a, b] {
            slow.connected(peer);
        }
        slow.gossiped(1000 - MESSAGE_OVERHEAD, now);
        slow.overflowed(&a, 1, now);
        slow.overflowed(&b, 9, now);
        assert_eq!(slow.over(10, 15_000, now), vec![b], "one of 10,000 fits");
        // Heartbeats while b's connection closes: b is reported again (its drops restart),
        // a's accumulate; a is not let go for b.
        for s in 1..=SLOW_PEER_WINDOW.as_secs() {
            let at = now + Duration::from_secs(s);
            slow.overflowed(&a, 5, at);
            slow.overflowed(&b, 1, at);
            assert_eq!(slow.over(10, 15_000, at), Vec::<PeerId>::new(), "{s} s");
        }
        // b's close hung: its queue is still held, a does not fit beside it; b is not chosen.
        let hung = now + SLOW_PEER_WINDOW + Duration::from_secs(2);
        slow.overflowed(&a, 5, hung);
        slow.overflowed(&b, 500, hung);
        assert_eq!(
            slow.over(10, 25_000, hung),
            Vec::<PeerId>::new(),
            "both fit"
        );
        assert_eq!(slow.over(10, 15_000, hung), vec![a]);
    }

    /// A peer let go that connects again before its old connection finished closing (its
    /// old connection then closes with one left, so it is never "disconnected") is counted
    /// afresh and may be chosen again; before, it stayed `leaving` for as long as it stayed.
    #[test]
    fn slow_peers_a_peer_let_go_that_is_back_starts_afresh() {
        let now = tokio::time::Instant::now();
        let [a, b] = [(); 2].map(|_| PeerId::random());
        let mut slow = SlowPeers::default();
        for peer in [a, b] {
            slow.connected(peer);
        }
        slow.gossiped(1000 - MESSAGE_OVERHEAD, now);
        slow.overflowed(&a, 1, now);
        slow.overflowed(&b, 9, now);
        assert_eq!(slow.over(10, 15_000, now), vec![b]);
        // b is back on a new connection while the old one closes.
        slow.connected(b);
        let later = now + SLOW_PEER_WINDOW + Duration::from_secs(2);
        slow.gossiped(1000 - MESSAGE_OVERHEAD, later);
        slow.overflowed(&a, 1, later);
        slow.overflowed(&b, 9, later);
        assert_eq!(
            slow.over(10, 15_000, later),
            vec![b],
            "b counted and chosen again"
        );
    }

    /// A peer with no answer in flight gets one whatever the budget (1 byte: every request
    /// was busy), and whatever another peer of its host that does not read holds (up to its
    /// share: every other peer of that host was answered busy in every round); a host
    /// holding twice its share gets no more.
    #[test]
    fn an_idle_peer_gets_one_answer_unless_its_host_holds_two_shares() {
        for budget in 1..8 {
            assert!(Room::for_answer(budget, 0, 0, 0).idle, "budget {budget}");
        }
        let budget = crate::DEFAULT_MAX_CATCH_UP_ANSWER_BYTES;
        let share = budget / ANSWER_SHARE_DIVISOR;
        // Another peer of the host holds its whole share (and one answer past it).
        assert!(Room::for_answer(budget, share, 0, share).idle);
        assert!(Room::for_answer(budget, share, 0, share + share / 2).idle);
        assert!(!Room::for_answer(budget, 2 * share, 0, 2 * share).idle);
        assert!(!Room::for_answer(budget, 10, 10, 10).idle, "one in flight");
        assert_eq!(
            Room::for_answer(budget, 0, 0, share).left,
            0,
            "nothing past one"
        );
    }

    /// The node's swarm, listening on 127.0.0.1 (port 0), and its listen address.
    async fn listening_swarm() -> (Swarm<Behaviour>, Multiaddr) {
        let mut swarm = build_swarm(Keypair::generate_ed25519(), &dht_options(), Arc::default())
            .expect("swarm");
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("addr"))
            .expect("listen");
        loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                return (swarm, address);
            }
        }
    }

    fn tcp_port(addr: &Multiaddr) -> u16 {
        addr.iter()
            .find_map(|p| match p {
                Protocol::Tcp(port) => Some(port),
                _ => None,
            })
            .expect("a TCP address")
    }

    /// A dialer knows a listening peer only through Kademlia's routing table; `dial_through`
    /// makes one of its behaviours dial it with that behaviour's own (default) dial options.
    /// Returns the dialer's listen port and the remote port the listener saw.
    async fn ports_of_a_behaviour_dial(
        dial_through: impl FnOnce(&mut Behaviour, PeerId),
    ) -> (u16, u16) {
        let (mut dialer, dialer_addr) = listening_swarm().await;
        let (mut listener, listener_addr) = listening_swarm().await;
        let dialer_id = *dialer.local_peer_id();
        let listener_id = *listener.local_peer_id();
        let behaviour = dialer.behaviour_mut();
        behaviour
            .kad
            .as_mut()
            .expect("DHT discovery")
            .add_address(&listener_id, listener_addr);
        dial_through(behaviour, listener_id);
        let seen_from = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    _ = dialer.select_next_some() => {}
                    event = listener.select_next_some() => {
                        if let SwarmEvent::ConnectionEstablished {
                            peer_id,
                            endpoint: ConnectedPoint::Listener { send_back_addr, .. },
                            ..
                        } = event
                            && peer_id == dialer_id
                        {
                            return send_back_addr;
                        }
                    }
                }
            }
        })
        .await
        .expect("the dialer connects in time");
        (tcp_port(&dialer_addr), tcp_port(&seen_from))
    }

    #[test]
    fn a_round_takes_the_pages_its_peer_log_needs_plus_slack_at_most_the_cap() {
        assert_eq!(round_budget(0, 0), 16);
        assert_eq!(round_budget(0, 8192), 8 + 16);
        assert_eq!(round_budget(9000, 8192), 16, "a cursor past len restarts");
        assert_eq!(round_budget(0, u64::MAX), MAX_ROUND_PAGES);
    }

    #[test]
    fn a_page_short_of_the_log_end_must_be_full() {
        let entry = |seq| KeyEntry {
            seq,
            id: format!("e{seq}"),
            version: 1,
            hash: 0,
        };
        // One sequence number on, of an endless log: refused.
        assert!(check_page(7, MAX_PAGE, &[], Some(8), u64::MAX).is_err());
        assert!(check_page(7, MAX_PAGE, &[entry(8)], None, u64::MAX).is_err());
        // A run kept home (a page's worth of sequence numbers), the log's end, a full page.
        assert_eq!(
            check_page(7, MAX_PAGE, &[], Some(7 + 1024), u64::MAX),
            Ok(1031)
        );
        assert_eq!(check_page(7, MAX_PAGE, &[entry(8)], Some(9), 9), Ok(9));
        assert_eq!(check_page(7, MAX_PAGE, &[], Some(7), 7), Ok(7));
        let full: Vec<KeyEntry> = (8..8 + 1024).map(entry).collect();
        assert_eq!(check_page(7, MAX_PAGE, &full, None, u64::MAX), Ok(1031));
    }

    #[test]
    fn only_an_empty_page_that_stays_put_is_past_the_end() {
        let entry = KeyEntry {
            seq: 11,
            id: "e".into(),
            version: 1,
            hash: 0,
        };
        // Asked after 10 of a log of 3: no `through`, or `through` at `after`.
        assert!(past_the_end(10, &[], None, 3));
        assert!(past_the_end(10, &[], Some(10), 3));
        // Within the log, or a page that lists or moves: for `check_page` to judge.
        assert!(!past_the_end(3, &[], Some(3), 3));
        assert!(!past_the_end(10, &[], Some(11), 3));
        assert!(!past_the_end(10, &[], Some(3), 3));
        assert!(!past_the_end(10, &[entry], None, 3));
    }

    #[tokio::test]
    async fn request_response_dials_leave_from_a_new_port() {
        let (listen_port, seen_port) = ports_of_a_behaviour_dial(|behaviour, peer| {
            behaviour.sync.send_request(
                &peer,
                SyncRequest::Keys {
                    network: DEFAULT_NETWORK.into(),
                    after: 0,
                    limit: 1,
                },
            );
        })
        .await;
        assert_ne!(
            seen_port, listen_port,
            "a request-response dial left from the listen port"
        );
    }

    #[tokio::test]
    async fn kademlia_dials_leave_from_a_new_port() {
        let (listen_port, seen_port) = ports_of_a_behaviour_dial(|behaviour, _| {
            behaviour
                .kad
                .as_mut()
                .expect("DHT discovery")
                .get_closest_peers(PeerId::random());
        })
        .await;
        assert_ne!(
            seen_port, listen_port,
            "a Kademlia dial left from the listen port"
        );
    }

    /// A DHT peer storing a record on the node (Kademlia PUT_VALUE): the node kept it (up to
    /// 1,024 records of up to 16 KiB, a Kademlia message, from anyone, for their whole
    /// lifetime) and served it to others, though kSync reads no record (the DHT is for
    /// finding peers). The put is still answered as stored, as libp2p does.
    #[tokio::test]
    async fn records_peers_put_are_not_kept() {
        use libp2p::kad::store::RecordStore;

        let (mut stranger, _) = listening_swarm().await;
        let (mut node, node_addr) = listening_swarm().await;
        let node_id = *node.local_peer_id();
        let key = kad::RecordKey::new(&"free storage");
        let kad = stranger.behaviour_mut().kad.as_mut().expect("DHT");
        kad.add_address(&node_id, node_addr);
        kad.put_record(
            kad::Record::new(key.clone(), vec![7; 8 * 1024]),
            kad::Quorum::One,
        )
        .expect("stored locally first");
        let put = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    event = stranger.select_next_some() => {
                        if let SwarmEvent::Behaviour(BehaviourEvent::Kad(
                            kad::Event::OutboundQueryProgressed {
                                result: kad::QueryResult::PutRecord(result),
                                ..
                            },
                        )) = event
                        {
                            return result;
                        }
                    }
                    _ = node.select_next_some() => {}
                }
            }
        })
        .await
        .expect("the put ends in time");
        assert!(put.is_ok(), "the node answered the put: {put:?}");
        let store = node.behaviour_mut().kad.as_mut().expect("DHT").store_mut();
        assert!(
            store.get(&key).is_none(),
            "the node kept a stranger's record"
        );
    }
}
