//! The relay spoken to with raw WebSocket frames, as a client in another language would.

mod common;

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
    send_json(&mut b, json!({"type":"publish","ref":9,"events":[event("e1",1), changed, {"id":"","type":"t","data":1,"timestamp":1,"version":1}]})).await;
    let ack = recv_json(&mut b).await;
    assert_eq!(ack["results"][0], json!({"status":"duplicate","seq":1}));
    assert_eq!(ack["results"][1]["status"], "conflict");
    assert_eq!(ack["results"][1]["held"]["data"], json!({"n":1}));
    assert_eq!(ack["results"][2]["status"], "invalid");
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
    let server = start(RelayConfig {
        page_size: 3,
        ..RelayConfig::default()
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
    let (mut s, welcome) = join(&url, h).await;
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
    let log = ksync_core::StorageProvider::existing(
        provider.as_ref(),
        &ksync_core::LogName::Room(ksync_core::Name::new("drain").expect("name")),
    )
    .expect("ok")
    .expect("room");
    // Everything acknowledged is stored, in order.
    assert_eq!(acked, (1..=acked.len() as u64).collect::<Vec<_>>());
    assert!(log.len() >= acked.len() as u64);
    // New connections are refused while shut down.
    assert_eq!(raw_connect(&server.url(None), &[]).await.err(), Some(503));
    server.task.abort();
}

/// Subscribers joining while a publisher streams get their catch-up from storage while the
/// room queues (then writes straight to their sockets) the live events: every sequence number
/// once, in order, deflated or not.
#[tokio::test]
async fn joining_mid_stream_sees_every_seq_once_in_order_with_or_without_compression() {
    let server = start(RelayConfig {
        page_size: 7,
        ..RelayConfig::default()
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
