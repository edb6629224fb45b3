//! The real `ksync` binary: `ksync serve` on 127.0.0.1:0, /health, SIGTERM, clean exit, no
//! secret in the logs.
#![allow(clippy::unwrap_used)] // tests may unwrap

use crate::common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

use common::{Served, finishes, ksync, serve_from, signal, sigterm};

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const JWT_SECRET: &str = "process-test-secret-0123456789abcdef-XYZ";
const API_KEY: &str = "process-test-api-key-QWERTY";

/// `ksync serve --bind 127.0.0.1:0 ARGS` with `envs`, logging at debug level to a pipe that
/// [`stop`] reads.
///
/// The pipe is read only at the end, so the libraries that log every connection at debug
/// (TLS, HTTP, WebSocket) stay at info: a test that polls the server (the SIGHUP one, more
/// the slower the machine) would otherwise fill the pipe's 64 KiB and block the server.
fn serve(args: &[&str], envs: &[(&str, &str)]) -> Served {
    let mut all = vec![(
        "RUST_LOG",
        "debug,rustls=info,hyper=info,hyper_util=info,h2=info,tungstenite=info,\
         tokio_tungstenite=info,tower=info,tower_http=info,axum=info,mio=info",
    )];
    all.extend_from_slice(envs);
    common::serve(args, &all, Stdio::piped())
}

fn stop(mut served: Served) -> String {
    sigterm(&served.child);
    let status = served.child.wait().expect("wait");
    assert!(status.success(), "clean exit after SIGTERM, got {status}");
    let mut stderr = String::new();
    served
        .child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    stderr
}

async fn health(addr: &str) -> Value {
    let response = reqwest::get(format!("http://{addr}/health")).await.unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

#[tokio::test]
async fn serve_prints_its_address_answers_health_and_exits_cleanly_on_sigterm() {
    let served = serve(&["--in-memory"], &[]);
    assert!(
        served
            .first_line
            .contains(&format!("(http://{}/health)", served.addr)),
        "{}",
        served.first_line
    );
    assert!(
        served
            .first_line
            .trim_end()
            .ends_with(", auth off, data in memory"),
        "{}",
        served.first_line
    );
    let body = health(&served.addr).await;
    assert_eq!(body["status"], "ok");
    // The build is named: by its commit when it knew it (ksync-server's tests check that it
    // does in a checkout).
    assert_eq!(
        body["commit"],
        serde_json::json!(ksync_server::BUILD_COMMIT)
    );
    let stderr = stop(served);
    assert!(stderr.contains("storage flushed"), "{stderr}");
    let version = ksync().arg("--version").output().unwrap();
    assert!(version.status.success());
    let version = String::from_utf8(version.stdout).unwrap();
    assert_eq!(
        version.trim_end(),
        format!("ksync {}", ksync_server::VERSION)
    );
    if let Some(commit) = ksync_server::BUILD_COMMIT {
        assert!(version.contains(commit), "{version}");
    }
}

#[tokio::test]
async fn secrets_from_env_and_files_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("# test keys\nci:read+write={API_KEY}\n")).unwrap();
    let served = serve(
        &["--in-memory", "--api-keys-file", keys.to_str().unwrap()],
        &[("KSYNC_JWT_SECRET", JWT_SECRET)],
    );
    assert!(
        served
            .first_line
            .contains(", auth on (1 API key, 1 JWT key), data in memory"),
        "{}",
        served.first_line
    );
    let body = health(&served.addr).await;
    assert_eq!(body["status"], "ok");
    // Use the right key, a wrong one and a forged token, so that acceptance and refusals are
    // logged (at debug level) and can be searched for secrets.
    let wrong_key = "wrong-key-that-must-not-be-logged";
    let forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.forged-signature-must-not-be-logged";
    let client = reqwest::Client::new();
    let url = format!("http://{}/git/notes", served.addr);
    let ok = client
        .put(&url)
        .header("x-api-key", API_KEY)
        .send()
        .await
        .unwrap();
    assert!(ok.status().is_success(), "{}", ok.status());
    let refused = client
        .get(&url)
        .header("x-api-key", wrong_key)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let refused = client.get(&url).bearer_auth(forged).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let stderr = stop(served);
    assert!(stderr.contains("authentication refused"), "{stderr}");
    for secret in [JWT_SECRET, API_KEY, wrong_key, forged, "forged-signature"] {
        assert!(!stderr.contains(secret), "{secret} in {stderr}");
    }
    assert!(stderr.contains("auth=true"), "{stderr}");
    assert!(
        stderr.contains("api_keys=[\"ci\"]"),
        "key names are logged: {stderr}"
    );
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(url: &str, api_key: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", api_key.parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn ws_send(ws: &mut Ws, message: Value) {
    use futures_util::SinkExt as _;
    ws.send(Message::text(message.to_string())).await.unwrap();
}

async fn ws_recv(ws: &mut Ws) -> Value {
    use futures_util::StreamExt as _;
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("open")
            .unwrap();
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// Joins room `journal` with the API key and publishes entries `e1..=count` in one publish;
/// returns the socket once they are acknowledged (as seqs 1..=count).
async fn publish_entries(addr: &str, count: u64) -> Ws {
    let mut ws = ws_connect(&format!("ws://{addr}/ws/journal"), API_KEY).await;
    ws_send(&mut ws, json!({"type": "hello", "protocol": 1, "since": 0})).await;
    assert_eq!(ws_recv(&mut ws).await["type"], "welcome");
    let events: Vec<Value> = (1..=count)
        .map(|i| json!({"id": format!("e{i}"), "type": "entry", "data": {"i": i}, "timestamp": 1_732_615_200_000u64 + i, "version": 1}))
        .collect();
    ws_send(
        &mut ws,
        json!({"type": "publish", "ref": 1, "events": events}),
    )
    .await;
    let ack = ws_recv(&mut ws).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["serverVersion"], count);
    ws
}

#[tokio::test]
async fn events_published_before_sigterm_are_on_disk_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", data.to_str().unwrap()];
    let api_keys = format!("app={API_KEY}");
    let env = [("KSYNC_API_KEYS", api_keys.as_str())];

    let served = serve(&args, &env);
    assert!(
        served
            .first_line
            .trim_end()
            .ends_with(&format!("data in {}", data.display())),
        "{}",
        served.first_line
    );
    let _ws = publish_entries(&served.addr, 20).await;
    let stderr = stop(served);
    assert!(stderr.contains("storage flushed"), "{stderr}");
    assert!(!stderr.contains(API_KEY), "{stderr}");

    let served = serve(&args, &env);
    let health = health(&served.addr).await;
    assert_eq!(health["rooms"], 1);
    let mut ws = ws_connect(&format!("ws://{}/ws/journal", served.addr), API_KEY).await;
    ws_send(&mut ws, json!({"type": "hello", "protocol": 1, "since": 0})).await;
    let welcome = ws_recv(&mut ws).await;
    assert_eq!(welcome["serverVersion"], 20);
    let caught_up = ws_recv(&mut ws).await;
    let ids: Vec<&str> = caught_up["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (1..=20).map(|i| format!("e{i}")).collect();
    assert_eq!(ids, expected);
    stop(served);
}

#[tokio::test]
async fn default_data_dir_is_ksync_data_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = ksync()
        .args(["serve", "--bind", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("KSYNC_DATA_DIR")
        .env_remove("KSYNC_IN_MEMORY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.trim_end().ends_with("data in ./ksync-data"), "{line}");
    assert!(dir.path().join("ksync-data").is_dir());
    sigterm(&child);
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn jwt_key_flags_are_wired_end_to_end() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ksync-server/tests/fixtures"
    );
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("jwt.secret");
    std::fs::write(&secret_file, format!("{JWT_SECRET}\n")).unwrap();
    let rsa_public = format!("{fixtures}/rsa-public.pem");
    let ed_public = format!("{fixtures}/ed25519-public.pem");
    let served = serve(
        &[
            "--in-memory",
            "--jwt-hs256-secret-file",
            secret_file.to_str().unwrap(),
            "--jwt-rs256-public-key",
            &rsa_public,
            "--jwt-eddsa-public-key",
            &ed_public,
            "--jwt-audience",
            "ksync-test",
            "--jwt-issuer",
            "test-issuer",
        ],
        &[],
    );
    let claims = json!({"sub": "t", "exp": get_current_timestamp() + 300, "aud": "ksync-test", "iss": "test-issuer"});
    let read = |name: &str| std::fs::read(format!("{fixtures}/{name}")).unwrap();
    let tokens = [
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        )
        .unwrap(),
        encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(&read("rsa-private.pem")).unwrap(),
        )
        .unwrap(),
        encode(
            &Header::new(Algorithm::EdDSA),
            &claims,
            &EncodingKey::from_ed_pem(&read("ed25519-private.pem")).unwrap(),
        )
        .unwrap(),
    ];
    let client = reqwest::Client::new();
    let url = format!("http://{}/git/notes", served.addr);
    for token in &tokens {
        let response = client.put(&url).bearer_auth(token).send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
    let wrong_issuer =
        json!({"exp": get_current_timestamp() + 300, "aud": "ksync-test", "iss": "other"});
    let token = encode(
        &Header::new(Algorithm::HS256),
        &wrong_issuer,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let response = client.put(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let stderr = stop(served);
    for token in &tokens {
        assert!(!stderr.contains(token.as_str()), "token in {stderr}");
    }
    assert!(!stderr.contains(JWT_SECRET), "{stderr}");
}

#[test]
fn sigint_also_drains_and_exits_cleanly() {
    let mut served = serve(&["--in-memory"], &[]);
    signal(&served.child, "INT");
    assert!(served.child.wait().unwrap().success());
    let mut stderr = String::new();
    served
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("SIGINT received"), "{stderr}");
    assert!(stderr.contains("storage flushed"), "{stderr}");
}

#[test]
fn bad_configuration_exits_with_a_clear_error() {
    let output = ksync()
        .args(["serve", "--bind", "127.0.0.1:0", "--in-memory"])
        .env("KSYNC_JWT_SECRET", "short")
        .output()
        .expect("run ksync");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at least 32 bytes"), "{stderr}");
    assert!(!stderr.contains("short\n"), "{stderr}");
}

/// Runs `ksync serve` with `args` to its end (it must fail at start-up); its stderr.
fn serve_fails(args: &[&str]) -> String {
    let mut command = ksync();
    command.args(["serve", "--bind", "127.0.0.1:0"]).args(args);
    let output = finishes(command);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    stderr
}

#[test]
fn start_up_errors_say_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let file = file.to_str().unwrap();
    let stderr = serve_fails(&["--data-dir", file]);
    assert_eq!(stderr.matches("File exists").count(), 1, "{stderr}");
    assert!(stderr.contains("ksync: starting the server"), "{stderr}");
    // The data directory is named in its error, and "storage" is not said twice.
    assert!(stderr.contains(file), "{stderr}");
    assert!(!stderr.contains("storage: storage"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

/// A data directory the server could not write in was noticed only when the first room
/// opened. Each directory it writes into is checked at start-up: here a file stands where a
/// directory must be (what stops root too, as chmod would not in CI). The error names the
/// path, the exit code is 1 as for other start-up failures, nothing listens, and nothing is
/// created (no lock file, no probe left behind, no other directory).
#[test]
fn a_data_directory_the_server_cannot_write_in_is_refused_at_start() {
    for blocked in ["rooms", "repos", "repos/notes"] {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path();
        if let Some((parent, _)) = blocked.split_once('/') {
            std::fs::create_dir(data_dir.join(parent)).unwrap();
        }
        let path = data_dir.join(blocked);
        std::fs::write(&path, "a file where a directory must be").unwrap();
        let before = tree(data_dir);

        let mut command = ksync();
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir);
        let output = finishes(command);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{blocked}: {stderr}");
        assert!(output.stdout.is_empty(), "{blocked}: it listened: {stderr}");
        assert!(
            stderr.contains(&format!("data directory not writable: {}", path.display())),
            "{blocked}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert_eq!(tree(data_dir), before, "{blocked}: something was created");
    }
}

/// Every path under `dir`, sorted (relative, directories included).
fn tree(dir: &std::path::Path) -> Vec<String> {
    let mut paths = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            paths.push(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    paths.sort();
    paths
}

/// Runs `command` to its end, a usage error: exit code 2, nothing on stdout; its stderr.
fn usage_error(command: Command) -> String {
    let output = finishes(command);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(output.stdout.is_empty(), "started: {stderr}");
    stderr
}

/// A limit flag given a negative, non-numeric or meaningless value is a usage error (exit 2)
/// naming the flag and what it takes, from the command line and from its variable alike; it
/// used to be "unexpected argument '-1'" for negatives, and a start-up failure naming an
/// internal field (`max_message_size`) for 0, and for a timer past a day (`heartbeat`).
#[test]
fn bad_limit_values_are_usage_errors_naming_the_flag() {
    let cases: [(&str, &str, &[&str], &str); 21] = [
        (
            "--max-message-bytes",
            "KSYNC_MAX_MESSAGE_BYTES",
            // Above 8 MiB an ack could outgrow what clients accept (16 MiB).
            &["0", "1023", "-1", "1k", "8388609"],
            "from 1024 to 8388608",
        ),
        (
            "--max-connections",
            "KSYNC_MAX_CONNECTIONS",
            &["0", "-1", "many"],
            "at least 1",
        ),
        (
            "--max-connections-per-client",
            "KSYNC_MAX_CONNECTIONS_PER_CLIENT",
            &["0", "-1"],
            "at least 1",
        ),
        (
            "--max-pushes-per-client",
            "KSYNC_MAX_PUSHES_PER_CLIENT",
            &["0", "-1"],
            "at least 1",
        ),
        (
            "--max-merges-per-client",
            "KSYNC_MAX_MERGES_PER_CLIENT",
            &["0", "-1"],
            "at least 1",
        ),
        (
            "--max-git-requests",
            "KSYNC_MAX_GIT_REQUESTS",
            &["0", "-5"],
            "at least 1",
        ),
        (
            "--heartbeat-secs",
            "KSYNC_HEARTBEAT_SECS",
            &["0", "-30", "30s", "86401"],
            "from 1 to 86400",
        ),
        (
            "--request-header-timeout-secs",
            "KSYNC_REQUEST_HEADER_TIMEOUT_SECS",
            &["0", "-1", "30s", "86401"],
            "from 1 to 86400",
        ),
        (
            "--request-body-min-rate",
            "KSYNC_REQUEST_BODY_MIN_RATE",
            &["-1", "fast", "1.5"],
            "whole number",
        ),
        (
            "--response-write-timeout-secs",
            "KSYNC_RESPONSE_WRITE_TIMEOUT_SECS",
            &["0", "-1", "30s", "86401"],
            "from 1 to 86400",
        ),
        (
            "--max-http-connections",
            "KSYNC_MAX_HTTP_CONNECTIONS",
            &["0", "-1"],
            "at least 1",
        ),
        (
            "--max-pending-connections-per-ip",
            "KSYNC_MAX_PENDING_CONNECTIONS_PER_IP",
            &["-1", "many"],
            "whole number",
        ),
        (
            "--max-branches-per-repo",
            "KSYNC_MAX_BRANCHES_PER_REPO",
            &["0", "-1"],
            "at least 1",
        ),
        (
            "--max-rooms",
            "KSYNC_MAX_ROOMS",
            &["0", "-1", "many"],
            "at least 1",
        ),
        ("--max-repos", "KSYNC_MAX_REPOS", &["0", "-1"], "at least 1"),
        (
            "--git-body-memory-bytes",
            "KSYNC_GIT_BODY_MEMORY_BYTES",
            &["0", "1023", "-1"],
            "at least 1024",
        ),
        (
            "--request-body-timeout-secs",
            "KSYNC_REQUEST_BODY_TIMEOUT_SECS",
            &["0", "-1", "86401"],
            "from 1 to 86400",
        ),
        (
            "--shutdown-timeout-secs",
            "KSYNC_SHUTDOWN_TIMEOUT_SECS",
            &["-1", "ten", "86401"],
            "from 0 to 86400",
        ),
        (
            "--auth-max-failures",
            "KSYNC_AUTH_MAX_FAILURES",
            &["-1", "1.5"],
            "whole number",
        ),
        (
            "--jwt-leeway-secs",
            "KSYNC_JWT_LEEWAY_SECS",
            &["-1", "86401"],
            "0 to 86400",
        ),
        (
            "--bind",
            "KSYNC_BIND",
            &["localhost:8080", "8080"],
            "IP:PORT",
        ),
    ];
    for (flag, variable, values, says) in cases {
        // Any other flag's case also binds port 0: a value taken by mistake starts a server
        // that `usage_error` stops, instead of one on 8080.
        let bind: &[&str] = if flag == "--bind" {
            &[]
        } else {
            &["--bind", "127.0.0.1:0"]
        };
        for value in values {
            let mut on_line = ksync();
            on_line
                .args(["serve", "--in-memory"])
                .args(bind)
                .args([flag, value]);
            let mut in_env = ksync();
            in_env
                .args(["serve", "--in-memory"])
                .args(bind)
                .env(variable, value);
            for command in [on_line, in_env] {
                let stderr = usage_error(command);
                assert!(
                    stderr.starts_with("error: invalid value"),
                    "{flag} {value}: {stderr}"
                );
                assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
                assert!(stderr.contains(says), "{flag} {value}: {stderr}");
            }
        }
    }
    // The edges that are valid still start: 0 for the two flags where it means something.
    for args in [
        ["--shutdown-timeout-secs", "0"],
        ["--auth-max-failures", "0"],
        ["--max-message-bytes", "1024"],
        ["--jwt-leeway-secs", "86400"],
    ] {
        // The leeway needs a JWT key (see `jwt_claim_options_without_a_jwt_key_are_usage_errors`).
        stop(serve(
            &["--in-memory", args[0], args[1]],
            &[("KSYNC_JWT_SECRET", JWT_SECRET)],
        ));
    }
}

/// `--jwt-audience`, `--jwt-issuer` and an explicit `--jwt-leeway-secs` only shape how JWTs
/// are checked: without a JWT key none is checked, and they were ignored silently while the
/// operator believed tokens were checked for them. Now a usage error (exit 2) naming the
/// flag and asking for a key, from the command line and the environment alike; with any one
/// key, or when the variable is empty, the server starts.
#[test]
fn jwt_claim_options_without_a_jwt_key_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("ci={API_KEY}\n")).unwrap();
    let keys = keys.to_str().unwrap();
    let cases = [
        ("--jwt-audience", "KSYNC_JWT_AUDIENCE", "ksync"),
        ("--jwt-issuer", "KSYNC_JWT_ISSUER", "https://issuer.example"),
        ("--jwt-leeway-secs", "KSYNC_JWT_LEEWAY_SECS", "5"),
    ];
    for (flag, variable, value) in cases {
        // With and without other credentials: API keys are not JWT keys.
        for other in [&[][..], &["--api-keys-file", keys][..]] {
            let mut on_line = ksync();
            on_line
                .args(["serve", "--in-memory", "--bind", "127.0.0.1:0"])
                .args(other)
                .args([flag, value]);
            let mut in_env = ksync();
            in_env
                .args(["serve", "--in-memory", "--bind", "127.0.0.1:0"])
                .args(other)
                .env(variable, value);
            for command in [on_line, in_env] {
                let stderr = usage_error(command);
                assert!(stderr.contains(flag), "{flag}: {stderr}");
                assert!(stderr.contains("needs a JWT key"), "{flag}: {stderr}");
                assert!(stderr.contains("--jwt-secret"), "{flag}: {stderr}");
                assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            }
        }
    }
    // Empty variables configure nothing, so there is nothing to refuse.
    stop(serve(
        &["--in-memory"],
        &[("KSYNC_JWT_AUDIENCE", ""), ("KSYNC_JWT_ISSUER", "")],
    ));
    // Any JWT key will do, from a flag or a variable.
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ksync-server/tests/fixtures"
    );
    let ed_public = format!("{fixtures}/ed25519-public.pem");
    let served = serve(
        &[
            "--in-memory",
            "--jwt-eddsa-public-key",
            &ed_public,
            "--jwt-audience",
            "ksync",
            "--jwt-issuer",
            "https://issuer.example",
            "--jwt-leeway-secs",
            "30",
        ],
        &[],
    );
    assert!(
        served.first_line.contains("auth on (1 JWT key)"),
        "{}",
        served.first_line
    );
    stop(served);
    stop(serve(
        &["--in-memory"],
        &[
            ("KSYNC_JWT_SECRET", JWT_SECRET),
            ("KSYNC_JWT_AUDIENCE", "ksync"),
        ],
    ));
}

/// Key files that cannot be what they are given as: a private key (or garbage) given as a
/// JWT public key, an API key file with no key in it (which started a server open to anyone)
/// or a malformed line. Each is one line naming the file, exit 1, no secret, and no data
/// directory made.
#[test]
fn unusable_key_files_are_refused_naming_the_file() {
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ksync-server/tests/fixtures"
    );
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_arg = data_dir.to_str().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "garbage").unwrap();
    let no_keys = dir.path().join("no-keys");
    std::fs::write(&no_keys, "# nothing here yet\n\n").unwrap();
    let bad_line = dir.path().join("bad-line");
    std::fs::write(&bad_line, "ok=first-s3cr3t\nbroken-s3cr3t\n").unwrap();
    let rsa_private = format!("{fixtures}/rsa-private.pem");
    let ed_private = format!("{fixtures}/ed25519-private.pem");
    let (garbage, no_keys, bad_line) = (
        garbage.to_str().unwrap(),
        no_keys.to_str().unwrap(),
        bad_line.to_str().unwrap(),
    );
    let cases: [(&str, &str, &str); 6] = [
        (
            "--jwt-rs256-public-key",
            &rsa_private,
            "this is a private key",
        ),
        (
            "--jwt-eddsa-public-key",
            &ed_private,
            "this is a private key",
        ),
        ("--jwt-rs256-public-key", garbage, "not an RSA public key"),
        (
            "--jwt-eddsa-public-key",
            garbage,
            "not an Ed25519 public key",
        ),
        ("--api-keys-file", no_keys, "holds no API key"),
        (
            "--api-keys-file",
            bad_line,
            "line 2: API key must be given as NAME=KEY",
        ),
    ];
    for (flag, file, says) in cases {
        let stderr = serve_fails(&["--data-dir", data_arg, flag, file]);
        assert!(stderr.contains(file), "{flag} {file}: {stderr}");
        assert!(stderr.contains(says), "{flag} {file}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flag} {file}: {stderr}");
        assert!(!stderr.contains("s3cr3t"), "{stderr}");
        assert!(!stderr.contains("MII"), "no key material: {stderr}");
        assert!(!data_dir.exists(), "{flag} {file}: data directory made");
    }
}

/// A stdout nobody reads (a closed pipe: the reader of the "listening" line went away) does
/// not stop the server: it was "ksync: Broken pipe" and exit 1 right after binding.
#[tokio::test]
async fn a_closed_stdout_does_not_stop_the_server() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = ksync()
        .args(["serve", "--bind", "127.0.0.1:0", "--in-memory"])
        .env("RUST_LOG", "info")
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The address from the log line on stderr.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut log = String::new();
    while addr.is_none() {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("ksync serve exited: {log}");
        }
        addr = line
            .split("local_addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned);
        log.push_str(&line);
    }
    let addr = addr.unwrap();
    assert_eq!(health(&addr).await["status"], "ok");
    sigterm(&child);
    stderr.read_to_string(&mut log).unwrap();
    assert!(child.wait().unwrap().success(), "{log}");
    assert!(log.contains("cannot print the listening line"), "{log}");
}

#[test]
fn ksync_in_memory_takes_the_usual_spellings_of_a_switch() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    for on in ["1", "true", "yes", "on"] {
        let served = serve(&["--data-dir", data_dir], &[("KSYNC_IN_MEMORY", on)]);
        assert!(
            served.first_line.contains("data in memory"),
            "KSYNC_IN_MEMORY={on}: {}",
            served.first_line
        );
        stop(served);
    }
    for off in ["0", "false", "no", "off"] {
        let served = serve(&["--data-dir", data_dir], &[("KSYNC_IN_MEMORY", off)]);
        assert!(
            served.first_line.contains(&format!("data in {data_dir}")),
            "KSYNC_IN_MEMORY={off}: {}",
            served.first_line
        );
        stop(served);
    }
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let first = serve(&["--data-dir", data_dir], &[]);
    let mut second = ksync()
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir", data_dir])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(second.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if !line.is_empty() {
        // It started: both would write the same logs (each room's file is locked, so the
        // second would fail on every room the first has open, at run time).
        sigterm(&second);
        second.wait().unwrap();
        panic!("a second server started on the same data directory: {line}");
    }
    let status = second.wait().unwrap();
    let mut stderr = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use by another"), "{stderr}");
    assert!(stderr.contains(data_dir), "{stderr}");
    // Once the first is gone, the directory can be served again.
    stop(first);
    stop(serve(&["--data-dir", data_dir], &[]));
}

/// `KSYNC_X=` (empty, as `KSYNC_X=${X:-}` in a compose file or unit gives it) means "none",
/// not one empty audience, issuer or API key.
#[tokio::test]
async fn empty_list_variables_configure_nothing() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
    let served = serve(
        &["--in-memory"],
        &[
            ("KSYNC_JWT_SECRET", JWT_SECRET),
            ("KSYNC_JWT_AUDIENCE", ""),
            ("KSYNC_JWT_ISSUER", ""),
            ("KSYNC_API_KEYS", ""),
        ],
    );
    let claims = json!({"sub": "t", "exp": get_current_timestamp() + 300});
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let url = format!("http://{}/git/notes", served.addr);
    let client = reqwest::Client::new();
    let response = client.put(&url).bearer_auth(&token).send().await.unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    stop(served);
}

/// `ksync serve --tls-cert --tls-key`: HTTPS and wss:// on the port it prints; `ksync clone`
/// over https:// with `--tls-root-cert`; one TLS flag without the other is a usage error.
#[tokio::test]
async fn serve_with_a_certificate_speaks_tls_and_the_git_commands_trust_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let (cert_arg, key_arg) = (cert_path.to_str().unwrap(), key_path.to_str().unwrap());

    let served = serve(
        &["--in-memory", "--tls-cert", cert_arg, "--tls-key", key_arg],
        &[],
    );
    let port = served.addr.rsplit(':').next().unwrap().to_owned();
    assert!(
        served
            .first_line
            .contains(&format!("wss://{}", served.addr))
            && served
                .first_line
                .contains(&format!("https://{}/health", served.addr)),
        "{}",
        served.first_line
    );
    let https = reqwest::Client::builder()
        .tls_certs_merge([reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap()])
        .build()
        .unwrap();
    let health = https
        .get(format!("https://localhost:{port}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // Plain HTTP on that port gets no answer.
    assert!(
        reqwest::get(format!("http://{}/health", served.addr))
            .await
            .is_err()
    );

    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let url = format!("https://localhost:{port}/git/notes");
    let in_work = |args: &[&str]| {
        ksync()
            .args(args)
            .current_dir(&work)
            .output()
            .expect("run ksync")
    };
    let untrusted = in_work(&["clone", "--create", &url]);
    assert!(!untrusted.status.success());
    let said = String::from_utf8_lossy(&untrusted.stderr).to_lowercase();
    assert!(said.contains("certificate"), "{said}");
    let cloned = in_work(&["clone", "--create", "--tls-root-cert", cert_arg, &url]);
    assert!(
        cloned.status.success(),
        "{}",
        String::from_utf8_lossy(&cloned.stderr)
    );
    let repo = work.join("notes");
    let in_repo = |args: &[&str]| {
        ksync()
            .args(args)
            .current_dir(&repo)
            .env("KSYNC_TLS_ROOT_CERT", cert_arg)
            .output()
            .expect("run ksync")
    };
    assert!(
        in_repo(&["emit", "note", r#"{"text":"over tls"}"#])
            .status
            .success()
    );
    let pushed = in_repo(&["push"]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let branches: Value = serde_json::from_str(
        &https
            .get(format!("https://localhost:{port}/git/notes/branches/main"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(branches["serverVersion"], 1, "{branches}");
    stop(served);

    for args in [
        vec!["--in-memory", "--tls-cert", cert_arg],
        vec!["--in-memory", "--tls-key", key_arg],
    ] {
        let output = ksync()
            .args(["serve", "--bind", "127.0.0.1:0"])
            .args(&args)
            .output()
            .expect("run ksync");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--tls-"), "{stderr}");
    }
}

/// A renewed certificate: `kill -HUP` makes `ksync serve` present it to new handshakes,
/// without a restart; a renewal it cannot use is logged and the certificate it had stays.
#[tokio::test]
async fn sighup_reloads_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let make = || {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (first, renewed) = (make(), make());
    let cert_path = dir.path().join("fullchain.pem");
    let key_path = dir.path().join("privkey.pem");
    let install = |(cert, key): &(String, String)| {
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
    };
    install(&first);
    let served = serve(
        &[
            "--in-memory",
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
        &[],
    );
    let port = served.addr.rsplit(':').next().unwrap().to_owned();
    // Whether a client trusting only `cert` gets /health.
    let trusted_by = |cert: &str| {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(cert.as_bytes()).unwrap()])
            .build()
            .unwrap();
        let url = format!("https://localhost:{port}/health");
        async move {
            client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        }
    };
    let hangup = |child: &Child| signal(child, "HUP");
    assert!(trusted_by(&first.0).await);
    install(&renewed);
    assert!(!trusted_by(&renewed.0).await, "served before the reload");
    hangup(&served.child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !trusted_by(&renewed.0).await {
        assert!(
            std::time::Instant::now() < deadline,
            "not reloaded on SIGHUP"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!trusted_by(&first.0).await);

    // A key that is not the certificate's: refused, the renewed certificate stays.
    install(&(renewed.0.clone(), first.1.clone()));
    hangup(&served.child);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        trusted_by(&renewed.0).await,
        "still serving after a bad reload"
    );
    let stderr = stop(served);
    assert!(stderr.contains("TLS certificate not reloaded"), "{stderr}");
    assert!(stderr.contains("do not match"), "{stderr}");
}

/// A second SIGTERM while the drain waits (here for a client that sent half a request, with
/// a 120 s shutdown timeout) stops the process at once with exit code 130, saying the drain
/// was cut short; what was acknowledged before is on disk after a restart.
#[tokio::test]
async fn a_second_sigterm_during_the_drain_stops_at_once_with_130() {
    use std::io::Write as _;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--shutdown-timeout-secs",
        "120",
    ];
    let api_keys = format!("app={API_KEY}");
    let env = [("KSYNC_API_KEYS", api_keys.as_str())];
    let mut served = serve(&args, &env);

    let _ws = publish_entries(&served.addr, 3).await;

    // Half a request: the drain waits for it (up to the shutdown timeout).
    let mut stalled = std::net::TcpStream::connect(&served.addr).unwrap();
    stalled.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
    // `connect` returns once the kernel queued the connection; a whole request made after it
    // is answered only once the server has accepted the stalled one (the backlog is taken in
    // order), so the drain knows about it.
    health(&served.addr).await;

    // stderr line by line, so the test knows when the drain has begun.
    let (lines, reader) = common::lines(served.child.stderr.take().unwrap());
    let mut log = Vec::new();
    let wait_for = |log: &mut Vec<String>, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.iter().any(|line| line.contains(what)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => log.push(line),
                Err(_) => panic!("no {what:?} within 10 s: {}", log.join("\n")),
            }
        }
    };

    sigterm(&served.child);
    wait_for(&mut log, "shutting down");
    // The drain is waiting for the stalled request, not done.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "the drain did not wait: {}",
        log.join("\n")
    );

    sigterm(&served.child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            served.child.kill().unwrap();
            panic!(
                "still draining 10 s after the second SIGTERM: {}",
                log.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    log.extend(lines.try_iter());
    let log = log.join("\n");
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("second signal: drain cut short"), "{log}");
    assert!(
        log.contains("every acknowledged event is already on disk"),
        "{log}"
    );
    assert!(
        log.contains("ksync: drain cut short by a second signal"),
        "{log}"
    );
    assert!(!log.contains("storage flushed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    drop(stalled);

    // What was acknowledged is there after a restart.
    let served = serve(&args, &env);
    let mut ws = ws_connect(&format!("ws://{}/ws/journal", served.addr), API_KEY).await;
    ws_send(&mut ws, json!({"type": "hello", "protocol": 1, "since": 0})).await;
    assert_eq!(ws_recv(&mut ws).await["serverVersion"], 3);
    stop(served);
}

/// Every option's value in `--help` says what it takes (`--jwt-secret <SECRET>`,
/// `--timeout <SECS>`), not clap's default of the flag's own name in capitals
/// (`--jwt-secret <JWT_SECRET>`), which tells nothing.
#[test]
fn help_names_what_each_option_takes() {
    let commands = [
        "serve", "watch", "peer", "clone", "emit", "pull", "push", "sync", "log", "branch",
        "checkout", "merge", "status",
    ];
    for command in commands {
        let output = ksync().args([command, "--help"]).output().unwrap();
        assert!(output.status.success(), "{command} --help");
        let help = String::from_utf8(output.stdout).unwrap();
        let mut options = 0;
        for line in help.lines() {
            let Some(start) = line.find("--") else {
                continue;
            };
            let mut words = line[start + 2..].split_whitespace();
            let (Some(flag), Some(value)) = (words.next(), words.next()) else {
                continue;
            };
            let Some(value) = value.strip_prefix('<').and_then(|v| v.strip_suffix('>')) else {
                continue;
            };
            options += 1;
            // Where the flag's name is what it takes, it may stay.
            if ["id", "port", "token", "branch"].contains(&flag) {
                continue;
            }
            let own_name = flag.to_uppercase().replace('-', "_");
            assert_ne!(value, own_name, "{command} --{flag}: {line}");
        }
        assert!(
            options > 0,
            "{command}: no option with a value found in\n{help}"
        );
    }
}

/// The soft and hard open-file limits of process `pid` (`None`: unlimited), from
/// `/proc/PID/limits`.
fn open_file_limits(pid: u32) -> (Option<u64>, Option<u64>) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut values = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .map(|v| v.parse::<u64>().ok());
    let soft = values.next().expect("soft");
    let hard = values.next().expect("hard");
    (soft, hard)
}

/// `ksync serve` raises its soft open-file limit to the hard one (the soft one is often 1,024,
/// below the 10,000 WebSockets it allows by default), and warns when even that is below what
/// its connection limits need.
#[test]
fn serve_raises_its_open_file_limit_and_warns_when_it_stays_too_low() {
    let (_, hard) = open_file_limits(std::process::id());
    // Past the hard limit (or far past the usual ceiling when there is none): the warning.
    let max_connections = hard.map_or(1 << 21, |hard| hard + 1).to_string();
    let mut shell = Command::new("sh");
    shell.args([
        "-c",
        r#"ulimit -Sn 256 && exec "$0" "$@""#,
        env!("CARGO_BIN_EXE_ksync"),
    ]);
    let Served { mut child, .. } = serve_from(
        shell,
        &["--in-memory", "--max-connections", &max_connections],
        &[],
        Stdio::piped(),
    );
    let (soft, _) = open_file_limits(child.id());
    match hard {
        Some(hard) => assert_eq!(soft, Some(hard), "soft limit not raised to the hard one"),
        None => assert!(soft.is_none_or(|soft| soft > 256), "{soft:?}"),
    }
    sigterm(&child);
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(
        stderr.contains("open-file limit is below what the connection limits need"),
        "{stderr}"
    );
}

/// `--subscriber-queues-total-bytes` (the relay-wide budget of frames waiting for
/// subscribers) is a serve flag and variable: a budget that one largest frame fills on its
/// own (less than twice `--max-message-bytes`) is a usage error naming both values; twice
/// it starts.
#[test]
fn subscriber_queues_total_bytes_is_a_serve_flag() {
    let mut command = ksync();
    command.args([
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--in-memory",
        "--max-message-bytes",
        "4096",
        "--subscriber-queues-total-bytes",
        "8191",
    ]);
    let stderr = usage_error(command);
    assert!(
        stderr.contains("--subscriber-queues-total-bytes") && stderr.contains("is 8191"),
        "{stderr}"
    );
    assert!(stderr.contains("--max-message-bytes (4096)"), "{stderr}");
    let mut command = ksync();
    command
        .args(["serve", "--bind", "127.0.0.1:0", "--in-memory"])
        .env("KSYNC_SUBSCRIBER_QUEUES_TOTAL_BYTES", "1000");
    let stderr = usage_error(command);
    assert!(
        stderr.contains("is 1000") && stderr.contains("(1048576)"),
        "{stderr}"
    );
    stop(serve(
        &[
            "--in-memory",
            "--max-message-bytes",
            "4096",
            "--subscriber-queues-total-bytes",
            "8192",
        ],
        &[],
    ));
}

/// `--room-queue-bytes` and `--room-queues-total-bytes` (the byte budgets of publishes
/// queued for the rooms' logs, per room and in all) are serve flags and variables: a total
/// below one room's (one room stuck on its disk would hold all of it) is a usage error
/// naming both values; a room budget past 4 GiB is refused by the flag; a total equal to
/// one room's starts.
#[test]
fn room_queue_bytes_are_serve_flags() {
    let mut command = ksync();
    command.args([
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--in-memory",
        "--room-queue-bytes",
        "2097152",
        "--room-queues-total-bytes",
        "2097151",
    ]);
    let stderr = usage_error(command);
    assert!(
        stderr.contains("--room-queues-total-bytes") && stderr.contains("is 2097151"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--room-queue-bytes (KSYNC_ROOM_QUEUE_BYTES), 2097152"),
        "{stderr}"
    );
    // The default total (1 GiB) is below a room budget of 2 GiB given by variable.
    let mut command = ksync();
    command
        .args(["serve", "--bind", "127.0.0.1:0", "--in-memory"])
        .env("KSYNC_ROOM_QUEUE_BYTES", "2147483648");
    let stderr = usage_error(command);
    assert!(
        stderr.contains("is 1073741824") && stderr.contains("2147483648"),
        "{stderr}"
    );
    let mut command = ksync();
    command.args([
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--in-memory",
        "--room-queue-bytes",
        "4294967296",
    ]);
    let stderr = usage_error(command);
    assert!(
        stderr.contains("--room-queue-bytes") && stderr.contains("from 1 to 4294967295"),
        "{stderr}"
    );
    stop(serve(
        &[
            "--in-memory",
            "--room-queue-bytes",
            "2097152",
            "--room-queues-total-bytes",
            "2097152",
        ],
        &[],
    ));
}

/// `--max-open-rooms` caps the rooms open at once: with one open, a connection to another
/// room gets 503 `too many open rooms`, against the real binary.
#[tokio::test]
async fn max_open_rooms_is_a_serve_flag() {
    let Served { child, addr, .. } = common::serve(
        &["--in-memory", "--max-open-rooms", "1"],
        &[],
        Stdio::null(),
    );
    let (mut first, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/first"))
        .await
        .expect("the first room");
    ws_send(&mut first, json!({"type": "hello", "protocol": 1})).await;
    assert_eq!(ws_recv(&mut first).await["type"], "welcome");
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws/second")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .expect("JSON body");
            assert_eq!(body, json!({"error": "too many open rooms"}));
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    drop(first);
    sigterm(&child);
    let mut child = child;
    assert!(child.wait().expect("wait").success());
}

/// `--max-connections-per-client` caps the WebSockets of one API key: its second gets 429
/// while another key still gets in, and the key itself is never in the answer or the logs,
/// against the real binary.
#[tokio::test]
async fn max_connections_per_client_is_a_serve_flag() {
    const OTHER_KEY: &str = "process-test-other-key-ASDFGH";
    let api_keys = format!("app={API_KEY},other={OTHER_KEY}");
    let served = serve(
        &["--in-memory", "--max-connections-per-client", "1"],
        &[("KSYNC_API_KEYS", api_keys.as_str())],
    );
    let addr = served.addr.clone();
    let url = format!("ws://{addr}/ws/room");
    let mut first = ws_connect(&url, API_KEY).await;
    ws_send(&mut first, json!({"type": "hello", "protocol": 1})).await;
    assert_eq!(ws_recv(&mut first).await["type"], "welcome");
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            url.as_str(),
        )
        .unwrap();
    request
        .headers_mut()
        .insert("x-api-key", API_KEY.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 429);
            let body: Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                    .expect("JSON body");
            assert_eq!(
                body,
                json!({"error": "too many connections for this client (at most 1)"})
            );
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    let mut other = ws_connect(&url, OTHER_KEY).await;
    ws_send(&mut other, json!({"type": "hello", "protocol": 1})).await;
    assert_eq!(ws_recv(&mut other).await["type"], "welcome");
    drop((first, other));
    let stderr = stop(served);
    assert!(
        stderr.contains("connection refused: the client has max_connections_per_client open"),
        "{stderr}"
    );
    assert!(stderr.contains("subject app"), "{stderr}");
    assert!(!stderr.contains(API_KEY), "{stderr}");
}

/// The repository service's limits are `ksync serve` flags: `--max-branches-per-repo` (one
/// more branch is 409 `too_many_branches`) and `--git-body-memory-bytes` (a push that would
/// decode past it is 413), against the real binary.
#[tokio::test]
async fn git_limits_are_serve_flags() {
    let Served { child, addr, .. } = common::serve(
        &[
            "--in-memory",
            "--max-branches-per-repo",
            "2",
            "--git-body-memory-bytes",
            "2048",
        ],
        &[],
        Stdio::null(),
    );
    let http = reqwest::Client::new();
    let created = http
        .put(format!("http://{addr}/git/notes"))
        .send()
        .await
        .expect("create repo");
    assert!(created.status().is_success(), "{}", created.status());
    let branch = |name: &str| {
        http.post(format!("http://{addr}/git/notes/branches"))
            .json(&json!({"name": name}))
            .send()
    };
    assert_eq!(branch("b1").await.expect("b1").status().as_u16(), 201);
    let refused = branch("b2").await.expect("b2");
    assert_eq!(refused.status().as_u16(), 409);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_branches", "{body}");

    // 200 numbers: a few hundred bytes of JSON, over 6 KB decoded.
    let push = json!({"baseVersion": 0, "events": [
        {"id": "a", "type": "t", "data": vec![0; 200], "timestamp": 1, "version": 1}
    ]});
    let too_big = http
        .post(format!("http://{addr}/git/notes/branches/main/events"))
        .json(&push)
        .send()
        .await
        .expect("push");
    assert_eq!(too_big.status().as_u16(), 413);
    let small = json!({"baseVersion": 0, "events": [
        {"id": "b", "type": "t", "data": 1, "timestamp": 1, "version": 1}
    ]});
    let taken = http
        .post(format!("http://{addr}/git/notes/branches/main/events"))
        .json(&small)
        .send()
        .await
        .expect("push");
    assert_eq!(taken.status().as_u16(), 200);
    sigterm(&child);
    let mut child = child;
    assert!(child.wait().expect("wait").success());
}

/// `--max-rooms` and `--max-repos` cap what clients can make the server keep in its data
/// directory, against the real binary: past them a new room gets 507 before the upgrade and
/// a new repository 507 `too_many_repos`, and nothing is created.
#[tokio::test]
async fn stored_rooms_and_repos_caps_are_serve_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path");
    let Served { child, addr, .. } = common::serve(
        &["--data-dir", data, "--max-rooms", "1", "--max-repos", "1"],
        &[],
        Stdio::null(),
    );
    let http = reqwest::Client::new();
    let create = |repo: &str| http.put(format!("http://{addr}/git/{repo}")).send();
    assert_eq!(
        create("notes").await.expect("create").status().as_u16(),
        201
    );
    let refused = create("other").await.expect("create");
    assert_eq!(refused.status().as_u16(), 507);
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_repos", "{body}");
    assert!(!dir.path().join("repos").join("other").exists());

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/first"))
        .await
        .expect("the first room");
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws/second")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 507);
        }
        other => panic!("a second room: {:?}", other.map(|_| ())),
    }
    assert!(!dir.path().join("rooms").join("second.log").exists());
    ws.close(None).await.expect("close");
    sigterm(&child);
    let mut child = child;
    assert!(child.wait().expect("wait").success());
}

/// `--max-pending-connections-per-ip` reaches the accept loop, against the real binary: with
/// 2, the first of three connections that send nothing is closed (after its 1 s of grace)
/// while the two newest stay and are served.
#[tokio::test]
async fn max_pending_connections_per_ip_is_a_serve_flag() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Served { child, addr, .. } = common::serve(
        &["--in-memory", "--max-pending-connections-per-ip", "2"],
        &[],
        Stdio::null(),
    );
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(
            tokio::net::TcpStream::connect(addr.as_str())
                .await
                .expect("connect"),
        );
    }
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        silent[0].read(&mut byte),
    )
    .await
    .expect("the oldest waiting connection was closed");
    assert_eq!(read.expect("read"), 0, "closed without an answer");
    for stream in &mut silent[1..] {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.expect("read");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }
    sigterm(&child);
    let mut child = child;
    assert!(child.wait().expect("wait").success());
}
