//! A real relay on 127.0.0.1:0 and `KSync` replicas on `WebSocketSyncClient`s, shared by the
//! tests that run the middlewares through the transport.

// Each test binary uses a subset of these helpers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use ksync_core::{
    InMemoryProvider, InMemoryStorage, KSync, LogName, Name, Notification, Storage, StorageProvider,
};
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::{Relay, RelayConfig};

/// A relay serving in-memory rooms on a loopback port.
pub struct TestRelay {
    pub relay: Relay,
    pub provider: Arc<InMemoryProvider>,
    addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl TestRelay {
    pub async fn start() -> Self {
        let provider = Arc::new(InMemoryProvider::new());
        let relay = Relay::new(
            RelayConfig::default(),
            Arc::clone(&provider) as Arc<dyn StorageProvider>,
            Arc::new(ksync_core::AllowAll),
        )
        .expect("relay");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = relay.router();
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serve");
        });
        Self {
            relay,
            provider,
            addr,
            server,
        }
    }

    /// The URL of `room`.
    pub fn url(&self, room: &str) -> String {
        format!("ws://{}/ws/{room}", self.addr)
    }

    /// The relay's log of `room`.
    pub fn room(&self, room: &str) -> Arc<dyn Storage> {
        self.provider
            .open(&LogName::Room(Name::new(room).expect("name")))
            .expect("room")
    }

    pub async fn stop(self) {
        self.relay.shutdown().await;
        self.server.abort();
    }
}

/// A replica with in-memory storage on a default client for `url`.
pub async fn replica(url: &str) -> KSync<WebSocketSyncClient> {
    ksync_testkit::ksync_over(
        Arc::new(InMemoryStorage::new()),
        WebSocketSyncClient::new(url).expect("client"),
    )
    .await
    .expect("ksync")
}

/// Waits (up to 10 s) for `f` to hold.
pub async fn until(mut f: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition reached within 10 s");
}

/// The next `error` notification's message (up to 10 s).
pub async fn next_error(notes: &mut ksync_core::NotificationStream) -> String {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Notification::Error(e)) = notes.recv().await {
                return e.to_string();
            }
        }
    })
    .await
    .expect("an error notification within 10 s")
}

/// Collects what a fmt subscriber writes (`.with_writer(move || captured.clone())`).
#[derive(Clone, Default)]
pub struct Captured(pub Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
