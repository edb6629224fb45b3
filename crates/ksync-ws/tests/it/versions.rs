//! What this version does with what a newer peer of the same protocol version may send
//! (docs/PROTOCOL.md, "Versions and what a peer does not know"): unknown fields in messages
//! are ignored both ways, unknown message types are answered (relay) or reported and skipped
//! (client), and an event with a field the event rules do not know is refused, never stored
//! without it.

use crate::common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use ksync_core::{Notification, SyncClient};
use ksync_ws::server::RelayConfig;
use ksync_ws::{WebSocketSyncClient, WsError};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn the_relay_ignores_unknown_message_fields_and_refuses_unknown_event_fields() {
    let server = start(RelayConfig::default()).await;
    let url = server.url(Some("newer"));
    let (mut ws, welcome) = join(
        &url,
        json!({"type": "hello", "protocol": 1, "since": 0, "resume": {"token": "x"},
            "features": ["presence"]}),
    )
    .await;
    assert_eq!(welcome["serverVersion"], 0);
    send_json(
        &mut ws,
        json!({"type": "publish", "ref": 1, "priority": "high", "events": [event("a", 1)]}),
    )
    .await;
    let ack = recv_json(&mut ws).await;
    assert_eq!(
        ack["results"],
        json!([{"status": "stored", "seq": 1}]),
        "{ack}"
    );
    send_json(&mut ws, json!({"type": "ping", "ref": 2, "echo": true})).await;
    assert_eq!(recv_json(&mut ws).await, json!({"type": "pong", "ref": 2}));
    // An event field the event rules do not know: refused, not stored without it.
    let mut tagged = event("b", 2);
    tagged["tags"] = json!(["x"]);
    send_json(
        &mut ws,
        json!({"type": "publish", "ref": 3, "events": [tagged]}),
    )
    .await;
    let ack = recv_json(&mut ws).await;
    assert_eq!(ack["results"][0]["status"], "invalid", "{ack}");
    assert!(
        ack["results"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tags")),
        "{ack}"
    );
    assert_eq!(ack["serverVersion"], 1);
    // A message type of a newer version: answered, and the connection stays.
    send_json(&mut ws, json!({"type": "subscribe", "rooms": ["x"]})).await;
    assert_eq!(recv_json(&mut ws).await["code"], "unknown_type");
    send_json(&mut ws, json!({"type": "ping", "ref": 4})).await;
    assert_eq!(recv_json(&mut ws).await, json!({"type": "pong", "ref": 4}));
    server.stop().await;
}

#[tokio::test]
async fn the_client_ignores_unknown_fields_and_reports_and_skips_unknown_types() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let fake = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut ws = tokio_tungstenite::accept_async(tcp).await.expect("upgrade");
        let _hello = ws.next().await;
        let frames = [
            json!({"type": "welcome", "protocol": 1, "room": "default", "serverVersion": 0,
                "compression": false, "heartbeatMs": 30000, "maxMessageSize": 1_048_576,
                "logId": "log", "region": "eu"}),
            json!({"type": "presence", "who": ["a"]}),
            json!({"type": "events", "page": 1, "events": [{"seq": 1, "at": 5,
                "event": {"id": "z", "type": "t", "data": 1, "timestamp": 5, "version": 1}}]}),
        ];
        for frame in frames {
            ws.send(Message::text(frame.to_string()))
                .await
                .expect("send");
        }
        while let Some(Ok(_)) = ws.next().await {}
    });
    let client = WebSocketSyncClient::builder(format!("ws://{addr}/ws"))
        .reconnect(false)
        .build()
        .expect("client");
    let recorder = Recorder::attach(&client);
    client.connect().await.expect("connect");
    eventually("the event after the unknown message", || {
        recorder.event_ids() == ["z"]
    })
    .await;
    let errors: Vec<String> = recorder
        .all()
        .iter()
        .filter_map(|n| match n {
            Notification::Error(e) => Some(match WsError::find(e) {
                Some(WsError::Protocol(why)) => why.clone(),
                other => format!("unexpected {other:?}"),
            }),
            _ => None,
        })
        .collect();
    assert_eq!(errors, ["unknown message type \"presence\""]);
    assert!(client.is_connected(), "the session goes on");
    client.disconnect().await.expect("disconnect");
    fake.abort();
}
