//! The kSync server: composes the WebSocket relay (`ksync-ws`) and the repo service
//! (`ksync-git`) over one [`StorageProvider`](ksync_core::StorageProvider), checks credentials
//! (JWTs and API keys, [`ServerAuthenticator`]), answers `/health` and `/metrics`, and shuts
//! down cleanly (stop accepting, close connections, flush storage).
//!
//! ```no_run
//! # async fn run() -> Result<(), ksync_server::ServerError> {
//! use ksync_server::{Server, ServerConfig};
//!
//! let mut config = ServerConfig::default();
//! config.in_memory = true;
//! let running = Server::bind(config).await?;
//! println!("listening on {}", running.local_addr());
//! running.run_until_signal().await?;
//! # Ok(()) }
//! ```

mod auth;
mod config;
mod dashboard;
mod error;
mod http;
mod min_rate;
mod ratelimit;
mod server;
mod signal;
mod tls;

pub use auth::{
    AuthCounters, MAX_JWT_LEEWAY, MIN_HS256_SECRET_BYTES, ServerAuthenticator, authenticator_for,
};
pub use config::{
    ApiKey, AuthConfig, DEFAULT_BIND, DEFAULT_DATA_DIR, DEFAULT_MAX_MESSAGE_BYTES, JwtKey,
    JwtKeyMaterial, Limits, MAX_MESSAGE_SIZE_RANGE, RateLimit, Scope, Secret, ServerConfig,
    TlsConfig,
};
pub use dashboard::MONITOR_PATH;
pub use error::ServerError;
pub use server::{RunningServer, Server, StorageLocation};
pub use signal::{ReloadSignal, ShutdownSignal};
pub use tls::{MAX_TLS_HANDSHAKES, TLS_HANDSHAKE_TIMEOUT};

/// The build's git commit (12 hex digits), `None` when the build did not know it (built
/// without git or `.git`, and without `KSYNC_BUILD_COMMIT`): see `build.rs`. `/health`
/// reports it as `commit`, so that builds of one version can be told apart.
pub const BUILD_COMMIT: Option<&str> = {
    const COMMIT: &str = env!("KSYNC_BUILD_COMMIT");
    if COMMIT.is_empty() {
        None
    } else {
        Some(COMMIT)
    }
};

/// The version with the build's commit when known: `0.1.0 (commit 0123456789ab)`, else
/// `0.1.0` (what `ksync --version` prints after the name).
pub const VERSION: &str = env!("KSYNC_VERSION");
