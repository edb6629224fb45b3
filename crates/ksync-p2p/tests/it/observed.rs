//! What a user observes of a peer besides its log: its debug logs (the spec's `debug`) and
//! its `sync` notifications.

use crate::common;

use std::sync::Arc;

use common::*;
use ksync_p2p::P2PSyncClient;
use ksync_testkit::{LogCapture, SyncRecorder};
use tracing::Level;

/// `from` broadcasts one event at a time, each published (logged) before the next, until
/// `to` has taken one in by gossip: catch-up may carry the first ones before the gossip mesh
/// forms, and only gossip logs on receipt.
async fn gossip_until_received(
    logs: &LogCapture,
    from: &P2PSyncClient,
    to: &P2PSyncClient,
    n: &mut usize,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let accepted = to.stats().accepted_messages;
    loop {
        let published = logs.count("publishing");
        from.broadcast(event(from.peer_id(), *n))
            .await
            .expect("broadcast");
        *n += 1;
        wait_until(5, "the broadcast is published", || {
            logs.count("publishing") > published
        })
        .await;
        let next = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
        while tokio::time::Instant::now() < next {
            if to.stats().accepted_messages > accepted {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no gossip from {} reached {}",
            from.peer_id(),
            to.peer_id()
        );
    }
}

/// The spec's `debug`: the peer built with `debug(true)` logs what it publishes and what gossip
/// it takes in at `debug` level; the peer without logs the same lines at `trace` only, side
/// by side in the same process.
// The default (one-thread) runtime: the subscriber below is this thread's, and the nodes'
// tasks run on it.
#[tokio::test]
async fn debug_option_turns_on_debug_logs_for_that_client() {
    let (logs, _capture) = LogCapture::install("ksync_p2p::node");

    let dir = tempfile::tempdir().expect("tempdir");
    let loud = Arc::new(
        builder(dir.path(), "loud")
            .debug(true)
            .build()
            .expect("build"),
    );
    let quiet = Arc::new(builder(dir.path(), "quiet").build().expect("build"));
    loud.start().await.expect("start");
    quiet.start().await.expect("start");
    link(&loud, &quiet).await;
    wait_mesh(&[loud.clone(), quiet.clone()]).await;

    let mut n = 0;
    let start = logs.lines().len();
    gossip_until_received(&logs, &loud, &quiet, &mut n).await;
    let middle = logs.lines().len();
    gossip_until_received(&logs, &quiet, &loud, &mut n).await;
    let lines = logs.lines();
    let levels = |range: std::ops::Range<usize>, message: &str, field: &str| {
        let mut levels: Vec<Level> = lines[range]
            .iter()
            .filter(|l| l.message == message && l.fields.contains(field))
            .map(|l| l.level)
            .collect();
        levels.dedup();
        levels
    };
    let loud_id = format!("peer={} ", loud.local_peer_id());
    let quiet_id = format!("peer={} ", quiet.local_peer_id());
    // The loud peer published, the quiet one took it in.
    assert_eq!(
        levels(start..middle, "publishing", ""),
        [Level::DEBUG],
        "{lines:#?}"
    );
    assert_eq!(
        levels(start..middle, "gossip received", &loud_id),
        [Level::TRACE],
        "{lines:#?}"
    );
    // The quiet peer published, the loud one took it in.
    let end = lines.len();
    assert_eq!(
        levels(middle..end, "publishing", ""),
        [Level::TRACE],
        "{lines:#?}"
    );
    assert_eq!(
        levels(middle..end, "gossip received", &quiet_id),
        [Level::DEBUG],
        "{lines:#?}"
    );
    loud.stop().await.expect("stop");
    quiet.stop().await.expect("stop");
}

/// `sync` is a batch taken in from another peer: the receiver is notified of the events it got,
/// the sender never of what it sent (P2P has no acknowledgement to report). The notifications
/// are read once both sends were taken in, so one for a send would be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_notifies_the_events_received_never_the_ones_sent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    let at_a = SyncRecorder::new(a.notifier());
    let at_b = SyncRecorder::new(b.notifier());
    link(&a, &b).await;
    wait_mesh(&[a.clone(), b.clone()]).await;

    let from_a = event(a.peer_id(), 0);
    a.broadcast(from_a.clone()).await.expect("broadcast");
    wait_until(10, "b has a's event", || {
        keys(&b).contains(&(from_a.id.clone(), from_a.version))
    })
    .await;
    let from_b = event(b.peer_id(), 0);
    b.broadcast(from_b.clone()).await.expect("broadcast");
    wait_until(10, "a has b's event", || {
        keys(&a).contains(&(from_b.id.clone(), from_b.version))
    })
    .await;
    assert_eq!(at_b.ids(), [from_a.id.as_str()]);
    assert_eq!(at_a.ids(), [from_b.id.as_str()]);
    a.stop().await.expect("stop");
    b.stop().await.expect("stop");
}
