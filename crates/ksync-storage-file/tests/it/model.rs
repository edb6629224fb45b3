//! Model test: `FileStorage` (reopened at random points) answers exactly like
//! `InMemoryStorage` on random sequences of operations.

use ksync_core::{AppendOutcome, Event, InMemoryStorage, MergeOutcome, MergeSummary, Storage};
use ksync_storage_file::{Durability, FileStorage};
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<(u8, u64, u8)>),
    /// The same, through `append_summary`.
    AppendSummary(Vec<(u8, u64, u8)>),
    SetMeta(u8, u8),
    RemoveMeta(u8),
    Reopen,
    Read(u64, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => prop::collection::vec((0u8..6, 1u64..4, 0u8..3), 0..6).prop_map(Op::Append),
        2 => prop::collection::vec((0u8..6, 1u64..4, 0u8..3), 0..6).prop_map(Op::AppendSummary),
        1 => (0u8..3, any::<u8>()).prop_map(|(k, v)| Op::SetMeta(k, v)),
        1 => (0u8..3).prop_map(Op::RemoveMeta),
        1 => Just(Op::Reopen),
        1 => (0u64..30, 0usize..10).prop_map(|(a, l)| Op::Read(a, l)),
    ]
}

fn event(id: u8, version: u64, content: u8) -> Event {
    // Content varies independently of (id, version), so conflicts happen.
    Event::new(
        format!("id{id}"),
        "t",
        json!({"c": content, "s": "é"}),
        u64::from(content),
    )
    .with_version(version)
}

/// A comparable summary of an outcome (conflicts by their two sides).
fn summary(out: &MergeOutcome) -> Vec<String> {
    describe(&out.outcomes)
}

fn describe(outcomes: &[AppendOutcome]) -> Vec<String> {
    outcomes
        .iter()
        .map(|o| match o {
            AppendOutcome::Appended { seq } => format!("appended {seq}"),
            AppendOutcome::Duplicate { seq } => format!("duplicate {seq}"),
            AppendOutcome::Conflict(c) => format!("conflict {:?} {:?}", c.ours, c.theirs),
        })
        .collect()
}

fn check_same(file: &FileStorage, model: &InMemoryStorage, after: u64, limit: usize) {
    assert_eq!(file.len(), model.len());
    assert_eq!(
        file.read_since(after, limit).expect("read"),
        model.read_since(after, limit).expect("read")
    );
    assert_eq!(file.state().expect("state"), model.state().expect("state"));
    let (mut visited, mut model_visited) = (Vec::new(), Vec::new());
    let n = file
        .visit_since(after, limit, &mut |seq, e| visited.push((seq, e.clone())))
        .expect("visit");
    model
        .visit_since(after, limit, &mut |seq, e| {
            model_visited.push((seq, e.clone()))
        })
        .expect("visit");
    assert_eq!(n, visited.len());
    assert_eq!(visited, model_visited);
    for id in 0u8..6 {
        let id = format!("id{id}");
        assert_eq!(
            file.latest(&id).expect("latest"),
            model.latest(&id).expect("latest")
        );
        for version in 1..4 {
            assert_eq!(
                file.get(&id, version).expect("get"),
                model.get(&id, version).expect("get")
            );
        }
    }
    for k in 0u8..3 {
        let key = format!("k{k}");
        assert_eq!(
            file.meta(&key).expect("meta"),
            model.meta(&key).expect("meta")
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn file_storage_behaves_like_memory(
        ops in prop::collection::vec(op(), 1..25),
        synced in prop::bool::weighted(0.2),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.log");
        let durability = if synced { Durability::GroupCommit } else { Durability::None };
        let open = || FileStorage::builder(&path).durability(durability).open().expect("open");
        let mut file = open();
        let model = InMemoryStorage::new();
        for op in ops {
            match op {
                Op::Append(spec) => {
                    let batch: Vec<Event> = spec.iter().map(|&(i, v, c)| event(i, v, c)).collect();
                    let got = rt.block_on(file.append(batch.clone())).expect("file append");
                    let want = rt.block_on(model.append(batch)).expect("model append");
                    prop_assert_eq!(summary(&got), summary(&want));
                    prop_assert_eq!(&got.appended, &want.appended);
                    prop_assert_eq!(got.duplicates, want.duplicates);
                    prop_assert_eq!(got.conflicts.len(), want.conflicts.len());
                }
                Op::AppendSummary(spec) => {
                    let batch: Vec<Event> = spec.iter().map(|&(i, v, c)| event(i, v, c)).collect();
                    let got: MergeSummary =
                        rt.block_on(file.append_summary(batch.clone())).expect("file append");
                    let want = rt.block_on(model.append_summary(batch)).expect("model append");
                    prop_assert_eq!(describe(&got.outcomes), describe(&want.outcomes));
                    prop_assert_eq!(got.appended, want.appended);
                    prop_assert_eq!(got.duplicates, want.duplicates);
                    prop_assert_eq!(got.conflicts, want.conflicts);
                }
                Op::SetMeta(k, v) => {
                    let (key, value) = (format!("k{k}"), format!("v{v}"));
                    rt.block_on(file.set_meta(&key, &value)).expect("file meta");
                    rt.block_on(model.set_meta(&key, &value)).expect("model meta");
                }
                Op::RemoveMeta(k) => {
                    let key = format!("k{k}");
                    rt.block_on(file.remove_meta(&key)).expect("file remove");
                    rt.block_on(model.remove_meta(&key)).expect("model remove");
                }
                Op::Reopen => {
                    drop(file);
                    file = open();
                    prop_assert_eq!(file.recovery().cut_tail.clone(), None);
                }
                Op::Read(after, limit) => check_same(&file, &model, after, limit),
            }
            check_same(&file, &model, 0, usize::MAX);
        }
        drop(file);
        let reopened = open();
        check_same(&reopened, &model, 0, usize::MAX);
    }
}
