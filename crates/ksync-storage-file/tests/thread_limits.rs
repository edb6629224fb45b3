//! Opening a log when the process cannot start a thread (a thread, process or memory limit,
//! which many open logs reach: each costs a writer thread and a sync thread, and its replay
//! three more for a moment): the open fails with an error, nothing panics, and a new log's
//! file made before the failure is removed.
//!
//! The test runs itself again with `RUST_MIN_STACK` far beyond any address space, so every
//! thread the child starts fails in the kernel (EAGAIN), as at a real limit, without limiting
//! anything outside that process. `--test-threads=1` runs the child's test on its main thread.

use std::process::Command;

use ksync_core::{Event, LogName, Name, StorageError, StorageProvider};
use ksync_storage_file::FileProvider;
use serde_json::json;

/// Set in the child: the data directory to open logs in.
const CHILD_DIR: &str = "KSYNC_TEST_NO_THREADS_DIR";
/// What the child prints once it has seen every open fail as it should.
const CHILD_DONE: &str = "child: every open failed with an error";

fn room(name: &str) -> LogName {
    LogName::Room(Name::new(name).expect("name"))
}

#[test]
fn opening_a_log_without_threads_fails_with_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let provider = FileProvider::new(dir.path()).expect("provider");
        let log = provider.open(&room("kept")).expect("open");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime
            .block_on(log.append(vec![Event::new("a", "t", json!({}), 1)]))
            .expect("append");
    }
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_opens_logs_without_threads",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_DIR, dir.path())
        // 100 TiB per thread stack: no thread can be had.
        .env("RUST_MIN_STACK", (100u64 << 40).to_string())
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(CHILD_DONE),
        "child failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // With threads again, the log opens (nothing was left locked) and holds its event.
    let provider = FileProvider::new(dir.path()).expect("provider");
    assert_eq!(provider.open(&room("kept")).expect("reopen").len(), 1);
}

/// The child half of the test above (does nothing unless run by it).
#[test]
fn child_opens_logs_without_threads() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let provider = FileProvider::new(dir).expect("provider");
    // A log with events (its replay needs threads) and a new one (its writer does too).
    for name in ["kept", "fresh"] {
        for _ in 0..2 {
            match provider.open(&room(name)) {
                Err(StorageError::Io { context, source }) => {
                    assert!(context.contains("thread"), "{name}: {context}: {source}");
                }
                Err(other) => panic!("{name}: {other}"),
                Ok(_) => panic!("{name}: opened without threads"),
            }
        }
    }
    // The new log's file, made before the open failed, is gone again: a name refused so is
    // not left on disk.
    assert!(!provider.path_of(&room("fresh")).exists());
    assert_eq!(provider.list().expect("list"), vec![room("kept")]);
    println!("{CHILD_DONE}");
}
