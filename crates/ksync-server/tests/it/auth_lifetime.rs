//! Credentials against the composed server on 127.0.0.1:0: a WebSocket (relay or monitor
//! feed) does not outlive its JWT (close 4401), every 401 carries a `WWW-Authenticate` challenge (WebSocket upgrade and
//! repository service alike), the failure limiter's 0 means "no limit", and an API key works
//! as a bearer token whatever its characters.
#![allow(clippy::unwrap_used)] // tests may unwrap

use crate::common;

use common::*;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use ksync_server::{ApiKey, AuthConfig, JwtKey, RateLimit, Server};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const SECRET: &str = "lifetime-test-secret-0123456789abcdef";
const KEY: &str = "k-lifetime-0001";

fn auth(max_failures: u32) -> AuthConfig {
    {
        let mut auth_config = AuthConfig::default();
        auth_config.jwt_keys = vec![JwtKey::hs256(SECRET)];
        auth_config.api_keys = vec![ApiKey::new("bot", KEY)];
        // Expiry to the second, so that the test does not wait out the default 5 s.
        auth_config.leeway = Duration::ZERO;
        auth_config.rate_limit = {
            let mut rate_limit = RateLimit::default();
            rate_limit.max_failures = max_failures;
            rate_limit
        };
        auth_config
    }
}

fn token(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn connect(url: &str, header: Option<(&str, &str)>) -> Result<Ws, WsError> {
    let mut request = url.into_client_request().unwrap();
    if let Some((name, value)) = header {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

async fn hello(ws: &mut Ws) {
    let hello = json!({"type": "hello", "protocol": 1});
    ws.send(Message::text(hello.to_string())).await.unwrap();
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => {
                let welcome: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(welcome["type"], "welcome", "{welcome}");
                return;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The status and `WWW-Authenticate` of a refused upgrade.
fn refusal(result: Result<Ws, WsError>) -> (u16, Option<String>) {
    match result {
        Err(WsError::Http(response)) => (
            response.status().as_u16(),
            response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned()),
        ),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got a connection"),
    }
}

#[tokio::test]
async fn a_websocket_is_closed_with_4401_when_its_jwt_expires() {
    let running = Server::bind(config(auth(10))).await.unwrap();
    let addr = running.local_addr();
    let url = format!("ws://{addr}/ws/lobby");
    let now = get_current_timestamp();
    let short = token(&json!({"sub": "short", "exp": now + 2}));
    let long = token(&json!({"sub": "long", "exp": now + 3600}));

    let mut expiring = connect(&url, Some(("authorization", &format!("Bearer {short}"))))
        .await
        .unwrap();
    hello(&mut expiring).await;
    let mut lasting = connect(&url, Some(("authorization", &format!("Bearer {long}"))))
        .await
        .unwrap();
    hello(&mut lasting).await;
    let mut keyed = connect(&url, Some(("x-api-key", KEY))).await.unwrap();
    hello(&mut keyed).await;

    // The monitor feed, opened with the same token, ends with it too.
    let monitor_url = format!("ws://{addr}/monitor");
    let mut monitor = connect(
        &monitor_url,
        Some(("authorization", &format!("Bearer {short}"))),
    )
    .await
    .unwrap();
    hello(&mut monitor).await;

    assert_eq!(close_code(&mut expiring).await, 4401);
    assert_eq!(close_code(&mut monitor).await, 4401);
    // The same token cannot open a new connection, ...
    let (status, challenge) =
        refusal(connect(&url, Some(("authorization", &format!("Bearer {short}")))).await);
    assert_eq!(status, 401);
    assert!(challenge.unwrap().contains("token expired"));
    // ... and connections with credentials still valid (a later exp, an API key) go on.
    for ws in [&mut lasting, &mut keyed] {
        let publish = json!({"type": "publish", "ref": 1, "events": []});
        ws.send(Message::text(publish.to_string())).await.unwrap();
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => {
                    let ack: Value = serde_json::from_str(&t).unwrap();
                    if ack["type"] == "ack" {
                        break;
                    }
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_401_carries_a_www_authenticate_challenge() {
    let running = Server::bind(config(auth(100))).await.unwrap();
    let addr = running.local_addr();
    let url = format!("ws://{addr}/ws/lobby");
    let expired = token(&json!({"exp": get_current_timestamp() - 60}));

    // WebSocket upgrades: without credentials the challenge names the scheme and realm only;
    // refused credentials add RFC 6750's error and why (never the credential).
    assert_eq!(
        refusal(connect(&url, None).await),
        (401, Some(r#"Bearer realm="ksync""#.to_owned()))
    );
    let (status, challenge) = refusal(connect(&url, Some(("x-api-key", "k-wrong-9"))).await);
    assert_eq!(status, 401);
    let challenge = challenge.unwrap();
    assert!(
        challenge.starts_with(r#"Bearer realm="ksync", error="invalid_token""#),
        "{challenge}"
    );
    assert!(!challenge.contains("k-wrong-9"), "{challenge}");
    let (status, challenge) =
        refusal(connect(&url, Some(("authorization", &format!("Bearer {expired}")))).await);
    assert_eq!(status, 401);
    assert!(
        challenge
            .unwrap()
            .contains(r#"error_description="token expired""#)
    );

    // The monitor feed, plain GET and upgrade alike.
    let monitor = reqwest::get(format!("http://{addr}/monitor"))
        .await
        .unwrap();
    assert_eq!(monitor.status(), 401);
    assert_eq!(
        monitor.headers().get("www-authenticate").unwrap(),
        r#"Bearer realm="ksync""#
    );
    let (status, challenge) = refusal(
        connect(
            &format!("ws://{addr}/monitor"),
            Some(("authorization", &format!("Bearer {expired}"))),
        )
        .await,
    );
    assert_eq!(status, 401);
    assert!(
        challenge
            .unwrap()
            .contains(r#"error_description="token expired""#)
    );

    // The repository service, on reads and writes.
    let http = reqwest::Client::new();
    for request in [
        http.get(format!("http://{addr}/git/notes")),
        http.put(format!("http://{addr}/git/notes")),
        http.get(format!("http://{addr}/git/notes"))
            .bearer_auth(&expired),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let challenge = response
            .headers()
            .get("www-authenticate")
            .expect("a challenge on 401")
            .to_str()
            .unwrap();
        assert!(
            challenge.starts_with(r#"Bearer realm="ksync""#),
            "{challenge}"
        );
    }
    // Not on other statuses: a valid key gets its answer without one.
    let found = http
        .get(format!("http://{addr}/git/notes"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(found.status(), 404);
    assert!(found.headers().get("www-authenticate").is_none());
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn max_failures_zero_means_no_limit() {
    let running = Server::bind(config(auth(0))).await.unwrap();
    let addr = running.local_addr();
    let url = format!("ws://{addr}/ws/lobby");
    let http = reqwest::Client::new();
    // Far more failures than the default limit (10), over both transports.
    for _ in 0..15 {
        assert_eq!(
            refusal(connect(&url, Some(("x-api-key", "guess"))).await).0,
            401
        );
        let git = http
            .get(format!("http://{addr}/git/notes"))
            .header("x-api-key", "guess")
            .send()
            .await
            .unwrap();
        assert_eq!(git.status(), 401);
    }
    let mut ws = connect(&url, Some(("x-api-key", KEY))).await.unwrap();
    hello(&mut ws).await;
    let metrics = metrics(addr).await;
    assert!(metrics.contains("ksync_auth_refused_total 30"), "{metrics}");
    assert!(
        metrics.contains("ksync_auth_rate_limited_total 0"),
        "{metrics}"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_api_key_with_dots_works_as_a_bearer_token() {
    const DOTTED: &str = "team.ci-bot.k3y";
    let mut config = auth(100);
    config.api_keys.push(ApiKey::new("dotted", DOTTED));
    let running = Server::bind(self::config(config)).await.unwrap();
    let addr = running.local_addr();
    let bearer = format!("Bearer {DOTTED}");
    let mut ws = connect(
        &format!("ws://{addr}/ws/lobby"),
        Some(("authorization", &bearer)),
    )
    .await
    .unwrap();
    hello(&mut ws).await;
    let created = reqwest::Client::new()
        .put(format!("http://{addr}/git/notes"))
        .bearer_auth(DOTTED)
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    // A JWT is still read as one, and a wrong dotted key is still refused.
    let jwt = token(&json!({"exp": get_current_timestamp() + 60}));
    assert!(
        connect(
            &format!("ws://{addr}/ws/lobby"),
            Some(("authorization", &format!("Bearer {jwt}")))
        )
        .await
        .is_ok()
    );
    assert_eq!(
        refusal(
            connect(
                &format!("ws://{addr}/ws/lobby"),
                Some(("authorization", "Bearer team.ci-bot.wrong"))
            )
            .await
        )
        .0,
        401
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn empty_credential_headers_are_no_credentials_on_both_transports() {
    // One presented-and-refused credential would lock this client out.
    let running = Server::bind(config(auth(1))).await.unwrap();
    let addr = running.local_addr();
    let url = format!("ws://{addr}/ws/lobby");
    let http = reqwest::Client::new();
    for _ in 0..3 {
        for (name, value) in [("x-api-key", ""), ("authorization", "Bearer ")] {
            // "credentials required": the challenge without an error, and nothing counted.
            assert_eq!(
                refusal(connect(&url, Some((name, value))).await),
                (401, Some(r#"Bearer realm="ksync""#.to_owned())),
                "{name}: {value:?} over WebSocket"
            );
            let git = http
                .get(format!("http://{addr}/git/notes"))
                .header(name, value)
                .send()
                .await
                .unwrap();
            assert_eq!(git.status(), 401);
            assert_eq!(
                git.headers().get("www-authenticate").unwrap(),
                r#"Bearer realm="ksync""#,
                "{name}: {value:?} over HTTP"
            );
        }
    }
    let mut ws = connect(&url, Some(("x-api-key", KEY))).await.unwrap();
    hello(&mut ws).await;
    running.shutdown().await.unwrap();
}
