//! Disk faults: torn tails at every byte of the last records, random bit flips mid-file, and
//! failing `fdatasync` (EIO) and writes (ENOSPC) through the storage fault hook, alone and
//! under the WebSocket relay.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ksync_core::{Event, Storage, StorageError};
use ksync_storage_file::format::{HEADER_LEN, RECORD_HEADER_LEN};
use ksync_storage_file::{
    Durability, FaultHook, FileProvider, FileStorage, FileStorageOptions, WriteFault,
};
use ksync_tests::{budget, figures};
use rand::Rng;
use serde_json::json;

use crate::common::*;

/// Opens a log, retrying briefly while another thread's freshly forked child still holds a
/// copy of the previous handle's descriptor (and so its `flock`) until it execs: other tests
/// in this binary spawn child processes, and the lock is per open file description.
fn open_retrying(path: &Path) -> Result<FileStorage, StorageError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match FileStorage::open(path) {
            Err(StorageError::Io { source, .. })
                if source.kind() == io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn ev(id: &str, n: u64) -> Event {
    Event::new(
        id,
        "disk",
        json!({"n": n, "text": "x".repeat((n % 40) as usize)}),
        n,
    )
}

/// Writes `n` events (one record each) and returns the file bytes and each record's start.
fn write_log(path: &Path, n: u64) -> (Vec<u8>, Vec<usize>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    {
        let storage = FileStorage::open(path).expect("open");
        rt.block_on(async {
            for i in 0..n {
                storage
                    .append(vec![ev(&format!("e{i}"), i)])
                    .await
                    .expect("append");
            }
        });
    }
    let bytes = std::fs::read(path).expect("read");
    (bytes.clone(), record_starts(&bytes))
}

fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = HEADER_LEN;
    while at + RECORD_HEADER_LEN <= bytes.len() {
        starts.push(at);
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        at += RECORD_HEADER_LEN + len;
    }
    assert_eq!(at, bytes.len(), "the log parses to its end");
    starts
}

#[test]
fn torn_tail_at_every_byte_of_the_last_records_is_cut_and_reported() {
    let last = budget(3, 12) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let (bytes, starts) = write_log(&dir.path().join("base.log"), 40);
    let from = starts[starts.len() - last];
    let case = dir.path().join("case.log");
    let mut cases = 0;
    let mut recovered = 0;
    for cut in from..bytes.len() {
        // Two shapes of a crash mid-append: the file ends early (truncated), or it kept its
        // length but the tail never reached the disk (zero-filled).
        for zero_fill in [false, true] {
            let mut damaged = bytes[..cut].to_vec();
            if zero_fill {
                damaged.resize(bytes.len(), 0);
            }
            std::fs::write(&case, &damaged).expect("write case");
            cases += 1;
            // Records wholly before the cut survive; the one the cut lands in is the torn tail.
            let complete =
                starts.iter().filter(|s| **s < cut).count() - usize::from(!starts.contains(&cut));
            let storage = open_retrying(&case)
                .unwrap_or_else(|e| panic!("cut {cut} zero_fill {zero_fill}: {e}"));
            let report = storage.recovery();
            let at_boundary = starts.contains(&cut) && !zero_fill;
            let ok = storage.len() == complete as u64
                && report.cut_tail.is_some() != at_boundary
                && report
                    .cut_tail
                    .as_ref()
                    .is_none_or(|c| c.offset == starts[complete] as u64)
                && storage
                    .read_since(0, usize::MAX)
                    .expect("read")
                    .iter()
                    .enumerate()
                    .all(|(i, s)| s.event == ev(&format!("e{i}"), i as u64));
            assert!(
                ok,
                "cut {cut} zero_fill {zero_fill}: {report:?}, len {}",
                storage.len()
            );
            recovered += 1;
            drop(storage);
            // Recovery cut the file to the last complete record: a second open is clean.
            let again = open_retrying(&case).expect("second open");
            assert!(again.recovery().cut_tail.is_none());
        }
    }
    figures::report(
        "disk",
        "torn tails recovered (every byte of the last records, truncated and zero-filled)",
        format!("{recovered}/{cases}"),
        "N/N",
        recovered == cases,
    );
}

#[test]
fn bit_flips_mid_file_are_detected_and_name_the_offset() {
    let trials = budget(150, 5_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let (bytes, starts) = write_log(&dir.path().join("base.log"), 60);
    let last_start = *starts.last().expect("records");
    let case = dir.path().join("case.log");
    let mut rng = rand::rng();
    let mut detected = 0;
    let mut named = 0;
    for _ in 0..trials {
        let pos = rng.random_range(HEADER_LEN..last_start);
        let bit = rng.random_range(0..8);
        let mut damaged = bytes.clone();
        damaged[pos] ^= 1 << bit;
        std::fs::write(&case, &damaged).expect("write case");
        let record = *starts.iter().rev().find(|s| **s <= pos).expect("record") as u64;
        match open_retrying(&case) {
            Err(e @ StorageError::Corrupt { offset, .. }) => {
                detected += 1;
                if offset == record && e.to_string().contains(&record.to_string()) {
                    named += 1;
                } else {
                    panic!("flip at {pos} (record {record}) reported as {e}");
                }
            }
            Err(other) => panic!("flip at {pos}: unexpected error {other}"),
            Ok(s) => panic!("flip at {pos} bit {bit} accepted: {:?}", s.recovery()),
        }
        // Refused means untouched: nothing was cut.
        assert_eq!(std::fs::read(&case).expect("read"), damaged);
    }
    figures::report(
        "disk",
        "bit flips mid-file detected",
        format!("{detected}/{trials}"),
        "100%",
        detected == trials,
    );
    figures::report(
        "disk",
        "detections naming the damaged record's offset",
        format!("{named}/{detected}"),
        "all",
        named == detected,
    );
}

/// Fails one `fdatasync` (EIO) or one write (ENOSPC, half written) at a chosen call, and
/// remembers the longest the file was when a sync succeeded.
struct Faults {
    path: PathBuf,
    fail_sync_at: AtomicUsize,
    fail_write_at: AtomicUsize,
    syncs: AtomicUsize,
    writes: AtomicUsize,
    durable_len: AtomicU64,
    failed: AtomicBool,
}

impl Faults {
    fn new(path: &Path, fail_sync_at: usize, fail_write_at: usize) -> Self {
        Self {
            path: path.to_path_buf(),
            fail_sync_at: AtomicUsize::new(fail_sync_at),
            fail_write_at: AtomicUsize::new(fail_write_at),
            syncs: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
            durable_len: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }
    }
}

impl FaultHook for Faults {
    fn before_write(&self, len: usize) -> Result<(), WriteFault> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_write_at.load(Ordering::SeqCst) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(WriteFault {
                written: len / 2,
                error: io::Error::from_raw_os_error(28), // ENOSPC
            });
        }
        Ok(())
    }

    fn before_sync(&self) -> io::Result<()> {
        let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_sync_at.load(Ordering::SeqCst) {
            self.failed.store(true, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        // Everything written so far is what this sync makes durable. The largest such length
        // wins: two sync threads may read the length and record it in either order, and a
        // smaller length recorded last would model the later sync's data as lost.
        let len = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        self.durable_len.fetch_max(len, Ordering::SeqCst);
        Ok(())
    }
}

/// After a failed fsync Linux may drop the dirty pages: model the worst case by cutting the
/// file back to what the last good sync covered.
fn lose_unsynced(path: &Path, faults: &Faults) {
    let durable = faults.durable_len.load(Ordering::SeqCst);
    if durable > 0 {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open");
        file.set_len(durable).expect("cut");
    }
}

#[test]
fn failed_fsync_and_full_disk_acknowledge_nothing_unsynced() {
    let trials = budget(24, 400);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rng();
    let (mut acked_total, mut false_acks, mut refused, mut refused_present) = (0, 0, 0, 0);
    for trial in 0..trials {
        let path = dir.path().join(format!("t{trial}.log"));
        let eio = trial % 2 == 0;
        let at = rng.random_range(2..30);
        let faults = Arc::new(if eio {
            Faults::new(&path, at, usize::MAX)
        } else {
            Faults::new(&path, usize::MAX, at)
        });
        let durability = if trial % 4 < 2 {
            Durability::GroupCommit
        } else {
            Durability::EveryAppend
        };
        let storage = Arc::new(
            FileStorage::builder(&path)
                .durability(durability)
                .fault_hook(faults.clone())
                .open()
                .expect("open"),
        );
        let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
        let failed: Arc<Mutex<HashSet<String>>> = Arc::default();
        rt.block_on(async {
            let tasks: Vec<_> = (0..4)
                .map(|t| {
                    let storage = Arc::clone(&storage);
                    let acked = Arc::clone(&acked);
                    let failed = Arc::clone(&failed);
                    tokio::spawn(async move {
                        for i in 0..40u64 {
                            let id = format!("t{t}-{i}");
                            match storage.append(vec![ev(&id, i)]).await {
                                Ok(_) => acked.lock().expect("lock").insert(id),
                                Err(_) => failed.lock().expect("lock").insert(id),
                            };
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
        });
        assert!(
            faults.failed.load(Ordering::SeqCst),
            "trial {trial}: no fault fired"
        );
        drop(storage);
        if eio {
            lose_unsynced(&path, &faults);
        }
        let reopened = open_retrying(&path).expect("reopen");
        let acked = acked.lock().expect("lock");
        let failed = failed.lock().expect("lock");
        acked_total += acked.len();
        refused += failed.len();
        false_acks += acked
            .iter()
            .filter(|id| reopened.get(id, 1).expect("get").is_none())
            .count();
        if !eio {
            // A failed write is cut back at once: what it refused is not in the log.
            refused_present += failed
                .iter()
                .filter(|id| reopened.get(id, 1).expect("get").is_some())
                .count();
        }
        assert!(!failed.is_empty(), "trial {trial}: nothing was refused");
    }
    figures::report(
        "disk",
        "false acks (acknowledged, then missing after EIO/ENOSPC)",
        format!("{false_acks} of {acked_total}"),
        "0",
        false_acks == 0,
    );
    figures::report(
        "disk",
        "ENOSPC-refused appends present after reopen",
        format!("{refused_present} of {refused} refused"),
        "0",
        refused_present == 0,
    );
    assert_eq!((false_acks, refused_present), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_never_acks_what_a_failed_fsync_did_not_cover() {
    let trials = budget(6, 60);
    let mut false_acks = 0;
    let mut stored_total = 0;
    let mut failed_total = 0;
    for trial in 0..trials {
        let dir = tempfile::tempdir().expect("tempdir");
        let room_log = dir.path().join("rooms").join("disk.log");
        let faults = Arc::new(Faults::new(&room_log, 3 + (trial as usize % 7), usize::MAX));
        let mut options = FileStorageOptions::default();
        options.fault_hook = Some(faults.clone());
        let provider = Arc::new(FileProvider::with_options(dir.path(), options).expect("provider"));
        let server = ksync_server::Server::with_provider(
            {
                let mut server_config = ksync_server::ServerConfig::default();
                server_config.bind = "127.0.0.1:0".parse().expect("addr");
                server_config
            },
            provider,
            ksync_server::StorageLocation::Directory(dir.path().to_path_buf()),
        )
        .expect("server")
        .start()
        .await
        .expect("start");
        let url = format!("ws://{}/ws/disk", server.local_addr());
        let (mut ws, _) = join(&url, hello(None)).await;
        let mut stored = HashSet::new();
        for i in 0..20u64 {
            let ids: Vec<String> = (0..3).map(|k| format!("p{i}-{k}")).collect();
            let events: Vec<_> = ids.iter().map(|id| event(id, i)).collect();
            send_json(
                &mut ws,
                json!({"type": "publish", "ref": i, "events": events}),
            )
            .await;
            let Some(ack) = recv_json(&mut ws).await else {
                break; // closed (1011) after the storage failure
            };
            if ack["type"] != "ack" {
                continue;
            }
            for (id, r) in ids.iter().zip(ack["results"].as_array().expect("results")) {
                match r["status"].as_str() {
                    Some("stored") => {
                        stored.insert(id.clone());
                    }
                    Some("failed") => failed_total += 1,
                    other => panic!("unexpected status {other:?} in {ack}"),
                }
            }
        }
        assert!(faults.failed.load(Ordering::SeqCst), "no fault fired");
        drop(ws);
        drop(server);
        // The server is gone from this runtime's view once its tasks see the socket closed;
        // give the room task a moment to drop its log, then reopen the file ourselves.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        lose_unsynced(&room_log, &faults);
        let reopened = loop {
            match FileStorage::open(&room_log) {
                Ok(s) => break s,
                Err(StorageError::Io { .. }) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        stored_total += stored.len();
        false_acks += stored
            .iter()
            .filter(|id| reopened.get(id, 1).expect("get").is_none())
            .count();
    }
    figures::report(
        "disk",
        "relay: `stored` acks missing after a failed fsync",
        format!("{false_acks} of {stored_total} ({failed_total} reported failed)"),
        "0",
        false_acks == 0,
    );
    assert_eq!(false_acks, 0);
    assert!(failed_total > 0, "the relay never reported a failure");
}
