//! `cargo xtask bench storage`: FileStorage against raw file IO with the same record sizes.
//!
//! - group commit: many concurrent appenders of ~200-byte events vs a raw loop that writes
//!   the same number of same-sized records per `write` and calls `fdatasync` after each batch,
//!   and vs the least any async group commit can do here ([`minimal_group_commit`]: the same
//!   appender tasks, one writer thread, no encoding and no index), which shows how much of
//!   the distance to the raw loop is kSync's and how much is the appenders' round trips;
//! - durability `None` (same appenders) vs raw buffered writes of the same records;
//! - reopen (replay) of a 1,000,000-event log vs reading the same file raw.
//!
//! Every round runs kSync and its baseline back to back, alternating, after a warm-up round.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use ksync_core::{Event, Storage};
use ksync_storage_file::{Durability, FileStorage};
use serde_json::json;

use super::{Report, Series, percentile};

/// Concurrent appenders (and, for the raw loop, records per write + fdatasync).
const APPENDERS: usize = 64;
/// Appends per appender per group-commit round.
const SYNCED_APPENDS_EACH: usize = 40;
/// Appends per appender per durability-None round.
const UNSYNCED_APPENDS_EACH: usize = 1_500;
/// Events in the reopen scenario.
const REOPEN_EVENTS: usize = 1_000_000;
/// Measured rounds (after one warm-up round).
const ROUNDS: usize = 5;

/// A ~200-byte event (on disk, with its record header).
fn event(task: usize, i: usize) -> Event {
    Event::new(
        format!("{task:04}-{i:012}"),
        "message",
        json!({
            "room": "general",
            "user": format!("user-{}", i % 100),
            "text": "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor",
            "n": i,
        }),
        1_700_000_000_000 + i as u64,
    )
    .with_origin("bench-replica")
}

/// The on-disk size of one event record, measured by appending one.
fn record_size(dir: &Path, rt: &tokio::runtime::Runtime) -> Result<usize> {
    let path = dir.join("probe.log");
    let storage = FileStorage::open(&path)?;
    let before = std::fs::metadata(&path)?.len();
    rt.block_on(storage.append(vec![event(0, 0)]))?;
    let after = std::fs::metadata(&path)?.len();
    drop(storage);
    std::fs::remove_file(&path)?;
    Ok(usize::try_from(after - before)?)
}

/// One round of FileStorage appenders: throughput and every append's latency.
struct AppendRound {
    events_per_sec: f64,
    latencies_ms: Vec<f64>,
}

/// FileStorage with `APPENDERS` tasks each appending `each` single events.
fn ksync_appenders(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    durability: Durability,
    each: usize,
) -> Result<AppendRound> {
    let storage = Arc::new(FileStorage::builder(path).durability(durability).open()?);
    // Each appender's events are made before the clock starts: the raw loop it is compared
    // with makes nothing inside its timed loop either. What is timed is unchanged: the same
    // single-event appends, each answered only once durable (per `durability`).
    let events: Vec<Vec<Event>> = (0..APPENDERS)
        .map(|task| (0..each).map(|i| event(task, i)).collect())
        .collect();
    let started = Instant::now();
    let latencies_ms = rt.block_on(async {
        let tasks: Vec<_> = events
            .into_iter()
            .map(|events| {
                let storage = Arc::clone(&storage);
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(each);
                    for event in events {
                        let sent = Instant::now();
                        storage.append(vec![event]).await?;
                        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok::<_, ksync_core::StorageError>(latencies)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(APPENDERS * each);
        for t in tasks {
            all.extend(t.await.map_err(|e| anyhow!("appender panicked: {e}"))??);
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let elapsed = started.elapsed();
    let total = (APPENDERS * each) as u64;
    anyhow::ensure!(
        storage.len() == total,
        "lost events: {} of {total}",
        storage.len()
    );
    drop(storage);
    std::fs::remove_file(path)?;
    Ok(AppendRound {
        events_per_sec: total as f64 / elapsed.as_secs_f64(),
        latencies_ms,
    })
}

/// Records queued for [`minimal_group_commit`]'s writer, each with its appender's answer.
struct FloorQueue {
    records: Vec<(Vec<u8>, tokio::sync::oneshot::Sender<()>)>,
    /// While the writer waits: the queue length at which an appender wakes it (so a group
    /// costs one wake-up of the writer, not one per record).
    wake_at: usize,
    closed: bool,
}

fn lock(queue: &Mutex<FloorQueue>) -> std::sync::MutexGuard<'_, FloorQueue> {
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

/// The least work an async group commit can do with the same appenders: `APPENDERS` tasks
/// each hand `each` ready-made records (one at a time, waiting for each to be durable) to one
/// writer thread, which takes what is queued (waiting up to 1 ms for as many as its last group
/// had, so groups stay full), writes it in one `write`, `fdatasync`s and answers. No encoding,
/// no index, no checks: what remains is the round trip every appender makes (a queue, a
/// wake-up of the writer, a wake-up of the task) around the raw loop's work.
fn minimal_group_commit(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    record: usize,
    each: usize,
) -> Result<f64> {
    let mut file = File::create(path)?;
    let queue = Arc::new((
        Mutex::new(FloorQueue {
            records: Vec::new(),
            wake_at: 1,
            closed: false,
        }),
        Condvar::new(),
    ));
    let writer = {
        let queue = Arc::clone(&queue);
        std::thread::spawn(move || -> std::io::Result<usize> {
            let (mutex, ready) = &*queue;
            let (mut last_group, mut written) = (1, 0);
            let mut buf = Vec::new();
            loop {
                let group = {
                    let mut q = lock(mutex);
                    while q.records.is_empty() && !q.closed {
                        q.wake_at = 1;
                        q = ready.wait(q).unwrap_or_else(|p| p.into_inner());
                    }
                    let deadline = Instant::now() + Duration::from_millis(1);
                    while q.records.len() < last_group && !q.closed {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        q.wake_at = last_group;
                        q = ready
                            .wait_timeout(q, left)
                            .map(|(q, _)| q)
                            .unwrap_or_else(|p| p.into_inner().0);
                    }
                    if q.records.is_empty() {
                        return Ok(written);
                    }
                    q.wake_at = usize::MAX;
                    std::mem::take(&mut q.records)
                };
                last_group = group.len();
                buf.clear();
                for (bytes, _) in &group {
                    buf.extend_from_slice(bytes);
                }
                file.write_all(&buf)?;
                file.sync_data()?;
                written += group.len();
                for (_, answer) in group {
                    let _ = answer.send(());
                }
            }
        })
    };
    let records: Vec<Vec<Vec<u8>>> = (0..APPENDERS)
        .map(|_| (0..each).map(|_| vec![0x5au8; record]).collect())
        .collect();
    let started = Instant::now();
    let appended = rt.block_on(async {
        let tasks: Vec<_> = records
            .into_iter()
            .map(|records| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move {
                    for bytes in records {
                        let (answer, durable) = tokio::sync::oneshot::channel();
                        {
                            let (mutex, ready) = &*queue;
                            let mut q = lock(mutex);
                            q.records.push((bytes, answer));
                            if q.records.len() >= q.wake_at {
                                q.wake_at = usize::MAX;
                                ready.notify_one();
                            }
                        }
                        durable.await?;
                    }
                    Ok::<_, tokio::sync::oneshot::error::RecvError>(())
                })
            })
            .collect();
        let mut done = 0;
        for task in tasks {
            task.await??;
            done += 1;
        }
        Ok::<_, anyhow::Error>(done)
    });
    let elapsed = started.elapsed();
    {
        let (mutex, ready) = &*queue;
        lock(mutex).closed = true;
        ready.notify_one();
    }
    let written = writer
        .join()
        .map_err(|_| anyhow!("the minimal group commit writer panicked"))??;
    anyhow::ensure!(appended? == APPENDERS, "an appender failed");
    anyhow::ensure!(
        written == APPENDERS * each,
        "minimal group commit lost records: {written} of {}",
        APPENDERS * each
    );
    std::fs::remove_file(path)?;
    Ok((APPENDERS * each) as f64 / elapsed.as_secs_f64())
}

/// Median time of one small `write` + `fdatasync` in `dir`, in microseconds.
fn fdatasync_cost_us(dir: &Path) -> Result<f64> {
    let path = dir.join("probe.bin");
    let mut file = File::create(&path)?;
    let mut samples = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        file.write_all(&[0u8; 256])?;
        file.sync_data()?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(percentile(&mut samples, 50.0))
}

/// Raw loop: `batches` times, one `write` of `APPENDERS` records then `fdatasync`.
fn raw_synced(path: &Path, record: usize, batches: usize) -> Result<f64> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    let payload = vec![0x5au8; record * APPENDERS];
    let started = Instant::now();
    for _ in 0..batches {
        file.write_all(&payload)?;
        file.sync_data()?;
    }
    let elapsed = started.elapsed();
    drop(file);
    std::fs::remove_file(path)?;
    Ok((batches * APPENDERS) as f64 / elapsed.as_secs_f64())
}

/// Raw buffered writes of `count` records, no sync.
fn raw_buffered(path: &Path, record: usize, count: usize) -> Result<f64> {
    let file = File::create(path)?;
    let mut out = BufWriter::with_capacity(64 << 10, file);
    let payload = vec![0x5au8; record];
    let started = Instant::now();
    for _ in 0..count {
        out.write_all(&payload)?;
    }
    out.flush()?;
    let elapsed = started.elapsed();
    drop(out);
    std::fs::remove_file(path)?;
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// Builds the reopen log: `REOPEN_EVENTS` events in batches, durability None, then a flush.
fn build_big_log(rt: &tokio::runtime::Runtime, path: &Path) -> Result<()> {
    let storage = FileStorage::builder(path)
        .durability(Durability::None)
        .open()?;
    rt.block_on(async {
        let batch = 10_000;
        for start in (0..REOPEN_EVENTS).step_by(batch) {
            let events = (start..start + batch).map(|i| event(0, i)).collect();
            storage.append(events).await?;
        }
        storage.flush().await
    })?;
    anyhow::ensure!(storage.len() == REOPEN_EVENTS as u64, "big log incomplete");
    Ok(())
}

fn ksync_reopen(path: &Path) -> Result<f64> {
    let started = Instant::now();
    let storage = FileStorage::open(path)?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        storage.len() == REOPEN_EVENTS as u64,
        "reopen found {} events",
        storage.len()
    );
    // Dropping a million events is not part of opening.
    drop(storage);
    Ok(elapsed.as_secs_f64() * 1000.0)
}

fn raw_read(path: &Path) -> Result<f64> {
    let started = Instant::now();
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0usize;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(total > 0, "empty file");
    Ok(elapsed.as_secs_f64() * 1000.0)
}

/// Runs one kSync/baseline pair per round, alternating, after a warm-up.
fn alternate(
    mut ksync: impl FnMut() -> Result<f64>,
    mut baseline: impl FnMut() -> Result<f64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut samples = rotate(&mut [&mut ksync, &mut baseline])?.into_iter();
    let a = samples.next().unwrap_or_default();
    let b = samples.next().unwrap_or_default();
    Ok((a, b))
}

/// Runs each of `runs` once per round after a warm-up round, starting each round with the
/// next one (so none always runs first, on a colder or warmer cache); one sample list per run.
fn rotate(runs: &mut [&mut dyn FnMut() -> Result<f64>]) -> Result<Vec<Vec<f64>>> {
    for run in runs.iter_mut() {
        run()?;
    }
    let mut samples = vec![Vec::with_capacity(ROUNDS); runs.len()];
    for round in 0..ROUNDS {
        for k in 0..runs.len() {
            let i = (round + k) % runs.len();
            samples[i].push(runs[i]()?);
        }
    }
    Ok(samples)
}

/// The `storage` scenario.
pub fn run(report: &mut Report) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    // Under target/ (a real disk), not /tmp (which may be tmpfs and make fsync free).
    std::fs::create_dir_all("target/bench")?;
    let dir = tempfile::Builder::new()
        .prefix("storage-")
        .tempdir_in("target/bench")?;
    let record = record_size(dir.path(), &rt)?;
    let scenario = report.scenario("storage");
    scenario.note(format!(
        "record size {record} bytes on disk; {APPENDERS} concurrent appenders; {ROUNDS} rounds after a warm-up, alternating"
    ));

    let sync_us = fdatasync_cost_us(dir.path())?;
    scenario.note(format!(
        "one small write+fdatasync here: {sync_us:.0} us (median of 20)"
    ));
    let log = dir.path().join("gc.log");
    let raw = dir.path().join("raw.bin");
    if sync_us < 20.0 {
        // tmpfs, or a disk cache that ignores flushes: the comparison would measure the
        // channel and the index, not the cost group commit exists to amortise.
        scenario.skip(
            "group commit vs write+fdatasync loop",
            &format!("fdatasync costs {sync_us:.1} us here, so there is nothing to amortise"),
        );
    } else {
        eprintln!("group commit vs write+fdatasync loop ...");
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let floor_log = dir.path().join("floor.bin");
        let mut samples = rotate(&mut [
            &mut || {
                let mut round =
                    ksync_appenders(&rt, &log, Durability::GroupCommit, SYNCED_APPENDS_EACH)?;
                p50.push(percentile(&mut round.latencies_ms, 50.0));
                p99.push(percentile(&mut round.latencies_ms, 99.0));
                Ok(round.events_per_sec)
            },
            &mut || raw_synced(&raw, record, SYNCED_APPENDS_EACH),
            &mut || minimal_group_commit(&rt, &floor_log, record, SYNCED_APPENDS_EACH),
        ])?
        .into_iter();
        let (ks, base, floor) = (
            samples.next().unwrap_or_default(),
            samples.next().unwrap_or_default(),
            samples.next().unwrap_or_default(),
        );
        // The first entries come from the warm-up round.
        let (p50, p99) = (p50.split_off(1), p99.split_off(1));
        let k = scenario.series(Series::new("ksync file group commit", "events/s", true, ks));
        let b = scenario.series(Series::new(
            &format!("raw write+fdatasync, {APPENDERS} records/batch"),
            "events/s",
            true,
            base,
        ));
        let f = scenario.series(Series::new(
            "minimal async group commit (no encoding, no index)",
            "events/s",
            true,
            floor,
        ));
        scenario.ratio("group commit / raw fdatasync loop", k, b, Some(0.8));
        scenario.ratio(
            "minimal async group commit / raw fdatasync loop",
            f,
            b,
            None,
        );
        scenario.ratio("group commit / minimal async group commit", k, f, None);
        scenario.series(Series::new(
            "group commit append latency p50",
            "ms",
            false,
            p50,
        ));
        scenario.series(Series::new(
            "group commit append latency p99",
            "ms",
            false,
            p99,
        ));
    }

    eprintln!("durability None vs raw buffered writes ...");
    let (ks, base) = alternate(
        || {
            ksync_appenders(&rt, &log, Durability::None, UNSYNCED_APPENDS_EACH)
                .map(|r| r.events_per_sec)
        },
        || raw_buffered(&raw, record, APPENDERS * UNSYNCED_APPENDS_EACH),
    )?;
    let k = scenario.series(Series::new(
        "ksync file durability None",
        "events/s",
        true,
        ks,
    ));
    let b = scenario.series(Series::new("raw buffered writes", "events/s", true, base));
    scenario.ratio("durability None / raw buffered writes", k, b, None);

    eprintln!("building a {REOPEN_EVENTS}-event log ...");
    let big = dir.path().join("big.log");
    let built = Instant::now();
    build_big_log(&rt, &big)?;
    let size = std::fs::metadata(&big)?.len();
    scenario.note(format!(
        "reopen log: {REOPEN_EVENTS} events, {:.1} MB, built in {:.1} s",
        size as f64 / 1e6,
        built.elapsed().as_secs_f64()
    ));
    eprintln!("reopen vs raw read ...");
    let (ks, base) = alternate(|| ksync_reopen(&big), || raw_read(&big))?;
    let k = scenario.series(Series::new("ksync reopen 1M events", "ms", false, ks));
    scenario.series(Series::new("raw read of the same file", "ms", false, base));
    let budget = Duration::from_secs(1).as_secs_f64() * 1000.0;
    scenario.ratio_max("reopen 1M events / 1 s budget", k, budget, 1.0);
    Ok(())
}
