//! A Python client (the `websockets` package from PyPI) written from docs/PROTOCOL.md only
//! talks to the relay with an API key: it catches up (a message sent in several frames),
//! publishes, receives deflated batches.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{Auth, InMemoryProvider, Notification, NotificationKind, SyncClient};
use ksync_ws::WebSocketSyncClient;
use ksync_ws::server::RelayConfig;
use serde_json::{Value, json};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/ws_client.py")
}

#[tokio::test]
async fn python_websockets_client_publishes_and_receives() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import websockets"])
        .output()
        .expect("python3 must be installed for the interop test");
    assert!(
        probe.status.success(),
        "the Python interop test needs the `websockets` package: run `python3 -m pip install websockets` ({})",
        String::from_utf8_lossy(&probe.stderr).trim()
    );

    let server = start_with(
        RelayConfig::default(),
        Arc::new(InMemoryProvider::new()),
        Arc::new(TestKeys),
    )
    .await;
    let url = server.url(Some("interop"));
    // A Rust client publishes first and then watches for Python's event.
    let rust = WebSocketSyncClient::builder(&url)
        .auth(Auth::api_key("rw-key"))
        .build()
        .expect("client");
    let mut seen = rust.notifications();
    rust.connect().await.expect("connect");
    rust.send(ksync_core::Event::new(
        "from-rust",
        "interop",
        // Over a fragment (16 KiB): Python's catch-up gets it as a fragmented message.
        json!({"lang": "rust", "pad": "r".repeat(40_000)}),
        1,
    ))
    .await
    .expect("send");
    // Wait until the relay stored it (our ack) before starting Python.
    tokio::time::timeout(Duration::from_secs(5), async {
        while rust.outbox_len() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("acked");

    let output = tokio::process::Command::new("python3")
        .arg(script())
        .arg(&url)
        .arg("rw-key")
        .output()
        .await
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(
        output.status.code(),
        Some(3),
        "python module missing: run `python3 -m pip install websockets`: {stderr}"
    );
    assert!(
        output.status.success(),
        "python client failed:\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let step = |name: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["step"] == name)
            .unwrap_or_else(|| panic!("no {name} step in {stdout}"))
    };
    assert_eq!(step("welcome")["room"], "interop");
    assert_eq!(step("history")["ids"], json!(["from-rust"]));
    assert_eq!(step("history")["seqs"], json!([1]));
    assert_eq!(step("history")["pads"], json!([40_000]));
    assert_eq!(
        step("ack")["results"],
        json!([{"status": "stored", "seq": 2}])
    );
    assert_eq!(step("live")["binary"], true);
    assert_eq!(step("live")["ids"], json!(["from-python"]));
    assert_eq!(step("live")["seqs"], json!([2]));
    assert_eq!(step("error")["code"], "unknown_type");
    assert_eq!(
        step("duplicate")["results"],
        json!([{"status": "duplicate", "seq": 2}])
    );
    assert_eq!(lines.last(), Some(&json!({"ok": true})));

    // And the Rust client got Python's event.
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        seen.next_of(NotificationKind::Event),
    )
    .await
    .expect("event in time")
    .expect("stream");
    let Notification::Event(event) = got else {
        unreachable!()
    };
    assert_eq!(event.id, "from-python");
    assert_eq!(
        event.data,
        json!({"lang": "python", "pad": "p".repeat(1200)})
    );
    rust.disconnect().await.expect("disconnect");
    server.stop().await;
}
