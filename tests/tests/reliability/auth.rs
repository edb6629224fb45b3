//! Auth, end to end against both servers (the WebSocket relay and the Git HTTP service) of a
//! real `ksync-server` child process whose tracing output (TRACE level) is captured: the full
//! JWT and API-key matrix, rights (read-only writing, another repository), secrets never in
//! the logs, and failed attempts rate limited.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use ksync_server::{ApiKey, AuthConfig, JwtKey, RateLimit, Scope, ServerConfig};
use ksync_tests::{child, figures};
use serde_json::{Value, json};

use crate::common::*;

const CHILD_ENV: &str = "KSYNC_TEST_AUTH_SERVER";
const MAX_FAILURES_ENV: &str = "KSYNC_TEST_AUTH_MAX_FAILURES";
const HS_SECRET: &str = "hs-secret-7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e";
const RSA_PRIVATE: &[u8] = include_bytes!("../../fixtures/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../fixtures/rsa-public.pem");
const RSA_OTHER_PRIVATE: &[u8] = include_bytes!("../../fixtures/rsa-other-private.pem");
const KEY_RW: &str = "apikey-rw-5d1c8e2a7b9f";
const KEY_RO: &str = "apikey-ro-3e6b0a4c8d2f";
const KEY_REPO_A: &str = "apikey-onlya-9a7c5e3b1d";
const KEY_WRONG: &str = "apikey-wrong-0f2e4d6c8b";
const AUD: &str = "ksync-test";
const ISS: &str = "https://issuer.test";

fn auth_config(max_failures: u32) -> AuthConfig {
    {
        let mut auth_config = AuthConfig::default();
        auth_config.jwt_keys = vec![
            JwtKey::hs256(HS_SECRET).with_kid("hs-1"),
            JwtKey::rs256_pem(RSA_PUBLIC.to_vec()).with_kid("rs-1"),
        ];
        auth_config.audience = vec![AUD.into()];
        auth_config.issuer = vec![ISS.into()];
        auth_config.leeway = Duration::from_secs(5);
        auth_config.api_keys = vec![
            ApiKey::new("rw", KEY_RW),
            ApiKey::new("ro", KEY_RO).with_scope(Scope::READ),
            ApiKey::new("only-a", KEY_REPO_A)
                .with_rooms(vec!["a".into()])
                .with_repos(vec!["a".into()]),
        ];
        auth_config.rate_limit = {
            let mut rate_limit = RateLimit::default();
            rate_limit.max_failures = max_failures;
            rate_limit.window = Duration::from_secs(60);
            rate_limit.max_clients = 1000;
            rate_limit
        };
        auth_config
    }
}

/// Child body: the server with `auth_config`, logging everything at TRACE to stderr.
#[test]
fn auth_server_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let max_failures = std::env::var(MAX_FAILURES_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let server = start_server({
            let mut server_config = ServerConfig::default();
            server_config.in_memory = true;
            server_config.auth = auth_config(max_failures);
            server_config
        })
        .await;
        println!("addr {}", server.local_addr());
        std::future::pending::<()>().await;
    });
}

fn now() -> u64 {
    get_current_timestamp()
}

fn claims(extra: Value) -> Value {
    let mut base = json!({"sub": "alice", "exp": now() + 600, "aud": AUD, "iss": ISS});
    for (k, v) in extra.as_object().expect("object") {
        if v.is_null() {
            base.as_object_mut().expect("object").remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn hs(claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    encode(
        &header,
        claims,
        &EncodingKey::from_secret(HS_SECRET.as_bytes()),
    )
    .expect("sign")
}

fn rs(claims: &Value, pem: &[u8]) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rs-1".into());
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(pem).expect("pem"),
    )
    .expect("sign")
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Credentials as headers.
#[derive(Clone)]
enum Cred {
    None,
    Bearer(String),
    ApiKey(String),
}

impl Cred {
    fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Cred::None => vec![],
            Cred::Bearer(t) => vec![("authorization", format!("Bearer {t}"))],
            Cred::ApiKey(k) => vec![("x-api-key", k.clone())],
        }
    }

    fn secret(&self) -> Option<String> {
        match self {
            Cred::None => None,
            // The signature is the part that must never leak; a whole token is worse.
            Cred::Bearer(t) => Some(t.rsplit('.').next().unwrap_or(t).to_owned())
                .filter(|s| s.len() >= 16)
                .or_else(|| Some(t.clone())),
            Cred::ApiKey(k) => Some(k.clone()),
        }
    }
}

/// Credentials that must be refused with 401 by both servers.
fn invalid_matrix() -> Vec<(&'static str, Cred)> {
    let good = hs(&claims(json!({})), Some("hs-1"));
    let mut parts = good.split('.');
    let (head, _payload, sig) = (
        parts.next().expect("head"),
        parts.next().expect("payload"),
        parts.next().expect("sig"),
    );
    let tampered_payload = b64(claims(json!({"sub": "mallory", "scope": "read write"}))
        .to_string()
        .as_bytes());
    let alg_none_header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64(claims(json!({})).to_string().as_bytes());
    let confusion = {
        // HS256 "signed" with the server's RSA public key as the HMAC secret, naming the RSA key.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rs-1".into());
        encode(
            &header,
            &claims(json!({})),
            &EncodingKey::from_secret(RSA_PUBLIC),
        )
        .expect("sign")
    };
    vec![
        ("no credentials", Cred::None),
        (
            "expired",
            Cred::Bearer(hs(&claims(json!({"exp": now() - 3600})), Some("hs-1"))),
        ),
        (
            "not yet valid (nbf)",
            Cred::Bearer(hs(&claims(json!({"nbf": now() + 3600})), Some("hs-1"))),
        ),
        (
            "no exp",
            Cred::Bearer(hs(&claims(json!({"exp": null})), Some("hs-1"))),
        ),
        (
            "missing aud",
            Cred::Bearer(hs(&claims(json!({"aud": null})), Some("hs-1"))),
        ),
        (
            "wrong aud",
            Cred::Bearer(hs(&claims(json!({"aud": "someone-else"})), Some("hs-1"))),
        ),
        (
            "missing iss",
            Cred::Bearer(hs(&claims(json!({"iss": null})), Some("hs-1"))),
        ),
        (
            "wrong iss",
            Cred::Bearer(hs(
                &claims(json!({"iss": "https://evil.test"})),
                Some("hs-1"),
            )),
        ),
        (
            "alg none, no signature",
            Cred::Bearer(format!("{alg_none_header}.{body}.")),
        ),
        (
            "alg none, with the real signature",
            Cred::Bearer(format!("{alg_none_header}.{body}.{sig}")),
        ),
        (
            "HS/RS confusion (HS256 keyed with the RSA public key)",
            Cred::Bearer(confusion),
        ),
        (
            "unknown kid",
            Cred::Bearer(hs(&claims(json!({})), Some("nope"))),
        ),
        ("no kid", Cred::Bearer(hs(&claims(json!({})), None))),
        (
            "tampered payload",
            Cred::Bearer(format!("{head}.{tampered_payload}.{sig}")),
        ),
        (
            "signed by another RSA key",
            Cred::Bearer(rs(&claims(json!({})), RSA_OTHER_PRIVATE)),
        ),
        (
            "garbage token",
            Cred::Bearer("not.a.jwt-at-all-0123456789".into()),
        ),
        ("wrong API key", Cred::ApiKey(KEY_WRONG.into())),
        (
            "API key with a trailing byte",
            Cred::ApiKey(format!("{KEY_RW}x")),
        ),
    ]
}

struct Harness {
    base: String,
    ws: String,
    http: reqwest::Client,
}

impl Harness {
    async fn git(
        &self,
        method: reqwest::Method,
        path: &str,
        cred: &Cred,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/git/{path}", self.base))
            .header("x-ksync-protocol", "1");
        for (k, v) in cred.headers() {
            req = req.header(k, v);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("http");
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn push(&self, repo: &str, cred: &Cred, id: &str) -> (u16, Value) {
        self.git(
            reqwest::Method::POST,
            &format!("{repo}/branches/main/events"),
            cred,
            Some(json!({"baseVersion": 0, "events": [event(id, 1)]})),
        )
        .await
    }

    async fn pull(&self, repo: &str, cred: &Cred) -> (u16, Value) {
        self.git(
            reqwest::Method::GET,
            &format!("{repo}/branches/main/events?since=0"),
            cred,
            None,
        )
        .await
    }

    /// Upgrade status (101 when accepted) and, when accepted, the outcome of one publish.
    async fn ws_publish(&self, room: &str, cred: &Cred, id: &str) -> (u16, Option<Value>) {
        match ws_connect(&format!("{}/ws/{room}", self.ws), &cred.headers()).await {
            Err(status) => (status, None),
            Ok(mut ws) => {
                send_json(&mut ws, hello(None)).await;
                let welcome = recv_json(&mut ws).await.expect("welcome");
                assert_eq!(welcome["type"], "welcome");
                send_json(
                    &mut ws,
                    json!({"type": "publish", "ref": 1, "events": [event(id, 1)]}),
                )
                .await;
                (101, recv_json(&mut ws).await)
            }
        }
    }
}

fn spawn_server(dir: &Path, max_failures: u32) -> (child::ChildProcess, String) {
    let child = child::spawn(
        "auth::auth_server_child",
        &[
            (CHILD_ENV, "1".into()),
            (MAX_FAILURES_ENV, max_failures.to_string()),
        ],
        &dir.join(format!("server-{max_failures}.err")),
    )
    .expect("spawn");
    let addr = child
        .expect_line("addr ", Duration::from_secs(30))
        .expect("server did not start");
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_and_api_key_matrix_against_both_servers_and_no_secret_in_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, addr) = spawn_server(dir.path(), 100_000);
    let h = Harness {
        base: format!("http://{addr}"),
        ws: format!("ws://{addr}"),
        http: reqwest::Client::new(),
    };
    let rw = Cred::ApiKey(KEY_RW.into());
    for repo in ["main-repo", "a"] {
        let (status, body) = h.git(reqwest::Method::PUT, repo, &rw, None).await;
        assert!(
            status == 201 || status == 200,
            "create {repo}: {status} {body}"
        );
    }
    let mut presented: Vec<String> = vec![
        HS_SECRET.into(),
        KEY_RW.into(),
        KEY_RO.into(),
        KEY_REPO_A.into(),
    ];
    let mut attempts = 0;
    let mut refused = 0;

    // 1. Invalid credentials: 401 from both servers, nothing stored.
    for (name, cred) in invalid_matrix() {
        presented.extend(cred.secret());
        let (ws_status, _) = h.ws_publish("main-repo", &cred, "never-ws").await;
        let (push_status, _) = h.push("main-repo", &cred, "never-git").await;
        let (pull_status, _) = h.pull("main-repo", &cred).await;
        for (what, status) in [
            ("websocket upgrade", ws_status),
            ("git push", push_status),
            ("git pull", pull_status),
        ] {
            attempts += 1;
            if status == 401 {
                refused += 1;
            } else {
                panic!("{name}: {what} answered {status}, expected 401");
            }
        }
    }

    // 2. Valid credentials without the right: read-only writing, another room/repository.
    let ro_jwt = Cred::Bearer(hs(&claims(json!({"scope": "read"})), Some("hs-1")));
    let other_repo_jwt = Cred::Bearer(rs(
        &claims(json!({"rooms": ["other"], "repos": ["other"]})),
        RSA_PRIVATE,
    ));
    let ro_key = Cred::ApiKey(KEY_RO.into());
    let only_a = Cred::ApiKey(KEY_REPO_A.into());
    presented.extend(ro_jwt.secret());
    presented.extend(other_repo_jwt.secret());
    for (name, cred) in [("read-only JWT", &ro_jwt), ("read-only API key", &ro_key)] {
        let (ws_status, answer) = h.ws_publish("main-repo", cred, "ro-ws").await;
        let answer = answer.expect("a read-only client may connect");
        attempts += 1;
        assert_eq!(
            (ws_status, answer["code"].as_str()),
            (101, Some("forbidden")),
            "{name}: {answer}"
        );
        refused += 1;
        let (push_status, body) = h.push("main-repo", cred, "ro-git").await;
        attempts += 1;
        assert_eq!(push_status, 403, "{name}: push {body}");
        refused += 1;
        // Reading is allowed.
        assert_eq!(h.pull("main-repo", cred).await.0, 200, "{name}: pull");
    }
    for (name, cred) in [
        ("JWT for another repo", &other_repo_jwt),
        ("API key for repo a", &only_a),
    ] {
        let (ws_status, _) = h.ws_publish("main-repo", cred, "other-ws").await;
        let (push_status, _) = h.push("main-repo", cred, "other-git").await;
        let (pull_status, _) = h.pull("main-repo", cred).await;
        for (what, status) in [
            ("websocket upgrade", ws_status),
            ("git push", push_status),
            ("git pull", pull_status),
        ] {
            attempts += 1;
            assert_eq!(status, 403, "{name}: {what}");
            refused += 1;
        }
    }
    // Nothing that was refused was stored anywhere.
    let (_, page) = h.pull("main-repo", &rw).await;
    let stored: Vec<&str> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert!(stored.is_empty(), "refused pushes stored: {stored:?}");
    let room = read_room_with(&format!("{}/ws/main-repo", h.ws), &rw).await;
    assert!(room.is_empty(), "refused publishes stored: {room:?}");

    // 3. Controls: the right credentials work, on both servers.
    let good = [
        (
            "HS256 JWT",
            Cred::Bearer(hs(&claims(json!({})), Some("hs-1"))),
        ),
        (
            "RS256 JWT",
            Cred::Bearer(rs(&claims(json!({})), RSA_PRIVATE)),
        ),
        ("API key", rw.clone()),
        ("API key as bearer", Cred::Bearer(KEY_RW.into())),
        ("API key for repo a, on a", only_a.clone()),
    ];
    let mut accepted = 0;
    for (i, (name, cred)) in good.iter().enumerate() {
        presented.extend(cred.secret());
        let repo = if name.ends_with("on a") {
            "a"
        } else {
            "main-repo"
        };
        let (ws_status, ack) = h.ws_publish(repo, cred, &format!("ok-ws-{i}")).await;
        let ack = ack.expect("ack");
        assert_eq!(
            (ws_status, ack["results"][0]["status"].as_str()),
            (101, Some("stored")),
            "{name}: {ack}"
        );
        let (push_status, body) = h.push(repo, cred, &format!("ok-git-{i}")).await;
        assert_eq!(
            (push_status, body["appended"].as_u64()),
            (200, Some(1)),
            "{name}: {body}"
        );
        accepted += 1;
    }

    // 4. Secrets in the server's logs (TRACE level, every target).
    let lines = child.kill().expect("kill");
    drop(lines);
    let log = std::fs::read_to_string(dir.path().join("server-100000.err")).expect("log");
    assert!(log.len() > 1000, "the server logged almost nothing: {log}");
    assert!(
        log.contains("auth refused") || log.contains("refused"),
        "no refusal logged"
    );
    presented.sort();
    presented.dedup();
    let leaked: Vec<&String> = presented
        .iter()
        .filter(|s| log.contains(s.as_str()))
        .collect();
    figures::report(
        "auth",
        "invalid credentials and missing rights refused (both servers)",
        format!("{refused}/{attempts}"),
        "N/N",
        refused == attempts,
    );
    figures::report(
        "auth",
        "valid credentials accepted (control)",
        format!("{accepted}/{}", good.len()),
        "N/N",
        accepted == good.len(),
    );
    figures::report(
        "auth",
        "secrets in logs (TRACE, every target)",
        format!(
            "{} of {} secrets checked ({} log bytes)",
            leaked.len(),
            presented.len(),
            log.len()
        ),
        "0",
        leaked.is_empty(),
    );
    assert!(leaked.is_empty(), "secrets found in the logs: {leaked:?}");
}

/// `read_room` with credentials.
async fn read_room_with(url: &str, cred: &Cred) -> Vec<(u64, String)> {
    let mut ws = ws_connect(url, &cred.headers()).await.expect("upgrade");
    send_json(&mut ws, hello(Some(0))).await;
    let welcome = recv_json(&mut ws).await.expect("welcome");
    let last = welcome["serverVersion"].as_u64().expect("serverVersion");
    let mut out = Vec::new();
    while out.len() < last as usize {
        let msg = recv_json(&mut ws).await.expect("events");
        for s in msg["events"].as_array().into_iter().flatten() {
            out.push((
                s["seq"].as_u64().expect("seq"),
                s["event"]["id"].as_str().expect("id").to_owned(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_auth_is_rate_limited_on_both_servers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let max_failures = 5;
    let (_child, addr) = spawn_server(dir.path(), max_failures);
    let h = Harness {
        base: format!("http://{addr}"),
        ws: format!("ws://{addr}"),
        http: reqwest::Client::new(),
    };
    let bad = Cred::ApiKey(KEY_WRONG.into());
    let good = Cred::ApiKey(KEY_RW.into());
    let mut statuses = Vec::new();
    for i in 0..max_failures + 5 {
        let status = if i % 2 == 0 {
            h.pull("main-repo", &bad).await.0
        } else {
            h.ws_publish("main-repo", &bad, "x").await.0
        };
        statuses.push(status);
    }
    let unauthorized = statuses.iter().filter(|s| **s == 401).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    // Once limited, even valid credentials from the same client wait for the window.
    let (good_ws, _) = h.ws_publish("main-repo", &good, "y").await;
    let (good_git, _) = h.pull("main-repo", &good).await;
    figures::report(
        "auth",
        "failed attempts rate limited",
        format!(
            "{limited} of {} after {max_failures} failures (then valid credentials: ws {good_ws}, git {good_git})",
            statuses.len()
        ),
        "all after the limit",
        unauthorized == max_failures as usize && limited == 5,
    );
    assert_eq!(unauthorized, max_failures as usize, "{statuses:?}");
    assert_eq!(limited, 5, "{statuses:?}");
    assert_eq!((good_ws, good_git), (429, 429));
}
