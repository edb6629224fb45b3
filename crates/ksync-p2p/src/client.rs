//! `P2PSyncClient`: the handle applications hold, and its builder.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ksync_core::{
    BoxFuture, Direction, Event, EventLimits, Filter, InMemoryStorage, Middleware, Name,
    Notification, Notifier, Replica, Status, SyncClient, SyncError,
};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::{
    DEFAULT_ANTI_ENTROPY_INTERVAL, DEFAULT_COMMAND_CAPACITY, DEFAULT_LISTEN_HOST,
    DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_PEERS, DEFAULT_MAX_PEERS_PER_IP, DEFAULT_NETWORK,
    DEFAULT_REDIAL_DELAY, DiscoveryMethod, NetworkKey, Options, default_key_dir,
};
use crate::error::P2PError;
use crate::identity;
use crate::node::{self, Command, Node, Shared, Target};
use crate::shaping::Shaping;
use crate::wire::RESPONSE_BUDGET;

/// Longest interval or timeout a P2P client takes (a day): see
/// [`P2PSyncClientBuilder::anti_entropy_interval`].
pub use ksync_core::MAX_CONFIG_DURATION;
/// Counters of one client since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct P2PStats {
    /// Gossip messages published (each holds a batch of events).
    pub published_messages: u64,
    /// Events published.
    pub published_events: u64,
    /// Gossip messages received and accepted.
    pub accepted_messages: u64,
    /// Gossip messages received and rejected (malformed, oversized, invalid events).
    pub rejected_messages: u64,
    /// Events received by gossip (before deduplication).
    pub gossip_events: u64,
    /// Events received by catch-up (before deduplication).
    pub catch_up_events: u64,
    /// Received events that were new to the replica.
    pub new_events: u64,
    /// Received events the replica already held.
    pub duplicate_events: u64,
    /// Catch-up rounds started.
    pub catch_up_rounds: u64,
    /// Catch-up requests of peers answered busy: the answer would have taken this node over
    /// `max_catch_up_answer_bytes` or the peer, or its host, over its share of it (the peer
    /// asks again in a later round).
    pub busy_answers: u64,
    /// Dials of peers `connect_to_peer` reached, made after their connection dropped (see
    /// [`P2PSyncClientBuilder::redial_delay`]).
    pub redials: u64,
}

/// Builds a [`P2PSyncClient`] from the spec's options (and a few more, with defaults).
#[derive(Debug, Clone)]
pub struct P2PSyncClientBuilder {
    opts: Options,
    encryption: bool,
    replica: Option<Replica>,
    filter: Option<Filter>,
}

impl P2PSyncClientBuilder {
    /// The spec's `filter`: only events it allows are published, served in catch-up, or taken
    /// in from peers. It sees events as the application made them: going out before the
    /// outgoing middleware, coming in after the incoming middleware (the form stored). Events
    /// kept home stay in the local log.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// The port to listen on (spec: `port`). Default 0: any free port.
    pub fn port(mut self, port: u16) -> Self {
        self.opts.port = port;
        self
    }

    /// The address to listen on. Default `0.0.0.0` (every interface): a peer that others
    /// cannot reach syncs with nobody. Use `127.0.0.1` for a single host.
    pub fn listen_host(mut self, host: IpAddr) -> Self {
        self.opts.listen_host = host;
        self
    }

    /// Spec: `encryption`. `true` makes this a private network: connections need the
    /// [`network_key`](Self::network_key) (required then). Without it, connections are still
    /// Noise-encrypted hop by hop, but anyone may join.
    pub fn encryption(mut self, on: bool) -> Self {
        self.encryption = on;
        self
    }

    /// The private network's key (used when `encryption` is on).
    pub fn network_key(mut self, key: NetworkKey) -> Self {
        self.opts.network_key = Some(key);
        self
    }

    /// The network name: peers sync only with peers of the same network (it names the gossip
    /// topic). Default `ksync`.
    pub fn network(mut self, name: impl Into<String>) -> Self {
        self.opts.network = name.into();
        self
    }

    /// Where the identity key file is kept (`<dir>/<peer_id>.p2p-key`). Default
    /// [`default_key_dir`](crate::default_key_dir).
    pub fn key_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.opts.key_dir = dir.into();
        self
    }

    /// How often a catch-up round runs with every connected peer (one also runs on every new
    /// connection). Default 15 s. This and the other intervals and timeouts: positive, at most
    /// [`MAX_CONFIG_DURATION`] (`build` refuses others).
    pub fn anti_entropy_interval(mut self, every: Duration) -> Self {
        self.opts.anti_entropy_interval = every;
        self
    }

    /// How often `metrics` is notified: events published plus received (gossip and catch-up)
    /// per second, bytes sent plus received per second (gossip payloads, and catch-up requests
    /// and answers as encoded on their streams), and the mean ping round trip to the connected
    /// peers, each over the period. Default 5 s.
    pub fn metrics_interval(mut self, every: Duration) -> Self {
        self.opts.metrics_interval = every;
        self
    }

    /// The spec's `debug`: log what is gossiped and taken in at `debug` level (target
    /// `ksync_p2p::node`) instead of `trace`. Default false.
    pub fn debug(mut self, on: bool) -> Self {
        self.opts.debug = on;
        self
    }

    /// Most established connections. Default 64.
    pub fn max_peers(mut self, max: u32) -> Self {
        self.opts.max_peers = max;
        self
    }

    /// Most peers connected from one host, both ways, and most incoming connections from it
    /// in their handshake at once. Default 8
    /// ([`DEFAULT_MAX_PEERS_PER_IP`](crate::DEFAULT_MAX_PEERS_PER_IP)); at least 1. A host is
    /// an IPv4 address (IPv4-mapped IPv6 included) or an IPv6 /64; loopback counts like any
    /// other, so raise this to run more peers on one machine. Without it one machine could
    /// take all `max_peers` slots with fresh peer ids and keep honest peers out. Overflow: a
    /// new peer's connection from a host at its cap is closed after its handshake (a dial
    /// `connect_to_peer` asked for fails, its error naming `max_peers_per_ip`), a handshake
    /// beyond the cap is closed when accepted; a peer's second connection is let in whenever
    /// its first is. The first refusal of a host is logged at `warn`, later ones at `debug`
    /// until the host holds no connection.
    pub fn max_peers_per_ip(mut self, max: u32) -> Self {
        self.opts.max_peers_per_ip = max;
        self
    }

    /// Most peers whose catch-up cursor (how far we hold their log) is kept in the replica's
    /// metadata, one record each. Default 1,024
    /// ([`DEFAULT_MAX_PEER_CURSORS`](crate::DEFAULT_MAX_PEER_CURSORS)); at least 1. A new
    /// peer beyond it takes the record of the least recently used one, which is walked from
    /// the start of its log at its next session: pages walked again, never an event lost or
    /// stored twice. Keep it above `max_peers`, or connected peers evict each other's cursors.
    /// A record this version cannot read (a later version's) is left as it is and not counted.
    pub fn max_peer_cursors(mut self, max: usize) -> Self {
        self.opts.max_peer_cursors = max;
        self
    }

    /// Largest event (JSON-encoded bytes) sent or accepted. Default 64 KiB; at least 1 and
    /// at most 8 MiB (what one catch-up answer carries: a larger event could be broadcast but
    /// never caught up on).
    pub fn max_event_bytes(mut self, max: usize) -> Self {
        self.opts.max_event_bytes = max;
        self
    }

    /// Most bytes of catch-up answers this node holds at once for all its peers, counted as
    /// the JSON of their events (on the wire, CBOR, up to 9/4 of that). Default 64 MiB
    /// ([`DEFAULT_MAX_CATCH_UP_ANSWER_BYTES`](crate::DEFAULT_MAX_CATCH_UP_ANSWER_BYTES)); at
    /// least `max_event_bytes` (`build` refuses less). One peer's answers hold at most an
    /// eighth of it, and so do one host's (all its peers together, as `max_peers_per_ip`
    /// counts hosts, loopback included), so a peer that asks on all its streams and never
    /// reads, or a host that does so with many peer ids, leaves the rest to the others; and
    /// one answer always goes to a peer with none in flight whose host holds under two shares
    /// (each answer counted there at most at a share), so every host's catch-up makes
    /// progress, and one peer of a host that never reads cannot keep the host's other peers
    /// busy (a share, and the budget, is passed by those answers, one per such peer; a share
    /// is at least 1 byte). An answer is held from
    /// when it is built until it is sent, or until `request_timeout` when its requester does
    /// not read it (8 requests per connection). Overflow: an answer carries what fits (the
    /// rest is asked for next, as with any answer's size limit); a request when nothing fits
    /// is answered busy (`Refused { busy: true }`, counted in `stats().busy_answers`), and
    /// its asker ends that catch-up round without moving its cursor and asks again in the
    /// next one: later, never lost.
    pub fn max_catch_up_answer_bytes(mut self, max: usize) -> Self {
        self.opts.max_catch_up_answer_bytes = max;
        self
    }

    /// Most bytes of gossip queued to one peer (gossipsub's queue to each peer, which it
    /// bounds only in messages). Default 16 MiB
    /// ([`DEFAULT_MAX_GOSSIP_QUEUE_BYTES`](crate::DEFAULT_MAX_GOSSIP_QUEUE_BYTES)), at least
    /// one byte. Gossipsub counts messages, not bytes, so the queue is held to this many bytes of
    /// the largest gossip message (`max(256 KiB, max_event_bytes)` + 64 KiB), but at least 256
    /// messages (it carries publishes, forwards and IHAVE/IWANT, mostly small) and at most
    /// gossipsub's 5,000: 256 at the defaults, so the real bound per peer is
    /// `max(max_gossip_queue_bytes, 256 x the largest message)`, 80 MiB at the default event
    /// limit (about 2 GiB at the largest, 8 MiB). Overflow, as before: a
    /// message that does not fit a peer's queue is not sent to that peer (its events are
    /// stored; catch-up carries them), and a publish that fits no subscribed peer's queue
    /// is reported as an `error` notification (`P2PError::Publish`).
    pub fn max_gossip_queue_bytes(mut self, max: usize) -> Self {
        self.opts.max_gossip_queue_bytes = max;
        self
    }

    /// Most bytes of gossip queued to peers that fell behind, all together. Default 256 MiB
    /// ([`DEFAULT_MAX_GOSSIP_TOTAL_BYTES`](crate::DEFAULT_MAX_GOSSIP_TOTAL_BYTES)), at
    /// least one byte. Each peer's queue is bounded (`max_gossip_queue_bytes`), but many
    /// peers that stop reading could each fill theirs (~5 GiB with 64 peers at the default
    /// event limit). Gossipsub tells which peers' queues overflowed (a message did not
    /// fit), not what they hold, so such a peer is counted at its queue's worst case: its
    /// length in messages (256 at the defaults) times the largest message this node
    /// published or received from 10 s before the peer was first counted until its last
    /// overflow; it stops counting 10 s after its last overflow, or when it disconnects. A
    /// peer let go is not chosen again; if its connection has not closed 10 s later, its
    /// queue counts again. Overflow: when those counts pass this bound, the counted peer
    /// that dropped the most messages is disconnected (its queue is freed; a warning is
    /// logged and `peer-disconnected` notified), until they fit. Publishes and forwards go
    /// on as before (to a full queue, not at all); no local event is lost: it is stored,
    /// and the disconnected peer's catch-up carries it once it connects again (a peer
    /// reached by `connect_to_peer` is dialed again by the side that asked: see
    /// [`redial_delay`](Self::redial_delay)).
    pub fn max_gossip_total_bytes(mut self, max: usize) -> Self {
        self.opts.max_gossip_total_bytes = max;
        self
    }

    /// Capacity of the command channel to the node task (broadcasts wait when it is full).
    /// Default 1024; at least 1 and at most [`tokio::sync::Semaphore::MAX_PERMITS`] (the
    /// largest tokio channel).
    pub fn command_capacity(mut self, capacity: usize) -> Self {
        self.opts.command_capacity = capacity;
        self
    }

    /// Delays between dials of a peer that `connect_to_peer` reached, once its connection
    /// dropped (a network blip, the peer restarting, `max_gossip_total_bytes` letting it go):
    /// such a peer is kept connected, dialed again after `min` (doubling after each failed
    /// attempt, up to `max`, each delay randomised between half and all of it), at the
    /// addresses it was reached at and those identify and discovery know, until it is
    /// connected again or the node stops; its catch-up round then carries what was missed.
    /// The count starts again from `min` after a connection that stayed up for `max`; one
    /// that drops sooner keeps counting, so a peer that lets us in and drops us at once is
    /// not dialed in a tight loop. Each dial counts in `stats().redials`. At most 256 such
    /// peers are kept; one more replaces the one least recently asked for that is not
    /// connected. Default 1 s to 60 s
    /// ([`DEFAULT_REDIAL_DELAY`](crate::DEFAULT_REDIAL_DELAY)); `build` refuses a zero `min`,
    /// `min > max` or a bound past [`MAX_CONFIG_DURATION`].
    pub fn redial_delay(mut self, min: Duration, max: Duration) -> Self {
        self.opts.redial_min = min;
        self.opts.redial_max = max;
        self
    }

    /// How long `connect_to_peer` waits, and how long any connection's setup (TCP connect,
    /// then the handshakes; dialed or accepted) may take before it is given up. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.opts.connect_timeout = timeout;
        self
    }

    /// How long a catch-up request may take. Default 30 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.opts.request_timeout = timeout;
        self
    }

    /// The replica to sync (default: a fresh in-memory one with `peer_id` as its id).
    /// [`KSync`](ksync_core::KSync) attaches its own.
    pub fn replica(mut self, replica: Replica) -> Self {
        self.replica = Some(replica);
        self
    }

    /// Checks the options and loads (or creates) the identity key.
    pub fn build(self) -> Result<P2PSyncClient, P2PError> {
        let mut opts = self.opts;
        Name::new(&opts.peer_id)
            .map_err(|e| P2PError::Config(format!("peer_id {:?}: {e}", opts.peer_id)))?;
        // `connect_to_peer` reads a target as a libp2p peer id first: a name that also reads
        // as one could never be reached by name.
        if opts.peer_id.parse::<PeerId>().is_ok() {
            return Err(P2PError::Config(format!(
                "peer_id {:?} reads as a libp2p peer id, which connect_to_peer would take it \
                 for; choose another name",
                opts.peer_id
            )));
        }
        Name::new(&opts.network)
            .map_err(|e| P2PError::Config(format!("network {:?}: {e}", opts.network)))?;
        if self.encryption && opts.network_key.is_none() {
            return Err(P2PError::Config(
                "encryption is on but no network key was given: encryption makes a private \
                 network, whose peers all hold the same key (NetworkKey::generate, or \
                 `ksync peer --generate-network-key FILE`; then network_key)"
                    .into(),
            ));
        }
        if !self.encryption {
            opts.network_key = None;
        }
        // A tokio channel holds at most `MAX_PERMITS` (`mpsc::channel` panics above it).
        if opts.command_capacity == 0 || opts.command_capacity > Semaphore::MAX_PERMITS {
            return Err(P2PError::Config(format!(
                "command_capacity must be between 1 and {}, got {}",
                Semaphore::MAX_PERMITS,
                opts.command_capacity
            )));
        }
        if opts.max_event_bytes == 0 || opts.max_event_bytes > RESPONSE_BUDGET {
            return Err(P2PError::Config(format!(
                "max_event_bytes must be between 1 and {RESPONSE_BUDGET} (one catch-up answer), got {}",
                opts.max_event_bytes
            )));
        }
        if opts.max_gossip_queue_bytes == 0 {
            return Err(P2PError::Config(
                "max_gossip_queue_bytes must be at least 1".into(),
            ));
        }
        if opts.max_gossip_total_bytes == 0 {
            return Err(P2PError::Config(
                "max_gossip_total_bytes must be at least 1".into(),
            ));
        }
        // Below the largest event, such an event would be served only to a peer with no
        // answer in flight (the one answer that always goes), never beside another.
        if opts.max_catch_up_answer_bytes < opts.max_event_bytes {
            return Err(P2PError::Config(format!(
                "max_catch_up_answer_bytes ({}) must be at least max_event_bytes ({})",
                opts.max_catch_up_answer_bytes, opts.max_event_bytes
            )));
        }
        if opts.max_peers == 0 {
            return Err(P2PError::Config("max_peers must be at least 1".into()));
        }
        if opts.max_peers_per_ip == 0 {
            return Err(P2PError::Config(
                "max_peers_per_ip must be at least 1".into(),
            ));
        }
        if opts.max_peer_cursors == 0 {
            return Err(P2PError::Config(
                "max_peer_cursors must be at least 1".into(),
            ));
        }
        for (field, value) in [
            ("anti_entropy_interval", opts.anti_entropy_interval),
            ("metrics_interval", opts.metrics_interval),
            ("request_timeout", opts.request_timeout),
            ("connect_timeout", opts.connect_timeout),
            ("redial_delay min", opts.redial_min),
            ("redial_delay max", opts.redial_max),
        ] {
            ksync_core::check_config_duration(field, value).map_err(P2PError::Config)?;
        }
        if opts.redial_min > opts.redial_max {
            return Err(P2PError::Config(format!(
                "redial_delay min ({:?}) must be at most its max ({:?})",
                opts.redial_min, opts.redial_max
            )));
        }
        let key_path = identity::key_path(&opts.key_dir, &opts.peer_id);
        let keypair = identity::load_or_create(&key_path)?;
        let replica = self.replica.unwrap_or_else(|| {
            Replica::with_id(Arc::new(InMemoryStorage::new()), opts.peer_id.clone())
        });
        Ok(P2PSyncClient {
            local_peer_id: keypair.public().to_peer_id(),
            keypair,
            opts,
            key_path,
            notifier: Notifier::new(),
            shaping: Shaping::new(self.filter),
            replica: Mutex::new(replica),
            shared: Arc::new(Shared::default()),
            commands: Mutex::new(None),
            lifecycle: tokio::sync::Mutex::new(None),
        })
    }
}

/// Peer-to-peer sync over libp2p: the spec's `P2PSyncClient`.
///
/// Live events travel by gossipsub (one topic per network, signed, validated); a peer that
/// was offline or joined late catches up from every peer it meets (request-response
/// anti-entropy over the peers' logs), so all peers converge even when gossip missed something.
/// Received events go through [`Replica::ingest`] (deduplication, conflict settlement).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use ksync_core::{InMemoryStorage, KSync};
/// use ksync_p2p::{DiscoveryMethod, NetworkKey, P2PSyncClient};
///
/// let key = NetworkKey::parse(&std::fs::read_to_string("swarm.key")?)?;
/// let client = P2PSyncClient::builder("my-unique-peer-id", DiscoveryMethod::Mdns)
///     .port(9000)
///     .encryption(true)
///     .network_key(key)
///     .build()?;
/// let ksync = KSync::builder()
///     .storage(Arc::new(InMemoryStorage::new()))
///     .sync_client(Arc::new(client))
///     .replica_id("my-unique-peer-id")
///     .build()
///     .await?;
/// ksync.start().await?;
/// ksync.emit("peer_event", serde_json::json!({"data": "hello peers"})).await?;
/// # Ok(()) }
/// ```
pub struct P2PSyncClient {
    opts: Options,
    keypair: Keypair,
    local_peer_id: PeerId,
    key_path: PathBuf,
    notifier: Notifier,
    shaping: Shaping,
    replica: Mutex<Replica>,
    shared: Arc<Shared>,
    /// The command channel to the running node (bounded: `command_capacity`; a full channel
    /// makes `broadcast` wait, so a fast producer is slowed to the network's pace and nothing
    /// is dropped).
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    /// The node task; the async lock serialises start and stop.
    lifecycle: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for P2PSyncClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("P2PSyncClient")
            .field("peer_id", &self.opts.peer_id)
            .field("local_peer_id", &self.local_peer_id)
            .field("network", &self.opts.network)
            .field("discovery", &self.opts.discovery)
            .finish_non_exhaustive()
    }
}

impl P2PSyncClient {
    /// Starts a builder with the spec's required options: `peerId` (this replica's id; it
    /// also names the identity key file: a room-style name, not one that reads as a libp2p
    /// peer id) and `discoveryMethod`.
    pub fn builder(peer_id: impl Into<String>, discovery: DiscoveryMethod) -> P2PSyncClientBuilder {
        P2PSyncClientBuilder {
            opts: Options {
                peer_id: peer_id.into(),
                discovery,
                port: 0,
                listen_host: DEFAULT_LISTEN_HOST,
                network: DEFAULT_NETWORK.to_owned(),
                network_key: None,
                key_dir: default_key_dir(),
                anti_entropy_interval: DEFAULT_ANTI_ENTROPY_INTERVAL,
                max_peers: DEFAULT_MAX_PEERS,
                max_peers_per_ip: DEFAULT_MAX_PEERS_PER_IP,
                max_peer_cursors: crate::config::DEFAULT_MAX_PEER_CURSORS,
                max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
                max_catch_up_answer_bytes: crate::config::DEFAULT_MAX_CATCH_UP_ANSWER_BYTES,
                max_gossip_queue_bytes: crate::config::DEFAULT_MAX_GOSSIP_QUEUE_BYTES,
                max_gossip_total_bytes: crate::config::DEFAULT_MAX_GOSSIP_TOTAL_BYTES,
                command_capacity: DEFAULT_COMMAND_CAPACITY,
                request_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(10),
                metrics_interval: crate::config::DEFAULT_METRICS_INTERVAL,
                debug: false,
                redial_min: DEFAULT_REDIAL_DELAY.0,
                redial_max: DEFAULT_REDIAL_DELAY.1,
            },
            encryption: false,
            replica: None,
            filter: None,
        }
    }

    /// The spec's `peerId`.
    pub fn peer_id(&self) -> &str {
        &self.opts.peer_id
    }

    /// The libp2p peer id (from the identity key; stable across restarts).
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Where the identity key is kept.
    pub fn key_path(&self) -> &std::path::Path {
        &self.key_path
    }

    /// The network name.
    pub fn network(&self) -> &str {
        &self.opts.network
    }

    /// The replica this client syncs.
    pub fn replica(&self) -> Replica {
        self.replica
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The notification hub (`connected`, `disconnected`, `status`, `event`, `sync`,
    /// `error`, `conflict`, `peer-connected`, `peer-disconnected`).
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The spec's `use(direction, middleware)`: adds a middleware to the `incoming` or
    /// `outgoing` chain (run in registration order; the filter sees events as the application
    /// made them: before the outgoing chain, after the incoming one). Outgoing runs on what
    /// is published and what catch-up serves (the local log keeps the event as made);
    /// incoming on what arrives, before it is stored. An incoming failure (e.g. a decryption
    /// with the wrong key) is an `error` notification and the event is not stored.
    pub fn use_middleware(&self, direction: Direction, middleware: impl Middleware) {
        self.shaping.use_middleware(direction, middleware);
    }

    /// Starts the node: listens, joins the network's topic, starts discovery. Returns once
    /// listening; emits `connected`. Starting a started client does nothing.
    pub async fn start(&self) -> Result<(), P2PError> {
        let mut task = self.lifecycle.lock().await;
        if task.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        let swarm = node::build_swarm(
            self.keypair.clone(),
            &self.opts,
            Arc::clone(&self.shared.counters.catch_up_bytes),
        )?;
        let (tx, rx) = mpsc::channel(self.opts.command_capacity);
        let node = Node::start(
            swarm,
            self.opts.clone(),
            self.replica(),
            self.notifier.clone(),
            self.shaping.clone(),
            Arc::clone(&self.shared),
            rx,
        )
        .await?;
        *task = Some(tokio::spawn(node.run()));
        *self.commands.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        tracing::info!(peer = %self.local_peer_id, addrs = ?self.listen_addrs(), "P2P node started");
        self.notifier.emit(Notification::Connected);
        self.notifier.emit(Notification::Status(Status::Connected));
        Ok(())
    }

    /// Stops the node (closes every connection); emits `disconnected`. Stored events stay; a
    /// later `start` resumes.
    pub async fn stop(&self) -> Result<(), P2PError> {
        let mut task = self.lifecycle.lock().await;
        let tx = self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(handle) = task.take() else {
            return Ok(());
        };
        if let Some(tx) = tx {
            // A closed channel means the task already ended.
            let _ = tx.send(Command::Shutdown).await;
        }
        if let Err(e) = handle.await {
            tracing::warn!(error = %e, "P2P node task ended abnormally");
        }
        self.notifier.emit(Notification::Disconnected);
        Ok(())
    }

    fn check_size(&self, size: usize) -> Result<(), P2PError> {
        if size > self.opts.max_event_bytes {
            return Err(P2PError::EventTooLarge {
                size,
                max: self.opts.max_event_bytes,
            });
        }
        Ok(())
    }

    fn sender(&self) -> Result<mpsc::Sender<Command>, P2PError> {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(P2PError::NotStarted)
    }

    /// Stores `event` in the replica and publishes it to the network (in the form the filter,
    /// then the outgoing middleware, give it; one they keep home is only stored).
    /// Returns once stored and queued (waiting while the command queue is full). Before
    /// `start` the event is stored and [`P2PError::NotStarted`] returned; peers get it by
    /// catch-up later.
    ///
    /// As with the other transports' `send`: an event without `origin` is ours and gets our
    /// replica id. Another replica's event (an application bridging it in) keeps its origin
    /// and is taken in like a received one: one that collides with a stored revision is
    /// settled by the conflict policy (a `conflict` notification) and the settling revision
    /// is published instead. (No forward mark, unlike `Replica::record_forward`: catch-up
    /// serves every stored event anyway, and a mark would make other clients of the same
    /// replica send it too.)
    pub async fn broadcast(&self, mut event: Event) -> Result<(), P2PError> {
        event.validate(&EventLimits::default())?;
        let replica = self.replica();
        let origin = event.origin.get_or_insert_with(|| replica.id().to_owned());
        let ours = origin == replica.id();
        let bytes = serde_json::to_vec(&event)?;
        self.check_size(bytes.len())?;
        let copy = (!self.shaping.is_noop()).then(|| event.clone());
        let mut settled = Vec::new();
        // The common case (ours, or another's revision that collides with nothing) is one
        // append; only a collision goes through the conflict settlement.
        let collides = !ours
            && replica
                .storage()
                .get(&event.id, event.version)
                .map_err(|e| P2PError::Replica(e.into()))?
                .is_some_and(|held| !held.event.same_content(&event));
        if !collides {
            replica
                .record_local_seq(event)
                .await
                .map_err(P2PError::Replica)?;
        } else {
            let ingested = replica
                .ingest(vec![event])
                .await
                .map_err(P2PError::Replica)?;
            if !ingested.conflicts.is_empty() {
                for conflict in ingested.conflicts {
                    self.notifier.emit(Notification::Conflict(conflict));
                }
                settled = ingested.resolutions.into_iter().map(|s| s.event).collect();
                if settled.is_empty() {
                    // Superseded history: nothing new to tell the network.
                    return Ok(());
                }
            }
        }
        let mut out = Vec::with_capacity(1 + settled.len());
        if settled.is_empty() {
            match copy {
                None => out.push(bytes),
                Some(event) => out.extend(self.wire_form(event)?),
            }
        }
        for event in settled {
            out.extend(self.wire_form(event)?);
        }
        let sender = self.sender()?;
        for bytes in out {
            sender
                .send(Command::Broadcast(bytes))
                .await
                .map_err(|_| P2PError::Stopped)?;
        }
        Ok(())
    }

    /// The encoded form of a stored event as this peer publishes it (after the filter, then
    /// the outgoing middleware; `None`: kept home).
    fn wire_form(&self, event: Event) -> Result<Option<Vec<u8>>, P2PError> {
        let wire = if self.shaping.is_noop() {
            event
        } else {
            match self.shaping.outgoing(event)? {
                Some(wire) => wire,
                None => return Ok(None),
            }
        };
        let bytes = serde_json::to_vec(&wire)?;
        self.check_size(bytes.len())?;
        Ok(Some(bytes))
    }

    /// Connects to a peer (the spec's `connectToPeer(peerId)`): the spec's `peerId` of a peer
    /// this node has met (peers announce it when they connect; discovery connects to the
    /// peers it finds; a name stays with the first peer announcing it while that peer is
    /// connected, a second one is refused with `PeerMisbehaved`), a libp2p peer id (`12D3Koo...`) whose address discovery knows or
    /// finds (mDNS, Kademlia lookup), or a full multiaddr
    /// (`/ip4/1.2.3.4/tcp/9000/p2p/12D3Koo...`). Returns the connected peer's libp2p id.
    ///
    /// The peer is then kept connected: dialed again whenever its connection drops, with
    /// backoff, until the node stops (see [`P2PSyncClientBuilder::redial_delay`]).
    pub async fn connect_to_peer(&self, target: &str) -> Result<PeerId, P2PError> {
        let target = parse_target(target)?;
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(Command::Connect { target, reply })
            .await
            .map_err(|_| P2PError::Stopped)?;
        match tokio::time::timeout(self.opts.connect_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(P2PError::Stopped),
            Err(_) => Err(P2PError::Timeout(format!(
                "connecting took longer than {:?}",
                self.opts.connect_timeout
            ))),
        }
    }

    /// Runs a catch-up round with every connected peer now (one also runs periodically and
    /// on every new connection).
    pub async fn sync_now(&self) -> Result<(), P2PError> {
        self.sender()?
            .send(Command::SyncNow)
            .await
            .map_err(|_| P2PError::Stopped)
    }

    /// The gossipsub score this node gives `peer` (negative after invalid messages).
    pub async fn peer_score(&self, peer: PeerId) -> Result<Option<f64>, P2PError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?
            .send(Command::PeerScore { peer, reply })
            .await
            .map_err(|_| P2PError::Stopped)?;
        answer.await.map_err(|_| P2PError::Stopped)
    }

    /// The addresses the node listens on (empty before `start`).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        node::listen_addrs_of(&self.shared)
    }

    /// The listen addresses with `/p2p/<peer id>` appended: what others pass to
    /// `connect_to_peer`.
    pub fn addresses(&self) -> Vec<Multiaddr> {
        self.listen_addrs()
            .into_iter()
            .map(|a| a.with(Protocol::P2p(self.local_peer_id)))
            .collect()
    }

    /// The peers connected now.
    pub fn connected_peers(&self) -> Vec<PeerId> {
        node::peers_of(&self.shared)
    }

    /// Counters since the client was built.
    pub fn stats(&self) -> P2PStats {
        let c = &self.shared.counters;
        P2PStats {
            published_messages: c.published_messages.load(Ordering::Relaxed),
            published_events: c.published_events.load(Ordering::Relaxed),
            accepted_messages: c.accepted_messages.load(Ordering::Relaxed),
            rejected_messages: c.rejected_messages.load(Ordering::Relaxed),
            gossip_events: c.gossip_events.load(Ordering::Relaxed),
            catch_up_events: c.catch_up_events.load(Ordering::Relaxed),
            new_events: c.new_events.load(Ordering::Relaxed),
            duplicate_events: c.duplicate_events.load(Ordering::Relaxed),
            catch_up_rounds: c.catch_up_rounds.load(Ordering::Relaxed),
            busy_answers: c.busy_answers.load(Ordering::Relaxed),
            redials: c.redials.load(Ordering::Relaxed),
        }
    }
}

fn parse_target(target: &str) -> Result<Target, P2PError> {
    let target = target.trim();
    if target.starts_with('/') {
        target
            .parse::<Multiaddr>()
            .map(Target::Addr)
            .map_err(|_| P2PError::InvalidTarget(target.to_owned()))
    } else {
        match target.parse::<PeerId>() {
            Ok(peer) => Ok(Target::Peer(peer)),
            Err(_) if Name::new(target).is_ok() => Ok(Target::Name(target.to_owned())),
            Err(_) => Err(P2PError::InvalidTarget(target.to_owned())),
        }
    }
}

impl SyncClient for P2PSyncClient {
    fn connect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move { self.start().await.map_err(SyncError::from) })
    }

    fn disconnect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move { self.stop().await.map_err(SyncError::from) })
    }

    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(async move { self.broadcast(event).await.map_err(SyncError::from) })
    }

    fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Takes the replica to sync. A running node keeps the one it started with until the
    /// next `start`.
    fn attach(&self, replica: Replica) {
        *self.replica.lock().unwrap_or_else(|p| p.into_inner()) = replica;
    }

    /// The spec's `peerId`: under `KSync`, a fresh storage's events carry it as their origin.
    fn preferred_replica_id(&self) -> Option<String> {
        Some(self.opts.peer_id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let peer = PeerId::random();
        assert!(matches!(parse_target(&peer.to_string()), Ok(Target::Peer(p)) if p == peer));
        assert!(matches!(
            parse_target("/ip4/127.0.0.1/tcp/9000"),
            Ok(Target::Addr(_))
        ));
        assert!(matches!(
            parse_target("peer-123"),
            Ok(Target::Name(n)) if n == "peer-123"
        ));
        assert!(matches!(
            parse_target("not a name"),
            Err(P2PError::InvalidTarget(_))
        ));
        assert!(matches!(
            parse_target("/nonsense/x"),
            Err(P2PError::InvalidTarget(_))
        ));
    }

    #[test]
    fn builder_checks_options() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = P2PSyncClient::builder("a", DiscoveryMethod::Manual)
            .key_dir(dir.path())
            .encryption(true)
            .build()
            .expect_err("needs a key");
        assert!(matches!(err, P2PError::Config(_)));
        let err = P2PSyncClient::builder("../evil", DiscoveryMethod::Manual)
            .key_dir(dir.path())
            .build()
            .expect_err("bad name");
        assert!(matches!(err, P2PError::Config(_)));
        let client = P2PSyncClient::builder("a", DiscoveryMethod::Manual)
            .key_dir(dir.path())
            .build()
            .expect("builds");
        for max in [0, RESPONSE_BUDGET + 1] {
            let err = P2PSyncClient::builder("a", DiscoveryMethod::Manual)
                .key_dir(dir.path())
                .max_event_bytes(max)
                .build()
                .expect_err("out of range");
            assert!(matches!(err, P2PError::Config(_)), "{err:?}");
        }
        assert_eq!(client.peer_id(), "a");
        assert!(client.key_path().exists());
        assert!(client.listen_addrs().is_empty());
    }
}
