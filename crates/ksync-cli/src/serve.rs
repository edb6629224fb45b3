//! `ksync serve`: run the server until SIGINT/SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use ksync_server::{
    ApiKey, AuthConfig, DEFAULT_MAX_MESSAGE_BYTES, JwtKey, Limits, MAX_JWT_LEEWAY,
    MAX_MESSAGE_SIZE_RANGE, RateLimit, ReloadSignal, Secret, Server, ServerConfig, ServerError,
    ShutdownSignal, TlsConfig,
};

/// Options of `ksync serve`. Every option can also come from its `KSYNC_*` environment
/// variable; prefer the environment or files for secrets, which command lines show to `ps`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on, IP:PORT (0.0.0.0 or [::] for every interface; port 0 picks a
    /// free one; the real address is printed).
    #[arg(long, env = "KSYNC_BIND", value_name = "IP:PORT", default_value = "127.0.0.1:8080",
        value_parser = parse_bind)]
    bind: SocketAddr,

    /// Directory for the on-disk logs (created if missing; one server per directory).
    #[arg(long, env = "KSYNC_DATA_DIR", value_name = "DIR", default_value = ksync_server::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,

    /// Keep logs in memory only (lost on exit). KSYNC_IN_MEMORY takes true/false, 1/0,
    /// yes/no or on/off.
    #[arg(long, env = "KSYNC_IN_MEMORY", value_parser = clap::builder::BoolishValueParser::new())]
    in_memory: bool,

    /// HS256 secret for JWTs (at least 32 bytes). Visible in `ps` when given here: prefer
    /// KSYNC_JWT_SECRET or --jwt-hs256-secret-file.
    #[arg(
        long,
        env = "KSYNC_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    jwt_secret: Option<String>,

    /// File holding the HS256 secret for JWTs (one trailing newline is ignored).
    #[arg(long, env = "KSYNC_JWT_SECRET_FILE", value_name = "FILE")]
    jwt_hs256_secret_file: Option<PathBuf>,

    /// PEM file with an RSA public key: accept RS256 JWTs signed by its private key.
    #[arg(long, env = "KSYNC_JWT_RS256_PUBLIC_KEY", value_name = "PEM")]
    jwt_rs256_public_key: Option<PathBuf>,

    /// PEM file with an Ed25519 public key: accept EdDSA JWTs signed by its private key.
    #[arg(long, env = "KSYNC_JWT_EDDSA_PUBLIC_KEY", value_name = "PEM")]
    jwt_eddsa_public_key: Option<PathBuf>,

    /// Accepted JWT audience (`aud`); repeat or comma-separate for several. Tokens must carry
    /// one. Needs a JWT key (--jwt-secret, --jwt-hs256-secret-file or a --jwt-*-public-key).
    #[arg(
        long,
        env = "KSYNC_JWT_AUDIENCE",
        value_name = "AUD",
        value_delimiter = ','
    )]
    jwt_audience: Vec<String>,

    /// Accepted JWT issuer (`iss`); repeat or comma-separate for several. Tokens must carry
    /// one. Needs a JWT key.
    #[arg(
        long,
        env = "KSYNC_JWT_ISSUER",
        value_name = "ISS",
        value_delimiter = ','
    )]
    jwt_issuer: Vec<String>,

    /// Clock skew tolerated on JWT `exp`/`nbf`, in seconds (at most 86400, a day; 5 when not
    /// given). Needs a JWT key.
    // An Option, not a default value: given without a JWT key, it is refused (see `jwt_only`).
    #[arg(long, env = "KSYNC_JWT_LEEWAY_SECS", value_name = "SECS",
        allow_negative_numbers = true, value_parser = parse_leeway_secs)]
    jwt_leeway_secs: Option<u64>,

    /// API key as NAME=KEY or NAME:SCOPE=KEY (SCOPE: read, write or read+write); repeat for
    /// several. Visible in `ps` when given here: prefer KSYNC_API_KEYS (comma-separated) or
    /// --api-keys-file.
    #[arg(
        long = "api-key",
        env = "KSYNC_API_KEYS",
        value_name = "NAME[:SCOPE]=KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,

    /// File of API keys, one NAME=KEY or NAME:SCOPE=KEY a line (`#` comments); a file with
    /// no key is an error, not a server without auth.
    #[arg(long, env = "KSYNC_API_KEYS_FILE", value_name = "FILE")]
    api_keys_file: Option<PathBuf>,

    /// Failed authentications per client within a minute before it is refused (for the rest
    /// of that minute, with 429). 0 means no limit.
    #[arg(long, env = "KSYNC_AUTH_MAX_FAILURES", value_name = "N",
        default_value_t = RateLimit::default().max_failures,
        allow_negative_numbers = true, value_parser = at_least::<u32, 0>)]
    auth_max_failures: u32,

    /// Largest accepted WebSocket message, in bytes (1024 to 8388608, 8 MiB).
    #[arg(long, env = "KSYNC_MAX_MESSAGE_BYTES", value_name = "BYTES",
        default_value_t = DEFAULT_MAX_MESSAGE_BYTES,
        allow_negative_numbers = true, value_parser = parse_max_message_bytes)]
    max_message_bytes: usize,

    /// Most simultaneous WebSocket connections; more are refused.
    #[arg(long, env = "KSYNC_MAX_CONNECTIONS", value_name = "N",
        default_value_t = Limits::default().max_connections,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_connections: usize,

    /// Most simultaneous WebSocket connections of one client (an API key or a JWT's `sub`
    /// from one IP address, or without auth an IP address); more get 429.
    #[arg(long, env = "KSYNC_MAX_CONNECTIONS_PER_CLIENT", value_name = "N",
        default_value_t = Limits::default().max_connections_per_client,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_connections_per_client: usize,

    /// Most WebSocket rooms open at once (each holds its log: up to 3 threads and 3 file
    /// descriptors); a connection to a room that is not open gets 503 past it.
    #[arg(long, env = "KSYNC_MAX_OPEN_ROOMS", value_name = "N",
        default_value_t = Limits::default().max_open_rooms,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_open_rooms: usize,

    /// Bytes of frames waiting for WebSocket subscribers in all (a frame a room sends to many
    /// counts once); the subscriber whose frames would pass it is closed with 4008 and resumes
    /// from its cursor. At least twice --max-message-bytes.
    #[arg(long, env = "KSYNC_SUBSCRIBER_QUEUES_TOTAL_BYTES", value_name = "BYTES",
        default_value_t = Limits::default().subscriber_queues_total_bytes,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    subscriber_queues_total_bytes: usize,

    /// Bytes of publishes queued for one WebSocket room's log (1 to 4294967295, 4 GiB); past
    /// it the room's publishers wait (their connections stop reading), nothing is refused.
    #[arg(long, env = "KSYNC_ROOM_QUEUE_BYTES", value_name = "BYTES",
        default_value_t = Limits::default().room_queue_bytes,
        allow_negative_numbers = true, value_parser = parse_room_queue_bytes)]
    room_queue_bytes: usize,

    /// Bytes of publishes queued in all WebSocket rooms together; past it publishers wait. At
    /// least --room-queue-bytes: a room stuck on its disk holds at most that much of it.
    #[arg(long, env = "KSYNC_ROOM_QUEUES_TOTAL_BYTES", value_name = "BYTES",
        default_value_t = Limits::default().room_queues_total_bytes,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    room_queues_total_bytes: usize,

    /// Most repository (`/git/...`) requests handled at once; more get 503 `busy` at once.
    #[arg(long, env = "KSYNC_MAX_GIT_REQUESTS", value_name = "N",
        default_value_t = Limits::default().max_git_requests,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_git_requests: usize,

    /// Memory, in bytes, the bodies of the repository requests in flight may take once
    /// decoded; a body that does not fit now gets 503 `busy`, one that never could 413.
    #[arg(long, env = "KSYNC_GIT_BODY_MEMORY_BYTES", value_name = "BYTES",
        default_value_t = Limits::default().git_body_memory_bytes,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1024>)]
    git_body_memory_bytes: usize,

    /// Most branches one repository may have, `main` included; one more gets 409.
    #[arg(long, env = "KSYNC_MAX_BRANCHES_PER_REPO", value_name = "N",
        default_value_t = Limits::default().max_branches_per_repo,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_branches_per_repo: usize,

    /// Most repository pushes of one client (an API key, a JWT's `sub`, or without auth an
    /// IP address) handled at once; more get 429 `too_many_pushes` (retried after 1 s).
    #[arg(long, env = "KSYNC_MAX_PUSHES_PER_CLIENT", value_name = "N",
        default_value_t = Limits::default().max_pushes_per_client,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_pushes_per_client: usize,

    /// Most repository merges and branch creations of one client (as for
    /// --max-pushes-per-client) handled at once, together; more get 429 `too_many_merges`
    /// (retried after 1 s).
    #[arg(long, env = "KSYNC_MAX_MERGES_PER_CLIENT", value_name = "N",
        default_value_t = Limits::default().max_merges_per_client,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_merges_per_client: usize,

    /// Most rooms kept in the data directory (each a file, kept until deleted by hand); a
    /// new room past it gets 507 `too many rooms stored`. Stored rooms go on.
    #[arg(long, env = "KSYNC_MAX_ROOMS", value_name = "N",
        default_value_t = Limits::default().max_rooms,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_rooms: usize,

    /// Most repositories kept in the data directory (each a directory of branch files); a
    /// new repository past it gets 507 `too_many_repos`. Stored repositories go on.
    #[arg(long, env = "KSYNC_MAX_REPOS", value_name = "N",
        default_value_t = Limits::default().max_repos,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_repos: usize,

    /// Longest wait, in seconds, for the next piece of a request body before 408.
    #[arg(long, env = "KSYNC_REQUEST_BODY_TIMEOUT_SECS", value_name = "SECS", default_value_t = 30,
        allow_negative_numbers = true, value_parser = secs::<1>)]
    request_body_timeout_secs: u64,

    /// Slowest average, in bytes a second, a request body may keep once
    /// --request-body-timeout-secs of grace are spent (the body must have come in that plus a
    /// second per N bytes received) before 408; 0 turns the rule off.
    #[arg(long, env = "KSYNC_REQUEST_BODY_MIN_RATE", value_name = "BYTES_PER_SEC",
        default_value_t = Limits::default().request_body_min_rate,
        allow_negative_numbers = true, value_parser = at_least::<u64, 0>)]
    request_body_min_rate: u64,

    /// Longest wait, in seconds, for a request's headers (from connecting, or from the
    /// previous response on a keep-alive connection) before the connection is closed.
    #[arg(long, env = "KSYNC_REQUEST_HEADER_TIMEOUT_SECS", value_name = "SECS",
        default_value_t = Limits::default().request_header_timeout.as_secs(),
        allow_negative_numbers = true, value_parser = secs::<1>)]
    request_header_timeout_secs: u64,

    /// Most plain HTTP connections open at once (WebSockets count against
    /// --max-connections); past it new clients wait until one closes.
    #[arg(long, env = "KSYNC_MAX_HTTP_CONNECTIONS", value_name = "N",
        default_value_t = Limits::default().max_http_connections,
        allow_negative_numbers = true, value_parser = at_least::<usize, 1>)]
    max_http_connections: usize,

    /// Most HTTP connections of one IP address (IPv6: one /64) waiting for a request (just
    /// opened, or idle between requests) at once; past it the one that has waited longest is
    /// closed; with TLS, also its handshakes in flight. Behind a reverse proxy, at least the
    /// idle keep-alive connections it keeps to the server; 0 turns the cap off.
    #[arg(long, env = "KSYNC_MAX_PENDING_CONNECTIONS_PER_IP", value_name = "N",
        default_value_t = Limits::default().max_pending_connections_per_ip,
        allow_negative_numbers = true, value_parser = at_least::<usize, 0>)]
    max_pending_connections_per_ip: usize,

    /// Longest wait, in seconds, for a client to take any byte of a response being sent
    /// before the connection is closed (a client that keeps reading, however slowly, is let
    /// finish; WebSockets are not affected once upgraded).
    #[arg(long, env = "KSYNC_RESPONSE_WRITE_TIMEOUT_SECS", value_name = "SECS",
        default_value_t = Limits::default().response_write_timeout.as_secs(),
        allow_negative_numbers = true, value_parser = secs::<1>)]
    response_write_timeout_secs: u64,

    /// Seconds between heartbeats (pings) on idle WebSockets.
    #[arg(long, env = "KSYNC_HEARTBEAT_SECS", value_name = "SECS", default_value_t = 30,
        allow_negative_numbers = true, value_parser = secs::<1>)]
    heartbeat_secs: u64,

    /// PEM certificate chain: serve HTTPS and wss:// (needs --tls-key). SIGHUP reads both
    /// files again (after a renewal) without dropping connections.
    #[arg(long, env = "KSYNC_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "KSYNC_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Seconds shutdown waits, in all, for the rooms to drain and connections to close before
    /// flushing anyway (at most 86400, a day; 0: does not wait; WebSockets may then be dropped before their 1001, and their clients reconnect as
    /// after a lost connection); then at most as long again (at least 1 s) for the flush (a
    /// disk whose syncs hang: exit code 1, saying so). A second SIGINT/SIGTERM meanwhile stops
    /// at once (exit code 130).
    #[arg(long, env = "KSYNC_SHUTDOWN_TIMEOUT_SECS", value_name = "SECS", default_value_t = 10,
        allow_negative_numbers = true, value_parser = secs::<0>)]
    shutdown_timeout_secs: u64,
}

/// `--bind`: an IP address and a port. Host names are not resolved (`localhost` may mean
/// 127.0.0.1, ::1 or both), so the error says what to write instead.
fn parse_bind(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        "expected IP:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::]:8080 (host names are not resolved)"
            .to_owned()
    })
}

/// A whole number of at least `MIN` that fits `T`, for the limit flags: `-1`, `abc` and `0`
/// (where 0 is meaningless) are usage errors naming the flag, not start-up failures.
fn at_least<T: TryFrom<u64>, const MIN: u64>(text: &str) -> Result<T, String> {
    let number: u64 = match text.trim().parse() {
        Ok(number) if number >= MIN => number,
        _ if MIN == 0 => return Err("expected a whole number (0 or more)".to_owned()),
        _ => return Err(format!("expected a whole number of at least {MIN}")),
    };
    T::try_from(number).map_err(|_| format!("{number} is too large"))
}

/// A timer flag in seconds: `MIN` to a day ([`ksync_core::MAX_CONFIG_DURATION`], what the
/// server's limits take), so a value past it is a usage error naming the flag rather than a
/// start-up failure naming an internal field.
fn secs<const MIN: u64>(text: &str) -> Result<u64, String> {
    let max = ksync_core::MAX_CONFIG_DURATION.as_secs();
    match text.trim().parse() {
        Ok(secs) if (MIN..=max).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "expected a whole number of seconds from {MIN} to {max}"
        )),
    }
}

/// `--max-message-bytes`: within `MAX_MESSAGE_SIZE_RANGE` (1 KiB to 8 MiB).
fn parse_max_message_bytes(text: &str) -> Result<usize, String> {
    match text.trim().parse() {
        Ok(bytes) if MAX_MESSAGE_SIZE_RANGE.contains(&bytes) => Ok(bytes),
        _ => Err(format!(
            "expected a whole number of bytes from {} to {} (8 MiB)",
            MAX_MESSAGE_SIZE_RANGE.start(),
            MAX_MESSAGE_SIZE_RANGE.end()
        )),
    }
}

/// `--room-queue-bytes`: 1 to `u32::MAX` (the relay counts a room's budget in `u32`).
fn parse_room_queue_bytes(text: &str) -> Result<usize, String> {
    match text.trim().parse::<u32>() {
        Ok(bytes) if bytes >= 1 => {
            usize::try_from(bytes).map_err(|_| format!("{bytes} is too large"))
        }
        _ => Err(format!(
            "expected a whole number of bytes from 1 to {} (4 GiB)",
            u32::MAX
        )),
    }
}

/// `--jwt-leeway-secs`: 0 to a day (`MAX_JWT_LEEWAY`).
fn parse_leeway_secs(text: &str) -> Result<u64, String> {
    let max = MAX_JWT_LEEWAY.as_secs();
    match text.trim().parse() {
        Ok(secs) if secs <= max => Ok(secs),
        _ => Err(format!(
            "expected a whole number of seconds from 0 to {max} (a day)"
        )),
    }
}

/// Whether `flag` was given on the command line (as opposed to the environment).
fn given_on_command_line(flag: &str) -> bool {
    let with_value = format!("{flag}=");
    std::env::args().any(|arg| arg == flag || arg.starts_with(&with_value))
}

/// `values` without blank entries: an empty list variable (`KSYNC_JWT_AUDIENCE=`, as a compose
/// file's `${X:-}` gives it) or a stray comma means no entry, not one empty audience (which
/// refused every token) or API key (which refused to start).
fn non_blank(values: Vec<String>) -> Vec<String> {
    values
        .into_iter()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

impl ServeArgs {
    /// The first option given that only shapes how JWTs are checked: without a JWT key no
    /// token is checked, so such an option would be ignored while the operator believes
    /// tokens are checked for it. `into_config` makes it a usage error (exit 2). Checked here,
    /// not with clap's `requires`: clap counts an empty `KSYNC_JWT_AUDIENCE=` (a compose
    /// file's `${X:-}`) as given, where it means no audience (`non_blank`).
    fn jwt_only(
        audience: &[String],
        issuer: &[String],
        leeway: Option<u64>,
    ) -> Option<&'static str> {
        if !audience.is_empty() {
            Some("--jwt-audience (KSYNC_JWT_AUDIENCE)")
        } else if !issuer.is_empty() {
            Some("--jwt-issuer (KSYNC_JWT_ISSUER)")
        } else if leeway.is_some() {
            Some("--jwt-leeway-secs (KSYNC_JWT_LEEWAY_SECS)")
        } else {
            None
        }
    }

    fn into_config(self) -> anyhow::Result<ServerConfig> {
        let api_keys = non_blank(self.api_keys);
        let audience = non_blank(self.jwt_audience);
        let issuer = non_blank(self.jwt_issuer);
        let has_jwt_key = self.jwt_secret.is_some()
            || self.jwt_hs256_secret_file.is_some()
            || self.jwt_rs256_public_key.is_some()
            || self.jwt_eddsa_public_key.is_some();
        if !has_jwt_key && let Some(flag) = Self::jwt_only(&audience, &issuer, self.jwt_leeway_secs)
        {
            return Err(crate::git::Usage(format!(
                "{flag} needs a JWT key to check tokens with: give --jwt-secret (KSYNC_JWT_SECRET), --jwt-hs256-secret-file, --jwt-rs256-public-key or --jwt-eddsa-public-key"
            ))
            .into());
        }
        // The relay's rule (`RelayConfig::subscriber_queues_total_bytes`), said in flags.
        let least = self.max_message_bytes.saturating_mul(2);
        if self.subscriber_queues_total_bytes < least {
            return Err(crate::git::Usage(format!(
                "--subscriber-queues-total-bytes (KSYNC_SUBSCRIBER_QUEUES_TOTAL_BYTES) is {}: it must be at least twice --max-message-bytes ({}), {least}: one largest frame would fill it",
                self.subscriber_queues_total_bytes, self.max_message_bytes
            ))
            .into());
        }
        // `Limits::room_queues_total_bytes`'s rule, said in flags.
        if self.room_queues_total_bytes < self.room_queue_bytes {
            return Err(crate::git::Usage(format!(
                "--room-queues-total-bytes (KSYNC_ROOM_QUEUES_TOTAL_BYTES) is {}: it must be at least --room-queue-bytes (KSYNC_ROOM_QUEUE_BYTES), {}: one room stuck on its disk would hold all of it, and publishes to every room would wait",
                self.room_queues_total_bytes, self.room_queue_bytes
            ))
            .into());
        }
        let mut auth = AuthConfig::default();
        auth.audience = audience;
        auth.issuer = issuer;
        if let Some(secs) = self.jwt_leeway_secs {
            auth.leeway = Duration::from_secs(secs);
        }
        auth.rate_limit.max_failures = self.auth_max_failures;
        if let Some(secret) = self.jwt_secret {
            if given_on_command_line("--jwt-secret") {
                tracing::warn!(
                    "--jwt-secret on the command line is visible to other users (ps); prefer KSYNC_JWT_SECRET or --jwt-hs256-secret-file"
                );
            }
            auth.jwt_keys.push(JwtKey::hs256(secret));
        }
        if let Some(path) = &self.jwt_hs256_secret_file {
            auth.jwt_keys.push(JwtKey::hs256(Secret::from_file(path)?));
        }
        if let Some(path) = &self.jwt_rs256_public_key {
            auth.jwt_keys.push(JwtKey::rs256_pem_file(path)?);
        }
        if let Some(path) = &self.jwt_eddsa_public_key {
            auth.jwt_keys.push(JwtKey::eddsa_pem_file(path)?);
        }
        if !api_keys.is_empty() && given_on_command_line("--api-key") {
            tracing::warn!(
                "--api-key on the command line is visible to other users (ps); prefer KSYNC_API_KEYS or --api-keys-file"
            );
        }
        for spec in &api_keys {
            auth.api_keys.push(ApiKey::parse_spec(spec)?);
        }
        if let Some(path) = &self.api_keys_file {
            let keys = ApiKey::parse_file(path)?;
            if keys.is_empty() {
                // Starting without auth because a key file came out empty (a failed mount, a
                // template gone wrong) would open every room and repository to anyone.
                return Err(ServerError::Config(format!(
                    "--api-keys-file {} holds no API key (one NAME=KEY or NAME:SCOPE=KEY a line)",
                    path.display()
                ))
                .into());
            }
            auth.api_keys.extend(keys);
        }
        let mut limits = Limits::default();
        limits.max_message_bytes = self.max_message_bytes;
        limits.max_connections = self.max_connections;
        limits.max_connections_per_client = self.max_connections_per_client;
        limits.max_open_rooms = self.max_open_rooms;
        limits.subscriber_queues_total_bytes = self.subscriber_queues_total_bytes;
        limits.room_queue_bytes = self.room_queue_bytes;
        limits.room_queues_total_bytes = self.room_queues_total_bytes;
        limits.heartbeat = Duration::from_secs(self.heartbeat_secs);
        limits.shutdown_timeout = Duration::from_secs(self.shutdown_timeout_secs);
        limits.max_git_requests = self.max_git_requests;
        limits.request_body_timeout = Duration::from_secs(self.request_body_timeout_secs);
        limits.request_body_min_rate = self.request_body_min_rate;
        limits.request_header_timeout = Duration::from_secs(self.request_header_timeout_secs);
        limits.max_http_connections = self.max_http_connections;
        limits.max_pending_connections_per_ip = self.max_pending_connections_per_ip;
        limits.response_write_timeout = Duration::from_secs(self.response_write_timeout_secs);
        limits.git_body_memory_bytes = self.git_body_memory_bytes;
        limits.max_branches_per_repo = self.max_branches_per_repo;
        limits.max_pushes_per_client = self.max_pushes_per_client;
        limits.max_merges_per_client = self.max_merges_per_client;
        limits.max_rooms = self.max_rooms;
        limits.max_repos = self.max_repos;
        let mut config = ServerConfig::default();
        config.bind = self.bind;
        config.data_dir = self.data_dir;
        config.in_memory = self.in_memory;
        config.auth = auth;
        config.limits = limits;
        config.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig { cert, key }),
            // clap requires both or neither.
            _ => None,
        };
        Ok(config)
    }
}

/// Runs the server until SIGINT/SIGTERM, then drains and flushes; a second SIGINT/SIGTERM
/// during the drain stops at once ([`ServerError::Interrupted`], exit code 130). With TLS,
/// SIGHUP reads the certificate and key files again.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    // Each open room's log holds a descriptor, and its sync thread another (measured; a
    // second sync thread, with a third descriptor, only while two syncs overlap).
    let descriptors = config
        .limits
        .max_connections
        .saturating_add(config.limits.max_http_connections)
        .saturating_add(config.limits.max_open_rooms.saturating_mul(2));
    crate::fdlimit::raise_open_file_limit(u64::try_from(descriptors).unwrap_or(u64::MAX));
    let auth = auth_summary(&config.auth);
    if !config.auth.is_enabled() && !config.bind.ip().is_loopback() {
        tracing::warn!(
            bind = %config.bind,
            "no credentials configured and the server is reachable from other hosts: anyone who can connect may read and write every room and repository (see --api-keys-file and the --jwt-* options)"
        );
    }
    // Before anything is printed: a SIGTERM right after the "listening" line must drain, not kill.
    let signal = ShutdownSignal::install().context("installing signal handlers")?;
    let reload =
        ReloadSignal::install(config.tls.is_some()).context("installing the SIGHUP handler")?;
    let running = Server::bind(config).await.context("starting the server")?;
    let addr = running.local_addr();
    let (ws, http) = if running.tls() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let line = format!(
        "ksync listening on {ws}://{addr} ({http}://{addr}/health), {auth}, data in {}",
        running.storage()
    );
    // stdout, flushed: scripts and tests read the real address from this line. A stdout
    // nobody reads any more (a closed pipe) is no reason to stop serving.
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        tracing::warn!(%error, "cannot print the listening line on stdout");
    }
    drop(stdout);
    running.run_until_signals(signal, reload).await?;
    Ok(())
}

/// The exit code of a `ksync serve` error that has its own: 130 (as a shell reports a process
/// ended by SIGINT) when a second SIGINT/SIGTERM cut the drain short, 1 when the flush at
/// shutdown timed out (a hung disk). The caller then exits without waiting for the runtime's
/// blocking tasks: a log being opened on a hung disk would hold the exit up for good.
pub fn exit_code(error: &anyhow::Error) -> Option<u8> {
    error.chain().find_map(|cause| match cause.downcast_ref() {
        Some(ServerError::Interrupted) => Some(130),
        Some(ServerError::FlushTimedOut { .. }) => Some(1),
        _ => None,
    })
}

/// `auth off`, or `auth on` and which credentials (counts only: never a name or a secret).
fn auth_summary(auth: &AuthConfig) -> String {
    if !auth.is_enabled() {
        return "auth off".to_owned();
    }
    let count = |n: usize, what: &str| match n {
        0 => None,
        1 => Some(format!("1 {what}")),
        n => Some(format!("{n} {what}s")),
    };
    let parts: Vec<String> = [
        count(auth.api_keys.len(), "API key"),
        count(auth.jwt_keys.len(), "JWT key"),
    ]
    .into_iter()
    .flatten()
    .collect();
    format!("auth on ({})", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        args: ServeArgs,
    }

    /// `--room-queue-bytes` and `--room-queues-total-bytes` reach the server's limits, which
    /// the server hands to the relay as they are.
    #[test]
    fn the_room_queue_flags_reach_the_limits() {
        use clap::Parser;
        let serve = Serve::try_parse_from([
            "serve",
            "--room-queue-bytes",
            "3145728",
            "--room-queues-total-bytes",
            "5242880",
        ])
        .expect("flags");
        let limits = serve.args.into_config().expect("config").limits;
        assert_eq!(
            (limits.room_queue_bytes, limits.room_queues_total_bytes),
            (3 << 20, 5 << 20)
        );
    }

    /// Every field of `Limits` has its flag: set them all away from their defaults, and no
    /// field of the limits built from them is left at its default. `Limits` is
    /// `#[non_exhaustive]`, so a new limit not wired to a flag compiles; this fails instead,
    /// naming it. (Add its flag below too.)
    #[test]
    fn every_limit_has_a_flag() {
        use clap::Parser;
        let d = Limits::default();
        let double = |n: usize| (n.max(1) * 2).to_string();
        let secs = |t: Duration| (t.as_secs() + 1).to_string();
        let flags = [
            ("--max-message-bytes", double(d.max_message_bytes)),
            ("--max-connections", double(d.max_connections)),
            (
                "--max-connections-per-client",
                double(d.max_connections_per_client),
            ),
            ("--max-open-rooms", double(d.max_open_rooms)),
            (
                "--subscriber-queues-total-bytes",
                double(d.subscriber_queues_total_bytes),
            ),
            ("--room-queue-bytes", double(d.room_queue_bytes)),
            (
                "--room-queues-total-bytes",
                double(d.room_queues_total_bytes),
            ),
            ("--heartbeat-secs", secs(d.heartbeat)),
            ("--shutdown-timeout-secs", secs(d.shutdown_timeout)),
            ("--max-git-requests", double(d.max_git_requests)),
            ("--request-body-timeout-secs", secs(d.request_body_timeout)),
            (
                "--request-body-min-rate",
                (d.request_body_min_rate.max(1) * 2).to_string(),
            ),
            (
                "--request-header-timeout-secs",
                secs(d.request_header_timeout),
            ),
            ("--max-http-connections", double(d.max_http_connections)),
            (
                "--max-pending-connections-per-ip",
                double(d.max_pending_connections_per_ip),
            ),
            (
                "--response-write-timeout-secs",
                secs(d.response_write_timeout),
            ),
            ("--git-body-memory-bytes", double(d.git_body_memory_bytes)),
            ("--max-branches-per-repo", double(d.max_branches_per_repo)),
            ("--max-pushes-per-client", double(d.max_pushes_per_client)),
            ("--max-merges-per-client", double(d.max_merges_per_client)),
            ("--max-rooms", double(d.max_rooms)),
            ("--max-repos", double(d.max_repos)),
        ];
        let argv = std::iter::once("serve".to_owned()).chain(
            flags
                .iter()
                .flat_map(|(flag, value)| [flag.to_string(), value.clone()]),
        );
        let serve = Serve::try_parse_from(argv).expect("flags");
        let limits = serve.args.into_config().expect("config").limits;
        // Field by field through `Debug` (one `name: value,` a line): no list of the fields
        // here to forget one in.
        let fields = |limits: &Limits| -> Vec<String> {
            format!("{limits:#?}")
                .lines()
                .filter(|line| line.starts_with("    "))
                .map(|line| line.trim().to_owned())
                .collect()
        };
        let (set, default) = (fields(&limits), fields(&d));
        assert_eq!(set.len(), default.len());
        assert!(!set.is_empty());
        let unset: Vec<&String> = set.iter().filter(|field| default.contains(field)).collect();
        assert!(unset.is_empty(), "limits no flag sets: {unset:?}");
    }

    /// A stop whose flush timed out (a hung disk) exits 1 by the path that does not wait for
    /// the runtime's blocking tasks (a log being opened on that disk can hold one for good).
    #[test]
    fn a_flush_that_timed_out_at_shutdown_exits_1_without_waiting() {
        let error = anyhow::Error::from(ServerError::FlushTimedOut {
            timeout: Duration::from_secs(1),
        });
        assert_eq!(exit_code(&error), Some(1));
        assert_eq!(
            exit_code(&anyhow::Error::from(ServerError::Interrupted)),
            Some(130)
        );
    }
}
