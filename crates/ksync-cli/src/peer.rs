//! `ksync peer`: run a P2P peer: print its addresses, connect to others, emit events, and
//! print every event it receives (one JSON line each on stdout) until SIGINT (Ctrl-C), SIGTERM
//! or `--duration`; then it stops the node and flushes the log, like `ksync serve`.
//!
//! ```text
//! ksync peer --id laptop --discovery mdns --port 9000
//! ksync peer --id desk --discovery manual --listen 127.0.0.1 \
//!     --connect /ip4/127.0.0.1/tcp/9000/p2p/12D3Koo... --emit note='{"text":"hi"}'
//! ```

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use ksync_core::{InMemoryStorage, KSync, Notification, Storage, StreamError};
use ksync_p2p::{DiscoveryMethod, Multiaddr, NetworkKey, P2PSyncClient};
use ksync_server::ShutdownSignal;

/// Options of `ksync peer`.
#[derive(Debug, clap::Args)]
pub struct PeerArgs {
    /// This peer's id (the spec's `peerId`): the `origin` of what it emits and the name of its
    /// identity key file. Needed except with --generate-network-key.
    #[arg(
        long,
        env = "KSYNC_PEER_ID",
        required_unless_present = "generate_network_key"
    )]
    id: Option<String>,

    /// How to find peers: mdns (LAN), dht (Kademlia, with --bootstrap) or manual (--connect).
    #[arg(
        long,
        env = "KSYNC_DISCOVERY",
        value_name = "MODE",
        default_value = "mdns"
    )]
    discovery: String,

    /// DHT bootstrap peer, a multiaddr ending in `/p2p/<peer id>`; repeat for several.
    #[arg(
        long,
        env = "KSYNC_BOOTSTRAP",
        value_name = "MULTIADDR",
        value_delimiter = ','
    )]
    bootstrap: Vec<Multiaddr>,

    /// TCP port to listen on (0: any free port).
    #[arg(long, env = "KSYNC_PORT", default_value_t = 0)]
    port: u16,

    /// Address to listen on (0.0.0.0: every interface; 127.0.0.1: this host only).
    #[arg(
        long,
        env = "KSYNC_LISTEN",
        value_name = "IP",
        default_value = "0.0.0.0"
    )]
    listen: IpAddr,

    /// Network name: peers sync only within one network.
    #[arg(long, env = "KSYNC_NETWORK", value_name = "NAME", default_value = ksync_p2p::DEFAULT_NETWORK)]
    network: String,

    /// Private network: a go-libp2p `swarm.key` file (or a file with 64 hex digits). Peers
    /// without the same key cannot connect.
    #[arg(long, env = "KSYNC_NETWORK_KEY_FILE", value_name = "FILE")]
    network_key_file: Option<PathBuf>,

    /// Write a fresh network key file here (readable by its owner only) and exit.
    #[arg(long, value_name = "PATH")]
    generate_network_key: Option<PathBuf>,

    /// Where identity key files are kept (default $KSYNC_HOME/p2p or ~/.ksync/p2p).
    #[arg(long, env = "KSYNC_KEY_DIR", value_name = "DIR")]
    key_dir: Option<PathBuf>,

    /// Keep the event log in this file (default: in memory, lost on exit).
    #[arg(long, env = "KSYNC_LOG_FILE", value_name = "FILE")]
    log_file: Option<PathBuf>,

    /// Connect to this peer: a multiaddr, a libp2p peer id discovery can resolve, or the
    /// --id of a peer already met (e.g. found by mDNS); repeatable.
    #[arg(long, value_name = "PEER")]
    connect: Vec<String>,

    /// Emit an event after connecting, as TYPE=JSON (e.g. note='{"text":"hi"}'); repeatable.
    #[arg(long, value_name = "TYPE=JSON")]
    emit: Vec<String>,

    /// Exit after this many seconds (default: run until SIGINT or SIGTERM).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,

    /// Seconds between catch-up rounds with every peer (at most 86400, a day; 0 means 1).
    #[arg(long, value_name = "SECS", default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(0..=86_400))]
    anti_entropy_secs: u64,
}

/// Runs `ksync peer` until SIGINT/SIGTERM (or `--duration`), then stops the node and flushes
/// the log.
pub async fn run(args: PeerArgs) -> anyhow::Result<()> {
    // Before anything is printed: a SIGTERM right after the banner must stop cleanly, not kill.
    let mut signal = ShutdownSignal::install().context("installing signal handlers")?;
    if let Some(path) = &args.generate_network_key {
        let key = NetworkKey::generate();
        write_secret(path, key.to_key_file().as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "network key written to {} (fingerprint {})",
            path.display(),
            key.fingerprint()
        );
        return Ok(());
    }
    // clap asks for --id unless --generate-network-key was given, which returned above.
    let id = args.id.clone().context("--id is required")?;
    let discovery = match args.discovery.parse::<DiscoveryMethod>()? {
        DiscoveryMethod::Dht { .. } => DiscoveryMethod::Dht {
            bootstrap: args.bootstrap.clone(),
        },
        other if !args.bootstrap.is_empty() => {
            bail!("--bootstrap needs --discovery dht (got {})", other.name())
        }
        other => other,
    };
    let events = crate::emit::parse_all(&args.emit)?;

    let mut builder = P2PSyncClient::builder(id.clone(), discovery)
        .port(args.port)
        .listen_host(args.listen)
        .network(args.network.clone())
        .anti_entropy_interval(Duration::from_secs(args.anti_entropy_secs.max(1)));
    if let Some(dir) = &args.key_dir {
        builder = builder.key_dir(dir);
    }
    if let Some(path) = &args.network_key_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading network key {}", path.display()))?;
        builder = builder
            .encryption(true)
            .network_key(NetworkKey::parse(&text)?);
    }
    let client = Arc::new(builder.build()?);
    let storage: Arc<dyn Storage> = match &args.log_file {
        Some(path) => Arc::new(
            ksync_storage_file::FileStorage::open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => Arc::new(InMemoryStorage::new()),
    };
    let ksync = KSync::builder()
        .storage(Arc::clone(&storage))
        .sync_client(Arc::clone(&client))
        .replica_id(id.clone())
        .build()
        .await?;
    let mut notifications = ksync.notifications();
    ksync.start().await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "peer {} ({})",
            client.peer_id(),
            client.local_peer_id()
        )?;
        for addr in client.addresses() {
            writeln!(out, "listening {addr}")?;
        }
        out.flush()?;
    }
    for target in &args.connect {
        let peer = client
            .connect_to_peer(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        eprintln!("connected to {peer}");
    }
    crate::emit::emit_all(&ksync, events).await?;

    let until = crate::until_stopped(&mut signal, args.duration);
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => break,
            n = notifications.recv() => match n {
                Ok(Notification::Event(event)) => {
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}", serde_json::to_string(&event)?)?;
                    out.flush()?;
                }
                Ok(Notification::PeerConnected(peer)) => eprintln!("peer connected: {peer}"),
                Ok(Notification::PeerDisconnected(peer)) => eprintln!("peer disconnected: {peer}"),
                Ok(Notification::Error(e)) => eprintln!("error: {e}"),
                Ok(_) => {}
                Err(StreamError::Lagged(n)) => eprintln!("missed {n} notifications (output too slow)"),
                Err(StreamError::Closed) => break,
            },
        }
    }
    ksync.disconnect().await?;
    storage.flush().await.context("flushing the log")?;
    eprintln!("stopped");
    Ok(())
}

fn write_secret(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}
