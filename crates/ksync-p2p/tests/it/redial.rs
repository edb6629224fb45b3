//! Peers the application connected to (`connect_to_peer`) are dialed again after their
//! connection drops, with exponential backoff and jitter, until the node stops; the
//! catch-up round of the new connection carries what was missed meanwhile.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

/// `a` connected to `b` with `connect_to_peer`; `b` restarts (same key, same address) and
/// publishes while they are apart: `a` gets the event without being told to connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_connected_to_is_dialed_again_after_it_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = peer(dir.path(), "a").await;
    let b = peer(dir.path(), "b").await;
    link(&a, &b).await;
    let port = port_of(&b);
    let b_id = b.local_peer_id();
    b.stop().await.expect("stop b");
    let a2 = Arc::clone(&a);
    wait_until(10, "a sees b go", move || a2.connected_peers().is_empty()).await;

    // The same peer again: same key file, same port.
    let b = builder(dir.path(), "b")
        .port(port)
        .build()
        .expect("build b");
    assert_eq!(b.local_peer_id(), b_id);
    b.start().await.expect("start b again");
    b.broadcast(event("b", 1)).await.expect("broadcast");

    wait_until(10, "a gets b's event without connect_to_peer", || {
        keys(&a).contains(&("b-1".to_owned(), 1))
    })
    .await;
    assert!(a.connected_peers().contains(&b_id));
}

/// A peer that stays gone is dialed again and again, with delays that grow (from 100 ms,
/// doubling): in 1.4 s after the first redial there is room for at most 3 more (at 100,
/// 300 and 700 ms at the earliest, the next at 1.5 s), where a fixed or no delay would make
/// tens or thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stays_gone_is_dialed_again_with_growing_delays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Arc::new(
        builder(dir.path(), "a")
            .redial_delay(Duration::from_millis(100), Duration::from_secs(10))
            .build()
            .expect("build a"),
    );
    a.start().await.expect("start a");
    let b = peer(dir.path(), "b").await;
    link(&a, &b).await;
    b.stop().await.expect("stop b");
    let a2 = Arc::clone(&a);
    wait_until(10, "a dials b again", move || a2.stats().redials >= 1).await;
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let dials = a.stats().redials;
    assert!(
        dials <= 4,
        "{dials} dials within 1.4 s of the first: the delays do not grow"
    );
    let a2 = Arc::clone(&a);
    wait_until(10, "a keeps dialing b", move || a2.stats().redials > dials).await;
    assert!(a.connected_peers().is_empty());
}

/// Stopping the node stops its redials: the peer's address, now a plain listener, is dialed
/// while the node runs and never once it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_node_stops_its_redials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = builder(dir.path(), "a")
        .redial_delay(Duration::from_millis(50), Duration::from_millis(200))
        .build()
        .expect("build a");
    a.start().await.expect("start a");
    let b = peer(dir.path(), "b").await;
    link(&a, &b).await;
    let port = port_of(&b);
    b.stop().await.expect("stop b");
    // Where b was: a listener that takes each connection and closes it (the dial fails).
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("b's port is free");
    let accept = async |within: Duration| {
        tokio::time::timeout(within, listener.accept())
            .await
            .ok()
            .map(|r| r.expect("accept"))
    };
    assert!(
        accept(Duration::from_secs(10)).await.is_some(),
        "a never dialed b's address again"
    );
    a.stop().await.expect("stop a");
    // Dials that were on their way when `stop` returned, if any.
    while accept(Duration::from_millis(20)).await.is_some() {}
    // Five times the longest delay: a node still running would have dialed.
    assert!(
        accept(Duration::from_secs(1)).await.is_none(),
        "a stopped node dialed again"
    );
}

/// Where the peer was, something takes the connection and never answers the handshake (a
/// frozen process, a host gone behind a NAT that kept the connection): each dial gives up
/// after `connect_timeout` and the peer is dialed again. Without a bound on the dial, the
/// first one waited for good and the peer was never dialed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_that_is_never_answered_gives_up_and_the_peer_is_dialed_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = builder(dir.path(), "a")
        .redial_delay(Duration::from_millis(50), Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(300))
        .build()
        .expect("build a");
    a.start().await.expect("start a");
    let b = peer(dir.path(), "b").await;
    link(&a, &b).await;
    let port = port_of(&b);
    b.stop().await.expect("stop b");
    // Where b was: a listener that takes each connection and holds it, silent.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("b's port is free");
    let mut held = Vec::new();
    for dial in 1..=3 {
        let (socket, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .unwrap_or_else(|_| panic!("dial {dial} of b's address never came"))
            .expect("accept");
        held.push(socket);
    }
    a.stop().await.expect("stop a");
}
