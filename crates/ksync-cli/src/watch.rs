//! `ksync watch`: join a room of a kSync server over WebSocket and print every event in it
//! (its history from the start, then live; one JSON line each on stdout) until SIGINT
//! (Ctrl-C), SIGTERM or `--duration`. `--emit` publishes events to the room first.
//!
//! ```text
//! ksync watch ws://127.0.0.1:8080/ws/chat --api-key "$KEY"
//! ksync watch ws://127.0.0.1:8080/ws/chat --emit note='{"text":"hi"}' --duration 2
//! ```

use std::io::Write as _;
use std::sync::Arc;

use anyhow::Context as _;
use ksync_core::{Auth, InMemoryStorage, KSync, Notification, StreamError};
use ksync_server::ShutdownSignal;
use ksync_ws::WebSocketSyncClient;

/// Options of `ksync watch`.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The room's URL: ws://HOST:PORT/ws/ROOM (wss:// with TLS; ws://HOST:PORT/ws is the
    /// default room).
    #[arg(value_name = "URL")]
    url: String,

    /// API key (sent as X-Api-Key).
    #[arg(
        long,
        env = "KSYNC_API_KEY",
        value_name = "KEY",
        hide_env_values = true,
        conflicts_with = "token"
    )]
    api_key: Option<String>,

    /// JWT (sent as Authorization: Bearer).
    #[arg(long, env = "KSYNC_TOKEN", value_name = "JWT", hide_env_values = true)]
    token: Option<String>,

    /// PEM file of the CA certificate(s) to trust for wss:// (besides the system's).
    #[arg(long, env = "KSYNC_TLS_ROOT_CERT", value_name = "PEM")]
    tls_root_cert: Option<std::path::PathBuf>,

    /// Publish an event to the room after connecting, as TYPE=JSON (e.g.
    /// note='{"text":"hi"}'); repeatable.
    #[arg(long, value_name = "TYPE=JSON")]
    emit: Vec<String>,

    /// Exit after this many seconds (default: run until SIGINT or SIGTERM).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
}

/// Runs `ksync watch` until SIGINT/SIGTERM (or `--duration`).
pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let mut signal = ShutdownSignal::install().context("installing signal handlers")?;
    let events = crate::emit::parse_all(&args.emit)?;
    // Blank variables (KSYNC_API_KEY= from a compose file) mean no credential.
    let auth = match (
        args.api_key.filter(|k| !k.is_empty()),
        args.token.filter(|t| !t.is_empty()),
    ) {
        (Some(key), _) => Some(Auth::ApiKey { key }),
        (None, Some(token)) => Some(Auth::Jwt { token }),
        (None, None) => None,
    };
    let mut builder = WebSocketSyncClient::builder(args.url.clone());
    if let Some(auth) = auth {
        builder = builder.auth(auth);
    }
    if let Some(path) = &args.tls_root_cert {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        builder = builder.tls_root_certificates_pem(pem);
    }
    let client = Arc::new(builder.build()?);
    let ksync = KSync::builder()
        .storage(Arc::new(InMemoryStorage::new()))
        .sync_client(Arc::clone(&client))
        .build()
        .await?;
    let mut notifications = ksync.notifications();
    // A server that refuses us (bad key, unknown room, not there) is an error here, not a
    // retry loop: the reconnects are for a connection that worked once.
    ksync
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    eprintln!("watching {}", args.url);
    crate::emit::emit_all(&ksync, events).await?;
    let until = crate::until_stopped(&mut signal, args.duration);
    tokio::pin!(until);
    loop {
        tokio::select! {
            () = &mut until => break,
            n = notifications.recv() => match n {
                Ok(Notification::Event(event)) => {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}", serde_json::to_string(&event)?)?;
                    out.flush()?;
                }
                Ok(Notification::Disconnected) => eprintln!("disconnected"),
                Ok(Notification::Reconnecting { attempt }) => eprintln!("reconnecting (attempt {attempt})"),
                Ok(Notification::Connected) => eprintln!("connected"),
                Ok(Notification::Error(e)) => eprintln!("error: {e}"),
                Ok(_) => {}
                Err(StreamError::Lagged(n)) => eprintln!("missed {n} notifications (output too slow)"),
                Err(StreamError::Closed) => break,
            },
        }
    }
    ksync.disconnect().await?;
    Ok(())
}
