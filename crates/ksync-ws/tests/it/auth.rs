//! Auth refusals: before the upgrade with 401/403, and per publish for read-only grants.
//! Nothing refused is stored.

use crate::common;

use std::sync::Arc;

use common::*;
use ksync_core::{Auth, InMemoryProvider, LogName, Name, StorageProvider, SyncClient, SyncError};
use ksync_ws::server::RelayConfig;
use ksync_ws::{WebSocketSyncClient, WsError};
use serde_json::json;

async fn keyed() -> (Server, Arc<InMemoryProvider>) {
    let provider = Arc::new(InMemoryProvider::new());
    let server = start_with(RelayConfig::default(), provider.clone(), Arc::new(TestKeys)).await;
    (server, provider)
}

fn stored(provider: &InMemoryProvider, room: &str) -> u64 {
    provider
        .existing(&LogName::Room(Name::new(room).expect("name")))
        .expect("provider")
        .map_or(0, |s| s.len())
}

#[tokio::test]
async fn missing_and_wrong_credentials_get_401() {
    let (server, provider) = keyed().await;
    let url = server.url(Some("a"));
    assert_eq!(raw_connect(&url, &[]).await.err(), Some(401));
    assert_eq!(
        raw_connect(&url, &[("x-api-key", "nope")]).await.err(),
        Some(401)
    );
    assert_eq!(
        raw_connect(&url, &[("authorization", "Bearer some.jwt.token")])
            .await
            .err(),
        Some(401)
    );
    assert_eq!(server.relay.connections(), 0);
    assert_eq!(stored(&provider, "a"), 0);
    server.stop().await;
}

#[tokio::test]
async fn wrong_room_gets_403() {
    let (server, _) = keyed().await;
    assert_eq!(
        raw_connect(&server.url(Some("b")), &[("x-api-key", "room-a-key")])
            .await
            .err(),
        Some(403)
    );
    assert!(
        raw_connect(&server.url(Some("a")), &[("x-api-key", "room-a-key")])
            .await
            .is_ok()
    );
    server.stop().await;
}

#[tokio::test]
async fn read_only_grant_can_receive_but_publishing_is_refused_and_not_stored() {
    let (server, provider) = keyed().await;
    let url = server.url(Some("r"));
    let mut ro = raw_connect(&url, &[("x-api-key", "ro-key")])
        .await
        .expect("read allowed");
    send_json(&mut ro, hello()).await;
    assert_eq!(recv_json(&mut ro).await["type"], "welcome");
    send_json(
        &mut ro,
        json!({"type":"publish","ref":5,"events":[event("x",1)]}),
    )
    .await;
    let error = recv_json(&mut ro).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "forbidden");
    assert_eq!(error["ref"], 5);
    assert_eq!(stored(&provider, "r"), 0);
    // It still receives what writers publish.
    let mut rw = raw_connect(&url, &[("x-api-key", "rw-key")])
        .await
        .expect("rw");
    send_json(&mut rw, hello()).await;
    recv_json(&mut rw).await;
    send_json(
        &mut rw,
        json!({"type":"publish","ref":1,"events":[event("y",1)]}),
    )
    .await;
    let got = recv_json(&mut ro).await;
    assert_eq!(got["events"][0]["event"]["id"], "y");
    assert_eq!(stored(&provider, "r"), 1);
    server.stop().await;
}

#[tokio::test]
async fn browser_credentials_in_the_subprotocol_header_and_only_ksync_v1_is_echoed() {
    let server = start_with(
        RelayConfig::default(),
        Arc::new(InMemoryProvider::new()),
        Arc::new(TestTokens),
    )
    .await;
    let url = server.url(None);
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            url.as_str(),
        )
        .expect("request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "ksync.v1, ksync.auth.good-token".parse().expect("header"),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("accepted");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().expect("ascii")),
        Some("ksync.v1")
    );
    send_json(&mut ws, hello()).await;
    assert_eq!(recv_json(&mut ws).await["type"], "welcome");
    let mut bad = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .expect("request");
    // Without `ksync.v1` on offer, a refusal is the HTTP status.
    let mut without_v1 = bad.clone();
    without_v1.headers_mut().insert(
        "sec-websocket-protocol",
        "ksync.auth.bad-token".parse().expect("header"),
    );
    match tokio_tungstenite::connect_async(without_v1).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    // With it (a browser, which cannot read that status), the refusal comes in-band: an
    // `error`, then close 4401.
    bad.headers_mut().insert(
        "sec-websocket-protocol",
        "ksync.v1, ksync.auth.bad-token".parse().expect("header"),
    );
    let (mut refused, _) = tokio_tungstenite::connect_async(bad)
        .await
        .expect("upgraded to be told why");
    let error = recv_json(&mut refused).await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "unauthorized", "{error}");
    match futures_util::StreamExt::next(&mut refused).await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 4401);
        }
        other => panic!("expected close 4401, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn client_with_bad_credentials_fails_fast_and_does_not_retry() {
    let (server, _) = keyed().await;
    let client = WebSocketSyncClient::builder(server.url(Some("a")))
        .auth(Auth::api_key("wrong"))
        .reconnect(true)
        .build()
        .expect("client");
    let mut notes = client.notifications();
    let error = client.connect().await.expect_err("refused");
    match WsError::find(&error) {
        Some(WsError::Refused { status: 401, .. }) => {}
        other => panic!("expected a 401 refusal, got {other:?} ({error})"),
    }
    // The refusal is reported as an error notification and no reconnect is attempted.
    let mut saw_error = false;
    while let Ok(Ok(n)) =
        tokio::time::timeout(std::time::Duration::from_millis(300), notes.recv()).await
    {
        match n {
            ksync_core::Notification::Error(e) => {
                saw_error = true;
                assert!(matches!(&*e, SyncError::Transport(_)));
                assert!(!e.to_string().contains("wrong"), "secret leaked: {e}");
            }
            ksync_core::Notification::Reconnecting { .. } => panic!("must not retry a 401"),
            _ => {}
        }
    }
    assert!(saw_error);
    assert!(!client.is_connected());
    // With the right key (jwt refused by this server, API key accepted) it connects.
    let ok = WebSocketSyncClient::builder(server.url(Some("a")))
        .auth(Auth::api_key("room-a-key"))
        .build()
        .expect("client");
    ok.connect().await.expect("connects");
    ok.disconnect().await.expect("disconnect");
    server.stop().await;
}

/// In-band refusals hold an upgraded socket for a while each: at most
/// `max_in_band_refusals` at once. Past that the refusal is the HTTP status; a slot frees
/// once its refusal is over.
#[tokio::test]
async fn in_band_refusals_are_bounded() {
    let config = {
        let mut relay_config = RelayConfig::default();
        relay_config.max_in_band_refusals = 2;
        relay_config
    };
    let server = start_with(
        config,
        Arc::new(InMemoryProvider::new()),
        Arc::new(TestKeys),
    )
    .await;
    let url = server.url(Some("a"));
    let request = || {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                url.as_str(),
            )
            .expect("request");
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "ksync.v1, ksync.auth.bad-token".parse().expect("header"),
        );
        request
    };
    // Two refusals in progress: told in-band, and held (these clients do not answer the close).
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut refused, _) = tokio_tungstenite::connect_async(request())
            .await
            .expect("upgraded to be told why");
        assert_eq!(recv_json(&mut refused).await["code"], "unauthorized");
        held.push(refused);
    }
    match tokio_tungstenite::connect_async(request()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected a plain 401, got {other:?}"),
    }
    // One answers its close: its refusal is over, and the next is in-band again.
    let mut done = held.pop().expect("held");
    futures_util::SinkExt::close(&mut done)
        .await
        .expect("close");
    while futures_util::StreamExt::next(&mut done).await.is_some() {}
    let mut again = None;
    for _ in 0..100 {
        match tokio_tungstenite::connect_async(request()).await {
            Ok((ws, _)) => {
                again = Some(ws);
                break;
            }
            // The slot is freed when the refusal's task ends, just after the close.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    let mut again = again.expect("in-band again once a slot is free");
    assert_eq!(recv_json(&mut again).await["code"], "unauthorized");
    server.stop().await;
}
