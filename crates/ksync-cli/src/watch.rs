//! `ksync watch`: join a room of a kSync server over WebSocket and print its events (its
//! history from the start, or after `--since SEQ`, or none with `--live`; then live; one JSON
//! line each on stdout) until SIGINT (Ctrl-C), SIGTERM or `--duration`. `--emit` publishes
//! events to the room first.
//!
//! ```text
//! ksync watch ws://127.0.0.1:8080/ws/chat --api-key "$KEY"
//! ksync watch ws://127.0.0.1:8080/ws/chat --since 100
//! ksync watch ws://127.0.0.1:8080/ws/chat --live --emit note='{"text":"hi"}' --duration 2
//! ```
//!
//! Where it starts is the `hello` cursor of the protocol (docs/PROTOCOL.md): the history and
//! `--since` go through `KSync` over an in-memory replica whose room cursor
//! (`WebSocketSyncClient::room_cursor_name`) is 0 or SEQ when it connects, so the hello says `since: 0` or
//! `since: SEQ`. `--live` uses the client alone (no replica), whose first hello omits
//! `since`: the server starts it at the room's head as of its `welcome`, and the client
//! resumes from the last seq it saw after a reconnect, so no live event is skipped or printed
//! twice.

use std::io::Write as _;
use std::sync::Arc;

use anyhow::Context as _;
use ksync_core::{
    Auth, InMemoryStorage, KSync, Notification, NotificationStream, StreamError, SyncClient,
    SyncError,
};
use ksync_server::ShutdownSignal;
use ksync_ws::{WebSocketSyncClient, WsError};

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

    /// Print only the events after this sequence number of the room, then live ones. A room
    /// numbers its events 1, 2, 3, ... in the order it stores them (the order a full watch
    /// prints them in): `--since N` starts after the Nth. A SEQ past the room's last event
    /// is an error.
    #[arg(long, value_name = "SEQ", conflicts_with = "live")]
    since: Option<u64>,

    /// Print only the events the room stores after this watcher joined (no history).
    #[arg(long)]
    live: bool,
}

/// What prints: `KSync` over an in-memory replica (the history, or `--since`), or the client
/// alone (`--live`).
enum Watcher {
    Replica(KSync<WebSocketSyncClient>),
    Live(Arc<WebSocketSyncClient>),
}

impl Watcher {
    fn notifications(&self) -> NotificationStream {
        match self {
            Watcher::Replica(ksync) => ksync.notifications(),
            Watcher::Live(client) => client.notifications(),
        }
    }

    async fn connect(&self) -> Result<(), SyncError> {
        match self {
            Watcher::Replica(ksync) => ksync.connect().await,
            Watcher::Live(client) => client.connect().await,
        }
    }

    async fn emit(&self, events: Vec<(String, serde_json::Value)>) -> anyhow::Result<()> {
        match self {
            Watcher::Replica(ksync) => crate::emit::emit_all(ksync, events).await,
            Watcher::Live(client) => crate::emit::send_all(client.as_ref(), events).await,
        }
    }

    async fn disconnect(&self) -> Result<(), SyncError> {
        match self {
            Watcher::Replica(ksync) => ksync.disconnect().await,
            Watcher::Live(client) => client.disconnect().await,
        }
    }
}

/// The room-reset error in `error`, when it is one: (the cursor the client resumed from, the
/// room's last seq).
fn room_reset(error: &SyncError) -> Option<(u64, u64)> {
    let source = std::error::Error::source(error)?;
    match source.downcast_ref::<WsError>()? {
        WsError::RoomReset {
            cursor,
            server_version,
        } => Some((*cursor, *server_version)),
        _ => None,
    }
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
    let watcher = if args.live {
        Watcher::Live(client)
    } else {
        let ksync = KSync::builder()
            .storage(Arc::new(InMemoryStorage::new()))
            .sync_client(Arc::clone(&client))
            .build()
            .await?;
        if let Some(since) = args.since {
            ksync
                .replica()
                .set_cursor(&client.room_cursor_name(), since)
                .await?;
        }
        Watcher::Replica(ksync)
    };
    let mut notifications = watcher.notifications();
    // A server that refuses us (bad key, unknown room, not there) is an error here, not a
    // retry loop: the reconnects are for a connection that worked once.
    watcher
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    eprintln!("watching {}", args.url);
    watcher.emit(events).await?;
    let until = crate::until_stopped(&mut signal, args.duration);
    tokio::pin!(until);
    // `connect` returned for the first session: `Connected` was notified before it did.
    let mut sessions = 0u32;
    let outcome = loop {
        tokio::select! {
            () = &mut until => break Ok(()),
            n = notifications.recv() => match n {
                Ok(Notification::Event(event)) => {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}", serde_json::to_string(&event)?)?;
                    out.flush()?;
                }
                Ok(Notification::Disconnected) => eprintln!("disconnected"),
                Ok(Notification::Reconnecting { attempt }) => eprintln!("reconnecting (attempt {attempt})"),
                Ok(Notification::Connected) => {
                    sessions += 1;
                    eprintln!("connected");
                }
                Ok(Notification::Error(e)) => {
                    // In the first session the room cannot have been reset under us (a new
                    // replica knows no log yet): the server answered `cursor_ahead` to
                    // `since: SEQ`. The client would read the room again from 0 and print
                    // what --since was to leave out.
                    if let (Some(since), Some((cursor, last))) = (args.since, room_reset(&e))
                        && sessions <= 1
                        && cursor == since
                    {
                        break Err(anyhow::anyhow!(
                            "--since {since} is past the room's last event (seq {last}) at {}",
                            args.url
                        ));
                    }
                    eprintln!("error: {e}");
                }
                Ok(_) => {}
                Err(StreamError::Lagged(n)) => eprintln!("missed {n} notifications (output too slow)"),
                Err(StreamError::Closed) => break Ok(()),
            },
        }
    };
    watcher.disconnect().await?;
    outcome
}
