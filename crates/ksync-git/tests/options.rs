//! The spec's client options as a user sees them, checked on the requests a real service gets:
//! `compression` (gzip both ways unless turned off).

mod common;

use std::io::Read;
use std::time::Duration;

use ksync_core::{Auth, Event, PullPushClient, SyncClient};
use ksync_git::GitSyncClient;
use serde_json::json;

use common::{branch_events, requests_to, start_recording};

/// A client as `writer`; `compression: None` leaves the option at its default.
fn client_with(url: &str, compression: Option<bool>) -> GitSyncClient {
    let mut builder = GitSyncClient::builder(url)
        .auth(Auth::token("writer"))
        .request_timeout(Duration::from_secs(10));
    if let Some(on) = compression {
        builder = builder.compression(on);
    }
    builder.build().expect("client")
}

/// Events whose push body is well past the 1 KiB from which bodies are compressed.
fn large_batch(prefix: &str) -> Vec<Event> {
    (0..40)
        .map(|i| {
            Event::new(
                format!("{prefix}{i}"),
                "note",
                json!({"text": "lorem ipsum ".repeat(20), "i": i}),
                1,
            )
        })
        .collect()
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut plain)
        .expect("valid gzip");
    plain
}

/// The ids of a push request's JSON body.
fn pushed_ids(json: &[u8]) -> Vec<String> {
    let body: serde_json::Value = serde_json::from_slice(json).expect("a JSON push body");
    body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect()
}

fn ids_and_data(events: &[Event]) -> Vec<(String, serde_json::Value)> {
    events
        .iter()
        .map(|e| (e.id.clone(), e.data.clone()))
        .collect()
}

/// The spec's `compression` (default true): a large push goes out gzipped and pulls ask for
/// gzip, which the service then sends and the client decodes; with `compression(false)`
/// bodies go and come back plain. Either way the events arrive intact.
#[tokio::test]
async fn compression_gzips_requests_and_accepts_gzip_answers_by_default_and_not_when_off() {
    let (server, requests) = start_recording(&["zipped", "plain"]).await;
    for (repo, compression) in [("zipped", None), ("plain", Some(false))] {
        let url = server.repo_url(repo);
        let writer = client_with(&url, compression);
        let events = large_batch(repo);
        for event in &events {
            writer.send(event.clone()).await.expect("send");
        }
        let pushed = writer.push().await.expect("push");
        assert_eq!(pushed.pushed_events.len(), events.len(), "{repo}");
        assert_eq!(
            ids_and_data(&branch_events(&server, repo, "main")),
            ids_and_data(&events),
            "{repo}: stored as sent"
        );
        let reader = client_with(&url, compression);
        let pulled = reader.pull().await.expect("pull");
        assert_eq!(
            ids_and_data(&pulled.new_events),
            ids_and_data(&events),
            "{repo}: pulled intact"
        );

        let path = format!("/git/{repo}/branches/main/events");
        let pushes = requests_to(&requests, "POST", &path);
        let pulls = requests_to(&requests, "GET", &path);
        assert!(!pushes.is_empty() && !pulls.is_empty(), "{repo}");
        let sent: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let mut bodies = Vec::new();
        for push in &pushes {
            assert_eq!(push.status, 200, "{repo}");
            if compression.is_none() {
                assert_eq!(push.content_encoding.as_deref(), Some("gzip"), "{repo}");
                assert!(is_gzip(&push.body), "{repo}: the body is gzip");
                let plain = gunzip(&push.body);
                assert!(push.body.len() < plain.len(), "{repo}: smaller gzipped");
                bodies.extend(pushed_ids(&plain));
            } else {
                assert_eq!(push.content_encoding, None, "{repo}");
                bodies.extend(pushed_ids(&push.body));
            }
        }
        assert_eq!(bodies, sent, "{repo}: the push bodies held the events");
        for pull in &pulls {
            let asks_gzip = pull
                .accept_encoding
                .as_deref()
                .is_some_and(|v| v.contains("gzip"));
            assert_eq!(asks_gzip, compression.is_none(), "{repo}: {pull:?}");
        }
        // The reader's pull (the last) brought every event: large enough to come gzipped
        // when asked for it.
        let answer = pulls.last().expect("the reader's pull");
        let expected = compression.is_none().then_some("gzip");
        assert_eq!(answer.response_encoding.as_deref(), expected, "{repo}");
    }
}
