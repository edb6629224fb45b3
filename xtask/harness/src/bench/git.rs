//! `cargo xtask bench git`: push 100,000 ~200-byte events to the repository service in batches,
//! then clone them into an empty client, over loopback HTTP; in memory and with file storage.
//!
//! Baselines in the same run, alternating with kSync round by round:
//! - the floor: `serde_json` encode of the same events, a raw loopback TCP copy of the bytes,
//!   and decode. Push + clone moves the events twice (up, then down), so the end-to-end ratio
//!   compares against two floor passes; push and clone alone compare against one;
//! - `pouchdb-server` from npm (installed into `target/bench/pouchdb`, in-memory mode):
//!   `_bulk_docs` then `_replicate` of 20,000 docs, normalised to docs/s. Skipped with a message
//!   when npm or the package is unavailable.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ksync_core::{
    AllowAll, Event, InMemoryProvider, InMemoryStorage, Name, PullPushClient, Replica, Storage,
    StorageProvider, SyncClient,
};
use ksync_git::GitSyncClient;
use ksync_git::server::GitServer;
use ksync_storage_file::{FileProvider, FileStorage};
use serde_json::json;

use super::{Report, Series};

/// Events pushed and cloned per round.
const EVENTS: usize = 100_000;
/// Events per push request (the client's default; its 4 MiB byte budget holds ~17,000 of
/// these events, so the count is what cuts the batches).
const PUSH_BATCH: usize = ksync_git::wire::DEFAULT_PUSH_BATCH;
/// Events per pull page when cloning (the server's maximum page).
const CLONE_PAGE: usize = 10_000;
/// Documents in the pouchdb-server baseline.
const POUCH_DOCS: usize = 20_000;
/// Documents per `_bulk_docs` request.
const POUCH_BATCH: usize = 1_000;
/// Measured rounds, after one warm-up round.
const ROUNDS: usize = 3;
/// The origin of the pushed events, which is also the pushing replica's id.
const ORIGIN: &str = "bench-replica";

/// A ~200-byte event (as JSON).
fn event(i: usize) -> Event {
    Event::new(
        format!("evt-{i:012}"),
        "message",
        json!({
            "room": "general",
            "user": format!("user-{}", i % 100),
            "text": "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod",
            "n": i,
        }),
        1_700_000_000_000 + i as u64,
    )
    .with_origin(ORIGIN)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Memory,
    File,
}

/// Seconds for the push and for the clone.
struct Timing {
    push: f64,
    clone: f64,
}

pub fn run(report: &mut Report) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let events: Vec<Event> = (0..EVENTS).map(event).collect();
    let bytes_each = serde_json::to_vec(&events)?.len() / EVENTS;
    let pouch = match PouchServer::start() {
        Ok(p) => Some(p),
        Err(e) => {
            report
                .scenario("git")
                .skip("pouchdb-server", &format!("{e:#}"));
            None
        }
    };

    let mut floor = Vec::new();
    let variants = [
        ("memory", Backend::Memory, false),
        ("memory, gzip", Backend::Memory, true),
        ("file", Backend::File, false),
    ];
    let mut push: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut clone: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut both: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut pouch_bulk = Vec::new();
    let mut pouch_replicate = Vec::new();
    let mut pouch_both = Vec::new();
    for round in 0..=ROUNDS {
        let warm_up = round == 0;
        let f = floor_pass(&events)?;
        for (i, (_, backend, gzip)) in variants.iter().enumerate() {
            let t = rt.block_on(ksync_round(&events, *backend, *gzip, round))?;
            if !warm_up {
                push[i].push(EVENTS as f64 / t.push);
                clone[i].push(EVENTS as f64 / t.clone);
                both[i].push(EVENTS as f64 / (t.push + t.clone));
            }
        }
        if let Some(p) = &pouch {
            let (bulk, replicate) = rt.block_on(p.round(round))?;
            if !warm_up {
                pouch_bulk.push(POUCH_DOCS as f64 / bulk);
                pouch_replicate.push(POUCH_DOCS as f64 / replicate);
                pouch_both.push(POUCH_DOCS as f64 / (bulk + replicate));
            }
        }
        if !warm_up {
            floor.push(EVENTS as f64 / f);
        }
        eprintln!(
            "  round {round} done{}",
            if warm_up { " (warm-up)" } else { "" }
        );
    }
    drop(pouch);

    let s = report.scenario("git");
    s.note(format!(
        "{EVENTS} events of ~{bytes_each} bytes (JSON); push batches of {PUSH_BATCH}, clone pages of {CLONE_PAGE}; loopback HTTP/1.1; {ROUNDS} rounds after a warm-up"
    ));
    let floor_one = s.series(Series::new(
        "floor: json encode + tcp copy + decode (1 pass)",
        "events/s",
        true,
        floor,
    ));
    let mut medians = Vec::new();
    for (i, (name, _, _)) in variants.iter().enumerate() {
        let p = s.series(Series::new(
            &format!("ksync push ({name})"),
            "events/s",
            true,
            push[i].clone(),
        ));
        let c = s.series(Series::new(
            &format!("ksync clone ({name})"),
            "events/s",
            true,
            clone[i].clone(),
        ));
        let b = s.series(Series::new(
            &format!("ksync push+clone ({name})"),
            "events/s",
            true,
            both[i].clone(),
        ));
        medians.push((*name, p, c, b));
    }
    for (name, p, c, b) in &medians {
        // Push + clone moves every event twice: compare with two floor passes.
        s.ratio(
            &format!("push+clone ({name}) / floor x2"),
            *b,
            floor_one / 2.0,
            (!name.contains("gzip")).then_some(0.5),
        );
        s.ratio(&format!("push ({name}) / floor"), *p, floor_one, None);
        s.ratio(&format!("clone ({name}) / floor"), *c, floor_one, None);
    }
    if !pouch_replicate.is_empty() {
        s.series(Series::new(
            "pouchdb-server _bulk_docs (in-memory)",
            "docs/s",
            true,
            pouch_bulk,
        ));
        let r = s.series(Series::new(
            "pouchdb-server _replicate (in-memory)",
            "docs/s",
            true,
            pouch_replicate,
        ));
        let pb = s.series(Series::new(
            "pouchdb-server _bulk_docs + _replicate",
            "docs/s",
            true,
            pouch_both,
        ));
        if let Some((_, _, c, b)) = medians.first() {
            s.ratio(
                "ksync clone (memory) / pouchdb _replicate",
                *c,
                r,
                Some(50.0),
            );
            s.ratio(
                "ksync push+clone (memory) / pouchdb bulk+replicate",
                *b,
                pb,
                None,
            );
        }
    }
    Ok(())
}

/// One floor pass: encode, copy over loopback TCP, decode. Returns seconds.
fn floor_pass(events: &[Event]) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> Result<Vec<u8>> {
        let (mut socket, _) = listener.accept()?;
        let mut received = Vec::new();
        socket.read_to_end(&mut received)?;
        Ok(received)
    });
    let start = Instant::now();
    let bytes = serde_json::to_vec(events)?;
    let mut socket = TcpStream::connect(addr)?;
    socket.set_nodelay(true)?;
    socket.write_all(&bytes)?;
    socket.shutdown(std::net::Shutdown::Write)?;
    let received = reader
        .join()
        .map_err(|_| anyhow!("floor reader panicked"))??;
    let decoded: Vec<Event> = serde_json::from_slice(&received)?;
    let secs = start.elapsed().as_secs_f64();
    if decoded.len() != events.len() {
        bail!("floor decoded {} of {} events", decoded.len(), events.len());
    }
    Ok(secs)
}

/// A local storage for one side of the round.
fn local_storage(backend: Backend, dir: &Path, name: &str) -> Result<Arc<dyn Storage>> {
    Ok(match backend {
        Backend::Memory => Arc::new(InMemoryStorage::new()),
        Backend::File => Arc::new(FileStorage::open(dir.join(name))?),
    })
}

async fn ksync_round(
    events: &[Event],
    backend: Backend,
    gzip: bool,
    round: usize,
) -> Result<Timing> {
    let dir = tempfile::tempdir()?;
    let provider: Arc<dyn StorageProvider> = match backend {
        Backend::Memory => Arc::new(InMemoryProvider::new()),
        Backend::File => {
            let data = dir.path().join("server");
            std::fs::create_dir(&data)?;
            Arc::new(FileProvider::new(&data)?)
        }
    };
    let service = GitServer::new(provider, Arc::new(AllowAll));
    let repo = format!("bench-{round}");
    service.create_repo(&Name::new(&repo)?).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    // As a server should: answers leave without waiting for Nagle's algorithm.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = service.router();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/git/{repo}");

    // The pushing replica already holds the events (as after `emit`); not measured.
    let storage = local_storage(backend, dir.path(), "pusher.log")?;
    for chunk in events.chunks(10_000) {
        storage.append(chunk.to_vec()).await?;
    }
    let pusher = GitSyncClient::builder(&url)
        .compression(gzip)
        .push_batch_size(PUSH_BATCH)
        .build()?;
    pusher.attach(Replica::with_id(storage, ORIGIN));
    let start = Instant::now();
    let pushed = pusher.push().await?;
    let push = start.elapsed().as_secs_f64();
    if pushed.pushed_events.len() != events.len() || pushed.server_version != events.len() as u64 {
        bail!(
            "push stored {} of {} events (server at {})",
            pushed.pushed_events.len(),
            events.len(),
            pushed.server_version
        );
    }

    let cloner = GitSyncClient::builder(&url)
        .compression(gzip)
        .page_size(CLONE_PAGE)
        .build()?;
    cloner.attach(Replica::with_id(
        local_storage(backend, dir.path(), "cloner.log")?,
        "bench-cloner",
    ));
    let start = Instant::now();
    let cloned = cloner.clone(&url, "main").await?;
    let clone = start.elapsed().as_secs_f64();
    if cloned.new_events.len() != events.len() {
        bail!(
            "clone got {} of {} events",
            cloned.new_events.len(),
            events.len()
        );
    }
    server.abort();
    Ok(Timing { push, clone })
}

/// pouchdb-server in in-memory mode, installed from npm under `target/bench/pouchdb`.
struct PouchServer {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl PouchServer {
    fn start() -> Result<Self> {
        let dir = PathBuf::from("target/bench/pouchdb");
        let bin = dir.join("node_modules/.bin/pouchdb-server");
        if !bin.exists() {
            std::fs::create_dir_all(&dir)?;
            eprintln!(
                "  installing pouchdb-server from npm into {}",
                dir.display()
            );
            let status = Command::new("npm")
                .args([
                    "install",
                    "pouchdb-server@4.2.0",
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                ])
                .current_dir(&dir)
                .status()
                .context("npm is not available")?;
            if !status.success() || !bin.exists() {
                bail!("npm install pouchdb-server failed ({status})");
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(std::fs::canonicalize(&bin)?)
            .args([
                "--in-memory",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pouchdb-server")?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?;
        let server = Self { child, base, http };
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = format!("127.0.0.1:{port}");
        loop {
            if answers(&addr) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("pouchdb-server did not answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// One round: `_bulk_docs` into a fresh database, then `_replicate` it into another.
    /// Returns the seconds of each.
    async fn round(&self, round: usize) -> Result<(f64, f64)> {
        let source = format!("src{round}");
        let target = format!("dst{round}");
        self.call(reqwest::Method::PUT, &format!("/{source}"), None)
            .await?;
        let docs: Vec<serde_json::Value> = (0..POUCH_DOCS)
            .map(|i| {
                let e = event(i);
                json!({"_id": e.id, "type": e.event_type, "data": e.data,
                       "timestamp": e.timestamp, "version": e.version})
            })
            .collect();
        let start = Instant::now();
        for chunk in docs.chunks(POUCH_BATCH) {
            self.call(
                reqwest::Method::POST,
                &format!("/{source}/_bulk_docs"),
                Some(json!({ "docs": chunk })),
            )
            .await?;
        }
        let bulk = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let answer = self
            .call(
                reqwest::Method::POST,
                "/_replicate",
                Some(json!({"source": source, "target": target, "create_target": true})),
            )
            .await?;
        let replicate = start.elapsed().as_secs_f64();
        let written = answer["docs_written"].as_u64().unwrap_or(0);
        if written != POUCH_DOCS as u64 {
            bail!("pouchdb replicated {written} of {POUCH_DOCS} docs: {answer}");
        }
        Ok((bulk, replicate))
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let response = req.send().await?;
        let status = response.status();
        let value: serde_json::Value = response.json().await?;
        if !status.is_success() {
            bail!("pouchdb-server {path}: {status} {value}");
        }
        Ok(value)
    }
}

impl Drop for PouchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether an HTTP server answers `GET /` with 200 at `addr` (host:port). std only: the server
/// is probed before any async runtime runs.
fn answers(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}
