//! A child process appends in a loop and prints every acknowledged event; it is killed with
//! SIGKILL at random moments. After each kill, every acknowledged event must be in the log.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ksync_core::{Event, Storage};
use ksync_storage_file::FileStorage;
use serde_json::json;

const CHILD_ENV: &str = "KSYNC_CRASH_CHILD_LOG";
const APPENDERS: usize = 8;

/// The child's body. A no-op when run as an ordinary test.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let storage = Arc::new(FileStorage::open(&path).expect("child open"));
        let start = storage.len();
        let tasks: Vec<_> = (0..APPENDERS)
            .map(|task| {
                let storage = Arc::clone(&storage);
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let id = format!("run{start}-t{task}-{i}");
                        let event = Event::new(
                            id.clone(),
                            "crash",
                            json!({"i": i, "pad": "p".repeat(100)}),
                            i,
                        );
                        let out = storage.append(vec![event]).await.expect("append");
                        let seq = out.last_seq().expect("appended");
                        println!("ack {seq} {id}");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
    });
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("crash.log");
    let exe = std::env::current_exe().expect("test binary");
    let mut seed = u64::from(std::process::id()) | 1;
    let mut acked: HashMap<String, u64> = HashMap::new();
    for round in 0..6 {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &log)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<(u64, String)>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ack ")
                    && let Some((seq, id)) = rest.split_once(' ')
                    && let Ok(seq) = seq.parse()
                {
                    let _ = tx.send((seq, id.to_owned()));
                }
            }
        });
        // Wait for the first acknowledgement, then kill at a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("child acknowledged nothing");
        acked.insert(first.1, first.0);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let wait = Duration::from_millis(seed % 250);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        reader.join().expect("reader");
        let before = acked.len();
        acked.extend(rx.try_iter().map(|(seq, id)| (id, seq)));
        let storage = FileStorage::open(&log).expect("reopen after SIGKILL");
        for (id, seq) in &acked {
            let stored = storage
                .get(id, 1)
                .expect("get")
                .unwrap_or_else(|| panic!("round {round}: acknowledged {id} (seq {seq}) lost"));
            assert_eq!(stored.seq, *seq, "round {round}: {id} moved");
        }
        let all = storage.read_since(0, usize::MAX).expect("read");
        assert_eq!(all.len() as u64, storage.len());
        eprintln!(
            "round {round}: waited {wait:?}, {} acknowledged this round, log holds {}, tail cut: {:?}",
            acked.len() - before + 1,
            storage.len(),
            storage.recovery().cut_tail
        );
    }
    assert!(!acked.is_empty());
}
