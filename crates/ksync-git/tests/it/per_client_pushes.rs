//! `GitServerConfig::max_pushes_per_client`: one client (its credentials' subject) cannot
//! take every push in flight; another client still pushes, and a place frees once a push
//! is answered.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::InMemoryProvider;
use ksync_git::server::GitServerConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn push_body(id: &str) -> String {
    json!({"baseVersion": 0, "events": [{"id": id, "type": "t", "data": {}, "timestamp": 1, "version": 1}]})
        .to_string()
}

/// Reads from `tcp` until `needle` has arrived; everything read.
async fn read_until(tcp: &mut tokio::net::TcpStream, needle: &str) -> String {
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&read).contains(needle) {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buffer))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&read));
        read.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&read).into_owned()
}

#[tokio::test]
async fn a_client_past_its_pushes_in_flight_gets_429_while_another_pushes() {
    let server = start_with(
        Arc::new(InMemoryProvider::new()),
        {
            let mut git_config = GitServerConfig::default();
            git_config.max_pushes_per_client = 1;
            git_config
        },
        &["r", "team"],
    )
    .await;
    // `writer`'s first push, held in flight: its headers are in, its body is not. The
    // service asks for the body (100 Continue) only once the handler reads it, after the
    // push took its place.
    let body = push_body("held");
    let mut held = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /git/r/branches/main/events HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer writer\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        server.addr,
        body.len()
    );
    held.write_all(head.as_bytes()).await.expect("write");
    read_until(&mut held, "100 Continue").await;

    // The same subject again: refused before its body is read, with a Retry-After.
    let refused = http()
        .post(server.url("/git/r/branches/main/events"))
        .header("authorization", "Bearer writer")
        .header("content-type", "application/json")
        .body(push_body("refused"))
        .send()
        .await
        .expect("send");
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let answer: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(
        answer,
        json!({"error": {"code": "too_many_pushes",
            "message": "too many pushes in flight for this client (at most 1)"}})
    );

    // The same subject from another machine is another client (a key shared by every copy
    // of an app is not one client): it pushes meanwhile.
    let elsewhere = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().expect("address"))
        .build()
        .expect("client");
    let (status, _) = call_as(
        "writer",
        elsewhere
            .post(server.url("/git/r/branches/main/events"))
            .header("content-type", "application/json")
            .body(push_body("elsewhere")),
    )
    .await;
    assert_eq!(status, 200);

    // Another client pushes meanwhile.
    let (status, _) = call_as(
        "scoped",
        http()
            .post(server.url("/git/team/branches/main/events"))
            .header("content-type", "application/json")
            .body(push_body("other")),
    )
    .await;
    assert_eq!(status, 200);

    // The held push completes; its place is free again.
    held.write_all(body.as_bytes()).await.expect("write body");
    let answer = read_until(&mut held, "}").await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    let (status, _) = call(
        http()
            .post(server.url("/git/r/branches/main/events"))
            .header("content-type", "application/json")
            .body(push_body("after")),
    )
    .await;
    assert_eq!(status, 200);

    // Nothing of the refused push was stored.
    let ids: Vec<String> = branch_events(&server, "r", "main")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["elsewhere", "held", "after"]);
}

/// Sends a request with the bearer `token`; the status and the JSON body.
async fn call_as(token: &str, req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let response = req
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

/// `GitServerConfig::max_merges_per_client`: one client's merges and branch creations in
/// flight, together, are capped: past it both get 429 `too_many_merges` before their body is
/// read, while another client merges; the place frees once the held merge is answered.
/// Before, one client's merges and forks (each waiting its turn behind the others) could
/// hold every repository request place of `ksync serve`.
#[tokio::test]
async fn a_client_past_its_merges_in_flight_gets_429_while_another_merges() {
    let config = {
        let mut git_config = GitServerConfig::default();
        git_config.max_merges_per_client = 1;
        git_config
    };
    let server = start_with(Arc::new(InMemoryProvider::new()), config, &["r", "team"]).await;
    for repo in ["r", "team"] {
        let (status, _) = call(
            http()
                .post(server.url(&format!("/git/{repo}/branches")))
                .json(&json!({"name": "b"})),
        )
        .await;
        assert_eq!(status, 201);
    }
    // `writer`'s merge, held in flight: its headers are in, its body is not.
    let body = json!({"into": "main", "from": "b"}).to_string();
    let mut held = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /git/r/merge HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer writer\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        server.addr,
        body.len()
    );
    held.write_all(head.as_bytes()).await.expect("write");
    read_until(&mut held, "100 Continue").await;

    // The same client's next merge and branch creation: refused, with a Retry-After.
    let expected = json!({"error": {"code": "too_many_merges",
        "message": "too many merges and branch creations in flight for this client (at most 1)"}});
    for (path, request) in [
        ("/git/r/merge", json!({"into": "main", "from": "b"})),
        ("/git/r/branches", json!({"name": "c"})),
    ] {
        let refused = http()
            .post(server.url(path))
            .header("authorization", "Bearer writer")
            .json(&request)
            .send()
            .await
            .expect("send");
        assert_eq!(refused.status().as_u16(), 429, "{path}");
        assert_eq!(
            refused
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert_eq!(
            refused.json::<serde_json::Value>().await.expect("json"),
            expected
        );
    }
    // Nothing of the refused creation was made.
    let (status, _) = call(http().get(server.url("/git/r/branches/c"))).await;
    assert_eq!(status, 404);

    // Another client merges meanwhile.
    let (status, _) = call_as(
        "scoped",
        http()
            .post(server.url("/git/team/merge"))
            .json(&json!({"into": "main", "from": "b"})),
    )
    .await;
    assert_eq!(status, 200);

    // The held merge completes; its place is free again.
    held.write_all(body.as_bytes()).await.expect("write body");
    let answer = read_until(&mut held, "}").await;
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    let (status, _) = call(
        http()
            .post(server.url("/git/r/branches"))
            .json(&json!({"name": "c"})),
    )
    .await;
    assert_eq!(status, 201);
}
