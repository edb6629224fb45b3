//! Large messages over a slow but working link (testkit's `SlowLink`, a throttling TCP proxy
//! whose ends cannot take megabytes into their kernel buffers at once): the client's and the
//! relay's write timeouts and the client's heartbeat mean "nothing moved for that long", not
//! "all of it within that long", so a message that takes longer than the timeout to cross
//! gets through; and a link that dies is still given up once nothing moves.

use std::sync::Arc;
use std::time::Duration;

use ksync_core::{Event, InMemoryStorage, KSync, Notification, Storage, SyncClient};
use ksync_testkit::{SlowLink, noise};
use ksync_ws::server::RelayConfig;
use ksync_ws::{WebSocketSyncClient, WebSocketSyncClientBuilder, WsError};
use serde_json::json;

use crate::common::{self, Recorder, eventually};

/// The link's speed each way. At this speed the messages below take 1-1.5 s to cross, some
/// three times the timeouts, which is what the whole-message timeouts cut off.
const RATE: usize = 512 * 1024;
/// The timeouts under test: short against the transfers, long against a busy test machine's
/// scheduling gaps.
const TIMEOUT: Duration = Duration::from_millis(400);

fn big(id: &str, len: usize, seed: u64) -> Event {
    Event::new(id, "note", json!(noise(len, seed)), 1)
}

/// What went wrong on `rec`'s client, as its error notifications say.
fn errors(rec: &Recorder) -> Vec<String> {
    rec.all()
        .into_iter()
        .filter_map(|n| match n {
            Notification::Error(e) => Some(e.to_string()),
            _ => None,
        })
        .collect()
}

fn gave_up_on_heartbeat(rec: &Recorder) -> bool {
    rec.all().iter().any(|n| {
        matches!(n, Notification::Error(e)
            if matches!(WsError::find(e), Some(WsError::HeartbeatTimeout(_))))
    })
}

/// Six events of 110 KB in room `slow` (one catch-up page of ~660 KB), published directly.
async fn backlog(server: &common::Server) {
    let direct = WebSocketSyncClient::new(server.url(Some("slow"))).expect("client");
    direct.connect().await.expect("connect");
    for i in 0..6 {
        direct
            .send(big(&format!("e{i}"), 110_000, i + 1))
            .await
            .expect("send");
    }
    eventually("the backlog acknowledged", || direct.outbox_len() == 0).await;
    direct.disconnect().await.expect("disconnect");
}

/// A replica of room `slow` through `link`, its client built by `configure` (with a
/// recorder attached), connected and caught up on the backlog with no reconnection.
async fn caught_up_over(
    link: &SlowLink,
    configure: impl FnOnce(WebSocketSyncClientBuilder) -> WebSocketSyncClientBuilder,
) -> (KSync<WebSocketSyncClient>, Recorder) {
    let client = configure(WebSocketSyncClient::builder(format!(
        "ws://{}/ws/slow",
        link.addr()
    )))
    .build()
    .expect("client");
    let rec = Recorder::attach(&client);
    let storage = Arc::new(InMemoryStorage::new());
    let ksync = ksync_testkit::ksync_over(storage.clone(), client)
        .await
        .expect("ksync");
    ksync.connect().await.expect("connect");
    eventually("the backlog caught up", || storage.len() == 6).await;
    assert_eq!(
        rec.reconnect_attempts(),
        Vec::<u32>::new(),
        "{:?}",
        errors(&rec)
    );
    (ksync, rec)
}

/// A publish of 700 KB through the link takes over a second while `heartbeat_timeout` is
/// 400 ms. Before, the client bounded the whole send by `heartbeat_timeout`: it gave up,
/// reconnected and sent it again, for good, and the event never got through. Once the link is
/// cut, a publish is still given up (`heartbeat_timeout` after the link took its last byte).
#[tokio::test]
async fn a_large_publish_over_a_slow_link_gets_through_and_a_cut_link_is_given_up() {
    let server = common::start(RelayConfig::default()).await;
    let link = SlowLink::start(server.addr, RATE).await;
    let client = WebSocketSyncClient::builder(format!("ws://{}/ws/slow", link.addr()))
        .heartbeat_timeout(TIMEOUT)
        .build()
        .expect("client");
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    client.send(big("big", 700_000, 7)).await.expect("send");
    eventually("the publish acknowledged", || client.outbox_len() == 0).await;
    assert_eq!(
        rec.reconnect_attempts(),
        Vec::<u32>::new(),
        "{:?}",
        errors(&rec)
    );
    assert_eq!(errors(&rec), Vec::<String>::new());

    link.cut();
    client.send(big("lost", 700_000, 8)).await.expect("send");
    eventually("the cut link given up", || gave_up_on_heartbeat(&rec)).await;
    assert_eq!(client.outbox_len(), 1, "kept for the next connection");
}

/// A subscriber resuming from 0 through the link gets a ~660 KB catch-up page, over a second
/// on the link, while the relay's `write_timeout` is 400 ms. Before, the relay bounded the
/// whole page by `write_timeout` and dropped the connection, on every reconnection: the
/// subscriber never caught up. Once the link is cut, the relay still drops the subscriber its
/// next large frame does not reach.
#[tokio::test]
async fn a_large_catch_up_page_over_a_slow_link_gets_through_and_a_cut_link_is_dropped() {
    let server = common::start({
        let mut relay_config = RelayConfig::default();
        relay_config.write_timeout = TIMEOUT;
        relay_config
    })
    .await;
    backlog(&server).await;
    let link = SlowLink::start(server.addr, RATE).await;
    let (_ksync, _rec) = caught_up_over(&link, |builder| builder).await;

    eventually("the backlog's publisher gone", || {
        server.relay.connections() == 1
    })
    .await;
    link.cut();
    let publisher = WebSocketSyncClient::new(server.url(Some("slow"))).expect("client");
    publisher.connect().await.expect("connect");
    publisher.send(big("more", 700_000, 9)).await.expect("send");
    // The publisher stays; the subscriber behind the cut link is dropped.
    eventually("the cut subscriber dropped", || {
        server.relay.connections() == 1
    })
    .await;
    assert!(publisher.is_connected());
}

/// The same page to a client pinging every 200 ms with a `heartbeat_timeout` of 400 ms: the
/// relay's pong waits behind the page, over a second. Before, the client gave up on a server
/// whose bytes kept coming, on every reconnection, and never caught up; now bytes read after
/// a ping answer it as long as they keep coming. Once the link is cut nothing comes, and the
/// server is given up.
#[tokio::test]
async fn bytes_of_a_large_message_still_coming_answer_a_ping_but_a_cut_link_is_given_up() {
    let server = common::start(RelayConfig::default()).await;
    backlog(&server).await;
    let link = SlowLink::start(server.addr, RATE).await;
    let (_ksync, rec) = caught_up_over(&link, |builder| {
        builder
            .heartbeat(Duration::from_millis(200))
            .heartbeat_timeout(TIMEOUT)
    })
    .await;

    link.cut();
    eventually("the cut link given up", || gave_up_on_heartbeat(&rec)).await;
}

/// The relay behind TLS on 127.0.0.1:0, with a certificate for `localhost` made for the test
/// (its PEM returned for the client to trust): the bytes a `wss://` client writes go through
/// rustls, which takes plaintext at once and writes the records when flushed.
async fn start_wss(config: RelayConfig) -> (common::Server, String) {
    struct TlsListener {
        tcp: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    }
    impl axum::serve::Listener for TlsListener {
        type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
        type Addr = std::net::SocketAddr;
        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((tcp, peer)) = self.tcp.accept().await else {
                    continue;
                };
                tcp.set_nodelay(true).expect("nodelay");
                if let Ok(tls) = self.acceptor.accept(tcp).await {
                    return (tls, peer);
                }
            }
        }
        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = tcp.local_addr().expect("addr");
    let relay = ksync_ws::server::Relay::new(
        config,
        Arc::new(ksync_core::InMemoryProvider::new()),
        Arc::new(ksync_core::AllowAll),
    )
    .expect("relay");
    let listener = TlsListener {
        tcp,
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
    };
    let router = relay.router();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    (common::Server { addr, relay, task }, cert.pem())
}

/// A publish of 300 KB over `wss://` through a 192 KiB/s link (1.5 s) against a 400 ms
/// `heartbeat_timeout` gets through: the write bound holds through TLS too (a send bounded
/// as a whole fails this). The client watches its TCP stream below TLS: rustls takes
/// plaintext in `poll_write` and writes the records in `poll_flush`, so watched above it the
/// last records of a send (up to rustls' 64 KiB) counted as no progress. On loopback that
/// tail is hidden in the wait the kernel imposes anyway (it wakes a writer only once a good
/// part of its send buffer is free: some 55 KiB here), so this test does not tell the two
/// apart: watched above TLS it passes on an idle machine, and fails under load. The unit
/// test `progress::watched_below_tls_a_flush_that_moves_bytes_is_progress` does, in memory.
#[tokio::test]
async fn a_large_publish_over_a_slow_wss_link_gets_through() {
    let (server, pem) = start_wss(RelayConfig::default()).await;
    let link = SlowLink::start(server.addr, 192 * 1024).await;
    let client =
        WebSocketSyncClient::builder(format!("wss://localhost:{}/ws/slow", link.addr().port()))
            .tls_root_certificates_pem(&pem)
            .heartbeat_timeout(TIMEOUT)
            .build()
            .expect("client");
    let rec = Recorder::attach(&client);
    client.connect().await.expect("connect");
    client.send(big("big", 300_000, 7)).await.expect("send");
    eventually("the publish acknowledged or given up", || {
        client.outbox_len() == 0 || !errors(&rec).is_empty()
    })
    .await;
    assert_eq!(errors(&rec), Vec::<String>::new());
    assert_eq!(rec.reconnect_attempts(), Vec::<u32>::new());
    assert_eq!(client.outbox_len(), 0);
}
