//! Server configuration: where to listen, where data lives, auth and limits.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ServerError;

/// Default listening address: loopback only, port 8080.
pub const DEFAULT_BIND: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// Default data directory (relative to the working directory).
pub const DEFAULT_DATA_DIR: &str = "./ksync-data";
/// Default maximum size of one WebSocket message: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// The maximum message sizes the relay takes: 1 KiB to 8 MiB (see
/// [`ksync_ws::protocol::MAX_MESSAGE_SIZE_RANGE`]).
pub use ksync_ws::protocol::MAX_MESSAGE_SIZE_RANGE;

/// Everything `ksync serve` can be told.
///
/// `#[non_exhaustive]`, as [`Limits`], [`AuthConfig`] and [`RateLimit`]: start from
/// `ServerConfig::default()` and set what you change (`config.in_memory = true;`,
/// `config.limits.max_connections = 5_000;`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to listen on (`127.0.0.1:8080`; port 0 picks a free port).
    pub bind: SocketAddr,
    /// Directory for the on-disk logs (`./ksync-data`).
    pub data_dir: PathBuf,
    /// Keep every log in memory instead of on disk (lost on exit).
    pub in_memory: bool,
    /// Who may connect. Empty (the default) lets everyone in.
    pub auth: AuthConfig,
    /// Limits on connections and messages.
    pub limits: Limits,
    /// Serve HTTPS and `wss://` with this certificate (none: plain HTTP and `ws://`).
    pub tls: Option<TlsConfig>,
}

/// The server's certificate chain and private key, as PEM files (e.g. from Let's Encrypt:
/// `fullchain.pem` and `privkey.pem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate, then its intermediates.
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: DEFAULT_BIND,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            in_memory: false,
            auth: AuthConfig::default(),
            limits: Limits::default(),
            tls: None,
        }
    }
}

/// Limits that protect the server from large or many clients.
///
/// `#[non_exhaustive]`: limits are added over time, so it is not built field by field outside
/// this crate; start from the defaults and set what you change.
///
/// ```
/// let mut limits = ksync_server::Limits::default();
/// limits.max_connections = 5_000;
/// let mut config = ksync_server::ServerConfig::default();
/// config.limits = limits;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest accepted WebSocket message (and frame), in bytes (1 MiB). Repository pushes
    /// have their own body limit (`ksync_git::server::GitServerConfig`, 16 MiB).
    pub max_message_bytes: usize,
    /// Most simultaneous WebSocket connections (10,000); more are refused.
    pub max_connections: usize,
    /// Most simultaneous WebSocket connections of one client (1,000; see `ksync_ws::server::
    /// RelayConfig::max_connections_per_client`): with auth, a client is an API key (by its
    /// configured name) or a JWT's `sub`, from one IP address; without auth, the peer's IP
    /// address. More are
    /// refused with 429 (in-band: `rate_limited`, close 4429).
    pub max_connections_per_client: usize,
    /// Most WebSocket rooms open at once (4,096; see `ksync_ws::server::RelayConfig::
    /// max_open_rooms`): each open room holds its log, a writer thread and up to 2 sync
    /// threads, with a file descriptor each. A connection to a room that is not open is
    /// refused with 503 past it; rooms close once their last connection leaves.
    pub max_open_rooms: usize,
    /// Bytes of frames waiting for WebSocket subscribers in all, relay-wide (1 GiB; see
    /// `ksync_ws::server::RelayConfig::subscriber_queues_total_bytes`): the subscriber whose
    /// frames would pass it is closed with 4008 and resumes from its cursor. At least twice
    /// `max_message_bytes`: one largest frame would fill a smaller budget on its own.
    pub subscriber_queues_total_bytes: usize,
    /// Bytes of publishes queued per WebSocket room for its log (64 MiB, at most
    /// `u32::MAX`; see `ksync_ws::server::RelayConfig::room_queue_bytes`): past it the room's
    /// publishers wait (their connections stop reading); nothing is refused.
    pub room_queue_bytes: usize,
    /// Bytes of publishes queued in all WebSocket rooms together, relay-wide (1 GiB; see
    /// `ksync_ws::server::RelayConfig::room_queues_total_bytes`): past it publishers wait. At
    /// least `room_queue_bytes`: a room stuck on its disk holds at most `room_queue_bytes` of
    /// it, so that the others' publishes go on; with less, one such room (or one whose disk
    /// is just slower than its writers) would hold all of it and every room would wait.
    pub room_queues_total_bytes: usize,
    /// Interval between server pings on WebSockets (30 s); a client nothing came from since
    /// the last ping (a pong, a message, or any byte of one) is closed with 4009.
    pub heartbeat: Duration,
    /// How long shutdown waits for the relay's drain and open connections, in all, before
    /// flushing anyway (10 s; 0 to a day).
    pub shutdown_timeout: Duration,
    /// Most repository requests (`/git/...`) handled at once (256). Each may hold a body of up
    /// to the push limit in memory; more are answered at once with 503 `busy` and
    /// `Retry-After: 1` (load shedding: nothing waits in an unbounded queue).
    pub max_git_requests: usize,
    /// Longest wait for the next piece of a request body (30 s); a client that stops sending
    /// mid-body gets 408 and its request's memory is freed. The whole body may take longer.
    pub request_body_timeout: Duration,
    /// Slowest average a request body may arrive at once its grace is spent, in bytes a
    /// second (500; 0: no such rule; Apache's `mod_reqtimeout` `MinRate`): a body must have
    /// come in `request_body_timeout` plus one second for each `request_body_min_rate` bytes
    /// received, or it gets 408 and its request's slot and memory are freed. Without it, a
    /// client sending one byte a little more often than `request_body_timeout` held a
    /// repository request slot (and a push place) as long as it cared to.
    pub request_body_min_rate: u64,
    /// Longest wait for a request's headers (30 s), from the connection's start or from the
    /// end of its previous response: a client that sends them too slowly, or leaves a
    /// keep-alive connection idle that long, is disconnected. WebSockets are not affected
    /// once upgraded (the heartbeat watches them).
    pub request_header_timeout: Duration,
    /// Most plain HTTP connections open at once (1,024), idle keep-alive ones included;
    /// WebSockets count against `max_connections` instead once upgraded. Past it the server
    /// stops accepting until one closes: new clients wait in the listen backlog (nothing is
    /// refused, no file descriptor is spent on them).
    pub max_http_connections: usize,
    /// Most plain HTTP connections of one IP address (IPv6: one /64) waiting for a request
    /// head at once (64; 0: no such cap): just opened, or idle between two requests on a keep-alive
    /// connection. Past it the one of that address that has waited longest is closed (while
    /// a connection slot is free it is given a second from the start of its wait, so a head
    /// already on its way is read; with no slot free it is closed at once). Without it one
    /// address could hold every `max_http_connections` slot by opening ~34 connections a
    /// second and sending nothing (each held to `request_header_timeout`): every other
    /// client waited. A connection counts from its accept until its request head is read,
    /// and again from when its response's body has been handed over in whole (the end may
    /// still be being written; a response sent before the request's body was read, such as
    /// a 429, counts while that body still arrives), so a reverse proxy (all its clients
    /// from one address) is not limited by it unless it keeps more idle keep-alive
    /// connections open to the server than this: set it at least that high then (or 0).
    /// With TLS it also caps one address's handshakes in flight (past it a new connection is
    /// closed at once).
    pub max_pending_connections_per_ip: usize,
    /// Longest a response may go without a byte of it taken by the client (30 s; nginx's
    /// `send_timeout`): the connection is closed then, freeing the response's memory (a pull
    /// page is up to 8 MiB) and its connection slot. Before, a client that stopped reading
    /// held both for good. A slow reader that keeps reading is never cut off; WebSockets are
    /// not affected once upgraded (the relay has its own write timeout).
    pub response_write_timeout: Duration,
    /// Memory the bodies of repository requests in flight may take, decoded (256 MiB; see
    /// `ksync_git::server::GitServerConfig::body_memory_bytes`): past it, 503 `busy`.
    pub git_body_memory_bytes: usize,
    /// Most branches one repository may have, `main` included (1,000; see
    /// `ksync_git::server::GitServerConfig::max_branches_per_repo`): past it, 409.
    pub max_branches_per_repo: usize,
    /// Most pushes of one client handled at once (64; see `ksync_git::server::
    /// GitServerConfig::max_pushes_per_client`): a client as for
    /// `max_connections_per_client`. More get 429 `too_many_pushes` with `Retry-After: 1`.
    pub max_pushes_per_client: usize,
    /// Most merges and branch creations of one client handled at once, together (16; see
    /// `ksync_git::server::GitServerConfig::max_merges_per_client`): a client as for
    /// `max_connections_per_client`. More get 429 `too_many_merges` with `Retry-After: 1`.
    pub max_merges_per_client: usize,
    /// Most rooms kept in the data directory (100,000; see `ksync_storage_file::StoreLimits`):
    /// each is a file, kept until deleted by hand. Past it a new room gets 507 `too many rooms
    /// stored` before the upgrade; stored rooms go on. Not applied with `in_memory` storage.
    pub max_rooms: usize,
    /// Most repositories kept in the data directory (10,000): each is a directory of up to
    /// `max_branches_per_repo` branch files. Past it creating one gets 507 `too_many_repos`.
    /// Not applied with `in_memory` storage.
    pub max_repos: usize,
}

impl Limits {
    /// Refuses limits the HTTP layer cannot run with: request timeouts past
    /// [`ksync_core::MAX_CONFIG_DURATION`] (hyper adds the header timeout to an `Instant`,
    /// and past that it overflowed in every connection's task: the server answered nothing).
    /// The relay checks its own (the heartbeat).
    pub(crate) fn check(&self) -> Result<(), ServerError> {
        for (field, value) in [
            ("request_header_timeout", self.request_header_timeout),
            ("request_body_timeout", self.request_body_timeout),
            ("response_write_timeout", self.response_write_timeout),
        ] {
            ksync_core::check_config_duration(field, value).map_err(ServerError::Config)?;
        }
        for (field, value) in [("max_rooms", self.max_rooms), ("max_repos", self.max_repos)] {
            if value == 0 {
                return Err(ServerError::Config(format!("{field} must be at least 1")));
            }
        }
        // The relay's rule (`RelayConfig::subscriber_queues_total_bytes`), said in the names
        // of these limits (and of their flags).
        if self.subscriber_queues_total_bytes < self.max_message_bytes.saturating_mul(2) {
            return Err(ServerError::Config(format!(
                "subscriber_queues_total_bytes ({}) must be at least twice max_message_bytes \
                 ({}): one largest frame would fill it",
                self.subscriber_queues_total_bytes, self.max_message_bytes
            )));
        }
        if self.room_queue_bytes == 0 || u32::try_from(self.room_queue_bytes).is_err() {
            return Err(ServerError::Config(format!(
                "room_queue_bytes ({}) must be from 1 to {} bytes",
                self.room_queue_bytes,
                u32::MAX
            )));
        }
        if self.room_queues_total_bytes < self.room_queue_bytes {
            return Err(ServerError::Config(format!(
                "room_queues_total_bytes ({}) must be at least room_queue_bytes ({}): one room \
                 stuck on its disk would hold all of it, and publishes to every room would wait",
                self.room_queues_total_bytes, self.room_queue_bytes
            )));
        }
        // 0 is allowed (do not wait); the bound keeps the shutdown's deadline representable.
        if self.shutdown_timeout > ksync_core::MAX_CONFIG_DURATION {
            return Err(ServerError::Config(format!(
                "shutdown_timeout must be at most {} s",
                ksync_core::MAX_CONFIG_DURATION.as_secs()
            )));
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_connections: 10_000,
            max_connections_per_client: ksync_ws::server::RelayConfig::default()
                .max_connections_per_client,
            max_open_rooms: ksync_ws::server::RelayConfig::default().max_open_rooms,
            subscriber_queues_total_bytes: ksync_ws::server::RelayConfig::default()
                .subscriber_queues_total_bytes,
            room_queue_bytes: ksync_ws::server::RelayConfig::default().room_queue_bytes,
            room_queues_total_bytes: ksync_ws::server::RelayConfig::default()
                .room_queues_total_bytes,
            heartbeat: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            max_git_requests: 256,
            request_body_timeout: Duration::from_secs(30),
            request_body_min_rate: 500,
            request_header_timeout: Duration::from_secs(30),
            max_http_connections: 1024,
            max_pending_connections_per_ip: 64,
            response_write_timeout: Duration::from_secs(30),
            git_body_memory_bytes: ksync_git::server::GitServerConfig::default().body_memory_bytes,
            max_branches_per_repo: ksync_git::server::GitServerConfig::default()
                .max_branches_per_repo,
            max_pushes_per_client: ksync_git::server::GitServerConfig::default()
                .max_pushes_per_client,
            max_merges_per_client: ksync_git::server::GitServerConfig::default()
                .max_merges_per_client,
            max_rooms: ksync_storage_file::DEFAULT_MAX_ROOMS,
            max_repos: ksync_storage_file::DEFAULT_MAX_REPOS,
        }
    }
}

/// A secret (HMAC key, API key). `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// Reads a secret from a file, dropping one trailing newline (`echo secret > file`).
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let mut bytes = std::fs::read(path).map_err(|source| ServerError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Ok(Self(bytes))
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.as_bytes().to_vec())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s.into_bytes())
    }
}

/// The material of one JWT verification key. The algorithm belongs to the key: a token is only
/// ever checked with the algorithm of a configured key, whatever its header claims.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtKeyMaterial {
    /// HMAC-SHA256 with a shared secret (at least 32 bytes).
    Hs256(Secret),
    /// RSASSA-PKCS1-v1_5 SHA-256 with an RSA public key (PEM: `PUBLIC KEY` or `RSA PUBLIC KEY`).
    Rs256PublicPem(Vec<u8>),
    /// Ed25519 with a public key (PEM: `PUBLIC KEY`).
    EdDsaPublicPem(Vec<u8>),
}

/// One JWT verification key, optionally named by a key id (`kid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// Key id: when set, only tokens whose header names this `kid` are checked with it.
    pub kid: Option<String>,
    /// The key.
    pub material: JwtKeyMaterial,
}

impl JwtKey {
    /// An HS256 key.
    pub fn hs256(secret: impl Into<Secret>) -> Self {
        Self {
            kid: None,
            material: JwtKeyMaterial::Hs256(secret.into()),
        }
    }

    /// An RS256 key from a PEM public key.
    pub fn rs256_pem(pem: impl Into<Vec<u8>>) -> Self {
        Self {
            kid: None,
            material: JwtKeyMaterial::Rs256PublicPem(pem.into()),
        }
    }

    /// An EdDSA (Ed25519) key from a PEM public key.
    pub fn eddsa_pem(pem: impl Into<Vec<u8>>) -> Self {
        Self {
            kid: None,
            material: JwtKeyMaterial::EdDsaPublicPem(pem.into()),
        }
    }

    /// An RS256 key read from a PEM file, checked as it is read: an error names the file.
    pub fn rs256_pem_file(path: &Path) -> Result<Self, ServerError> {
        Self::rs256_pem(read(path)?).checked(path)
    }

    /// An EdDSA key read from a PEM file, checked as it is read: an error names the file.
    pub fn eddsa_pem_file(path: &Path) -> Result<Self, ServerError> {
        Self::eddsa_pem(read(path)?).checked(path)
    }

    /// This key if it is usable; otherwise an error naming the kind of key and `path`.
    fn checked(self, path: &Path) -> Result<Self, ServerError> {
        match crate::auth::decoding_key(&self.material) {
            Ok(_) => Ok(self),
            Err((kind, reason)) => Err(ServerError::InvalidKey {
                name: format!("{kind} {}", path.display()),
                reason,
            }),
        }
    }

    /// Names this key with a `kid`.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|source| ServerError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// Read and/or write rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// May receive / pull.
    pub read: bool,
    /// May send / push.
    pub write: bool,
}

impl Scope {
    /// Both rights.
    pub const READ_WRITE: Scope = Scope {
        read: true,
        write: true,
    };
    /// Read only.
    pub const READ: Scope = Scope {
        read: true,
        write: false,
    };
    /// Write only.
    pub const WRITE: Scope = Scope {
        read: false,
        write: true,
    };

    /// Parses a scope string: the words `read` and `write` separated by spaces, commas or `+`
    /// (`"read"`, `"write"`, `"read write"`). Other words are ignored (OAuth scopes often carry
    /// more); a string with neither word grants nothing.
    pub fn parse(s: &str) -> Self {
        let mut scope = Scope {
            read: false,
            write: false,
        };
        for word in scope_words(s) {
            match word {
                "read" => scope.read = true,
                "write" => scope.write = true,
                _ => {}
            }
        }
        scope
    }
}

/// One API key: a name (safe to log) and the key (never logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The key's name: the subject of its grant, the only thing logs show.
    pub name: String,
    /// The key.
    pub key: Secret,
    /// What it may do.
    pub scope: Scope,
    /// Rooms it may use (`None` = all).
    pub rooms: Option<Vec<String>>,
    /// Repositories it may use (`None` = all).
    pub repos: Option<Vec<String>>,
}

impl ApiKey {
    /// A key with full rights.
    pub fn new(name: impl Into<String>, key: impl Into<Secret>) -> Self {
        Self {
            name: name.into(),
            key: key.into(),
            scope: Scope::READ_WRITE,
            rooms: None,
            repos: None,
        }
    }

    /// Limits the key's rights.
    pub fn with_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// Limits the key to some rooms.
    pub fn with_rooms(mut self, rooms: Vec<String>) -> Self {
        self.rooms = Some(rooms);
        self
    }

    /// Limits the key to some repositories.
    pub fn with_repos(mut self, repos: Vec<String>) -> Self {
        self.repos = Some(repos);
        self
    }

    /// Parses `NAME=KEY` (read and write) or `NAME:SCOPE=KEY`, SCOPE being `read`, `write` or
    /// `read+write` (e.g. `reader:read=k3y`); any other scope word is an error, not ignored.
    /// The error never contains the key.
    pub fn parse_spec(spec: &str) -> Result<Self, ServerError> {
        let (head, key) = spec.split_once('=').ok_or_else(|| {
            ServerError::Config("API key must be given as NAME=KEY or NAME:SCOPE=KEY".into())
        })?;
        let (name, scope) = head.split_once(':').unwrap_or((head, ""));
        let name = name.trim();
        if name.is_empty() {
            return Err(ServerError::Config("API key name is empty".into()));
        }
        let scope = if head.contains(':') {
            api_key_scope(name, scope)?
        } else {
            Scope::READ_WRITE
        };
        if key.is_empty() {
            return Err(ServerError::Config(format!("API key {name:?} is empty")));
        }
        Ok(Self::new(name, key).with_scope(scope))
    }

    /// Reads keys from a file: one `NAME=KEY` / `NAME:SCOPE=KEY` a line; blank lines and lines
    /// starting with `#` are skipped. An error names the file and the line (never the key).
    pub fn parse_file(path: &Path) -> Result<Vec<Self>, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServerError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        text.lines()
            .enumerate()
            .map(|(index, line)| (index + 1, line.trim()))
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
            .map(|(number, line)| {
                Self::parse_spec(line).map_err(|error| match error {
                    ServerError::Config(message) => {
                        ServerError::Config(format!("{} line {number}: {message}", path.display()))
                    }
                    other => other,
                })
            })
            .collect()
    }
}

/// The words of a scope string, separated by spaces, commas or `+`.
fn scope_words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c.is_whitespace() || c == ',' || c == '+')
        .filter(|word| !word.is_empty())
}

/// An API key's SCOPE: `read`, `write` or both (separated by `+`, `,` or spaces). Strict,
/// unlike [`Scope::parse`] for tokens' claims: an operator's typo (`rw`, `raed`) would start
/// the server with a key that grants less than meant, so it is refused instead.
fn api_key_scope(name: &str, text: &str) -> Result<Scope, ServerError> {
    let mut words = scope_words(text).peekable();
    if words.peek().is_none() {
        return Err(ServerError::Config(format!(
            "API key {name:?}: empty scope (use read, write or read+write)"
        )));
    }
    let mut scope = Scope {
        read: false,
        write: false,
    };
    for word in words {
        match word {
            "read" => scope.read = true,
            "write" => scope.write = true,
            other => {
                return Err(ServerError::Config(format!(
                    "API key {name:?}: unknown scope {other:?} (use read, write or read+write)"
                )));
            }
        }
    }
    Ok(scope)
}

/// Failed-authentication throttling per client.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimit {
    /// Failures allowed within `window` before the client is refused (10). 0 means no
    /// limit: failures are not counted and nobody is refused for them.
    pub max_failures: u32,
    /// The window, counted from a client's first failure in it (60 s). A client that reached
    /// `max_failures` is refused until its window ends.
    pub window: Duration,
    /// Most clients tracked at once (10,000); when full, the client whose window started
    /// earliest is forgotten.
    pub max_clients: usize,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            max_failures: 10,
            window: Duration::from_secs(60),
            max_clients: 10_000,
        }
    }
}

/// Who may connect. With no JWT key and no API key, auth is off and everyone gets full rights;
/// with any, every request needs valid credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthConfig {
    /// Keys that verify JWTs.
    pub jwt_keys: Vec<JwtKey>,
    /// Accepted `aud` values; when non-empty, tokens must carry one of them.
    pub audience: Vec<String>,
    /// Accepted `iss` values; when non-empty, tokens must carry one of them.
    pub issuer: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf` (5 s; at most `MAX_JWT_LEEWAY`, a day).
    pub leeway: Duration,
    /// API keys.
    pub api_keys: Vec<ApiKey>,
    /// Throttling of failed attempts.
    pub rate_limit: RateLimit,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_keys: Vec::new(),
            audience: Vec::new(),
            issuer: Vec::new(),
            leeway: Duration::from_secs(5),
            api_keys: Vec::new(),
            rate_limit: RateLimit::default(),
        }
    }
}

impl AuthConfig {
    /// Whether any credential is configured (and so required).
    pub fn is_enabled(&self) -> bool {
        !self.jwt_keys.is_empty() || !self.api_keys.is_empty()
    }
}
