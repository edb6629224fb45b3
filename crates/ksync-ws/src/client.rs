//! `WebSocketSyncClient`: the spec's real-time client.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use ksync_core::{
    Auth, BoxFuture, Conflict, Direction, Event, EventLimits, Filter, Ingested, MeterTotals,
    MetricsMeter, Middleware, Notification, NotificationKind, Notifier, PROTOCOL_VERSION, Pipeline,
    Replica, Status, Stored, SyncClient, SyncError, debug_log,
};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::error::WsError;
use crate::progress::{Activity, Watched, unless_stalled};
use crate::protocol::{self, ClientMessage, Hello, Publish, PublishResult, ServerMessage, close};
use crate::tls::ClientStream;

/// Target of this file's [`debug_log!`] lines, fixed because users filter on it.
const LOG_TARGET: &str = "ksync_ws::client";

/// How outgoing events are grouped (the spec's `strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// `event-level`: each event goes out as soon as it is sent; `batch_size` caps how many
    /// queued events share one message (after a reconnect). Default `batch_size` 1.
    EventLevel {
        /// Most events per message.
        batch_size: usize,
    },
    /// `batch`: events go out when `batch_size` are waiting or every `batch_interval`.
    Batch {
        /// Events that trigger a send.
        batch_size: usize,
        /// Longest an event waits.
        batch_interval: Duration,
    },
    /// `state-based`: the client starts from the server's snapshot (latest version of each id)
    /// plus the live tail, and sends the latest version of each changed id every
    /// `snapshot_interval` (intermediate versions are skipped).
    StateBased {
        /// How often local state goes out.
        snapshot_interval: Duration,
    },
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::EventLevel { batch_size: 1 }
    }
}

/// Options of a [`WebSocketSyncClient`], with the spec's defaults.
#[derive(Debug, Clone)]
struct Config {
    url: String,
    auth: Option<Auth>,
    reconnect: bool,
    heartbeat: Duration,
    heartbeat_timeout: Duration,
    connect_timeout: Duration,
    compression: bool,
    strategy: Strategy,
    filter: Option<Filter>,
    debug: bool,
    outbox_capacity: usize,
    metrics_interval: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    max_message_size: usize,
    max_in_flight: usize,
    /// PEM root certificates trusted for `wss://` besides the system's.
    tls_roots_pem: Vec<Vec<u8>>,
}

/// Builds a [`WebSocketSyncClient`]; see each method for its default.
#[derive(Debug)]
#[must_use]
pub struct WebSocketSyncClientBuilder {
    config: Config,
}

impl WebSocketSyncClientBuilder {
    /// Credentials: `Auth::jwt(..)` or `Auth::api_key(..)`. Default none. `build` refuses
    /// credentials that cannot go in an HTTP header (control characters, e.g. a newline).
    pub fn auth(mut self, auth: Auth) -> Self {
        self.config.auth = Some(auth);
        self
    }

    /// Also trusts the root certificates in `pem` (one or more `CERTIFICATE` blocks) for
    /// `wss://`, besides the system's: a private CA, or a self-signed server certificate.
    /// Can be called more than once. `build` refuses PEM without a certificate.
    pub fn tls_root_certificates_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.config.tls_roots_pem.push(pem.as_ref().to_vec());
        self
    }

    /// Reconnect automatically (exponential backoff with jitter). Default `true`.
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.config.reconnect = reconnect;
        self
    }

    /// Ping interval. Default 30 s.
    pub fn heartbeat(mut self, heartbeat: Duration) -> Self {
        self.config.heartbeat = heartbeat;
        self
    }

    /// How long after a ping the server must have answered before the connection is
    /// considered dead (so a dead server is detected within `heartbeat + heartbeat_timeout`).
    /// An answer is a pong, a message, or bytes of one still coming (on a slow link the pong
    /// waits behind them): the wait then ends `heartbeat_timeout` after the last byte read.
    /// Also bounds each socket write: one the socket takes no byte of for this long is given
    /// up (a large publish over a slow link takes as long as the link needs while its bytes
    /// keep moving). Default 10 s.
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.config.heartbeat_timeout = timeout;
        self
    }

    /// Limit for TCP connect + upgrade + `welcome`. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Deflate event batches (both directions). Default `false`.
    pub fn compression(mut self, compression: bool) -> Self {
        self.config.compression = compression;
        self
    }

    /// How events are grouped. Default `Strategy::EventLevel { batch_size: 1 }`.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.config.strategy = strategy;
        self
    }

    /// Which events to sync, both ways (a predicate or `Filter::PublicOnly`). Default all.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.config.filter = Some(filter);
        self
    }

    /// Log connection and frame details at DEBUG level (TRACE otherwise). Default `false`.
    pub fn debug(mut self, debug: bool) -> Self {
        self.config.debug = debug;
        self
    }

    /// Events kept while disconnected when no replica is attached. Overflow policy: `send`
    /// refuses the new event with [`WsError::OutboxFull`]; queued events are never dropped.
    /// Default 10 000.
    pub fn outbox_capacity(mut self, capacity: usize) -> Self {
        self.config.outbox_capacity = capacity;
        self
    }

    /// How often `metrics` notifications are emitted. Default 5 s.
    pub fn metrics_interval(mut self, interval: Duration) -> Self {
        self.config.metrics_interval = interval;
        self
    }

    /// Backoff range between reconnect attempts (doubling from `min`, capped at `max`, each
    /// delay randomised between half and all of it). The count starts again from `min` after
    /// a connection that stayed up for `max`; one that drops sooner keeps counting. Default
    /// 250 ms to 30 s; `build` refuses a zero `min`, `min > max` or a bound past a day.
    pub fn reconnect_delay(mut self, min: Duration, max: Duration) -> Self {
        self.config.reconnect_min = min;
        self.config.reconnect_max = max;
        self
    }

    /// Builds the client (no connection yet). Every duration (`heartbeat`,
    /// `heartbeat_timeout`, `connect_timeout`, `metrics_interval`, the strategy's interval,
    /// both `reconnect_delay` bounds) must be positive and at most
    /// [`ksync_core::MAX_CONFIG_DURATION`] (a day); the error names the one that is not.
    pub fn build(self) -> Result<WebSocketSyncClient, SyncError> {
        let c = &self.config;
        let interval = match c.strategy {
            Strategy::EventLevel { batch_size } | Strategy::Batch { batch_size, .. }
                if batch_size == 0 =>
            {
                return Err(SyncError::Config("batch_size must be at least 1".into()));
            }
            Strategy::EventLevel { .. } => None,
            Strategy::Batch { batch_interval, .. } => Some(("batch_interval", batch_interval)),
            Strategy::StateBased { snapshot_interval } => {
                Some(("snapshot_interval", snapshot_interval))
            }
        };
        // Far past a day, the session's `Instant::now() + timer` overflowed and panicked its
        // task after `connect` had succeeded: the client then stayed connected doing nothing.
        // A zero `reconnect_delay` min doubles to zero: a dead server would be retried in a
        // busy loop.
        for (field, value) in [
            ("heartbeat", c.heartbeat),
            ("heartbeat_timeout", c.heartbeat_timeout),
            ("connect_timeout", c.connect_timeout),
            ("metrics_interval", c.metrics_interval),
            ("reconnect_delay min", c.reconnect_min),
            ("reconnect_delay max", c.reconnect_max),
        ]
        .into_iter()
        .chain(interval)
        {
            ksync_core::check_config_duration(field, value).map_err(SyncError::Config)?;
        }
        if c.reconnect_min > c.reconnect_max {
            return Err(SyncError::Config("reconnect_delay needs min <= max".into()));
        }
        if c.outbox_capacity == 0 {
            return Err(SyncError::Config("outbox_capacity must be positive".into()));
        }
        Auth::check_sendable(c.auth.as_ref())?;
        let target = Target::parse(&c.url)?;
        let mut roots = Vec::new();
        for pem in &c.tls_roots_pem {
            roots.extend(crate::tls::parse_roots(pem).map_err(SyncError::Config)?);
        }
        let tls = match target.tls {
            true => Some(crate::tls::connector(&roots).map_err(SyncError::Config)?),
            false => None,
        };
        let (state, _) = watch::channel((0, Link::Down));
        let inner = Arc::new(Inner {
            target,
            tls,
            client_id: uuid::Uuid::new_v4().simple().to_string(),
            notifier: Notifier::new(),
            pipeline: Pipeline::new(),
            replica: Mutex::new(None),
            outbox: Mutex::new(Outbox::default()),
            control: Mutex::new(None),
            manager_end: Mutex::new(None),
            waiters: Mutex::new(Vec::new()),
            generations: AtomicU64::new(0),
            wake: Notify::new(),
            retry_now: Notify::new(),
            queued: AtomicUsize::new(0),
            rescan_from: AtomicU64::new(u64::MAX),
            acked_writes: tokio::sync::Mutex::new(()),
            standalone_cursor: Mutex::new(None),
            standalone_log: Mutex::new(None),
            state,
            auth: Mutex::new(self.config.auth.clone()),
            auth_changes: watch::channel(0).0,
            config: self.config,
        });
        Ok(WebSocketSyncClient {
            _life: Arc::new(Life(Arc::downgrade(&inner))),
            inner,
        })
    }
}

/// The spec's `WebSocketSyncClient`: real-time sync with a kSync relay.
///
/// ```no_run
/// # async fn demo() -> Result<(), ksync_core::SyncError> {
/// use std::{sync::Arc, time::Duration};
/// use ksync_core::{Auth, InMemoryStorage, KSync};
/// use ksync_ws::WebSocketSyncClient;
///
/// let client = WebSocketSyncClient::builder("ws://localhost:8080")
///     .auth(Auth::jwt("your-token"))
///     .reconnect(true)
///     .heartbeat(Duration::from_secs(30))
///     .build()?;
/// let ksync = KSync::builder()
///     .storage(Arc::new(InMemoryStorage::new()))
///     .sync_client(Arc::new(client))
///     .build()
///     .await?;
/// ksync.connect().await?;
/// ksync.emit("user_action", serde_json::json!({"action": "click", "button": "submit"})).await?;
/// # Ok(()) }
/// ```
///
/// Attached to a replica (through `KSync`), received events are stored with
/// `Replica::ingest` before any notification, the room cursor and the acknowledged cursor are
/// kept in the replica's storage, and local events go out in sequence order on every
/// (re)connect. Standalone, sent events wait in a bounded in-memory outbox
/// ([`WebSocketSyncClientBuilder::outbox_capacity`]).
///
/// A publish the server refuses as a whole (an `error` with its `ref`) is not acknowledged:
/// its events stay queued and the error is notified. After `storage` the connection ends and
/// they go again after the reconnect delay; after `forbidden` (or a code this client does not
/// know) nothing more is published on that connection, which keeps receiving, and the events
/// wait for the next one ([`WebSocketSyncClient::set_auth`] starts it). Received events that
/// break the event rules are skipped with a [`WsError::Protocol`] notification.
#[derive(Clone)]
pub struct WebSocketSyncClient {
    inner: Arc<Inner>,
    /// Shared by the clones of this handle (not by the background task): when the last clone
    /// is dropped, the connection closes and reconnecting stops.
    _life: Arc<Life>,
}

/// Stops the background task when the last user handle goes away (the task itself holds
/// `Inner`, so `Inner`'s own drop would never run while it is alive).
struct Life(std::sync::Weak<Inner>);

impl Drop for Life {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade()
            && let Some(control) = lock(&inner.control).take()
        {
            control.stop.send_replace(true);
        }
    }
}

impl std::fmt::Debug for WebSocketSyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketSyncClient")
            .field("url", &self.inner.config.url)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// Whether a session is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    /// Established; `connected` handlers are running. `connect()` waits for `Up`, so it
    /// returns after them, while the handlers already see `is_connected()`.
    Announcing,
    /// Established and announced.
    Up,
}

/// A `connect()` waiting for the outcome of manager `.0`'s next attempt.
type Waiter = (u64, oneshot::Sender<Result<(), WsError>>);

struct Control {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Which manager this is (a manager that ends removes its own `Control` only).
    generation: u64,
}

struct Inner {
    config: Config,
    target: Target,
    /// For `wss://`.
    tls: Option<tokio_rustls::TlsConnector>,
    client_id: String,
    notifier: Notifier,
    pipeline: Pipeline,
    replica: Mutex<Option<Replica>>,
    outbox: Mutex<Outbox>,
    control: Mutex<Option<Control>>,
    /// Closes when the newest manager's task has ended, however it ended (its sender lives
    /// in the task): what `disconnect` waits for, also a second one that finds `control`
    /// already taken, and what a manager started after it waits for before connecting, so
    /// two managers never run sessions at once. Locked after `control`.
    manager_end: Mutex<Option<watch::Receiver<()>>>,
    /// `connect()` calls waiting for the outcome of the next attempt of the manager of the
    /// given generation. Locked after `control` when both are needed.
    waiters: Mutex<Vec<Waiter>>,
    /// Numbers the managers `connect` starts.
    generations: AtomicU64,
    /// Poked by `send` so the session looks for new local events.
    wake: Notify,
    /// Poked by `connect` so a manager waiting out a backoff delay tries at once. Holds at
    /// most one permit; the manager drops a stale one when it answers the waiters.
    retry_now: Notify,
    /// Events sent since the last flush (drives `Strategy::Batch`).
    queued: AtomicUsize,
    /// The lowest seq of an already-stored event marked for forwarding since the last pump
    /// (`u64::MAX`: none): the session's scan may have passed it and looks again from there.
    rescan_from: AtomicU64,
    /// Held while the acknowledged cursor (`ws:<url>/acked`) is computed and written: `send`
    /// moves it back below a forwarded event, and a session's `settle` must not write its
    /// older, higher value over that.
    acked_writes: tokio::sync::Mutex<()>,
    /// The room cursor of a standalone client (`None` before its first session: it starts
    /// with the live stream).
    standalone_cursor: Mutex<Option<u64>>,
    /// The room log a standalone client's cursor belongs to (`welcome.logId`; `None` before
    /// the first).
    standalone_log: Mutex<Option<String>>,
    /// The manager generation that set it, and its link: a `connect` takes only the session
    /// of the manager it would wait for as its own (not one that `disconnect` is stopping).
    state: watch::Sender<(u64, Link)>,
    /// The credentials of the next connection attempt (the builder's, or `set_auth`'s).
    auth: Mutex<Option<Auth>>,
    /// Counts `set_auth` calls: a session whose publishes were refused ends when it moves, so
    /// the next one publishes with the new credentials.
    auth_changes: watch::Sender<u64>,
}

impl WebSocketSyncClient {
    /// Starts a builder for `url` (`ws://host:port` for the default room, or
    /// `ws://host:port/ws/<room>`).
    pub fn builder(url: impl Into<String>) -> WebSocketSyncClientBuilder {
        WebSocketSyncClientBuilder {
            config: Config {
                url: url.into(),
                auth: None,
                reconnect: true,
                heartbeat: Duration::from_secs(30),
                heartbeat_timeout: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(10),
                compression: false,
                strategy: Strategy::default(),
                filter: None,
                debug: false,
                outbox_capacity: 10_000,
                metrics_interval: Duration::from_secs(5),
                reconnect_min: Duration::from_millis(250),
                reconnect_max: Duration::from_secs(30),
                max_message_size: protocol::CLIENT_MAX_MESSAGE_SIZE,
                max_in_flight: 10_000,
                tls_roots_pem: Vec::new(),
            },
        }
    }

    /// A client with every default.
    pub fn new(url: impl Into<String>) -> Result<Self, SyncError> {
        Self::builder(url).build()
    }

    /// The spec's `use(direction, middleware)`: adds a middleware to the `incoming` or
    /// `outgoing` chain (run in registration order). The filter sees events as the
    /// application made them: before the outgoing chain, after the incoming one.
    pub fn use_middleware(&self, direction: Direction, middleware: impl Middleware) {
        self.inner.pipeline.use_middleware(direction, middleware);
    }

    /// Whether a session is established (after `welcome`).
    pub fn is_connected(&self) -> bool {
        self.inner.state.borrow().1 != Link::Down
    }

    /// Manager `generation` is connected, and `connected` handlers have run.
    fn is_announced(&self, generation: u64) -> bool {
        *self.inner.state.borrow() == (generation, Link::Up)
    }

    /// The name of the cursor this client keeps in its replica's metadata for the room: up to
    /// the last room sequence number it holds (written at most once a second while connected,
    /// and at the session's end), which its `hello` sends as `since`. Setting it
    /// (`Replica::set_cursor`) before the first connection starts the client after that
    /// sequence number, as `ksync watch --since` does.
    pub fn room_cursor_name(&self) -> String {
        Cursors::new(&self.inner.config.url).room
    }

    /// How often the client pings the server: the spec's `heartbeat` (30 000 ms unless
    /// [`WebSocketSyncClientBuilder::heartbeat`] set another).
    pub fn heartbeat(&self) -> Duration {
        self.inner.config.heartbeat
    }

    /// This client's id: the `origin` given to standalone events that have none.
    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// Replaces the credentials (`None`: none) for the next connection attempt, e.g. a fresh
    /// token after the server closed the connection with 4401 (credentials expired) or
    /// refused the old one; call `connect()` afterwards if the client stopped. The open
    /// connection, if any, keeps going until the server closes it, unless the server refused
    /// a publish on it (e.g. `forbidden`: read-only credentials): then it ends now and the
    /// client reconnects (after the usual backoff delay) with these credentials, and the
    /// events that waited go out. Refuses credentials that cannot go in an HTTP header, as the
    /// builder does.
    pub fn set_auth(&self, auth: Option<Auth>) -> Result<(), SyncError> {
        Auth::check_sendable(auth.as_ref())?;
        *lock(&self.inner.auth) = auth;
        self.inner
            .auth_changes
            .send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Events waiting in the standalone outbox (sent but not yet acknowledged).
    pub fn outbox_len(&self) -> usize {
        lock(&self.inner.outbox).items.len()
    }

    async fn connect_inner(&self) -> Result<(), SyncError> {
        let (tx, rx) = oneshot::channel();
        {
            // Under the control lock, so a manager that is ending either sees this waiter
            // (and tries again for it) or has already removed itself (and a new one starts).
            let mut control = lock(&self.inner.control);
            // (A finished task without `retire`: it panicked. A stopping one is ending: its
            // session, though still up, is not this call's.)
            let running = control
                .as_ref()
                .filter(|c| !c.task.is_finished() && !*c.stop.borrow())
                .map(|c| c.generation);
            if let Some(generation) = running {
                lock(&self.inner.waiters).push((generation, tx));
                // Up before waiters are answered: a waiter pushed too late to be answered
                // sees it.
                if self.is_announced(generation) {
                    return Ok(());
                }
                // Asked now (e.g. the network is back): do not wait out a backoff delay.
                self.inner.retry_now.notify_one();
            } else {
                let generation = self.inner.generations.fetch_add(1, Ordering::Relaxed) + 1;
                let (stop, stop_rx) = watch::channel(false);
                let (end, end_rx) = watch::channel(());
                // A manager `disconnect` stopped may still be closing its session.
                let previous = lock(&self.inner.manager_end).replace(end_rx);
                lock(&self.inner.waiters).push((generation, tx));
                let task = tokio::spawn(manage(
                    Arc::clone(&self.inner),
                    stop_rx,
                    generation,
                    previous,
                    end,
                ));
                *control = Some(Control {
                    stop,
                    task,
                    generation,
                });
            }
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SyncError::NotConnected),
        }
    }

    async fn disconnect_inner(&self) -> Result<(), SyncError> {
        let end = {
            let mut control = lock(&self.inner.control);
            if let Some(control) = control.take() {
                control.stop.send_replace(true);
            }
            // Also when another `disconnect` took `control` first: both return once the
            // manager has ended, not while its session is still closing.
            lock(&self.inner.manager_end).clone()
        };
        if let Some(end) = end {
            wait_end(end).await;
        }
        Ok(())
    }

    async fn send_inner(&self, event: Event) -> Result<(), SyncError> {
        // The relay refuses what breaks the event rules (with its default limits): refused
        // here, the caller learns it now and nothing unsendable is stored or queued.
        event.validate(&EventLimits::default())?;
        let replica = lock(&self.inner.replica).clone();
        match replica {
            Some(replica) => {
                // Stored if new (through KSync it already is) and pending here: our own, or
                // another replica's handed to us (a bridge), kept with its origin.
                let forwarded = replica.forward(event).await?;
                // A collision was settled as for a received event: reported as one is.
                for conflict in forwarded.conflicts {
                    self.inner.notifier.emit(Notification::Conflict(conflict));
                }
                if let Some(seq) = forwarded.marked {
                    // Already stored, perhaps behind this client's scan: look again. Perhaps
                    // also behind the acknowledged cursor, where the next session (also after
                    // a restart) starts: moved back durably, so it goes out even if this
                    // session ends before it is acknowledged (what goes twice, the room
                    // answers as duplicates). Later acks move the cursor forward again.
                    let _writes = self.inner.acked_writes.lock().await;
                    self.inner.rescan_from.fetch_min(seq, Ordering::AcqRel);
                    let acked = Cursors::new(&self.inner.config.url).acked;
                    if replica.cursor(&acked)? >= seq {
                        replica.set_cursor(&acked, seq - 1).await?;
                    }
                }
            }
            None => {
                let mut event = event;
                if event.origin.is_none() {
                    event.origin = Some(self.inner.client_id.clone());
                }
                lock(&self.inner.outbox).push(event, self.inner.config.outbox_capacity)?;
            }
        }
        self.inner.queued.fetch_add(1, Ordering::AcqRel);
        self.inner.wake.notify_one();
        Ok(())
    }
}

impl SyncClient for WebSocketSyncClient {
    /// Connects and waits for the server's `welcome`. With `reconnect(true)` a failed first
    /// attempt is returned as an error and retried in the background (until `disconnect`),
    /// except for a refused request (400, e.g. a bad room name; 404, no such endpoint; any
    /// 4xx but 408, 425 and 429), refused credentials (401/403) or a close code that
    /// reconnecting cannot fix (1002, 1003, 1007, 4000, 4001, and 4401 when the credentials
    /// expire; [`WsError::is_fatal`]), which stop the client
    /// with an `error` notification until the next `connect()`. Called while the client waits
    /// out a reconnect delay, it tries at once.
    fn connect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(self.connect_inner())
    }

    /// Closes the connection (code 1000) and stops reconnecting. Unsent events stay queued.
    /// Returns once the connection is closed, also when another `disconnect` runs at the same
    /// time. A `connect` called meanwhile starts a new connection after this one closed.
    fn disconnect(&self) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(self.disconnect_inner())
    }

    /// Queues `event` to go out (now, or on the next connect). Returns once queued; an event
    /// that breaks the event rules ([`Event::validate`]) is refused with
    /// [`SyncError::InvalidEvent`] and neither stored nor queued.
    fn send(&self, event: Event) -> BoxFuture<'_, Result<(), SyncError>> {
        Box::pin(self.send_inner(event))
    }

    fn notifier(&self) -> &Notifier {
        &self.inner.notifier
    }

    fn attach(&self, replica: Replica) {
        *lock(&self.inner.replica) = Some(replica);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(control) = self
            .control
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            control.task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where to connect.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
    /// `wss://`.
    tls: bool,
    /// The upgrade's `Host` header (the URL's authority).
    authority: String,
    /// The upgrade's request target (path and query; `/` when empty).
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, WsError> {
        let bad = |reason: &str| WsError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("the scheme must be ws:// or wss://")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let authority = uri.authority().ok_or_else(|| bad("no host"))?.to_string();
        let path = match uri
            .path_and_query()
            .map_or("", http::uri::PathAndQuery::as_str)
        {
            "" => "/".to_owned(),
            path => path.to_owned(),
        };
        Ok(Self {
            host,
            port: uri.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            tls,
            authority,
            path,
        })
    }
}

/// The standalone outbox: events sent while no replica is attached, kept until acknowledged.
#[derive(Debug, Default)]
struct Outbox {
    /// (local sequence number, event), in send order.
    items: VecDeque<(u64, Event)>,
    next: u64,
}

impl Outbox {
    fn push(&mut self, event: Event, capacity: usize) -> Result<(), WsError> {
        if self.items.len() >= capacity {
            return Err(WsError::OutboxFull { capacity });
        }
        self.next += 1;
        self.items.push_back((self.next, event));
        Ok(())
    }

    fn pending(&self, after: u64, limit: usize) -> Vec<Stored> {
        self.items
            .iter()
            .filter(|(seq, _)| *seq > after)
            .take(limit)
            .map(|(seq, event)| Stored {
                seq: *seq,
                event: event.clone(),
            })
            .collect()
    }

    /// Whether `event` (same revision and content) waits here.
    fn holds(&self, event: &Event) -> bool {
        self.items
            .iter()
            .any(|(_, e)| e.id == event.id && e.version == event.version && e.same_content(event))
    }

    fn acked(&mut self, upto: u64) {
        while self.items.front().is_some_and(|(seq, _)| *seq <= upto) {
            self.items.pop_front();
        }
    }
}

/// Its TCP stream watched (see [`activity`]).
type Socket = WebSocketStream<ClientStream>;

/// When `socket`'s TCP stream last moved bytes, under any TLS: its writes are bounded by "no
/// byte taken for `heartbeat_timeout`", and any byte read answers a ping (see `progress`).
fn activity(socket: &Socket) -> Activity {
    match socket.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => tcp.activity(),
        tokio_tungstenite::MaybeTlsStream::Rustls(tls) => tls.get_ref().0.activity(),
        // Not built (only the rustls variant is enabled; the enum is non-exhaustive). Never
        // stamped: a write is bounded as a whole, as before.
        _ => Activity::default(),
    }
}

/// How a session ended.
struct SessionEnd {
    was_connected: bool,
    /// Connected for at least `reconnect_max`: the backoff starts again from `min`.
    stayed_up: bool,
    error: Option<WsError>,
    stopped: bool,
}

/// Returns once the sender of `end` is gone (its manager's task ended).
async fn wait_end(mut end: watch::Receiver<()>) {
    while end.changed().await.is_ok() {}
}

/// Reconnects until stopped (or until a fatal error / `reconnect(false)`). Starts once the
/// manager before it (`previous`) has ended; `_end` goes when this one ends.
async fn manage(
    inner: Arc<Inner>,
    mut stop: watch::Receiver<bool>,
    generation: u64,
    previous: Option<watch::Receiver<()>>,
    _end: watch::Sender<()>,
) {
    if let Some(previous) = previous {
        wait_end(previous).await;
    }
    let config = &inner.config;
    let mut attempt: u32 = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        if attempt > 0 {
            inner.notifier.emit(Notification::Reconnecting { attempt });
            let delay = backoff(config.reconnect_min, config.reconnect_max, attempt);
            debug_log!(config.debug, target: LOG_TARGET, ?delay, attempt, "reconnecting");
            tokio::select! {
                () = sleep(delay) => {}
                () = inner.retry_now.notified() => {}
                _ = stop.changed() => break,
            }
        }
        let end = session(&inner, &mut stop, generation).await;
        inner.state.send_replace((generation, Link::Down));
        if end.was_connected {
            inner.notifier.emit(Notification::Disconnected);
        }
        let fatal = end.error.as_ref().is_some_and(WsError::is_fatal);
        let resync = matches!(end.error, Some(WsError::RoomReset { .. }));
        if let Some(error) = end.error {
            debug_log!(config.debug, target: LOG_TARGET, %error, "session ended");
            // Notified before a waiting `connect` returns the error.
            inner.notifier.emit(Notification::Status(Status::Error));
            inner
                .notifier
                .emit(Notification::Error(Arc::new(error.clone().into())));
            // A reset found at `welcome` is part of joining: `connect` waits for the resync.
            if !end.was_connected && !resync {
                for waiter in take_waiters(&inner, generation) {
                    let _ = waiter.send(Err(error.clone()));
                }
                // A `connect` during this attempt has its answer: no skipping the next delay.
                let _ = inner.retry_now.notified().now_or_never();
            }
        }
        if end.stopped || *stop.borrow() {
            break;
        }
        if resync {
            // Part of joining the reset room, not a lost connection: at once, also without
            // `reconnect`.
            attempt = 0;
            continue;
        }
        if fatal || !config.reconnect {
            if retire(&inner, generation, false) {
                return;
            }
            // Someone called `connect` after this attempt was answered: one more, now.
            attempt = 0;
            continue;
        }
        // A connection that drops soon after `welcome` (a server failing on every catch-up,
        // a slow consumer closed again and again) keeps counting, so a flapping server is not
        // hit at the shortest delay forever.
        attempt = if end.stayed_up { 1 } else { attempt + 1 };
    }
    retire(&inner, generation, true);
}

/// Ends manager `generation` unless (`stopped` false) a `connect` is waiting: then it must
/// try again (`false`). Removes its own `Control`, so the next `connect` starts a new manager.
fn retire(inner: &Inner, generation: u64, stopped: bool) -> bool {
    let mut control = lock(&inner.control);
    let mine = control.as_ref().is_some_and(|c| c.generation == generation);
    let mut waiters = lock(&inner.waiters);
    // (A `connect` that saw the session come up returned without its answer.)
    waiters.retain(|(_, w)| !w.is_closed());
    if mine && !stopped && waiters.iter().any(|(g, _)| *g == generation) {
        return false;
    }
    if mine {
        *control = None;
    }
    // Whoever still waits for a connection from this task will not get one. (Waiters of a
    // newer manager are its own.)
    waiters.retain(|(g, _)| *g != generation);
    true
}

/// The waiters of manager `generation`, removed.
fn take_waiters(inner: &Inner, generation: u64) -> Vec<oneshot::Sender<Result<(), WsError>>> {
    let mut waiters = lock(&inner.waiters);
    let (mine, others) = std::mem::take(&mut *waiters)
        .into_iter()
        .partition(|(g, _)| *g == generation);
    *waiters = others;
    mine.into_iter().map(|(_, w)| w).collect()
}

fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    ksync_core::backoff_delay(min, max, attempt, rand::random::<f64>())
}

/// One connection from TCP connect to close.
async fn session(
    inner: &Arc<Inner>,
    stop: &mut watch::Receiver<bool>,
    generation: u64,
) -> SessionEnd {
    let config = &inner.config;
    let replica = lock(&inner.replica).clone();
    let cursors = Cursors::new(&config.url);
    let mut session = match Session::start(inner, replica, cursors) {
        Ok(s) => s,
        Err(error) => {
            return SessionEnd {
                was_connected: false,
                stayed_up: false,
                error: Some(error),
                stopped: false,
            };
        }
    };
    let connect = timeout(config.connect_timeout, session.open());
    let result = tokio::select! {
        r = connect => match r {
            Ok(r) => r,
            Err(_) => Err(WsError::ConnectTimeout(config.connect_timeout)),
        },
        _ = stop.changed() => return SessionEnd { was_connected: false, stayed_up: false, error: None, stopped: true },
    };
    if let Err(error) = result {
        return SessionEnd {
            was_connected: false,
            stayed_up: false,
            error: Some(error),
            stopped: false,
        };
    }
    if *stop.borrow() {
        // Stopped as the connection came up: never announced.
        session.close(close::NORMAL, "client disconnecting").await;
        return SessionEnd {
            was_connected: false,
            stayed_up: false,
            error: None,
            stopped: true,
        };
    }
    inner.state.send_replace((generation, Link::Announcing));
    // Notified before `connect` returns, as a caller of `connect` would expect.
    inner.notifier.emit(Notification::Connected);
    session.set_status(Status::Connected);
    inner.state.send_replace((generation, Link::Up));
    for waiter in take_waiters(inner, generation) {
        let _ = waiter.send(Ok(()));
    }
    // Answered: a `connect` during this attempt must not skip a later delay.
    let _ = inner.retry_now.notified().now_or_never();
    let up_since = Instant::now();
    let result = session.run(stop).await;
    // The room cursor write still owed (its events are stored), however the session ended.
    // Best effort: lost, the next session only gets those events again.
    if let Err(error) = session.write_room_cursor().await {
        debug_log!(config.debug, target: LOG_TARGET, %error, "storing the room cursor at the end of the session");
    }
    let stayed_up = up_since.elapsed() >= config.reconnect_max;
    match result {
        Ok(stopped) => {
            session.close(close::NORMAL, "client disconnecting").await;
            SessionEnd {
                was_connected: true,
                stayed_up,
                error: None,
                stopped,
            }
        }
        Err(error @ WsError::RoomReset { .. }) => {
            session
                .close(close::NORMAL, "room reset: syncing again")
                .await;
            SessionEnd {
                was_connected: true,
                stayed_up,
                error: Some(error),
                stopped: false,
            }
        }
        Err(error) => SessionEnd {
            was_connected: true,
            stayed_up,
            error: Some(error),
            stopped: false,
        },
    }
}

/// Cursor names in the replica's metadata.
struct Cursors {
    /// The last room sequence number received.
    room: String,
    /// The last local sequence number acknowledged by the server (contiguous prefix).
    acked: String,
    /// The metadata key of the room log both cursors belong to (`welcome.logId`).
    log: String,
}

impl Cursors {
    fn new(url: &str) -> Self {
        Self {
            room: format!("ws:{url}/room"),
            acked: format!("ws:{url}/acked"),
            log: format!("ws:{url}/log"),
        }
    }
}

/// One publish waiting for its ack.
struct Flight {
    reference: Option<u64>,
    /// Highest local sequence number covered (including events dropped by middleware).
    upto: u64,
    sent_at: Instant,
    /// The events sent, for matching results.
    ids: Vec<String>,
    /// The events sent as the application made them, for the `sync` of the ack (and, without
    /// a replica, a conflict's `ours`): kept only when something listened for `sync` (or
    /// `conflict`) as they went out (in-flight events are otherwise not held twice).
    synced: Option<Vec<Event>>,
    done: bool,
}

/// An event on its way out.
struct Outgoing {
    /// The form it is published in (after the outgoing middleware).
    wire: Event,
    /// The form the application made, when a `sync` will need it and middleware may have
    /// changed it (`None`: `wire` is that form). A received batch's `sync` carries events
    /// after the incoming middleware, so an ack's carries them before the outgoing one.
    local: Option<Event>,
}

impl Outgoing {
    fn into_local(self) -> Event {
        self.local.unwrap_or(self.wire)
    }
}

struct Session {
    inner: Arc<Inner>,
    replica: Option<Replica>,
    cursors: Cursors,
    socket: Option<Socket>,
    /// Last room sequence number received (events or our own acks).
    room_cursor: u64,
    /// The room cursor as stored in the replica (read at the start, then each value written):
    /// `room_cursor` ahead of it is a write still owed (`write_room_cursor`).
    room_stored: u64,
    /// When this session last wrote the room cursor (`None`: not yet).
    room_written_at: Option<Instant>,
    /// Last local sequence number handed to the socket.
    sent_upto: u64,
    /// Last local sequence number acknowledged (contiguously).
    acked_upto: u64,
    /// The room log the cursors belong to (`welcome.logId`; `None` before the first).
    known_log: Option<String>,
    /// Publishes awaiting their ack. Bounded: no new publish is sent while `in_flight_events`
    /// is at `max_in_flight` (10 000); the rest waits in the replica / outbox.
    in_flight: VecDeque<Flight>,
    in_flight_events: usize,
    next_ref: u64,
    server_version: u64,
    /// This session's traffic (events and bytes both ways, acknowledged publishes' round
    /// trips), counted from its start; `metrics` reports their growth.
    counters: MeterTotals,
    status: Option<Status>,
    /// Whether the server agreed to deflate batches.
    compression: bool,
    /// The largest message the server accepts (from `welcome`).
    server_max_message: usize,
    /// The server refused a publish of this connection as a whole (an `error` with its `ref`,
    /// e.g. `forbidden`): nothing more is published on it. The refused events stay
    /// unacknowledged and go again on the next connection.
    publish_refused: bool,
    /// Marks the `set_auth` calls seen when this session started (see `publish_refused`).
    auth_changes: watch::Receiver<u64>,
}

impl Session {
    fn start(
        inner: &Arc<Inner>,
        replica: Option<Replica>,
        cursors: Cursors,
    ) -> Result<Self, WsError> {
        let storage_error = |e: SyncError| WsError::Protocol(format!("reading cursors: {e}"));
        let (room_cursor, acked_upto, known_log) = match &replica {
            Some(r) => (
                r.cursor(&cursors.room).map_err(storage_error)?,
                r.cursor(&cursors.acked).map_err(storage_error)?,
                r.storage()
                    .meta(&cursors.log)
                    .map_err(|e| storage_error(e.into()))?,
            ),
            // Standalone: acknowledged events leave the outbox, so everything in it is unacked.
            None => (
                (*lock(&inner.standalone_cursor)).unwrap_or(0),
                0,
                lock(&inner.standalone_log).clone(),
            ),
        };
        Ok(Self {
            inner: Arc::clone(inner),
            replica,
            cursors,
            socket: None,
            room_cursor,
            room_stored: room_cursor,
            room_written_at: None,
            sent_upto: acked_upto,
            acked_upto,
            known_log,
            in_flight: VecDeque::new(),
            in_flight_events: 0,
            next_ref: 1,
            server_version: 0,
            counters: MeterTotals::default(),
            status: None,
            compression: false,
            server_max_message: 1 << 20,
            publish_refused: false,
            // Before `open` reads the credentials: a change after this point is a change.
            auth_changes: inner.auth_changes.subscribe(),
        })
    }

    fn debug(&self) -> bool {
        self.inner.config.debug
    }

    /// TCP connect, upgrade, `hello`, `welcome`.
    async fn open(&mut self) -> Result<(), WsError> {
        let config = &self.inner.config;
        let target = &self.inner.target;
        let addr = format!("{}:{}", target.host, target.port);
        debug_log!(config.debug, target: LOG_TARGET, %addr, url = %config.url, "connecting");
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| WsError::Connect {
                addr: addr.clone(),
                source: Arc::new(e),
            })?;
        // Small frames must not wait for Nagle's algorithm.
        tcp.set_nodelay(true).map_err(|e| WsError::Connect {
            addr,
            source: Arc::new(e),
        })?;
        // Watched below TLS, where bytes really move (see `progress::Watched`).
        let tcp = Watched::new(tcp);
        let stream = match &self.inner.tls {
            Some(connector) => crate::tls::handshake(connector, &target.host, tcp).await?,
            None => tokio_tungstenite::MaybeTlsStream::Plain(tcp),
        };
        let auth = lock(&self.inner.auth).clone();
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(config.max_message_size))
            .max_frame_size(Some(config.max_message_size))
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0);
        let mut socket = upgrade(stream, target, auth.as_ref(), ws_config).await?;
        let (since, state) = match (&self.replica, config.strategy) {
            (_, Strategy::StateBased { .. }) if self.room_cursor == 0 => (None, true),
            (Some(_), _) => (Some(self.room_cursor), false),
            (None, _) => (
                lock(&self.inner.standalone_cursor).map(|_| self.room_cursor),
                false,
            ),
        };
        let hello = ClientMessage::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            since,
            state,
            compression: config.compression,
        });
        let text = serde_json::to_string(&hello).map_err(|e| WsError::Protocol(e.to_string()))?;
        socket
            .send(Message::text(text))
            .await
            .map_err(|e| WsError::WebSocket(e.to_string()))?;
        loop {
            let message = match socket.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(WsError::WebSocket(e.to_string())),
                None => return Err(WsError::ConnectionLost),
            };
            match message {
                Message::Text(t) => {
                    // A server of another protocol version: nothing of its welcome is taken
                    // (its fields may mean other things, or not decode as ours: the version
                    // is read first), and reconnecting would meet the same server, so the
                    // client stops (a fatal error), as after the relay's 4001 for a client
                    // of another version. A welcome without an integer `protocol` announces
                    // no version: a broken welcome (below), retried.
                    if let Some(theirs) = protocol::welcome_protocol(t.as_bytes())
                        && theirs != u64::from(PROTOCOL_VERSION)
                    {
                        let frame = CloseFrame {
                            code: protocol::close::UNSUPPORTED_PROTOCOL.into(),
                            reason: "unsupported protocol version".into(),
                        };
                        let _ = socket.close(Some(frame)).await;
                        return Err(WsError::UnsupportedProtocol { server: theirs });
                    }
                    match protocol::decode_server_message(t.as_bytes()) {
                        Ok(ServerMessage::Welcome(w)) => {
                            debug_log!(config.debug, target: LOG_TARGET, room = %w.room, server_version = w.server_version, "welcome");
                            // Every publish is cut to this size, and an event larger than
                            // it is reported and skipped: a server announcing a limit no relay
                            // may have (0, say) would have every queued event skipped. Refused
                            // like any broken answer: nothing is settled, and the next attempt
                            // (after the backoff) tries again.
                            if !protocol::MAX_MESSAGE_SIZE_RANGE.contains(&w.max_message_size) {
                                let _ = socket.close(None).await;
                                return Err(WsError::Protocol(format!(
                                    "welcome announces maxMessageSize {}, outside {}..={}",
                                    w.max_message_size,
                                    protocol::MAX_MESSAGE_SIZE_RANGE.start(),
                                    protocol::MAX_MESSAGE_SIZE_RANGE.end()
                                )));
                            }
                            self.server_version = w.server_version;
                            self.compression = w.compression;
                            self.server_max_message = w.max_message_size;
                            if let Some(log_id) = &w.log_id
                                && let Some(reset) = self.check_log(log_id).await?
                            {
                                let _ = socket.close(None).await;
                                return Err(reset);
                            }
                            if since.is_none() && !state {
                                // A new standalone client starts with the live stream.
                                self.room_cursor = w.server_version;
                                *lock(&self.inner.standalone_cursor) = Some(w.server_version);
                            }
                            break;
                        }
                        Ok(ServerMessage::Error(e)) => {
                            return Err(WsError::Server {
                                code: e.code,
                                message: e.message,
                            });
                        }
                        Ok(_) => return Err(WsError::Protocol("expected welcome".into())),
                        Err(e) => return Err(WsError::Protocol(e.to_string())),
                    }
                }
                Message::Close(frame) => return Err(closed(frame)),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                Message::Binary(_) => {
                    return Err(WsError::Protocol("binary frame before welcome".into()));
                }
            }
        }
        self.socket = Some(socket);
        Ok(())
    }

    /// The connected loop. `Ok(true)`: stopped by `disconnect`.
    async fn run(&mut self, stop: &mut watch::Receiver<bool>) -> Result<bool, WsError> {
        let Some(mut socket) = self.socket.take() else {
            return Err(WsError::ConnectionLost);
        };
        let result = self.run_with(&mut socket, stop).await;
        self.socket = Some(socket);
        result
    }

    async fn run_with(
        &mut self,
        socket: &mut Socket,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool, WsError> {
        let inner = Arc::clone(&self.inner);
        let config = &inner.config;
        let now = Instant::now();
        let mut heartbeat = interval_at(now + config.heartbeat, config.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ping_deadline: Option<Instant> = None;
        let activity = activity(socket);
        let mut metrics = interval_at(now + config.metrics_interval, config.metrics_interval);
        metrics.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut metrics_since = now;
        // From zero, as `counters` are: the first period includes the handshake (hello, welcome).
        let mut meter = MetricsMeter::default();
        let flush_every = match config.strategy {
            Strategy::EventLevel { .. } => None,
            Strategy::Batch { batch_interval, .. } => Some(batch_interval),
            Strategy::StateBased { snapshot_interval } => Some(snapshot_interval),
        };
        let mut flush = flush_every.map(|p| {
            let mut i = interval_at(now + p, p);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        // Whatever waited while we were offline goes out now.
        self.pump(socket, true).await?;
        self.update_status();
        let mut auth_changes = self.auth_changes.clone();
        loop {
            let cursor_due = self.room_cursor_due();
            tokio::select! {
                _ = stop.changed() => return Ok(true),
                // Publishes were refused on this connection and the credentials changed: a
                // new connection publishes with them.
                Ok(()) = auth_changes.changed(), if self.publish_refused => {
                    debug_log!(config.debug, target: LOG_TARGET, "credentials changed after a refused publish: reconnecting");
                    return Ok(false);
                }
                message = socket.next() => {
                    ping_deadline = None;
                    self.received(socket, message).await?;
                }
                () = inner.wake.notified() => {
                    self.pump(socket, false).await?;
                    self.update_status();
                }
                _ = heartbeat.tick() => {
                    if ping_deadline.is_none() {
                        self.write(socket, Message::Ping(bytes::Bytes::new())).await?;
                        ping_deadline = Some(Instant::now() + config.heartbeat_timeout);
                    }
                }
                () = deadline(ping_deadline) => {
                    // After a stall of this loop (slow middleware or storage) the answer may
                    // already wait in the socket while the deadline has passed too, and
                    // `select!` picks among ready branches at random: a frame there now
                    // counts. (Not `biased`: a server that keeps sending would starve the
                    // sends.) Cancel-safe: a message is either returned or stays buffered.
                    let Some(message) = socket.next().now_or_never() else {
                        // Bytes of a message still coming (a large one over a slow link, with
                        // the pong behind it) count as an answer while they keep coming: the
                        // wait ends `heartbeat_timeout` after the last byte read, so a server
                        // that goes silent is still given up within `heartbeat +
                        // heartbeat_timeout`. (Only a byte read after the ping was sent can
                        // put the end past the deadline.)
                        let alive_until = activity.last_read() + config.heartbeat_timeout;
                        if alive_until > Instant::now() {
                            ping_deadline = Some(alive_until);
                            continue;
                        }
                        return Err(WsError::HeartbeatTimeout(config.heartbeat_timeout));
                    };
                    ping_deadline = None;
                    self.received(socket, message).await?;
                }
                _ = metrics.tick() => {
                    let now = Instant::now();
                    let report = meter.report(self.counters, now.duration_since(metrics_since));
                    metrics_since = now;
                    inner.notifier.emit(Notification::Metrics(report));
                }
                () = tick(&mut flush) => {
                    self.pump(socket, true).await?;
                    self.update_status();
                }
                () = deadline(cursor_due) => self.write_room_cursor().await?,
            }
        }
    }

    /// Handles what the socket gave (a frame, an error or its end).
    async fn received(
        &mut self,
        socket: &mut Socket,
        message: Option<Result<Message, tungstenite::Error>>,
    ) -> Result<(), WsError> {
        let message = match message {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(WsError::WebSocket(e.to_string())),
            None => return Err(WsError::ConnectionLost),
        };
        self.on_message(socket, message).await?;
        self.update_status();
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: &str) {
        if let Some(mut socket) = self.socket.take() {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            };
            let _ = timeout(
                self.inner.config.heartbeat_timeout,
                socket.close(Some(frame)),
            )
            .await;
        }
    }

    fn set_status(&mut self, status: Status) {
        if self.status != Some(status) {
            self.status = Some(status);
            self.inner.notifier.emit(Notification::Status(status));
        }
    }

    fn update_status(&mut self) {
        // Refused publishes wait for another connection, not for this one.
        let sending = !self.in_flight.is_empty() && !self.publish_refused;
        let busy = sending || self.room_cursor < self.server_version;
        self.set_status(if busy { Status::Syncing } else { Status::Idle });
    }

    /// Sends `message`, unless the socket takes no byte of it for `heartbeat_timeout`: a
    /// large publish over a slow link takes as long as the link needs (bounded as a whole, it
    /// was cut off and sent again on every connection, for good).
    async fn write(&mut self, socket: &mut Socket, message: Message) -> Result<(), WsError> {
        self.counters.bytes += message.len() as u64;
        let limit = self.inner.config.heartbeat_timeout;
        let activity = activity(socket);
        match unless_stalled(limit, || activity.last_write(), socket.send(message)).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(WsError::WebSocket(e.to_string())),
            None => Err(WsError::HeartbeatTimeout(limit)),
        }
    }

    /// Events to send after `after`, and how far the scan got (events that only arrived
    /// are skipped once, not on every pump).
    fn pending(&self, after: u64, limit: usize) -> Result<(Vec<Stored>, u64), WsError> {
        match &self.replica {
            Some(r) => r
                .pending_page(after, limit)
                .map_err(|e| WsError::Protocol(format!("reading pending events: {e}"))),
            None => {
                let events = lock(&self.inner.outbox).pending(after, limit);
                let scanned = events.last().map_or(after, |s| s.seq);
                Ok((events, scanned))
            }
        }
    }

    /// Sends local events after `sent_upto`, as the strategy says. `force`: regardless of how
    /// many are waiting (connect, timer).
    async fn pump(&mut self, socket: &mut Socket, force: bool) -> Result<(), WsError> {
        if self.publish_refused {
            // Sending more would only be refused again (see the `error` arm of `on_message`).
            return Ok(());
        }
        let config = &self.inner.config;
        let (limit, coalesce) = match config.strategy {
            Strategy::EventLevel { batch_size } => (batch_size, false),
            Strategy::Batch { batch_size, .. } => {
                if !force && self.inner.queued.load(Ordering::Acquire) < batch_size {
                    return Ok(());
                }
                (batch_size, false)
            }
            Strategy::StateBased { .. } => {
                if !force {
                    return Ok(());
                }
                (STATE_CHUNK, true)
            }
        };
        self.inner.queued.store(0, Ordering::Release);
        let max_in_flight = config.max_in_flight;
        let debug = config.debug;
        let wants_sync = self.inner.notifier.wants(NotificationKind::Sync);
        // Without a replica, a conflict's `ours` is the event as sent: nothing else holds it.
        // (So a `conflict` listener keeps a copy of every event in flight, as a `sync` one does.)
        let wants_conflict =
            self.replica.is_none() && self.inner.notifier.wants(NotificationKind::Conflict);
        let keep_sent = wants_sync || wants_conflict;
        // The application's form differs from the wire's only through middleware.
        let keep_local = keep_sent && !self.inner.pipeline.is_empty();
        let rescan = self.inner.rescan_from.swap(u64::MAX, Ordering::AcqRel);
        if rescan <= self.sent_upto {
            // A forwarded event lies behind the scan: look again from there (what was sent
            // since goes again; the server drops exact duplicates).
            self.sent_upto = rescan.saturating_sub(1);
            self.hold_back(rescan);
        }
        while self.in_flight_events < max_in_flight {
            let page = if coalesce { STATE_SCAN } else { limit };
            let (pending, scanned) = self.pending(self.sent_upto, page)?;
            let Some(last) = pending.last() else {
                self.sent_upto = self.sent_upto.max(scanned);
                break;
            };
            let previous = self.sent_upto;
            let upto = last.seq;
            self.sent_upto = upto.max(scanned);
            let mut events = Vec::with_capacity(pending.len());
            for stored in pending {
                let local = keep_local.then(|| stored.event.clone());
                match self.outgoing(stored.event) {
                    Ok(Some(wire)) => events.push(Outgoing { wire, local }),
                    Ok(None) => {}
                    Err(e) => self.inner.notifier.emit(Notification::Error(Arc::new(e))),
                }
            }
            if coalesce {
                events = latest_per_id(events);
            }
            if events.is_empty() {
                self.in_flight.push_back(Flight {
                    reference: None,
                    upto,
                    sent_at: Instant::now(),
                    ids: Vec::new(),
                    synced: None,
                    done: true,
                });
                continue;
            }
            let mut pieces: VecDeque<Vec<Outgoing>> = VecDeque::new();
            let mut rest = events.into_iter().peekable();
            while rest.peek().is_some() {
                pieces.push_back(rest.by_ref().take(limit).collect());
            }
            while let Some(piece) = pieces.pop_front() {
                // Only the last piece covers the whole page.
                let flight_upto = if pieces.is_empty() { upto } else { previous };
                let reference = self.next_ref;
                let wire: Vec<&Event> = piece.iter().map(|o| &o.wire).collect();
                let json = serde_json::to_vec(&PublishOut {
                    kind: "publish",
                    reference,
                    events: &wire,
                })
                .map_err(|e| WsError::Protocol(e.to_string()))?;
                if json.len() > self.server_max_message {
                    if piece.len() > 1 {
                        let mut first = piece;
                        let second = first.split_off(first.len() / 2);
                        pieces.push_front(second);
                        pieces.push_front(first);
                        continue;
                    }
                    // One event larger than the server accepts: sending it would only get the
                    // connection closed (1009) again and again. Report it and skip it.
                    let id = piece.first().map(|o| o.wire.id.clone()).unwrap_or_default();
                    let message = format!(
                        "{} bytes encoded; the server accepts at most {}",
                        json.len(),
                        self.server_max_message
                    );
                    self.inner.notifier.emit(Notification::Error(Arc::new(
                        WsError::InvalidEvent { id, message }.into(),
                    )));
                    self.in_flight.push_back(Flight {
                        reference: None,
                        upto: flight_upto,
                        sent_at: Instant::now(),
                        ids: Vec::new(),
                        synced: None,
                        done: true,
                    });
                    continue;
                }
                self.next_ref += 1;
                debug_log!(debug, target: LOG_TARGET, reference, events = piece.len(), "publish");
                let message = if self.compression && json.len() >= protocol::DEFLATE_MIN_BYTES {
                    Message::binary(protocol::deflate(&json))
                } else {
                    Message::text(String::from_utf8_lossy(&json).into_owned())
                };
                self.counters.events += piece.len() as u64;
                self.in_flight_events += piece.len();
                self.in_flight.push_back(Flight {
                    reference: Some(reference),
                    upto: flight_upto,
                    sent_at: Instant::now(),
                    ids: piece.iter().map(|o| o.wire.id.clone()).collect(),
                    synced: keep_sent
                        .then(|| piece.into_iter().map(Outgoing::into_local).collect()),
                    done: false,
                });
                self.write(socket, message).await?;
            }
        }
        self.settle().await
    }

    /// The form `event` is published in; `None`: it stays home. The filter sees it as the
    /// application made it, before the outgoing chain: an encrypting middleware would hide
    /// `data.private` from `public-only`, and private events would go out.
    fn outgoing(&self, event: Event) -> Result<Option<Event>, SyncError> {
        let filter = self.inner.config.filter.as_ref();
        Ok(self
            .inner
            .pipeline
            .run_filtered(Direction::Outgoing, filter, event)?)
    }

    /// The form a received `event` is stored in; `None`: it is not taken in. The filter sees
    /// it after the incoming chain (decrypted). One that breaks the rules for received events
    /// ([`Event::validate_received`]: the relay stored it, maybe under older rules) in that
    /// form is refused with [`WsError::Protocol`]: the caller
    /// reports it and moves on, as no storage may hold it (taken in, it would be stored as it
    /// is, or refused by the storage again at every reconnect, stalling the room cursor).
    fn incoming(&self, event: Event) -> Result<Option<Event>, SyncError> {
        let filter = self.inner.config.filter.as_ref();
        let shaped = self
            .inner
            .pipeline
            .run_filtered(Direction::Incoming, filter, event)?;
        if let Some(event) = &shaped {
            event.check_received().map_err(WsError::Protocol)?;
        }
        Ok(shaped)
    }

    /// Keeps the acknowledged cursor below `rescan`, a forwarded event behind the scan:
    /// publishes already in flight did not carry it, so their acks must not move past it.
    fn hold_back(&mut self, rescan: u64) {
        let below = rescan.saturating_sub(1);
        self.acked_upto = self.acked_upto.min(below);
        for flight in &mut self.in_flight {
            flight.upto = flight.upto.min(below);
        }
    }

    /// Advances the acknowledged cursor over the contiguous prefix of settled publishes.
    async fn settle(&mut self) -> Result<(), WsError> {
        let inner = Arc::clone(&self.inner);
        let _writes = inner.acked_writes.lock().await;
        // A forward `send` recorded since the last pump moved the stored cursor back: this
        // session's must not go past it either.
        let rescan = inner.rescan_from.load(Ordering::Acquire);
        let before = self.acked_upto;
        if rescan != u64::MAX {
            self.hold_back(rescan);
        }
        while self.in_flight.front().is_some_and(|f| f.done) {
            if let Some(flight) = self.in_flight.pop_front() {
                self.acked_upto = self.acked_upto.max(flight.upto);
            }
        }
        if self.acked_upto != before {
            match &self.replica {
                Some(r) => store_acked(r, &self.cursors.acked, self.acked_upto).await?,
                None => lock(&self.inner.outbox).acked(self.acked_upto),
            }
        }
        Ok(())
    }

    /// `cursor_ahead`: the room no longer holds what our cursors point at (reset, or another
    /// log at this address). Continuing from its head would skip what it holds now and never
    /// give it our events again, so both cursors go back to the start; the session ends with
    /// the returned error and the next one asks for the whole room and publishes our events
    /// again (the room drops exact duplicates).
    async fn room_reset(&mut self) -> Result<WsError, WsError> {
        let reset = WsError::RoomReset {
            cursor: self.room_cursor,
            server_version: self.server_version,
        };
        self.room_cursor = 0;
        // At once, not held back: the new log's id is stored next, and the old log's cursor
        // kept with it would skip the new log's first events.
        self.write_room_cursor().await?;
        self.acked_upto = 0;
        let inner = Arc::clone(&self.inner);
        // Not between a `send`'s reading and lowering of the cursor, which would leave it
        // above 0.
        let _writes = inner.acked_writes.lock().await;
        if let Some(r) = &self.replica {
            store_acked(r, &self.cursors.acked, 0).await?;
        }
        Ok(reset)
    }

    /// Compares the room's log (`welcome.logId`) with the one our cursors belong to. Another
    /// log (the room was reset, or another server answers here) is a reset as for
    /// `cursor_ahead`, even when it has grown past our cursor: `Some(RoomReset)` ends the
    /// session and the next one syncs the room from the start. The new log is recorded after
    /// the cursors went back, so a crash in between only costs another resync.
    async fn check_log(&mut self, log_id: &str) -> Result<Option<WsError>, WsError> {
        if self.known_log.as_deref() == Some(log_id) {
            return Ok(None);
        }
        // A first log, or cursors still at the start: nothing to reset.
        let reset = if self.known_log.is_some() && (self.room_cursor > 0 || self.acked_upto > 0) {
            debug_log!(
                self.debug(),
                target: LOG_TARGET,
                log_id,
                "the room's log changed: syncing again"
            );
            Some(self.room_reset().await?)
        } else {
            None
        };
        self.known_log = Some(log_id.to_owned());
        match &self.replica {
            Some(r) => r
                .storage()
                .set_meta(&self.cursors.log, log_id)
                .await
                .map_err(|e| WsError::Protocol(format!("storing the room log's id: {e}")))?,
            None => *lock(&self.inner.standalone_log) = Some(log_id.to_owned()),
        }
        Ok(reset)
    }

    /// Records `room_cursor`, which only ever covers events already taken in. In a replica
    /// each write is a durable metadata record (a file log appends and syncs one, and drops
    /// superseded ones only when reopened), so it is written at most once per
    /// `CURSOR_WRITE_INTERVAL`; a newer value waits for the select loop's timer or the end of
    /// the session. A stored cursor that lags only means the next session gets some events
    /// again, which `Replica::ingest` drops as duplicates without notifying them.
    async fn save_room_cursor(&mut self) -> Result<(), WsError> {
        if self.replica.is_none() {
            *lock(&self.inner.standalone_cursor) = Some(self.room_cursor);
            return Ok(());
        }
        if self
            .room_written_at
            .is_some_and(|at| at.elapsed() < CURSOR_WRITE_INTERVAL)
        {
            return Ok(());
        }
        self.write_room_cursor().await
    }

    /// When the owed room cursor write is due (`None`: nothing owed).
    fn room_cursor_due(&self) -> Option<Instant> {
        if self.replica.is_none() || self.room_cursor == self.room_stored {
            return None;
        }
        Some(
            self.room_written_at
                .map_or_else(Instant::now, |at| at + CURSOR_WRITE_INTERVAL),
        )
    }

    /// Writes the room cursor now, unless the replica already holds that value.
    async fn write_room_cursor(&mut self) -> Result<(), WsError> {
        let Some(r) = &self.replica else {
            return Ok(());
        };
        if self.room_cursor == self.room_stored {
            return Ok(());
        }
        r.set_cursor(&self.cursors.room, self.room_cursor)
            .await
            .map_err(|e| WsError::Protocol(format!("storing the room cursor: {e}")))?;
        self.room_stored = self.room_cursor;
        self.room_written_at = Some(Instant::now());
        Ok(())
    }

    async fn on_message(&mut self, socket: &mut Socket, message: Message) -> Result<(), WsError> {
        self.counters.bytes += message.len() as u64;
        let json = match message {
            Message::Text(t) => Vec::from(t.as_bytes()),
            Message::Binary(b) => {
                if !self.compression {
                    return Err(WsError::Protocol(
                        "binary frame without negotiated compression".into(),
                    ));
                }
                protocol::inflate(&b, self.inner.config.max_message_size)
                    .map_err(|e| WsError::Protocol(e.to_string()))?
            }
            Message::Close(frame) => return Err(closed(frame)),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        let message = match protocol::decode_server_message(&json) {
            Ok(m) => m,
            Err(e @ protocol::DecodeError::UnknownType(_)) => {
                // A newer server may send types we do not know: report, keep going.
                self.inner.notifier.emit(Notification::Error(Arc::new(
                    WsError::Protocol(e.to_string()).into(),
                )));
                return Ok(());
            }
            // A message of a known type that does not decode (an `events` batch with one
            // broken event, say) may hold events: skipping it, the next batch would move the
            // cursor past them. The session ends instead, and the next one (after the backoff
            // delay) reads from the cursor again.
            Err(e) => return Err(WsError::Protocol(e.to_string())),
        };
        match message {
            ServerMessage::Events(batch) => self.receive(batch.events).await?,
            ServerMessage::Snapshot(page) => {
                debug_log!(
                    self.debug(),
                    target: LOG_TARGET,
                    events = page.events.len(),
                    last = page.last,
                    "snapshot page"
                );
                let events = page
                    .events
                    .into_iter()
                    .map(|event| Stored { seq: 0, event })
                    .collect();
                self.deliver(events).await?;
                if page.last {
                    self.room_cursor = self.room_cursor.max(page.server_version);
                    self.save_room_cursor().await?;
                }
            }
            ServerMessage::Ack(ack) => {
                self.on_ack(ack).await?;
                self.pump(socket, false).await?;
            }
            ServerMessage::Error(e) => {
                debug_log!(self.debug(), target: LOG_TARGET, code = %e.code, message = %e.message, "server error");
                if e.code == protocol::code::CURSOR_AHEAD {
                    return Err(self.room_reset().await?);
                }
                let refused = e.reference.and_then(|reference| {
                    self.in_flight
                        .iter_mut()
                        .find(|f| f.reference == Some(reference) && !f.done)
                });
                let error = WsError::Server {
                    code: e.code,
                    message: e.message,
                };
                if let Some(flight) = refused {
                    // A publish refused as a whole: nothing of it was stored. It is not
                    // settled (the acknowledged cursor stops before it, and the events go
                    // again on the next connection), and an ack naming it later is a lie.
                    flight.reference = None;
                    if let WsError::Server { code, .. } = &error
                        && code == protocol::code::STORAGE
                    {
                        // The server's storage failed: the session ends, and the next one
                        // (after the backoff delay) sends the events again.
                        return Err(error);
                    }
                    // `forbidden` (credentials without the write right), or a refusal this
                    // client does not know: publishing again on this connection would be
                    // refused again. The rest waits for the next connection, which `set_auth`
                    // starts at once (after the backoff delay).
                    self.publish_refused = true;
                }
                self.inner
                    .notifier
                    .emit(Notification::Error(Arc::new(error.into())));
            }
            ServerMessage::Welcome(_) => {
                return Err(WsError::Protocol("unexpected second welcome".into()));
            }
            // This client checks liveness with WebSocket pings; it sends no `ping` messages,
            // and a `pong` it did not ask for changes nothing.
            ServerMessage::Pong(_) => {}
        }
        Ok(())
    }

    async fn on_ack(&mut self, ack: protocol::Ack) -> Result<(), WsError> {
        let Some(index) = self
            .in_flight
            .iter()
            .position(|f| f.reference == Some(ack.reference))
        else {
            return Err(WsError::Protocol(format!(
                "ack for unknown ref {}",
                ack.reference
            )));
        };
        // A server that answers fewer (or more) events than were sent, or places one past its
        // own last seq, is not believed: nothing of this publish counts as acknowledged, and
        // the reconnect sends it again (the room drops what it already holds as duplicates).
        let sent = self.in_flight[index].ids.len();
        if ack.results.len() != sent {
            return Err(WsError::Protocol(format!(
                "ack for ref {} has {} results for {sent} events",
                ack.reference,
                ack.results.len()
            )));
        }
        if let Some(seq) = ack.results.iter().find_map(|r| match r {
            PublishResult::Stored { seq } | PublishResult::Duplicate { seq }
                if *seq > ack.server_version =>
            {
                Some(*seq)
            }
            _ => None,
        }) {
            return Err(WsError::Protocol(format!(
                "ack for ref {} places an event at seq {seq}, past its serverVersion {}",
                ack.reference, ack.server_version
            )));
        }
        let ids = std::mem::take(&mut self.in_flight[index].ids);
        // The sent events in the application's form, in the order of `ids` and the results.
        let mut synced = self.in_flight[index].synced.take().map(Vec::into_iter);
        let mut on_server = Vec::new();
        let latency = self.in_flight[index].sent_at.elapsed();
        self.counters.add_round_trip(latency);
        self.in_flight_events = self.in_flight_events.saturating_sub(ids.len());
        let mut held = Vec::new();
        let mut failure = None;
        for (result, id) in ack.results.into_iter().zip(ids) {
            let local = synced.as_mut().and_then(Iterator::next);
            match result {
                PublishResult::Stored { seq } => {
                    self.room_cursor = self.room_cursor.max(seq);
                    on_server.extend(local);
                }
                PublishResult::Duplicate { .. } => on_server.extend(local),
                PublishResult::Conflict { held: Some(theirs) } => held.push((theirs, local)),
                // The ack had no room for the revision: it is in the room's log, at a seq
                // this client reads (or has read) from the stream, where a replica takes it
                // in and settles the conflict like any received event.
                PublishResult::Conflict { held: None } => match &self.replica {
                    Some(_) => {
                        debug_log!(self.inner.config.debug, target: LOG_TARGET, id = %id, "conflict; held revision comes from the stream")
                    }
                    None => self.inner.notifier.emit(Notification::Error(Arc::new(
                        SyncError::Rejected(format!(
                            "event {id:?} already exists on the server with other content"
                        )),
                    ))),
                },
                PublishResult::Invalid { message } => self.inner.notifier.emit(
                    Notification::Error(Arc::new(WsError::InvalidEvent { id, message }.into())),
                ),
                PublishResult::Failed { message } => failure = Some(message),
            }
        }
        if let Some(message) = failure {
            // What this ack did place in the room is there; the rest is not stored:
            // reconnecting resends the publish from the acknowledged cursor.
            self.notify_synced(on_server);
            return Err(WsError::StoreFailed(message));
        }
        self.in_flight[index].done = true;
        if !held.is_empty() {
            // The room keeps other content under the same (id, version): take it in, so the
            // replica settles the conflict and the resolution goes out as a new revision.
            match &self.replica {
                Some(replica) => {
                    // Wire form, like any received event: decrypting middleware and the
                    // filter come first (what the filter refuses is not taken in).
                    let mut kept = Vec::with_capacity(held.len());
                    for (theirs, _) in held {
                        match self.incoming(theirs) {
                            Ok(Some(event)) => kept.push(event),
                            Ok(None) => {}
                            Err(e) => self.inner.notifier.emit(Notification::Error(Arc::new(e))),
                        }
                    }
                    if !kept.is_empty() {
                        let ingested = replica
                            .ingest(kept)
                            .await
                            .map_err(|e| self.ingest_failed(e, "storing"))?;
                        self.ingested(&ingested);
                    }
                }
                // No replica to settle it: the room keeps its revision, and the application
                // hears of both sides, as it made ours and as it would receive theirs.
                None => {
                    for (theirs, ours) in held {
                        let rejected = SyncError::Rejected(format!(
                            "event {:?} version {} already exists on the server with other content",
                            theirs.id, theirs.version
                        ));
                        match (self.incoming(theirs), ours) {
                            (Ok(Some(theirs)), Some(ours)) => self.inner.notifier.emit(
                                Notification::Conflict(Conflict::concurrent_edit(ours, theirs)),
                            ),
                            // Nobody listened for conflicts when it went out, or the filter
                            // keeps theirs from the application: refused, all the same.
                            (Ok(_), _) => self
                                .inner
                                .notifier
                                .emit(Notification::Error(Arc::new(rejected))),
                            (Err(e), _) => {
                                self.inner.notifier.emit(Notification::Error(Arc::new(e)))
                            }
                        }
                    }
                }
            }
        }
        self.save_room_cursor().await?;
        self.settle().await?;
        self.notify_synced(on_server);
        Ok(())
    }

    /// Reports what `Replica::ingest` stored (and sends the resolutions it wrote).
    fn ingested(&self, ingested: &Ingested) {
        ingested.notify(&self.inner.notifier);
        if !ingested.resolutions.is_empty() {
            self.inner.wake.notify_one();
        }
    }

    /// The session's error for a failed `Replica::ingest` (`doing`: what it was for). What
    /// it stored before failing is reported first: the events the next session brings again
    /// are duplicates then, never reported.
    fn ingest_failed(&self, error: SyncError, doing: &str) -> WsError {
        if let Some(stored) = error.ingested() {
            self.ingested(stored);
        }
        WsError::Protocol(format!("{doing}: {error}"))
    }

    /// The `sync` of an ack: the events it says are now safely in the room (stored, or
    /// already there) were synced in this exchange, as a received batch is. None: no `sync`.
    fn notify_synced(&self, events: Vec<Event>) {
        if !events.is_empty() {
            self.inner.notifier.emit(Notification::Sync(events));
        }
    }

    /// Live or catch-up events with sequence numbers. Each seq arrives once and in order: an
    /// entry at or below the highest seq seen so far (in this batch too) was seen already, or
    /// comes out of order from a broken server, and is skipped (as ksync.js does). Taking the
    /// batch's last seq instead moved the cursor back after `[5, 3]`, and 5 came again.
    async fn receive(&mut self, events: Vec<Stored>) -> Result<(), WsError> {
        let mut highest = self.room_cursor;
        let fresh: Vec<Stored> = events
            .into_iter()
            .filter(|s| {
                let new = s.seq > highest;
                highest = highest.max(s.seq);
                new
            })
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        debug_log!(self.debug(), target: LOG_TARGET, events = fresh.len(), last = highest, "events");
        self.deliver(fresh).await?;
        self.room_cursor = highest;
        self.save_room_cursor().await
    }

    /// Runs incoming middleware and the filter, stores (when attached), then notifies.
    async fn deliver(&mut self, events: Vec<Stored>) -> Result<(), WsError> {
        self.counters.events += events.len() as u64;
        let mut kept = Vec::with_capacity(events.len());
        for stored in events {
            match self.incoming(stored.event) {
                Ok(Some(event)) => kept.push(event),
                Ok(None) => {}
                Err(e) => self.inner.notifier.emit(Notification::Error(Arc::new(e))),
            }
        }
        if kept.is_empty() {
            return Ok(());
        }
        match &self.replica {
            Some(replica) => {
                let ingested = replica
                    .ingest(kept)
                    .await
                    .map_err(|e| self.ingest_failed(e, "storing received events"))?;
                self.ingested(&ingested);
            }
            None => {
                // Our own events come back only after a reconnect (stored, but the ack was
                // lost); they are not news. Ours: our origin, or still in the outbox (a
                // forwarded event keeps the origin it was given).
                {
                    let outbox = lock(&self.inner.outbox);
                    kept.retain(|e| {
                        e.origin.as_deref() != Some(self.inner.client_id.as_str())
                            && !outbox.holds(e)
                    });
                }
                if kept.is_empty() {
                    return Ok(());
                }
                let notifier = &self.inner.notifier;
                for event in &kept {
                    notifier.emit(Notification::Event(event.clone()));
                }
                notifier.emit(Notification::Sync(kept));
            }
        }
        Ok(())
    }
}

/// Writes the acknowledged cursor `name` (the caller holds `acked_writes`), unless it already
/// holds `value` (a `send` may have moved it there): each write is a durable record.
async fn store_acked(replica: &Replica, name: &str, value: u64) -> Result<(), WsError> {
    let stored = replica
        .cursor(name)
        .map_err(|e| WsError::Protocol(format!("reading the ack cursor: {e}")))?;
    if stored != value {
        replica
            .set_cursor(name, value)
            .await
            .map_err(|e| WsError::Protocol(format!("storing the ack cursor: {e}")))?;
    }
    Ok(())
}

/// Least time between two writes of the room cursor to the replica (see
/// `Session::save_room_cursor`): one per received frame grew a file log without bound.
const CURSOR_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Events per publish for `Strategy::StateBased`.
const STATE_CHUNK: usize = 500;
/// Local events scanned per round for `Strategy::StateBased` before coalescing.
const STATE_SCAN: usize = 10_000;

/// Keeps the highest version of each id, in first-seen order.
fn latest_per_id(events: Vec<Outgoing>) -> Vec<Outgoing> {
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<Outgoing> = Vec::new();
    for event in events {
        match index.get(&event.wire.id) {
            Some(&i) => {
                if event.wire.version >= out[i].wire.version {
                    out[i] = event;
                }
            }
            None => {
                index.insert(event.wire.id.clone(), out.len());
                out.push(event);
            }
        }
    }
    out
}

/// `publish` without copying the events into JSON values.
#[derive(serde::Serialize)]
struct PublishOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref")]
    reference: u64,
    events: &'a [&'a Event],
}

// Keeps the wire type and the borrowed form in step.
const _: fn(Publish) = |_| {};

/// Longest upgrade answer head read (status line and headers).
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Most bytes of a refusal's body kept for [`WsError::Refused`].
const MAX_REFUSAL_BODY: usize = 512;

/// The WebSocket upgrade (RFC 6455 4.1) on `tcp`, done here rather than by tungstenite: its
/// client handshake logs the whole request at TRACE, credentials included. A refusal is
/// [`WsError::Refused`] with the status and (the start of) the body.
async fn upgrade(
    mut tcp: ClientStream,
    target: &Target,
    auth: Option<&Auth>,
    config: WebSocketConfig,
) -> Result<Socket, WsError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let (host, path) = (&target.authority, &target.path);
    let key = tungstenite::handshake::client::generate_key();
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    if let Some(auth) = auth {
        let (name, value) = auth.header();
        // Checked by the builder and `set_auth`; never sent broken.
        if http::HeaderValue::from_str(&value).is_err() {
            return Err(WsError::Protocol(
                "credentials contain characters not allowed in a header".into(),
            ));
        }
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let io = |e: std::io::Error| WsError::WebSocket(format!("upgrade: {e}"));
    tcp.write_all(request.as_bytes()).await.map_err(io)?;
    drop(request);

    let mut buffer = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buffer.len() > MAX_RESPONSE_HEAD {
            return Err(WsError::WebSocket("upgrade: answer head too long".into()));
        }
        let mut chunk = [0u8; 2048];
        let read = tcp.read(&mut chunk).await.map_err(io)?;
        if read == 0 {
            return Err(WsError::ConnectionLost);
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let rest = buffer.split_off(head_end);
    let head = String::from_utf8_lossy(&buffer);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| WsError::WebSocket("upgrade: no HTTP status line".into()))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    if status != 101 {
        let length = header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(MAX_REFUSAL_BODY);
        let mut body = rest;
        while body.len() < length {
            let mut chunk = [0u8; 512];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => body.extend_from_slice(&chunk[..read]),
            }
        }
        body.truncate(length);
        return Err(WsError::Refused {
            status,
            message: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    let has = |name: &str, token: &str| {
        header(name).is_some_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if !has("upgrade", "websocket")
        || !has("connection", "upgrade")
        || header("sec-websocket-accept") != Some(accept.as_str())
    {
        return Err(WsError::WebSocket(
            "upgrade: the answer is not a valid WebSocket handshake".into(),
        ));
    }
    Ok(WebSocketStream::from_partially_read(
        tcp,
        rest,
        tungstenite::protocol::Role::Client,
        Some(config),
    )
    .await)
}

fn closed(frame: Option<CloseFrame>) -> WsError {
    match frame {
        Some(f) => WsError::Closed {
            code: u16::from(f.code),
            reason: f.reason.to_string(),
        },
        None => WsError::Closed {
            code: 1005,
            reason: String::new(),
        },
    }
}

async fn deadline(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
