//! Prunes against an in-memory store that refuses or fails deletions, or
//! locks objects as S3 Object Lock does.

use std::sync::Arc;

use super::*;
use crate::chain::Chain;
use crate::layout::SegmentName;
use crate::manifest::{GenerationManifest, StartReason};
use crate::object_lock::RetentionMode;
use crate::retention::Period;
use crate::snapshot::SnapshotHeader;
use crate::testing::{Fault, Faulty};

const DAY_MS: i64 = 86_400_000;
/// 2026-11-20T00:00:00Z.
const T0: i64 = 1_795_132_800_000;

fn seg(first: Revision, last: Revision, end_ms: i64) -> SegmentName {
    SegmentName {
        first,
        last,
        end_ms,
    }
}

/// Generation 1 from revision 10: snapshots (with fingerprints) at 10, 25
/// and 40, taken a day apart, and segments through revision 50.
async fn populate(store: &Faulty) {
    let g = GenerationId(1);
    let put = |key: String, bytes: Vec<u8>| async move {
        object_store::ObjectStoreExt::put(
            store.inner(),
            &object_store::path::Path::from(format!("a/{key}")),
            bytes.into(),
        )
        .await
        .unwrap();
    };
    let manifest = GenerationManifest {
        generation: g,
        cluster_id: 1,
        start_revision: 10,
        started_ms: T0,
        reason: StartReason::NewArchive,
        previous: None,
        detail: String::new(),
        term: 0,
        previous_digest: None,
    };
    put(
        layout::generation_manifest_key(g),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .await;
    for (i, rev) in [10, 25, 40].into_iter().enumerate() {
        let header = SnapshotHeader {
            generation: 1,
            revision: rev,
            taken_ms: T0 + i as i64 * DAY_MS,
            db_bytes: 0,
            db_blake3: [0; 32],
            prev_digest: [0; 32],
            prev_revision: 0,
        };
        put(layout::snapshot_key(g, rev), header.encode().to_vec()).await;
        put(layout::lineage_key(g, rev), b"{}".to_vec()).await;
    }
    for (i, (first, last)) in [(11, 20), (21, 30), (31, 40), (41, 50)]
        .into_iter()
        .enumerate()
    {
        let name = seg(first, last, T0 + i as i64 * DAY_MS / 2 + 1);
        put(layout::segment_key(g, &name), b"segment".to_vec()).await;
    }
}

fn archive(store: &Arc<Faulty>) -> Archive {
    Archive::from_store(store.clone(), "a", "memory:///a").with_object_lock(store.clone())
}

/// Locks the object at archive-relative `key` of `store`.
fn lock(store: &Faulty, key: &str, retention: Option<Retention>) {
    store.set_retention(&format!("a/{key}"), retention);
}

fn until(mode: RetentionMode, ms: i64) -> Retention {
    Retention {
        period: Some((
            mode,
            chrono::DateTime::from_timestamp_millis(ms).expect("in range"),
        )),
        legal_hold: false,
    }
}

async fn faulty(fault: Fault) -> Arc<Faulty> {
    let store = Faulty::new(fault);
    populate(&store).await;
    Arc::new(store)
}

fn keep_last(n: u32) -> Policy {
    Policy {
        keep_last: Some(n),
        ..Policy::default()
    }
}

async fn chain(archive: &Archive) -> Chain {
    ArchiveListing::load(archive).await.unwrap().generations[0].chain()
}

#[tokio::test]
async fn a_dry_run_deletes_nothing_and_a_confirmed_run_deletes_the_plan() {
    let store = faulty(Fault::None).await;
    let archive = archive(&store);
    let before = chain(&archive).await;
    let dry = prune(&archive, &keep_last(1), false, Mode::Hidden)
        .await
        .unwrap();
    assert!(!dry.confirmed && dry.deleted == 0);
    assert_eq!(dry.plan.delete.len(), 7, "{:?}", dry.plan.delete);
    assert_eq!(chain(&archive).await, before);

    let done = prune(&archive, &keep_last(1), true, Mode::Hidden)
        .await
        .unwrap();
    assert_eq!(done.plan, dry.plan);
    assert_eq!(done.deleted, 7);
    assert!(done.refused.is_empty());
    let after = chain(&archive).await;
    assert!(after.gaps().is_empty(), "{:?}", after.gaps());
    assert_eq!(after.pruned_gaps().len(), 1);
    assert_eq!(after.restorable(), done.plan.restorable_after);
    assert_eq!(
        (after.restorable()[0].first, after.restorable()[0].last),
        (40, 50)
    );
    let record = archive
        .get(&layout::pruned_key(
            GenerationId(1),
            &layout::PrunedRange {
                first: 11,
                last: 40,
            },
        ))
        .await
        .unwrap();
    let record = PruneRecord::parse_named(
        "r",
        &record,
        layout::PrunedRange {
            first: 11,
            last: 40,
        },
    )
    .unwrap();
    assert_eq!(record.policy, "--keep-last 1");

    let again = prune(&archive, &keep_last(1), true, Mode::Hidden)
        .await
        .unwrap();
    assert!(again.plan.delete.is_empty() && again.plan.records.is_empty());
}

#[tokio::test]
async fn refused_deletions_are_reported_and_the_rest_goes() {
    let store = faulty(Fault::RefuseDeletes("/snapshots/")).await;
    let archive = archive(&store);
    let report = prune(&archive, &keep_last(1), true, Mode::Hidden)
        .await
        .unwrap();
    let refused: Vec<&str> = report.refused.iter().map(|r| r.object.as_str()).collect();
    assert_eq!(
        refused,
        vec![
            layout::snapshot_key(GenerationId(1), 10),
            layout::snapshot_key(GenerationId(1), 25)
        ]
    );
    assert!(
        report.refused[0].reason.contains("retention"),
        "{:?}",
        report.refused
    );
    assert_eq!(report.deleted, report.plan.delete.len() - 2);
    // Nothing counts as damage; the leftover snapshot inside the pruned
    // range is not part of the chain (the one at the start stays usable).
    let after = chain(&archive).await;
    assert!(after.gaps().is_empty());
    assert_eq!(after.snapshots, vec![10, 40]);
}

#[tokio::test]
async fn a_prune_cut_off_after_any_deletion_leaves_a_sound_archive_and_the_next_run_finishes() {
    let planned = prune(
        &archive(&faulty(Fault::None).await),
        &keep_last(1),
        false,
        Mode::Hidden,
    )
    .await
    .unwrap()
    .plan;
    for k in 0..planned.delete.len() {
        let store = faulty(Fault::FailDeletesAfter(k)).await;
        let archive = archive(&store);
        let err = prune(&archive, &keep_last(1), true, Mode::Hidden)
            .await
            .unwrap_err();
        assert!(matches!(err, PruneError::Store(_)), "{err}");
        let cut = chain(&archive).await;
        assert!(
            cut.gaps().is_empty(),
            "after {k} deletions: {:?}",
            cut.gaps()
        );
        for r in 40..=50 {
            assert_eq!(
                cut.base_for(r),
                Some(40),
                "after {k} deletions, revision {r}"
            );
        }
        // The store works again: the next run finishes the job.
        let healed = Arc::new(store.with_fault(Fault::None).await.unwrap());
        let next = prune(&self::archive(&healed), &keep_last(1), true, Mode::Hidden)
            .await
            .unwrap();
        assert_eq!(
            next.deleted,
            planned.delete.len() - k,
            "after {k} deletions"
        );
        assert_eq!(
            chain(&self::archive(&healed)).await.restorable(),
            planned.restorable_after
        );
    }
}

#[tokio::test]
async fn calendar_rules_read_snapshot_times_from_headers() {
    let store = faulty(Fault::None).await;
    let archive = archive(&store);
    let policy = Policy {
        keep_periods: [(Period::Daily, 2)].into_iter().collect(),
        ..Policy::default()
    };
    let report = prune(&archive, &policy, false, Mode::Hidden).await.unwrap();
    let bases: Vec<Revision> = report.plan.kept.iter().map(|p| p.base).collect();
    assert_eq!(bases, vec![25, 40, 40], "{:?}", report.plan.kept);
    assert_eq!(report.plan.kept[0].reasons, vec!["keep-daily 2026-11-21"]);

    // A header that names another revision is refused, not trusted.
    let bad = SnapshotHeader {
        generation: 1,
        revision: 41,
        taken_ms: T0,
        db_bytes: 0,
        db_blake3: [0; 32],
        prev_digest: [0; 32],
        prev_revision: 0,
    };
    object_store::ObjectStoreExt::put(
        store.inner(),
        &object_store::path::Path::from(format!("a/{}", layout::snapshot_key(GenerationId(1), 25))),
        bad.encode().to_vec().into(),
    )
    .await
    .unwrap();
    let err = prune(&archive, &policy, true, Mode::Hidden)
        .await
        .unwrap_err();
    assert!(matches!(err, PruneError::Integrity(_)), "{err}");
    assert!(err.to_string().contains("revision 41"), "{err}");
    assert_eq!(
        chain(&archive).await.snapshots,
        vec![10, 25, 40],
        "nothing deleted"
    );
}

#[tokio::test]
async fn locked_objects_stay_and_are_reported_until_their_lock_expires() {
    let store = faulty(Fault::None).await;
    let archive = archive(&store);
    let g = GenerationId(1);
    let (snap10, snap25) = (layout::snapshot_key(g, 10), layout::snapshot_key(g, 25));
    let first_segment = layout::segment_key(g, &seg(11, 20, T0 + 1));
    let hour_ahead = crate::now_ms() + 3_600_000;
    lock(
        &store,
        &snap10,
        Some(until(RetentionMode::Compliance, hour_ahead)),
    );
    let hold = Retention {
        period: None,
        legal_hold: true,
    };
    lock(&store, &snap25, Some(hold));
    // Expired: deleted like any other object.
    lock(
        &store,
        &first_segment,
        Some(until(RetentionMode::Governance, crate::now_ms() - 1000)),
    );

    let dry = prune(&archive, &keep_last(1), false, Mode::Hidden)
        .await
        .unwrap();
    assert!(dry.retained.is_empty());
    assert_eq!(store.lock_lookups(), 0, "a dry run asks nothing");

    let report = prune(&archive, &keep_last(1), true, Mode::Hidden)
        .await
        .unwrap();
    assert_eq!(
        report.retained,
        vec![
            Retained {
                object: snap10.clone(),
                retention: until(RetentionMode::Compliance, hour_ahead),
            },
            Retained {
                object: snap25.clone(),
                retention: hold,
            },
        ]
    );
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert_eq!(report.deleted, report.plan.delete.len() - 2);
    assert_eq!(
        store.lock_lookups(),
        1 + report.plan.delete.len(),
        "the bucket once, then each doomed object"
    );
    // Still there (not hidden behind a delete marker), and the archive is
    // sound: the pruned range is recorded, the leftovers are harmless.
    let after = chain(&archive).await;
    assert_eq!(
        after.snapshots,
        vec![10, 40],
        "25 lies inside the pruned range"
    );
    assert!(after.gaps().is_empty(), "{:?}", after.gaps());
    assert_eq!(after.pruned_gaps().len(), 1);
    assert!(!archive.exists(&first_segment).await.unwrap());

    // Later: the date has passed and the hold is lifted.
    lock(
        &store,
        &snap10,
        Some(until(RetentionMode::Compliance, crate::now_ms())),
    );
    lock(&store, &snap25, None);
    let later = prune(&archive, &keep_last(1), true, Mode::Hidden)
        .await
        .unwrap();
    assert!(later.retained.is_empty(), "{:?}", later.retained);
    assert_eq!(later.deleted, 2, "{:?}", later.plan.delete);
    assert_eq!(chain(&archive).await.snapshots, vec![40]);
}

#[tokio::test]
async fn a_bucket_without_object_lock_costs_one_question_per_prune() {
    let store = faulty(Fault::None).await;
    let report = prune(&archive(&store), &keep_last(1), true, Mode::Hidden)
        .await
        .unwrap();
    assert_eq!(report.deleted, 7);
    assert_eq!(store.lock_lookups(), 1);
}
