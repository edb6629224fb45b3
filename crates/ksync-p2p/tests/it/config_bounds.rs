//! Options at the top of their type's range: refused by `build` with a config error, or
//! honoured without allocating for them up front, never a panic at `start`.

use crate::common;

use std::time::Duration;

use common::*;
use ksync_p2p::P2PError;

/// A command queue larger than a tokio channel can be (`Semaphore::MAX_PERMITS`) is refused
/// by `build`, with the limit in the message; the largest allowed one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_capacity_over_the_channel_limit_is_refused_by_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let max = tokio::sync::Semaphore::MAX_PERMITS;
    for capacity in [usize::MAX, max + 1] {
        let Err(err) = builder(dir.path(), "a").command_capacity(capacity).build() else {
            panic!("command_capacity({capacity}) was accepted");
        };
        let P2PError::Config(reason) = &err else {
            panic!("not a config error: {err:?}");
        };
        assert!(
            reason.contains("command_capacity") && reason.contains(&max.to_string()),
            "{reason}"
        );
    }
    let a = builder(dir.path(), "a")
        .command_capacity(max)
        .build()
        .expect("the limit itself is allowed");
    a.start().await.expect("start");
    a.broadcast(event("a", 0)).await.expect("broadcast");
    a.stop().await.expect("stop");
}

/// `max_peer_cursors(usize::MAX)` (no practical bound) starts without reserving a slot per
/// possible peer, syncs, and stores its peer's cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbounded_cursor_cap_starts_and_syncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = builder(dir.path(), "a")
        .anti_entropy_interval(Duration::from_secs(3600))
        .build()
        .expect("build");
    a.replica()
        .storage()
        .append((0..3).map(|n| event("a", n)).collect())
        .await
        .expect("append");
    a.start().await.expect("start");
    let b = builder(dir.path(), "b")
        .max_peer_cursors(usize::MAX)
        .build()
        .expect("build");
    b.start().await.expect("start");
    link(&b, &a).await;
    wait_until(10, "b catches up on a's events", || keys(&b).len() == 3).await;
    a.broadcast(event("a", 3)).await.expect("broadcast");
    wait_until(10, "b gets a's broadcast", || keys(&b).len() == 4).await;
    b.stop().await.expect("stop");
    let stored =
        ksync_p2p::stored_peer_cursor(&**b.replica().storage(), &a.local_peer_id()).expect("read");
    assert!(
        matches!(stored, Some((cursor, _)) if cursor >= 3),
        "{stored:?}"
    );
}

/// A catch-up answer budget below the largest event is refused by `build`, naming both
/// values: an event larger than what is left of the budget would be served only when no
/// answer to its asker is in flight. Equal is allowed.
#[test]
fn a_catch_up_answer_budget_below_the_largest_event_is_refused_by_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Err(err) = builder(dir.path(), "a")
        .max_event_bytes(100_000)
        .max_catch_up_answer_bytes(99_999)
        .build()
    else {
        panic!("max_catch_up_answer_bytes below max_event_bytes was accepted");
    };
    let P2PError::Config(reason) = &err else {
        panic!("not a config error: {err:?}");
    };
    assert!(
        reason.contains("max_catch_up_answer_bytes")
            && reason.contains("max_event_bytes")
            && reason.contains("99999")
            && reason.contains("100000"),
        "{reason}"
    );
    builder(dir.path(), "a")
        .max_event_bytes(100_000)
        .max_catch_up_answer_bytes(100_000)
        .build()
        .expect("a budget of one largest event is allowed");
}

/// A node-wide gossip bound of 0 is refused by `build`, naming it (it would let go of every
/// peer whose queue ever overflowed); 1 is allowed.
#[test]
fn a_gossip_total_of_zero_is_refused_by_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Err(P2PError::Config(reason)) = builder(dir.path(), "a").max_gossip_total_bytes(0).build()
    else {
        panic!("max_gossip_total_bytes 0 was not refused as a config error");
    };
    assert!(reason.contains("max_gossip_total_bytes"), "{reason}");
    builder(dir.path(), "a")
        .max_gossip_total_bytes(1)
        .build()
        .expect("1 is allowed");
}

/// `redial_delay` is refused by `build` with a zero `min`, `min` over `max` or a bound past a
/// day, naming the option.
#[test]
fn redial_delays_out_of_range_are_refused_by_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Duration::from_secs;
    for (min, max) in [
        (Duration::ZERO, s(1)),
        (s(2), s(1)),
        (s(1), ksync_p2p::MAX_CONFIG_DURATION + s(1)),
    ] {
        let Err(P2PError::Config(reason)) = builder(dir.path(), "a").redial_delay(min, max).build()
        else {
            panic!("redial_delay({min:?}, {max:?}) was not refused as a config error");
        };
        assert!(reason.contains("redial_delay"), "{reason}");
    }
    builder(dir.path(), "a")
        .redial_delay(s(1), s(1))
        .build()
        .expect("min = max is allowed");
}
