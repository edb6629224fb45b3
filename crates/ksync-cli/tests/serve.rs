//! The real `ksync` binary: `ksync serve` on 127.0.0.1:0, /health, SIGTERM, clean exit, no
//! secret in the logs.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

const JWT_SECRET: &str = "process-test-secret-0123456789abcdef-XYZ";
const API_KEY: &str = "process-test-api-key-QWERTY";

struct Served {
    child: Child,
    addr: String,
    first_line: String,
}

fn serve(args: &[&str], envs: &[(&str, &str)]) -> Served {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ksync"));
    command
        .arg("serve")
        .args(["--bind", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn ksync");
    let stdout = child.stdout.take().expect("stdout");
    let mut first_line = String::new();
    BufReader::new(stdout)
        .read_line(&mut first_line)
        .expect("read first line");
    let addr = first_line
        .strip_prefix("ksync listening on ws://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {first_line:?}"))
        .to_owned();
    Served {
        child,
        addr,
        first_line,
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
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
    assert!(served.first_line.trim_end().ends_with("data in memory"));
    let body = health(&served.addr).await;
    assert_eq!(body["status"], "ok");
    let stderr = stop(served);
    assert!(stderr.contains("storage flushed"), "{stderr}");
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
    let body = health(&served.addr).await;
    assert_eq!(body["status"], "ok");
    let stderr = stop(served);
    assert!(!stderr.contains(JWT_SECRET), "{stderr}");
    assert!(!stderr.contains(API_KEY), "{stderr}");
    assert!(stderr.contains("auth=true"), "{stderr}");
    assert!(
        stderr.contains("api_keys=[\"ci\"]"),
        "key names are logged: {stderr}"
    );
}

#[test]
fn bad_configuration_exits_with_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_ksync"))
        .args(["serve", "--bind", "127.0.0.1:0", "--in-memory"])
        .env("KSYNC_JWT_SECRET", "short")
        .output()
        .expect("run ksync");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at least 32 bytes"), "{stderr}");
    assert!(!stderr.contains("short\n"), "{stderr}");
}
