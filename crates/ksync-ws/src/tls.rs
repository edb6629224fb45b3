//! `wss://`: the client's TLS layer (rustls), under the WebSocket upgrade.
//!
//! Server certificates are checked against the system's roots (the platform verifier, as
//! reqwest does for the Git client) plus any roots the application adds, e.g. a private CA
//! or a self-signed test certificate.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::MaybeTlsStream;

use crate::WsError;
use crate::progress::Watched;

/// The byte stream under the WebSocket: TCP for `ws://`, TLS over TCP for `wss://`. The TCP
/// stream is watched below TLS, where bytes really move (see [`Watched`]).
pub(crate) type ClientStream = MaybeTlsStream<Watched<TcpStream>>;

/// Parses the PEM certificates a builder was given (one or more `CERTIFICATE` blocks).
pub(crate) fn parse_roots(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let roots = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading the PEM root certificates: {e}"))?;
    if roots.is_empty() {
        return Err("no CERTIFICATE block in the PEM root certificates".into());
    }
    Ok(roots)
}

/// A connector trusting the system's roots and `extra_roots`.
pub(crate) fn connector(extra_roots: &[CertificateDer<'static>]) -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
        extra_roots.iter().cloned(),
        Arc::clone(&provider),
    )
    .map_err(|e| format!("loading the TLS root certificates: {e}"))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .dangerous() // Not dangerous: the platform verifier is the standard check.
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    // The upgrade is HTTP/1.1; a server offering h2 must not pick it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The TLS handshake with `host` over `tcp`. A refused certificate is
/// [`WsError::Tls`] with `certificate: true` (retrying cannot fix it).
pub(crate) async fn handshake(
    connector: &TlsConnector,
    host: &str,
    tcp: Watched<TcpStream>,
) -> Result<ClientStream, WsError> {
    let failed = |reason: String, certificate: bool| WsError::Tls {
        host: host.to_owned(),
        reason,
        certificate,
    };
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| failed(format!("not a TLS server name: {e}"), true))?;
    match connector.connect(name, tcp).await {
        Ok(stream) => Ok(MaybeTlsStream::Rustls(stream)),
        Err(e) => {
            let certificate = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|tls| {
                    matches!(
                        tls,
                        rustls::Error::InvalidCertificate(_)
                            | rustls::Error::NoCertificatesPresented
                    )
                });
            Err(failed(e.to_string(), certificate))
        }
    }
}
