//! Upgrading in place: this build's `ksync serve` on a data directory an older `ksync serve`
//! wrote, and this build's git-like commands in a working directory an older `ksync clone`
//! made. Both fixtures come from one run of the build of commit 4aa2aa3 (from before the data
//! directory named its layout): the data directory and what that build served from it
//! (`expected.json`) under `crates/ksync-storage-file/tests/fixtures/4aa2aa3` (its README says
//! how they were made), the working directory under `tests/fixtures/4aa2aa3/workdir`. Tests
//! work on copies.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{Served, ksync, sigterm};
use futures_util::{SinkExt as _, StreamExt as _};
use ksync_core::{Event, Storage as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The address the fixture's server answered at: the working directory's config and cursors
/// name it.
const FIXTURE_URL: &str = "http://127.0.0.1:24117/git/proj";

fn data_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ksync-storage-file/tests/fixtures/4aa2aa3")
}

fn expected() -> Value {
    let raw = std::fs::read(data_fixture().join("expected.json")).expect("expected.json");
    serde_json::from_slice(&raw).expect("expected.json is JSON")
}

fn events(list: &Value) -> Vec<Event> {
    serde_json::from_value(list.clone()).expect("events")
}

/// A room's expected log id and events, in seq order.
fn room(expected: &Value, room: &str) -> (String, Vec<Event>) {
    let served = &expected["rooms"][room];
    let list: Vec<Value> = served["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|stored| stored["event"].clone())
        .collect();
    (
        served["logId"].as_str().expect("logId").to_owned(),
        events(&Value::Array(list)),
    )
}

fn serve(data: &Path) -> Served {
    common::serve(
        &["--data-dir", data.to_str().expect("utf-8 path")],
        &[("RUST_LOG", "warn")],
        Stdio::null(),
    )
}

fn stop(mut served: Served) {
    sigterm(&served.child);
    let status = served.child.wait().expect("wait");
    assert!(status.success(), "clean exit after SIGTERM, got {status}");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::text(message.to_string()))
        .await
        .expect("send");
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s")
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = frame {
            return serde_json::from_str(&text).expect("JSON");
        }
    }
}

/// Joins `room` with `since` and reads its catch-up: the welcome and the `(seq, event)`s that
/// follow it, up to a pong (answered after everything sent before it, so nothing more was
/// coming).
async fn catch_up(addr: &str, room: &str, since: u64) -> (Value, Vec<(u64, Event)>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{room}"))
        .await
        .expect("connect");
    send(
        &mut ws,
        json!({"type": "hello", "protocol": 1, "since": since}),
    )
    .await;
    let welcome = recv(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    send(&mut ws, json!({"type": "ping", "ref": 1})).await;
    let mut got = Vec::new();
    loop {
        let message = recv(&mut ws).await;
        match message["type"].as_str() {
            Some("pong") => return (welcome, got),
            Some("events") => {
                for stored in message["events"].as_array().expect("events") {
                    let event = serde_json::from_value(stored["event"].clone()).expect("event");
                    got.push((stored["seq"].as_u64().expect("seq"), event));
                }
            }
            _ => panic!("unexpected {message}"),
        }
    }
}

/// A Git pull of the whole branch: its log id and events.
async fn pull(addr: &str, branch: &str) -> (String, Vec<Event>) {
    let body = reqwest::get(format!(
        "http://{addr}/git/proj/branches/{branch}/events?since=0"
    ))
    .await
    .expect("pull")
    .text()
    .await
    .expect("page");
    let page: Value = serde_json::from_str(&body).expect("page JSON");
    assert!(page["next"].is_null(), "{page}");
    (
        page["logId"].as_str().expect("logId").to_owned(),
        events(&page["events"]),
    )
}

/// The old working directory, moved to `url`: its config names the repository's URL and its
/// cursors are kept per URL (`cursor/git:URL#BRANCH:WHICH`, `git:URL#BRANCH:log`), so each one
/// is copied to the test server's URL as it would read had the server kept its address.
async fn move_workdir(workdir: &Path, url: &str) {
    let config = workdir.join(".ksync/config.json");
    let text = std::fs::read_to_string(&config).expect("config");
    assert!(text.contains(FIXTURE_URL), "{text}");
    std::fs::write(&config, text.replace(FIXTURE_URL, url)).expect("write config");
    let log = ksync_storage_file::FileStorage::open(workdir.join(".ksync/events.log"))
        .expect("open the working directory's log");
    let mut moved = 0;
    for branch in ["main", "feature"] {
        for (prefix, which) in [
            ("cursor/", "pulled"),
            ("cursor/", "pushed"),
            ("cursor/", "acked"),
            ("", "log"),
        ] {
            let key = |url: &str| format!("{prefix}git:{url}#{branch}:{which}");
            if let Some(value) = log.meta(&key(FIXTURE_URL)).expect("meta") {
                log.set_meta(&key(url), &value).await.expect("set meta");
                moved += 1;
            }
        }
    }
    assert_eq!(moved, 8, "both branches' cursors and log ids");
    log.flush().await.expect("flush");
}

fn run(workdir: &Path, args: &[&str]) -> String {
    let mut command: Command = ksync();
    command
        .args(args)
        .current_dir(workdir)
        .env("RUST_LOG", "warn");
    let output: Output = common::finishes(command);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "ksync {args:?}: {text}");
    text
}

/// An operator replaces `ksync` and starts it on the same data directory: it starts (the
/// directory, from before `LAYOUT`, is layout 1 and gets the marker), serves every room and
/// branch with the events, seqs and log ids the old build served (so clients keep their
/// cursors: none is told its room was reset), resumes each cursor with exactly what follows
/// it, and goes on numbering after the old events. The old `ksync clone`'s working directory
/// works with this build's commands: its config is read, its cursors say what was pulled and
/// pushed, only the one event it never pushed is pushed, and the old merge is not redone.
#[tokio::test]
async fn the_new_build_serves_an_old_data_directory_and_works_in_an_old_working_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    ksync_testkit::copy_dir(&data_fixture().join("data"), &data);
    let workdir = tmp.path().join("workdir");
    ksync_testkit::copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/4aa2aa3/workdir"),
        &workdir,
    );
    let expected = expected();

    let served = serve(&data);
    let addr = served.addr.clone();
    assert_eq!(
        std::fs::read_to_string(data.join("LAYOUT")).expect("LAYOUT written at start"),
        "ksync data directory layout 1\n"
    );

    for name in ["chat", "todo"] {
        let (log_id, events) = room(&expected, name);
        let all: Vec<(u64, Event)> = (1..).zip(events.iter().cloned()).collect();
        // Every cursor a client may hold, from none (0) to the last event.
        for since in 0..=all.len() {
            let (welcome, got) = catch_up(&addr, name, since as u64).await;
            assert_eq!(welcome["logId"], log_id.as_str(), "{name}");
            assert_eq!(welcome["serverVersion"], all.len(), "{name}");
            assert_eq!(got, all[since..].to_vec(), "{name} since {since}");
        }
    }
    for branch in ["main", "feature"] {
        let page = &expected["branches"][branch];
        assert_eq!(
            pull(&addr, branch).await,
            (
                page["logId"].as_str().expect("logId").to_owned(),
                events(&page["events"])
            ),
            "{branch}"
        );
    }

    // New events follow the old ones.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/chat"))
        .await
        .expect("connect");
    send(&mut ws, json!({"type": "hello", "protocol": 1})).await;
    assert_eq!(recv(&mut ws).await["type"], "welcome");
    let new = json!({
        "id": "after-upgrade", "type": "note", "data": {"text": "new"},
        "timestamp": 1_732_615_300_000u64, "version": 1
    });
    send(
        &mut ws,
        json!({"type": "publish", "ref": 1, "events": [new]}),
    )
    .await;
    let ack = recv(&mut ws).await;
    let chat_len = room(&expected, "chat").1.len() as u64;
    assert_eq!(
        ack["results"],
        json!([{"status": "stored", "seq": chat_len + 1}])
    );
    drop(ws);

    // The old working directory.
    move_workdir(&workdir, &format!("http://{addr}/git/proj")).await;
    let status = run(&workdir, &["status"]);
    assert!(
        status.contains("On branch main")
            && status.contains("4 local event(s); 1 to push; pulled up to version 3.")
            && status.contains("Up to date with the server (version 3)."),
        "{status}"
    );
    let log = run(&workdir, &["log"]);
    for event in events(&expected["branches"]["feature"]["events"]) {
        assert!(log.contains(&event.id), "{log}");
    }
    let pushed = run(&workdir, &["push"]);
    assert!(
        pushed.contains("Pushed 1 event(s) to main (server version 4)."),
        "{pushed}"
    );
    // The old build merged `feature` into `main` (its merge cursor is in `main`'s log): a
    // merge now reads only what `feature` got since, nothing.
    let merged = run(&workdir, &["merge", "feature"]);
    assert!(
        merged.contains(
            "Merged feature into main: 0 new event(s), 0 already present; \
             main is at version 4."
        ),
        "{merged}"
    );
    run(&workdir, &["checkout", "feature"]);
    let pulled = run(&workdir, &["pull"]);
    assert!(
        pulled.contains("Already up to date (server version 3)."),
        "{pulled}"
    );

    // And all of it again after a restart of the new build.
    stop(served);
    let served = serve(&data);
    let (main_id, main) = pull(&served.addr, "main").await;
    assert_eq!(main_id, expected["branches"]["main"]["logId"]);
    assert_eq!(
        main[..3],
        events(&expected["branches"]["main"]["events"])[..]
    );
    assert_eq!(
        main[3].data,
        json!({"t": "local only, not pushed"}),
        "{main:?}"
    );
    let (welcome, got) = catch_up(&served.addr, "chat", chat_len).await;
    assert_eq!(welcome["logId"], room(&expected, "chat").0.as_str());
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0, got[0].1.id.as_str()),
        (chat_len + 1, "after-upgrade")
    );
    stop(served);
}
