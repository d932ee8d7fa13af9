//! Retention plans on simulated archives: random chains, random policies,
//! and prunes interrupted after every deletion.

use super::*;
use crate::layout::GenerationObject;
use crate::manifest::{GenerationManifest, StartReason};

const HOUR_MS: i64 = 3_600_000;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn manifest(id: u64, start: Revision, started_ms: i64) -> GenerationManifest {
    GenerationManifest {
        generation: GenerationId(id),
        cluster_id: 1,
        start_revision: start,
        started_ms,
        reason: StartReason::NewArchive,
        previous: None,
        detail: String::new(),
        term: 0,
        previous_digest: None,
    }
}

/// A random archive of one to three generations: contiguous segments of
/// random length (some progress-only, some duplicated by a second writer),
/// base snapshots at random revisions with their lineage records, times
/// advancing from `t0` by minutes to hours. Returns the listing and the
/// snapshots' times.
fn random_archive(rng: &mut Rng) -> (ArchiveListing, BTreeMap<(GenerationId, Revision), i64>) {
    let mut listing = ArchiveListing::default();
    let mut times = BTreeMap::new();
    let mut now = 1_700_000_000_000 + rng.below(1000) as i64 * HOUR_MS;
    let mut rev: Revision = 1 + rng.below(20) as i64;
    for id in 1..=1 + rng.below(3) {
        let g = GenerationId(id);
        let mut gl = GenerationListing {
            id: Some(g),
            manifest: Some(manifest(id, rev, now)),
            ..GenerationListing::default()
        };
        // The generation's first base snapshot sits at its start.
        if rng.chance(90) {
            gl.snapshots.push(rev);
            gl.lineage.push(rev);
            times.insert((g, rev), now);
        }
        for _ in 0..rng.below(30) {
            now += 60_000 * (1 + rng.below(180) as i64);
            let name = if rng.chance(15) {
                SegmentName {
                    first: rev + 1,
                    last: rev,
                    end_ms: now,
                }
            } else {
                let n = 1 + rng.below(10) as i64;
                let s = SegmentName {
                    first: rev + 1,
                    last: rev + n,
                    end_ms: now,
                };
                rev += n;
                s
            };
            gl.segments.push(name);
            if !name.is_empty() && rng.chance(10) {
                // A second writer's copy of the same revisions.
                gl.segments.push(SegmentName {
                    end_ms: now - 1,
                    ..name
                });
            }
            if rng.chance(30) {
                let at = rev - rng.below(3) as i64;
                if !gl.snapshots.contains(&at) && at > gl.manifest.as_ref().unwrap().start_revision
                {
                    gl.snapshots.push(at);
                    times.insert((g, at), now);
                    if rng.chance(80) {
                        gl.lineage.push(at);
                    }
                }
            }
        }
        gl.segments.sort();
        gl.snapshots.sort_unstable();
        gl.lineage.sort_unstable();
        listing.generations.push(gl);
        // A new generation starts later, at a later revision.
        rev += 1 + rng.below(50) as i64;
        now += HOUR_MS * (1 + rng.below(48) as i64);
    }
    (listing, times)
}

fn random_policy(rng: &mut Rng) -> Policy {
    let mut p = Policy::default();
    if rng.chance(40) {
        p.keep_within_ms = Some(rng.below(72) as i64 * HOUR_MS + rng.below(HOUR_MS as u64) as i64);
    }
    if rng.chance(40) {
        p.keep_last = Some(1 + rng.below(5) as u32);
    }
    for period in Period::ALL {
        if rng.chance(20) {
            p.keep_periods.insert(period, 1 + rng.below(4) as u32);
        }
    }
    p
}

/// The listing once `deleted` keys are gone and `records` are written.
fn apply(
    listing: &ArchiveListing,
    records: &[(GenerationId, PrunedRange)],
    deleted: &[String],
) -> ArchiveListing {
    let mut out = listing.clone();
    for g in &mut out.generations {
        let id = g.generation();
        g.segments
            .retain(|s| !deleted.contains(&layout::segment_key(id, s)));
        g.snapshots
            .retain(|&s| !deleted.contains(&layout::snapshot_key(id, s)));
        g.lineage
            .retain(|&r| !deleted.contains(&layout::lineage_key(id, r)));
        g.pruned
            .extend(records.iter().filter(|(rg, _)| *rg == id).map(|(_, r)| *r));
    }
    out
}

fn restorable(listing: &ArchiveListing, g: GenerationId, revision: Revision) -> bool {
    listing
        .generations
        .iter()
        .filter(|l| l.id == Some(g))
        .any(|l| Chain::of(l).base_for(revision).is_some())
}

/// Every kept point is whole in `listing`: each of its revisions restores,
/// and no hole counts as damage.
fn check_kept(listing: &ArchiveListing, plan: &PrunePlan, context: &str) {
    for p in &plan.kept {
        for r in p.base..=p.through {
            assert!(
                restorable(listing, p.generation, r),
                "{context}: kept point {p:?} lost revision {r}"
            );
        }
    }
    for g in &listing.generations {
        assert!(
            Chain::of(g).gaps().is_empty(),
            "{context}: generation {} shows damage {:?}",
            g.generation(),
            Chain::of(g).gaps()
        );
    }
}

#[test]
fn random_archives_keep_every_kept_point_through_any_interruption() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut deletions, mut records, mut whole) = (0, 0, 0);
    for case in 0..400 {
        let (listing, times) = random_archive(&mut rng);
        let policy = random_policy(&mut rng);
        let plan = plan(&listing, &policy, &times);
        let context = format!("case {case}, policy {policy}");
        deletions += plan.delete.len();
        records += plan.records.len();
        whole += usize::from(listing.generations.iter().any(|g| {
            !g.snapshots.is_empty() && plan.kept.iter().all(|p| p.generation != g.generation())
        }));
        check_kept(&listing, &plan, &context);
        if policy.is_empty() {
            assert!(
                plan.delete.is_empty() && plan.records.is_empty(),
                "{context}"
            );
            continue;
        }
        // Nothing a kept point needs is deleted.
        for key in &plan.delete {
            let (g, object) = layout::classify(key).expect("a layout key");
            let points: Vec<&KeptPoint> = plan.kept.iter().filter(|p| p.generation == g).collect();
            match object {
                GenerationObject::Segment(s) => assert!(!needed(&s, &points), "{context}: {key}"),
                GenerationObject::Snapshot(s) | GenerationObject::Lineage(s) => {
                    assert!(points.iter().all(|p| p.base != s), "{context}: {key}");
                }
                other => panic!("{context}: plan deletes {other:?}"),
            }
        }
        // Records first, then deletions in order, interrupted anywhere.
        for done in 0..=plan.delete.len() {
            let state = apply(&listing, &plan.records, &plan.delete[..done]);
            check_kept(&state, &plan, &format!("{context}, after {done} deletions"));
        }
        // Once done, the plan's own account of what is restorable holds,
        // and a second prune with the same policy keeps the same points
        // and finds nothing more to delete.
        let after = apply(&listing, &plan.records, &plan.delete);
        let ranges: Vec<RestorableRange> = after
            .generations
            .iter()
            .flat_map(|g| Chain::of(g).restorable())
            .collect();
        assert_eq!(ranges, plan.restorable_after, "{context}");
        let again = super::plan(&after, &policy, &times);
        assert!(
            again.delete.is_empty(),
            "{context}: second prune deletes {:?}",
            again.delete
        );
        assert!(
            again.records.is_empty(),
            "{context}: second prune records {:?}",
            again.records
        );
        check_policy(&listing, &policy, &times, &plan, &context);
    }
    // The cases exercised what they are for.
    assert!(
        deletions > 1000 && records > 200 && whole > 20,
        "{deletions} {records} {whole}"
    );
}

/// The policy's own promises, checked from the original listing.
fn check_policy(
    listing: &ArchiveListing,
    policy: &Policy,
    times: &BTreeMap<(GenerationId, Revision), i64>,
    plan: &PrunePlan,
    context: &str,
) {
    let bases: BTreeSet<(GenerationId, Revision)> =
        plan.kept.iter().map(|p| (p.generation, p.base)).collect();
    let mut snapshots: Vec<(GenerationId, Revision)> = listing
        .generations
        .iter()
        .flat_map(|g| g.snapshots.iter().map(|&s| (g.generation(), s)))
        .collect();
    snapshots.sort_unstable();
    if let Some(n) = policy.keep_last {
        for s in snapshots.iter().rev().take(n as usize) {
            assert!(bases.contains(s), "{context}: keep-last lost {s:?}");
        }
    }
    // The newest restorable revision stays restorable.
    let before: Vec<RestorableRange> = listing
        .generations
        .iter()
        .flat_map(|g| Chain::of(g).restorable())
        .collect();
    if let Some(last) = before.last() {
        assert!(
            plan.restorable_after
                .iter()
                .any(|r| r.generation == last.generation && r.last == last.last),
            "{context}: the head {last:?} is no longer restorable"
        );
    }
    if let Some(within) = policy.keep_within_ms {
        let newest = listing
            .generations
            .iter()
            .map(|g| Chain::of(g).end_ms())
            .max()
            .unwrap_or(0);
        for g in &listing.generations {
            let chain = Chain::of(g);
            for link in chain.links.iter().filter(|l| l.end_ms >= newest - within) {
                // The state at every moment of the link's span.
                for r in link.prev()..=link.last {
                    if chain.base_for(r).is_some() {
                        assert!(
                            plan.restorable_after
                                .iter()
                                .any(|x| x.generation == g.generation()
                                    && x.first <= r
                                    && r <= x.last),
                            "{context}: revision {r} of generation {} was within the window",
                            g.generation()
                        );
                    }
                }
            }
        }
    }
    for (&period, &n) in &policy.keep_periods {
        // The newest n periods holding a snapshot each keep their last one.
        let mut by_period: BTreeMap<String, (i64, GenerationId, Revision)> = BTreeMap::new();
        for &(g, s) in &snapshots {
            let t = times[&(g, s)];
            let e = by_period.entry(period.of(t)).or_insert((t, g, s));
            if (t, g, s) > *e {
                *e = (t, g, s);
            }
        }
        for (_, &(_, g, s)) in by_period.iter().rev().take(n as usize) {
            assert!(
                bases.contains(&(g, s)),
                "{context}: keep-{} lost {s}",
                period.word()
            );
        }
    }
}

#[test]
fn periods_are_utc_calendar_periods() {
    // 2026-11-26T02:42:48Z, a Thursday of ISO week 48.
    let t = 1_795_660_968_000;
    assert_eq!(Period::Hourly.of(t), "2026-11-26T02");
    assert_eq!(Period::Daily.of(t), "2026-11-26");
    assert_eq!(Period::Weekly.of(t), "2026-W48");
    assert_eq!(Period::Monthly.of(t), "2026-11");
    assert_eq!(Period::Yearly.of(t), "2026");
    // 2027-01-01 is a Friday: ISO week 53 of 2026.
    assert_eq!(Period::Weekly.of(1_798_761_600_000), "2026-W53");
}

#[test]
fn keep_last_one_prunes_to_the_newest_snapshot_and_records_the_cut() {
    let g = GenerationId(1);
    let seg = |first, last, end_ms| SegmentName {
        first,
        last,
        end_ms,
    };
    let listing = ArchiveListing {
        generations: vec![GenerationListing {
            id: Some(g),
            manifest: Some(manifest(1, 10, 0)),
            snapshots: vec![10, 25],
            segments: vec![seg(11, 20, 1), seg(21, 30, 2), seg(31, 30, 3)],
            lineage: vec![10, 25],
            ..GenerationListing::default()
        }],
        ..ArchiveListing::default()
    };
    let policy = Policy {
        keep_last: Some(1),
        ..Policy::default()
    };
    let plan = plan(&listing, &policy, &BTreeMap::new());
    assert_eq!(
        plan.kept,
        vec![
            KeptPoint {
                generation: g,
                base: 25,
                through: 25,
                reasons: vec!["keep-last".into()],
            },
            KeptPoint {
                generation: g,
                base: 25,
                through: 30,
                reasons: vec!["newest".into()],
            }
        ]
    );
    assert_eq!(
        plan.records,
        vec![(
            g,
            PrunedRange {
                first: 11,
                last: 20
            }
        )]
    );
    assert_eq!(
        plan.delete,
        vec![
            layout::segment_key(g, &seg(11, 20, 1)),
            layout::snapshot_key(g, 10),
            layout::lineage_key(g, 10),
        ]
    );
    assert_eq!(
        plan.restorable_after,
        vec![RestorableRange {
            generation: g,
            first: 25,
            last: 30,
            end_ms: 3
        }]
    );
    // No policy deletes nothing.
    assert!(super::plan(&listing, &Policy::default(), &BTreeMap::new())
        .delete
        .is_empty());
}
