//! Restore planning: a pure function of the archive listing and the target.
//!
//! What is restorable is decided by the chain rules in
//! [`etcdpitr_common::chain`]; the newest usable base snapshot is chosen
//! (least replay). Revision
//! numbers can repeat across generations (the source was restored
//! underneath the archiver), so the newest generation holding R wins unless
//! a generation is named.

use etcdpitr_common::chain::describe;
pub use etcdpitr_common::chain::RestorableRange;
use etcdpitr_common::layout::{GenerationId, PrunedRange, SegmentName};
use etcdpitr_common::listing::{ArchiveListing, GenerationListing};
use etcdpitr_common::Revision;
use thiserror::Error;

/// Why a target cannot be restored.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    /// The archive has no restorable revision at all.
    #[error("the archive holds no restorable revision yet (no base snapshot with its chain)")]
    Empty,
    /// The generation named does not exist.
    #[error("generation {0} does not exist in the archive")]
    NoSuchGeneration(GenerationId),
    /// Before the first base snapshot.
    #[error("revision {target} is before the first restorable revision; restorable: {}", describe(.ranges))]
    BeforeFirst {
        /// Requested revision.
        target: Revision,
        /// Restorable ranges.
        ranges: Vec<RestorableRange>,
    },
    /// After the last archived revision.
    #[error("revision {target} is beyond the last archived revision; restorable: {}", describe(.ranges))]
    BeyondLast {
        /// Requested revision.
        target: Revision,
        /// Restorable ranges.
        ranges: Vec<RestorableRange>,
    },
    /// A `--time` the archive cannot place.
    #[error("time {time} {why}; restorable: {}", describe(.ranges))]
    TimeNotCovered {
        /// Requested time (RFC 3339).
        time: String,
        /// Why (before the archive, after it, in a gap).
        why: String,
        /// Restorable ranges.
        ranges: Vec<RestorableRange>,
    },
    /// A `--time` that a recorded wall-clock step of the archiver makes
    /// ambiguous: the revision observed last before it may have been
    /// committed after it, or the next one before it.
    #[error("time {time} cannot be placed on one revision because the archiver's wall clock stepped: {detail}; restore a revision you choose with --revision instead")]
    ClockStep {
        /// Requested time (RFC 3339).
        time: String,
        /// The step (generation, epoch, revision, size, times) and the
        /// revisions around the time.
        detail: String,
    },
    /// Retention deleted what restoring the target needs.
    #[error("revision {target} was pruned by the archive's retention policy (generation {generation}, revisions {pruned}); restorable: {}", describe(.ranges))]
    Pruned {
        /// Requested revision.
        target: Revision,
        /// The generation it was pruned from.
        generation: GenerationId,
        /// The pruned range holding it.
        pruned: PrunedRange,
        /// Restorable ranges.
        ranges: Vec<RestorableRange>,
    },
    /// Inside a gap between generations or inside a generation.
    #[error("revision {target} falls in a gap of the archive; restorable: {}", describe(.ranges))]
    InGap {
        /// Requested revision.
        target: Revision,
        /// Restorable ranges.
        ranges: Vec<RestorableRange>,
    },
    /// Two points each restorable, but not in one restorable range: a gap
    /// or a generation boundary lies between them.
    #[error("revisions {from} and {to} do not lie in one restorable range (a gap or a generation boundary lies between them); restorable: {}", describe(.ranges))]
    SpanBroken {
        /// The earlier point.
        from: Revision,
        /// The later point.
        to: Revision,
        /// Restorable ranges.
        ranges: Vec<RestorableRange>,
    },
}

/// What a restore will do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    /// Generation restored from.
    pub generation: GenerationId,
    /// Base snapshot revision.
    pub snapshot_revision: Revision,
    /// Segments to replay, in order (they cover `snapshot_revision + 1..=target`).
    pub segments: Vec<SegmentName>,
    /// The target revision.
    pub target: Revision,
}

impl RestorePlan {
    /// The revisions the plan replays onto its base snapshot.
    pub fn replay(&self) -> Replay {
        Replay {
            generation: self.generation,
            after: self.snapshot_revision,
            last: self.target,
            segments: self.segments.clone(),
        }
    }
}

/// Revisions `after + 1 ..= last` of one generation and the links holding
/// them, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    /// The generation.
    pub generation: GenerationId,
    /// The revisions start after this one …
    pub after: Revision,
    /// … and end with this one.
    pub last: Revision,
    /// The links holding them.
    pub segments: Vec<SegmentName>,
}

/// The changes between two restorable points of one run of one generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanPlan {
    /// How to rebuild the state at the earlier point (its base snapshot and
    /// the revisions after it).
    pub from: RestorePlan,
    /// The changes: revisions `from + 1 ..= to`.
    pub changes: Replay,
}

impl SpanPlan {
    /// The earlier point.
    pub fn from_revision(&self) -> Revision {
        self.changes.after
    }

    /// The later point.
    pub fn to_revision(&self) -> Revision {
        self.changes.last
    }
}

/// All restorable ranges of the archive, oldest generation first.
pub fn ranges(listing: &ArchiveListing) -> Vec<RestorableRange> {
    listing
        .generations
        .iter()
        .flat_map(|g| g.chain().restorable())
        .collect()
}

/// The generations a plan may use: the one named, else all, newest first.
fn candidates(
    listing: &ArchiveListing,
    generation: Option<GenerationId>,
) -> Result<Vec<&GenerationListing>, PlanError> {
    Ok(match generation {
        Some(id) => vec![listing
            .generations
            .iter()
            .find(|g| g.id == Some(id))
            .ok_or(PlanError::NoSuchGeneration(id))?],
        None => listing.generations.iter().rev().collect(),
    })
}

/// Plans a restore of `target`, from `generation` if given, else from the
/// newest generation that can serve it.
///
/// # Errors
/// A [`PlanError`] naming why and what is restorable instead.
pub fn plan(
    listing: &ArchiveListing,
    target: Revision,
    generation: Option<GenerationId>,
) -> Result<RestorePlan, PlanError> {
    let all = ranges(listing);
    let candidates = candidates(listing, generation)?;
    for g in &candidates {
        let chain = g.chain();
        if let Some(snapshot_revision) = chain.base_for(target) {
            return Ok(RestorePlan {
                generation: g.generation(),
                snapshot_revision,
                segments: chain.links_between(snapshot_revision, target),
                target,
            });
        }
    }
    for g in &candidates {
        if let Some(&pruned) = g.pruned.iter().find(|r| r.contains(target)) {
            return Err(PlanError::Pruned {
                target,
                generation: g.generation(),
                pruned,
                ranges: all,
            });
        }
    }
    let scope: Vec<RestorableRange> = match generation {
        Some(id) => all.iter().filter(|r| r.generation == id).copied().collect(),
        None => all.clone(),
    };
    let (Some(first), Some(last)) = (
        scope.iter().map(|r| r.first).min(),
        scope.iter().map(|r| r.last).max(),
    ) else {
        return Err(PlanError::Empty);
    };
    let ranges = all;
    Err(if target < first {
        PlanError::BeforeFirst { target, ranges }
    } else if target > last {
        PlanError::BeyondLast { target, ranges }
    } else {
        PlanError::InGap { target, ranges }
    })
}

/// Plans the span between two points, both in one restorable range (no gap
/// or generation boundary between them): from `generation` if given, else
/// from the newest generation whose range holds both. A missing `from` is
/// the range's first restorable revision, a missing `to` its last; with
/// neither, the newest range (of `generation`) is taken whole.
///
/// # Errors
/// The [`PlanError`] of a point that is not restorable on its own, or
/// [`PlanError::SpanBroken`] when both are but no range holds both.
pub fn plan_span(
    listing: &ArchiveListing,
    from: Option<Revision>,
    to: Option<Revision>,
    generation: Option<GenerationId>,
) -> Result<SpanPlan, PlanError> {
    let all = ranges(listing);
    let candidates = candidates(listing, generation)?;
    let holds = |r: &RestorableRange, rev: Option<Revision>| {
        rev.is_none_or(|rev| r.first <= rev && rev <= r.last)
    };
    for g in &candidates {
        let chain = g.chain();
        let Some(range) = chain
            .restorable()
            .into_iter()
            .rev()
            .find(|r| holds(r, from) && holds(r, to))
        else {
            continue;
        };
        let (from, to) = (from.unwrap_or(range.first), to.unwrap_or(range.last));
        let base = chain
            .base_for(from)
            .expect("a revision of a restorable range has a base snapshot");
        return Ok(SpanPlan {
            from: RestorePlan {
                generation: g.generation(),
                snapshot_revision: base,
                segments: chain.links_between(base, from),
                target: from,
            },
            changes: Replay {
                generation: g.generation(),
                after: from,
                last: to,
                segments: chain.links_between(from, to),
            },
        });
    }
    for point in [from, to].into_iter().flatten() {
        plan(listing, point, generation)?;
    }
    match (from, to) {
        (Some(from), Some(to)) => Err(PlanError::SpanBroken {
            from,
            to,
            ranges: all,
        }),
        _ => Err(PlanError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first: Revision, last: Revision) -> SegmentName {
        SegmentName {
            first,
            last,
            end_ms: last * 10,
        }
    }

    fn gen(id: u64, snapshots: Vec<Revision>, segments: Vec<SegmentName>) -> GenerationListing {
        GenerationListing {
            id: Some(GenerationId(id)),
            manifest: None,
            snapshots,
            segments,
            ..GenerationListing::default()
        }
    }

    fn listing() -> ArchiveListing {
        ArchiveListing {
            manifest: None,
            strays: Vec::new(),
            foreign: Vec::new(),
            terms: Vec::new(),
            void: Vec::new(),
            generations: vec![
                // gen 1: chain 10..=100, snapshots at 12 and 50
                gen(
                    1,
                    vec![12, 50],
                    vec![seg(11, 40), seg(41, 40), seg(41, 100)],
                ),
                // gen 2: after a compaction gap, chain 300..=400 with a hole 351..=359
                gen(2, vec![300], vec![seg(301, 350), seg(360, 400)]),
            ],
        }
    }

    #[test]
    fn picks_newest_snapshot_and_needed_segments() {
        let p = plan(&listing(), 60, None).unwrap();
        assert_eq!(p.generation, GenerationId(1));
        assert_eq!(p.snapshot_revision, 50);
        assert_eq!(p.segments, vec![seg(41, 100)]);
        let p = plan(&listing(), 12, None).unwrap();
        assert_eq!(p.snapshot_revision, 12);
        assert!(p.segments.is_empty());
        let p = plan(&listing(), 30, None).unwrap();
        assert_eq!((p.snapshot_revision, p.segments.len()), (12, 1));
        let p = plan(&listing(), 350, None).unwrap();
        assert_eq!(p.generation, GenerationId(2));
    }

    #[test]
    fn a_span_lies_in_one_range_and_defaults_to_its_ends() {
        let l = listing();
        let s = plan_span(&l, Some(60), Some(90), None).unwrap();
        assert_eq!((s.from_revision(), s.to_revision()), (60, 90));
        assert_eq!(s.from, plan(&l, 60, None).unwrap());
        assert_eq!(s.changes.generation, GenerationId(1));
        assert_eq!(s.changes.segments, vec![seg(41, 100)]);
        // The state at the first restorable revision is the base snapshot.
        let s = plan_span(&l, None, Some(30), None).unwrap();
        assert_eq!((s.from_revision(), s.to_revision()), (12, 30));
        assert!(s.from.segments.is_empty());
        assert_eq!(s.changes.segments, vec![seg(11, 40)]);
        let s = plan_span(&l, Some(20), None, None).unwrap();
        assert_eq!((s.from_revision(), s.to_revision()), (20, 100));
        // Neither: the newest range whole, or the named generation's.
        let s = plan_span(&l, None, None, None).unwrap();
        assert_eq!(
            (s.changes.generation, s.from_revision(), s.to_revision()),
            (GenerationId(2), 300, 350)
        );
        let s = plan_span(&l, None, None, Some(GenerationId(1))).unwrap();
        assert_eq!((s.from_revision(), s.to_revision()), (12, 100));
        let s = plan_span(&l, Some(70), Some(70), None).unwrap();
        assert!(s.changes.segments.is_empty());
    }

    #[test]
    fn a_span_across_a_gap_or_outside_the_archive_is_refused() {
        let l = listing();
        let e = plan_span(&l, Some(50), Some(320), None).unwrap_err();
        assert!(matches!(
            e,
            PlanError::SpanBroken {
                from: 50,
                to: 320,
                ..
            }
        ));
        assert!(
            e.to_string()
                .contains("generation 1: 12..=100; generation 2: 300..=350"),
            "{e}"
        );
        assert!(matches!(
            plan_span(&l, Some(5), Some(50), None),
            Err(PlanError::BeforeFirst { target: 5, .. })
        ));
        assert!(matches!(
            plan_span(&l, Some(310), Some(380), None),
            Err(PlanError::InGap { target: 380, .. } | PlanError::BeyondLast { .. })
        ));
        assert!(matches!(
            plan_span(&l, None, Some(200), None),
            Err(PlanError::InGap { target: 200, .. })
        ));
        assert!(matches!(
            plan_span(&l, Some(60), None, Some(GenerationId(2))),
            Err(PlanError::BeforeFirst { .. })
        ));
        assert_eq!(
            plan_span(&ArchiveListing::default(), None, None, None),
            Err(PlanError::Empty)
        );
    }

    #[test]
    fn refusals_are_typed_and_name_the_ranges() {
        let l = listing();
        assert!(matches!(
            plan(&l, 5, None),
            Err(PlanError::BeforeFirst { .. })
        ));
        assert!(matches!(
            plan(&l, 11, None),
            Err(PlanError::BeforeFirst { .. })
        ));
        assert!(matches!(
            plan(&l, 401, None),
            Err(PlanError::BeyondLast { .. })
        ));
        let gap = plan(&l, 200, None).unwrap_err();
        assert!(matches!(gap, PlanError::InGap { .. }));
        assert!(
            gap.to_string()
                .contains("generation 1: 12..=100; generation 2: 300..=350"),
            "{gap}"
        );
        assert!(matches!(
            plan(&l, 355, None),
            Err(PlanError::BeyondLast { .. } | PlanError::InGap { .. })
        ));
        assert!(matches!(
            plan(&l, 60, Some(GenerationId(2))),
            Err(PlanError::BeforeFirst { .. })
        ));
        assert_eq!(
            plan(&l, 60, Some(GenerationId(9))),
            Err(PlanError::NoSuchGeneration(GenerationId(9)))
        );
        assert_eq!(
            plan(&ArchiveListing::default(), 1, None),
            Err(PlanError::Empty)
        );
    }

    #[test]
    fn a_pruned_target_is_named_as_pruned() {
        // Retention deleted snapshot 12 and segment 11..=40 of generation 1.
        let mut l = listing();
        let g = &mut l.generations[0];
        g.snapshots.retain(|&s| s != 12);
        g.segments.retain(|&s| s != seg(11, 40));
        let pruned = PrunedRange {
            first: 11,
            last: 40,
        };
        g.pruned.push(pruned);
        let err = plan(&l, 30, None).unwrap_err();
        assert_eq!(
            err,
            PlanError::Pruned {
                target: 30,
                generation: GenerationId(1),
                pruned,
                ranges: ranges(&l),
            }
        );
        assert!(
            err.to_string().contains("was pruned") && err.to_string().contains("50..=100"),
            "{err}"
        );
        assert_eq!(plan(&l, 50, None).unwrap().snapshot_revision, 50);
    }
}
