//! The relay on a slow disk (appends that take seconds): what waits for the disk and what
//! does not.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{LogName, StorageProvider};
use ksync_testkit::GatedProvider;
use ksync_ws::server::RelayConfig;
use serde_json::json;
use tokio::sync::Semaphore;

/// Taken by every test here: one of them measures this process's resident memory, which the
/// others' allocations (running beside it on other threads) would add to.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A join waits for the append on disk now (the room's lock), not for every publish queued
/// behind it: those are not in the log yet, and reach the joiner live, after its catch-up,
/// each once and in order. Through the room's queue a join waited for every queued group
/// commit, seconds each on a slow disk: past clients' connect timeout (10 s), so readers
/// could not join a room its writers kept busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_waits_for_the_append_in_progress_not_for_the_queue() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let permits = Arc::new(Semaphore::new(1));
    let provider = Arc::new(GatedProvider::one_disk(Arc::clone(&permits)));
    let mut started = provider.started();
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            // One publish a group: each queued publish is an append of its own.
            relay_config.max_batch_events = 1;
            relay_config
        },
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("slow"));
    let (mut first, _) = join(&url, hello()).await;
    let mut others = Vec::new();
    for _ in 2..=5u64 {
        others.push(join(&url, hello()).await.0);
    }
    send_json(
        &mut first,
        json!({"type":"publish","ref":0,"events":[event("warm", 0)]}),
    )
    .await;
    assert_eq!(recv_json(&mut first).await["type"], "ack");
    // The disk is slow from here on: one append on it, four publishes queued behind it.
    send_json(
        &mut first,
        json!({"type":"publish","ref":1,"events":[event("e1", 1)]}),
    )
    .await;
    started.wait_for(|n| *n >= 2).await.expect("appends");
    for (ws, n) in others.iter_mut().zip(2..=5u64) {
        send_json(
            ws,
            json!({"type":"publish","ref":n,"events":[event(&format!("e{n}"), n)]}),
        )
        .await;
    }
    // The relay has read and queued those publishes (behind e1, on disk): a join through the
    // queue would come after them.
    eventually("e1 to e5 queued", || {
        server
            .relay
            .backlog("slow")
            .is_some_and(|b| b.publishes == 5)
    })
    .await;
    let mut joining = tokio::spawn({
        let url = url.clone();
        async move { join(&url, json!({"type":"hello","protocol":1,"since":0})).await }
    });
    // The joiner waits for the append on disk (through the queue it would wait for all).
    eventually("the join waiting for the room", || {
        server.relay.backlog("slow").is_some_and(|b| b.joins == 1)
    })
    .await;
    // The disk finishes one append at a time; each next one starts once the room gets to it.
    let mut appends = 2;
    let (mut reader, welcome) = loop {
        permits.add_permits(1);
        tokio::select! {
            joined = &mut joining => break joined.expect("joined"),
            next = started.wait_for(|n| *n > appends) => {
                next.expect("appends");
                appends += 1;
            }
        }
    };
    // Through the room's queue the join came after all four queued publishes' appends
    // (serverVersion 6): seconds each on a slow disk.
    let server_version = welcome["serverVersion"].as_u64().expect("serverVersion");
    assert!(server_version < 6, "{welcome}");
    permits.add_permits(100);
    let mut seqs = Vec::new();
    while seqs.len() < 6 {
        let message = recv_json(&mut reader).await;
        for e in message["events"].as_array().expect("events") {
            seqs.push(e["seq"].as_u64().expect("seq"));
        }
    }
    assert_eq!(seqs, (1..=6).collect::<Vec<_>>());
    drop(others);
    server.stop().await;
}

/// The next JSON message, however long it takes (skipping pings).
async fn recv_json_slowly(ws: &mut Raw) -> serde_json::Value {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match ws.next().await.expect("open").expect("no error") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json"),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Publishers waiting for room in a full room queue (a stuck disk) hold their publish as JSON,
/// not decoded: decoded, an array of small numbers is 16 times its JSON, and each waiting
/// publisher held that outside `room_queue_bytes` (47 publishers of 900 KiB held 814 MiB
/// beside a 1 MiB budget; measured here: over 17 MiB each). Once the disk goes on, each
/// publish is decoded again from its JSON, stored and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_waiting_for_a_full_room_queue_hold_json_not_decoded_events() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let permits = Arc::new(Semaphore::new(1));
    let provider = Arc::new(GatedProvider::one_disk(Arc::clone(&permits)));
    let mut started = provider.started();
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.room_queue_bytes = 1 << 20;
            relay_config
        },
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("mem"));
    let publishers = 12usize;
    let mut conns = Vec::new();
    for _ in 0..=publishers {
        conns.push(join(&url, hello()).await.0);
    }
    let first = &mut conns[0];
    send_json(
        first,
        json!({"type":"publish","ref":0,"events":[event("warm", 0)]}),
    )
    .await;
    assert_eq!(recv_json(first).await["type"], "ack");
    // The disk hangs on the next append; the queue (1 MiB) fills with the first big publish.
    send_json(
        first,
        json!({"type":"publish","ref":1,"events":[event("stuck", 1)]}),
    )
    .await;
    started.wait_for(|n| *n >= 2).await.expect("appends");
    let before = rss();
    for (i, ws) in conns.iter_mut().enumerate().skip(1) {
        let mut e = event(&format!("big{i}"), 1);
        // ~900 KiB of JSON, ~14 MiB decoded.
        e["data"] = json!(vec![0u8; 450_000]);
        send_json(ws, json!({"type":"publish","ref":2,"events":[e]})).await;
    }
    // The relay has read every publish: one in the queue, the others waiting for room in it
    // (with "stuck", on disk).
    eventually("every publish read", || {
        server
            .relay
            .backlog("mem")
            .is_some_and(|b| b.publishes == publishers + 1)
    })
    .await;
    let held = rss().saturating_sub(before);
    // Measured about 8 MiB a publisher (JSON, both ends' socket buffers in this process,
    // allocator slack); decoded they held about 20 MiB each (238 MiB for 12). 12 keeps the
    // two apart on a busy machine.
    assert!(
        held < publishers as u64 * (12 << 20),
        "{} MiB held for {publishers} waiting publishes of 900 KiB",
        held >> 20
    );
    permits.add_permits(10_000);
    assert_eq!(
        recv_json(&mut conns[0]).await["results"][0]["status"],
        "stored"
    );
    // Every connection reads at once (each also gets the others' events: a reader left
    // waiting would be dropped at the write timeout).
    let acks = futures_util::future::join_all(conns.iter_mut().skip(1).map(|ws| async move {
        loop {
            // Generous: each reader gets every other publisher's 900 KiB event first.
            let message = tokio::time::timeout(Duration::from_secs(60), recv_json_slowly(ws))
                .await
                .expect("the ack within 60 s");
            if message["type"] == "ack" {
                break message;
            }
        }
    }))
    .await;
    for ack in acks {
        assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    }
    server.stop().await;
}

/// Heartbeats while a room waits on its disk longer than many ping intervals: a subscriber
/// (the Rust client, pinging too) keeps answering and is not closed with 4009 because its
/// room is busy, and neither is a publisher whose connection the full queue holds back (it
/// reads nothing meanwhile; the pong that arrived counts). Both get on once the disk does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_stuck_on_its_disk_closes_no_live_client_for_missed_heartbeats() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let permits = Arc::new(Semaphore::new(1));
    let provider = Arc::new(GatedProvider::one_disk(Arc::clone(&permits)));
    let mut started = provider.started();
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.heartbeat = Duration::from_millis(100);
            // Any publish takes it all: the second one queued holds its connection back.
            relay_config.room_queue_bytes = 1;
            relay_config
        },
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("stuck"));
    let subscriber = ksync_ws::WebSocketSyncClient::builder(url.clone())
        .heartbeat(Duration::from_millis(100))
        .heartbeat_timeout(Duration::from_millis(500))
        .reconnect(false)
        .build()
        .expect("client");
    let rec = Recorder::attach(&subscriber);
    ksync_core::SyncClient::connect(&subscriber)
        .await
        .expect("connect");
    let (publisher, _) = join(&url, hello()).await;
    let (mut sink, mut stream) = futures_util::StreamExt::split(publisher);
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let publish = |n: u64| {
        Message::text(
            json!({"type":"publish","ref":n,"events":[event(&format!("p{n}"), n)]}).to_string(),
        )
    };
    sink.send(publish(0)).await.expect("send");
    // Reads (and so answers pings) all along; ends at the ack of ref 3, or a close.
    let reading = tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                    if v["type"] == "ack" && v["ref"] == 3 {
                        return Ok(v);
                    }
                }
                Ok(Message::Close(frame)) => return Err(format!("{frame:?}")),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("ended".into())
    });
    started.wait_for(|n| *n >= 1).await.expect("appends");
    // Ref 0 took the one permit: the disk now hangs on ref 1 (in the queue), ref 2 waits for
    // the queue with its connection, and ref 3 stays unread.
    for n in 1..=3 {
        sink.send(publish(n)).await.expect("send");
    }
    started.wait_for(|n| *n >= 2).await.expect("appends");
    // Twenty ping intervals of the relay and the client, the disk stuck throughout.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!reading.is_finished(), "{:?}", reading.await);
    assert!(subscriber.is_connected());
    permits.add_permits(100);
    let ack = reading.await.expect("reader").expect("the publisher's ack");
    assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    eventually("the subscriber gets all four", || {
        rec.event_ids().len() == 4
    })
    .await;
    let failures = rec.count(|n| matches!(n, ksync_core::Notification::Error(_)));
    assert_eq!(failures, 0, "{:?}", rec.all());
    assert!(subscriber.is_connected());
    drop(sink);
    server.stop().await;
}

/// A state-based join holds about one frame of its snapshot while its socket is full, not a
/// page of it: 3 joiners that stop reading after their first page, in a room whose state is
/// 40 events of 900 KB. Each copied a whole page (`page_size` events, here the room's 36 MB)
/// and encoded it before halving it to fit: 3 such joiners held about 3 times the room
/// beside the snapshot they share (285 MiB for a room of 90 MB); now a frame of at most
/// `max_message_size` each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_joiners_that_stop_reading_hold_a_frame_not_a_page() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let server = relay_with_a_large_room("big").await;
    let url = server.url(Some("big"));
    let _keep = join(&url, hello()).await;
    let before = rss();
    let mut joiners = Vec::new();
    for _ in 0..3 {
        let mut ws =
            join_small_window(&url, json!({"type":"hello","protocol":1,"state":true})).await;
        let page = recv_json_slowly(&mut ws).await;
        assert_eq!(page["type"], "snapshot", "{}", page["type"]);
        joiners.push(ws);
    }
    let held = rss().saturating_sub(before);
    assert!(
        held < 64 << 20,
        "3 stalled state joiners hold {} MiB beside the room",
        held >> 20
    );
    // Gone before the stop, which would wait for their full sockets until the write timeout.
    drop(joiners);
    server.stop().await;
}

/// State-based joins with a commit between each hold no copy of the room's state each: 4
/// joiners that stop reading after their first page, in a room of 40 events of 900 KB with
/// a small publish between the joins. Each join after a commit made a snapshot of its own,
/// the room's state decoded (36 MB here, 180 MB for 200 such events), held for as long as
/// its catch-up lasted (the write timeout for a stalled one); now a snapshot is where each
/// id's latest event is in the log (8 bytes an id), and each joiner holds about a frame.
/// (What a snapshot sends is checked in `it/relay.rs` and `it/relay_edges.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_joiners_between_commits_hold_no_copy_of_the_state_each() {
    const JOINERS: u64 = 4;
    let _alone = ONE_AT_A_TIME.lock().await;
    let server = relay_with_a_large_room("busy").await;
    let url = server.url(Some("busy"));
    let (mut writer, _) = join(&url, hello()).await;
    let before = rss();
    let mut joiners = Vec::new();
    for n in 0..JOINERS {
        let mut ws =
            join_small_window(&url, json!({"type":"hello","protocol":1,"state":true})).await;
        let page = recv_json_slowly(&mut ws).await;
        assert_eq!(page["type"], "snapshot", "{}", page["type"]);
        joiners.push(ws);
        // A commit: the next join cannot share this one's snapshot.
        send_json(
            &mut writer,
            json!({"type":"publish","ref":n,"events":[event(&format!("w{n}"), n)]}),
        )
        .await;
        assert_eq!(recv_json(&mut writer).await["type"], "ack");
    }
    let held = rss().saturating_sub(before);
    assert!(
        held < 64 << 20,
        "{JOINERS} stalled state joiners between commits hold {} MiB beside the room",
        held >> 20
    );
    // Gone before the stop, which would wait for their full sockets until the write timeout.
    drop(joiners);
    server.stop().await;
}

/// A relay (default configuration, logs in memory) whose room `room` holds 40 events of
/// 900 KB, each its own id: a state of 36 MB, for the state joiners' memory tests.
async fn relay_with_a_large_room(room: &str) -> Server {
    use ksync_core::{Event, InMemoryProvider, Name};

    let provider = Arc::new(InMemoryProvider::new());
    let log = provider
        .open(&LogName::Room(Name::new(room).expect("name")))
        .expect("open");
    let events: Vec<Event> = (0..40)
        .map(|n| {
            serde_json::from_value(json!({"id": format!("e{n}"), "type": "t",
                "data": "s".repeat(900_000), "timestamp": 1, "version": 1}))
            .expect("event")
        })
        .collect();
    log.append(events).await.expect("append");
    drop(log);
    start_with(
        RelayConfig::default(),
        provider as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .await
}

/// Joins `url`'s room with `hello` over a socket with a 4 KiB receive buffer, so that the
/// relay's writes to it wait once it stops reading.
async fn join_small_window(url: &str, hello: serde_json::Value) -> Raw {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let request = url.into_client_request().expect("request");
    let host = request.uri().authority().expect("authority").as_str();
    let addr: std::net::SocketAddr = host.parse().expect("address");
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket.connect(addr).await.expect("connect");
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(tcp);
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("upgrade");
    send_json(&mut ws, hello).await;
    assert_eq!(recv_json_slowly(&mut ws).await["type"], "welcome");
    ws
}

/// A join waiting for the room's commit in progress (an append that hangs) ends at a shutdown
/// with 1001 at once: it went on waiting until the append ended, unlike every other wait of a
/// connection, and held the shutdown up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_waiting_for_a_hung_append_ends_at_shutdown() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let permits = Arc::new(Semaphore::new(1));
    let provider = Arc::new(GatedProvider::one_disk(Arc::clone(&permits)));
    let mut started = provider.started();
    let server = start_with(
        RelayConfig::default(),
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("hung"));
    let (mut first, _) = join(&url, hello()).await;
    send_json(
        &mut first,
        json!({"type":"publish","ref":0,"events":[event("warm", 0)]}),
    )
    .await;
    assert_eq!(recv_json(&mut first).await["type"], "ack");
    // The next append hangs until permits are added.
    send_json(
        &mut first,
        json!({"type":"publish","ref":1,"events":[event("e1", 1)]}),
    )
    .await;
    started.wait_for(|n| *n >= 2).await.expect("appends");
    let mut joiner = raw_connect(&url, &[]).await.expect("connect");
    send_json(&mut joiner, hello()).await;
    eventually("the join waits for the append", || {
        server.relay.backlog("hung").is_some_and(|b| b.joins == 1)
    })
    .await;
    let relay = server.relay.clone();
    let stopping = tokio::spawn(async move { relay.shutdown().await });
    assert_eq!(recv_close(&mut joiner).await.0, 1001);
    // The append may end now; so does the rest of the shutdown.
    permits.add_permits(16);
    stopping.await.expect("shutdown");
    server.stop().await;
}

/// Lets everyone in; a bearer token `short` expires 300 ms after it is checked.
struct ShortLived;

impl ksync_core::Authenticator for ShortLived {
    fn authenticate(
        &self,
        credentials: &ksync_core::Credentials,
    ) -> Result<ksync_core::Grant, ksync_core::AuthError> {
        let mut grant = ksync_core::Grant::anonymous();
        if credentials.bearer.as_deref() == Some("short") {
            grant.expires_at = Some(std::time::SystemTime::now() + Duration::from_millis(300));
        }
        Ok(grant)
    }
}

/// A join waiting for the room's commit in progress (an append that hangs) ends with 4401
/// when its credentials expire, as a live connection does: it waited until the append ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_waiting_for_a_hung_append_ends_when_its_credentials_expire() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let permits = Arc::new(Semaphore::new(1));
    let provider = Arc::new(GatedProvider::one_disk(Arc::clone(&permits)));
    let mut started = provider.started();
    let server = start_with(
        RelayConfig::default(),
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ShortLived),
    )
    .await;
    let url = server.url(Some("expiring"));
    let (mut first, _) = join(&url, hello()).await;
    send_json(
        &mut first,
        json!({"type":"publish","ref":0,"events":[event("warm", 0)]}),
    )
    .await;
    assert_eq!(recv_json(&mut first).await["type"], "ack");
    send_json(
        &mut first,
        json!({"type":"publish","ref":1,"events":[event("e1", 1)]}),
    )
    .await;
    started.wait_for(|n| *n >= 2).await.expect("appends");
    let mut joiner = raw_connect(&url, &[("authorization", "Bearer short")])
        .await
        .expect("connect");
    send_json(&mut joiner, hello()).await;
    assert_eq!(recv_close(&mut joiner).await.0, 4401);
    permits.add_permits(16);
    server.stop().await;
}

/// One large message leaves no buffer of its size on every connection that received it: the
/// relay sends a message longer than a fragment as several WebSocket frames, so each
/// connection's write buffer (tungstenite keeps its capacity for the connection's life) holds
/// a fragment, not the message. Before, 250 subscribers reading normally held about 0.88 MiB
/// each after one 900 KB publish (+220 MiB), for good (~10 GiB at 10,000 connections); now
/// about 40 KiB each (+10 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_leaves_no_message_sized_buffer_per_connection() {
    const SUBSCRIBERS: usize = 250;
    const DATA: usize = 900_000;
    let _alone = ONE_AT_A_TIME.lock().await;
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("wide"));
    let (mut publisher, _) = join(&url, hello()).await;
    let idle_before = rss();
    let subscribers =
        futures_util::future::join_all((0..SUBSCRIBERS).map(|_| bare_join(&url))).await;
    let before = rss();
    println!(
        "idle: {} B a connection (relay and bare client, this process)",
        before.saturating_sub(idle_before) / SUBSCRIBERS as u64
    );
    let mut big = event("big", 1);
    big["data"] = json!("s".repeat(DATA));
    send_json(
        &mut publisher,
        json!({"type":"publish","ref":1,"events":[big]}),
    )
    .await;
    // Every subscriber reads the whole message (however it is framed).
    let read = futures_util::future::join_all(subscribers.into_iter().map(|mut tcp| async move {
        let frames = bare_read_message(&mut tcp).await;
        (tcp, frames.iter().map(|f| f.length).sum::<usize>())
    }))
    .await;
    for (_, length) in &read {
        assert!(*length > DATA, "a message of {length} bytes");
    }
    let held = rss().saturating_sub(before);
    println!(
        "after one {DATA} B message to {SUBSCRIBERS} subscribers: +{} MiB",
        held >> 20
    );
    // Measured +220 MiB before (the message's size per connection), +10 MiB now.
    assert!(
        held < 64 << 20,
        "{SUBSCRIBERS} connections hold {} MiB after one message of {DATA} B",
        held >> 20
    );
    drop(read);
    server.stop().await;
}
