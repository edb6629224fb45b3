//! The composed server in-process on 127.0.0.1:0 with real WebSocket and HTTP clients: the
//! relay and the repository service are mounted, auth admits and refuses, shutdown closes
//! WebSockets with 1001 and flushes.
#![allow(clippy::unwrap_used)] // tests may unwrap

use crate::common;

use common::*;

use std::time::Duration;

use futures_util::StreamExt;
use ksync_server::{ApiKey, AuthConfig, RateLimit, Scope, Server};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const FULL_KEY: &str = "full-key-7f3a9c";
const READ_KEY: &str = "read-key-1b2c3d";

fn keys(max_failures: u32) -> AuthConfig {
    {
        let mut auth_config = AuthConfig::default();
        auth_config.api_keys = vec![
            ApiKey::new("writer", FULL_KEY),
            ApiKey::new("reader", READ_KEY).with_scope(Scope::READ),
        ];
        auth_config.rate_limit = {
            let mut rate_limit = RateLimit::default();
            rate_limit.max_failures = max_failures;
            rate_limit
        };
        auth_config
    }
}

async fn connect(url: &str, api_key: Option<&str>) -> Result<Ws, WsError> {
    let mut request = url.into_client_request().unwrap();
    if let Some(key) = api_key {
        request
            .headers_mut()
            .insert("x-api-key", key.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

fn refusal_status(result: Result<Ws, WsError>) -> u16 {
    match result {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got a connection"),
    }
}

async fn hello(ws: &mut Ws) -> Value {
    send(ws, json!({"type": "hello", "protocol": 1, "since": 0})).await;
    let welcome = recv(ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    welcome
}

#[tokio::test]
async fn relay_is_mounted_at_root_ws_and_rooms_and_fans_out() {
    let running = Server::bind(config(AuthConfig::default())).await.unwrap();
    let addr = running.local_addr();

    // `ws://host:port` alone is the default room, the same as `/ws`.
    let mut publisher = connect(&format!("ws://{addr}"), None).await.unwrap();
    let mut subscriber = connect(&format!("ws://{addr}/ws"), None).await.unwrap();
    assert_eq!(hello(&mut publisher).await["room"], "default");
    assert_eq!(hello(&mut subscriber).await["room"], "default");
    send(
        &mut publisher,
        json!({"type": "publish", "ref": 1, "events": [event("a")]}),
    )
    .await;
    let ack = recv(&mut publisher).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["results"][0]["status"], "stored");
    let events = recv(&mut subscriber).await;
    assert_eq!(events["type"], "events");
    assert_eq!(events["events"][0]["event"]["id"], "a");

    let mut other_room = connect(&format!("ws://{addr}/ws/chat"), None)
        .await
        .unwrap();
    assert_eq!(hello(&mut other_room).await["room"], "chat");

    let health: Value = serde_json::from_str(
        &reqwest::get(format!("http://{addr}/health"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(health["rooms"], 2);
    assert_eq!(health["connections"], 3);

    // Plain HTTP on `/` describes the server instead of failing.
    let info: Value = serde_json::from_str(
        &reqwest::get(format!("http://{addr}/"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(info["name"], "ksync");

    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn repository_service_is_mounted() {
    let running = Server::bind(config(AuthConfig::default())).await.unwrap();
    let addr = running.local_addr();
    let client = reqwest::Client::new();
    let created = client
        .put(format!("http://{addr}/git/notes"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let missing = client
        .get(format!("http://{addr}/git/absent"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let health: Value = serde_json::from_str(
        &client
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(health["repos"], 1);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn websocket_auth_admits_and_refuses() {
    let running = Server::bind(config(keys(100))).await.unwrap();
    let addr = running.local_addr();
    let url = format!("ws://{addr}/ws/lobby");

    assert_eq!(
        refusal_status(connect(&url, None).await),
        401,
        "no credentials"
    );
    assert_eq!(
        refusal_status(connect(&url, Some("not-a-key")).await),
        401,
        "wrong key"
    );
    assert_eq!(
        refusal_status(connect(&format!("ws://{addr}"), None).await),
        401,
        "root upgrade needs credentials too"
    );

    let mut writer = connect(&url, Some(FULL_KEY)).await.unwrap();
    hello(&mut writer).await;
    send(
        &mut writer,
        json!({"type": "publish", "ref": 1, "events": [event("w1")]}),
    )
    .await;
    assert_eq!(recv(&mut writer).await["results"][0]["status"], "stored");

    // A read-only key is admitted, receives, and cannot write.
    let mut reader = connect(&url, Some(READ_KEY)).await.unwrap();
    send(
        &mut reader,
        json!({"type": "hello", "protocol": 1, "since": 0}),
    )
    .await;
    assert_eq!(recv(&mut reader).await["type"], "welcome");
    let caught_up = recv(&mut reader).await;
    assert_eq!(caught_up["events"][0]["event"]["id"], "w1");
    send(
        &mut reader,
        json!({"type": "publish", "ref": 2, "events": [event("r1")]}),
    )
    .await;
    let refused = recv(&mut reader).await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "forbidden");

    // Git routes are behind the same auth.
    let client = reqwest::Client::new();
    let anonymous = client
        .put(format!("http://{addr}/git/notes"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let read_only = client
        .put(format!("http://{addr}/git/notes"))
        .header("x-api-key", READ_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(read_only.status(), 403);

    // Health stays open, and nothing the reader sent was stored.
    let health = reqwest::get(format!("http://{addr}/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    let room = ksync_core::LogName::Room(ksync_core::Name::new("lobby").unwrap());
    let storage = running.provider().existing(&room).unwrap().unwrap();
    assert_eq!(storage.len(), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn repeated_websocket_failures_are_rate_limited() {
    let running = Server::bind(config(keys(3))).await.unwrap();
    let addr = running.local_addr();
    let url = format!("ws://{addr}/ws/lobby");
    for _ in 0..3 {
        assert_eq!(refusal_status(connect(&url, Some("guess")).await), 401);
    }
    // Now refused before the credentials are even looked at, over WebSocket and HTTP alike.
    assert_eq!(refusal_status(connect(&url, Some(FULL_KEY)).await), 429);
    let git = reqwest::Client::new()
        .get(format!("http://{addr}/git/notes"))
        .header("x-api-key", FULL_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(git.status(), 429);
    let metrics = metrics(addr).await;
    assert!(metrics.contains("ksync_auth_refused_total 3"), "{metrics}");
    assert!(
        metrics.contains("ksync_auth_rate_limited_total 2"),
        "{metrics}"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_closes_websockets_with_going_away_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let on_disk = {
        let mut server_config = config(AuthConfig::default());
        server_config.in_memory = false;
        server_config.data_dir = dir.path().to_owned();
        server_config
    };
    let running = Server::bind(on_disk.clone()).await.unwrap();
    let addr = running.local_addr();
    let mut ws = connect(&format!("ws://{addr}/ws/journal"), None)
        .await
        .unwrap();
    hello(&mut ws).await;
    send(
        &mut ws,
        json!({"type": "publish", "ref": 1, "events": [event("e1"), event("e2")]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["results"][1]["status"], "stored");

    let shutdown = tokio::spawn(running.shutdown());
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("closed within 10 s")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("expected a close frame, got {e}"),
            None => panic!("stream ended without a close frame"),
        }
    };
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    shutdown.await.unwrap().unwrap();

    // The same data directory after a restart holds both events.
    let restarted = Server::bind(on_disk).await.unwrap();
    let room = ksync_core::LogName::Room(ksync_core::Name::new("journal").unwrap());
    let storage = restarted.provider().existing(&room).unwrap().unwrap();
    assert_eq!(storage.len(), 2);
    restarted.shutdown().await.unwrap();
}

/// Connects the browser way: the `ksync.v1` subprotocol, and the credential (if any) as
/// another entry (`ksync.apikey.<key>`, `ksync.auth.<token>`).
async fn connect_offering_subprotocol(url: &str, credential: Option<&str>) -> Ws {
    let mut request = url.into_client_request().unwrap();
    let mut protocols = "ksync.v1".to_owned();
    if let Some(entry) = credential {
        protocols.push_str(&format!(", {entry}"));
    }
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("upgraded: refusals come in-band");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "ksync.v1",
        "only ksync.v1 is echoed"
    );
    ws
}

/// The `error` code and the close code of an in-band refusal.
async fn in_band_refusal(ws: &mut Ws) -> (String, u16) {
    let error = recv(ws).await;
    assert_eq!(error["type"], "error", "{error}");
    let code = error["code"].as_str().unwrap().to_owned();
    (code, close_code(ws).await)
}

/// A browser cannot read the status of a refused upgrade, so a client offering `ksync.v1` is
/// refused after the upgrade, with an `error` and a close code it can act on; the HTTP
/// refusals stay for everyone else.
#[tokio::test]
async fn clients_offering_the_subprotocol_are_refused_in_band() {
    let running = Server::bind(config(keys(3))).await.unwrap();
    let addr = running.local_addr();
    let lobby = format!("ws://{addr}/ws/lobby");
    let full = format!("ksync.apikey.{FULL_KEY}");

    let mut ws = connect_offering_subprotocol(&lobby, None).await;
    assert_eq!(
        in_band_refusal(&mut ws).await,
        ("unauthorized".into(), 4401)
    );
    let mut ws = connect_offering_subprotocol(&lobby, Some("ksync.apikey.not-a-key")).await;
    assert_eq!(
        in_band_refusal(&mut ws).await,
        ("unauthorized".into(), 4401)
    );
    let bad_room = format!("ws://{addr}/ws/{}", "r".repeat(300));
    let mut ws = connect_offering_subprotocol(&bad_room, Some(&full)).await;
    assert_eq!(in_band_refusal(&mut ws).await, ("bad_room".into(), 4400));
    // Without the subprotocol: the HTTP answer, as before.
    assert_eq!(
        refusal_status(connect(&bad_room, Some(FULL_KEY)).await),
        400
    );

    // The right key through the subprotocol is admitted.
    let mut ws = connect_offering_subprotocol(&lobby, Some(&full)).await;
    hello(&mut ws).await;
    drop(ws);

    // One wrong key so far (no credential is not a failure); two more make this client
    // rate-limited. The relay then refuses it in-band with 4429 even with the right key, and
    // the HTTP path still says 429.
    for guess in ["ksync.apikey.guess-1", "ksync.apikey.guess-2"] {
        let mut ws = connect_offering_subprotocol(&lobby, Some(guess)).await;
        assert_eq!(
            in_band_refusal(&mut ws).await,
            ("unauthorized".into(), 4401)
        );
    }
    let mut ws = connect_offering_subprotocol(&lobby, Some(&full)).await;
    assert_eq!(
        in_band_refusal(&mut ws).await,
        ("rate_limited".into(), 4429)
    );
    assert_eq!(refusal_status(connect(&lobby, Some(FULL_KEY)).await), 429);
    let metrics = metrics(addr).await;
    // Refused: none, not-a-key, guess-1, guess-2.
    assert!(metrics.contains("ksync_auth_refused_total 4"), "{metrics}");
    assert!(
        metrics.contains("ksync_auth_rate_limited_total 2"),
        "{metrics}"
    );
    // Refused connections are not relay connections.
    assert!(metrics.contains("ksync_ws_connections 0"), "{metrics}");
    running.shutdown().await.unwrap();
}

async fn connect_bearer(url: &str, token: &str) -> Result<Ws, WsError> {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

#[tokio::test]
async fn websocket_jwt_matrix() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
    const SECRET: &str = "relay-test-secret-0123456789abcdef0123";
    let running = Server::bind(config({
        let mut auth_config = AuthConfig::default();
        auth_config.jwt_keys = vec![ksync_server::JwtKey::hs256(SECRET)];
        auth_config.audience = vec!["ksync".into()];
        auth_config
    }))
    .await
    .unwrap();
    let addr = running.local_addr();
    let token = |claims: Value| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let now = get_current_timestamp();
    let lobby = format!("ws://{addr}/ws/lobby");

    let good = token(json!({"sub": "u1", "exp": now + 300, "aud": "ksync", "rooms": ["lobby"]}));
    let mut ws = connect_bearer(&lobby, &good).await.unwrap();
    hello(&mut ws).await;
    let secret_room = format!("ws://{addr}/ws/secret");
    assert_eq!(
        refusal_status(connect_bearer(&secret_room, &good).await),
        403,
        "wrong room"
    );
    let mut ws =
        connect_offering_subprotocol(&secret_room, Some(&format!("ksync.auth.{good}"))).await;
    assert_eq!(
        in_band_refusal(&mut ws).await,
        ("forbidden".into(), 4403),
        "wrong room, in-band"
    );
    let expired = token(json!({"exp": now - 60, "aud": "ksync"}));
    assert_eq!(refusal_status(connect_bearer(&lobby, &expired).await), 401);
    let early = token(json!({"exp": now + 300, "nbf": now + 120, "aud": "ksync"}));
    assert_eq!(refusal_status(connect_bearer(&lobby, &early).await), 401);
    let wrong_aud = token(json!({"exp": now + 300, "aud": "other"}));
    assert_eq!(
        refusal_status(connect_bearer(&lobby, &wrong_aud).await),
        401
    );
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(json!({"exp": now + 300, "aud": "ksync"})
            .to_string()
            .as_bytes())
    );
    assert_eq!(refusal_status(connect_bearer(&lobby, &none).await), 401);

    // A read-only token publishing: refused, nothing stored.
    let reader = token(json!({"exp": now + 300, "aud": "ksync", "scope": "read"}));
    let mut ws = connect_bearer(&lobby, &reader).await.unwrap();
    hello(&mut ws).await;
    send(
        &mut ws,
        json!({"type": "publish", "ref": 1, "events": [event("x")]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "forbidden");
    let room = ksync_core::LogName::Room(ksync_core::Name::new("lobby").unwrap());
    assert_eq!(
        running.provider().existing(&room).unwrap().unwrap().len(),
        0
    );
    running.shutdown().await.unwrap();
}

/// The room queues' byte budgets (`Limits::room_queue_bytes`, `room_queues_total_bytes`)
/// reach the relay as given; a relay-wide budget below one room's is refused when the server
/// is made, naming both: one room stuck on its disk would hold all of it, and publishes to
/// every room would wait.
#[test]
fn room_queue_budgets_reach_the_relay_and_an_inconsistent_pair_is_refused() {
    let with = |room_queue_bytes, room_queues_total_bytes| {
        let mut server_config = config(AuthConfig::default());
        server_config.limits = {
            let mut limits = ksync_server::Limits::default();
            limits.room_queue_bytes = room_queue_bytes;
            limits.room_queues_total_bytes = room_queues_total_bytes;
            limits
        };
        server_config
    };
    match Server::new(with(2 << 20, (2 << 20) - 1)).err() {
        Some(ksync_server::ServerError::Config(message)) => assert!(
            message.contains("room_queues_total_bytes (2097151)")
                && message.contains("room_queue_bytes (2097152)"),
            "{message}"
        ),
        other => panic!("expected a configuration error, got {other:?}"),
    }
    let server = Server::new(with(2 << 20, 2 << 20)).unwrap();
    let relay = server.relay().config();
    assert_eq!(
        (relay.room_queue_bytes, relay.room_queues_total_bytes),
        (2 << 20, 2 << 20)
    );
    let server = Server::new(with(3 << 20, 5 << 20)).unwrap();
    let relay = server.relay().config();
    assert_eq!(
        (relay.room_queue_bytes, relay.room_queues_total_bytes),
        (3 << 20, 5 << 20)
    );
}
