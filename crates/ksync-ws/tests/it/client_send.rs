//! WebSocketSyncClient::send: what it refuses, and what it queues.

use std::sync::Arc;

use ksync_core::{
    Event, InMemoryStorage, InvalidEvent, Storage, StorageProvider, SyncClient, SyncError,
};
use ksync_ws::WebSocketSyncClient;
use serde_json::json;

fn invalid_events() -> Vec<(Event, InvalidEvent)> {
    vec![
        (Event::new("", "t", json!(1), 1), InvalidEvent::EmptyId),
        (Event::new("x", "", json!(1), 1), InvalidEvent::EmptyType),
        (
            Event::new("x", "t", json!(1), 1).with_version(0),
            InvalidEvent::ZeroVersion,
        ),
    ]
}

#[tokio::test]
async fn send_refuses_an_event_the_relay_would_refuse_and_queues_nothing() {
    // Nothing needs to listen: the event is refused before it is queued.
    let standalone = WebSocketSyncClient::new("ws://127.0.0.1:9/ws").expect("client");
    for (event, why) in invalid_events() {
        let error = standalone.send(event).await.expect_err("refused");
        assert!(
            matches!(&error, SyncError::InvalidEvent(e) if *e == why),
            "{error}"
        );
    }
    assert_eq!(standalone.outbox_len(), 0);

    // Attached to a replica: not stored either (the replica would hold what the room never
    // will).
    let storage = Arc::new(InMemoryStorage::new());
    let ksync = ksync_testkit::ksync_over(
        storage.clone(),
        WebSocketSyncClient::new("ws://127.0.0.1:9/ws").expect("client"),
    )
    .await
    .expect("ksync");
    for (event, why) in invalid_events() {
        let error = ksync.client().send(event).await.expect_err("refused");
        assert!(
            matches!(&error, SyncError::InvalidEvent(e) if *e == why),
            "{error}"
        );
    }
    assert_eq!(storage.len(), 0);
    // A valid one still goes in.
    ksync
        .client()
        .send(Event::new("ok", "t", json!(1), 1))
        .await
        .expect("queued");
    assert_eq!(storage.len(), 1);
}

use crate::common;
use common::eventually;

#[tokio::test]
async fn a_conflicting_event_the_room_holds_goes_through_the_incoming_filter() {
    // `a` syncs everything; `b` only public events. Both write revision ("x", 1): a's is
    // private and reaches the room first. b's publish gets `conflict` with a's event as
    // held: b must not take it in past its filter (it would settle the conflict with a's
    // private content and keep it).
    let server = common::start(ksync_ws::server::RelayConfig::default()).await;
    let url = server.url(Some("held"));
    let a_storage = Arc::new(InMemoryStorage::new());
    let a = ksync_testkit::ksync_over(
        a_storage.clone(),
        WebSocketSyncClient::new(&url).expect("a"),
    )
    .await
    .expect("a");
    let b_storage = Arc::new(InMemoryStorage::new());
    let b = ksync_testkit::ksync_over(
        b_storage.clone(),
        WebSocketSyncClient::builder(&url)
            .filter(ksync_core::Filter::PublicOnly)
            .build()
            .expect("b"),
    )
    .await
    .expect("b");
    a.connect().await.expect("a connects");
    a.client()
        .send(Event::new(
            "x",
            "t",
            json!({"private": true, "from": "a"}),
            2_000,
        ))
        .await
        .expect("a sends");
    eventually("a's event acknowledged", || {
        a.replica()
            .cursor(&format!("ws:{url}/acked"))
            .is_ok_and(|c| c == 1)
    })
    .await;
    let conflicts = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let conflicts = conflicts.clone();
        let _sub = b
            .on("conflict", move |n| {
                conflicts.lock().expect("lock").push(n.clone())
            })
            .expect("kind");
    }
    b.client()
        .send(Event::new("x", "t", json!({"from": "b"}), 1_000))
        .await
        .expect("b queues");
    b.connect().await.expect("b connects");
    eventually("b's publish acknowledged", || {
        b.replica()
            .cursor(&format!("ws:{url}/acked"))
            .is_ok_and(|c| c >= 1)
    })
    .await;
    let private: Vec<_> = b_storage
        .read_since(0, 100)
        .expect("read")
        .into_iter()
        .filter(|s| s.event.data.get("private").is_some())
        .collect();
    assert!(private.is_empty(), "b keeps private data: {private:?}");
    assert!(
        conflicts.lock().expect("lock").is_empty(),
        "b never saw a's revision, so it has no conflict to report"
    );
    a.disconnect().await.expect("a");
    b.disconnect().await.expect("b");
    server.stop().await;
}

#[tokio::test]
async fn a_reconnect_delay_that_cannot_grow_is_refused_at_build() {
    use std::time::Duration;
    // A zero minimum doubles to zero: a dead server would be retried in a busy loop.
    for (min, max) in [
        (Duration::ZERO, Duration::from_secs(5)),
        (Duration::from_secs(10), Duration::from_secs(1)),
    ] {
        let error = WebSocketSyncClient::builder("ws://127.0.0.1:9/ws")
            .reconnect_delay(min, max)
            .build()
            .expect_err("refused");
        assert!(matches!(error, SyncError::Config(_)), "{error}");
    }
    // Equal bounds are fine: a constant delay (with jitter).
    WebSocketSyncClient::builder("ws://127.0.0.1:9/ws")
        .reconnect_delay(Duration::from_secs(1), Duration::from_secs(1))
        .build()
        .expect("accepted");
}

#[tokio::test]
async fn credentials_that_cannot_be_sent_in_a_header_are_refused_at_build() {
    // A key with a line break (e.g. read from a file with its newline) can never be sent:
    // refused up front instead of failing every connection attempt forever.
    for auth in [
        ksync_core::Auth::api_key("key\n"),
        ksync_core::Auth::jwt("a\u{0}b"),
    ] {
        let error = WebSocketSyncClient::builder("ws://127.0.0.1:9/ws")
            .auth(auth)
            .build()
            .expect_err("refused");
        assert!(matches!(error, SyncError::Config(_)), "{error}");
        assert!(!error.to_string().contains("key\n"), "no secret in {error}");
    }
}

#[tokio::test]
async fn conflicts_acknowledged_without_their_held_revision_settle_from_the_stream() {
    // The room holds large revisions; a client that wrote the same (id, version) offline
    // publishes them in one go. The ack has room for one `held` revision only (the others
    // come without it): the client must not fail or loop on those, and settles every
    // conflict from the room's stream, so the room and the replica end with the same state.
    let max = 16 * 1024;
    let provider = Arc::new(ksync_core::InMemoryProvider::new());
    let server = common::start_with(
        {
            let mut relay_config = ksync_ws::server::RelayConfig::default();
            relay_config.max_message_size = max;
            relay_config
        },
        provider.clone(),
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let url = server.url(Some("big"));
    let ids: Vec<String> = (0..6).map(|n| format!("big{n}")).collect();
    let (mut writer, _) = common::join(&url, common::hello()).await;
    for (n, id) in ids.iter().enumerate() {
        let mut e = common::event(id, n as u64);
        e["data"] = json!("h".repeat(max - 300));
        common::send_json(&mut writer, json!({"type":"publish","ref":n,"events":[e]})).await;
        assert_eq!(
            common::recv_json(&mut writer).await["results"][0]["status"],
            "stored"
        );
    }
    let storage = Arc::new(InMemoryStorage::new());
    let b = ksync_testkit::ksync_over(
        storage.clone(),
        // Everything queued offline goes out in one publish, answered by one ack.
        WebSocketSyncClient::builder(&url)
            .strategy(ksync_ws::Strategy::EventLevel { batch_size: 100 })
            .build()
            .expect("b"),
    )
    .await
    .expect("b");
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let _sub = {
        let errors = errors.clone();
        b.on("error", move |n| {
            errors.lock().expect("lock").push(format!("{n:?}"))
        })
        .expect("kind")
    };
    for id in &ids {
        b.client()
            .send(Event::new(id.as_str(), "t", json!("mine"), 1))
            .await
            .expect("queued");
    }
    b.connect().await.expect("b connects");
    let room = provider
        .open(&ksync_core::LogName::Room(
            ksync_core::Name::new("big").expect("name"),
        ))
        .expect("room log");
    eventually("the room and the replica agree", || {
        let (ours, theirs) = (
            storage.state().expect("state"),
            room.state().expect("state"),
        );
        ids.iter()
            .all(|id| theirs.get(id).is_some_and(|e| e.version >= 2))
            && ours == theirs
    })
    .await;
    assert!(
        errors.lock().expect("lock").is_empty(),
        "{:?}",
        errors.lock().expect("lock")
    );
    b.disconnect().await.expect("b");
    server.stop().await;
}
