//! `ksync serve`: run the server until SIGINT/SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use ksync_server::{
    ApiKey, AuthConfig, DEFAULT_MAX_MESSAGE_BYTES, JwtKey, Limits, RateLimit, ReloadSignal, Secret,
    Server, ServerConfig, ShutdownSignal, TlsConfig,
};

/// Options of `ksync serve`. Every option can also come from its `KSYNC_*` environment
/// variable; prefer the environment or files for secrets, which command lines show to `ps`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free one; the real address is printed).
    #[arg(long, env = "KSYNC_BIND", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,

    /// Directory for the on-disk logs.
    #[arg(long, env = "KSYNC_DATA_DIR", default_value = ksync_server::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,

    /// Keep logs in memory only (lost on exit). KSYNC_IN_MEMORY takes true/false, 1/0,
    /// yes/no or on/off.
    #[arg(long, env = "KSYNC_IN_MEMORY", value_parser = clap::builder::BoolishValueParser::new())]
    in_memory: bool,

    /// HS256 secret for JWTs (at least 32 bytes). Visible in `ps` when given here: prefer
    /// KSYNC_JWT_SECRET or --jwt-hs256-secret-file.
    #[arg(long, env = "KSYNC_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,

    /// File holding the HS256 secret for JWTs (one trailing newline is ignored).
    #[arg(long, env = "KSYNC_JWT_SECRET_FILE")]
    jwt_hs256_secret_file: Option<PathBuf>,

    /// PEM file with an RSA public key: accept RS256 JWTs signed by its private key.
    #[arg(long, env = "KSYNC_JWT_RS256_PUBLIC_KEY")]
    jwt_rs256_public_key: Option<PathBuf>,

    /// PEM file with an Ed25519 public key: accept EdDSA JWTs signed by its private key.
    #[arg(long, env = "KSYNC_JWT_EDDSA_PUBLIC_KEY")]
    jwt_eddsa_public_key: Option<PathBuf>,

    /// Accepted JWT audience (`aud`); repeat or comma-separate for several. Tokens must carry one.
    #[arg(long, env = "KSYNC_JWT_AUDIENCE", value_delimiter = ',')]
    jwt_audience: Vec<String>,

    /// Accepted JWT issuer (`iss`); repeat or comma-separate for several. Tokens must carry one.
    #[arg(long, env = "KSYNC_JWT_ISSUER", value_delimiter = ',')]
    jwt_issuer: Vec<String>,

    /// Clock skew tolerated on JWT `exp`/`nbf`, in seconds (at most 86400, a day).
    #[arg(long, env = "KSYNC_JWT_LEEWAY_SECS", default_value_t = 5)]
    jwt_leeway_secs: u64,

    /// API key as NAME=KEY or NAME:SCOPE=KEY (SCOPE: read, write or read+write); repeat for
    /// several. Visible in `ps` when given here: prefer KSYNC_API_KEYS (comma-separated) or
    /// --api-keys-file.
    #[arg(
        long = "api-key",
        env = "KSYNC_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,

    /// File of API keys, one NAME=KEY or NAME:SCOPE=KEY a line (`#` comments).
    #[arg(long, env = "KSYNC_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,

    /// Failed authentications per client within a minute before it is refused (for the rest
    /// of that minute, with 429). 0 means no limit.
    #[arg(long, env = "KSYNC_AUTH_MAX_FAILURES", default_value_t = RateLimit::default().max_failures)]
    auth_max_failures: u32,

    /// Largest accepted WebSocket message, in bytes.
    #[arg(long, env = "KSYNC_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,

    /// Most simultaneous WebSocket connections.
    #[arg(long, env = "KSYNC_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    max_connections: usize,

    /// Most repository (`/git/...`) requests handled at once; more get 503 `busy` at once.
    #[arg(long, env = "KSYNC_MAX_GIT_REQUESTS", default_value_t = u32::try_from(Limits::default().max_git_requests).unwrap_or(u32::MAX),
        value_parser = clap::value_parser!(u32).range(1..))]
    max_git_requests: u32,

    /// Longest wait, in seconds, for the next piece of a request body before 408.
    #[arg(long, env = "KSYNC_REQUEST_BODY_TIMEOUT_SECS", default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..))]
    request_body_timeout_secs: u64,

    /// Seconds between heartbeats (pings) on idle WebSockets.
    #[arg(long, env = "KSYNC_HEARTBEAT_SECS", default_value_t = 30)]
    heartbeat_secs: u64,

    /// PEM certificate chain: serve HTTPS and wss:// (needs --tls-key). SIGHUP reads both
    /// files again (after a renewal) without dropping connections.
    #[arg(long, env = "KSYNC_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "KSYNC_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Seconds shutdown waits for connections to close before flushing anyway.
    #[arg(long, env = "KSYNC_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
    shutdown_timeout_secs: u64,
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
    fn into_config(self) -> anyhow::Result<ServerConfig> {
        let api_keys = non_blank(self.api_keys);
        let mut auth = AuthConfig {
            audience: non_blank(self.jwt_audience),
            issuer: non_blank(self.jwt_issuer),
            leeway: Duration::from_secs(self.jwt_leeway_secs),
            rate_limit: RateLimit {
                max_failures: self.auth_max_failures,
                ..RateLimit::default()
            },
            ..AuthConfig::default()
        };
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
            auth.api_keys.extend(ApiKey::parse_file(path)?);
        }
        Ok(ServerConfig {
            bind: self.bind,
            data_dir: self.data_dir,
            in_memory: self.in_memory,
            auth,
            limits: Limits {
                max_message_bytes: self.max_message_bytes,
                max_connections: self.max_connections,
                heartbeat: Duration::from_secs(self.heartbeat_secs),
                shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
                max_git_requests: usize::try_from(self.max_git_requests).unwrap_or(usize::MAX),
                request_body_timeout: Duration::from_secs(self.request_body_timeout_secs),
            },
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsConfig { cert, key }),
                // clap requires both or neither.
                _ => None,
            },
        })
    }
}

/// Runs the server until SIGINT/SIGTERM, then drains and flushes. With TLS, SIGHUP reads the
/// certificate and key files again.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    // Before anything is printed: a SIGTERM right after the "listening" line must drain, not kill.
    let signal = ShutdownSignal::install().context("installing signal handlers")?;
    let reload =
        ReloadSignal::install(config.tls.is_some()).context("installing the SIGHUP handler")?;
    let running = Server::bind(config).await.context("starting the server")?;
    let addr = running.local_addr();
    // stdout, flushed: scripts and tests read the real address from this line.
    let mut stdout = std::io::stdout().lock();
    let (ws, http) = if running.tls() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    writeln!(
        stdout,
        "ksync listening on {ws}://{addr} ({http}://{addr}/health), data in {}",
        running.storage()
    )?;
    stdout.flush()?;
    drop(stdout);
    running.run_until_signals(signal, reload).await?;
    Ok(())
}
