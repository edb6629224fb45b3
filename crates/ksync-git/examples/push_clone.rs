//! The `cargo xtask bench git` path in one small process, for profilers (e.g.
//! `valgrind --tool=callgrind`): start the repository service on 127.0.0.1:0, push N ~200-byte
//! events from one client in the client's default batches, clone them into an empty client in pages of
//! 10,000, and check the counts.
//!
//! ```text
//! cargo run --release -p ksync-git --example push_clone -- [EVENTS] [memory|file|setup|setup-file|push|push-file|floor] [gzip|plain] [CLONE_PAGE] [PUSH_BATCH]
//! ```
//!
//! `setup` (`setup-file`) does everything but the push and the clone with memory (file)
//! storage: subtract its count to get theirs; `push` (`push-file`) stops after the push;
//! `floor` runs the benchmark's floor twice instead: `serde_json` encode, loopback TCP copy,
//! decode.

use std::sync::Arc;
use std::time::Instant;

use ksync_core::{
    AllowAll, Event, InMemoryProvider, InMemoryStorage, Name, PullPushClient, Replica, Storage,
    StorageProvider, SyncClient,
};
use ksync_git::GitSyncClient;
use ksync_git::server::GitServer;
use ksync_storage_file::{FileProvider, FileStorage};

const ORIGIN: &str = "bench-replica";

fn event(i: usize) -> Event {
    Event::new(
        format!("evt-{i:012}"),
        "message",
        serde_json::json!({
            "room": "general",
            "user": format!("user-{}", i % 100),
            "text": "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod",
            "n": i,
        }),
        1_700_000_000_000 + i as u64,
    )
    .with_origin(ORIGIN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let mode = args.next().unwrap_or_else(|| "memory".into());
    let gzip = args.next().is_some_and(|a| a == "gzip");
    let page: usize = args.next().map_or(Ok(10_000), |a| a.parse())?;
    let batch: usize = args
        .next()
        .map_or(Ok(ksync_git::wire::DEFAULT_PUSH_BATCH), |a| a.parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if mode == "floor" {
        let events: Vec<Event> = (0..count).map(event).collect();
        let mut total = std::time::Duration::ZERO;
        for _ in 0..2 {
            total += floor_pass(&events)?;
        }
        println!("{count} events: two floor passes {total:?}");
        return Ok(());
    }
    rt.block_on(run(count, &mode, gzip, page, batch))
}

/// The benchmark's floor: encode, copy over loopback TCP, decode. Timed as the benchmark
/// times it (the decoded events are dropped after the clock stops).
fn floor_pass(events: &[Event]) -> Result<std::time::Duration, Box<dyn std::error::Error>> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut socket, _) = listener.accept()?;
        let mut received = Vec::new();
        socket.read_to_end(&mut received)?;
        Ok(received)
    });
    let start = Instant::now();
    let bytes = serde_json::to_vec(events)?;
    let mut socket = std::net::TcpStream::connect(addr)?;
    socket.set_nodelay(true)?;
    socket.write_all(&bytes)?;
    socket.shutdown(std::net::Shutdown::Write)?;
    let received = reader.join().map_err(|_| "floor reader panicked")??;
    let decoded: Vec<Event> = serde_json::from_slice(&received)?;
    let took = start.elapsed();
    assert_eq!(decoded.len(), events.len());
    Ok(took)
}

async fn run(
    count: usize,
    mode: &str,
    gzip: bool,
    page: usize,
    batch: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let file = mode.ends_with("file");
    let dir = tempfile::tempdir()?;
    let storage = |name: &str| -> Result<Arc<dyn Storage>, Box<dyn std::error::Error>> {
        Ok(if file {
            Arc::new(FileStorage::open(dir.path().join(name))?)
        } else {
            Arc::new(InMemoryStorage::new())
        })
    };
    let provider: Arc<dyn StorageProvider> = if file {
        let data = dir.path().join("server");
        std::fs::create_dir(&data)?;
        Arc::new(FileProvider::new(&data)?)
    } else {
        Arc::new(InMemoryProvider::new())
    };
    let service = GitServer::new(provider, Arc::new(AllowAll));
    service.create_repo(&Name::new("bench")?).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let app = service.router();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/git/bench");

    let events: Vec<Event> = (0..count).map(event).collect();
    let local = storage("pusher.log")?;
    for chunk in events.chunks(10_000) {
        local.append(chunk.to_vec()).await?;
    }
    drop(events);
    let pusher = GitSyncClient::builder(&url)
        .compression(gzip)
        .push_batch_size(batch)
        .build()?;
    pusher.attach(Replica::with_id(local, ORIGIN));
    if mode.starts_with("setup") {
        let cloner = GitSyncClient::builder(&url).build()?;
        cloner.attach(Replica::with_id(storage("cloner.log")?, "bench-cloner"));
        server.abort();
        return Ok(());
    }
    let start = Instant::now();
    let pushed = pusher.push().await?;
    let push = start.elapsed();
    if mode.starts_with("push") {
        server.abort();
        println!("{count} events: push {push:?}");
        return Ok(());
    }

    let cloner = GitSyncClient::builder(&url)
        .compression(gzip)
        .page_size(page)
        .build()?;
    cloner.attach(Replica::with_id(storage("cloner.log")?, "bench-cloner"));
    let start = Instant::now();
    let cloned = cloner.clone(&url, "main").await?;
    let clone = start.elapsed();
    server.abort();
    if pushed.pushed_events.len() != count || cloned.new_events.len() != count {
        return Err(format!(
            "pushed {} and cloned {} of {count}",
            pushed.pushed_events.len(),
            cloned.new_events.len()
        )
        .into());
    }
    println!("{count} events: push {push:?}, clone {clone:?}");
    Ok(())
}
