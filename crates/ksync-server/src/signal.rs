//! The process signals a server answers: SIGINT/SIGTERM stop it cleanly, SIGHUP reloads its
//! TLS certificate.
//!
//! Both are listened for from the moment they are installed, so a signal that arrives between
//! printing "listening" and awaiting it is not lost (and does not kill the process).

use crate::error::ServerError;

/// SIGINT (Ctrl-C) and, on Unix, SIGTERM, listened for from the moment of
/// [`install`](Self::install): a signal that arrives before [`recv`](Self::recv) is awaited is
/// not lost (and does not kill the process).
#[derive(Debug)]
pub struct ShutdownSignal {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    /// Installs the handlers. Needs a running tokio runtime.
    pub fn install() -> Result<Self, ServerError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Resolves on the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
        }
        #[cfg(not(unix))]
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

/// SIGHUP, which asks a TLS server to read its certificate and key again after a renewal (as
/// nginx does; e.g. certbot's `--deploy-hook "pkill -HUP -x ksync"`).
///
/// Only listened for on a server with TLS, and only on Unix: elsewhere SIGHUP keeps its
/// default (the process ends), and [`recv`](Self::recv) never resolves.
#[derive(Debug)]
pub struct ReloadSignal {
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl ReloadSignal {
    /// Installs the SIGHUP handler when `tls` (the server serves TLS); otherwise installs
    /// nothing. Needs a running tokio runtime.
    pub fn install(tls: bool) -> Result<Self, ServerError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let hangup = tls.then(|| signal(SignalKind::hangup())).transpose()?;
            Ok(Self { hangup })
        }
        #[cfg(not(unix))]
        {
            let _ = tls;
            Ok(Self {})
        }
    }

    /// Resolves on the next SIGHUP; never when no handler was installed.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(hangup) = self.hangup.as_mut() {
            // None: the handler is gone, which does not happen while the runtime runs.
            if hangup.recv().await.is_some() {
                tracing::info!("SIGHUP received: reloading the TLS certificate");
                return;
            }
        }
        std::future::pending::<()>().await;
    }
}
