//! Nothing secret reaches the logs: two replicas with `debug` on, an API key and a JWT, taps on
//! both sides and encrypted `user_data`, through a real relay on 127.0.0.1:0, with every
//! target captured at TRACE. The plaintext of encrypted data and the credentials never appear,
//! on any line (the client writes its own upgrade request: tungstenite's handshake logged it
//! whole at TRACE, credentials included).
//!
//! A binary of its own: the subscriber is process-wide (see `tap_log.rs`).

mod common;

use std::sync::Arc;

use ksync_core::{Auth, Direction, InMemoryStorage};
use ksync_middleware::{Decrypt, Encrypt, FieldCipher, Tap};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;

use common::{Captured, TestRelay, until};

const API_KEY: &str = "k-live-4f1c9a7e2b";
const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJlLXNlY3JldA";
const PLAINTEXT: &str = "ssn-123-45-6789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_encrypted_plaintext_never_reach_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let relay = TestRelay::start().await;
    let url = relay.url("logged");
    let cipher = FieldCipher::from_key([11; 32]);
    let replica = |auth: Auth| {
        let url = url.clone();
        async move {
            ksync_testkit::ksync_over(
                Arc::new(InMemoryStorage::new()),
                WebSocketSyncClient::builder(url.as_str())
                    .auth(auth)
                    .debug(true)
                    .build()
                    .expect("client"),
            )
            .await
            .expect("ksync")
        }
    };
    let alice = replica(Auth::api_key(API_KEY)).await;
    let bob = replica(Auth::jwt(JWT)).await;
    // Taps before encryption on the way out and after decryption on the way in: where they
    // see the plaintext.
    alice
        .client()
        .use_middleware(Direction::Outgoing, Tap::new("alice-out"));
    alice
        .client()
        .use_middleware(Direction::Outgoing, Encrypt::new(cipher.clone()));
    bob.client()
        .use_middleware(Direction::Incoming, Decrypt::new(cipher));
    bob.client()
        .use_middleware(Direction::Incoming, Tap::new("bob-in"));
    alice.connect().await.expect("connect");
    bob.connect().await.expect("connect");

    let secret = alice
        .emit("user_data", json!({"ssn": PLAINTEXT}))
        .await
        .expect("emit");
    until(|| bob.state().expect("state").contains_key(&secret.id)).await;
    assert_eq!(bob.state().expect("state")[&secret.id], secret);
    alice.disconnect().await.expect("disconnect");
    bob.disconnect().await.expect("disconnect");
    relay.stop().await;

    let log = String::from_utf8_lossy(&captured.0.lock().expect("lock")).into_owned();
    assert!(
        log.contains("alice-out") && log.contains("bob-in"),
        "the taps logged: {log}"
    );
    let leaks: Vec<String> = [API_KEY, JWT, PLAINTEXT]
        .into_iter()
        .filter_map(|secret| {
            let line = log.lines().find(|line| line.contains(secret))?;
            Some(format!("{secret:?} in: {}", &line[..line.len().min(400)]))
        })
        .collect();
    assert!(leaks.is_empty(), "{leaks:#?}");
}
