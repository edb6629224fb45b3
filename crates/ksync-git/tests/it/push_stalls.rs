//! Pushes that used to stall for good: the same batch sent again at every push, and nothing
//! after it ever pushed.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use ksync_core::{Direction, Event, InMemoryProvider, PullPushClient, SyncClient};
use ksync_git::server::GitServerConfig;
use ksync_git::{GitError, GitSyncClient};
use ksync_testkit::ErrorRecorder;
use serde_json::{Value, json};

use common::{branch_events, client, start, start_with};

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

/// Gives `c` an outgoing middleware that doubles string `data` (so a 5 MiB event becomes an
/// invalid 10 MiB one), and records its error notifications.
fn doubling_strings_and_recording_errors(c: &GitSyncClient) -> ErrorRecorder {
    c.use_middleware(Direction::Outgoing, |mut event: Event| {
        if let Value::String(text) = &event.data {
            event.data = Value::String(text.repeat(2));
        }
        Some(event)
    });
    ErrorRecorder::new(c.notifier())
}

/// A service whose decoded bodies in flight may take 32 MiB: two 1.5 MB `[0,0,...]` events
/// (a decoded bound of about 51 MB) are too much in one push batch, each alone fits.
async fn service_with_32_mib_of_body_memory() -> common::Server {
    start_with(
        Arc::new(InMemoryProvider::new()),
        {
            let mut git_config = GitServerConfig::default();
            git_config.body_memory_bytes = 32 << 20;
            git_config
        },
        &["r"],
    )
    .await
}

/// Outgoing middleware that makes an event break the event rules (here: `data` doubled past
/// `MAX_EVENT_JSON_BYTES`, as the shipped `Encrypt` does to a 6.5 MB event) used to make the
/// service refuse the whole batch with 400 `invalid_event` at every push. The client checks
/// the shaped event, reports it (naming the event and the rule) and rejects it, and the
/// events after it are pushed; the next push does not send it again.
#[tokio::test]
async fn an_event_middleware_made_invalid_is_rejected_and_does_not_hold_back_the_rest() {
    let server = start(&["r"]).await;
    let c = client(&server.repo_url("r"));
    let errors = doubling_strings_and_recording_errors(&c);
    // 5 MiB: valid as made, 10 MiB once doubled (the limit is 8 MiB).
    c.send(Event::new("big", "t", json!("x".repeat(5 << 20)), 1))
        .await
        .expect("send");
    c.send(Event::new("small", "t", json!("y"), 1))
        .await
        .expect("send");

    let pushed = c.push().await.expect("push");
    assert_eq!(ids(&pushed.pushed_events), ["small"]);
    assert_eq!(ids(&pushed.rejected_events), ["big"]);
    let on_service = branch_events(&server, "r", "main");
    assert_eq!(ids(&on_service), ["small"]);
    assert_eq!(on_service[0].data, json!("yy"), "pushed as shaped");
    // Reported, naming the event and the rule (notifications come from a task: wait for it).
    for _ in 0..200 {
        if !errors.messages().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let reported = errors.messages();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(
        reported[0].contains("\"big\"") && reported[0].contains("the limit is"),
        "{reported:?}"
    );

    // Not sent again.
    let again = c.push().await.expect("push");
    assert!(again.pushed_events.is_empty() && again.rejected_events.is_empty());
    assert_eq!(c.local_status().expect("status").pending_events, 0);
    assert!(
        c.replica().storage().latest("big").expect("read").is_some(),
        "kept locally"
    );
}

/// A batch of several events answered 413 (the service's body-memory budget: two 1.5 MB
/// `[0,0,...]` events decode to a bound of about 51 MB, over a 32 MiB budget, though each
/// alone fits) used to fail the push, and the same batch went at every push. The client sends
/// it again in smaller batches, and both events arrive.
#[tokio::test]
async fn a_batch_answered_413_is_sent_again_in_smaller_batches() {
    let server = service_with_32_mib_of_body_memory().await;
    let c = client(&server.repo_url("r"));
    let zeros = json!(vec![0u8; 750_000]);
    c.send(Event::new("first", "t", zeros.clone(), 1))
        .await
        .expect("send");
    c.send(Event::new("second", "t", zeros, 1))
        .await
        .expect("send");
    c.send(Event::new("third", "t", json!(3), 1))
        .await
        .expect("send");

    let pushed = match c.push().await {
        Ok(pushed) => pushed,
        Err(e) => panic!(
            "push failed ({:?}): {e}",
            GitError::of(&e).and_then(GitError::status)
        ),
    };
    assert_eq!(ids(&pushed.pushed_events), ["first", "second", "third"]);
    assert!(pushed.rejected_events.is_empty());
    assert_eq!(
        ids(&branch_events(&server, "r", "main")),
        ["first", "second", "third"]
    );
    assert_eq!(c.local_status().expect("status").pending_events, 0);
}

/// Both at once: a batch holding an event the middleware made invalid, answered 413 and read
/// again in halves. The invalid event is rejected and reported once, not once per reading.
#[tokio::test]
async fn an_invalid_event_in_a_batch_answered_413_is_rejected_once() {
    let server = service_with_32_mib_of_body_memory().await;
    let c = client(&server.repo_url("r"));
    let errors = doubling_strings_and_recording_errors(&c);
    let zeros = json!(vec![0u8; 750_000]);
    c.send(Event::new("first", "t", zeros.clone(), 1))
        .await
        .expect("send");
    c.send(Event::new("big", "t", json!("x".repeat(5 << 20)), 1))
        .await
        .expect("send");
    c.send(Event::new("second", "t", zeros, 1))
        .await
        .expect("send");

    let pushed = c.push().await.expect("push");
    assert_eq!(ids(&pushed.pushed_events), ["first", "second"]);
    assert_eq!(ids(&pushed.rejected_events), ["big"]);
    // Notifications come from a task: give a second report the time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reported = errors.messages();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(reported[0].contains("\"big\""), "{reported:?}");
}
