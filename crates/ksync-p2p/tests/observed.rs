//! What a user observes of a peer besides its log: its debug logs (the spec's `debug`) and
//! its `sync` notifications.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use ksync_p2p::P2PSyncClient;
use tracing::Level;

/// Records the events of target `ksync_p2p::node` (level, message, other fields), whatever
/// their level.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<Line>>>);

#[derive(Debug, Clone)]
struct Line {
    level: Level,
    message: String,
    fields: String,
}

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.fields
                .push_str(&format!("{}={value:?} ", field.name()));
        }
    }
}

impl tracing::Subscriber for Logs {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "ksync_p2p::node"
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = Line {
            level: *event.metadata().level(),
            message: String::new(),
            fields: String::new(),
        };
        event.record(&mut line);
        self.0.lock().expect("lock").push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl Logs {
    fn lines(&self) -> Vec<Line> {
        self.0.lock().expect("lock").clone()
    }

    fn count(&self, message: &str) -> usize {
        self.lines().iter().filter(|l| l.message == message).count()
    }
}

/// `from` broadcasts one event at a time, each published (logged) before the next, until
/// `to` has taken one in by gossip: catch-up may carry the first ones before the gossip mesh
/// forms, and only gossip logs on receipt.
async fn gossip_until_received(
    logs: &Logs,
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
    let logs = Logs::default();
    let _guard = tracing::subscriber::set_default(logs.clone());
    // tracing caches per call site whether anyone wants it. With a single dispatcher
    // registered it asks only the thread that reaches the call site first: another test's
    // thread (no subscriber) would have the `trace` lines cached as unwanted everywhere. A
    // second one, never made a default, makes it ask every registered dispatcher.
    let _second = tracing::Dispatch::new(logs.clone());

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
    use ksync_core::{Notification, NotificationKind, Subscription};

    type Batches = Arc<Mutex<Vec<Vec<String>>>>;
    fn synced(client: &P2PSyncClient) -> (Batches, Subscription) {
        let batches = Batches::default();
        let seen = Arc::clone(&batches);
        let sub = client.notifier().on_kind(NotificationKind::Sync, move |n| {
            if let Notification::Sync(events) = n {
                let ids = events.iter().map(|e| e.id.clone()).collect();
                seen.lock().expect("lock").push(ids);
            }
        });
        (batches, sub)
    }
    let flat = |batches: &Batches| batches.lock().expect("lock").concat();

    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    let (at_a, _sub_a) = synced(&a);
    let (at_b, _sub_b) = synced(&b);
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
    assert_eq!(flat(&at_b), [from_a.id.as_str()]);
    assert_eq!(flat(&at_a), [from_b.id.as_str()]);
    a.stop().await.expect("stop");
    b.stop().await.expect("stop");
}
