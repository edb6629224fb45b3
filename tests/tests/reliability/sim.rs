//! Deterministic network simulation with turmoil: partitions, held messages, crash/restart of
//! the relay and of clients, over many seeds, checked like Jepsen's total queue (lost 0,
//! duplicated 0) and for determinism (the same seed gives the same trace).
//!
//! What is simulated and what is real: turmoil replaces the network and the clock, and the
//! real `ksync-ws` / `ksync-git` crates cannot run on its sockets (they use tokio's and
//! tungstenite's/reqwest's). So this models the *protocol logic* over turmoil's TCP with
//! line-delimited JSON, on the real core: each client is a real `ksync_core::Replica`
//! (`record_local`, `ingest`, `pending`, named cursors) and the server log is a real
//! `InMemoryStorage` (`LogIndex` merge and dedup). The relay model follows the real relay's
//! rules (hello with `since`, catch-up then live fan-out, acks after storing, a slow
//! subscriber is dropped and resumes from its cursor); the pull/push model follows the Git
//! service's (paged pull from a cursor, push then move the cursor, retries deduplicated).
//! The real code runs over real sockets with faults in `network.rs`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ksync_core::{Event, InMemoryStorage, Replica, Storage};
use ksync_tests::{budget, figures};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::broadcast;
use turmoil::net::{TcpListener, TcpStream};

const PORT: u16 = 7000;
const CLIENTS: usize = 3;
const EVENTS_PER_CLIENT: u64 = 30;
const EMIT_EVERY: Duration = Duration::from_millis(25);
/// Faults are injected during this much simulated time, then everything heals.
const FAULT_WINDOW: Duration = Duration::from_millis(2500);
/// Live frames queued per subscriber on the relay model. Overflow policy: the subscriber is
/// dropped (like the real relay's 4008) and resumes from its cursor.
const LIVE_QUEUE: usize = 64;
/// A session with no line from the peer for this long is considered dead.
const IDLE: Duration = Duration::from_millis(400);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// The WebSocket path: one long session, catch-up then live events, publish/ack.
    Stream,
    /// The pull/push path: short request/response exchanges.
    PullPush,
}

type Trace = Arc<Mutex<Vec<String>>>;

fn trace(t: &Trace, line: String) {
    let at = turmoil::sim_elapsed().unwrap_or_default().as_millis();
    t.lock().expect("trace").push(format!("{at} {line}"));
}

struct ClientState {
    name: String,
    replica: Replica,
    emitted: AtomicU64,
    /// Ids the application saw: its own at emit, others' when ingest appended them.
    surfaced: Mutex<Vec<String>>,
}

async fn write_line(w: &mut turmoil::net::tcp::OwnedWriteHalf, v: &Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    w.write_all(line.as_bytes()).await
}

fn stored_json(s: &ksync_core::Stored) -> Value {
    json!([s.seq, s.event])
}

// ---------------------------------------------------------------- server model

async fn server(log: Arc<InMemoryStorage>, mode: Mode) -> turmoil::Result {
    let listener = TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    // A new fan-out per incarnation: a restarted relay has no subscribers.
    let (live, _) = broadcast::channel::<Arc<String>>(LIVE_QUEUE);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::task::spawn_local(serve(stream, Arc::clone(&log), live.clone(), mode));
    }
}

async fn serve(
    stream: TcpStream,
    log: Arc<InMemoryStorage>,
    live: broadcast::Sender<Arc<String>>,
    mode: Mode,
) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut sub: Option<broadcast::Receiver<Arc<String>>> = None;
    loop {
        let next_live = async {
            match sub.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            line = tokio::time::timeout(IDLE * 3, lines.next_line()) => {
                let Ok(Ok(Some(line))) = line else { return };
                let Ok(msg) = serde_json::from_str::<Value>(&line) else { return };
                let reply = match msg["t"].as_str() {
                    Some("hello") if mode == Mode::Stream => {
                        let since = msg["since"].as_u64().unwrap_or(0);
                        // Catch-up and subscribing happen with no await in between: nothing
                        // committed in between can be missed or sent twice.
                        let events = log.read_since(since, usize::MAX).expect("read");
                        sub = Some(live.subscribe());
                        json!({"t": "events", "events": events.iter().map(stored_json).collect::<Vec<_>>()})
                    }
                    Some("ping") => json!({"t": "pong"}),
                    Some("publish") | Some("push") => {
                        let events: Vec<Event> = serde_json::from_value(msg["events"].clone()).expect("events");
                        let out = log.append(events).await.expect("append");
                        if mode == Mode::Stream && !out.appended.is_empty() {
                            let line = json!({"t": "events", "events": out.appended.iter().map(stored_json).collect::<Vec<_>>()});
                            // Err: no subscriber right now; they catch up on hello.
                            let _ = live.send(Arc::new(line.to_string()));
                        }
                        json!({"t": "ack", "ref": msg["ref"]})
                    }
                    Some("pull") if mode == Mode::PullPush => {
                        let since = msg["since"].as_u64().unwrap_or(0);
                        let events = log.read_since(since, 16).expect("read");
                        json!({"t": "page", "events": events.iter().map(stored_json).collect::<Vec<_>>()})
                    }
                    _ => return,
                };
                if write_line(&mut w, &reply).await.is_err() { return }
            }
            frame = next_live => match frame {
                Ok(line) => {
                    let mut line = line.as_str().to_owned();
                    line.push('\n');
                    if w.write_all(line.as_bytes()).await.is_err() { return }
                }
                // Lagged: the slow-consumer policy; Closed: the relay is going away.
                Err(_) => return,
            }
        }
    }
}

// ---------------------------------------------------------------- client model

async fn emitter(state: Arc<ClientState>, t: Trace) {
    loop {
        let n = state.emitted.load(Ordering::SeqCst);
        if n >= EVENTS_PER_CLIENT {
            return;
        }
        let id = format!("{}-{n}", state.name);
        let event = Event::new(&id, "sim", json!({"n": n}), 1_700_000_000_000 + n)
            .with_origin(state.replica.id());
        state.replica.record_local(event).await.expect("record");
        state.emitted.store(n + 1, Ordering::SeqCst);
        state.surfaced.lock().expect("surfaced").push(id.clone());
        trace(&t, format!("{} emit {id}", state.name));
        tokio::time::sleep(EMIT_EVERY).await;
    }
}

async fn ingest(state: &ClientState, t: &Trace, events: &Value, cursor: &str) {
    let mut top = state.replica.cursor(cursor).expect("cursor");
    for pair in events.as_array().into_iter().flatten() {
        let seq = pair[0].as_u64().expect("seq");
        let event: Event = serde_json::from_value(pair[1].clone()).expect("event");
        let out = state.replica.ingest(vec![event]).await.expect("ingest");
        for s in &out.appended {
            state
                .surfaced
                .lock()
                .expect("surfaced")
                .push(s.event.id.clone());
            trace(t, format!("{} got {} @{seq}", state.name, s.event.id));
        }
        top = top.max(seq);
    }
    state.replica.set_cursor(cursor, top).await.expect("cursor");
}

async fn client(state: Arc<ClientState>, mode: Mode, t: Trace) -> turmoil::Result {
    tokio::task::spawn_local(emitter(Arc::clone(&state), t.clone()));
    loop {
        if let Ok(stream) = TcpStream::connect(("relay", PORT)).await {
            let _ = match mode {
                Mode::Stream => stream_session(&state, stream, &t).await,
                Mode::PullPush => pull_push_round(&state, stream, &t).await,
            };
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

async fn read(
    lines: &mut tokio::io::Lines<BufReader<turmoil::net::tcp::OwnedReadHalf>>,
) -> std::io::Result<Value> {
    match tokio::time::timeout(IDLE, lines.next_line()).await {
        Ok(Ok(Some(line))) => serde_json::from_str(&line).map_err(std::io::Error::other),
        Ok(Ok(None)) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The WebSocket client's logic: hello from the room cursor, ingest catch-up and live events,
/// send pending local events after the acked cursor one batch at a time, heartbeat.
async fn stream_session(state: &ClientState, stream: TcpStream, t: &Trace) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let since = state.replica.cursor("room").expect("cursor");
    write_line(&mut w, &json!({"t": "hello", "since": since})).await?;
    let mut in_flight: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut next_ref = 0u64;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            line = lines.next_line() => {
                let line = line?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
                let msg: Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
                last_heard = tokio::time::Instant::now();
                match msg["t"].as_str() {
                    Some("events") => ingest(state, t, &msg["events"], "room").await,
                    Some("ack") => {
                        if let Some(last) = in_flight.take() {
                            state.replica.set_cursor("acked", last).await.expect("cursor");
                        }
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                // Heartbeat: a silent peer (partition, held link, dead relay) ends the session.
                if last_heard.elapsed() > IDLE {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                let mut message = json!({"t": "ping"});
                if in_flight.is_none() {
                    let after = state.replica.cursor("acked").expect("cursor");
                    let pending = state.replica.pending(after, 8).expect("pending");
                    if let Some(last) = pending.last() {
                        in_flight = Some(last.seq);
                        next_ref += 1;
                        let events: Vec<&Event> = pending.iter().map(|s| &s.event).collect();
                        message = json!({"t": "publish", "ref": next_ref, "events": events});
                    }
                }
                write_line(&mut w, &message).await?;
            }
        }
    }
}

/// The Git client's logic: pull pages from the pulled cursor (ingest, then move the cursor),
/// then push pending local events after the pushed cursor (move it after the answer).
async fn pull_push_round(state: &ClientState, stream: TcpStream, t: &Trace) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    loop {
        let since = state.replica.cursor("pulled").expect("cursor");
        write_line(&mut w, &json!({"t": "pull", "since": since})).await?;
        let page = read(&mut lines).await?;
        let empty = page["events"].as_array().is_none_or(Vec::is_empty);
        ingest(state, t, &page["events"], "pulled").await;
        if empty {
            break;
        }
    }
    let after = state.replica.cursor("pushed").expect("cursor");
    let pending = state.replica.pending(after, 8).expect("pending");
    if let Some(last) = pending.last() {
        let events: Vec<&Event> = pending.iter().map(|s| &s.event).collect();
        write_line(&mut w, &json!({"t": "push", "ref": 1, "events": events})).await?;
        let answer = read(&mut lines).await?;
        if answer["t"] == "ack" {
            state
                .replica
                .set_cursor("pushed", last.seq)
                .await
                .expect("cursor");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- one seed

struct Outcome {
    lost: usize,
    duplicated: usize,
    converged: bool,
    trace: Vec<String>,
}

fn run_seed(seed: u64, mode: Mode) -> Outcome {
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(60))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(20))
        .build();
    let t: Trace = Arc::default();
    let log = Arc::new(InMemoryStorage::new());
    {
        let log = Arc::clone(&log);
        sim.host("relay", move || server(Arc::clone(&log), mode));
    }
    let names: Vec<String> = (0..CLIENTS).map(|i| format!("c{i}")).collect();
    let states: Vec<Arc<ClientState>> = names
        .iter()
        .map(|name| {
            Arc::new(ClientState {
                name: name.clone(),
                replica: Replica::with_id(Arc::new(InMemoryStorage::new()), name.clone()),
                emitted: AtomicU64::new(0),
                surfaced: Mutex::default(),
            })
        })
        .collect();
    for state in &states {
        let state = Arc::clone(state);
        let t = t.clone();
        sim.host(state.name.clone(), move || {
            client(Arc::clone(&state), mode, t.clone())
        });
    }
    let healed = Arc::new(AtomicBool::new(false));
    {
        let states = states.clone();
        let healed = Arc::clone(&healed);
        sim.client("checker", async move {
            let total = CLIENTS as u64 * EVENTS_PER_CLIENT;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let done = healed.load(Ordering::SeqCst)
                    && states
                        .iter()
                        .all(|s| s.emitted.load(Ordering::SeqCst) == EVENTS_PER_CLIENT)
                    && states.iter().all(|s| s.replica.storage().len() >= total);
                if done {
                    return Ok(());
                }
            }
        });
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut faulted: BTreeMap<String, &'static str> = BTreeMap::new();
    let result = loop {
        let elapsed = sim.elapsed();
        if elapsed < FAULT_WINDOW {
            if elapsed.as_millis() % 50 == 0 && rng.random_bool(0.5) {
                let who = names[rng.random_range(0..CLIENTS)].clone();
                let action = rng.random_range(0..6);
                let what = match action {
                    0 => {
                        sim.partition(who.as_str(), "relay");
                        faulted.insert(who.clone(), "partition");
                        "partition"
                    }
                    1 => {
                        sim.hold(who.as_str(), "relay");
                        faulted.insert(who.clone(), "hold");
                        "hold"
                    }
                    2 => {
                        match faulted.remove(&who) {
                            Some("partition") => sim.repair(who.as_str(), "relay"),
                            Some(_) => sim.release(who.as_str(), "relay"),
                            None => {}
                        }
                        "heal"
                    }
                    3 => {
                        sim.bounce("relay");
                        "relay restart"
                    }
                    4 => {
                        sim.bounce(who.as_str());
                        "client restart"
                    }
                    _ => "nothing",
                };
                t.lock()
                    .expect("trace")
                    .push(format!("{} fault {what} {who}", elapsed.as_millis()));
            }
        } else if !healed.load(Ordering::SeqCst) {
            for (who, kind) in std::mem::take(&mut faulted) {
                if kind == "partition" {
                    sim.repair(who.as_str(), "relay")
                } else {
                    sim.release(who.as_str(), "relay")
                }
            }
            healed.store(true, Ordering::SeqCst);
            t.lock()
                .expect("trace")
                .push(format!("{} fault heal all", elapsed.as_millis()));
        }
        match sim.step() {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = &result {
        t.lock()
            .expect("trace")
            .push(format!("simulation ended: {e}"));
    }
    let converged = result.is_ok();
    // Total-queue check: every emitted event is in the server log and in every replica exactly
    // once, and no application saw any event twice.
    let all: Vec<String> = names
        .iter()
        .flat_map(|n| (0..EVENTS_PER_CLIENT).map(move |k| format!("{n}-{k}")))
        .collect();
    let mut lost = 0;
    let mut duplicated = 0;
    let server_ids: Vec<String> = log
        .read_since(0, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|s| s.event.id)
        .collect();
    lost += all.iter().filter(|id| !server_ids.contains(id)).count();
    duplicated += server_ids.len()
        - server_ids
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
    for s in &states {
        lost += all
            .iter()
            .filter(|id| s.replica.storage().latest(id).ok().flatten().is_none())
            .count();
        let surfaced = s.surfaced.lock().expect("surfaced");
        duplicated += surfaced.len()
            - surfaced
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len();
    }
    let trace = t.lock().expect("trace").clone();
    Outcome {
        lost,
        duplicated,
        converged,
        trace,
    }
}

fn run_mode(mode: Mode, seeds: u64, label: &str) {
    // Seeds are independent: run them on every core (each simulation is single-threaded).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let results: Vec<(u64, Outcome)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                scope.spawn(move || {
                    (0..seeds)
                        .filter(|s| s % workers == w)
                        .map(|seed| (seed, run_seed(seed, mode)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker"))
            .collect()
    });
    let mut lost = 0;
    let mut duplicated = 0;
    let mut stuck = 0;
    for (seed, out) in &results {
        lost += out.lost;
        duplicated += out.duplicated;
        stuck += usize::from(!out.converged);
        assert!(
            out.converged && out.lost == 0 && out.duplicated == 0,
            "{label} seed {seed}: converged {} lost {} duplicated {}; trace tail {:?}",
            out.converged,
            out.lost,
            out.duplicated,
            &out.trace[out.trace.len().saturating_sub(20)..]
        );
    }
    // Determinism: the same seed gives the same trace.
    let reruns = seeds.min(budget(2, 20));
    let mut same = 0;
    for seed in 0..reruns {
        let a = run_seed(seed * 7 + 1, mode);
        let b = run_seed(seed * 7 + 1, mode);
        assert!(!a.trace.is_empty());
        if a.trace == b.trace {
            same += 1;
        } else {
            let at = a
                .trace
                .iter()
                .zip(&b.trace)
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            eprintln!(
                "seed {} diverges at line {at}: {:?} vs {:?}",
                seed * 7 + 1,
                a.trace.get(at),
                b.trace.get(at)
            );
        }
    }
    let suite = "network (turmoil simulation, protocol model on core)";
    figures::report(
        suite,
        &format!("{label}: seeds (3 clients x 30 events, partitions, holds, restarts)"),
        seeds,
        "1,000 in chaos",
        true,
    );
    figures::report(
        suite,
        &format!("{label}: lost / duplicated / not converged"),
        format!("{lost} / {duplicated} / {stuck}"),
        "0 / 0 / 0",
        lost == 0 && duplicated == 0 && stuck == 0,
    );
    figures::report(
        suite,
        &format!("{label}: same seed, same trace"),
        format!("{same}/{reruns}"),
        "N/N",
        same == reruns,
    );
    assert_eq!(same, reruns, "a seed replayed differently");
}

#[test]
fn simulated_websocket_path_total_queue() {
    run_mode(Mode::Stream, budget(10, 1_000), "WebSocket path");
}

#[test]
fn simulated_pull_push_path_total_queue() {
    run_mode(Mode::PullPush, budget(10, 1_000), "pull/push path");
}
