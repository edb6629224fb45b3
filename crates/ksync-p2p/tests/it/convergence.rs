//! Convergence across a partition with conflicting edits, and a restart from a log file.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ksync_core::{Event, Replica, Storage};
use ksync_p2p::P2PSyncClient;
use serde_json::json;

/// The latest revision of every id, without `origin` (provenance, not content).
fn state(p: &P2PSyncClient) -> Vec<(String, u64, String, serde_json::Value)> {
    p.replica()
        .storage()
        .state()
        .expect("state")
        .into_values()
        .map(|e| (e.id, e.version, e.event_type, e.data))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_peers_with_conflicting_edits_converge_once_they_meet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    let c = peer(dir.path(), "c").await;
    let counters: Vec<EventCounter> = [&a, &b, &c].iter().map(|p| EventCounter::new(p)).collect();
    link(&a, &b).await;
    // Both sides of the partition write the same revisions with other content.
    for n in 0..5 {
        let doc = |who: &str| {
            Event::new(format!("doc-{n}"), "edit", json!({"by": who}), 1_000 + n).with_origin(who)
        };
        a.broadcast(doc("a")).await.expect("broadcast");
        c.broadcast(doc("c")).await.expect("broadcast");
        b.broadcast(event("b", n as usize))
            .await
            .expect("broadcast");
        c.broadcast(event("c", n as usize))
            .await
            .expect("broadcast");
    }
    wait_until(10, "a and b agree", || {
        keys(&a).len() == 10 && keys(&a) == keys(&b)
    })
    .await;
    link(&c, &b).await;
    let all = [Arc::clone(&a), Arc::clone(&b), Arc::clone(&c)];
    wait_until(20, "all three hold the same state", || {
        let s = state(&a);
        s.len() == 15 && all.iter().all(|p| state(p) == s && keys(p) == keys(&a))
    })
    .await;
    // Settled, not still settling: more rounds write nothing new.
    let settled = keys(&a);
    for _ in 0..3 {
        for p in &all {
            p.sync_now().await.expect("sync");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for p in &all {
        assert_eq!(keys(p), settled, "{} kept writing", p.peer_id());
    }
    for (p, counter) in all.iter().zip(&counters) {
        assert!(
            counter.all_once(),
            "{} was told of an event twice",
            p.peer_id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_restarted_on_its_log_file_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.log");
    let b = peer(dir.path(), "b").await;
    let start_a = || async {
        let storage: Arc<dyn Storage> =
            Arc::new(ksync_storage_file::FileStorage::open(&path).expect("open the log"));
        let replica = Replica::open(storage).await.expect("replica");
        let a = Arc::new(
            builder(dir.path(), "a")
                .replica(replica)
                .build()
                .expect("build"),
        );
        a.start().await.expect("start");
        a
    };
    let a = start_a().await;
    link(&a, &b).await;
    for n in 0..20 {
        b.broadcast(event("b", n)).await.expect("broadcast");
    }
    a.broadcast(event("a", 0)).await.expect("broadcast");
    wait_until(10, "a has b's events", || keys(&a).len() == 21).await;
    wait_until(10, "b has a's event", || keys(&b).len() == 21).await;
    a.stop().await.expect("stop");
    drop(a);

    for n in 20..40 {
        b.broadcast(event("b", n)).await.expect("broadcast");
    }
    let a = start_a().await;
    assert_eq!(keys(&a).len(), 21, "the log file kept everything");
    let told = EventCounter::new(&a);
    link(&a, &b).await;
    a.broadcast(event("a", 1)).await.expect("broadcast");
    wait_until(10, "a catches up", || keys(&a).len() == 42).await;
    wait_until(10, "b gets a's new event", || keys(&b).len() == 42).await;
    wait_until(10, "a told of what it missed", || told.distinct() >= 20).await;
    // Then a while for a repeat to show up, if there were one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(told.distinct(), 20, "only what was missed is news");
    assert!(told.all_once());
    assert_eq!(keys(&a), keys(&b));
}

/// The largest `max_event_bytes` the builder takes is one a late peer can still catch up on
/// (larger values were accepted, and such events were broadcast but never caught up on), for
/// text and for floats, which take 9 bytes each on the wire against 4 of JSON (`0.5,`), so an
/// answer of 8 MiB of JSON overflowed the 16 MiB the wire once allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_the_largest_allowed_size_are_caught_up_on() {
    const MAX: usize = 8 * 1024 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let big_peer = |name: &str| {
        builder(dir.path(), name)
            .max_event_bytes(MAX)
            .build()
            .expect("the largest allowed size")
    };
    let too_big = builder(dir.path(), "x").max_event_bytes(MAX + 1).build();
    assert!(matches!(too_big, Err(ksync_p2p::P2PError::Config(_))));
    let a = Arc::new(big_peer("a"));
    a.start().await.expect("start");
    let text = Event::new("text", "t", json!("x".repeat(MAX - 200)), 1).with_origin("a");
    let floats = Event::new("floats", "t", json!(vec![0.5; (MAX - 200) / 4]), 1).with_origin("a");
    for big in [text, floats] {
        assert!(big.json_len() <= MAX);
        a.broadcast(big).await.expect("stored");
    }
    let b = Arc::new(big_peer("b"));
    b.start().await.expect("start");
    link(&b, &a).await;
    // 60 s: 16 MiB of events through Noise, CBOR and serde_json's exact float parsing
    // (`float_roundtrip`, 2M floats here) in a debug build, beside the crate's other tests.
    wait_until(60, "b catches up on both big events", || {
        keys(&b).len() == 2
    })
    .await;
}
