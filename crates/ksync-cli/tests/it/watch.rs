//! The real `ksync` binary: `ksync watch` against `ksync serve` on 127.0.0.1:0 prints a room's
//! history, then what arrives live; `--emit` publishes; refusals are errors, not retries.
#![allow(clippy::unwrap_used)] // tests may unwrap

use crate::common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{ksync, sigterm};

use serde_json::Value;

const API_KEY: &str = "watch-test-api-key-0123456789";

/// `ksync serve` on a free port, in memory; its address.
fn serve(envs: &[(&str, &str)]) -> (Child, String) {
    let served = common::serve(&["--in-memory"], envs, Stdio::null());
    (served.child, served.addr)
}

fn watch(args: &[&str]) -> Command {
    let mut command = ksync();
    command.arg("watch").args(args).env_remove("KSYNC_API_KEY");
    command
}

/// Runs `ksync watch URL --emit note=DATA` long enough for the ack; it must exit cleanly.
fn emit(url: &str, data: &str, extra: &[&str]) {
    emit_each(url, &[data], extra);
}

/// Runs `ksync watch URL --emit note=DATA...` (one process: the room stores them in this
/// order) long enough for the acks; it must exit cleanly.
fn emit_each(url: &str, data: &[&str], extra: &[&str]) {
    let mut command = watch(&[url, "--duration", "5"]);
    for data in data {
        command.args(["--emit", &format!("note={data}")]);
    }
    let output = command
        .args(extra)
        .output()
        .expect("run ksync watch --emit");
    assert!(
        output.status.success(),
        "emitter: {:?}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `ksync watch ARGS` running, with its stdout and stderr lines.
struct Watching {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

/// Starts `ksync watch ARGS` and waits until it has joined the room (its "watching" line).
fn start_watching(args: &[&str]) -> Watching {
    let mut child = watch(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ksync watch");
    let (stdout, _) = common::lines(child.stdout.take().unwrap());
    let (stderr, _) = common::lines(child.stderr.take().unwrap());
    loop {
        let line = stderr
            .recv_timeout(Duration::from_secs(30))
            .expect("watching within 30 s");
        if line.starts_with("watching ") {
            break;
        }
    }
    Watching {
        child,
        stdout,
        stderr,
    }
}

/// Stops `watching` with SIGTERM (it must exit cleanly); what it printed on stdout after the
/// lines already taken.
fn stop_watching(mut watching: Watching) -> Vec<String> {
    sigterm(&watching.child);
    let status = watching.child.wait().expect("wait");
    let stderr: Vec<String> = watching.stderr.iter().collect();
    assert!(status.success(), "watch exits cleanly: {status} {stderr:?}");
    // The readers end at EOF: the process is gone.
    watching.stdout.iter().collect()
}

/// The next event line the watcher printed (at most 30 s away).
fn next_event(lines: &mpsc::Receiver<String>) -> Value {
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("an event line within 30 s");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?} is not an event: {e}"))
}

#[test]
fn watch_prints_history_then_live_events_and_emit_publishes() {
    let (mut server, addr) = serve(&[]);
    let url = format!("ws://{addr}/ws/watched");
    emit(&url, r#"{"n":1}"#, &[]);

    let mut watcher = watch(&[&url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ksync watch");
    let (lines, reader) = common::lines(watcher.stdout.take().expect("stdout"));
    // From the room's history.
    let first = next_event(&lines);
    assert_eq!(
        (first["type"].as_str(), &first["data"]["n"]),
        (Some("note"), &Value::from(1))
    );
    // Live, from another process.
    emit(&url, r#"{"n":2}"#, &[]);
    let second = next_event(&lines);
    assert_eq!(second["data"]["n"], 2, "{second}");
    assert_ne!(first["id"], second["id"]);

    sigterm(&watcher);
    let status = watcher.wait().expect("wait");
    assert!(status.success(), "watch exits cleanly on SIGTERM: {status}");
    reader.join().expect("reader");
    assert!(lines.try_recv().is_err(), "nothing else was printed");
    sigterm(&server);
    server.wait().expect("server exits");
}

#[test]
fn refusals_are_errors_naming_the_url_not_retries() {
    let (mut server, addr) = serve(&[("KSYNC_API_KEYS", &format!("tester={API_KEY}"))]);
    let url = format!("ws://{addr}/ws/locked");
    for (args, expected) in [
        (vec![url.as_str()], "401"),
        (vec![url.as_str(), "--api-key", "wrong-key"], "401"),
    ] {
        let output = watch(&args).output().expect("run ksync watch");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} must fail: {stderr}");
        assert!(
            stderr.contains(&url) && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("wrong-key"),
            "the key is never printed: {stderr}"
        );
    }
    // With the key: it publishes, and a second watcher with the key reads it back.
    emit(&url, r#"{"ok":true}"#, &["--api-key", API_KEY]);
    let output = watch(&[&url, "--api-key", API_KEY, "--duration", "3"])
        .output()
        .expect("run ksync watch");
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(r#""ok":true"#), "{stdout}");
    sigterm(&server);
    server.wait().expect("server exits");
}

/// `--since 2` after three events prints the third only, then what comes live; a SEQ past
/// the room's last event is an error (it printed the whole room: the client, told its cursor
/// is ahead, reads the room again from 0); `--since` and `--live` together are a usage error.
#[test]
fn since_prints_only_what_follows_the_seq_then_live_events() {
    let (mut server, addr) = serve(&[]);
    let url = format!("ws://{addr}/ws/since");
    emit_each(&url, &[r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#], &[]);

    let watching = start_watching(&[&url, "--since", "2"]);
    let third = next_event(&watching.stdout);
    assert_eq!(third["data"]["n"], 3, "{third}");
    emit(&url, r#"{"n":4}"#, &[]);
    let live = next_event(&watching.stdout);
    assert_eq!(live["data"]["n"], 4, "{live}");
    let rest = stop_watching(watching);
    assert!(rest.is_empty(), "nothing else was printed: {rest:?}");

    let output = watch(&[&url, "--since", "10", "--duration", "10"])
        .output()
        .expect("run ksync watch --since 10");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--since 10 is past the room's last event (seq 4)"),
        "{stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "printed: {}",
        String::from_utf8_lossy(&output.stdout)
    );

    let output = watch(&[&url, "--since", "1", "--live"])
        .output()
        .expect("run ksync watch --since --live");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");

    sigterm(&server);
    server.wait().expect("server exits");
}

/// `--live` prints none of the room's history, only the event published after it joined
/// (here by a `--live --emit` watcher: the client without a replica publishes too).
#[test]
fn live_prints_only_what_is_published_after_joining() {
    let (mut server, addr) = serve(&[]);
    let url = format!("ws://{addr}/ws/live");
    emit_each(&url, &[r#"{"n":1}"#, r#"{"n":2}"#], &[]);

    let watching = start_watching(&[&url, "--live"]);
    emit(&url, r#"{"n":3}"#, &["--live"]);
    let live = next_event(&watching.stdout);
    assert_eq!(live["data"]["n"], 3, "{live}");
    let rest = stop_watching(watching);
    assert!(rest.is_empty(), "nothing else was printed: {rest:?}");

    sigterm(&server);
    server.wait().expect("server exits");
}
