//! Upgrading a P2P app in place: this build over the key files and logs that `ksync peer` of
//! commit 4aa2aa3 wrote (`tests/fixtures/4aa2aa3`: two peers, `pa` and `pb`, that met once
//! and hold the same three events; its README says how it was made). Tests work on copies.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use common::{builder, link, wait_until};
use ksync_core::Storage;
use ksync_p2p::{PeerId, stored_peer_cursor};
use ksync_storage_file::FileStorage;

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/4aa2aa3")
}

/// The key under which a node keeps the id of its own log (peers count their cursors in it).
const OWN_LOG_ID: &str = "cursor/p2p/log-id";

/// A peer as the old `ksync peer --id NAME --key-dir keys --log-file NAME.log` ran it.
struct Peer {
    storage: Arc<FileStorage>,
    ksync: ksync_core::KSync<ksync_p2p::P2PSyncClient>,
}

async fn peer(dir: &Path, name: &str) -> Peer {
    let storage = Arc::new(FileStorage::open(dir.join(format!("{name}.log"))).expect("old log"));
    let client = builder(&dir.join("keys"), name).build().expect("build");
    let ksync = ksync_testkit::ksync_over(Arc::clone(&storage) as Arc<dyn Storage>, client)
        .await
        .expect("ksync");
    Peer { storage, ksync }
}

fn peer_id(peers: &serde_json::Value, name: &str) -> PeerId {
    peers[name]
        .as_str()
        .expect("a PeerId")
        .parse()
        .expect("PeerId")
}

/// The old key files give the same PeerIds (peers that dial them by address find them), the
/// old logs keep their own log ids and the catch-up cursors the old build stored (so no peer
/// walks the other's log from 0 again), and the two exchange only what is new: the old
/// events are not taken or reported again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_peers_key_file_log_and_cursors_are_taken_over() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for file in ["keys/pa.p2p-key", "keys/pb.p2p-key", "pa.log", "pb.log"] {
        let to = tmp.path().join(file);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(fixture().join(file), &to).expect("copy the fixture");
    }
    let peers: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("peers.json")).expect("peers.json"))
            .expect("peers.json is JSON");
    let (pa_id, pb_id) = (peer_id(&peers, "pa"), peer_id(&peers, "pb"));

    let pa = peer(tmp.path(), "pa").await;
    let pb = peer(tmp.path(), "pb").await;
    assert_eq!(pa.ksync.client().local_peer_id(), pa_id);
    assert_eq!(pb.ksync.client().local_peer_id(), pb_id);
    let own = |p: &Peer| p.storage.meta(OWN_LOG_ID).expect("meta");
    let (pa_log, pb_log) = (own(&pa), own(&pb));
    let (pa_log_id, pb_log_id) = (
        pa_log
            .as_deref()
            .expect("pa's log id")
            .parse::<u64>()
            .expect("u64"),
        pb_log
            .as_deref()
            .expect("pb's log id")
            .parse::<u64>()
            .expect("u64"),
    );
    // The cursors as the old build stored them, read by this one.
    assert_eq!(
        stored_peer_cursor(pa.storage.as_ref(), &pb_id).expect("read"),
        Some((3, pb_log_id))
    );
    assert_eq!(
        stored_peer_cursor(pb.storage.as_ref(), &pa_id).expect("read"),
        Some((3, pa_log_id))
    );
    let pb_old: Vec<_> = pb.storage.read_since(0, usize::MAX).expect("read");
    assert_eq!((pa.storage.len(), pb_old.len()), (3, 3));

    let reported = ksync_testkit::EventRecorder::new(pb.ksync.client().notifier());
    pa.ksync.start().await.expect("start pa");
    pb.ksync.start().await.expect("start pb");
    link(pb.ksync.client(), pa.ksync.client()).await;
    let new = pa
        .ksync
        .emit("note", serde_json::json!({"after": "upgrade"}))
        .await
        .expect("emit");
    wait_until(10, "pb gets the new event", || pb.storage.len() == 4).await;
    pa.ksync.disconnect().await.expect("stop pa");
    pb.ksync.disconnect().await.expect("stop pb");

    assert_eq!(reported.ids(), vec![new.id.clone()], "only the new event");
    assert_eq!(pb.storage.read_since(0, 3).expect("read"), pb_old);
    assert_eq!((own(&pa), own(&pb)), (pa_log, pb_log), "own log ids kept");
    for (storage, other, log_id) in [
        (&pa.storage, &pb_id, pb_log_id),
        (&pb.storage, &pa_id, pa_log_id),
    ] {
        let (cursor, stored_log_id) = stored_peer_cursor(storage.as_ref(), other)
            .expect("read")
            .expect("a cursor");
        // Never back before what the old build had caught up to.
        assert!(cursor >= 3, "{cursor}");
        assert_eq!(stored_log_id, log_id);
    }
}
