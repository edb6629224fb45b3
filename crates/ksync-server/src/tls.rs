//! HTTPS and `wss://`: TLS (rustls) on the listening socket, when a certificate is configured.
//!
//! Handshakes run in their own tasks, so a client that connects and never says hello holds
//! one slot for [`TLS_HANDSHAKE_TIMEOUT`] and nobody else waits for it. The certificate can be
//! read again while the server runs ([`Certificates::reload`]): handshakes from then on
//! present the new one, connections already open keep theirs.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;
use crate::error::ServerError;

/// How long a client has to finish its TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once. Overflow policy: the server stops accepting until
/// one ends; further clients wait in the kernel's listen backlog. Of one address (IPv6: one
/// /64) at most `Limits::max_pending_connections_per_ip` at once: past that its new
/// connections are closed at once (else one address stalling ~103 handshakes a second held
/// every place, and every other client waited).
pub const MAX_TLS_HANDSHAKES: usize = 1024;

/// The certificate and key the server presents, as last loaded from their files.
pub(crate) struct Certificates {
    files: TlsConfig,
    current: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Certificates {
    /// Loads `files` (see [`acceptor`]).
    pub(crate) fn load(files: &TlsConfig) -> Result<Arc<Self>, ServerError> {
        Ok(Arc::new(Self {
            current: RwLock::new(acceptor(files)?),
            files: files.clone(),
        }))
    }

    /// What handshakes present now.
    fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the files again; on any error the current certificate stays.
    pub(crate) fn reload(&self) -> Result<(), ServerError> {
        let loaded = acceptor(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }
}

/// Loads the certificate chain and key (PEM) and checks that they belong together.
fn acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, ServerError> {
    let invalid = |path: &Path, reason: String| ServerError::Tls {
        path: path.to_owned(),
        reason,
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ServerError::ReadFile {
            path: path.to_owned(),
            source,
        })
    };
    let chain = CertificateDer::pem_slice_iter(&read(&tls.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&tls.cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(&tls.cert, "no CERTIFICATE block".into()));
    }
    // The message never quotes the key file's content.
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key)?).map_err(|e| {
        invalid(
            &tls.key,
            format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(&tls.cert, format!("TLS configuration: {e}")))?
        .with_no_client_auth()
        // Also checks that the key is the certificate's.
        .with_single_cert(chain, key)
        .map_err(|e| invalid(&tls.key, format!("key and certificate do not match: {e}")))?;
    // The server speaks HTTP/1.1 (WebSocket upgrades need it; see `http.rs`).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener whose connections have completed a TLS handshake.
pub(crate) struct TlsListener {
    tcp: TcpListener,
    certificates: Arc<Certificates>,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
    /// Most handshakes of one address in flight (0: no such cap).
    per_ip: usize,
    /// Handshakes in flight per address ([`ksync_core::ClientId::host_key`]); an entry goes
    /// when its count drops to zero, so at most one per handshake.
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One handshake's place in its address's count, given back when its task ends however it
/// ends.
struct HandshakePlace {
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
    key: IpAddr,
}

impl Drop for HandshakePlace {
    fn drop(&mut self) {
        // A poisoned lock: a panic elsewhere while it was held; the map is still whole.
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = in_flight.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.key);
            }
        }
    }
}

impl TlsListener {
    /// `per_ip`: most handshakes of one address in flight (0: no such cap).
    pub(crate) fn new(tcp: TcpListener, certificates: Arc<Certificates>, per_ip: usize) -> Self {
        Self {
            tcp,
            certificates,
            handshakes: JoinSet::new(),
            per_ip,
            in_flight: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A place for a handshake from `peer`, or `None` when its address has `per_ip` in flight.
    fn take_place(&self, peer: SocketAddr) -> Option<Option<HandshakePlace>> {
        if self.per_ip == 0 {
            return Some(None);
        }
        let key = ksync_core::ClientId::host_key(peer.ip());
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let count = in_flight.entry(key).or_insert(0);
        if *count >= self.per_ip {
            return None;
        }
        *count += 1;
        Some(Some(HandshakePlace {
            in_flight: Arc::clone(&self.in_flight),
            key,
        }))
    }

    fn start_handshake(&mut self, tcp: TcpStream, peer: SocketAddr) {
        let Some(place) = self.take_place(peer) else {
            // Dropped: closed at once, its address has enough handshakes in flight.
            tracing::debug!(%peer, "connection closed: its address has too many TLS handshakes in flight");
            return;
        };
        // Small frames must not wait for Nagle's algorithm.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY failed");
        }
        let acceptor = self.certificates.acceptor();
        self.handshakes.spawn(async move {
            let _place = place;
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => Some((stream, peer)),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    None
                }
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let room = self.handshakes.len() < MAX_TLS_HANDSHAKES;
            tokio::select! {
                accepted = self.tcp.accept(), if room => match accepted {
                    Ok((tcp, peer)) => self.start_handshake(tcp, peer),
                    Err(e) => accept_failed(e).await,
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// As axum's own listener: a failed connection is skipped; anything else (e.g. out of file
/// descriptors) is logged and waited out, so the loop does not spin.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
