//! `ksync peer`: two real processes on 127.0.0.1; one prints its address, the other connects
//! to it and emits; the first prints the event.

use crate::common;

use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{ksync, sigterm};

#[test]
fn two_peers_connect_and_exchange_an_event() {
    let keys = tempfile::tempdir().expect("tempdir");
    let mut listener = ksync()
        .args([
            "peer",
            "--id",
            "cli-a",
            "--discovery",
            "manual",
            "--listen",
            "127.0.0.1",
        ])
        // Killed at the end; long enough for a slow (busy) machine.
        .args(["--duration", "60"])
        // A round each second: the event reaches A even if gossip misses it.
        .args(["--anti-entropy-secs", "1"])
        .arg("--key-dir")
        .arg(keys.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn peer a");
    let (lines, _reader) = common::lines(listener.stdout.take().expect("stdout"));
    let first = lines.recv_timeout(Duration::from_secs(20)).expect("banner");
    assert!(first.starts_with("peer cli-a ("), "{first}");
    let addr_line = lines.recv_timeout(Duration::from_secs(5)).expect("address");
    let addr = addr_line
        .strip_prefix("listening ")
        .expect("listening line");
    assert!(
        addr.starts_with("/ip4/127.0.0.1/tcp/") && addr.contains("/p2p/"),
        "{addr}"
    );

    let status = ksync()
        .args([
            "peer",
            "--id",
            "cli-b",
            "--discovery",
            "manual",
            "--listen",
            "127.0.0.1",
        ])
        .args([
            "--connect",
            addr,
            "--emit",
            r#"note={"text":"hello from b"}"#,
        ])
        .args(["--duration", "3"])
        .args(["--anti-entropy-secs", "1"])
        .arg("--key-dir")
        .arg(keys.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run peer b");
    assert!(status.success());

    let event_line = lines
        .recv_timeout(Duration::from_secs(15))
        .expect("event printed");
    let event: serde_json::Value = serde_json::from_str(&event_line).expect("a JSON event");
    assert_eq!(event["type"], "note");
    assert_eq!(event["data"]["text"], "hello from b");
    assert_eq!(event["origin"], "cli-b");
    let _ = listener.kill();
    let _ = listener.wait();
}

#[test]
fn bad_options_fail_with_a_message() {
    let keys = tempfile::tempdir().expect("tempdir");
    let out = ksync()
        .args([
            "peer",
            "--id",
            "x",
            "--discovery",
            "carrier-pigeon",
            "--duration",
            "1",
        ])
        .arg("--key-dir")
        .arg(keys.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown discovery method"));
    let out = ksync()
        .args(["peer", "--id", "x", "--discovery", "manual", "--bootstrap"])
        .arg("/ip4/127.0.0.1/tcp/1")
        .arg("--key-dir")
        .arg(keys.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bootstrap needs --discovery dht"));
    // A round period past a day (the P2P client's bound) is a usage error naming the flag,
    // before anything starts.
    let out = ksync()
        .args([
            "peer",
            "--id",
            "x",
            "--discovery",
            "manual",
            "--duration",
            "1",
        ])
        .args(["--anti-entropy-secs", "86401"])
        .arg("--key-dir")
        .arg(keys.path())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--anti-entropy-secs"), "{stderr}");
}

/// SIGTERM (what `docker stop` and systemd send) stops the peer like Ctrl-C: it disconnects,
/// flushes its log and exits 0, and the log file holds what it emitted.
#[test]
fn sigterm_stops_the_peer_cleanly_and_keeps_its_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("peer.log");
    let mut peer = ksync()
        .args([
            "peer",
            "--id",
            "cli-term",
            "--discovery",
            "manual",
            "--listen",
            "127.0.0.1",
            "--emit",
            r#"note={"text":"before the signal"}"#,
        ])
        .arg("--key-dir")
        .arg(dir.path())
        .arg("--log-file")
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn peer");
    let (lines, _reader) = common::lines(peer.stderr.take().expect("stderr"));
    let emitted = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the peer emits");
        if let Some(rest) = line.strip_prefix("emitted ") {
            break rest.split(' ').next().expect("an id").to_owned();
        }
    };
    sigterm(&peer);
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(peer.wait());
    });
    let status = done
        .recv_timeout(Duration::from_secs(20))
        .expect("the peer exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "clean exit after SIGTERM, got {status}");
    // The reader ends at EOF: the process is gone, so this does not block for long.
    let rest: Vec<String> = lines.iter().collect();
    assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");

    let storage = ksync_storage_file::FileStorage::open(&log).expect("the log reopens");
    let held = ksync_core::Storage::read_since(&storage, 0, usize::MAX).expect("read");
    assert!(
        held.iter().any(|s| s.event.id == emitted),
        "the emitted event is in the log"
    );
}

/// `--generate-network-key` needs no `--id` (as README shows it): it writes a key file only its
/// owner can read, in the format `--network-key-file` takes, prints its fingerprint, and never
/// overwrites a key that is already there.
#[test]
fn generate_network_key_writes_a_private_key_file_and_keeps_an_existing_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("swarm.key");
    let out = ksync()
        .env_remove("KSYNC_PEER_ID")
        .args(["peer", "--generate-network-key"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).expect("key file");
    let key = ksync_p2p::NetworkKey::parse(&text).expect("a network key file");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&key.fingerprint()), "{stdout}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }

    let again = ksync()
        .env_remove("KSYNC_PEER_ID")
        .args(["peer", "--generate-network-key"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&path).expect("key file"), text);

    // Without it, --id is still required.
    let out = ksync()
        .env_remove("KSYNC_PEER_ID")
        .args(["peer", "--duration", "1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--id"));
}
