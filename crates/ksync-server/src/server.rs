//! The composed HTTP/WebSocket server: routers, health, metrics, graceful shutdown.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use ksync_core::{Authenticator, InMemoryProvider, LogName, StorageProvider};
use ksync_git::server::GitServer;
use ksync_storage_file::{FileProvider, StoreLimits};
use ksync_ws::server::{Relay, RelayConfig, is_websocket_upgrade, wants_in_band_refusal};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::auth::{AuthCounters, ServerAuthenticator, with_client_ip};
use crate::config::{Limits, ServerConfig};
use crate::error::ServerError;
use crate::signal::{ReloadSignal, ShutdownSignal};
use crate::tls::Certificates;

/// Shortest wait for the final flush at shutdown, whatever the shutdown timeout (0 means not
/// waiting for connections; a healthy disk flushes in milliseconds).
const MIN_FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the server keeps its logs, as printed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageLocation {
    /// In memory (lost on exit).
    Memory,
    /// On disk under this directory.
    Directory(std::path::PathBuf),
}

impl std::fmt::Display for StorageLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageLocation::Memory => f.write_str("memory"),
            StorageLocation::Directory(dir) => write!(f, "{}", dir.display()),
        }
    }
}

struct AppState {
    started: Instant,
    provider: Arc<dyn StorageProvider>,
    auth: Option<Arc<ServerAuthenticator>>,
    auth_counters: Option<Arc<AuthCounters>>,
    relay: Relay,
    http_requests: AtomicU64,
    stopping: AtomicBool,
}

/// What `config` says about TLS and auth, loaded and checked.
struct Credentials {
    tls: Option<Arc<Certificates>>,
    authenticator: Arc<dyn Authenticator>,
    /// The same authenticator when auth is on.
    auth: Option<Arc<ServerAuthenticator>>,
}

impl Credentials {
    fn load(config: &ServerConfig) -> Result<Self, ServerError> {
        let tls = config.tls.as_ref().map(Certificates::load).transpose()?;
        let (authenticator, auth): (Arc<dyn Authenticator>, Option<Arc<ServerAuthenticator>>) =
            if config.auth.is_enabled() {
                let auth = Arc::new(ServerAuthenticator::new(&config.auth)?);
                (Arc::clone(&auth) as Arc<dyn Authenticator>, Some(auth))
            } else {
                (Arc::new(ksync_core::AllowAll), None)
            };
        Ok(Self {
            tls,
            authenticator,
            auth,
        })
    }
}

/// The kSync server: composes the routers over one storage provider and one authenticator.
pub struct Server {
    config: ServerConfig,
    provider: Arc<dyn StorageProvider>,
    storage: StorageLocation,
    authenticator: Arc<dyn Authenticator>,
    relay: Relay,
    git: GitServer,
    /// One permit per repository request being handled (`Limits::max_git_requests`).
    git_requests: Arc<Semaphore>,
    state: Arc<AppState>,
    /// Loaded from `config.tls`.
    tls: Option<Arc<Certificates>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("bind", &self.config.bind)
            .field("storage", &self.storage)
            .field("auth", &self.authenticator.required())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Prepares a server for `config`: loads auth keys and opens storage (in memory or under
    /// `config.data_dir`). Does not listen yet.
    ///
    /// The certificate and the auth keys are loaded first: a configuration that cannot start
    /// neither creates nor locks the data directory.
    pub fn new(config: ServerConfig) -> Result<Self, ServerError> {
        config.limits.check()?;
        let credentials = Credentials::load(&config)?;
        let (provider, storage) = open_storage(&config)?;
        Self::assemble(config, provider, storage, credentials)
    }

    /// Like [`new`](Self::new) with a storage provider of the caller's choosing.
    pub fn with_provider(
        config: ServerConfig,
        provider: Arc<dyn StorageProvider>,
        storage: StorageLocation,
    ) -> Result<Self, ServerError> {
        config.limits.check()?;
        let credentials = Credentials::load(&config)?;
        Self::assemble(config, provider, storage, credentials)
    }

    fn assemble(
        config: ServerConfig,
        provider: Arc<dyn StorageProvider>,
        storage: StorageLocation,
        credentials: Credentials,
    ) -> Result<Self, ServerError> {
        let Credentials {
            tls,
            authenticator,
            auth,
        } = credentials;
        let relay = Relay::new(
            relay_config(&config.limits),
            Arc::clone(&provider),
            Arc::clone(&authenticator),
        )?;
        let mut git_config = ksync_git::server::GitServerConfig::default();
        git_config.body_memory_bytes = config.limits.git_body_memory_bytes;
        git_config.max_branches_per_repo = config.limits.max_branches_per_repo;
        git_config.max_pushes_per_client = config.limits.max_pushes_per_client;
        git_config.max_merges_per_client = config.limits.max_merges_per_client;
        let git = GitServer::with_config(
            Arc::clone(&provider),
            Arc::clone(&authenticator),
            git_config,
        );
        let state = Arc::new(AppState {
            started: Instant::now(),
            provider: Arc::clone(&provider),
            auth_counters: auth.as_ref().map(|a| a.counters()),
            auth,
            relay: relay.clone(),
            http_requests: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        Ok(Self {
            git_requests: Arc::new(Semaphore::new(
                config
                    .limits
                    .max_git_requests
                    .clamp(1, Semaphore::MAX_PERMITS),
            )),
            config,
            provider,
            storage,
            authenticator,
            relay,
            git,
            state,
            tls,
        })
    }

    /// Prepares and starts a server for `config`; see [`Server::start`].
    pub async fn bind(config: ServerConfig) -> Result<RunningServer, ServerError> {
        Self::new(config)?.start().await
    }

    /// The authenticator every router uses.
    pub fn authenticator(&self) -> Arc<dyn Authenticator> {
        Arc::clone(&self.authenticator)
    }

    /// The storage provider every router uses.
    pub fn provider(&self) -> Arc<dyn StorageProvider> {
        Arc::clone(&self.provider)
    }

    /// The WebSocket relay.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// The composed router: `/health`, `/metrics`, the WebSocket relay (`/ws`, `/ws/{room}`,
    /// and an upgrade on `/` for the default room) and the repository service (`/git/...`).
    pub fn router(&self) -> Router {
        let own = Router::new()
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .with_state(Arc::clone(&self.state));
        let root = Router::new()
            .route("/", any(root))
            .with_state(Arc::clone(&self.state));
        let transports = root
            .merge(self.relay.router())
            .merge(
                self.git
                    .router()
                    .layer(RequestBodyTimeoutLayer::new(
                        self.config.limits.request_body_timeout,
                    ))
                    .layer(axum::middleware::from_fn_with_state(
                        Arc::new(crate::min_rate::MinRate {
                            grace: self.config.limits.request_body_timeout,
                            bytes_per_sec: self.config.limits.request_body_min_rate,
                        }),
                        crate::min_rate::enforce,
                    ))
                    .layer(axum::middleware::from_fn_with_state(
                        Arc::clone(&self.git_requests),
                        shed_git_requests,
                    )),
            )
            .merge(crate::dashboard::router(crate::dashboard::Dashboard::new(
                self.relay.clone(),
                Arc::clone(&self.provider),
                Arc::clone(&self.authenticator),
            )))
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&self.state),
                refuse_rate_limited,
            ));
        own.merge(transports)
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&self.state),
                count_requests,
            ))
            // The relay's router has it already (a library user may mount it alone); this
            // covers the rest (`/git/...`, the fallback), adding no second header.
            .layer(axum::middleware::map_response(
                ksync_ws::server::no_endpoint_any_origin,
            ))
    }

    /// Binds the listening socket and starts serving in the background.
    pub async fn start(self) -> Result<RunningServer, ServerError> {
        let addr = self.config.bind;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener.local_addr()?;
        let app = self.router();
        let (stop_tx, stop_rx) = watch::channel(false);
        let tls = self.tls.is_some();
        let limits = crate::http::ConnectionLimits {
            max_http_connections: self.config.limits.max_http_connections,
            header_timeout: self.config.limits.request_header_timeout,
            write_timeout: self.config.limits.response_write_timeout,
            max_waiting_per_ip: self.config.limits.max_pending_connections_per_ip,
        };
        let task = match &self.tls {
            // Small frames must not wait for Nagle's algorithm (it added ~10 ms p50).
            None => tokio::spawn(crate::http::serve(
                ksync_ws::server::nodelay(listener),
                app,
                limits,
                stop_rx,
            )),
            // TLS connections already have TCP_NODELAY.
            Some(certificates) => {
                let listener = crate::tls::TlsListener::new(
                    listener,
                    Arc::clone(certificates),
                    limits.max_waiting_per_ip,
                );
                tokio::spawn(crate::http::serve(listener, app, limits, stop_rx))
            }
        };
        tracing::info!(%local_addr, tls, storage = %self.storage, auth = self.authenticator.required(), "ksync server listening");
        Ok(RunningServer {
            local_addr,
            tls: self.tls,
            storage: self.storage,
            provider: self.provider,
            relay: self.relay,
            state: self.state,
            stop: stop_tx,
            task,
            shutdown_timeout: self.config.limits.shutdown_timeout,
        })
    }
}

fn open_storage(
    config: &ServerConfig,
) -> Result<(Arc<dyn StorageProvider>, StorageLocation), ServerError> {
    if config.in_memory {
        return Ok((Arc::new(InMemoryProvider::new()), StorageLocation::Memory));
    }
    let provider = FileProvider::new(&config.data_dir)?.with_limits(StoreLimits::new(
        config.limits.max_rooms,
        config.limits.max_repos,
    ));
    Ok((
        Arc::new(provider),
        StorageLocation::Directory(config.data_dir.clone()),
    ))
}

fn relay_config(limits: &Limits) -> RelayConfig {
    let mut relay = RelayConfig::default();
    relay.max_message_size = limits.max_message_bytes;
    relay.max_connections = limits.max_connections;
    relay.max_connections_per_client = limits.max_connections_per_client;
    relay.max_open_rooms = limits.max_open_rooms;
    relay.subscriber_queues_total_bytes = limits.subscriber_queues_total_bytes;
    relay.room_queue_bytes = limits.room_queue_bytes;
    relay.room_queues_total_bytes = limits.room_queues_total_bytes;
    relay.heartbeat = limits.heartbeat;
    relay
}

/// A server that is listening. Dropping it leaves the server running until the runtime ends;
/// call [`shutdown`](Self::shutdown) to stop it cleanly.
pub struct RunningServer {
    local_addr: SocketAddr,
    tls: Option<Arc<Certificates>>,
    storage: StorageLocation,
    provider: Arc<dyn StorageProvider>,
    relay: Relay,
    state: Arc<AppState>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
    shutdown_timeout: std::time::Duration,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("local_addr", &self.local_addr)
            .field("storage", &self.storage)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// The address actually bound (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether it serves HTTPS and `wss://` (a certificate was configured).
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads the certificate and key files again (e.g. after a renewal): TLS handshakes from
    /// now on present the new certificate; connections already open keep theirs. On an error
    /// (a missing or unreadable file, a key that is not the certificate's) the current
    /// certificate stays. Does nothing on a server without TLS.
    pub fn reload_tls(&self) -> Result<(), ServerError> {
        match &self.tls {
            Some(certificates) => certificates.reload(),
            None => Ok(()),
        }
    }

    /// Where the logs are kept.
    pub fn storage(&self) -> &StorageLocation {
        &self.storage
    }

    /// The storage provider behind every log.
    pub fn provider(&self) -> Arc<dyn StorageProvider> {
        Arc::clone(&self.provider)
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        self.relay.connections()
    }

    /// Stops cleanly: stops accepting; commits and acknowledges what rooms already queued and
    /// closes WebSockets with 1001; lets open HTTP requests finish (waiting at most the
    /// configured shutdown timeout for the two together; a relay drain still running then goes
    /// on while the runtime runs); then flushes every log to storage, waiting at most the
    /// shutdown timeout again (at least 1 s): past it (a stuck disk) this returns
    /// [`ServerError::FlushTimedOut`].
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.state.stopping.store(true, Ordering::SeqCst);
        tracing::info!("shutting down: no new connections");
        // Err: the server task already ended (it holds the receiver).
        let _ = self.stop.send(true);
        // On a task of its own: the timeout ends the wait for the drain, not the drain.
        // Cancelled half-way, it left the rooms it had not reached yet open, their
        // connections no longer read and never closed (no 1001, no commit of what they
        // queued); on its task each room still commits, flushes and closes with 1001 while
        // the runtime runs.
        // One deadline for both waits below, so the whole wait is at most the timeout (two
        // timeouts of it each made it up to twice that).
        let deadline = tokio::time::Instant::now()
            + self.shutdown_timeout.min(ksync_core::MAX_CONFIG_DURATION);
        let relay = self.relay.clone();
        let drain = tokio::spawn(async move { relay.shutdown().await });
        match tokio::time::timeout_at(deadline, drain).await {
            Ok(Ok(())) => {}
            Ok(Err(join)) => tracing::error!(error = %join, "relay drain failed"),
            Err(_) => tracing::warn!(
                timeout = ?self.shutdown_timeout,
                "relay drain still running at the shutdown timeout; not waiting for it"
            ),
        }
        let mut task = self.task;
        let served = match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok(result)) => result.map_err(ServerError::Io),
            Ok(Err(join)) => Err(ServerError::Task(join.to_string())),
            Err(_) => {
                tracing::warn!(timeout = ?self.shutdown_timeout, "connections still open; flushing anyway");
                task.abort();
                Ok(())
            }
        };
        // Bounded too: a flush waits behind a sync the disk has not finished (a stuck or very
        // slow disk), and unbounded it held the stop up for as long as the disk did (for good
        // on a hung one). A window of its own, so a drain that took the whole timeout still
        // leaves the flush its time. Nothing acknowledged depends on it with a durable
        // storage (an ack follows its append's fdatasync); it is there for one that is not.
        let flush_window = self
            .shutdown_timeout
            .clamp(MIN_FLUSH_WAIT, ksync_core::MAX_CONFIG_DURATION);
        match tokio::time::timeout(flush_window, self.provider.flush_all()).await {
            Ok(flushed) => flushed?,
            Err(_) => {
                tracing::error!(
                    timeout = ?flush_window,
                    storage = %self.storage,
                    "storage flush still running at the shutdown timeout (a stuck or very slow disk); stopping without it: every acknowledged event was already synced, what was not acknowledged may not be stored"
                );
                return Err(ServerError::FlushTimedOut {
                    timeout: flush_window,
                });
            }
        }
        tracing::info!(storage = %self.storage, "storage flushed; stopped");
        served
    }

    /// Serves until SIGINT or SIGTERM, then shuts down cleanly (see [`shutdown`](Self::shutdown));
    /// with TLS, each SIGHUP meanwhile [reloads the certificate](Self::reload_tls). The
    /// handlers are installed when this is called; to close the window between printing
    /// "listening" and calling this, install them first and use
    /// [`run_until_signals`](Self::run_until_signals).
    pub async fn run_until_signal(self) -> Result<(), ServerError> {
        let shutdown = ShutdownSignal::install()?;
        let reload = ReloadSignal::install(self.tls())?;
        self.run_until_signals(shutdown, reload).await
    }

    /// Serves until `shutdown` fires, then shuts down cleanly; each `reload` meanwhile reloads
    /// the TLS certificate (a failed reload is logged and the current certificate stays). A
    /// reload asked for before a stop is done first.
    ///
    /// A second signal during the drain stops waiting at once: the server task is aborted, no
    /// flush is done, and this returns [`ServerError::Interrupted`]. Connections still open
    /// are dropped with the runtime (a process that exits then, as `ksync serve` does). Acks
    /// are sent only once their append is durable, so nothing acknowledged is lost.
    pub async fn run_until_signals(
        self,
        mut shutdown: ShutdownSignal,
        mut reload: ReloadSignal,
    ) -> Result<(), ServerError> {
        loop {
            tokio::select! {
                biased;
                () = reload.recv() => {
                    if let Err(error) = self.reload_tls() {
                        tracing::error!(%error, "TLS certificate not reloaded; still serving the one loaded before");
                    }
                }
                () = shutdown.recv() => break,
            }
        }
        let task = self.task.abort_handle();
        let storage = self.storage.clone();
        tokio::select! {
            biased;
            result = self.shutdown() => result,
            () = shutdown.recv() => {
                task.abort();
                match storage {
                    StorageLocation::Directory(_) => tracing::warn!(
                        %storage,
                        "second signal: drain cut short, open connections dropped, storage not flushed; every acknowledged event is already on disk (an ack waits for its fdatasync), what was not acknowledged may not be stored"
                    ),
                    StorageLocation::Memory => tracing::warn!(
                        "second signal: drain cut short, open connections dropped (storage is in memory: nothing is kept anyway)"
                    ),
                }
                Err(ServerError::Interrupted)
            }
        }
    }

    /// Serves until `stop` resolves, then shuts down cleanly.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        stop.await;
        self.shutdown().await
    }
}

async fn count_requests(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    state.http_requests.fetch_add(1, Ordering::Relaxed);
    next.run(request).await
}

/// `/`: the WebSocket upgrade for the default room (so `ws://host:port` works), or a short
/// description of the server for plain HTTP.
async fn root(State(state): State<Arc<AppState>>, request: Request) -> Response {
    if is_websocket_upgrade(request.headers()) {
        return state.relay.handle_upgrade(None, request).await;
    }
    // Browsers (Accept: text/html) get the dashboard; API clients the description below.
    if crate::dashboard::wants_html(request.headers()) {
        return crate::dashboard::index();
    }
    Json(serde_json::json!({
        "name": "ksync",
        "version": env!("CARGO_PKG_VERSION"),
        "websocket": ["/", "/ws", "/ws/{room}"],
        "git": "/git/{repo}",
        "health": "/health",
        "metrics": "/metrics",
    }))
    .into_response()
}

/// Answers 503 `busy` when `max_git_requests` repository requests are being handled already
/// (see `Limits::max_git_requests`); the permit is held until the response is ready.
async fn shed_git_requests(
    State(slots): State<Arc<Semaphore>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_slot) = slots.try_acquire() else {
        let body = serde_json::json!({"error": {"code": "busy",
            "message": "too many repository requests at once; retry shortly"}});
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(body),
        )
            .into_response();
    };
    next.run(request).await
}

/// Turns away clients that failed authentication too often before any router does work.
async fn refuse_rate_limited(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    // A WebSocket client that takes refusals in-band (a browser) hears it from the relay,
    // which checks the same limit (and counts it) when it authenticates.
    if let (Some(auth), Some(ip)) = (&state.auth, peer)
        && auth.is_rate_limited(ip)
        && !wants_in_band_refusal(request.headers())
    {
        if let Some(counters) = &state.auth_counters {
            counters.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        // In the error shape each protocol documents (PROTOCOL.md): the repository service's
        // `{"error": {"code", "message"}}`, the WebSocket refusals' `{"error": "..."}`.
        let message = "too many failed authentication attempts";
        let body = if request.uri().path().starts_with("/git") {
            serde_json::json!({"error": {"code": "rate_limited", "message": message}})
        } else {
            serde_json::json!({ "error": message })
        };
        return (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    }
    match peer {
        // Routers that authenticate without passing the client's address still get it counted.
        Some(ip) => with_client_ip(ip, next.run(request)).await,
        None => next.run(request).await,
    }
}

/// Counts of logs by kind.
struct LogCounts {
    rooms: usize,
    repos: usize,
}

fn log_counts(provider: &dyn StorageProvider) -> Result<LogCounts, ksync_core::StorageError> {
    let mut rooms = 0;
    let mut repos = BTreeSet::new();
    // Names only: opening every log (a file replay with FileProvider) would make a health
    // probe as expensive as a restart and keep every log in memory.
    for name in provider.list()? {
        match name {
            LogName::Room(_) => rooms += 1,
            LogName::Branch { repo, .. } => {
                repos.insert(repo);
            }
        }
    }
    Ok(LogCounts {
        rooms,
        repos: repos.len(),
    })
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let status = if state.stopping.load(Ordering::SeqCst) {
        "stopping"
    } else {
        "ok"
    };
    match log_counts(state.provider.as_ref()) {
        Ok(counts) => Json(serde_json::json!({
            "status": status,
            "version": env!("CARGO_PKG_VERSION"),
            "commit": crate::BUILD_COMMIT,
            "protocolVersion": ksync_core::PROTOCOL_VERSION,
            "uptimeSeconds": state.started.elapsed().as_secs(),
            "rooms": counts.rooms,
            "repos": counts.repos,
            "connections": state.relay.connections(),
        }))
        .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "error",
                "version": env!("CARGO_PKG_VERSION"),
                "commit": crate::BUILD_COMMIT,
                "error": error.to_string(),
            })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "ksync_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        state.started.elapsed().as_secs(),
    );
    metric(
        "ksync_http_requests_total",
        "counter",
        "HTTP requests received (WebSocket upgrades included).",
        state.http_requests.load(Ordering::Relaxed),
    );
    metric(
        "ksync_ws_connections",
        "gauge",
        "Open WebSocket connections.",
        state.relay.connections() as u64,
    );
    metric(
        "ksync_ws_client_cap_refusals_total",
        "counter",
        "WebSocket upgrades refused because the client had max_connections_per_client open.",
        state.relay.client_cap_refusals(),
    );
    if let Ok(counts) = log_counts(state.provider.as_ref()) {
        metric(
            "ksync_rooms",
            "gauge",
            "WebSocket rooms with a log.",
            counts.rooms as u64,
        );
        metric(
            "ksync_repos",
            "gauge",
            "Repositories with at least one branch.",
            counts.repos as u64,
        );
    }
    if let Some(counters) = &state.auth_counters {
        metric(
            "ksync_auth_accepted_total",
            "counter",
            "Credentials accepted.",
            counters.accepted.load(Ordering::Relaxed),
        );
        metric(
            "ksync_auth_refused_total",
            "counter",
            "Credentials refused.",
            counters.refused.load(Ordering::Relaxed),
        );
        metric(
            "ksync_auth_rate_limited_total",
            "counter",
            "Attempts refused after too many failures.",
            counters.rate_limited.load(Ordering::Relaxed),
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
