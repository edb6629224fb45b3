//! What the rooms' queues hold relay-wide while the disk is slow
//! (`RelayConfig::room_queues_total_bytes`).

use std::sync::Arc;

use crate::common::*;
use ksync_core::{LogName, StorageProvider};
use ksync_testkit::GatedProvider;
use ksync_ws::server::RelayConfig;
use serde_json::json;
use tokio::sync::Semaphore;

/// Rooms named `slow...` on one slow disk (their appends take `slow`'s permits), the other
/// logs on a disk whose appends take `free`'s; all count in the provider's `started`.
fn slow_disk(slow: &Arc<Semaphore>, free: Arc<Semaphore>) -> Arc<GatedProvider> {
    let slow = Arc::clone(slow);
    Arc::new(GatedProvider::new(move |name| match name {
        LogName::Room(room) if room.as_str().starts_with("slow") => Arc::clone(&slow),
        _ => Arc::clone(&free),
    }))
}

/// Publishes queued in many rooms behind one stuck disk are bounded relay-wide: before,
/// each room's queue took up to `room_queue_bytes` (64 MiB) whatever the others held, so
/// the rooms' queues together held up to 64 MiB × `max_open_rooms` (256 GiB at the
/// defaults). Past the relay-wide budget publishers wait, as for a full room queue, and
/// every publish is stored and acknowledged once the disk goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_queued_in_many_rooms_are_bounded_relay_wide() {
    const ROOMS: usize = 4;
    const PUBLISHERS: usize = 4;
    const BUDGET: usize = 256 << 10;
    // One append each for the rooms' first publishes; the next ones hang.
    let permits = Arc::new(Semaphore::new(ROOMS));
    let provider = slow_disk(&permits, Arc::new(Semaphore::new(0)));
    let mut started = provider.started();
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.room_queues_total_bytes = BUDGET;
            relay_config
        },
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let names: Vec<String> = (0..ROOMS).map(|r| format!("slow{r}")).collect();
    // Everyone joins first: a join waits for its room's append in progress.
    let mut rooms = Vec::new();
    for name in &names {
        let url = server.url(Some(name));
        let mut conns = Vec::new();
        for _ in 0..=PUBLISHERS {
            conns.push(join(&url, hello()).await.0);
        }
        rooms.push(conns);
    }
    for conns in &mut rooms {
        let first = &mut conns[0];
        send_json(
            first,
            json!({"type":"publish","ref":0,"events":[event("warm", 0)]}),
        )
        .await;
        assert_eq!(recv_json(first).await["type"], "ack");
    }
    // The disk hangs from here on: each room's next append waits, holding its room.
    for conns in &mut rooms {
        send_json(
            &mut conns[0],
            json!({"type":"publish","ref":1,"events":[event("stuck", 1)]}),
        )
        .await;
    }
    started
        .wait_for(|n| *n >= 2 * ROOMS)
        .await
        .expect("appends");
    // About 80 KiB each as the queues count it (40 KB of JSON, as much decoded): 1.25 MiB in
    // all, five times the relay-wide budget, each room's share far below `room_queue_bytes`.
    for conns in &mut rooms {
        for (i, ws) in conns.iter_mut().enumerate().skip(1) {
            let mut e = event(&format!("big{i}"), 1);
            e["data"] = json!("s".repeat(40_000));
            send_json(ws, json!({"type":"publish","ref":2,"events":[e]})).await;
        }
    }
    // The relay has read every publish: queued, or waiting for room in the queues.
    eventually("every publish read", || {
        names.iter().all(|name| {
            server
                .relay
                .backlog(name)
                .is_some_and(|b| b.publishes == PUBLISHERS + 1)
        })
    })
    .await;
    let backlogs: Vec<_> = names
        .iter()
        .map(|name| server.relay.backlog(name).expect("open"))
        .collect();
    let queued: usize = backlogs.iter().map(|b| b.queued_bytes).sum();
    assert!(
        queued <= BUDGET,
        "the rooms' queues hold {queued} bytes together, past the relay-wide {BUDGET}: \
         {backlogs:?}"
    );
    assert!(
        backlogs.iter().any(|b| b.waiting > 0),
        "nothing waits for the budget: {backlogs:?}"
    );
    // The disk goes on: every publish is stored, in every room.
    permits.add_permits(1000);
    for conns in &mut rooms {
        for ws in conns.iter_mut() {
            let ack = loop {
                let message = recv_json(ws).await;
                if message["type"] == "ack" {
                    break message;
                }
            };
            assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
        }
    }
    server.stop().await;
}

/// A room stuck on its disk holds at most its own budget (`room_queue_bytes`) of the
/// relay-wide one: its publishers beyond that wait for their room, holding none of the
/// relay's, so publishes to other rooms still get through. (Taken the other way round, the
/// stuck room's waiting publishers took the whole relay-wide budget and every room waited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_stuck_on_its_disk_leaves_the_relay_wide_budget_to_the_others() {
    const PUBLISHERS: usize = 6;
    let permits = Arc::new(Semaphore::new(1));
    let provider = slow_disk(&permits, Arc::new(Semaphore::new(1000)));
    let mut started = provider.started();
    let server = start_with(
        {
            let mut relay_config = RelayConfig::default();
            relay_config.room_queue_bytes = 100 << 10;
            relay_config.room_queues_total_bytes = 256 << 10;
            relay_config
        },
        Arc::clone(&provider) as Arc<dyn StorageProvider>,
        Arc::new(ksync_core::AllowAll),
    )
    .await;
    let stuck_url = server.url(Some("slow"));
    let mut stuck = Vec::new();
    for _ in 0..=PUBLISHERS {
        stuck.push(join(&stuck_url, hello()).await.0);
    }
    let (mut other, _) = join(&server.url(Some("other")), hello()).await;
    send_json(
        &mut stuck[0],
        json!({"type":"publish","ref":0,"events":[event("warm", 0)]}),
    )
    .await;
    assert_eq!(recv_json(&mut stuck[0]).await["type"], "ack");
    send_json(
        &mut stuck[0],
        json!({"type":"publish","ref":1,"events":[event("stuck", 1)]}),
    )
    .await;
    started.wait_for(|n| *n >= 2).await.expect("appends");
    // About 80 KiB each as the queues count them: one fits in the stuck room's queue, the
    // others wait for it.
    let big = |i: usize| {
        let mut e = event(&format!("big{i}"), 1);
        e["data"] = json!("s".repeat(40_000));
        json!({"type":"publish","ref":2,"events":[e]})
    };
    for (i, ws) in stuck.iter_mut().enumerate().skip(1) {
        send_json(ws, big(i)).await;
    }
    eventually("the stuck room's publishes read", || {
        server
            .relay
            .backlog("slow")
            .is_some_and(|b| b.publishes == PUBLISHERS + 1)
    })
    .await;
    // The other room's publishes, as large, are stored while the stuck room waits.
    for n in 0..3 {
        send_json(&mut other, big(100 + n)).await;
        let ack = recv_json(&mut other).await;
        assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    }
    let stuck_room = server.relay.backlog("slow").expect("open");
    assert!(
        stuck_room.queued_bytes <= 100 << 10,
        "the stuck room holds more than its own budget: {stuck_room:?}"
    );
    permits.add_permits(1000);
    for ws in &mut stuck {
        let ack = loop {
            let message = recv_json(ws).await;
            if message["type"] == "ack" {
                break message;
            }
        };
        assert_eq!(ack["results"][0]["status"], "stored", "{ack}");
    }
    server.stop().await;
}
