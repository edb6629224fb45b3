//! `cargo xtask bench ws`: fan-out of ~200-byte JSON events from one publisher to N = 1, 10,
//! 100 subscribers, through the kSync relay and its baselines, in the same run:
//!
//! - `ksync-mem`: `ksync_ws::server::Relay` over `InMemoryProvider` (sequenced, stored, acked);
//! - `ksync-file`: the same relay over `ksync_storage_file::FileProvider` (fsync'd group commit);
//! - `bare-ws`: a bare tokio-tungstenite broadcast relay (no storage, no sequence, no acks);
//! - `nats`: `nats-server` (Debian package, installed with apt-get when missing and root),
//!   text protocol over TcpStream;
//! - `redis`: `redis-server` (Debian package, likewise) PUBLISH/SUBSCRIBE over RESP;
//! - `socketio`: a Socket.IO 4 relay on Node (`socket.io` from npm, installed into
//!   `target/bench/socketio`): `socket.to(room).emit(..)`, engine.io over WebSocket only.
//!
//! Every server runs in its own process (the three Rust relays in a child of this one, on a
//! 2-thread runtime); every client runs here, with the same code for every system except the
//! wire framing, so the client cost is the same for all. The publisher reads the replies to
//! its publishes (kSync's acks, redis' answers) on its own task, as a separate publishing
//! process would, not on the subscribers' runtime (see [`Publisher`]).
//!
//! Two measures per (system, N): deliveries/s at full speed (the publisher may run at most
//! [`WINDOW`] events ahead of the slowest subscriber, the same flow control for every system),
//! and the one-way latency p50/p99 at a steady 1,000 events/s. The full-speed runs go one
//! system after the other; the steady runs of all systems are interleaved in turns of 100
//! events, so that every system meets the same host stalls (see [`steady_interleaved`]).
//! Every subscriber must receive every event exactly once and in order; a lost, duplicated or reordered event fails the run.
//! Plus the memory of 10,000 idle connections held by a relay in a child process, against
//! nats-server.
//!
//! Knobs for profiling (e.g. counting the relay's instructions with callgrind):
//! `KSYNC_BENCH_WS_ONLY=ksync-mem,nats` runs only those systems, `KSYNC_BENCH_WS_N=1,10` only
//! those fan-outs (either one also skips the idle-memory measure),
//! `KSYNC_BENCH_WS_RELAY_WRAP="valgrind --tool=callgrind"` starts the Rust relay children
//! under that command (they exit cleanly at the end so the tool writes its output),
//! `KSYNC_BENCH_WS_MODE=steady` (or `full`) runs only the steady-rate (or full-speed) runs, and
//! `KSYNC_BENCH_WS_IDLE_ONLY=1` measures only the idle connections, and
//! `KSYNC_BENCH_WS_DISTRIBUTION=1` prints more percentiles of each steady run (whether a
//! p99 gap is a shift of the whole distribution or a few stalls), and
//! `KSYNC_BENCH_WS_DUMP=<dir>` writes every steady run's latencies there, one file per run
//! and system, subscriber after subscriber, each in event order (to see when the slow events
//! came and whether every subscriber had them).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use ksync_core::{AllowAll, InMemoryProvider, StorageProvider};
use ksync_ws::server::{Relay, RelayConfig};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Report, Series, percentile};

/// Subscriber counts.
const FAN_OUT: [usize; 3] = [1, 10, 100];
/// Measured rounds, after one warm-up round. Five rather than the minimum three: on a shared
/// 2-core machine one scheduling stall can decide a round's p99, and the median of five is
/// less at the mercy of one such round (the run still takes only a few minutes).
const ROUNDS: usize = 5;
/// Percentiles shown per steady run with `KSYNC_BENCH_WS_DISTRIBUTION=1`.
const DISTRIBUTION: [f64; 8] = [50.0, 90.0, 95.0, 98.0, 99.0, 99.5, 99.9, 100.0];
/// Steady rate for the latency measure.
const STEADY_PER_SEC: u64 = 1_000;
/// Events each system publishes in a steady run (one second of its own).
const STEADY_EVENTS: u64 = 1_000;
/// Events a system publishes in one turn of a steady run (see [`steady_interleaved`]).
const STEADY_SEGMENT: u64 = 100;
/// Most events the publisher may be ahead of the slowest subscriber at full speed.
const WINDOW: u64 = 256;
/// Read buffer of every measuring client's connection, in bytes (the WebSocket clients'
/// tungstenite buffer, the nats and redis clients' `BufReader`; tokio's default), so every
/// client reads the same way.
/// (tungstenite zero-fills its read buffer up to this size before each read: a larger buffer
/// would cost the WebSocket clients a large memset per message that the others do not pay.)
const CLIENT_READ_BUFFER: usize = 8 * 1024;
/// Idle connections for the memory measure.
const IDLE_CONNECTIONS: usize = 10_000;
/// A run that has not delivered everything by then has lost events.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Set in a child process that serves a Rust relay: `mem`, `file:<dir>` or `bare`.
const CHILD_ENV: &str = "KSYNC_BENCH_WS_RELAY_CHILD";
/// The Socket.IO server version installed from npm.
const SOCKET_IO_VERSION: &str = "4.8.1";
/// The Socket.IO relay: each connection joins the room named in its query, says `ready`, and
/// every `publish` it sends is emitted as `event` to the others in its room (encoded once per
/// broadcast by socket.io, like kSync's shared frames).
const SOCKET_IO_RELAY: &str = r#"const http = require("http");
const { Server } = require("socket.io");
const server = http.createServer();
const io = new Server(server, {
  serveClient: false,
  transports: ["websocket"],
  perMessageDeflate: false,
  maxHttpBufferSize: 1e6,
});
io.on("connection", (socket) => {
  const room = String(socket.handshake.query.room || "default");
  socket.join(room);
  socket.on("publish", (event) => socket.to(room).emit("event", event));
  socket.emit("ready");
});
server.listen(Number(process.argv[2]), "127.0.0.1", () => console.log("listening"));
"#;

/// Events per full-speed run: about 40k deliveries, at least 1,000 events.
fn full_speed_events(n: usize) -> u64 {
    (40_000 / n as u64).max(1_000)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The ~200-byte event JSON (the same bytes for every system), stamped with the send time.
fn payload(i: u64) -> String {
    let head = format!(
        r#"{{"id":"bench-{i:010}","type":"bench","data":{{"i":{i},"t":{t},"pad":""#,
        t = now_ns()
    );
    let tail = r#""},"timestamp":1700000000000,"version":1}"#;
    let pad = 200usize.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad))
}

#[derive(Deserialize)]
struct BenchEvent {
    data: BenchData,
}

#[derive(Deserialize)]
struct BenchData {
    i: u64,
    t: u64,
}

#[derive(Deserialize)]
struct KsyncFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default)]
    events: Vec<KsyncStored>,
}

#[derive(Deserialize)]
struct KsyncStored {
    event: BenchEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    KsyncMem,
    KsyncFile,
    BareWs,
    Nats,
    Redis,
    SocketIo,
}

impl System {
    /// In the order they run. kSync (in memory) and nats-server, the pair whose p99 is
    /// compared, are next to each other: their turns of a steady run are adjacent.
    const ALL: [System; 6] = [
        System::KsyncMem,
        System::Nats,
        System::KsyncFile,
        System::BareWs,
        System::Redis,
        System::SocketIo,
    ];

    fn name(self) -> &'static str {
        match self {
            System::KsyncMem => "ksync-mem",
            System::KsyncFile => "ksync-file",
            System::BareWs => "bare-ws",
            System::Nats => "nats",
            System::Redis => "redis",
            System::SocketIo => "socketio",
        }
    }
}

/// A running system under test.
struct Target {
    system: System,
    addr: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    FullSpeed,
    Steady,
}

/// What one run measured.
struct RunResult {
    deliveries_per_sec: f64,
    latencies_ms: Vec<f64>,
}

impl RunResult {
    /// A run left out by `KSYNC_BENCH_WS_MODE` (NaN figures).
    fn skipped() -> Self {
        Self {
            deliveries_per_sec: f64::NAN,
            latencies_ms: Vec::new(),
        }
    }
}

/// Per-subscriber progress, read by the publisher for flow control.
struct Progress {
    received: Vec<AtomicU64>,
}

impl Progress {
    fn slowest(&self) -> u64 {
        self.received
            .iter()
            .map(|r| r.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }
}

/// Checks order and counts one delivery; returns an error on a gap or duplicate.
fn deliver(
    expected: &mut u64,
    event: &BenchEvent,
    latencies: &mut Vec<f64>,
    progress: &AtomicU64,
) -> Result<()> {
    if event.data.i != *expected {
        bail!(
            "subscriber expected event {} and got {} (lost, duplicated or reordered)",
            expected,
            event.data.i
        );
    }
    *expected += 1;
    latencies.push(now_ns().saturating_sub(event.data.t) as f64 / 1e6);
    progress.store(*expected, Ordering::Release);
    Ok(())
}

// ----- WebSocket clients (kSync and the bare relay) -----

type Ws = WebSocketStream<TcpStream>;

async fn ws_connect(url: &str, buffer: usize) -> Result<Ws> {
    let addr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .ok_or_else(|| anyhow!("bad url"))?
        .to_owned();
    let tcp = TcpStream::connect(&addr).await?;
    tcp.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(buffer)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
    Ok(ws)
}

/// Joins a kSync room (live stream only) and waits for the welcome.
async fn ksync_join(url: &str, buffer: usize) -> Result<Ws> {
    let mut ws = ws_connect(url, buffer).await?;
    ws.send(Message::text(r#"{"type":"hello","protocol":1}"#))
        .await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains(r#""type":"welcome""#) => {
                return Ok(ws);
            }
            Some(Ok(Message::Text(t))) => bail!("expected welcome, got {}", t.as_str()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before welcome"),
        }
    }
}

/// Opens a Socket.IO 4 connection (engine.io v4 over WebSocket) in `room` and waits for the
/// relay's `ready` (it has joined the room by then).
async fn socketio_join(addr: SocketAddr, room: &str, buffer: usize) -> Result<Ws> {
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket&room={room}");
    let mut ws = ws_connect(&url, buffer).await?;
    let mut connected = false;
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("socket.io closed before ready"),
        };
        let text = text.as_str();
        if text.starts_with('0') && !connected {
            // engine.io "open": connect to the default namespace.
            ws.send(Message::text("40")).await?;
            connected = true;
        } else if text == "2" {
            ws.send(Message::text("3")).await?;
        } else if text.starts_with("40") {
            // namespace connected; `ready` follows.
        } else if text == r#"42["ready"]"# {
            return Ok(ws);
        } else {
            bail!("socket.io: unexpected {text:?} before ready");
        }
    }
}

async fn ws_subscriber(
    mut ws: Ws,
    system: System,
    total: u64,
    progress: Arc<Progress>,
    index: usize,
) -> Result<Vec<f64>> {
    let mut expected = 0;
    let mut latencies = Vec::with_capacity(usize::try_from(total)?);
    let slot = &progress.received[index];
    while expected < total {
        let message = ws
            .next()
            .await
            .ok_or_else(|| anyhow!("subscriber closed"))??;
        let Message::Text(text) = message else {
            if let Message::Close(frame) = message {
                bail!("subscriber closed by the server: {frame:?}");
            }
            continue;
        };
        if system == System::BareWs {
            let event: BenchEvent = serde_json::from_str(text.as_str())?;
            deliver(&mut expected, &event, &mut latencies, slot)?;
        } else if system == System::SocketIo {
            let text = text.as_str();
            if text == "2" {
                // engine.io ping.
                ws.send(Message::text("3")).await?;
                continue;
            }
            let body = text
                .strip_prefix("42")
                .ok_or_else(|| anyhow!("socket.io: unexpected {text:?}"))?;
            let (name, event): (&str, BenchEvent) = serde_json::from_str(body)?;
            if name != "event" {
                bail!("socket.io: unexpected event {name:?}");
            }
            deliver(&mut expected, &event, &mut latencies, slot)?;
        } else {
            let frame: KsyncFrame<'_> = serde_json::from_str(text.as_str())?;
            if frame.kind != "events" {
                bail!("unexpected {} frame", frame.kind);
            }
            for stored in &frame.events {
                deliver(&mut expected, &stored.event, &mut latencies, slot)?;
            }
        }
    }
    Ok(latencies)
}

// ----- NATS text protocol -----

async fn nats_connect(
    addr: SocketAddr,
) -> Result<(
    BufReader<tokio::net::tcp::OwnedReadHalf>,
    tokio::net::tcp::OwnedWriteHalf,
)> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (read, mut write) = tcp.into_split();
    let mut read = BufReader::with_capacity(CLIENT_READ_BUFFER, read);
    let mut line = String::new();
    read.read_line(&mut line).await?;
    if !line.starts_with("INFO") {
        bail!("nats: expected INFO, got {line:?}");
    }
    write
        .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
        .await?;
    Ok((read, write))
}

async fn nats_expect_pong(
    read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Result<()> {
    write.write_all(b"PING\r\n").await?;
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            bail!("nats closed");
        }
        if line.starts_with("PONG") {
            return Ok(());
        }
        if line.starts_with("-ERR") {
            bail!("nats: {line}");
        }
    }
}

async fn nats_subscriber(
    mut read: BufReader<tokio::net::tcp::OwnedReadHalf>,
    mut write: tokio::net::tcp::OwnedWriteHalf,
    total: u64,
    progress: Arc<Progress>,
    index: usize,
) -> Result<Vec<f64>> {
    let mut expected = 0;
    let mut latencies = Vec::with_capacity(usize::try_from(total)?);
    let slot = &progress.received[index];
    let mut line = String::new();
    let mut body = Vec::new();
    while expected < total {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            bail!("nats subscriber closed");
        }
        if line.starts_with("PING") {
            write.write_all(b"PONG\r\n").await?;
            continue;
        }
        if !line.starts_with("MSG ") {
            continue;
        }
        let len: usize = line
            .trim_end()
            .rsplit(' ')
            .next()
            .ok_or_else(|| anyhow!("bad MSG line"))?
            .parse()?;
        body.resize(len + 2, 0);
        read.read_exact(&mut body).await?;
        let event: BenchEvent = serde_json::from_slice(&body[..len])?;
        deliver(&mut expected, &event, &mut latencies, slot)?;
    }
    Ok(latencies)
}

// ----- Redis RESP -----

fn resp_command(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one RESP array of bulk strings / integers; returns its bulk strings.
async fn resp_read_array<R: tokio::io::AsyncBufRead + Unpin>(read: &mut R) -> Result<Vec<Vec<u8>>> {
    let mut line = String::new();
    read.read_line(&mut line).await?;
    let count: usize = line
        .trim_end()
        .strip_prefix('*')
        .ok_or_else(|| anyhow!("redis: expected an array, got {line:?}"))?
        .parse()?;
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        line.clear();
        read.read_line(&mut line).await?;
        if let Some(len) = line.trim_end().strip_prefix('$') {
            let len: usize = len.parse()?;
            let mut body = vec![0; len + 2];
            read.read_exact(&mut body).await?;
            body.truncate(len);
            items.push(body);
        } else {
            items.push(line.trim_end().as_bytes().to_vec());
        }
    }
    Ok(items)
}

async fn redis_subscriber(
    mut read: BufReader<TcpStream>,
    total: u64,
    progress: Arc<Progress>,
    index: usize,
) -> Result<Vec<f64>> {
    let mut expected = 0;
    let mut latencies = Vec::with_capacity(usize::try_from(total)?);
    let slot = &progress.received[index];
    while expected < total {
        let items = resp_read_array(&mut read).await?;
        if items.first().map(Vec::as_slice) != Some(b"message") {
            continue;
        }
        let body = items
            .get(2)
            .ok_or_else(|| anyhow!("redis: short message"))?;
        let event: BenchEvent = serde_json::from_slice(body)?;
        deliver(&mut expected, &event, &mut latencies, slot)?;
    }
    Ok(latencies)
}

// ----- one run -----

type SubTask = tokio::task::JoinHandle<Result<Vec<f64>>>;

/// One system's clients for one run: its subscribers (each a task counting and timing what
/// it receives) and its publisher, connected and ready.
struct Run {
    system: System,
    n: usize,
    total: u64,
    progress: Arc<Progress>,
    subs: Vec<SubTask>,
    publisher: Publisher,
    started: Instant,
}

impl Run {
    /// Connects `n` subscribers to `room` of `target` (each ready before the publisher
    /// connects), then the publisher; every subscriber expects `total` events.
    async fn connect(target: &Target, room: &str, n: usize, total: u64) -> Result<Self> {
        let progress = Arc::new(Progress {
            received: (0..n).map(|_| AtomicU64::new(0)).collect(),
        });
        let url = match target.system {
            System::BareWs => format!("ws://{}/", target.addr),
            _ => format!("ws://{}/ws/{room}", target.addr),
        };
        let mut subs: Vec<SubTask> = Vec::with_capacity(n);
        for index in 0..n {
            let p = Arc::clone(&progress);
            let system = target.system;
            let task = match system {
                System::KsyncMem | System::KsyncFile => {
                    let ws = ksync_join(&url, CLIENT_READ_BUFFER).await?;
                    tokio::spawn(ws_subscriber(ws, system, total, p, index))
                }
                System::BareWs => {
                    let mut ws = ws_connect(&url, CLIENT_READ_BUFFER).await?;
                    // The bare relay says "ready" once it subscribed this connection.
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.as_str() == "ready" => {}
                        other => bail!("bare relay: expected ready, got {other:?}"),
                    }
                    tokio::spawn(ws_subscriber(ws, system, total, p, index))
                }
                System::SocketIo => {
                    let ws = socketio_join(target.addr, room, CLIENT_READ_BUFFER).await?;
                    tokio::spawn(ws_subscriber(ws, system, total, p, index))
                }
                System::Nats => {
                    let (mut read, mut write) = nats_connect(target.addr).await?;
                    write
                        .write_all(format!("SUB {room} 1\r\n").as_bytes())
                        .await?;
                    nats_expect_pong(&mut read, &mut write).await?;
                    tokio::spawn(nats_subscriber(read, write, total, p, index))
                }
                System::Redis => {
                    let tcp = TcpStream::connect(target.addr).await?;
                    tcp.set_nodelay(true)?;
                    let mut read = BufReader::with_capacity(CLIENT_READ_BUFFER, tcp);
                    read.get_mut()
                        .write_all(&resp_command(&[b"SUBSCRIBE", room.as_bytes()]))
                        .await?;
                    let confirm = resp_read_array(&mut read).await?;
                    if confirm.first().map(Vec::as_slice) != Some(b"subscribe") {
                        bail!("redis: subscribe not confirmed");
                    }
                    tokio::spawn(redis_subscriber(read, total, p, index))
                }
            };
            subs.push(task);
        }
        let publisher = Publisher::connect(target, &url, room).await?;
        Ok(Self {
            system: target.system,
            n,
            total,
            progress,
            subs,
            publisher,
            started: Instant::now(),
        })
    }

    /// Publishes every event as fast as the slowest subscriber allows (at most [`WINDOW`]
    /// events ahead of it).
    async fn publish_at_full_speed(&mut self) -> Result<()> {
        self.started = Instant::now();
        for i in 0..self.total {
            let waiting = Instant::now();
            while i >= self.progress.slowest() + WINDOW {
                if waiting.elapsed() > RUN_TIMEOUT {
                    bail!(
                        "{} N={}: lost events: the slowest subscriber is stuck at {} of {}",
                        self.system.name(),
                        self.n,
                        self.progress.slowest(),
                        self.total
                    );
                }
                // Not a busy loop: the relays and subscribers share our two cores.
                self.publisher
                    .wait_until(Instant::now() + Duration::from_micros(250))
                    .await?;
            }
            self.publisher.publish(i, payload(i)).await?;
        }
        Ok(())
    }

    /// Publishes events `range` at [`STEADY_PER_SEC`], the first one at once.
    async fn publish_steady(&mut self, range: std::ops::Range<u64>) -> Result<()> {
        let start = Instant::now();
        for (k, i) in range.enumerate() {
            let due = start + Duration::from_micros(k as u64 * 1_000_000 / STEADY_PER_SEC);
            self.publisher.wait_until(due).await?;
            self.publisher.publish(i, payload(i)).await?;
        }
        Ok(())
    }

    /// Waits until every subscriber has every event (in order, exactly once) and the
    /// publisher every answer; the deliveries per second since the publishing started, and
    /// every delivery's latency.
    async fn finish(self) -> Result<RunResult> {
        let all = futures_util::future::join_all(self.subs);
        let results = match tokio::time::timeout(RUN_TIMEOUT, all).await {
            Ok(results) => results,
            Err(_) => bail!(
                "{} N={}: lost events: the slowest subscriber got {} of {}",
                self.system.name(),
                self.n,
                self.progress.slowest(),
                self.total
            ),
        };
        let elapsed = self.started.elapsed();
        let mut latencies = Vec::with_capacity(usize::try_from(self.total)? * self.n);
        for result in results {
            latencies.extend(result.context("subscriber task")??);
        }
        self.publisher.finish(self.total).await?;
        Ok(RunResult {
            deliveries_per_sec: (self.total as f64 * self.n as f64) / elapsed.as_secs_f64(),
            latencies_ms: latencies,
        })
    }
}

/// One full-speed run of `target` with `n` subscribers.
async fn full_speed(target: &Target, room: &str, n: usize) -> Result<RunResult> {
    let mut run = Run::connect(target, room, n, full_speed_events(n)).await?;
    run.publish_at_full_speed().await?;
    run.finish().await
}

/// One steady run of every target with `n` subscribers, interleaved: the systems take turns
/// publishing [`STEADY_SEGMENT`] events each at [`STEADY_PER_SEC`], in an order reversed at
/// every turn, until each has published [`STEADY_EVENTS`]. Each system's latencies, in the
/// order of `targets`.
///
/// Why: on a shared 2-core machine the p99 of a one-second run is decided by whether a host
/// stall (milliseconds, delaying every event behind it) fell in it. Runs one after the other
/// meet different stalls; turns of a tenth of a second spread each second's stalls over every
/// system, so a p99 difference is the systems', not the host's. Only one system publishes at a
/// time (their clients stay connected, idle): none competes with another for the cores.
async fn steady_interleaved(targets: &[&Target], room: &str, n: usize) -> Result<Vec<Vec<f64>>> {
    let mut runs = Vec::with_capacity(targets.len());
    for target in targets {
        let run = Run::connect(target, room, n, STEADY_EVENTS)
            .await
            .with_context(|| format!("{} N={n} steady", target.system.name()))?;
        runs.push(run);
    }
    let turns = STEADY_EVENTS.div_ceil(STEADY_SEGMENT);
    for turn in 0..turns {
        let range = turn * STEADY_SEGMENT..((turn + 1) * STEADY_SEGMENT).min(STEADY_EVENTS);
        let order: Vec<usize> = if turn % 2 == 0 {
            (0..runs.len()).collect()
        } else {
            (0..runs.len()).rev().collect()
        };
        for index in order {
            let run = &mut runs[index];
            let name = run.system.name();
            run.publish_steady(range.clone())
                .await
                .with_context(|| format!("{name} N={n} steady"))?;
        }
    }
    let mut latencies = Vec::with_capacity(runs.len());
    for run in runs {
        let name = run.system.name();
        let result = run
            .finish()
            .await
            .with_context(|| format!("{name} N={n} steady"))?;
        if let Some(dir) = std::env::var_os("KSYNC_BENCH_WS_DUMP") {
            let dir = std::path::Path::new(&dir);
            std::fs::create_dir_all(dir)
                .with_context(|| format!("KSYNC_BENCH_WS_DUMP: creating {}", dir.display()))?;
            let path = dir.join(format!("{room}-{name}.txt"));
            let text: Vec<String> = result
                .latencies_ms
                .iter()
                .map(|l| format!("{l:.4}"))
                .collect();
            std::fs::write(&path, text.join("\n"))
                .with_context(|| format!("KSYNC_BENCH_WS_DUMP: writing {}", path.display()))?;
        }
        latencies.push(result.latencies_ms);
    }
    Ok(latencies)
}

/// The publishing client. It reads the relay's replies to its publishes (kSync's acks, redis'
/// answers to PUBLISH) itself, while it waits for its next send and before each one, as a
/// separate publishing process would. A task of the subscribers' runtime reading them instead
/// would be woken by a reply that arrives just after a delivery and, woken last, be polled
/// first: in this one-process harness the publisher's reply would then sit in front of the
/// subscriber's delivery (seen in 80% of kSync's N=1 events with a perf trace).
enum Publisher {
    Ws {
        sink: futures_util::stream::SplitSink<Ws, Message>,
        stream: futures_util::stream::SplitStream<Ws>,
        /// kSync acks read so far (each checked `stored`).
        acked: u64,
        system: System,
    },
    Nats {
        write: tokio::net::tcp::OwnedWriteHalf,
        subject: String,
        _read: BufReader<tokio::net::tcp::OwnedReadHalf>,
    },
    Redis {
        write: tokio::net::tcp::OwnedWriteHalf,
        channel: String,
        read: tokio::net::tcp::OwnedReadHalf,
        replies: RespReplies,
    },
}

/// Counts redis' one-line answers to PUBLISH (`:<receivers>`), failing on an error line.
#[derive(Default)]
struct RespReplies {
    count: u64,
    /// Inside a line (the next byte does not start one).
    mid_line: bool,
    /// An error line (`-...`) being read.
    error: Option<Vec<u8>>,
}

impl RespReplies {
    fn feed(&mut self, bytes: &[u8]) -> Result<()> {
        for &b in bytes {
            if !self.mid_line && b == b'-' {
                self.error = Some(Vec::new());
            }
            self.mid_line = b != b'\n';
            if let Some(error) = self.error.as_mut() {
                if b == b'\n' {
                    bail!("redis: {}", String::from_utf8_lossy(error).trim());
                }
                error.push(b);
            } else if b == b'\n' {
                self.count += 1;
            }
        }
        Ok(())
    }
}

impl Publisher {
    async fn connect(target: &Target, url: &str, room: &str) -> Result<Self> {
        Ok(match target.system {
            System::KsyncMem | System::KsyncFile | System::BareWs | System::SocketIo => {
                let system = target.system;
                let ws = match system {
                    System::BareWs => ws_connect(url, CLIENT_READ_BUFFER).await?,
                    System::SocketIo => {
                        socketio_join(target.addr, room, CLIENT_READ_BUFFER).await?
                    }
                    _ => ksync_join(url, CLIENT_READ_BUFFER).await?,
                };
                let (sink, stream) = ws.split();
                Publisher::Ws {
                    sink,
                    stream,
                    acked: 0,
                    system,
                }
            }
            System::Nats => {
                let (mut read, mut write) = nats_connect(target.addr).await?;
                nats_expect_pong(&mut read, &mut write).await?;
                Publisher::Nats {
                    write,
                    subject: room.to_owned(),
                    _read: read,
                }
            }
            System::Redis => {
                let tcp = TcpStream::connect(target.addr).await?;
                tcp.set_nodelay(true)?;
                let (read, write) = tcp.into_split();
                Publisher::Redis {
                    write,
                    channel: room.to_owned(),
                    read,
                    replies: RespReplies::default(),
                }
            }
        })
    }

    /// Reads replies until `due` (and at least those already received).
    async fn wait_until(&mut self, due: Instant) -> Result<()> {
        let due = tokio::time::Instant::from_std(due);
        loop {
            self.drain()?;
            match self {
                Publisher::Ws { stream, acked, .. } => {
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => return Ok(()),
                        message = stream.next() => on_ws_reply(message, acked)?,
                    }
                }
                Publisher::Nats { .. } => {
                    tokio::time::sleep_until(due).await;
                    return Ok(());
                }
                Publisher::Redis { read, replies, .. } => {
                    let mut buf = [0u8; 4096];
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => return Ok(()),
                        // Cancel-safe: nothing is read unless it completes.
                        read = read.read(&mut buf) => match read? {
                            0 => bail!("redis closed the publisher's connection"),
                            n => replies.feed(&buf[..n])?,
                        },
                    }
                }
            }
        }
    }

    /// Reads the replies already received, without waiting.
    fn drain(&mut self) -> Result<()> {
        match self {
            Publisher::Ws { stream, acked, .. } => {
                // Cancel-safe: a message is either returned or stays in the stream's buffer.
                while let Some(message) = futures_util::FutureExt::now_or_never(stream.next()) {
                    on_ws_reply(message, acked)?;
                }
            }
            Publisher::Nats { .. } => {}
            Publisher::Redis { read, replies, .. } => {
                let mut buf = [0u8; 4096];
                loop {
                    match read.try_read(&mut buf) {
                        Ok(0) => bail!("redis closed the publisher's connection"),
                        Ok(n) => replies.feed(&buf[..n])?,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(())
    }

    async fn publish(&mut self, i: u64, event: String) -> Result<()> {
        self.drain()?;
        match self {
            Publisher::Ws {
                sink,
                system: System::BareWs,
                ..
            } => sink.send(Message::text(event)).await?,
            Publisher::Ws {
                sink,
                system: System::SocketIo,
                ..
            } => {
                sink.send(Message::text(format!(r#"42["publish",{event}]"#)))
                    .await?;
            }
            Publisher::Ws { sink, .. } => {
                let frame = format!(r#"{{"type":"publish","ref":{i},"events":[{event}]}}"#);
                sink.send(Message::text(frame)).await?;
            }
            Publisher::Nats { write, subject, .. } => {
                let mut frame = format!("PUB {subject} {}\r\n", event.len()).into_bytes();
                frame.extend_from_slice(event.as_bytes());
                frame.extend_from_slice(b"\r\n");
                write.write_all(&frame).await?;
            }
            Publisher::Redis { write, channel, .. } => {
                write
                    .write_all(&resp_command(&[
                        b"PUBLISH",
                        channel.as_bytes(),
                        event.as_bytes(),
                    ]))
                    .await?;
            }
        }
        Ok(())
    }

    /// Checks that every publish was answered (kSync: acknowledged as stored; redis:
    /// answered), then closes.
    async fn finish(mut self, total: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let answered = |p: &Publisher| match p {
            Publisher::Ws {
                acked,
                system: System::KsyncMem | System::KsyncFile,
                ..
            } => Some(*acked),
            Publisher::Redis { replies, .. } => Some(replies.count),
            _ => None,
        };
        while let Some(got) = answered(&self).filter(|got| *got < total) {
            if Instant::now() > deadline {
                bail!("publisher got {got} answers for {total} publishes (timeout)");
            }
            let step = Instant::now() + Duration::from_millis(1);
            self.wait_until(step).await?;
        }
        if let Some(got) = answered(&self).filter(|got| *got > total) {
            bail!("publisher got {got} answers for {total} publishes");
        }
        if let Publisher::Ws { mut sink, .. } = self {
            let _ = sink.close().await;
        }
        Ok(())
    }
}

/// One message on a WebSocket publisher's connection: counts kSync acks (each must say
/// `stored`), fails on an error; anything else (pongs, the bare relay's `ready`) is skipped.
fn on_ws_reply(
    message: Option<std::result::Result<Message, tokio_tungstenite::tungstenite::Error>>,
    acked: &mut u64,
) -> Result<()> {
    let Some(message) = message else {
        bail!("the relay closed the publisher's connection");
    };
    if let Message::Text(t) = message? {
        if t.as_str().contains(r#""type":"error""#) {
            bail!("relay refused a publish: {}", t.as_str());
        }
        if t.as_str().contains(r#""type":"ack""#) {
            if !t.as_str().contains(r#""status":"stored""#) {
                bail!("publish not stored: {}", t.as_str());
            }
            *acked += 1;
        }
    }
    Ok(())
}

// ----- servers -----

/// The bare tokio-tungstenite relay: every text frame from one connection goes to all others.
async fn bare_relay(listener: TcpListener) {
    // Capacity: generous for the benchmark's windowed publisher; a lagging receiver is
    // reported and its connection dropped (which the run then reports as lost events).
    let (tx, _) = broadcast::channel::<(u64, tokio_tungstenite::tungstenite::Utf8Bytes)>(1 << 14);
    let mut next = 0u64;
    while let Ok((tcp, _)) = listener.accept().await {
        next += 1;
        let id = next;
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let config = WebSocketConfig::default()
                .read_buffer_size(4096)
                .write_buffer_size(0);
            let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await
            else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let mut rx = tx.subscribe();
            if sink.send(Message::text("ready")).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    message = stream.next() => match message {
                        Some(Ok(Message::Text(t))) => { let _ = tx.send((id, t)); }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    item = rx.recv() => match item {
                        Ok((from, text)) if from != id => {
                            if sink.send(Message::Text(text)).await.is_err() { break; }
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            eprintln!("bare relay: a subscriber lagged by {n}");
                            break;
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        });
    }
}

async fn start_relay(provider: Arc<dyn StorageProvider>) -> Result<(SocketAddr, Relay)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = {
        let mut relay_config = RelayConfig::default();
        relay_config.max_connections = IDLE_CONNECTIONS * 2;
        relay_config
    };
    let relay = Relay::new(config, provider, Arc::new(AllowAll))?;
    let router = relay.router();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(ksync_ws::server::nodelay(listener), router).await {
            eprintln!("relay stopped: {e}");
        }
    });
    Ok((addr, relay))
}

/// A child process (nats-server, redis-server, or ourselves) killed on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/usr/bin".into()])
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

async fn wait_listening(addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{addr} did not start listening")
}

async fn start_external(system: System) -> Result<Option<(SocketAddr, ChildGuard)>> {
    let (program, args): (&str, Vec<String>) = match system {
        System::Nats => {
            let port = free_port()?;
            (
                "nats-server",
                vec![
                    "-a".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                ],
            )
        }
        System::Redis => {
            let port = free_port()?;
            (
                "redis-server",
                vec![
                    "--port".into(),
                    port.to_string(),
                    "--bind".into(),
                    "127.0.0.1".into(),
                    "--save".into(),
                    String::new(),
                    "--appendonly".into(),
                    "no".into(),
                ],
            )
        }
        _ => return Ok(None),
    };
    // `cargo xtask bench` installs Debian's package first when it can; otherwise skipped.
    let Some(path) = which(program) else {
        eprintln!("  {program} is not installed: skipped");
        return Ok(None);
    };
    let port: u16 = match system {
        System::Nats => args[3].parse()?,
        _ => args[1].parse()?,
    };
    let child = Command::new(path)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let guard = ChildGuard(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr).await?;
    Ok(Some((addr, guard)))
}

// ----- idle memory -----

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// In the child: serve a relay (`mem`, `file:<dir>` or `bare`) and print its address, until
/// stdin closes.
fn child_relay(kind: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let relay = match kind {
            "mem" => {
                let (addr, relay) = start_relay(Arc::new(InMemoryProvider::new())).await?;
                println!("{addr}");
                Some(relay)
            }
            "bare" => {
                let listener = TcpListener::bind("127.0.0.1:0").await?;
                println!("{}", listener.local_addr()?);
                tokio::spawn(bare_relay(listener));
                None
            }
            other => {
                let dir = other
                    .strip_prefix("file:")
                    .ok_or_else(|| anyhow!("unknown relay kind {other:?}"))?;
                let provider = ksync_storage_file::FileProvider::new(dir)?;
                let (addr, relay) = start_relay(Arc::new(provider)).await?;
                println!("{addr}");
                Some(relay)
            }
        };
        // The parent closes our stdin (or dies) when it is done measuring.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
        })
        .await;
        if let Some(relay) = relay {
            relay.shutdown().await;
        }
        Ok(())
    })
}

/// A Rust relay in a child process of ours; stopped by closing its stdin (so that a wrapper
/// such as callgrind sees a normal exit), killed if it has not exited 60 s later.
struct RelayChild {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
}

impl RelayChild {
    /// Starts `kind` (see [`child_relay`]) and returns its address.
    fn start(kind: &str) -> Result<(SocketAddr, Self)> {
        let exe = std::env::current_exe()?;
        let wrap = std::env::var("KSYNC_BENCH_WS_RELAY_WRAP").unwrap_or_default();
        let mut wrap = wrap.split_whitespace();
        let mut command = match wrap.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(wrap).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = command
            .args(["bench", "ws"])
            .env(CHILD_ENV, kind)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a relay child")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("child stdout"))?;
        let guard = Self { child, stdin };
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let addr: SocketAddr = line
            .trim()
            .parse()
            .with_context(|| format!("relay child {kind}: address, got {line:?}"))?;
        Ok((addr, guard))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Socket.IO relay on Node, installed from npm under `target/bench/socketio` on first use.
fn start_socketio() -> Result<(SocketAddr, ChildGuard)> {
    let node = which("node").ok_or_else(|| anyhow!("node is not installed"))?;
    let dir = std::path::PathBuf::from("target/bench/socketio");
    let package = dir.join(format!(
        "node_modules/socket.io-{SOCKET_IO_VERSION}.installed"
    ));
    if !package.exists() {
        let npm = which("npm").ok_or_else(|| anyhow!("npm is not installed"))?;
        std::fs::create_dir_all(&dir)?;
        eprintln!(
            "  installing socket.io {SOCKET_IO_VERSION} from npm into {}",
            dir.display()
        );
        let status = Command::new(npm)
            .args([
                "install",
                &format!("socket.io@{SOCKET_IO_VERSION}"),
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--loglevel=error",
            ])
            .current_dir(&dir)
            .status()
            .context("running npm")?;
        if !status.success() {
            bail!("npm install socket.io@{SOCKET_IO_VERSION} failed ({status})");
        }
        std::fs::write(&package, b"")?;
    }
    let script = dir.join("relay.js");
    std::fs::write(&script, SOCKET_IO_RELAY)?;
    let port = free_port()?;
    let child = Command::new(node)
        .arg("relay.js")
        .arg(port.to_string())
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting node")?;
    let guard = ChildGuard(child);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("the socket.io relay did not listen within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((addr, guard))
}

/// Bytes per idle connection: RSS growth of the server process over `IDLE_CONNECTIONS`.
async fn idle_memory(system: System, addr: SocketAddr, pid: u32) -> Result<f64> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid)?;
    let mut held: VecDeque<Box<dyn std::any::Any + Send>> = VecDeque::new();
    let url = format!("ws://{addr}/ws/idle");
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let mut opened = 0;
    while opened < IDLE_CONNECTIONS || !pending.is_empty() {
        while opened < IDLE_CONNECTIONS && pending.len() < 256 {
            opened += 1;
            let url = url.clone();
            pending.push(async move {
                let conn: Box<dyn std::any::Any + Send> = match system {
                    System::Nats => {
                        let (mut read, mut write) = nats_connect(addr).await?;
                        nats_expect_pong(&mut read, &mut write).await?;
                        Box::new((read, write))
                    }
                    _ => Box::new(ksync_join(&url, 4096).await?),
                };
                anyhow::Ok(conn)
            });
        }
        if let Some(conn) = pending.next().await {
            held.push_back(conn?);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(pid)?;
    drop(held);
    Ok(after.saturating_sub(before) as f64 / IDLE_CONNECTIONS as f64)
}

// ----- the scenario -----

/// One (system, N) cell: a sample per measured round.
struct Samples {
    system: System,
    n: usize,
    deliveries: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

/// When this process is a relay child of the scenario (see [`CHILD_ENV`]), serves as that
/// relay until its stdin closes and returns `Some`; otherwise `None`.
pub fn serve_if_relay_child() -> Option<Result<()>> {
    let kind = std::env::var(CHILD_ENV).ok()?;
    Some(child_relay(&kind))
}

/// `cargo xtask bench ws`.
pub fn run(report: &mut Report) -> Result<()> {
    epoch();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let section = report.scenario("ws");
    rt.block_on(scenario(section))
}

/// A comma-separated filter from the environment (`None`: everything).
fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').map(|x| x.trim().to_owned()).collect())
}

async fn scenario(section: &mut super::ScenarioReport) -> Result<()> {
    let only = env_list("KSYNC_BENCH_WS_ONLY");
    // A misspelt name would otherwise select nothing and report an empty run as a result.
    if let Some(unknown) = only
        .iter()
        .flatten()
        .find(|x| !System::ALL.iter().any(|s| s.name() == x.as_str()))
    {
        let names: Vec<&str> = System::ALL.iter().map(|s| s.name()).collect();
        bail!(
            "KSYNC_BENCH_WS_ONLY: no system is called {unknown:?} (known: {})",
            names.join(", ")
        );
    }
    let fan_out: Vec<usize> = match env_list("KSYNC_BENCH_WS_N") {
        Some(list) => list
            .iter()
            .map(|n| n.parse().context("KSYNC_BENCH_WS_N"))
            .collect::<Result<_>>()?,
        None => FAN_OUT.to_vec(),
    };
    let modes = match std::env::var("KSYNC_BENCH_WS_MODE").as_deref() {
        Ok("steady") => vec![Mode::Steady],
        Ok("full") => vec![Mode::FullSpeed],
        Ok(other) => bail!("KSYNC_BENCH_WS_MODE: {other:?} is neither steady nor full"),
        Err(_) => vec![Mode::FullSpeed, Mode::Steady],
    };
    let filtered = only.is_some() || fan_out != FAN_OUT || modes.len() < 2;
    let wanted = |s: System| {
        only.as_ref()
            .is_none_or(|o| o.iter().any(|x| x == s.name()))
    };
    let data = tempfile::tempdir()?;
    let mut targets = Vec::new();
    // Servers, each in its own process; stopped when these guards drop.
    let mut relays: Vec<RelayChild> = Vec::new();
    let mut guards: Vec<ChildGuard> = Vec::new();
    for system in System::ALL.into_iter().filter(|s| wanted(*s)) {
        match system {
            System::KsyncMem | System::KsyncFile | System::BareWs => {
                let kind = match system {
                    System::KsyncMem => "mem".to_owned(),
                    System::KsyncFile => format!("file:{}", data.path().display()),
                    _ => "bare".to_owned(),
                };
                let (addr, child) = RelayChild::start(&kind)?;
                relays.push(child);
                targets.push(Target { system, addr });
            }
            System::Nats | System::Redis => match start_external(system).await? {
                Some((addr, guard)) => {
                    targets.push(Target { system, addr });
                    guards.push(guard);
                }
                None => section.skip(
                    system.name(),
                    &format!(
                        "{}-server not installed (apt-get install {}-server)",
                        system.name(),
                        system.name()
                    ),
                ),
            },
            System::SocketIo => match start_socketio() {
                Ok((addr, guard)) => {
                    targets.push(Target { system, addr });
                    guards.push(guard);
                }
                Err(e) => section.skip(system.name(), &format!("{e:#}")),
            },
        }
    }
    for t in &targets {
        wait_listening(t.addr).await?;
    }

    let mut samples: Vec<Samples> = Vec::new();
    for t in &targets {
        for n in fan_out.iter().copied() {
            samples.push(Samples {
                system: t.system,
                n,
                deliveries: Vec::new(),
                p50: Vec::new(),
                p99: Vec::new(),
            });
        }
    }
    let show_distribution = std::env::var_os("KSYNC_BENCH_WS_DISTRIBUTION").is_some();
    let mut checked: u64 = 0;
    // For iterating on the idle-memory measure alone.
    let rounds = if std::env::var_os("KSYNC_BENCH_WS_IDLE_ONLY").is_some() {
        targets.clear();
        0
    } else {
        ROUNDS + 1
    };
    for round in 0..rounds {
        for n in fan_out.iter().copied() {
            // Alternate the order so no system always runs first.
            let order: Vec<&Target> = if round % 2 == 0 {
                targets.iter().collect()
            } else {
                targets.iter().rev().collect()
            };
            let mut full = Vec::with_capacity(order.len());
            for target in &order {
                full.push(if modes.contains(&Mode::FullSpeed) {
                    checked += full_speed_events(n) * n as u64;
                    full_speed(target, &format!("r{round}-n{n}-full"), n)
                        .await
                        .with_context(|| format!("{} N={n} full speed", target.system.name()))?
                } else {
                    RunResult::skipped()
                });
            }
            let steady = if modes.contains(&Mode::Steady) {
                checked += STEADY_EVENTS * n as u64 * order.len() as u64;
                steady_interleaved(&order, &format!("r{round}-n{n}-steady"), n).await?
            } else {
                vec![Vec::new(); order.len()]
            };
            for ((target, full), mut steady) in order.iter().zip(full).zip(steady) {
                eprintln!(
                    "round {round} N={n:<3} {:<10} {:>10.0} deliveries/s  p50 {:.3} ms  p99 {:.3} ms",
                    target.system.name(),
                    full.deliveries_per_sec,
                    percentile(&mut steady.clone(), 50.0),
                    percentile(&mut steady, 99.0),
                );
                if show_distribution {
                    let mut all = steady.clone();
                    let shown: Vec<String> = DISTRIBUTION
                        .iter()
                        .map(|p| format!("p{p} {:.3}", percentile(&mut all, *p)))
                        .collect();
                    eprintln!("    latency ms: {}", shown.join("  "));
                }
                if round == 0 {
                    continue; // warm-up
                }
                let entry = samples
                    .iter_mut()
                    .find(|e| e.system == target.system && e.n == n)
                    .ok_or_else(|| anyhow!("no sample slot"))?;
                entry.deliveries.push(full.deliveries_per_sec);
                entry.p50.push(percentile(&mut steady.clone(), 50.0));
                entry.p99.push(percentile(&mut steady, 99.0));
            }
        }
    }
    let median_of = |system: System, n: usize, which: usize| -> Option<f64> {
        samples
            .iter()
            .find(|e| e.system == system && e.n == n)
            .map(|e| {
                let v = match which {
                    0 => &e.deliveries,
                    1 => &e.p50,
                    _ => &e.p99,
                };
                let mut sorted = v.clone();
                sorted.sort_by(f64::total_cmp);
                super::median_of_sorted(&sorted)
            })
    };
    for Samples {
        system,
        n,
        deliveries: full,
        p50,
        p99,
    } in &samples
    {
        let name = system.name();
        section.series(Series::new(
            &format!("N={n} {name} deliveries"),
            "deliveries/s",
            true,
            full.clone(),
        ));
        section.series(Series::new(
            &format!("N={n} {name} p50 @1k/s"),
            "ms",
            false,
            p50.clone(),
        ));
        section.series(Series::new(
            &format!("N={n} {name} p99 @1k/s"),
            "ms",
            false,
            p99.clone(),
        ));
    }
    let has = |system: System| targets.iter().any(|t| t.system == system);
    // Every ratio is kSync's (in memory) against something.
    let ratio_n: &[usize] = if has(System::KsyncMem) { &fan_out } else { &[] };
    for n in ratio_n.iter().copied() {
        let mem = median_of(System::KsyncMem, n, 0).unwrap_or(f64::NAN);
        if has(System::Nats) {
            let nats = median_of(System::Nats, n, 0).unwrap_or(f64::NAN);
            let target = if n == 1 { 0.7 } else { 1.0 };
            section.ratio(
                &format!("N={n} ksync-mem / nats deliveries"),
                mem,
                nats,
                Some(target),
            );
            let p99_mem = median_of(System::KsyncMem, n, 2).unwrap_or(f64::NAN);
            let p99_nats = median_of(System::Nats, n, 2).unwrap_or(f64::NAN);
            section.ratio_max(
                &format!("N={n} ksync-mem / nats p99"),
                p99_mem,
                p99_nats,
                1.0,
            );
        }
        if has(System::KsyncFile) {
            let file = median_of(System::KsyncFile, n, 0).unwrap_or(f64::NAN);
            section.ratio(
                &format!("N={n} ksync-file / ksync-mem deliveries"),
                file,
                mem,
                Some(0.5),
            );
        }
        if has(System::BareWs) {
            let bare = median_of(System::BareWs, n, 0).unwrap_or(f64::NAN);
            section.ratio(
                &format!("N={n} ksync-mem / bare-ws deliveries"),
                mem,
                bare,
                None,
            );
        }
        if has(System::Redis) {
            let redis = median_of(System::Redis, n, 0).unwrap_or(f64::NAN);
            section.ratio(
                &format!("N={n} ksync-mem / redis deliveries"),
                mem,
                redis,
                None,
            );
        }
        if has(System::SocketIo) {
            let socketio = median_of(System::SocketIo, n, 0).unwrap_or(f64::NAN);
            section.ratio(
                &format!("N={n} ksync-mem / socketio deliveries"),
                mem,
                socketio,
                None,
            );
            let p99_mem = median_of(System::KsyncMem, n, 2).unwrap_or(f64::NAN);
            let p99_socketio = median_of(System::SocketIo, n, 2).unwrap_or(f64::NAN);
            section.ratio(
                &format!("N={n} ksync-mem / socketio p99"),
                p99_mem,
                p99_socketio,
                None,
            );
        }
    }
    section.note(format!(
        "{checked} deliveries checked (every event to every subscriber exactly once, in order); {ROUNDS} rounds after a warm-up; full speed with a {WINDOW}-event window behind the slowest subscriber; steady runs of all systems interleaved in turns of {STEADY_SEGMENT} events"
    ));
    section.note(
        "every server in its own process (the Rust relays in a child on a 2-thread runtime), every client in this one, the same client code for all but the framing",
    );

    // Stop the servers before the idle measure, so they do not share the machine with it.
    drop(relays);
    drop(guards);
    if filtered {
        return Ok(());
    }

    // Idle connections: the relay in a child process, so the clients' memory is not counted.
    let (relay_addr, child) = RelayChild::start("mem")?;
    let ksync_idle = idle_memory(System::KsyncMem, relay_addr, child.pid()).await?;
    drop(child);
    section.series(Series::new(
        &format!("{IDLE_CONNECTIONS} idle ksync connections"),
        "bytes/conn",
        false,
        vec![ksync_idle],
    ));
    section.ratio_max("ksync idle bytes/conn / 8 KiB", ksync_idle, 8192.0, 1.0);
    if let Some((addr, guard)) = start_external(System::Nats).await? {
        let pid = guard.0.id();
        let nats_idle = idle_memory(System::Nats, addr, pid).await?;
        drop(guard);
        section.series(Series::new(
            &format!("{IDLE_CONNECTIONS} idle nats connections"),
            "bytes/conn",
            false,
            vec![nats_idle],
        ));
        section.ratio_max("ksync / nats idle bytes/conn", ksync_idle, nats_idle, 1.0);
    }
    Ok(())
}
