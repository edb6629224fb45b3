//! A small driver for profiling `FileStorage` under callgrind or `perf` (not a benchmark: the
//! numbers it prints are one run). It uses the same ~200-byte events as
//! `cargo xtask bench storage`.
//!
//! ```text
//! cargo run --release -p ksync-storage-file --example storage_profile -- build <path> <events>
//! cargo run --release -p ksync-storage-file --example storage_profile -- reopen <path>
//! cargo run --release -p ksync-storage-file --example storage_profile -- read <path>
//! cargo run --release -p ksync-storage-file --example storage_profile -- group <dir> <appenders> <appends-each> [syncs-in-flight] [window-us]
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ksync_core::{Event, Storage, StorageError};
use ksync_storage_file::{Durability, FileStorage};
use serde_json::json;

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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn build(path: &Path, events: usize) -> Result<(), StorageError> {
    let storage = FileStorage::builder(path)
        .durability(Durability::None)
        .open()?;
    runtime().block_on(async {
        for start in (0..events).step_by(10_000) {
            let end = (start + 10_000).min(events);
            storage
                .append((start..end).map(|i| event(0, i)).collect())
                .await?;
        }
        storage.flush().await
    })
}

fn reopen(path: &Path) -> Result<(), StorageError> {
    let started = Instant::now();
    let storage = FileStorage::open(path)?;
    let elapsed = started.elapsed();
    println!("reopened {} events in {elapsed:?}", storage.len());
    // Freeing a million events is not part of opening: leave it to process exit so a
    // profile of this run shows the open alone.
    std::mem::forget(storage);
    Ok(())
}

/// Reopens the log and reads it all once, in pages of 10,000 (as a catch-up or a push does),
/// dropping each page: for the peak memory of a process that reads its whole log
/// (`/usr/bin/time -v`).
fn read(path: &Path) -> Result<(), StorageError> {
    let started = Instant::now();
    let storage = FileStorage::open(path)?;
    let opened = started.elapsed();
    let mut read = 0;
    let mut bytes = 0;
    loop {
        let page = storage.read_since(read, 10_000)?;
        let Some(last) = page.last() else {
            break;
        };
        read = last.seq;
        bytes += page.iter().map(|s| s.event.id.len()).sum::<usize>();
    }
    println!(
        "reopened {} events in {opened:?}, read them ({bytes} id bytes) in {:?}",
        storage.len(),
        started.elapsed() - opened
    );
    std::mem::forget(storage);
    Ok(())
}

fn group(
    dir: &Path,
    appenders: usize,
    each: usize,
    syncs: usize,
    window: Duration,
) -> Result<(), StorageError> {
    let path = dir.join("group.log");
    let _ = std::fs::remove_file(&path);
    let storage = Arc::new(
        FileStorage::builder(&path)
            .syncs_in_flight(syncs)
            .group_commit_window(window)
            .open()?,
    );
    // Events are made before the clock starts, as in `cargo xtask bench storage`.
    let events: Vec<Vec<Event>> = (0..appenders)
        .map(|task| (0..each).map(|i| event(task, i)).collect())
        .collect();
    let started = Instant::now();
    runtime().block_on(async {
        let tasks: Vec<_> = events
            .into_iter()
            .map(|events| {
                let storage = Arc::clone(&storage);
                tokio::spawn(async move {
                    for event in events {
                        storage.append(vec![event]).await?;
                    }
                    Ok::<_, StorageError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("appender panicked")?;
        }
        Ok::<_, StorageError>(())
    })?;
    let elapsed = started.elapsed();
    let total = appenders * each;
    println!(
        "{total} appends in {elapsed:?}: {:.0} events/s",
        total as f64 / elapsed.as_secs_f64()
    );
    drop(storage);
    std::fs::remove_file(&path).map_err(|source| StorageError::Io {
        context: "removing the log".into(),
        source,
    })
}

const USAGE: &str = "usage: storage_profile build <path> <events> | reopen <path> | read <path> | group <dir> <appenders> <each> [<group size> [<delay µs>]]";

/// Argument `i`, or a usage error naming `what`.
fn arg<'a>(args: &'a [String], i: usize, what: &str) -> Result<&'a str, String> {
    args.get(i)
        .map(String::as_str)
        .ok_or_else(|| format!("missing {what}"))
}

/// Argument `i` as a number (`default` when absent and one is given).
fn number<T: std::str::FromStr>(
    args: &[String],
    i: usize,
    what: &str,
    default: Option<T>,
) -> Result<T, String> {
    match (args.get(i), default) {
        (None, Some(default)) => Ok(default),
        (None, None) => Err(format!("missing {what}")),
        (Some(s), _) => s
            .parse()
            .map_err(|_| format!("{what} must be a number, not {s:?}")),
    }
}

fn main() -> Result<(), StorageError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = || -> Result<Result<(), StorageError>, String> {
        Ok(match args.first().map(String::as_str) {
            Some("build") => build(
                Path::new(arg(&args, 1, "<path>")?),
                number(&args, 2, "<events>", None)?,
            ),
            Some("reopen") => reopen(Path::new(arg(&args, 1, "<path>")?)),
            Some("read") => read(Path::new(arg(&args, 1, "<path>")?)),
            Some("group") => group(
                Path::new(arg(&args, 1, "<dir>")?),
                number(&args, 2, "<appenders>", None)?,
                number(&args, 3, "<each>", None)?,
                number(&args, 4, "<group size>", Some(2))?,
                Duration::from_micros(number(&args, 5, "<delay µs>", Some(0))?),
            ),
            Some(other) => return Err(format!("unknown command {other:?}")),
            None => return Err("no command".into()),
        })
    };
    match run() {
        Ok(result) => result,
        Err(why) => {
            eprintln!("storage_profile: {why}\n{USAGE}");
            std::process::exit(2);
        }
    }
}
