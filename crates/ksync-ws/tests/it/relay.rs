//! The relay spoken to with raw WebSocket frames, as a client in another language would.

use crate::common;

use common::*;
use ksync_ws::server::RelayConfig;
use serde_json::json;

#[tokio::test]
async fn publish_is_acked_stored_and_fanned_out_to_others_only() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("room1"));
    let (mut a, welcome) = join(&url, hello()).await;
    assert_eq!(welcome["room"], "room1");
    assert_eq!(welcome["serverVersion"], 0);
    let (mut b, _) = join(&url, hello()).await;
    send_json(
        &mut a,
        json!({"type":"publish","ref":1,"events":[event("e1",1), event("e2",2)]}),
    )
    .await;
    let ack = recv_json(&mut a).await;
    assert_eq!(
        ack,
        json!({"type":"ack","ref":1,"serverVersion":2,"results":[{"status":"stored","seq":1},{"status":"stored","seq":2}]})
    );
    let got = recv_json(&mut b).await;
    assert_eq!(got["type"], "events");
    assert_eq!(got["events"][0]["seq"], 1);
    assert_eq!(got["events"][1]["event"]["id"], "e2");
    // The same revision again is a duplicate; other content under the same key a conflict.
    let mut changed = event("e1", 1);
    changed["data"] = json!("other");
    // (One publish names a revision once: see relay_edges for repeats.)
    send_json(&mut b, json!({"type":"publish","ref":9,"events":[event("e1",1), {"id":"","type":"t","data":1,"timestamp":1,"version":1}, event("e2",2)]})).await;
    let ack = recv_json(&mut b).await;
    assert_eq!(ack["results"][0], json!({"status":"duplicate","seq":1}));
    assert_eq!(ack["results"][1]["status"], "invalid");
    assert_eq!(ack["results"][2], json!({"status":"duplicate","seq":2}));
    send_json(
        &mut b,
        json!({"type":"publish","ref":10,"events":[changed]}),
    )
    .await;
    let ack = recv_json(&mut b).await;
    assert_eq!(ack["results"][0]["status"], "conflict");
    assert_eq!(ack["results"][0]["held"]["data"], json!({"n":1}));
    // Nothing new was stored, so a has nothing to receive: its next message is its own ack.
    send_json(
        &mut a,
        json!({"type":"publish","ref":2,"events":[event("e3",3)]}),
    )
    .await;
    let ack = recv_json(&mut a).await;
    assert_eq!(ack["results"][0], json!({"status":"stored","seq":3}));
    let storage = server.relay.connections();
    assert_eq!(storage, 2);
    server.stop().await;
}

#[tokio::test]
async fn resume_from_a_cursor_then_live_without_gap_or_duplicate() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.page_size = 3;
        relay_config
    })
    .await;
    let url = server.url(None);
    let (mut publisher, _) = join(&url, hello()).await;
    let events: Vec<_> = (1..=10).map(|n| event(&format!("e{n}"), n)).collect();
    send_json(
        &mut publisher,
        json!({"type":"publish","ref":1,"events":events}),
    )
    .await;
    recv_json(&mut publisher).await;
    let mut h = hello();
    h["since"] = json!(4);
    let (mut late, welcome) = join(&url, h).await;
    assert_eq!(welcome["serverVersion"], 10);
    send_json(
        &mut publisher,
        json!({"type":"publish","ref":2,"events":[event("e11",11)]}),
    )
    .await;
    let mut seqs = Vec::new();
    while seqs.len() < 7 {
        let batch = recv_json(&mut late).await;
        assert_eq!(batch["type"], "events");
        for e in batch["events"].as_array().expect("array") {
            seqs.push(e["seq"].as_u64().expect("seq"));
        }
    }
    assert_eq!(seqs, (5..=11).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn state_request_gets_snapshot_then_tail() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("s"));
    let (mut p, _) = join(&url, hello()).await;
    let mut v2 = event("x", 2);
    v2["version"] = json!(2);
    send_json(
        &mut p,
        json!({"type":"publish","ref":1,"events":[event("x",1), v2, event("y",3)]}),
    )
    .await;
    recv_json(&mut p).await;
    let mut h = hello();
    h["state"] = json!(true);
    let (mut s, welcome) = join(&url, h.clone()).await;
    assert_eq!(welcome["serverVersion"], 3);
    let snap = recv_json(&mut s).await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["last"], false);
    assert_eq!(snap["serverVersion"], 3);
    let end = recv_json(&mut s).await;
    assert_eq!(
        (
            end["last"].as_bool(),
            end["events"].as_array().map(Vec::len)
        ),
        (Some(true), Some(0))
    );
    let mut ids: Vec<_> = snap["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().expect("id").to_owned(),
                e["version"].as_u64().expect("v"),
            )
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec![("x".to_owned(), 2), ("y".to_owned(), 1)]);
    send_json(
        &mut p,
        json!({"type":"publish","ref":2,"events":[event("z",4)]}),
    )
    .await;
    let tail = recv_json(&mut s).await;
    assert_eq!(tail["events"][0]["seq"], 4);
    // A state join after that publish sees it: the snapshot the first join made (and two
    // joins between commits share) is not reused once the room has committed.
    let (mut later, welcome) = join(&url, h).await;
    assert_eq!(welcome["serverVersion"], 4);
    let snap = recv_json(&mut later).await;
    let mut ids: Vec<_> = snap["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["x", "y", "z"]);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_acks_what_it_accepted_stores_it_and_closes_with_1001() {
    let provider = std::sync::Arc::new(ksync_core::InMemoryProvider::new());
    let server = start_with(
        RelayConfig::default(),
        provider.clone(),
        std::sync::Arc::new(ksync_core::AllowAll),
    )
    .await;
    let (mut ws, _) = join(&server.url(Some("drain")), hello()).await;
    for n in 1..=50u64 {
        send_json(
            &mut ws,
            json!({"type":"publish","ref":n,"events":[event(&format!("e{n}"), n)]}),
        )
        .await;
    }
    let relay = server.relay.clone();
    let stopping = tokio::spawn(async move { relay.shutdown().await });
    let mut acked = Vec::new();
    let code = loop {
        match futures_util::StreamExt::next(&mut ws).await {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                assert_eq!(v["type"], "ack");
                acked.push(v["results"][0]["seq"].as_u64().expect("seq"));
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                break u16::from(f.code);
            }
            Some(Ok(_)) => {}
            other => panic!("expected acks then a close, got {other:?}"),
        }
    };
    stopping.await.expect("shutdown");
    assert_eq!(code, 1001);
    // A room that stored nothing (the shutdown came first) leaves no log behind.
    let stored = ksync_core::StorageProvider::existing(
        provider.as_ref(),
        &ksync_core::LogName::Room(ksync_core::Name::new("drain").expect("name")),
    )
    .expect("ok")
    .map_or(0, |log| log.len());
    // Everything acknowledged is stored, in order.
    assert_eq!(acked, (1..=acked.len() as u64).collect::<Vec<_>>());
    assert!(
        stored >= acked.len() as u64,
        "{stored} stored, {} acked",
        acked.len()
    );
    // New connections are refused while shut down.
    assert_eq!(raw_connect(&server.url(None), &[]).await.err(), Some(503));
    server.task.abort();
}

/// Subscribers joining while a publisher streams get their catch-up from storage while the
/// room queues (then writes straight to their sockets) the live events: every sequence number
/// once, in order, deflated or not.
#[tokio::test]
async fn joining_mid_stream_sees_every_seq_once_in_order_with_or_without_compression() {
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.page_size = 7;
        relay_config
    })
    .await;
    let url = server.url(Some("stream"));
    let (mut publisher, _) = join(&url, hello()).await;
    let total = 300u64;
    let mut subscribers = Vec::new();
    for n in 1..=total {
        send_json(
            &mut publisher,
            json!({"type":"publish","ref":n,"events":[event(&format!("e{n}"), n)]}),
        )
        .await;
        if n % 60 == 0 {
            let mut h = hello();
            h["since"] = json!(0);
            h["compression"] = json!(n % 120 == 0);
            subscribers.push(join(&url, h).await.0);
        }
    }
    for n in 1..=total {
        let ack = recv_json(&mut publisher).await;
        assert_eq!(ack["ref"], n);
        assert_eq!(ack["results"][0], json!({"status":"stored","seq":n}));
    }
    for mut subscriber in subscribers {
        let mut seqs = Vec::new();
        while seqs.len() < total as usize {
            let batch = recv_json(&mut subscriber).await;
            assert_eq!(batch["type"], "events", "{batch}");
            for e in batch["events"].as_array().expect("array") {
                seqs.push(e["seq"].as_u64().expect("seq"));
            }
        }
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    }
    server.stop().await;
}

/// A storage whose appends wait (as a durable one's do while on disk): rooms over it commit
/// from their queue, never on a publisher's task.
struct WaitingStorage(ksync_core::InMemoryStorage);

impl ksync_core::Storage for WaitingStorage {
    fn append(
        &self,
        events: Vec<ksync_core::Event>,
    ) -> ksync_core::BoxFuture<'_, Result<ksync_core::MergeOutcome, ksync_core::StorageError>> {
        Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            self.0.append(events).await
        })
    }
    fn read_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ksync_core::Stored>, ksync_core::StorageError> {
        self.0.read_since(after, limit)
    }
    fn get(
        &self,
        id: &str,
        version: u64,
    ) -> Result<Option<ksync_core::Stored>, ksync_core::StorageError> {
        self.0.get(id, version)
    }
    fn latest(&self, id: &str) -> Result<Option<ksync_core::Stored>, ksync_core::StorageError> {
        self.0.latest(id)
    }
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn state(
        &self,
    ) -> Result<std::collections::BTreeMap<String, ksync_core::Event>, ksync_core::StorageError>
    {
        self.0.state()
    }
    fn meta(&self, key: &str) -> Result<Option<String>, ksync_core::StorageError> {
        self.0.meta(key)
    }
    fn set_meta(
        &self,
        key: &str,
        value: &str,
    ) -> ksync_core::BoxFuture<'_, Result<(), ksync_core::StorageError>> {
        self.0.set_meta(key, value)
    }
}

/// One [`WaitingStorage`] per log.
#[derive(Default)]
struct WaitingProvider(
    std::sync::Mutex<
        std::collections::HashMap<ksync_core::LogName, std::sync::Arc<WaitingStorage>>,
    >,
);

impl ksync_core::StorageProvider for WaitingProvider {
    fn open(
        &self,
        name: &ksync_core::LogName,
    ) -> Result<std::sync::Arc<dyn ksync_core::Storage>, ksync_core::StorageError> {
        let mut logs = self.0.lock().expect("lock");
        let log = logs
            .entry(name.clone())
            .or_insert_with(|| std::sync::Arc::new(WaitingStorage(Default::default())));
        Ok(log.clone())
    }
    fn existing(
        &self,
        name: &ksync_core::LogName,
    ) -> Result<Option<std::sync::Arc<dyn ksync_core::Storage>>, ksync_core::StorageError> {
        let logs = self.0.lock().expect("lock");
        Ok(logs
            .get(name)
            .map(|log| log.clone() as std::sync::Arc<dyn ksync_core::Storage>))
    }
    fn list(&self) -> Result<Vec<ksync_core::LogName>, ksync_core::StorageError> {
        Ok(self.0.lock().expect("lock").keys().cloned().collect())
    }
}

/// Publishers streaming into one room at once (commits on their own tasks when the room is
/// free, through the room's small queue when it is not, or always through the queue when the
/// storage waits): each publisher's events keep its order, every ack names the seq its event
/// was delivered with, and a subscriber sees every seq once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_keep_their_order_and_every_seq_reaches_subscribers_once() {
    let providers: [std::sync::Arc<dyn ksync_core::StorageProvider>; 2] = [
        std::sync::Arc::new(ksync_core::InMemoryProvider::new()),
        std::sync::Arc::new(WaitingProvider::default()),
    ];
    for provider in providers {
        let server = start_with(
            {
                let mut relay_config = RelayConfig::default();
                relay_config.room_queue = 2;
                relay_config
            },
            provider,
            std::sync::Arc::new(ksync_core::AllowAll),
        )
        .await;
        let url = server.url(Some("busy"));
        let (mut subscriber, _) = join(&url, hello()).await;
        let (publishers, per_publisher) = (4u64, 60u64);
        let mut tasks = Vec::new();
        for p in 0..publishers {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ws, _) = join(&url, hello()).await;
                for n in 1..=per_publisher {
                    let e = event(&format!("p{p}-{n}"), n);
                    send_json(&mut ws, json!({"type":"publish","ref":n,"events":[e]})).await;
                }
                let mut seqs = Vec::new();
                for n in 1..=per_publisher {
                    // The other publishers' events arrive in between.
                    let ack = loop {
                        let message = recv_json(&mut ws).await;
                        if message["type"] != "events" {
                            break message;
                        }
                    };
                    assert_eq!(ack["type"], "ack", "{ack}");
                    assert_eq!(ack["ref"], n, "{ack}");
                    assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
                    seqs.push(ack["results"][0]["seq"].as_u64().expect("seq"));
                }
                (ws, seqs)
            }));
        }
        let mut acked = std::collections::HashMap::new();
        let mut sockets = Vec::new();
        for (p, task) in tasks.into_iter().enumerate() {
            let (ws, seqs) = task.await.expect("publisher");
            for (n, seq) in seqs.into_iter().enumerate() {
                acked.insert(seq, format!("p{p}-{}", n + 1));
            }
            sockets.push(ws);
        }
        let total = publishers * per_publisher;
        let mut delivered = Vec::new();
        while delivered.len() < total as usize {
            let batch = recv_json(&mut subscriber).await;
            assert_eq!(batch["type"], "events", "{batch}");
            for e in batch["events"].as_array().expect("array") {
                let seq = e["seq"].as_u64().expect("seq");
                assert_eq!(
                    acked.get(&seq).map(String::as_str),
                    e["event"]["id"].as_str(),
                    "the ack and the delivery of seq {seq} name the same event"
                );
                delivered.push((seq, e["event"]["data"]["n"].as_u64().expect("n")));
            }
        }
        let seqs: Vec<u64> = delivered.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
        for p in 0..publishers {
            let order: Vec<u64> = delivered
                .iter()
                .filter(|(seq, _)| acked[seq].starts_with(&format!("p{p}-")))
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(
                order,
                (1..=per_publisher).collect::<Vec<_>>(),
                "publisher {p}"
            );
        }
        drop(sockets);
        server.stop().await;
    }
}

/// A stream of publishes (empty ones too) sent back to back is read in bounded bursts: with a
/// small batch limit, every publish is still acknowledged once, in order, and the events of
/// the others reach a subscriber in order.
#[tokio::test]
async fn back_to_back_publishes_are_committed_in_bounded_bursts() {
    use futures_util::SinkExt;
    let server = start({
        let mut relay_config = RelayConfig::default();
        relay_config.max_batch_events = 8;
        relay_config
    })
    .await;
    let url = server.url(Some("bursts"));
    let (mut subscriber, _) = join(&url, hello()).await;
    let (mut ws, _) = join(&url, hello()).await;
    let total = 500u64;
    for n in 1..=total {
        let events = if n % 2 == 0 {
            json!([event(&format!("e{n}"), n)])
        } else {
            json!([])
        };
        let publish = json!({"type":"publish","ref":n,"events":events});
        ws.feed(tokio_tungstenite::tungstenite::Message::text(
            publish.to_string(),
        ))
        .await
        .expect("feed");
    }
    ws.flush().await.expect("flush");
    let mut stored = 0;
    for n in 1..=total {
        let ack = recv_json(&mut ws).await;
        assert_eq!(ack["ref"], n, "{ack}");
        if n % 2 == 0 {
            stored += 1;
            assert_eq!(ack["results"][0], json!({"status":"stored","seq":stored}));
        } else {
            assert_eq!(ack["results"], json!([]));
        }
    }
    let mut seen = Vec::new();
    while seen.len() < stored as usize {
        let batch = recv_json(&mut subscriber).await;
        for e in batch["events"].as_array().expect("events") {
            seen.push(e["seq"].as_u64().expect("seq"));
        }
    }
    assert_eq!(seen, (1..=stored).collect::<Vec<_>>());
    server.stop().await;
}

/// A message longer than a fragment (16 KiB) comes as a fragmented message, a text frame
/// without fin, continuation frames, the last with fin (so that each connection's write buffer
/// holds a fragment, not the message: see `slow_disk.rs`), and clients read it whole: the
/// Rust client, and tokio-tungstenite on a connection that gets it deflated (binary).
#[tokio::test]
async fn a_long_message_comes_in_fragments_that_clients_read_whole() {
    use ksync_core::{Notification, NotificationKind, SyncClient};

    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("long"));
    let (mut publisher, _) = join(&url, hello()).await;
    let mut bare = bare_join(&url).await;
    let (mut deflating, _) = join(
        &url,
        json!({"type":"hello","protocol":1,"compression":true}),
    )
    .await;
    let client = ksync_ws::WebSocketSyncClient::builder(&url)
        .build()
        .expect("client");
    let mut seen = client.notifications();
    client.connect().await.expect("connect");
    // 100 KB that deflate cannot shrink below a fragment.
    let mut state = 7u64;
    let data: String = (0..100_000)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            char::from(b'a' + u8::try_from((state >> 33) % 26).unwrap())
        })
        .collect();
    let mut long = event("long", 1);
    long["data"] = json!(data);
    send_json(
        &mut publisher,
        json!({"type":"publish","ref":1,"events":[long]}),
    )
    .await;
    assert_eq!(recv_json(&mut publisher).await["type"], "ack");

    let frames = bare_read_message(&mut bare).await;
    let (first, rest) = frames.split_first().unwrap();
    assert_eq!((first.opcode, first.fin), (1, false), "{frames:?}");
    assert!(!rest.is_empty(), "{frames:?}");
    for (n, frame) in rest.iter().enumerate() {
        assert_eq!(frame.opcode, 0, "continuation frames: {frames:?}");
        assert_eq!(
            frame.fin,
            n + 1 == rest.len(),
            "fin on the last only: {frames:?}"
        );
    }
    assert!(frames.iter().all(|f| f.length <= 16 * 1024), "{frames:?}");
    assert!(frames.iter().map(|f| f.length).sum::<usize>() > 100_000);

    let got = recv_json(&mut deflating).await;
    assert_eq!(got["events"][0]["event"]["data"], json!(data));
    let event = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        seen.next_of(NotificationKind::Event),
    )
    .await
    .expect("the event within 5 s")
    .expect("notifications");
    let Notification::Event(event) = event else {
        unreachable!("next_of(Event)")
    };
    assert_eq!(event.data, json!(data));
    client.disconnect().await.expect("disconnect");
    server.stop().await;
}
