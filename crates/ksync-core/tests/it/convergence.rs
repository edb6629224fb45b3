//! Convergence of replicas under random emits, exchanges, reorderings and duplicate deliveries:
//! after everyone has exchanged everything, every replica holds the same materialised state and
//! a further exchange changes nothing.

use std::sync::Arc;

use ksync_core::{Event, InMemoryStorage, Replica};
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Op {
    /// Replica `r` writes a new revision of id `id` (latest local version + 1).
    Emit {
        r: usize,
        id: u8,
        value: u8,
        ts: u16,
    },
    /// Replica `to` receives replica `from`'s whole log, `rev` = reversed, `dup` = twice.
    Exchange {
        from: usize,
        to: usize,
        rev: bool,
        dup: bool,
    },
}

const REPLICAS: usize = 3;

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..REPLICAS, 0u8..4, any::<u8>(), 0u16..50).prop_map(|(r, id, value, ts)| Op::Emit {
            r,
            id,
            value,
            ts
        }),
        (0..REPLICAS, 0..REPLICAS, any::<bool>(), any::<bool>())
            .prop_map(|(from, to, rev, dup)| Op::Exchange { from, to, rev, dup }),
    ]
}

fn log_of(replica: &Replica) -> Vec<Event> {
    replica
        .storage()
        .read_since(0, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|s| s.event)
        .collect()
}

async fn exchange(from: &Replica, to: &Replica, rev: bool, dup: bool) {
    let mut batch = log_of(from);
    if rev {
        batch.reverse();
    }
    if dup {
        batch.extend(batch.clone());
    }
    to.ingest(batch).await.expect("ingest");
}

/// `(id, version, content)` of the latest revision per id: origin is provenance, not state.
fn state(replica: &Replica) -> Vec<(String, u64, String, serde_json::Value, u64)> {
    replica
        .storage()
        .state()
        .expect("state")
        .into_values()
        .map(|e| (e.id, e.version, e.event_type, e.data, e.timestamp))
        .collect()
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let replicas: Vec<Replica> = (0..REPLICAS)
        .map(|i| Replica::with_id(Arc::new(InMemoryStorage::new()), format!("r{i}")))
        .collect();
    for op in ops {
        match op {
            Op::Emit { r, id, value, ts } => {
                let id = format!("id{id}");
                let version = replicas[r]
                    .storage()
                    .latest(&id)
                    .expect("latest")
                    .map_or(1, |s| s.event.version + 1);
                let event = Event::new(id, "t", json!(value), u64::from(ts))
                    .with_version(version)
                    .with_origin(format!("r{r}"));
                replicas[r].record_local(event).await.expect("local write");
            }
            Op::Exchange { from, to, rev, dup } if from != to => {
                exchange(&replicas[from], &replicas[to], rev, dup).await;
            }
            Op::Exchange { .. } => {}
        }
    }
    // Everyone exchanges everything until nothing changes (bounded: it must quiesce quickly).
    let mut rounds = 0;
    loop {
        let before: Vec<u64> = replicas.iter().map(|r| r.storage().len()).collect();
        for from in 0..REPLICAS {
            for to in 0..REPLICAS {
                if from != to {
                    exchange(&replicas[from], &replicas[to], false, false).await;
                }
            }
        }
        let after: Vec<u64> = replicas.iter().map(|r| r.storage().len()).collect();
        if before == after {
            break;
        }
        rounds += 1;
        prop_assert!(rounds < 10, "exchanges did not quiesce: {after:?}");
    }
    let first = state(&replicas[0]);
    for r in &replicas[1..] {
        prop_assert_eq!(&state(r), &first);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn replicas_converge(ops in prop::collection::vec(arb_op(), 0..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        rt.block_on(run(ops))?;
    }
}
