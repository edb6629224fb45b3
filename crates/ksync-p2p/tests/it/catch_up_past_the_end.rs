//! A peer's log can get shorter under the same log id (a backup restored, a torn tail cut
//! when the log is opened), leaving a requester's cursor past its end. PROTOCOL: a `Keys`
//! request with `after > len` is answered with the log's real length, and the requester
//! walks that log again from 0, so what the peer appends afterwards is caught up on.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::raw::{Request, Response, next_answer, raw_peer};
use common::*;
use ksync_core::{InMemoryStorage, Replica};

/// Wire level: a page asked for past the end of a log of 3 events says `len: 3` (not the
/// requested `after`, which the requester would take for the end of a longer log), with no
/// entries and nothing past the log's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_past_the_end_of_the_log_gives_the_real_length() {
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
    let (mut raw, _) = raw_peer().await;
    let a_id = a.local_peer_id();
    raw.add_peer_address(a_id, a.addresses().into_iter().next().expect("listening"));
    for after in [3, 4, 10, u64::MAX] {
        let asked = raw.behaviour_mut().send_request(
            &a_id,
            Request::Keys {
                network: "ksync".into(),
                after,
                limit: 1024,
            },
        );
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            next_answer(&mut raw, |id| *id == asked),
        )
        .await
        .expect("an answer in time");
        let Ok(Response::Keys {
            len,
            entries,
            through,
            ..
        }) = answer.1
        else {
            panic!("after {after}: not a Keys answer: {:?}", answer.1);
        };
        assert_eq!(len, 3, "after {after}: the log's length");
        assert!(entries.is_empty(), "after {after}: {entries:?}");
        // At the end: the usual end page. Past it: no `through` (the page covers nothing).
        let expected = (after == 3).then_some(3);
        assert_eq!(through, expected, "after {after}");
    }
}

/// End to end: b holds a's 5 events (its cursor at 5); a comes back with the same log id but
/// only 2 of them, then appends 2 new ones (a log of 4). b's next round walks a's log again
/// from 0 and gets the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_got_shorter_under_the_same_id_is_walked_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let quiet = |name| builder(dir.path(), name).anti_entropy_interval(Duration::from_secs(3600));
    let a1 = quiet("a").build().expect("build");
    a1.replica()
        .storage()
        .append((0..5).map(|n| event("a", n)).collect())
        .await
        .expect("append");
    a1.start().await.expect("start");
    let log_id = a1.replica().cursor("p2p/log-id").expect("log id");
    assert_ne!(log_id, 0);
    let b = quiet("b").build().expect("build");
    b.start().await.expect("start");
    link(&b, &a1).await;
    wait_until(10, "b gets a's 5 events", || keys(&b).len() == 5).await;
    a1.stop().await.expect("stop");
    drop(a1);
    wait_until(10, "b sees a gone", || b.connected_peers().is_empty()).await;

    // a's log restored from an older backup (same log id), then written on.
    let replica = Replica::open(Arc::new(InMemoryStorage::new()))
        .await
        .expect("replica");
    replica
        .storage()
        .append((0..2).map(|n| event("a", n)).collect())
        .await
        .expect("append");
    replica
        .set_cursor("p2p/log-id", log_id)
        .await
        .expect("log id");
    replica
        .storage()
        .append(vec![event("new", 0), event("new", 1)])
        .await
        .expect("append");
    assert!(
        replica.storage().len() < 5,
        "a's log is shorter than b's cursor"
    );
    let a2 = quiet("a").replica(replica).build().expect("build");
    a2.start().await.expect("start");
    assert_eq!(a2.replica().cursor("p2p/log-id").expect("log id"), log_id);
    link(&b, &a2).await;
    let has = |id: &str| keys(&b).contains(&(id.to_string(), 1));
    wait_until(10, "b gets the events a wrote after the restore", || {
        has("new-0") && has("new-1")
    })
    .await;
    assert_eq!(keys(&b).len(), 7);
}
