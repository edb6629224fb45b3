//! The live dashboard: the page at `/` (plain GET; an upgrade on `/` stays the relay's default
//! room), its assets, the browser client module `/ksync.js`, and the monitor feed at
//! `/monitor` that the page reads over WebSocket.
//!
//! The page's files are compiled into the binary (no CDN, no build step). The feed speaks the
//! relay's framing (`hello` / `welcome` / `events` / `error`, same close codes) plus `stats`
//! and `client` messages; `docs/PROTOCOL.md` ("Monitor feed") describes it. It is pushed by the
//! server: the page never polls.
//!
//! The feed authenticates like the relay (headers, or `Sec-WebSocket-Protocol` entries for
//! browsers) and shows a caller only the rooms and repositories its grant may read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use ksync_core::{
    Access, Authenticator, Grant, LogName, PROTOCOL_VERSION, ResourceKind, StorageProvider, Stored,
};
use ksync_ws::protocol::{close, code, hello_protocol};
use ksync_ws::server::{
    ClientInfo, Refusal, Relay, RelayActivity, SUBPROTOCOL, credentials_from_headers,
    is_websocket_upgrade,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tracing::Instrument as _;

/// Where the monitor feed is served (WebSocket; a plain GET answers who the credentials are).
pub const MONITOR_PATH: &str = "/monitor";

const INDEX_HTML: &str = include_str!("../assets/index.html");
const DASHBOARD_JS: &str = include_str!("../assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("../assets/dashboard.css");
const FAVICON_SVG: &str = include_str!("../assets/favicon.svg");
/// The browser client. It lives inside this crate so that `cargo package` includes it.
const CLIENT_JS: &str = include_str!("../assets/ksync.js");

/// The page may load only its own scripts and styles and talk only to its own origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Most monitor connections at once; more get 503 (each one reads every log once a second).
const MAX_MONITORS: usize = 64;
/// How often `stats` go out.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Most events a monitor is sent per stats interval; the rest are counted in `tailSkipped`
/// (a page shows a few hundred lines, and a busy server stores far more).
const TAIL_BUDGET: usize = 256;
/// Most history events a monitor may ask for per log in `hello.recent`.
const MAX_RECENT: u64 = 100;
/// Most rooms, repositories and clients listed in one `stats` (totals are always given).
const MAX_LISTED: usize = 500;
/// `hello` must arrive within this long after the upgrade (closed with 4002).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// One socket write may take this long before the monitor is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message a monitor may send (only `hello` is expected).
const MAX_INCOMING: usize = 64 * 1024;

/// What the dashboard routes share.
pub(crate) struct Dashboard {
    relay: Relay,
    provider: Arc<dyn StorageProvider>,
    auth: Arc<dyn Authenticator>,
    started: Instant,
    monitors: AtomicUsize,
}

impl Dashboard {
    pub(crate) fn new(
        relay: Relay,
        provider: Arc<dyn StorageProvider>,
        auth: Arc<dyn Authenticator>,
    ) -> Arc<Self> {
        Arc::new(Self {
            relay,
            provider,
            auth,
            started: Instant::now(),
            monitors: AtomicUsize::new(0),
        })
    }
}

/// The page's assets, `/ksync.js` and the monitor feed. `/` itself is routed by the server,
/// which hands plain GETs to [`index`].
pub(crate) fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route(
            "/dashboard/app.js",
            get(|| async { asset(DASHBOARD_JS, "text/javascript") }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset(DASHBOARD_CSS, "text/css") }),
        )
        .route("/ksync.js", get(client_module))
        .route(
            "/favicon.ico",
            get(|| async { asset(FAVICON_SVG, "image/svg+xml") }),
        )
        .route(MONITOR_PATH, any(monitor))
        .with_state(dashboard)
}

/// The browser client module, importable from any origin (module scripts are fetched with
/// CORS): apps are served from their own origin and import it from the server's. It holds no
/// data and is the same for everyone, so `*` gives nothing away; credentials are not allowed
/// with `*`, and none are needed to fetch it.
async fn client_module() -> Response {
    let mut response = asset(CLIENT_JS, "text/javascript");
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

/// The dashboard page (public: it holds no data; the feed it opens is authenticated).
pub(crate) fn index() -> Response {
    let mut response = asset(INDEX_HTML, "text/html; charset=utf-8");
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Whether a request for `/` comes from a browser (asks for HTML) rather than an API client.
pub(crate) fn wants_html(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// Resolves when credentials valid until `at` expire (never for `None`).
async fn credentials_expiry(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

/// Decrements the monitor count when a monitor (or a refused upgrade) ends.
struct MonitorSlot(Arc<Dashboard>);

impl Drop for MonitorSlot {
    fn drop(&mut self) {
        self.0.monitors.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `/monitor`: the feed (WebSocket upgrade), or for a plain GET the identity the credentials
/// give, so that a page can tell "wrong token" from "server down" before it opens the socket
/// (a browser cannot read the status of a refused upgrade).
async fn monitor(State(dashboard): State<Arc<Dashboard>>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    // Never log the credentials themselves: only the refusal's reason (which holds none).
    let credentials = credentials_from_headers(&parts.headers);
    let grant = match dashboard.auth.authenticate(&credentials) {
        Ok(grant) => grant,
        Err(error) => {
            tracing::info!(%error, "monitor auth refused");
            return Refusal::auth(&error).http();
        }
    };
    if !grant.read {
        return Refusal::new(StatusCode::FORBIDDEN, "these credentials may not read").http();
    }
    if !is_websocket_upgrade(&parts.headers) {
        return axum::Json(json!({
            "subject": grant.subject,
            "authRequired": dashboard.auth.required(),
            "protocol": PROTOCOL_VERSION,
        }))
        .into_response();
    }
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let previous = dashboard.monitors.fetch_add(1, Ordering::AcqRel);
    let slot = MonitorSlot(Arc::clone(&dashboard));
    if previous >= MAX_MONITORS {
        return Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "too many monitors").http();
    }
    upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING)
        .on_upgrade(move |socket| {
            let span = tracing::debug_span!("monitor", subject = %grant.subject);
            async move {
                let mut feed = Feed {
                    dashboard: Arc::clone(&slot.0),
                    grant,
                    socket,
                    branch_seen: HashMap::new(),
                    previous_total: None,
                    budget: TAIL_BUDGET,
                    skipped: 0,
                };
                let (code, reason) = feed.run().await.unwrap_or_else(|end| end);
                if code != 0 {
                    feed.close(code, reason).await;
                }
                drop(slot);
            }
            .instrument(span)
        })
}

/// The first message of a monitor.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
enum MonitorHello {
    Hello {
        /// Required; checked before the rest is decoded (`hello_protocol`), so only ours
        /// comes here.
        #[serde(rename = "protocol")]
        _protocol: u32,
        /// Whether to receive stored events (default true).
        #[serde(default = "yes")]
        tail: bool,
        /// How many of the latest events of each log to send first (default 0, capped).
        #[serde(default)]
        recent: u64,
    },
}

fn yes() -> bool {
    true
}

/// Why a feed ends: a close code and reason (`0`: the peer is gone, nothing to send).
type End = (u16, &'static str);

struct Feed {
    dashboard: Arc<Dashboard>,
    grant: Grant,
    socket: WebSocket,
    /// Branch lengths at the previous tick (the relay reports rooms; branches are read).
    branch_seen: HashMap<(String, String), u64>,
    /// Events held across visible logs at the previous tick, and when.
    previous_total: Option<(u64, Instant)>,
    /// Events still allowed in the tail this interval.
    budget: usize,
    /// Events left out of the tail this interval (over budget or lagged).
    skipped: u64,
}

impl Feed {
    async fn send(&mut self, value: &Value) -> Result<(), End> {
        let text = value.to_string();
        match tokio::time::timeout(WRITE_TIMEOUT, self.socket.send(Message::text(text))).await {
            Ok(Ok(())) => Ok(()),
            _ => Err((0, "")),
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let socket = &mut self.socket;
        let close = async {
            if socket.send(Message::Close(Some(frame))).await.is_err() {
                // The client closed first: tungstenite refuses our close frame and has queued
                // the echo of the client's (RFC 6455 5.5.1); reading once more writes it.
                let _ = socket.recv().await;
            }
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, close).await;
    }

    async fn error(&mut self, code: &str, message: &str) -> Result<(), End> {
        self.send(&json!({"type": "error", "code": code, "message": message}))
            .await
    }

    async fn read_hello(&mut self) -> Result<(bool, u64), End> {
        loop {
            let text = match self.socket.recv().await {
                None | Some(Err(_)) => return Err((0, "")),
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) => return Err((close::NORMAL, "")),
                Some(Ok(Message::Binary(_))) => {
                    self.error(code::BAD_BINARY, "the monitor feed takes text frames")
                        .await?;
                    return Err((close::UNSUPPORTED_DATA, "binary frame"));
                }
                Some(Ok(_)) => continue,
            };
            // The version first: a `hello` of another version may hold fields this one
            // refuses (any unknown field is a bad first message here).
            if hello_protocol(text.as_bytes())
                .is_some_and(|theirs| theirs != u64::from(PROTOCOL_VERSION))
            {
                self.error(
                    code::UNSUPPORTED_PROTOCOL,
                    &format!("this server speaks protocol {PROTOCOL_VERSION}"),
                )
                .await?;
                return Err((close::UNSUPPORTED_PROTOCOL, "unsupported protocol"));
            }
            return match serde_json::from_str::<MonitorHello>(text.as_str()) {
                // `protocol` is ours: another one was answered above.
                Ok(MonitorHello::Hello { tail, recent, .. }) => Ok((tail, recent.min(MAX_RECENT))),
                Err(e) => {
                    self.error(code::PROTOCOL, &format!("expected hello: {e}"))
                        .await?;
                    Err((close::PROTOCOL_ERROR, "first message must be hello"))
                }
            };
        }
    }

    async fn run(&mut self) -> Result<End, End> {
        let relay = self.dashboard.relay.clone();
        // A shutdown closes a monitor still waiting for its hello at once, as the others.
        let hello = tokio::select! {
            read = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.read_hello()) => read,
            () = relay.shutting_down() => return Ok((close::GOING_AWAY, "server shutting down")),
        };
        let (tail, recent) = match hello {
            Ok(hello) => hello?,
            Err(_) => return Err((close::HANDSHAKE_TIMEOUT, "no hello in time")),
        };
        // Subscribe before the first stats so that no change falls between the two.
        let mut activity = self.dashboard.relay.activity();
        self.send(&json!({
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "feed": "monitor",
            "subject": self.grant.subject,
            "intervalMs": u64::try_from(STATS_INTERVAL.as_millis()).unwrap_or(u64::MAX),
            "tail": tail,
        }))
        .await?;
        if tail && recent > 0 {
            self.send_recent(recent).await?;
        }
        self.send_stats(tail).await?;
        let shutting_down = relay.shutting_down();
        tokio::pin!(shutting_down);
        // A feed must not outlive its credentials (a JWT's `exp`), as relay connections.
        let expired = credentials_expiry(self.grant.expires_at);
        tokio::pin!(expired);
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + STATS_INTERVAL, STATS_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutting_down => return Ok((close::GOING_AWAY, "server shutting down")),
                () = &mut expired => {
                    return Ok((close::CREDENTIALS_EXPIRED, "credentials expired"));
                }
                _ = ticks.tick() => {
                    // The expiry timer runs on the monotonic clock, which a suspended host
                    // does not advance: the wall clock decides, checked once a tick.
                    if self.grant.expired_at(SystemTime::now()) {
                        return Ok((close::CREDENTIALS_EXPIRED, "credentials expired"));
                    }
                    self.send_stats(tail).await?;
                }
                item = activity.recv() => match item {
                    Ok(RelayActivity::Connected(info)) => self.send_client("joined", &info).await?,
                    Ok(RelayActivity::Disconnected(info)) => self.send_client("left", &info).await?,
                    Ok(RelayActivity::Stored { room, events, omitted }) => {
                        if tail && self.grant.allows(ResourceKind::Room, room.as_str(), Access::Read) {
                            // Too large to carry (see `ACTIVITY_ITEM_BYTES`): counted as left out.
                            self.skipped += omitted;
                            let events = self.take_budget(&events);
                            if !events.is_empty() {
                                self.send(&json!({"type": "events", "room": room.as_str(), "events": events})).await?;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        self.skipped += missed;
                        tracing::debug!(missed, "monitor lagged behind the relay");
                    }
                    Err(RecvError::Closed) => return Ok((close::GOING_AWAY, "relay stopped")),
                },
                message = self.socket.recv() => match message {
                    None | Some(Err(_)) => return Err((0, "")),
                    Some(Ok(Message::Close(_))) => return Ok((close::NORMAL, "")),
                    Some(Ok(Message::Text(_))) => {
                        self.error(code::UNKNOWN_TYPE, "the monitor feed takes only hello").await?;
                    }
                    Some(Ok(Message::Binary(_))) => {
                        self.error(code::BAD_BINARY, "the monitor feed takes text frames").await?;
                        return Err((close::UNSUPPORTED_DATA, "binary frame"));
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// The part of `events` this interval's budget allows; the rest is counted as skipped.
    fn take_budget<'a>(&mut self, events: &'a [Stored]) -> &'a [Stored] {
        let taken = events.len().min(self.budget);
        self.budget -= taken;
        self.skipped += (events.len() - taken) as u64;
        &events[..taken]
    }

    fn visible(&self, name: &LogName) -> bool {
        match name {
            LogName::Room(room) => {
                self.grant
                    .allows(ResourceKind::Room, room.as_str(), Access::Read)
            }
            LogName::Branch { repo, .. } => {
                self.grant
                    .allows(ResourceKind::Repo, repo.as_str(), Access::Read)
            }
        }
    }

    async fn send_client(&mut self, change: &str, info: &ClientInfo) -> Result<(), End> {
        if !self
            .grant
            .allows(ResourceKind::Room, info.room.as_str(), Access::Read)
        {
            return Ok(());
        }
        self.send(&json!({"type": "client", "change": change, "client": client_json(info)}))
            .await
    }

    /// The latest `recent` events of every visible log, oldest first per log.
    async fn send_recent(&mut self, recent: u64) -> Result<(), End> {
        let provider = Arc::clone(&self.dashboard.provider);
        let names = match provider.list() {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "listing logs for the monitor failed");
                return Ok(());
            }
        };
        let names: Vec<LogName> = names.into_iter().filter(|n| self.visible(n)).collect();
        for name in names {
            // Open logs only: opening one would replay it and keep it in memory.
            let Some(storage) = provider.opened(&name) else {
                continue;
            };
            let len = storage.len();
            let from = len.saturating_sub(recent);
            let read = storage.read_since(from, usize::try_from(recent).unwrap_or(0));
            // Not held across the send (up to the write timeout on a slow monitor): a room
            // closing meanwhile releases its log only if nobody else holds it, once; a log
            // held here then stayed open for good.
            drop(storage);
            let Ok(events) = read else {
                continue;
            };
            if events.is_empty() {
                continue;
            }
            let message = match &name {
                LogName::Room(room) => {
                    json!({"type": "events", "room": room.as_str(), "events": events, "recent": true})
                }
                LogName::Branch { repo, branch } => {
                    json!({"type": "events", "repo": repo.as_str(), "branch": branch.as_str(), "events": events, "recent": true})
                }
            };
            self.send(&message).await?;
        }
        Ok(())
    }

    /// One `stats` message, plus the events branches gained since the previous one.
    async fn send_stats(&mut self, tail: bool) -> Result<(), End> {
        let provider = Arc::clone(&self.dashboard.provider);
        let names = match provider.list() {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "listing logs for the monitor failed");
                Vec::new()
            }
        };
        let clients: Vec<ClientInfo> = self
            .dashboard
            .relay
            .clients()
            .into_iter()
            .filter(|c| {
                self.grant
                    .allows(ResourceKind::Room, c.room.as_str(), Access::Read)
            })
            .collect();
        let mut per_room: HashMap<&str, usize> = HashMap::new();
        for client in &clients {
            *per_room.entry(client.room.as_str()).or_default() += 1;
        }
        let mut rooms: BTreeMap<String, Value> = BTreeMap::new();
        let mut repos: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut total: u64 = 0;
        let mut grown: Vec<(LogName, u64, u64)> = Vec::new();
        let names: Vec<LogName> = names.into_iter().filter(|n| self.visible(n)).collect();
        for name in &names {
            // Known without opening the log (see `StorageProvider::known_len`): a monitor must
            // not open every log on disk once a second. `null` for a log not opened since the
            // server started.
            let seq = provider.known_len(name);
            total += seq.unwrap_or(0);
            match name {
                LogName::Room(room) => {
                    let clients = per_room.get(room.as_str()).copied().unwrap_or(0);
                    rooms.insert(
                        room.to_string(),
                        json!({"name": room.as_str(), "seq": seq, "clients": clients}),
                    );
                }
                LogName::Branch { repo, branch } => {
                    repos
                        .entry(repo.to_string())
                        .or_default()
                        .push(json!({"name": branch.as_str(), "seq": seq}));
                    let Some(seq) = seq else { continue };
                    let key = (repo.to_string(), branch.to_string());
                    // A branch that appears after the first stats is new: all of it is news.
                    let first = self.previous_total.is_none();
                    let seen =
                        self.branch_seen
                            .insert(key, seq)
                            .or(if first { None } else { Some(0) });
                    if let Some(seen) = seen
                        && seq > seen
                    {
                        grown.push((name.clone(), seen, seq));
                    }
                }
            }
        }
        // Rooms with clients but no log listed yet still show.
        for (room, count) in &per_room {
            rooms
                .entry((*room).to_owned())
                .or_insert_with(|| json!({"name": room, "seq": 0, "clients": count}));
        }
        let now = Instant::now();
        let per_second = match self.previous_total {
            Some((before, at)) if total >= before => {
                let secs = now.duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    (total - before) as f64 / secs
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        self.previous_total = Some((total, now));
        let rooms_total = rooms.len();
        let repos_total = repos.len();
        let clients_total = clients.len();
        let message = json!({
            "type": "stats",
            "time": unix_millis(SystemTime::now()),
            "uptimeSeconds": self.dashboard.started.elapsed().as_secs(),
            "connections": clients_total,
            "eventsStored": total,
            "eventsPerSecond": (per_second * 10.0).round() / 10.0,
            "tailSkipped": self.skipped,
            "roomsTotal": rooms_total,
            "rooms": rooms.into_values().take(MAX_LISTED).collect::<Vec<_>>(),
            "reposTotal": repos_total,
            "repos": repos
                .into_iter()
                .take(MAX_LISTED)
                .map(|(name, branches)| json!({"name": name, "branches": branches}))
                .collect::<Vec<_>>(),
            "clientsTotal": clients_total,
            "clients": clients.iter().take(MAX_LISTED).map(client_json).collect::<Vec<_>>(),
        });
        self.budget = TAIL_BUDGET;
        self.skipped = 0;
        self.send(&message).await?;
        if tail {
            for (name, seen, seq) in grown {
                let LogName::Branch { repo, branch } = &name else {
                    continue;
                };
                let Some(storage) = provider.opened(&name) else {
                    continue;
                };
                let wanted = usize::try_from(seq - seen).unwrap_or(usize::MAX);
                let read = storage.read_since(seen, wanted.min(self.budget));
                // Not held across the send (see `send_recent`).
                drop(storage);
                let Ok(events) = read else {
                    continue;
                };
                self.skipped += (wanted - events.len()) as u64;
                self.budget -= events.len();
                if !events.is_empty() {
                    self.send(&json!({"type": "events", "repo": repo.as_str(), "branch": branch.as_str(), "events": events}))
                        .await?;
                }
            }
        }
        Ok(())
    }
}

fn client_json(info: &ClientInfo) -> Value {
    json!({
        "id": info.id,
        "room": info.room.as_str(),
        "subject": info.subject,
        "connectedAt": unix_millis(info.connected_at),
    })
}

fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
