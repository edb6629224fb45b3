//! Lost responses and killed clients: nothing lost, nothing stored twice.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::Request;
use axum::middleware::Next;
use ksync_core::{Event, InMemoryProvider, KSync, PullPushClient, Storage, SyncClient};
use ksync_git::GitSyncClient;
use ksync_git::server::{GitServer, GitServerConfig};
use ksync_storage_file::FileStorage;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use common::{TestAuth, branch_events, client, start};

/// A TCP proxy in front of `upstream`. While `drop_responses` is set, connections it accepts
/// forward the request, wait for the server's answer, and close without passing it on.
async fn proxy(upstream: SocketAddr, drop_responses: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((downstream, _)) = listener.accept().await {
            let dropping = drop_responses.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut down_read, mut down_write) = downstream.into_split();
                let (mut up_read, mut up_write) = up.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut down_read, &mut up_write).await;
                });
                if dropping {
                    // The server has applied the request once it answers; swallow the answer.
                    let mut buf = [0u8; 1024];
                    let _ = up_read.read(&mut buf).await;
                    requests.abort();
                    let _ = down_write.shutdown().await;
                } else {
                    let _ = tokio::io::copy(&mut up_read, &mut down_write).await;
                    requests.abort();
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_push_whose_response_is_lost_is_stored_once_on_retry() {
    let server = start(&["r"]).await;
    let dropping = Arc::new(AtomicBool::new(true));
    let via = proxy(server.addr, Arc::clone(&dropping)).await;
    let c = client(&format!("http://{via}/git/r"));
    for i in 0..50 {
        c.send(Event::new(format!("e{i}"), "t", json!(i), i))
            .await
            .expect("send");
    }
    let lost = c.push().await;
    assert!(lost.is_err(), "the answer was dropped: {lost:?}");
    assert_eq!(branch_events(&server, "r", "main").len(), 50, "but applied");

    dropping.store(false, Ordering::SeqCst);
    let retry = c.push().await.expect("retry");
    assert_eq!(retry.pushed_events.len(), 50, "duplicates count as pushed");
    assert!(retry.rejected_events.is_empty());
    assert_eq!(retry.server_version, 50);
    let stored = branch_events(&server, "r", "main");
    assert_eq!(stored.len(), 50, "stored once");
    // And the client knows it now: nothing more to push.
    assert!(c.push().await.expect("push").pushed_events.is_empty());
    assert!(c.pull().await.expect("pull").new_events.is_empty());
}

const CHILD_ENV: &str = "KSYNC_GIT_TEST_CHILD";
const TEST_NAME: &str = "a_killed_client_loses_nothing_and_pushes_nothing_twice";

/// Child side: `mode` is `store` (emit and wait to be killed) or `push` (emit, then push; the
/// server never answers and the parent kills us).
async fn child(spec: &str) {
    let mut parts = spec.splitn(3, '|');
    let (mode, url, dir) = (
        parts.next().expect("mode"),
        parts.next().expect("url"),
        parts.next().expect("dir"),
    );
    let ksync = open_node(Path::new(dir), url).await;
    let first = if mode == "store" { 0 } else { 20 };
    for i in first..first + 10 {
        ksync.emit("work", json!({"n": i})).await.expect("emit");
    }
    println!("CHILD stored");
    if mode == "push" {
        println!("CHILD pushing");
        let _ = ksync.push().await;
    }
    // Killed before this ends.
    tokio::time::sleep(Duration::from_secs(60)).await;
    std::process::exit(3);
}

async fn open_node(dir: &Path, url: &str) -> KSync<GitSyncClient> {
    let storage: Arc<dyn Storage> =
        Arc::new(FileStorage::open(dir.join("local.log")).expect("file storage"));
    ksync_testkit::ksync_over(storage, client(url))
        .await
        .expect("ksync")
}

async fn spawn_child(
    mode: &str,
    url: &str,
    dir: &Path,
) -> (tokio::process::Child, tokio::sync::mpsc::Receiver<String>) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = tokio::process::Command::new(exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{mode}|{url}|{}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    // Bounded; the child prints a handful of lines.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    (child, rx)
}

async fn wait_for(rx: &mut tokio::sync::mpsc::Receiver<String>, marker: &str) {
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = rx.recv().await {
            if line.contains(marker) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "child printed {marker:?}");
}

#[tokio::test]
async fn a_killed_client_loses_nothing_and_pushes_nothing_twice() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        child(&spec).await;
        return;
    }
    // A service whose push handler, when armed, applies the push and then tells us instead of
    // answering, so we can kill the client between the server storing and the client recording.
    let provider = Arc::new(InMemoryProvider::new());
    let service = GitServer::with_config(
        provider.clone(),
        Arc::new(TestAuth),
        GitServerConfig::default(),
    );
    service
        .create_repo(&ksync_core::Name::new("r").expect("valid"))
        .await
        .expect("repo");
    let armed = Arc::new(AtomicBool::new(false));
    let (applied_tx, mut applied_rx) = tokio::sync::mpsc::channel::<()>(1);
    let app = service.router().layer(axum::middleware::from_fn({
        let armed = Arc::clone(&armed);
        move |req: Request, next: Next| {
            let armed = Arc::clone(&armed);
            let applied_tx = applied_tx.clone();
            async move {
                let is_push = req.method() == axum::http::Method::POST
                    && req.uri().path().ends_with("/events");
                let response = next.run(req).await;
                if is_push && armed.swap(false, Ordering::SeqCst) {
                    let _ = applied_tx.send(()).await;
                    std::future::pending::<()>().await;
                }
                response
            }
        }
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let serve = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    let url = format!("http://{addr}/git/r");
    let dir = tempfile::tempdir().expect("tempdir");
    let server_log = || {
        let storage = ksync_core::StorageProvider::existing(
            provider.as_ref(),
            &ksync_core::LogName::Branch {
                repo: ksync_core::Name::new("r").expect("valid"),
                branch: ksync_core::Name::new("main").expect("valid"),
            },
        )
        .expect("provider")
        .expect("main");
        storage
            .read_since(0, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|s| s.event)
            .collect::<Vec<_>>()
    };

    // 1. Killed after storing ten events, before pushing them.
    let (mut first, mut lines) = spawn_child("store", &url, dir.path()).await;
    wait_for(&mut lines, "CHILD stored").await;
    first.kill().await.expect("kill");
    assert!(server_log().is_empty());

    // 2. Killed after the server stored a push, before the client recorded it.
    armed.store(true, Ordering::SeqCst);
    let (mut second, mut lines) = spawn_child("push", &url, dir.path()).await;
    wait_for(&mut lines, "CHILD pushing").await;
    tokio::time::timeout(Duration::from_secs(30), applied_rx.recv())
        .await
        .expect("the push reached the server")
        .expect("hook");
    second.kill().await.expect("kill");
    assert_eq!(server_log().len(), 20, "both runs' events were applied");

    // 3. Restart: nothing lost, and the retried push stores nothing twice.
    let node = open_node(dir.path(), &url).await;
    assert_eq!(
        node.state().expect("state").len(),
        20,
        "nothing lost locally"
    );
    let pushed = node.push().await.expect("push after restart");
    assert_eq!(pushed.pushed_events.len(), 20, "re-sent once more");
    let log = server_log();
    assert_eq!(log.len(), 20, "and deduplicated");
    let mut keys: Vec<_> = log.iter().map(|e| (e.id.clone(), e.version)).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 20);
    let mut numbers: Vec<_> = log
        .iter()
        .map(|e| e.data["n"].as_i64().expect("n"))
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (0..10).chain(20..30).collect::<Vec<_>>());
    // Now recorded: nothing goes out again, and a pull brings back only what we have.
    assert!(node.push().await.expect("push").pushed_events.is_empty());
    assert!(node.pull().await.expect("pull").new_events.is_empty());
    node.client().disconnect().await.expect("disconnect");
    serve.abort();
}

const BETWEEN_ENV: &str = "KSYNC_GIT_TEST_BETWEEN_CURSORS";
const BETWEEN_TEST: &str = "a_push_killed_between_its_cursor_writes_reports_what_is_true";

/// Child side of [`a_push_killed_between_its_cursor_writes_reports_what_is_true`]: pushes one
/// event (the branch's log learned, the pull cursor fast-forwarded), then ten more; of that
/// push's cursor writes the first lands ("CHILD landed") and the second is held for good
/// ("CHILD held"), and the parent kills us.
async fn child_between(spec: &str) {
    let (url, dir) = spec.split_once('|').expect("url|dir");
    let armed = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cursor = |key: &str| key.ends_with(":pulled") || key.ends_with(":pushed");
    let hook = {
        let (armed, seen) = (Arc::clone(&armed), Arc::clone(&seen));
        Arc::new(move |key: &str| {
            let hold = armed.load(Ordering::SeqCst)
                && cursor(key)
                && seen.fetch_add(1, Ordering::SeqCst) > 0;
            let wait: ksync_core::BoxFuture<'static, _> = Box::pin(async move {
                if hold {
                    println!("CHILD held");
                    std::future::pending::<()>().await;
                }
                Ok(())
            });
            wait
        })
    };
    let landed = {
        let armed = Arc::clone(&armed);
        Arc::new(move |key: &str, _: &str| {
            if armed.load(Ordering::SeqCst) && cursor(key) {
                println!("CHILD landed");
            }
        })
    };
    let file: Arc<dyn Storage> =
        Arc::new(FileStorage::open(Path::new(dir).join("local.log")).expect("file storage"));
    let storage: Arc<dyn Storage> =
        Arc::new(ksync_testkit::MetaHook::with_after(file, hook, landed));
    let ksync = ksync_testkit::ksync_over(storage, client(url))
        .await
        .expect("ksync");
    ksync.emit("work", json!({"n": 0})).await.expect("emit");
    ksync.push().await.expect("first push");
    for n in 1..=10 {
        ksync.emit("work", json!({"n": n})).await.expect("emit");
    }
    armed.store(true, Ordering::SeqCst);
    let _ = ksync.push().await;
    // Killed before this ends.
    tokio::time::sleep(Duration::from_secs(60)).await;
    std::process::exit(3);
}

/// A push records an acknowledged batch with two cursor writes (how far it pushed, and the
/// pull cursor fast-forwarded over its own events). Killed after the first lands, the client
/// must not read as "nothing to push, behind the server" (its own events counted as others'
/// to pull): either its events still wait to be pushed (re-sent, deduplicated) or it is up to
/// date with the server.
#[tokio::test]
async fn a_push_killed_between_its_cursor_writes_reports_what_is_true() {
    if let Ok(spec) = std::env::var(BETWEEN_ENV) {
        child_between(&spec).await;
        return;
    }
    let server = start(&["r"]).await;
    let url = server.repo_url("r");
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut child = tokio::process::Command::new(exe)
        .args(["--exact", BETWEEN_TEST, "--nocapture", "--test-threads=1"])
        .env(BETWEEN_ENV, format!("{url}|{}", dir.path().display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut landed, mut held) = (false, false);
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while !(landed && held) {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    landed |= line.contains("CHILD landed");
                    held |= line.contains("CHILD held");
                }
                _ => return false,
            }
        }
        true
    })
    .await;
    assert_eq!(seen, Ok(true), "one cursor write landed, the other held");
    child.kill().await.expect("kill");
    assert_eq!(branch_events(&server, "r", "main").len(), 11, "all pushed");

    let storage: Arc<dyn Storage> =
        Arc::new(FileStorage::open(dir.path().join("local.log")).expect("file storage"));
    let node = ksync_testkit::ksync_over(storage, client(&url))
        .await
        .expect("ksync");
    let status = node.client().local_status().expect("status");
    let server_version = node
        .client()
        .branch_info("main")
        .await
        .expect("branch")
        .server_version;
    let behind = server_version.saturating_sub(status.pulled_version);
    assert!(
        status.pending_events == 10 || (status.pending_events == 0 && behind == 0),
        "{} to push; behind the server by {behind}",
        status.pending_events
    );
    node.client().disconnect().await.expect("disconnect");
}
