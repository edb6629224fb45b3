//! A large answer or request over a slow but working link (testkit's `SlowLink`, a
//! throttling TCP proxy whose ends cannot take megabytes into their kernel buffers at once):
//! `request_timeout` bounds the wait for each part of it, not the whole.

use std::time::Duration;

use ksync_core::{Event, PullPushClient, SyncClient, SyncError};
use ksync_git::GitSyncClient;
use ksync_testkit::{SlowLink, noise};
use serde_json::json;

use crate::common;

/// The link's rate and the clients' `request_timeout`: a page or batch takes well over the
/// timeout to cross, and a debug-build service on a busy machine still starts its answer
/// within it.
const LINK_RATE: usize = 256 * 1024;
const TIMEOUT: Duration = Duration::from_secs(1);

/// A pull page of ~660 KB through a 256 KiB/s link takes over 2.5 s, against a 1 s
/// `request_timeout`. Before, the timeout bounded the whole answer: the pull failed with
/// `Timeout`, and so did every pull after it (the same page asked again), for good.
#[tokio::test]
async fn a_large_pull_page_over_a_slow_link_gets_through() {
    let server = common::start(&["r"]).await;
    let writer = common::client(&server.repo_url("r"));
    for i in 0..6 {
        let event = Event::new(format!("e{i}"), "t", json!(noise(110_000, i + 1)), 1);
        writer.send(event).await.expect("send");
    }
    writer.push().await.expect("push");
    let link = SlowLink::start(server.addr, LINK_RATE).await;
    let reader = GitSyncClient::builder(format!("http://{}/git/r", link.addr()))
        .auth(ksync_core::Auth::token("writer"))
        .request_timeout(TIMEOUT)
        .build()
        .expect("client");
    let pulled = reader.pull().await.expect("the page gets through");
    assert_eq!(pulled.new_events.len(), 6);
    assert_eq!(reader.replica().storage().len(), 6);
}

/// The same page, and the link dies midway through it: the body stops coming and the pull
/// is given up with `Timeout` once `request_timeout` passes without a byte (no whole-request
/// bound is left to end it).
#[tokio::test]
async fn a_pull_whose_answer_stops_midway_times_out() {
    let server = common::start(&["r"]).await;
    let writer = common::client(&server.repo_url("r"));
    for i in 0..6 {
        let event = Event::new(format!("e{i}"), "t", json!(noise(110_000, i + 1)), 1);
        writer.send(event).await.expect("send");
    }
    writer.push().await.expect("push");
    let link = SlowLink::start(server.addr, LINK_RATE).await;
    let reader = GitSyncClient::builder(format!("http://{}/git/r", link.addr()))
        .auth(ksync_core::Auth::token("writer"))
        .request_timeout(TIMEOUT)
        .build()
        .expect("client");
    let mut pull = tokio::spawn(async move { reader.pull().await.map(|_| ()) });
    // A third of the page is through: its answer started, its body is coming.
    tokio::select! {
        () = link.carried_down(220_000) => {}
        ended = &mut pull => panic!("the pull ended before a third of its page came: {ended:?}"),
    }
    link.cut();
    // Bounded for the test only (a pull that never ends would hang it): 10 times the timeout.
    let pulled = tokio::time::timeout(Duration::from_secs(10), pull)
        .await
        .expect("the stalled pull ends")
        .expect("the pull task");
    assert!(
        matches!(pulled, Err(SyncError::Timeout(_))),
        "a body that stopped: {pulled:?}"
    );
}

/// A push batch of ~700 KB (~420 KB gzipped) through a 256 KiB/s link takes over 1.5 s to
/// upload, against a 1 s `request_timeout`. Before, the timeout counted from the
/// request's start whatever the upload did: the push failed with `Timeout`, and so did every
/// push after it (the same batch), so the events never reached the service. A link that
/// stops taking the upload is still given up.
#[tokio::test]
async fn a_large_push_over_a_slow_link_gets_through() {
    let server = common::start(&["r"]).await;
    let link = SlowLink::start(server.addr, LINK_RATE).await;
    let writer = GitSyncClient::builder(format!("http://{}/git/r", link.addr()))
        .auth(ksync_core::Auth::token("writer"))
        .request_timeout(TIMEOUT)
        .build()
        .expect("client");
    for i in 0..6 {
        let event = Event::new(format!("e{i}"), "t", json!(noise(115_000, i + 1)), 1);
        writer.send(event).await.expect("send");
    }
    let pushed = writer.push().await.expect("the batch gets through");
    assert_eq!(pushed.pushed_events.len(), 6);
    assert_eq!(common::branch_events(&server, "r", "main").len(), 6);

    for i in 6..12 {
        let event = Event::new(format!("e{i}"), "t", json!(noise(115_000, i + 1)), 1);
        writer.send(event).await.expect("send");
    }
    link.cut();
    let stalled = writer.push().await;
    assert!(
        matches!(stalled, Err(SyncError::Timeout(_))),
        "a dead link: {stalled:?}"
    );
    assert_eq!(common::branch_events(&server, "r", "main").len(), 6);
}
