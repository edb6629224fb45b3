//! The dashboard's page and assets and the monitor feed (`/monitor`), against the composed
//! server on 127.0.0.1:0 with real HTTP and WebSocket clients. (The page itself runs in a real
//! Chromium in `cargo xtask browser`.)
#![allow(clippy::unwrap_used)] // tests may unwrap

use crate::common;

use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use ksync_server::{ApiKey, AuthConfig, MONITOR_PATH, Server};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const DASH_KEY: &str = "dashKey7f3a9c2e";
const ROOM_A_KEY: &str = "roomAKey1b2c3d4";

fn keys() -> AuthConfig {
    {
        let mut auth_config = AuthConfig::default();
        auth_config.api_keys = vec![
            ApiKey::new("dashboard", DASH_KEY),
            ApiKey::new("room-a", ROOM_A_KEY).with_rooms(vec!["a".into()]),
        ];
        auth_config
    }
}

/// Opens a WebSocket offering `protocols` (as a browser does); the socket and the
/// `Sec-WebSocket-Protocol` the server chose.
async fn connect(url: &str, protocols: &[String]) -> Result<(Ws, Option<String>), WsError> {
    let mut request = url.into_client_request().unwrap();
    if !protocols.is_empty() {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            protocols.join(", ").parse().unwrap(),
        );
    }
    let (ws, response) = tokio_tungstenite::connect_async(request).await?;
    let chosen = response
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned());
    Ok((ws, chosen))
}

/// The next message of `kind`, skipping others (stats tick every second in between); panics
/// after 10 s.
async fn recv_kind(ws: &mut Ws, kind: &str) -> Value {
    let wait = async {
        loop {
            let message = recv(ws).await;
            if message["type"] == kind {
                return message;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("a {kind} message within 10 s"))
}

/// Skips messages until a `stats` satisfies `check` (panics after 10 s).
async fn stats_until(ws: &mut Ws, check: impl Fn(&Value) -> bool) -> Value {
    let wait = async {
        loop {
            let stats = recv_kind(ws, "stats").await;
            if check(&stats) {
                return stats;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the expected stats within 10 s")
}

async fn monitor(addr: SocketAddr, protocols: &[String], recent: u64) -> Ws {
    let (mut ws, chosen) = connect(&format!("ws://{addr}{MONITOR_PATH}"), protocols)
        .await
        .unwrap();
    if !protocols.is_empty() {
        assert_eq!(chosen.as_deref(), Some("ksync.v1"));
    }
    send(
        &mut ws,
        json!({"type": "hello", "protocol": 1, "recent": recent}),
    )
    .await;
    let welcome = recv(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["feed"], "monitor");
    ws
}

async fn join_room(addr: SocketAddr, room: &str, protocols: &[String]) -> Ws {
    let (mut ws, _) = connect(&format!("ws://{addr}/ws/{room}"), protocols)
        .await
        .unwrap();
    send(&mut ws, json!({"type": "hello", "protocol": 1})).await;
    assert_eq!(recv(&mut ws).await["type"], "welcome");
    ws
}

async fn get(url: &str, accept: Option<&str>) -> reqwest::Response {
    let client = reqwest::Client::new();
    let mut request = client.get(url);
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn the_page_its_assets_and_the_client_module_are_served() {
    let running = Server::bind(config(AuthConfig::default())).await.unwrap();
    let addr = running.local_addr();

    let page = get(
        &format!("http://{addr}/"),
        Some("text/html,application/xhtml+xml,*/*;q=0.8"),
    )
    .await;
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"));
    let html = page.text().await.unwrap();
    assert!(html.contains("<title>kSync dashboard</title>"));
    assert!(html.contains("/dashboard/app.js"));

    // API clients still get the JSON description of `/`.
    let info: Value = serde_json::from_str(
        &get(&format!("http://{addr}/"), None)
            .await
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(info["name"], "ksync");

    for (path, content_type, needle) in [
        (
            "/ksync.js",
            "text/javascript",
            "export class WebSocketSyncClient",
        ),
        ("/dashboard/app.js", "text/javascript", "MonitorClient"),
        ("/dashboard/app.css", "text/css", "--accent"),
        ("/favicon.ico", "image/svg+xml", "<svg"),
    ] {
        let response = get(&format!("http://{addr}{path}"), None).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], content_type, "{path}");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        assert!(response.text().await.unwrap().contains(needle), "{path}");
    }
    // The module served is the one kept in the repository, importable from any origin (apps
    // live on their own); the dashboard's own assets stay same-origin.
    let module = get(&format!("http://{addr}/ksync.js"), None).await;
    assert_eq!(module.headers()["access-control-allow-origin"], "*");
    let app = get(&format!("http://{addr}/dashboard/app.js"), None).await;
    assert!(app.headers().get("access-control-allow-origin").is_none());
    let served = module.text().await.unwrap();
    let kept =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/ksync.js")).unwrap();
    assert_eq!(served, kept);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_monitor_pushes_stats_clients_and_stored_events() {
    let running = Server::bind(config(AuthConfig::default())).await.unwrap();
    let addr = running.local_addr();

    // History first: two events already in room "chat".
    let mut early = join_room(addr, "chat", &[]).await;
    send(
        &mut early,
        json!({"type": "publish", "ref": 1, "events": [event("h1"), event("h2")]}),
    )
    .await;
    assert_eq!(recv(&mut early).await["type"], "ack");
    drop(early);

    let mut feed = monitor(addr, &[], 1).await;
    // `recent: 1` sends the latest event of each log, then the first stats.
    let recent = recv(&mut feed).await;
    assert_eq!(recent["type"], "events");
    assert_eq!(recent["recent"], true);
    assert_eq!(recent["room"], "chat");
    assert_eq!(recent["events"][0]["seq"], 2);
    assert_eq!(recent["events"][0]["event"]["id"], "h2");
    let stats = stats_until(&mut feed, |s| s["connections"] == 0).await;
    assert_eq!(stats["rooms"][0]["name"], "chat");
    assert_eq!(stats["rooms"][0]["seq"], 2);
    assert_eq!(stats["eventsStored"], 2);

    // A client joins: the feed says so at once, then its events arrive with their room.
    let mut client = join_room(addr, "chat", &[]).await;
    let joined = recv_kind(&mut feed, "client").await;
    assert_eq!(joined["change"], "joined");
    assert_eq!(joined["client"]["room"], "chat");
    assert_eq!(joined["client"]["subject"], "anonymous");
    send(
        &mut client,
        json!({"type": "publish", "ref": 1, "events": [event("e3"), event("e4")]}),
    )
    .await;
    assert_eq!(recv(&mut client).await["type"], "ack");
    let events = recv_kind(&mut feed, "events").await;
    assert_eq!(events["room"], "chat");
    let seqs: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4]);
    let stats = stats_until(&mut feed, |s| s["eventsStored"] == 4).await;
    assert_eq!(stats["connections"], 1);
    assert_eq!(stats["clients"][0]["room"], "chat");
    assert_eq!(stats["rooms"][0]["clients"], 1);

    // Repositories: a push to a branch shows in the stats and in the tail.
    let http = reqwest::Client::new();
    let created = http
        .put(format!("http://{addr}/git/notes"))
        .header("x-ksync-protocol", "1")
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    let pushed = http
        .post(format!("http://{addr}/git/notes/branches/main/events"))
        .header("x-ksync-protocol", "1")
        .header("content-type", "application/json")
        .body(json!({"baseVersion": 0, "events": [event("n1")]}).to_string())
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success(), "{}", pushed.status());
    let from_branch = recv_kind(&mut feed, "events").await;
    assert_eq!(from_branch["repo"], "notes");
    assert_eq!(from_branch["branch"], "main");
    assert_eq!(from_branch["events"][0]["event"]["id"], "n1");
    let stats = stats_until(&mut feed, |s| s["reposTotal"] == 1).await;
    assert_eq!(
        stats["repos"],
        json!([{"name": "notes", "branches": [{"name": "main", "seq": 1}]}])
    );

    // The monitor itself is not a client of any room.
    assert_eq!(running.connections(), 1);
    drop(client);
    let left = recv_kind(&mut feed, "client").await;
    assert_eq!(left["change"], "left");
    assert_eq!(left["client"]["id"], joined["client"]["id"]);

    // Shutdown closes the feed with 1001 rather than waiting for it.
    let closing = tokio::spawn(async move {
        loop {
            match feed.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return Some(frame.code),
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    });
    running.shutdown().await.unwrap();
    assert_eq!(closing.await.unwrap(), Some(CloseCode::Away));
}

#[tokio::test]
async fn the_monitor_needs_credentials_and_shows_only_what_they_may_read() {
    let running = Server::bind(config(keys())).await.unwrap();
    let addr = running.local_addr();

    // Plain GET: who the credentials are, or 401.
    let refused = get(&format!("http://{addr}{MONITOR_PATH}"), None).await;
    assert_eq!(refused.status(), 401);
    let who: Value = serde_json::from_str(
        &reqwest::Client::new()
            .get(format!("http://{addr}{MONITOR_PATH}"))
            .header("x-api-key", DASH_KEY)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(who["subject"], "dashboard");
    assert_eq!(who["authRequired"], true);

    // Upgrades without credentials, or with a wrong key, are refused before the upgrade.
    let url = format!("ws://{addr}{MONITOR_PATH}");
    for protocols in [
        vec!["ksync.v1".to_owned()],
        vec!["ksync.v1".to_owned(), "ksync.apikey.wrongKey123".to_owned()],
    ] {
        match connect(&url, &protocols).await {
            Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
            Err(other) => panic!("expected 401, got {other}"),
            Ok(_) => panic!("expected 401, got a connection"),
        }
    }

    // The browser way: the key as a subprotocol entry; only `ksync.v1` is echoed.
    let dash = |key: &str| vec!["ksync.v1".to_owned(), format!("ksync.apikey.{key}")];
    let mut full = monitor(addr, &dash(DASH_KEY), 0).await;
    let mut limited = monitor(addr, &dash(ROOM_A_KEY), 0).await;
    stats_until(&mut full, |_| true).await;
    stats_until(&mut limited, |_| true).await;

    let mut in_b = join_room(addr, "b", &dash(DASH_KEY)).await;
    let mut in_a = join_room(addr, "a", &dash(ROOM_A_KEY)).await;
    for (ws, id) in [(&mut in_b, "in-b"), (&mut in_a, "in-a")] {
        send(
            ws,
            json!({"type": "publish", "ref": 1, "events": [event(id)]}),
        )
        .await;
        assert_eq!(recv(ws).await["type"], "ack");
    }
    // The full key sees both rooms; the room-a key only room a (events, clients and stats).
    let stats = stats_until(&mut full, |s| s["eventsStored"] == 2).await;
    assert_eq!(stats["connections"], 2);
    // Room b's events were stored (and offered to observers) before room a's, so by the time
    // room a's arrive, anything leaked from room b would have arrived too.
    let mut limited_saw = Vec::new();
    let stats = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = recv(&mut limited).await;
            match message["type"].as_str().unwrap() {
                "events" => limited_saw.push(message["room"].clone()),
                "client" => assert_eq!(message["client"]["room"], "a"),
                "stats" if !limited_saw.is_empty() => return message,
                _ => {}
            }
        }
    })
    .await
    .expect("room a's events and then stats within 10 s");
    assert_eq!(stats["eventsStored"], 1);
    assert_eq!(stats["connections"], 1);
    assert_eq!(
        stats["rooms"],
        json!([{"name": "a", "seq": 1, "clients": 1}])
    );
    assert_eq!(stats["clients"][0]["subject"], "room-a");
    assert_eq!(limited_saw, vec![json!("a")]);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_monitor_must_start_with_hello() {
    let running = Server::bind(config(AuthConfig::default())).await.unwrap();
    let addr = running.local_addr();
    let (mut ws, _) = connect(&format!("ws://{addr}{MONITOR_PATH}"), &[])
        .await
        .unwrap();
    send(&mut ws, json!({"type": "publish", "ref": 1, "events": []})).await;
    let error = recv(&mut ws).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "protocol");
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4000),
        other => panic!("expected close 4000, got {other:?}"),
    }

    let (mut ws, _) = connect(&format!("ws://{addr}{MONITOR_PATH}"), &[])
        .await
        .unwrap();
    send(&mut ws, json!({"type": "hello", "protocol": 99})).await;
    assert_eq!(recv(&mut ws).await["code"], "unsupported_protocol");
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4001),
        other => panic!("expected close 4001, got {other:?}"),
    }

    // The version is read first: a monitor of another version whose `hello` has fields this
    // one does not know (refused in a version-1 `hello`) is told the version differs.
    let (mut ws, _) = connect(&format!("ws://{addr}{MONITOR_PATH}"), &[])
        .await
        .unwrap();
    send(
        &mut ws,
        json!({"type": "hello", "protocol": 2, "rooms": ["chat"], "recent": "all"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["code"], "unsupported_protocol");
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 4001),
        other => panic!("expected close 4001, got {other:?}"),
    }
    running.shutdown().await.unwrap();
}

/// A monitor on a file-backed server never opens a log to count it: a room on disk from an
/// earlier run shows `seq: null` until a client opens it, and keeps its count after the room
/// closes again (a closed log does not change).
#[tokio::test]
async fn the_monitor_counts_file_logs_without_opening_them() {
    use ksync_core::{Event, LogName, Name, StorageProvider};
    let dir = tempfile::tempdir().unwrap();
    {
        let provider = ksync_storage_file::FileProvider::new(dir.path()).unwrap();
        let old = provider
            .open(&LogName::Room(Name::new("old").unwrap()))
            .unwrap();
        let events = (1..=3)
            .map(|i| Event::new(format!("old-{i}"), "note", json!({"i": i}), 1))
            .collect();
        old.append(events).await.unwrap();
        provider.flush_all().await.unwrap();
    }
    let config = {
        let mut server_config = config(AuthConfig::default());
        server_config.in_memory = false;
        server_config.data_dir = dir.path().to_path_buf();
        server_config
    };
    let running = Server::bind(config).await.unwrap();
    let addr = running.local_addr();
    let mut ws = monitor(addr, &[], 0).await;
    let room = |stats: &Value| {
        stats["rooms"]
            .as_array()
            .and_then(|rooms| rooms.iter().find(|r| r["name"] == "old").cloned())
    };
    // Two ticks: the monitor has looked at the room and still has not opened it.
    for _ in 0..2 {
        let stats = recv_kind(&mut ws, "stats").await;
        assert_eq!(room(&stats).unwrap()["seq"], Value::Null, "{stats}");
        assert_eq!(stats["eventsStored"], 0, "{stats}");
    }
    let client = join_room(addr, "old", &[]).await;
    stats_until(&mut ws, |s| {
        room(s).is_some_and(|r| r["seq"] == 3 && r["clients"] == 1)
    })
    .await;
    drop(client);
    // The room closes once its client has gone; its count stays known.
    let stats = stats_until(&mut ws, |s| room(s).is_some_and(|r| r["clients"] == 0)).await;
    assert_eq!(room(&stats).unwrap()["seq"], 3, "{stats}");
    assert_eq!(stats["eventsStored"], 3, "{stats}");
    running.shutdown().await.unwrap();
}

/// Keeps the runtime busy, so the paused clock never moves by itself, only by
/// `tokio::time::advance`, while the wall clock goes on.
fn hold_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    })
}

/// The wall clock passes a monitor's JWT expiry while the monotonic clock stands still (a
/// suspended host, a step of the wall clock: the feed's timers run on the monotonic clock):
/// the feed closes with 4401 by its next stats tick, not only once the timer set at the
/// upgrade is due.
#[tokio::test(start_paused = true)]
async fn a_monitor_whose_token_the_wall_clock_expired_closes_by_the_next_stats_tick() {
    use jsonwebtoken::{EncodingKey, Header, encode, get_current_timestamp};
    use ksync_server::JwtKey;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
    let _clock = hold_clock();
    let auth = {
        let mut auth_config = AuthConfig::default();
        auth_config.jwt_keys = vec![JwtKey::hs256(SECRET)];
        auth_config.leeway = Duration::ZERO;
        auth_config
    };
    let running = Server::bind(config(auth)).await.unwrap();
    let addr = running.local_addr();
    // 2 to 3 s of wall-clock time left: more than a stats tick (1 s) on the monotonic clock.
    let exp = get_current_timestamp() + 3;
    let token = encode(
        &Header::default(),
        &json!({"sub": "watcher", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut request = format!("ws://{addr}{MONITOR_PATH}")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    send(&mut ws, json!({"type": "hello", "protocol": 1})).await;
    assert_eq!(recv(&mut ws).await["type"], "welcome");
    // Wall time only, past the expiry: the virtual clock stands still.
    while get_current_timestamp() <= exp {
        tokio::task::yield_now().await;
    }
    tokio::time::advance(Duration::from_secs(1)).await;
    let waiting = std::time::Instant::now();
    let code = loop {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "the feed went on after its token expired"
        );
        match futures_util::FutureExt::now_or_never(ws.next()) {
            Some(Some(Ok(Message::Close(frame)))) => {
                break frame.map(|f| u16::from(f.code)).unwrap_or(1005);
            }
            Some(Some(Ok(_))) | None => tokio::task::yield_now().await,
            Some(other) => panic!("ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(code, 4401);
    running.shutdown().await.unwrap();
}
