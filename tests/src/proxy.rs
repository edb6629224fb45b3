//! A TCP fault proxy between real clients and a real server on loopback.
//!
//! Modes ([`ProxyMode`]) apply to every connection, open or new: `Pass` forwards, `Stall`
//! holds bytes in both directions (connections stay open: a slow or frozen network),
//! `Blackhole` accepts new connections and forwards nothing (a silent partition), `Refuse`
//! closes new connections at once. [`FaultProxy::cut_all`] closes every open connection now
//! (a reset link).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward everything.
    Pass,
    /// Hold every byte (both directions, open and new connections) until the mode changes.
    Stall,
    /// New connections are accepted and never forwarded; open ones are held like `Stall`.
    Blackhole,
    /// New connections are closed at once; open ones go on.
    Refuse,
}

/// A running fault proxy. Dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(ProxyMode::Pass);
        let (cut, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            mode.clone(),
            cut.clone(),
            Arc::clone(&accepted),
        ));
        Ok(Self {
            addr,
            mode,
            cut,
            accepted,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the mode for every connection.
    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    /// Closes every open connection now (both sides see the socket close).
    pub fn cut_all(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let current = *mode.borrow();
        match current {
            ProxyMode::Refuse => drop(client),
            ProxyMode::Blackhole => {
                let mut cut_rx = cut.subscribe();
                tokio::spawn(async move {
                    // Held open, never forwarded, until cut.
                    let _ = cut_rx.changed().await;
                    drop(client);
                });
            }
            ProxyMode::Pass | ProxyMode::Stall => {
                let mode_rx = mode.subscribe();
                let cut_rx = cut.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, mode_rx.clone(), cut_rx.clone());
                    let down = pump(sr, cw, mode_rx, cut_rx);
                    // When either direction ends (EOF, error, cut), close both.
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
            }
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
    mut cut: watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let held = async {
            // Err: the proxy is gone; treat as a cut.
            mode.wait_for(|m| matches!(m, ProxyMode::Pass | ProxyMode::Refuse))
                .await
                .is_ok()
        };
        let go = tokio::select! {
            go = held => go,
            _ = cut.changed() => false,
        };
        if !go {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = cut.changed() => return,
        };
        // Bytes read just before a stall are held too.
        let held = async {
            mode.wait_for(|m| matches!(m, ProxyMode::Pass | ProxyMode::Refuse))
                .await
                .is_ok()
        };
        let go = tokio::select! {
            go = held => go,
            _ = cut.changed() => false,
        };
        if !go {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
