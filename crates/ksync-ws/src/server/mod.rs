//! The relay (feature `server`): rooms of events over WebSocket, as an axum [`Router`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use ksync_core::{AllowAll, InMemoryProvider};
//! use ksync_ws::server::{Relay, RelayConfig};
//!
//! let relay = Relay::new(RelayConfig::default(), Arc::new(InMemoryProvider::new()), Arc::new(AllowAll))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(ksync_ws::server::nodelay(listener), relay.router()).await?;
//! # Ok(()) }
//! ```

mod conn;
mod outbox;
mod publish;
mod room;
mod socket;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use futures_util::FutureExt as _;
use ksync_core::{
    Access, AuthError, Authenticator, ClientId, ClientPlace, Credentials, LogName, Name,
    PerClientCounts, ResourceKind, StorageProvider, Stored,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, oneshot, watch};

use crate::protocol::{self, CLIENT_MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE_RANGE, close, code};
use room::{Member, Room, RoomCommand, RoomLink};

/// The subprotocol the relay speaks (echoed in `Sec-WebSocket-Protocol` when offered).
pub const SUBPROTOCOL: &str = "ksync.v1";
/// Prefix of a `Sec-WebSocket-Protocol` entry carrying a bearer token (for browsers).
pub const AUTH_PROTOCOL_PREFIX: &str = "ksync.auth.";
/// Prefix of a `Sec-WebSocket-Protocol` entry carrying an API key (for browsers).
pub const APIKEY_PROTOCOL_PREFIX: &str = "ksync.apikey.";

/// Limits and tuning of a [`Relay`]. Every field has a documented default.
///
/// `#[non_exhaustive]`: fields are added over time, so it is not built field by field outside
/// this crate; start from the defaults and set what you change:
///
/// ```
/// let mut config = ksync_ws::server::RelayConfig::default();
/// config.max_connections = 500;
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// The room of `/ws` and of `ws://host:port` without a path. Default `"default"`.
    pub default_room: String,
    /// Largest accepted message (and frame), in bytes; larger ones close the connection with
    /// 1009. Also the inflate limit of compressed frames. Default 1 MiB; from 1 KiB to
    /// 8 MiB ([`protocol::MAX_MESSAGE_SIZE_RANGE`]).
    pub max_message_size: usize,
    /// How long a client has to send `hello` after the upgrade (closed with 4002). Default 10 s.
    /// This and the two below: positive, at most [`MAX_CONFIG_DURATION`].
    pub handshake_timeout: Duration,
    /// The server pings every `heartbeat`; a client nothing came from since the last ping (a
    /// pong, a message, or any byte of one) is closed with 4009 when the next is due, as is
    /// a message no byte more of came for a whole heartbeat. Default 30 s.
    pub heartbeat: Duration,
    /// Longest a socket write may go without the socket taking a byte before the connection
    /// is dropped (a frame to a client on a slow link takes as long as the link needs while
    /// its bytes keep moving). Also bounds, as a whole, the wait for connections to write what
    /// they were owed at [`Relay::shutdown`]. Default 10 s.
    pub write_timeout: Duration,
    /// Frames queued per subscriber. Overflow policy: the subscriber is dropped and closed
    /// with 4008 ("resume from your cursor"); the room never waits for a slow client.
    /// Default 1024.
    pub subscriber_queue: usize,
    /// Bytes of frames queued per subscriber (their JSON; a frame shared by many subscribers
    /// counts for each). Same overflow policy as `subscriber_queue`: the subscriber is closed
    /// with 4008. One commit's frames are always taken into an empty queue, so a queue may
    /// exceed this by one commit. Default 64 MiB (nats-server's default `max_pending`).
    pub subscriber_queue_bytes: usize,
    /// Bytes of frames waiting for subscribers in all, relay-wide: queued for them, or taken
    /// by their connections and not yet written (their JSON; a frame shared by many
    /// subscribers, as a room's fan-out is, counts once). Without it only
    /// `subscriber_queue_bytes` bounded them, once per room with a slow subscriber: 64 MiB ×
    /// 4,096 open rooms at the defaults. Same overflow policy as `subscriber_queue`: the
    /// subscriber whose frames would pass it is closed with 4008 (resume from your cursor), and
    /// what was queued for it is dropped at once. Frames already in a socket's buffers are not
    /// counted (see docs/RELIABILITY.md, "Memory"). At least twice `max_message_size`
    /// ([`Relay::new`] refuses less, naming both values): one frame is admitted whatever its
    /// size while nothing is held, so a budget that one largest frame fills on its own would
    /// close with 4008 every subscriber after the first that needs that frame, though holding
    /// it for them costs nothing new. Default 1 GiB.
    pub subscriber_queues_total_bytes: usize,
    /// Commands queued per room. Overflow policy: publishers wait (their connection stops
    /// reading), which is back-pressure on the fastest writers. Default 1024; at most
    /// `tokio::sync::Semaphore::MAX_PERMITS`.
    pub room_queue: usize,
    /// Bytes of publishes queued per room (their JSON as read plus their events decoded,
    /// `Event::decoded_len`), at most `u32::MAX`. Same overflow policy as `room_queue`:
    /// publishers wait. A publish larger than this waits for the whole budget. Default 64 MiB.
    pub room_queue_bytes: usize,
    /// Bytes of publishes queued in all rooms together, relay-wide (counted as for
    /// `room_queue_bytes`). Without it only `room_queue_bytes` bounded them, once per room: a
    /// slow disk, shared by the rooms, fills every open room's queue, 64 MiB × 4,096 at the
    /// defaults. Same overflow policy as `room_queue_bytes`: the publisher waits (its
    /// connection stops reading; nothing is refused), first come first served across rooms,
    /// until commits free some. Waiting rather than refusing, because the budget fills only
    /// when the disk is slower than the writers: a refusal would have clients send again
    /// (more load on the same disk) and could reorder a connection's publishes, while a
    /// waiting publisher holds only the JSON it already read. A publish takes its room's
    /// share first, then this one, so a room stuck on its disk holds at most
    /// `room_queue_bytes` of it: it takes this / `room_queue_bytes` stuck rooms (16 at the
    /// defaults) to hold publishes up in other rooms; below `room_queue_bytes` one room can
    /// hold all of it (taken here, as a test's small budget; `ksync serve` refuses it). A
    /// publish larger than this waits for the whole of it. Default 1 GiB.
    pub room_queues_total_bytes: usize,
    /// Most open connections; more are refused before the upgrade with 503. Default 10 000.
    pub max_connections: usize,
    /// Most open connections of one client, so that one client cannot take every place of
    /// `max_connections` (nor, each connection being in one room, every place of
    /// `max_open_rooms`). A client is its credentials' subject ([`ksync_core::Grant::subject`]:
    /// an API key's configured name, a JWT's `sub`, `jwt` for every token without one; never
    /// the credential itself) seen from one IP address: the same key from another machine is
    /// another client. Without auth a client is its IP address alone. The address is known
    /// when served with `into_make_service_with_connect_info::<SocketAddr>()`, as `ksync
    /// serve` does; without it a client is its subject alone, and without auth clients cannot
    /// be told apart and only `max_connections` applies. Overflow policy:
    /// more are refused before the upgrade with 429 `too many connections for this client`
    /// (in-band: `rate_limited`, close 4429), which kSync's clients retry with backoff; a
    /// place frees when one of the client's connections ends, however it ends. Default 1000:
    /// far above one application instance's needs, while no one client takes more than a
    /// tenth of the default `max_connections`. Clients behind one address (a proxy, a NAT)
    /// with the same credentials, or without auth, count as one client: raise it for them.
    pub max_connections_per_client: usize,
    /// Most rooms open at once, each with its log and its task (a room closes once its last
    /// connection has left). A file log costs a writer thread and a file descriptor, and a
    /// sync thread and descriptor each for up to 2 syncs in flight: without this cap, clients
    /// joining `max_connections` distinct rooms cost the process ~2 threads and ~3
    /// descriptors per connection (measured), 20,000 threads at the defaults, past the
    /// thread or process limits of many hosts. Overflow policy: a connection to a room that
    /// is not open is refused before the upgrade with 503 `too many open rooms` (clients
    /// retry it later, as any 5xx); rooms already open take joins as before, and so does a
    /// room another connection is opening (the join waits for that open). Default 4096.
    pub max_open_rooms: usize,
    /// Most events committed in one storage append (group commit), and most gathered from
    /// one connection's back-to-back publishes before they are committed. Default 4096.
    pub max_batch_events: usize,
    /// Events per frame when catching up or sending a snapshot. Default 512.
    pub page_size: usize,
    /// WebSocket read buffer per connection, in bytes (allocated up front by tungstenite, which
    /// defaults to 128 KiB). Default 2048: with it an idle connection costs the relay under
    /// 8 KiB (measured by `cargo xtask bench ws`); larger messages are read in several chunks.
    pub read_buffer_size: usize,
    /// WebSocket write buffer per connection, in bytes (frames are flushed once it holds this
    /// much, and after each batch of queued frames). Default 4096.
    pub write_buffer_size: usize,
    /// Most in-band refusals in progress at once (each an upgraded socket, held for at most
    /// 5 s while the refusal is delivered, and not counted in `max_connections`). Overflow
    /// policy: past it a refusal is the plain HTTP status, as for clients that do not take
    /// refusals in-band (a browser then sees a failed connection and retries with backoff).
    /// Default 1024.
    pub max_in_band_refusals: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            default_room: "default".into(),
            max_message_size: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            subscriber_queue: 1024,
            subscriber_queue_bytes: 64 << 20,
            subscriber_queues_total_bytes: 1 << 30,
            room_queue: 1024,
            room_queue_bytes: 64 << 20,
            room_queues_total_bytes: 1 << 30,
            max_connections: 10_000,
            max_connections_per_client: 1000,
            max_open_rooms: 4096,
            max_batch_events: 4096,
            page_size: 512,
            read_buffer_size: 2048,
            write_buffer_size: 4096,
            max_in_band_refusals: 1024,
        }
    }
}

/// Errors from building or running a [`Relay`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A configuration value is out of range.
    #[error("invalid relay configuration: {0}")]
    Config(String),
    /// The relay is shutting down: no room is opened any more.
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// The room is not open and `RelayConfig::max_open_rooms` rooms are.
    #[error("{0} rooms are open, the most the relay opens at once")]
    TooManyRooms(usize),
    /// A room's log could not be opened.
    #[error("opening the log of room {room}: {source}")]
    Storage {
        /// The room.
        room: String,
        /// The storage error.
        #[source]
        source: ksync_core::StorageError,
    },
}

/// Longest `handshake_timeout`, `heartbeat` and `write_timeout` a relay takes (a day).
pub use ksync_core::MAX_CONFIG_DURATION;

/// Activity items buffered for [`Relay::activity`] observers. Overflow policy: a receiver
/// that falls this far behind loses the oldest items and is told how many
/// (`broadcast::error::RecvError::Lagged`); the relay never waits for an observer. With
/// [`ACTIVITY_ITEM_BYTES`], a slow observer pins at most about 64 MiB of events.
pub const ACTIVITY_CAPACITY: usize = 1024;

/// Most bytes of events (their JSON) one [`RelayActivity::Stored`] item holds; the rest of
/// the commit is only counted (`omitted`). Without it, 1024 items of large commits held by
/// one slow observer pinned gigabytes.
pub const ACTIVITY_ITEM_BYTES: usize = 64 * 1024;

/// Something that happened in a [`Relay`], for observers such as the server's dashboard
/// ([`Relay::activity`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RelayActivity {
    /// A WebSocket connection was upgraded; it is listed by [`Relay::clients`] until it closes.
    Connected(ClientInfo),
    /// A connection closed.
    Disconnected(ClientInfo),
    /// A room stored new events (one group commit, in sequence order). Only produced while
    /// someone observes: the relay copies nothing when there is no observer.
    Stored {
        /// The room.
        room: Name,
        /// The new events with their sequence numbers, in order, up to
        /// [`ACTIVITY_ITEM_BYTES`] of them.
        events: Arc<[Stored]>,
        /// The commit's events left out of `events` (past the byte bound).
        omitted: u64,
    },
}

/// What waits for one room of a [`Relay`] ([`Relay::backlog`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoomBacklog {
    /// Publishes the relay has read and not yet stored: in the room's queue (or its commit in
    /// progress), or waiting for room in that queue (their connections read nothing meanwhile).
    pub publishes: usize,
    /// Of `publishes`, those waiting for room in the queue (`RelayConfig::room_queue_bytes`);
    /// their connections read nothing meanwhile.
    pub waiting: usize,
    /// Joins waiting for the room's commit in progress before they catch up.
    pub joins: usize,
    /// Bytes of the publishes in the room's queue (or its commit in progress), as
    /// `RelayConfig::room_queue_bytes` and `room_queues_total_bytes` count them; not those
    /// `waiting`.
    pub queued_bytes: usize,
}

/// One open WebSocket connection of a [`Relay`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientInfo {
    /// The connection's id (unique within this relay).
    pub id: u64,
    /// The room it joined.
    pub room: Name,
    /// The authenticated subject (`anonymous` without auth); never the credential itself.
    pub subject: String,
    /// When the upgrade completed.
    pub connected_at: SystemTime,
}

struct RoomHandle {
    link: RoomLink,
    task: tokio::task::JoinHandle<()>,
    /// Tells this handle from a later room of the same name.
    generation: u64,
    /// Closed (its sender dropped) once the room's task has ended and left the map: a join
    /// that finds the room closing waits for it before opening the room anew.
    ended: watch::Receiver<()>,
}

pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    default_room: Name,
    pub(crate) provider: Arc<dyn StorageProvider>,
    auth: Arc<dyn Authenticator>,
    /// Open rooms. A room closes (and leaves the map) once no connection uses it; see
    /// [`Relay::open_rooms`].
    rooms: Mutex<HashMap<Name, RoomHandle>>,
    next_room: AtomicU64,
    connections: AtomicUsize,
    /// Open connections of each client that has one (`RelayConfig::
    /// max_connections_per_client`). Touched at connect and disconnect only.
    per_client: Arc<PerClientCounts>,
    /// Upgrades refused because their client had `max_connections_per_client` open.
    client_cap_refusals: AtomicU64,
    /// One permit per open room (`RelayConfig::max_open_rooms`), held by the room until its
    /// log is released.
    room_slots: Arc<Semaphore>,
    /// Rooms whose log one connection is opening, each with what tells the others that the
    /// open ended (its sender is dropped): they wait for it instead of taking a place of
    /// their own among `max_open_rooms` (at the cap they were refused with 503 though the
    /// room was about to open). One entry per room being opened: bounded by the connections.
    opening: Mutex<HashMap<Name, watch::Receiver<()>>>,
    /// One permit per in-band refusal in progress (`RelayConfig::max_in_band_refusals`).
    in_band_refusals: Arc<Semaphore>,
    next_conn: AtomicU64,
    /// Observers' feed; see [`ACTIVITY_CAPACITY`] for the overflow policy.
    activity: broadcast::Sender<RelayActivity>,
    /// Upgraded connections, by id.
    clients: Mutex<std::collections::BTreeMap<u64, ClientInfo>>,
    /// `true` once shutdown began: no new upgrades, connections stop reading.
    pub(crate) shutdown: watch::Sender<bool>,
    /// Frames waiting for subscribers, relay-wide (`RelayConfig::subscriber_queues_total_bytes`).
    pub(crate) queue_budget: Arc<outbox::QueueBudget>,
    /// Publishes queued in rooms, relay-wide (`RelayConfig::room_queues_total_bytes`).
    room_queues_budget: Arc<room::ByteBudget>,
}

/// The WebSocket relay: rooms, each with one log, one writer at a time and a fan-out.
///
/// Cheap to clone (shared state). One relay per storage provider: a room's lock makes its
/// commits the only writes to its log, so two relays must not serve the same rooms from one
/// provider.
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.shared.config)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn client_joined(&self, info: ClientInfo) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(info.id, info.clone());
        // Err: nobody observes, which is fine.
        let _ = self.activity.send(RelayActivity::Connected(info));
    }

    fn client_left(&self, info: ClientInfo) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&info.id);
        let _ = self.activity.send(RelayActivity::Disconnected(info));
    }
}

/// A connection's place among `max_connections` and, when its client is known, among its
/// client's `max_connections_per_client`: both are given back when it is dropped, which
/// happens whenever the connection ends (close, error, timeout, shutdown, a refused or
/// abandoned upgrade), since it lives in the connection's task.
pub(crate) struct ConnectionSlot {
    shared: Arc<Shared>,
    /// The client's place (given back when dropped).
    _client: Option<ClientPlace>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why [`Shared::take_connection`] refused a connection.
enum OverCap {
    /// `max_connections` connections are open.
    Server,
    /// The client has `max_connections_per_client` connections open.
    Client,
}

impl Shared {
    /// A place for a new connection of `client` (`None`: clients cannot be told apart), or
    /// which cap it is over. The client's cap is checked first, so that a client over it
    /// does not take, even for a moment, a place of the server's.
    fn take_connection(
        self: &Arc<Self>,
        client: Option<ClientId>,
    ) -> Result<ConnectionSlot, OverCap> {
        let place = match client {
            Some(client) => Some(self.per_client.take(client).ok_or(OverCap::Client)?),
            None => None,
        };
        // From here the slot gives back what was taken, whatever happens next.
        let previous = self.connections.fetch_add(1, Ordering::AcqRel);
        let slot = ConnectionSlot {
            shared: Arc::clone(self),
            _client: place,
        };
        if previous >= self.config.max_connections {
            return Err(OverCap::Server);
        }
        Ok(slot)
    }
}

impl Relay {
    /// A relay storing rooms in `provider` (one log per room, `LogName::Room`) and checking
    /// credentials with `auth` (use `ksync_core::AllowAll` for no auth).
    pub fn new(
        config: RelayConfig,
        provider: Arc<dyn StorageProvider>,
        auth: Arc<dyn Authenticator>,
    ) -> Result<Self, RelayError> {
        let default_room = Name::new(&config.default_room)
            .map_err(|e| RelayError::Config(format!("default_room: {e}")))?;
        for (field, value) in [
            ("subscriber_queue", config.subscriber_queue),
            ("subscriber_queue_bytes", config.subscriber_queue_bytes),
            (
                "subscriber_queues_total_bytes",
                config.subscriber_queues_total_bytes,
            ),
            ("room_queue", config.room_queue),
            ("room_queue_bytes", config.room_queue_bytes),
            ("room_queues_total_bytes", config.room_queues_total_bytes),
            ("max_batch_events", config.max_batch_events),
            ("page_size", config.page_size),
            ("max_connections", config.max_connections),
            (
                "max_connections_per_client",
                config.max_connections_per_client,
            ),
            ("max_open_rooms", config.max_open_rooms),
        ] {
            if value == 0 {
                return Err(RelayError::Config(format!("{field} must be at least 1")));
            }
        }
        if !MAX_MESSAGE_SIZE_RANGE.contains(&config.max_message_size) {
            return Err(RelayError::Config(format!(
                "max_message_size must be from {} to {} bytes (an ack can be twice as large, \
                 and clients take {CLIENT_MAX_MESSAGE_SIZE})",
                MAX_MESSAGE_SIZE_RANGE.start(),
                MAX_MESSAGE_SIZE_RANGE.end()
            )));
        }
        if config.subscriber_queues_total_bytes < config.max_message_size.saturating_mul(2) {
            return Err(RelayError::Config(format!(
                "subscriber_queues_total_bytes ({}) must be at least twice max_message_size \
                 ({}): one largest frame would fill it",
                config.subscriber_queues_total_bytes, config.max_message_size
            )));
        }
        // The room's queue is a tokio channel, which panics (in every connection's task, at
        // its room's opening) past this.
        if config.room_queue > Semaphore::MAX_PERMITS {
            return Err(RelayError::Config(format!(
                "room_queue must be at most {}",
                Semaphore::MAX_PERMITS
            )));
        }
        if u32::try_from(config.room_queue_bytes).is_err() {
            return Err(RelayError::Config(format!(
                "room_queue_bytes must be at most {} bytes",
                u32::MAX
            )));
        }
        for (field, value) in [
            ("heartbeat", config.heartbeat),
            ("handshake_timeout", config.handshake_timeout),
            ("write_timeout", config.write_timeout),
        ] {
            ksync_core::check_config_duration(field, value).map_err(RelayError::Config)?;
        }
        let (shutdown, _) = watch::channel(false);
        let (activity, _) = broadcast::channel(ACTIVITY_CAPACITY);
        let room_slots = Arc::new(Semaphore::new(
            config.max_open_rooms.min(Semaphore::MAX_PERMITS),
        ));
        let in_band_refusals = Arc::new(Semaphore::new(
            config.max_in_band_refusals.min(Semaphore::MAX_PERMITS),
        ));
        let queue_budget = outbox::QueueBudget::new(config.subscriber_queues_total_bytes);
        let room_queues_budget = room::ByteBudget::new(config.room_queues_total_bytes);
        let per_client = PerClientCounts::new(config.max_connections_per_client);
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                default_room,
                provider,
                auth,
                rooms: Mutex::new(HashMap::new()),
                next_room: AtomicU64::new(0),
                connections: AtomicUsize::new(0),
                per_client,
                client_cap_refusals: AtomicU64::new(0),
                room_slots,
                opening: Mutex::new(HashMap::new()),
                in_band_refusals,
                next_conn: AtomicU64::new(1),
                activity,
                clients: Mutex::new(std::collections::BTreeMap::new()),
                shutdown,
                queue_budget,
                room_queues_budget,
            }),
        })
    }

    /// The relay's configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.shared.config
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Upgrades refused since the relay started because their client already had
    /// `RelayConfig::max_connections_per_client` connections open (for metrics: a steady
    /// rise means a client, or credentials shared by many, needs a higher cap).
    pub fn client_cap_refusals(&self) -> u64 {
        self.shared.client_cap_refusals.load(Ordering::Relaxed)
    }

    /// Rooms open now, each with its log and its task (including one that is closing). A
    /// room opens with its first connection and closes once its last connection has left and
    /// nothing it was sent is still queued; the next connection opens it again from its log.
    /// So at most one room per open connection is open, whatever names clients ask for, and
    /// at most `RelayConfig::max_open_rooms`.
    pub fn open_rooms(&self) -> usize {
        self.shared
            .rooms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// What waits for `room` now, if it is open (see [`RoomBacklog`]): a backlog that keeps
    /// growing means the room's disk is slower than its writers.
    pub fn backlog(&self, room: &str) -> Option<RoomBacklog> {
        let name = Name::new(room).ok()?;
        let rooms = self.shared.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.get(&name).map(|handle| handle.link.backlog())
    }

    /// A feed of what happens in the relay: connections opening and closing, events stored in
    /// any room. Bounded: see [`ACTIVITY_CAPACITY`]. Items produced before the call are not
    /// replayed; read [`clients`](Self::clients) after subscribing for the current state.
    pub fn activity(&self) -> broadcast::Receiver<RelayActivity> {
        self.shared.activity.subscribe()
    }

    /// Resolves once [`shutdown`](Self::shutdown) has begun (at once if it has), so that
    /// long-lived observers (e.g. a dashboard feed) close with the relay's connections.
    pub async fn shutting_down(&self) {
        let mut shutdown = self.shared.shutdown.subscribe();
        // Err: the sender is gone, which only happens when the relay is, so stop as well.
        let _ = shutdown.wait_for(|stopping| *stopping).await;
    }

    /// The open WebSocket connections, by id.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let clients = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        clients.values().cloned().collect()
    }

    /// Routes `/ws` (the default room) and `/ws/{room}`. Its 404, 405 and 410 answers (a path
    /// it has no route for, a method the upgrade does not take), its fallback's included, are
    /// readable from any origin ([`no_endpoint_any_origin`]), so that ksync.js in a page of
    /// another origin stops with `no_endpoint` rather than retrying for ever.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/ws", any(default_room_handler))
            .route("/ws/{room}", any(room_handler))
            .with_state(self.clone())
            .layer(axum::middleware::map_response(no_endpoint_any_origin))
    }

    /// Serves a WebSocket upgrade for `room` (`None`: the default room). For servers that
    /// mount the relay elsewhere, e.g. at `/` so that `ws://host:8080` works:
    ///
    /// ```no_run
    /// # fn demo(relay: ksync_ws::server::Relay) -> axum::Router {
    /// use axum::{extract::Request, routing::get};
    /// axum::Router::new().route("/", get(move |req: Request| {
    ///     let relay = relay.clone();
    ///     async move { relay.handle_upgrade(None, req).await }
    /// }))
    /// # }
    /// ```
    ///
    /// A request that is not a WebSocket upgrade gets axum's rejection status (400/405/426)
    /// with the relay's JSON refusal body.
    pub async fn handle_upgrade(&self, room: Option<&str>, request: Request) -> Response {
        let room = match room {
            None => RoomPath::Default,
            Some(r) => RoomPath::Named(r),
        };
        self.upgrade(room, request).await
    }

    async fn upgrade(&self, room: RoomPath<'_>, request: Request) -> Response {
        let (mut parts, _body) = request.into_parts();
        // The client's address, when served with connect info (`ksync serve` is).
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|axum::extract::ConnectInfo(addr)| addr.ip());
        // Taken first: the extractor takes hyper's upgrade for itself (see `socket`).
        let pending = socket::Pending::new(parts.version, &parts.headers, &parts.extensions);
        match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(ws) => self.accept(room, &parts.headers, peer, ws, pending).await,
            // The documented refusal shape (`{"error": ..}`), not axum's plain text.
            Err(rejection) => refuse(rejection.status(), &rejection.body_text()),
        }
    }

    /// Drains and flushes: refuses new connections, commits and acknowledges everything already
    /// queued in every room, flushes every log, sends connections what they were owed and
    /// closes them with 1001, then flushes the storage provider.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let rooms: Vec<RoomHandle> = {
            let mut rooms = self.shared.rooms.lock().unwrap_or_else(|p| p.into_inner());
            rooms.drain().map(|(_, h)| h).collect()
        };
        // Every room at once: each flushes its own log (an fsync each with file storage), and
        // one after the other the drain grew by a flush per room (4,096 rooms by default).
        futures_util::future::join_all(rooms.into_iter().map(|handle| async move {
            let (done, wait) = oneshot::channel();
            if handle
                .link
                .tx
                .send(RoomCommand::Shutdown { done })
                .await
                .is_ok()
            {
                let _ = wait.await;
            }
            let _ = handle.task.await;
        }))
        .await;
        // Connections close once they wrote what their room queued for them.
        let deadline = tokio::time::Instant::now() + self.shared.config.write_timeout;
        while self.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Err(e) = self.shared.provider.flush_all().await {
            tracing::error!(error = %e, "flushing storage at shutdown failed");
        }
    }

    async fn accept(
        &self,
        room: RoomPath<'_>,
        headers: &HeaderMap,
        peer: Option<std::net::IpAddr>,
        ws: WebSocketUpgrade,
        pending: socket::Pending,
    ) -> Response {
        let shared = &self.shared;
        if *shared.shutdown.borrow() {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
        }
        // A browser never sees the status of a refused upgrade, only a failed connection, and
        // would retry wrong credentials forever: a client that offers our subprotocol (the
        // browser client does) is refused after the upgrade instead, with an `error` and a
        // close code it can act on.
        // A slot for an in-band refusal, when the client takes them and one is free.
        let in_band = || {
            wants_in_band_refusal(headers)
                .then(|| {
                    Arc::clone(&shared.in_band_refusals)
                        .try_acquire_owned()
                        .ok()
                })
                .flatten()
        };
        let room = match room {
            RoomPath::Default => Ok(shared.default_room.clone()),
            RoomPath::Named(r) => Name::new(r).map_err(|e| e.to_string()),
            RoomPath::Unreadable(why) => Err(why),
        };
        let room = match room {
            Ok(name) => name,
            Err(why) => {
                return Refusal::new(StatusCode::BAD_REQUEST, format!("bad room name: {why}"))
                    .upgrade(ws, in_band());
            }
        };
        let credentials = credentials_from_headers(headers);
        let grant = match shared.auth.authenticate(&credentials) {
            Ok(grant) => grant,
            Err(e) => {
                tracing::info!(room = %room, error = %e, "websocket auth refused");
                return Refusal::auth(&e).upgrade(ws, in_band());
            }
        };
        if !grant.allows(ResourceKind::Room, room.as_str(), Access::Read) {
            tracing::info!(room = %room, subject = %grant.subject, "room not allowed");
            return Refusal::new(StatusCode::FORBIDDEN, "not allowed to read this room")
                .upgrade(ws, in_band());
        }
        let client = ClientId::new(&grant, shared.auth.required(), peer);
        let slot = match shared.take_connection(client.clone()) {
            Ok(slot) => slot,
            Err(OverCap::Server) => {
                return refuse(StatusCode::SERVICE_UNAVAILABLE, "too many connections");
            }
            Err(OverCap::Client) => {
                let cap = shared.config.max_connections_per_client;
                shared.client_cap_refusals.fetch_add(1, Ordering::Relaxed);
                if let Some(client) = &client {
                    tracing::info!(%client, cap, "connection refused: the client has max_connections_per_client open");
                }
                // 429, as for a client that failed to log in too often: kSync's clients retry
                // it with backoff (a browser hears it in-band, `rate_limited`, 4429).
                return Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("too many connections for this client (at most {cap})"),
                )
                .upgrade(ws, in_band());
            }
        };
        let room_link = match self.shared.room(&room).await {
            Ok(link) => link,
            Err(RelayError::ShuttingDown) => {
                return refuse(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
            }
            Err(RelayError::TooManyRooms(open)) => {
                tracing::warn!(room = %room, open, "room refused: max_open_rooms rooms are open");
                return refuse(StatusCode::SERVICE_UNAVAILABLE, "too many open rooms");
            }
            // `notes` beside a stored `Notes`: the client's to change, like any bad name.
            Err(RelayError::Storage {
                source: source @ ksync_core::StorageError::NameClash { .. },
                ..
            }) => {
                return Refusal::new(StatusCode::BAD_REQUEST, format!("bad room name: {source}"))
                    .upgrade(ws, in_band());
            }
            // A new room past the provider's cap on stored rooms: nothing was created. 507
            // (not in-band, like 503): kSync's clients retry it later, as any 5xx, by when
            // the operator may have raised the cap or deleted rooms.
            Err(RelayError::Storage {
                source: ksync_core::StorageError::TooManyLogs { max, .. },
                ..
            }) => {
                tracing::warn!(room = %room, max, "room refused: the server keeps at most max_rooms rooms");
                return refuse(
                    StatusCode::INSUFFICIENT_STORAGE,
                    &format!("too many rooms stored (at most {max})"),
                );
            }
            Err(RelayError::Storage { room, source }) if source.is_storage_full() => {
                tracing::error!(room = %room, error = %source, "cannot open room: the disk is full");
                return refuse(StatusCode::INSUFFICIENT_STORAGE, "storage full");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open room");
                return refuse(StatusCode::INTERNAL_SERVER_ERROR, "cannot open room");
            }
        };
        let config = &shared.config;
        let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::clone(shared);
        let info = ClientInfo {
            id: conn_id,
            room: room.clone(),
            subject: grant.subject.clone(),
            connected_at: SystemTime::now(),
        };
        let ws = ws.protocols([SUBPROTOCOL]);
        let socket_config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_size)
            .write_buffer_size(config.write_buffer_size)
            // Every write waits for the socket to be ready, and messages are written in
            // fragments (`socket::FRAGMENT_BYTES`), so the buffer holds at most
            // `write_buffer_size` plus a fragment. The cap is what it was for whole frames
            // (bounded where they are made: events frames at `max_message_size` plus one
            // event, acks at `max_message_size` of `held` revisions plus one short result per
            // event, see `room::AckText`; re-encoded catch-up events may be longer than sent,
            // `1e9` is written `1000000000.0`).
            .max_write_buffer_size(
                config
                    .write_buffer_size
                    .saturating_add(config.max_message_size.saturating_mul(4)),
            )
            .max_message_size(Some(config.max_message_size))
            .max_frame_size(Some(config.max_message_size));
        pending.accept(&ws, socket_config, {
            // Dropped with the callback when the upgrade never completes: the room then
            // hears that this connection is gone.
            let member = Member {
                link: room_link,
                conn: conn_id,
            };
            // Not an `async` block around `conn::serve`: it would keep what it moved into
            // the connection a second time for the connection's life (a coroutine keeps its
            // captures), about 600 bytes of every idle connection.
            move |socket| {
                let observed = Arc::clone(&shared);
                observed.client_joined(info.clone());
                conn::serve(conn::Connection {
                    shared,
                    socket,
                    room,
                    grant,
                    member,
                    id: conn_id,
                    _slot: slot,
                })
                .map(move |()| observed.client_left(info))
            }
        })
    }
}

/// A room being opened by one connection (`Shared::opening`): dropped (the open done,
/// failed or abandoned), it leaves the map, then its sender wakes those waiting for it.
struct Opening<'a> {
    shared: &'a Shared,
    name: Name,
    _done: watch::Sender<()>,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.shared
            .opening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// A room name in the map: open, closing, or not there.
enum Lookup {
    Open(RoomLink),
    Closing(watch::Receiver<()>),
    Absent,
}

impl Shared {
    /// Marks `name` as being opened by the caller; `Err`: another connection is opening it
    /// (its receiver changes, with an error, once that open ended).
    fn start_opening(&self, name: &Name) -> Result<Opening<'_>, watch::Receiver<()>> {
        let mut opening = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pending) = opening.get(name) {
            return Err(pending.clone());
        }
        let (done, pending) = watch::channel(());
        opening.insert(name.clone(), pending);
        Ok(Opening {
            shared: self,
            name: name.clone(),
            _done: done,
        })
    }

    /// The room `name`, opened (its log and its task) on first use, and again after it closed.
    pub(crate) async fn room(self: &Arc<Self>, name: &Name) -> Result<RoomLink, RelayError> {
        loop {
            let found = Self::lookup(&self.rooms.lock().unwrap_or_else(|p| p.into_inner()), name);
            match found {
                Lookup::Open(link) => return Ok(link),
                Lookup::Closing(mut ended) => {
                    // Wait until its task has ended (so that it made its last commit), then
                    // open it anew. Err: it has ended.
                    let _ = ended.changed().await;
                    continue;
                }
                Lookup::Absent => {}
            }
            // One connection opens a room; the others wait for it (see `Shared::opening`).
            let _opening = match self.start_opening(name) {
                Ok(opening) => opening,
                Err(mut pending) => {
                    // Err: the open ended (the room is in the map now, or it failed).
                    let _ = pending.changed().await;
                    continue;
                }
            };
            // An open that ended between the lookup above and `start_opening` put its room
            // in the map before it stopped opening: look again.
            match Self::lookup(&self.rooms.lock().unwrap_or_else(|p| p.into_inner()), name) {
                Lookup::Open(link) => return Ok(link),
                Lookup::Closing(_) => continue,
                Lookup::Absent => {}
            }
            // Taken before the log is opened and held by the room until its log is released
            // (`Room::open`), so no more than `max_open_rooms` logs are open for rooms.
            let slot = Arc::clone(&self.room_slots)
                .try_acquire_owned()
                .map_err(|_| RelayError::TooManyRooms(self.config.max_open_rooms))?;
            // Opening a log may take long (a file log replays itself): off the runtime's
            // workers and outside the room map's lock, so that other rooms keep working.
            let provider = Arc::clone(&self.provider);
            let log = LogName::Room(name.clone());
            let opened = tokio::task::spawn_blocking(move || provider.open(&log))
                .await
                .unwrap_or_else(|panicked| {
                    Err(ksync_core::StorageError::Io {
                        context: "opening the log panicked".into(),
                        source: std::io::Error::other(panicked),
                    })
                });
            let storage = opened.map_err(|source| RelayError::Storage {
                room: name.to_string(),
                source,
            })?;
            let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
            // Another connection may have opened it meanwhile (the provider hands out one log
            // per name, so both opened the same one), or it may be closing again.
            match Self::lookup(&rooms, name) {
                Lookup::Open(link) => return Ok(link),
                Lookup::Closing(_) => continue,
                Lookup::Absent => {}
            }
            // Checked under the lock that `shutdown` drains the rooms under after setting the
            // flag: a room made now would never be shut down.
            if *self.shutdown.borrow() {
                return Err(RelayError::ShuttingDown);
            }
            let (link, task) = Room::open(
                name.clone(),
                storage,
                slot,
                Arc::clone(&self.provider),
                &self.config,
                Arc::clone(&self.room_queues_budget),
                self.activity.clone(),
            );
            let generation = self.next_room.fetch_add(1, Ordering::Relaxed);
            let (ended_tx, ended) = watch::channel(());
            let relay = Arc::downgrade(self);
            let key = name.clone();
            let task = tokio::spawn(async move {
                task.await;
                // An idle room takes itself out of the map (at shutdown the map is drained).
                if let Some(shared) = relay.upgrade() {
                    let mut rooms = shared.rooms.lock().unwrap_or_else(|p| p.into_inner());
                    let gone = match rooms.get(&key) {
                        Some(handle) if handle.generation == generation => rooms.remove(&key),
                        _ => None,
                    };
                    drop(rooms);
                    drop(gone);
                }
                drop(ended_tx);
            });
            rooms.insert(
                name.clone(),
                RoomHandle {
                    link: link.clone(),
                    task,
                    generation,
                    ended,
                },
            );
            return Ok(link);
        }
    }

    /// What the map holds for `name`.
    fn lookup(rooms: &HashMap<Name, RoomHandle>, name: &Name) -> Lookup {
        match rooms.get(name) {
            Some(handle) if !handle.link.tx.is_closed() => Lookup::Open(handle.link.clone()),
            Some(handle) => Lookup::Closing(handle.ended.clone()),
            None => Lookup::Absent,
        }
    }
}

/// Makes a 404, 405 or 410 answer (nothing there, or not that method) readable from any
/// origin (`Access-Control-Allow-Origin: *`, once, whoever adds it first), as ksync-server's
/// `/ksync.js` is: a browser hides a refused upgrade's answer, so ksync.js asks for the URL
/// with a plain `GET` to tell a wrong URL (`no_endpoint`, it stops) from a passing failure
/// (it retries), and a page of another origin sees that answer only with this header. They
/// hold nothing (credentials are never allowed with `*`); other answers stay same-origin.
/// [`Relay::router`] applies it; a server composing more routes around the relay's (as
/// ksync-server does) applies it to the whole, with `axum::middleware::map_response`.
pub async fn no_endpoint_any_origin(mut response: Response) -> Response {
    if matches!(
        response.status(),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::GONE
    ) {
        response
            .headers_mut()
            .entry(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .or_insert(header::HeaderValue::from_static("*"));
    }
    response
}

async fn default_room_handler(State(relay): State<Relay>, request: Request) -> Response {
    relay.handle_upgrade(None, request).await
}

/// The room an upgrade asks for.
enum RoomPath<'a> {
    /// `/ws`, or the relay mounted elsewhere without a room.
    Default,
    Named(&'a str),
    /// A path segment axum could not take as a string (not UTF-8 once percent-decoded): why.
    Unreadable(String),
}

async fn room_handler(
    State(relay): State<Relay>,
    room: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    // A rejected path is a bad room name: refused as the others are (JSON, or in-band for a
    // browser), not with the extractor's plain-text 400, which a browser cannot read.
    match &room {
        Ok(Path(room)) => relay.upgrade(RoomPath::Named(room), request).await,
        Err(rejection) => {
            let why = RoomPath::Unreadable(rejection.body_text());
            relay.upgrade(why, request).await
        }
    }
}

/// The listener to serve the relay with: every accepted socket gets `TCP_NODELAY`, so small
/// frames (an ack, a one-event batch) are not held back by Nagle's algorithm waiting for the
/// peer's delayed ACK (which costs milliseconds per message on a quiet connection).
///
/// ```no_run
/// # async fn demo(relay: ksync_ws::server::Relay) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// axum::serve(ksync_ws::server::nodelay(listener), relay.router()).await
/// # }
/// ```
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    fn set(tcp: &mut tokio::net::TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY failed");
        }
    }
    axum::serve::ListenerExt::tap_io(listener, set as fn(&mut tokio::net::TcpStream))
}

/// Whether a request asks for a WebSocket upgrade (for servers that share a path, e.g. `/`,
/// between the relay and something else).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Takes credentials from `Authorization: Bearer ..`, `X-Api-Key: ..`, or (for browsers, which
/// cannot set headers on a WebSocket) `Sec-WebSocket-Protocol` entries `ksync.auth.<token>` and
/// `ksync.apikey.<key>`. An empty value is no credential (as for the repository service): a
/// blank header is "credentials required", not a failed attempt counted against the client.
pub fn credentials_from_headers(headers: &HeaderMap) -> Credentials {
    let mut credentials = Credentials::default();
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some((scheme, token)) = value.trim().split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
        && !token.trim().is_empty()
    {
        credentials.bearer = Some(token.trim().to_owned());
    }
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok())
        && !key.trim().is_empty()
    {
        credentials.api_key = Some(key.trim().to_owned());
    }
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let Ok(value) = value.to_str() else { continue };
        for entry in value.split(',').map(str::trim) {
            if let Some(token) = entry.strip_prefix(AUTH_PROTOCOL_PREFIX)
                && !token.is_empty()
            {
                credentials.bearer.get_or_insert_with(|| token.to_owned());
            } else if let Some(key) = entry.strip_prefix(APIKEY_PROTOCOL_PREFIX)
                && !key.is_empty()
            {
                credentials.api_key.get_or_insert_with(|| key.to_owned());
            }
        }
    }
    credentials
}

/// Whether a request is a WebSocket upgrade that offers the `ksync.v1` subprotocol: the relay
/// refuses such a client in-band (an `error`, then close 4400, 4401, 4403 or 4429) rather
/// than with an HTTP status, which a browser cannot read. Servers that refuse requests before
/// the relay sees them (e.g. a rate limit) should let these through to it.
pub fn wants_in_band_refusal(headers: &HeaderMap) -> bool {
    is_websocket_upgrade(headers)
        && headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == SUBPROTOCOL)
}

/// Most time an in-band refusal spends on its socket.
const IN_BAND_REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request (a WebSocket upgrade, or a request to a WebSocket endpoint) is refused. It
/// is answered with its HTTP status and `{"error": message}` (401s with their
/// `WWW-Authenticate` challenge), or, for an upgrade that takes refusals in-band (see
/// [`wants_in_band_refusal`]), after the upgrade with the status's `error` code and close
/// code: 400 `bad_room` 4400, 401 `unauthorized` 4401, 403 `forbidden` 4403, 429
/// `rate_limited` 4429. Other statuses (503...) are always HTTP answers: retrying is right.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    message: String,
    challenge: Option<String>,
}

impl Refusal {
    /// A refusal with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            challenge: None,
        }
    }

    /// Refused credentials: 401, 403 (rights) or 429 (rate-limited), with the challenge.
    pub fn auth(error: &AuthError) -> Self {
        let status = match error {
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            AuthError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::UNAUTHORIZED,
        };
        Self {
            status,
            message: error.to_string(),
            // RFC 9110 11.6.1: every 401 carries a challenge.
            challenge: error.www_authenticate(),
        }
    }

    /// As an HTTP answer.
    pub fn http(self) -> Response {
        let mut response = refuse(self.status, &self.message);
        if let Some(challenge) = self
            .challenge
            .and_then(|c| axum::http::HeaderValue::from_str(&c).ok())
        {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }

    /// The answer to the upgrade `ws`: in-band when given an in-band refusal slot (see
    /// `RelayConfig::max_in_band_refusals`) and the status has an in-band form, else the HTTP
    /// answer.
    pub(crate) fn upgrade(
        self,
        ws: WebSocketUpgrade,
        in_band: Option<OwnedSemaphorePermit>,
    ) -> Response {
        let in_band_form = match self.status {
            StatusCode::BAD_REQUEST => Some((code::BAD_ROOM, close::BAD_ROOM)),
            StatusCode::UNAUTHORIZED => Some((code::UNAUTHORIZED, close::UNAUTHORIZED)),
            StatusCode::FORBIDDEN => Some((code::FORBIDDEN, close::FORBIDDEN)),
            StatusCode::TOO_MANY_REQUESTS => Some((code::RATE_LIMITED, close::RATE_LIMITED)),
            _ => None,
        };
        match (in_band_form, in_band) {
            (Some((error_code, close_code)), Some(slot)) => {
                refuse_in_band(ws, error_code, close_code, self.message, slot)
            }
            _ => self.http(),
        }
    }
}

/// Accepts the upgrade only to say no: an `error` message, then a close with `close_code`.
/// The connection is not counted against `max_connections`: it holds `slot` (one of
/// `max_in_band_refusals`) and lives at most [`IN_BAND_REFUSAL_TIMEOUT`] with small buffers.
fn refuse_in_band(
    ws: WebSocketUpgrade,
    error_code: &'static str,
    close_code: u16,
    message: String,
    slot: OwnedSemaphorePermit,
) -> Response {
    use axum::extract::ws::{CloseFrame, Message};

    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(1024)
        .write_buffer_size(1024)
        .max_message_size(1024)
        .max_frame_size(1024)
        .on_upgrade(move |mut socket| async move {
            // Held until the refusal is over (or dropped with this callback when the upgrade
            // never completes).
            let _slot = slot;
            let error = protocol::ServerMessage::error(error_code, message, None);
            let text = serde_json::to_string(&error).unwrap_or_default();
            let refuse = async {
                socket.send(Message::text(text)).await?;
                socket
                    .send(Message::Close(Some(CloseFrame {
                        code: close_code,
                        reason: error_code.into(),
                    })))
                    .await?;
                // Wait for the client's Close (RFC 6455 §7.1.1) before the TCP connection
                // ends: closing it with the client's `hello` still unread sends a reset,
                // which browsers may act on before our Close frame (they then see 1006, not
                // the code that says why). What the client sends meanwhile is discarded.
                while let Some(message) = socket.recv().await {
                    if matches!(message?, Message::Close(_)) {
                        break;
                    }
                }
                Ok::<(), axum::Error>(())
            };
            if let Err(e) = tokio::time::timeout(IN_BAND_REFUSAL_TIMEOUT, refuse)
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|sent| sent.map_err(|e| e.to_string()))
            {
                tracing::debug!(error = %e, "in-band refusal not delivered");
            }
        })
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
