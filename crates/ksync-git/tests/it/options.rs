//! The spec's client options as a user sees them, checked on the requests a real service gets:
//! `compression` (gzip both ways unless turned off) and `pullInterval` (off unless set); and in
//! the logs: `debug`.

use crate::common;

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

/// The spec's `debug`: the client built with `debug(true)` logs its requests, answers, pushes
/// and pulls at `debug` level; the one without logs the same lines at `trace` only, side by
/// side in the same process.
#[tokio::test]
async fn debug_option_turns_on_debug_logs_for_that_client() {
    use tracing::Level;

    let (server, _) = start_recording(&["loud", "quiet"]).await;
    let (logs, _capture) = ksync_testkit::LogCapture::install("ksync_git::client");
    for (repo, debug) in [("loud", true), ("quiet", false)] {
        let c = GitSyncClient::builder(server.repo_url(repo))
            .auth(Auth::token("writer"))
            .debug(debug)
            .build()
            .expect("client");
        c.send(Event::new("a", "note", json!(1), 1))
            .await
            .expect("send");
        c.push().await.expect("push");
        c.pull().await.expect("pull");
    }
    let lines = logs.lines();
    let at = |level: Level, message: &str, repo: &str| {
        lines
            .iter()
            .filter(|l| l.level == level && l.message == message && l.fields.contains(repo))
            .count()
    };
    for message in ["request", "answer"] {
        assert!(at(Level::DEBUG, message, "/git/loud/") > 0, "{lines:#?}");
        assert_eq!(at(Level::DEBUG, message, "/git/quiet/"), 0, "{lines:#?}");
        assert!(at(Level::TRACE, message, "/git/quiet/") > 0, "{lines:#?}");
        assert_eq!(at(Level::TRACE, message, "/git/loud/"), 0, "{lines:#?}");
    }
    // One push and one pull each (these lines name the branch, not the URL).
    for message in ["pushed", "pulled"] {
        assert_eq!(at(Level::DEBUG, message, ""), 1, "{lines:#?}");
        assert_eq!(at(Level::TRACE, message, ""), 1, "{lines:#?}");
    }
}

/// The spec's `pullInterval` (default 0: off). A client built without it, attached to a
/// replica as `KSync` does and pulled once, sends no pull of its own while another replica's
/// event waits on the server, for several times the period that the client with one set
/// needs to fetch it. Absence is counted on the server, not raced.
#[tokio::test]
async fn without_pull_interval_the_client_never_pulls_by_itself() {
    use std::sync::Arc;

    use ksync_core::{InMemoryStorage, KSync};

    const PERIOD: Duration = Duration::from_millis(100);
    let (server, requests) = start_recording(&["idle", "ticking"]).await;
    let open = |client: GitSyncClient| async move {
        ksync_testkit::ksync_over(Arc::new(InMemoryStorage::new()), client)
            .await
            .expect("ksync")
    };
    let idle = open(client_with(&server.repo_url("idle"), None)).await;
    // A pull would start auto-pull were an interval set: it must not here.
    idle.pull().await.expect("first pull");
    let pulls_of = |repo: &str| {
        requests_to(
            &requests,
            "GET",
            &format!("/git/{repo}/branches/main/events"),
        )
        .len()
    };
    let idle_pulls = pulls_of("idle");
    assert_eq!(idle_pulls, 1);

    let waiting = std::time::Instant::now();
    for repo in ["idle", "ticking"] {
        let writer = client_with(&server.repo_url(repo), None);
        writer
            .send(Event::new("later", "note", json!(repo), 1))
            .await
            .expect("send");
        writer.push().await.expect("push");
    }
    let ticking = open(
        GitSyncClient::builder(server.repo_url("ticking"))
            .auth(Auth::token("writer"))
            .pull_interval(PERIOD)
            .build()
            .expect("client"),
    )
    .await;
    let has_later = |k: &KSync<GitSyncClient>| k.state().expect("state").contains_key("later");
    // With the interval set it comes on its own (the first auto-pull is a period after the
    // attach).
    let deadline = waiting + Duration::from_millis(1500);
    while !has_later(&ticking) {
        assert!(
            std::time::Instant::now() < deadline,
            "auto-pull never brought it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pulls_of("ticking") >= 1);
    // Five periods at least since the event was there to pull.
    let quiet_for = 5 * PERIOD;
    if let Some(left) = quiet_for.checked_sub(waiting.elapsed()) {
        tokio::time::sleep(left).await;
    }
    assert_eq!(pulls_of("idle"), idle_pulls, "no pull of its own");
    assert!(!has_later(&idle));
    // It was there to get all along.
    idle.pull().await.expect("pull");
    assert!(has_later(&idle));
}

/// A zero connect or request timeout fails every request (the user saw only timeouts, one
/// per pull), and the other transports' builders refuse it: `build` refuses it too, naming
/// the option, as it does a timeout past a day.
#[tokio::test]
async fn timeouts_that_cannot_work_are_refused_at_build() {
    let server = common::start(&["t"]).await;
    let url = server.repo_url("t");
    let day_and_a_second = Duration::from_secs(24 * 60 * 60 + 1);
    for (field, zero, long) in [
        (
            "request_timeout",
            GitSyncClient::builder(&url).request_timeout(Duration::ZERO),
            GitSyncClient::builder(&url).request_timeout(day_and_a_second),
        ),
        (
            "connect_timeout",
            GitSyncClient::builder(&url).connect_timeout(Duration::ZERO),
            GitSyncClient::builder(&url).connect_timeout(day_and_a_second),
        ),
    ] {
        for builder in [zero, long] {
            match builder.build() {
                Err(ksync_core::SyncError::Config(message)) => {
                    assert!(message.contains(field), "{message}")
                }
                Err(other) => panic!("{field}: {other}"),
                Ok(client) => {
                    let pulled = client.pull().await;
                    panic!("{field} accepted; a pull then gave {pulled:?}");
                }
            }
        }
    }
    // The bounds themselves are taken.
    GitSyncClient::builder(&url)
        .request_timeout(Duration::from_secs(24 * 60 * 60))
        .connect_timeout(Duration::from_nanos(1))
        .build()
        .expect("a day and a nanosecond are within the bounds");
}
