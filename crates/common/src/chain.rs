//! The archive's chain rules: the one place that decides which segments of a
//! generation form its history, where that history has holes, which objects
//! are superseded duplicates, and which revisions are restorable.
//!
//! The archiver (where to resume), every restorer command (list, restore,
//! export, verify), retention and the tests call this module; none of them
//! re-derives "what is restorable".
//!
//! Rules, decided from object names alone:
//! - A generation's chain starts after its manifest's `start_revision`.
//! - A segment `first..=last` links onto the chain at revision `cur` when
//!   `first <= cur + 1` and `last > cur`. Among the segments that can link at
//!   `cur`, the one reaching furthest is taken (then the latest `end_ms`);
//!   the others are *superseded*: every revision they hold is also held by
//!   the chain. Several archivers, or a retried upload after a crash, leave
//!   such overlaps; they are benign when the overlapping revisions hold the
//!   same events (`verify` reads them and checks, see [`revision_digest`]),
//!   and an integrity error naming both objects when they do not.
//! - A progress-only segment (`first == last + 1`) at the chain's end links
//!   when it vouches for a later time.
//! - When no segment links at `cur` but later ones exist, revisions up to the
//!   next segment's `first - 1` are a [`Gap`]; the chain resumes there as a
//!   new [`Run`].
//! - A hole covered by retention records (`pruned/` objects, written before
//!   retention deletes anything) is pruned history, not damage: it separates
//!   runs like a gap, but [`Chain::gaps`] leaves it out ([`Chain::pruned_gaps`]
//!   lists it). Segments inside such a range (left by an interrupted prune
//!   or kept by a lock) and snapshots strictly inside it are not part of
//!   the chain: what retention declared gone is never restored from them.
//! - A restore point R needs a base snapshot S <= R inside the same run as R
//!   (or R == S): see [`Chain::restorable`].
//! - Observed times come from one clock epoch per writer process and
//!   generation (`clock/` objects). A revision belongs to the epoch with the
//!   greatest first revision at or below it. Its true commit time lies in
//!   `[observed + min(0, o), observed + max(0, o)]` over the offsets `o` of
//!   every wall-clock step recorded in its epoch (the anchor may have been
//!   wrong from the start, or the new wall reading may be): see
//!   [`Timeline`]. A `--time` answer that these intervals make ambiguous is
//!   refused ([`check_time_choice`]).

use std::fmt;

use thiserror::Error;

use crate::layout::{GenerationId, PrunedRange, SegmentName};
use crate::listing::GenerationListing;
use crate::manifest::ClockStep;
use crate::segment::{EventKind, RevisionRecord, SegmentHeader};
use crate::Revision;

/// An archive object failed an integrity rule. Callers map this type (not
/// its text) to "the archive is damaged" (the restorer's exit code 4).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{object}: {reason} (object is corrupted or was altered)")]
pub struct IntegrityError {
    /// The object (archive-relative key) at fault.
    pub object: String,
    /// What is wrong with it.
    pub reason: String,
}

impl IntegrityError {
    /// An integrity error about `object`.
    pub fn new(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            object: object.into(),
            reason: reason.into(),
        }
    }
}

/// Revisions missing inside a generation: `after + 1 ..= resumes_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    /// Last revision held before the gap.
    pub after: Revision,
    /// The chain resumes after this revision (the first missing revision
    /// is `after + 1`, the first held again is `resumes_after + 1`).
    pub resumes_after: Revision,
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "revisions {}..={} are missing",
            self.after + 1,
            self.resumes_after
        )
    }
}

/// A contiguous stretch of the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The run holds every revision after this one …
    pub after: Revision,
    /// … through this one.
    pub last: Revision,
    /// Latest wall-clock time (Unix ms) the run vouches for (0 if none).
    pub end_ms: i64,
    /// Index of its first link in [`Chain::links`].
    pub first_link: usize,
    /// Index one past its last link.
    pub end_link: usize,
}

/// A restorable stretch of revisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestorableRange {
    /// Generation.
    pub generation: GenerationId,
    /// First restorable revision (the oldest usable base snapshot).
    pub first: Revision,
    /// Last restorable revision.
    pub last: Revision,
    /// Latest time (Unix ms) the archive vouches for in this range (0 if
    /// no segment vouches for one).
    pub end_ms: i64,
}

impl fmt::Display for RestorableRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "generation {}: {}..={}",
            self.generation, self.first, self.last
        )
    }
}

/// Lists restorable ranges as text for messages.
pub fn describe(ranges: &[RestorableRange]) -> String {
    if ranges.is_empty() {
        return "none".into();
    }
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One generation's chain, chosen from its segment names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// The generation.
    pub generation: GenerationId,
    /// The chain starts after this revision.
    pub start: Revision,
    /// The chosen segments, in chain order.
    pub links: Vec<SegmentName>,
    /// Contiguous runs of `links`; more than one means gaps.
    pub runs: Vec<Run>,
    /// Segments not on the chain: every revision they hold is also held by
    /// a link (duplicates from another writer or a retried upload).
    pub superseded: Vec<SegmentName>,
    /// Base snapshot revisions, ascending.
    pub snapshots: Vec<Revision>,
    /// Revision ranges retention deleted on purpose, ascending.
    pub pruned: Vec<PrunedRange>,
    /// Segments left inside pruned ranges (a prune interrupted, or an
    /// object a lock kept): never part of the chain, so nothing that
    /// retention declared gone is restored from them.
    pub leftovers: Vec<SegmentName>,
}

impl Chain {
    /// Chooses the chain of a listed generation (see the module rules).
    pub fn of(g: &GenerationListing) -> Self {
        let start = g.manifest.as_ref().map(|m| m.start_revision);
        let inside = |r: Revision| g.pruned.iter().any(|p| p.first <= r && r < p.last);
        let (leftovers, segments): (Vec<SegmentName>, Vec<SegmentName>) =
            g.segments.iter().partition(|s| {
                if s.is_empty() {
                    inside(s.last)
                } else {
                    g.pruned
                        .iter()
                        .any(|p| p.first <= s.first && s.last <= p.last)
                }
            });
        let snapshots: Vec<Revision> = g
            .snapshots
            .iter()
            .copied()
            .filter(|&r| !inside(r))
            .collect();
        let mut chain =
            Self::build(g.generation(), start, &segments, &snapshots).with_pruned(&g.pruned);
        chain.leftovers = leftovers;
        chain
    }

    /// The same chain, with holes inside `pruned` ranges counted as pruned.
    #[must_use]
    pub fn with_pruned(mut self, pruned: &[PrunedRange]) -> Self {
        self.pruned = pruned.to_vec();
        self.pruned.sort_unstable();
        self.pruned.dedup();
        self
    }

    /// Chooses the chain of `segments` (in any order) starting after
    /// `start`; without a start, after the first segment's predecessor.
    pub fn build(
        generation: GenerationId,
        start: Option<Revision>,
        segments: &[SegmentName],
        snapshots: &[Revision],
    ) -> Self {
        let mut segs = segments.to_vec();
        segs.sort();
        segs.dedup();
        let mut snapshots = snapshots.to_vec();
        snapshots.sort_unstable();
        snapshots.dedup();
        let start = start.or_else(|| segs.first().map(SegmentName::prev));
        let mut chain = Self {
            generation,
            start: start.unwrap_or(0),
            links: Vec::new(),
            runs: Vec::new(),
            superseded: Vec::new(),
            snapshots,
            pruned: Vec::new(),
            leftovers: Vec::new(),
        };
        let Some(mut cur) = start else {
            return chain;
        };
        let mut run = Run {
            after: cur,
            last: cur,
            end_ms: 0,
            first_link: 0,
            end_link: 0,
        };
        let mut i = 0;
        while i < segs.len() {
            let mut best: Option<SegmentName> = None;
            while i < segs.len() && segs[i].prev() <= cur {
                let s = segs[i];
                i += 1;
                if s.last > cur {
                    match best {
                        Some(b) if (b.last, b.end_ms) >= (s.last, s.end_ms) => {
                            chain.superseded.push(s);
                        }
                        Some(b) => {
                            chain.superseded.push(b);
                            best = Some(s);
                        }
                        None => best = Some(s),
                    }
                } else if s.is_empty() && s.last == cur && s.end_ms > run.end_ms {
                    chain.links.push(s);
                    run.end_ms = s.end_ms;
                } else {
                    chain.superseded.push(s);
                }
            }
            if let Some(b) = best {
                chain.links.push(b);
                cur = b.last;
                run.last = cur;
                run.end_ms = run.end_ms.max(b.end_ms);
                continue;
            }
            if i < segs.len() {
                // Nothing links at `cur`: a hole up to the next segment.
                run.end_link = chain.links.len();
                if run.end_link > run.first_link || chain.runs.is_empty() {
                    chain.runs.push(run);
                }
                cur = segs[i].prev();
                run = Run {
                    after: cur,
                    last: cur,
                    end_ms: 0,
                    first_link: chain.links.len(),
                    end_link: chain.links.len(),
                };
            }
        }
        run.end_link = chain.links.len();
        chain.runs.push(run);
        chain.superseded.sort();
        chain
    }

    /// The last revision the chain holds (the start if it holds none).
    pub fn last_revision(&self) -> Revision {
        self.runs.last().map_or(self.start, |r| r.last)
    }

    /// The latest time any link vouches for (0 if none).
    pub fn end_ms(&self) -> i64 {
        self.runs.iter().map(|r| r.end_ms).max().unwrap_or(0)
    }

    /// Holes inside the chain that retention did not make (damage), oldest
    /// first, including missing first segments (the first run starting
    /// after the generation's start).
    pub fn gaps(&self) -> Vec<Gap> {
        self.holes()
            .into_iter()
            .filter(|g| !self.is_pruned(g))
            .collect()
    }

    /// Holes retention made on purpose: every missing revision lies in a
    /// retention record's range.
    pub fn pruned_gaps(&self) -> Vec<Gap> {
        self.holes()
            .into_iter()
            .filter(|g| self.is_pruned(g))
            .collect()
    }

    /// Whether the retention records cover every revision `gap` misses.
    fn is_pruned(&self, gap: &Gap) -> bool {
        let mut next = gap.after + 1;
        for r in &self.pruned {
            if next > gap.resumes_after {
                break;
            }
            if r.first <= next && r.last >= next {
                next = r.last + 1;
            }
        }
        next > gap.resumes_after
    }

    /// Every hole, pruned or not.
    fn holes(&self) -> Vec<Gap> {
        let mut gaps = Vec::new();
        let mut before = self.start;
        for run in &self.runs {
            if run.after > before {
                gaps.push(Gap {
                    after: before,
                    resumes_after: run.after,
                });
            }
            before = before.max(run.last);
        }
        gaps
    }

    /// The run holding revision `revision` (or ending exactly at it).
    fn run_holding(&self, revision: Revision) -> Option<&Run> {
        self.runs
            .iter()
            .find(|r| r.after <= revision && revision <= r.last)
    }

    /// Restorable ranges, oldest first. A snapshot S inside a run makes
    /// S..=run end restorable; a snapshot outside every run restores only S.
    pub fn restorable(&self) -> Vec<RestorableRange> {
        let mut out: Vec<RestorableRange> = Vec::new();
        for &snap in &self.snapshots {
            let (last, end_ms) = self
                .run_holding(snap)
                .map_or((snap, 0), |r| (r.last, r.end_ms));
            match out.last_mut() {
                Some(range) if range.last >= snap => {
                    range.last = range.last.max(last);
                    range.end_ms = range.end_ms.max(end_ms);
                }
                _ => out.push(RestorableRange {
                    generation: self.generation,
                    first: snap,
                    last,
                    end_ms,
                }),
            }
        }
        out
    }

    /// The newest base snapshot that can serve `target`, if any.
    pub fn base_for(&self, target: Revision) -> Option<Revision> {
        let range = self
            .restorable()
            .into_iter()
            .find(|r| r.first <= target && target <= r.last)?;
        self.snapshots
            .iter()
            .copied()
            .filter(|&s| s >= range.first && s <= target)
            .max()
    }

    /// The links holding revisions `base + 1 ..= target`, in order (empty
    /// when `target == base`). Only meaningful when both lie in one run.
    pub fn links_between(&self, base: Revision, target: Revision) -> Vec<SegmentName> {
        if target <= base {
            return Vec::new();
        }
        self.links
            .iter()
            .filter(|s| !s.is_empty() && s.last > base && s.first <= target)
            .copied()
            .collect()
    }
}

/// Generations started by a writer that had already lost leadership, by
/// id: a generation is void when a later writer term began writing the
/// generation it follows (so that one was still being continued by the
/// rightful writer), or when the generation it follows is void. Terms are
/// claimed write-once in increasing order (see [`crate::manifest::TermRecord`]);
/// a generation started without an election carries term 0 and is void
/// only when the generation it follows is.
pub fn void_generations(generations: &[GenerationListing]) -> Vec<GenerationId> {
    let mut void: Vec<GenerationId> = Vec::new();
    for g in generations {
        let Some(m) = &g.manifest else { continue };
        let Some(previous) = m.previous else { continue };
        // A generation started without an election (term 0) is not fenced:
        // only an elected writer's generations can be void.
        let stale = void.contains(&previous.generation)
            || (m.term > 0
                && generations
                    .iter()
                    .find(|p| p.id == Some(previous.generation))
                    .is_some_and(|p| p.terms.iter().any(|&t| t > m.term)));
        if stale {
            void.push(g.generation());
        }
    }
    void
}

/// How far a revision's true commit time may lie from its observed time
/// because of recorded wall-clock steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeUncertainty {
    /// The true time may be up to this much earlier than observed (>= 0).
    pub back_ms: i64,
    /// The true time may be up to this much later than observed (>= 0).
    pub fwd_ms: i64,
}

/// A generation's clock epochs and the wall-clock steps recorded in them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timeline {
    /// First revisions of the epochs, ascending (including every step's).
    epochs: Vec<Revision>,
    /// Steps, in name order.
    steps: Vec<ClockStep>,
}

impl Timeline {
    /// A timeline of `epochs` (first revisions, from names) and `steps`
    /// (read from the step objects). A step's epoch counts even when its
    /// epoch object is missing.
    pub fn new(epochs: &[Revision], steps: &[ClockStep]) -> Self {
        let mut all: Vec<Revision> = epochs.to_vec();
        all.extend(steps.iter().map(|s| s.epoch_first));
        all.sort_unstable();
        all.dedup();
        let mut steps = steps.to_vec();
        steps.sort_by_key(ClockStep::name);
        Self { epochs: all, steps }
    }

    /// The first revision of the epoch holding `revision`; `None` for
    /// revisions archived before any epoch was recorded (older archives),
    /// whose times carry no recorded doubt.
    pub fn epoch_of(&self, revision: Revision) -> Option<Revision> {
        self.epochs.iter().rev().copied().find(|&e| e <= revision)
    }

    /// The steps recorded in the epoch holding `revision`.
    pub fn steps_for(&self, revision: Revision) -> impl Iterator<Item = &ClockStep> {
        let epoch = self.epoch_of(revision);
        self.steps
            .iter()
            .filter(move |s| Some(s.epoch_first) == epoch)
    }

    /// How far `revision`'s true time may lie from its observed time.
    pub fn uncertainty(&self, revision: Revision) -> TimeUncertainty {
        self.steps_for(revision)
            .fold(TimeUncertainty::default(), |u, s| TimeUncertainty {
                back_ms: u.back_ms.max(s.offset_ms.saturating_neg()),
                fwd_ms: u.fwd_ms.max(s.offset_ms),
            })
    }

    /// The step that lets `revision` be furthest earlier (`earlier`) or
    /// later than observed, if any does.
    pub fn widest_step(&self, revision: Revision, earlier: bool) -> Option<&ClockStep> {
        let steps = self.steps_for(revision);
        if earlier {
            steps
                .filter(|s| s.offset_ms < 0)
                .min_by_key(|s| s.offset_ms)
        } else {
            steps
                .filter(|s| s.offset_ms > 0)
                .max_by_key(|s| s.offset_ms)
        }
    }

    /// Whether any step is recorded.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// A revision and the time it was observed (Unix ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The revision.
    pub revision: Revision,
    /// Its observed time (Unix ms).
    pub observed_ms: i64,
}

/// Why a `--time` answer cannot be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeDoubt {
    /// The chosen revision (observed at or before the time) may have been
    /// committed after it.
    ChosenMayBeLater {
        /// The chosen revision.
        chosen: Observed,
        /// Its latest possible commit time (Unix ms).
        latest_ms: i64,
        /// The step that allows it.
        step: ClockStep,
    },
    /// The next revision (observed after the time) may have been committed
    /// at or before it.
    NextMayBeEarlier {
        /// The next revision.
        next: Observed,
        /// Its earliest possible commit time (Unix ms).
        earliest_ms: i64,
        /// The step that allows it.
        step: ClockStep,
    },
}

/// Checks a `--time` answer against the recorded clock steps: `chosen` is
/// the last revision observed at or before `time_ms` (`None` when it has no
/// observed time, e.g. the generation's base), `next` the revision after it
/// (`None` when not archived). Commit times grow with revisions, so these
/// two decide: the answer stands when `chosen` was surely committed at or
/// before the time and `next` surely after it.
///
/// # Errors
/// The [`TimeDoubt`] that makes the answer ambiguous.
pub fn check_time_choice(
    timeline: &Timeline,
    time_ms: i64,
    chosen: Option<Observed>,
    next: Option<Observed>,
) -> Result<(), TimeDoubt> {
    if let Some(chosen) = chosen {
        let latest_ms = chosen
            .observed_ms
            .saturating_add(timeline.uncertainty(chosen.revision).fwd_ms);
        if latest_ms > time_ms {
            if let Some(&step) = timeline.widest_step(chosen.revision, false) {
                return Err(TimeDoubt::ChosenMayBeLater {
                    chosen,
                    latest_ms,
                    step,
                });
            }
        }
    }
    if let Some(next) = next {
        let earliest_ms = next
            .observed_ms
            .saturating_sub(timeline.uncertainty(next.revision).back_ms);
        if earliest_ms <= time_ms {
            if let Some(&step) = timeline.widest_step(next.revision, true) {
                return Err(TimeDoubt::NextMayBeEarlier {
                    next,
                    earliest_ms,
                    step,
                });
            }
        }
    }
    Ok(())
}

/// Checks a segment's header against its name and generation.
///
/// # Errors
/// [`IntegrityError`] naming `object` when the header claims another
/// generation or another revision range than the name.
pub fn check_segment_header(
    object: &str,
    generation: GenerationId,
    name: &SegmentName,
    header: &SegmentHeader,
) -> Result<(), IntegrityError> {
    if header.generation != generation.0 {
        return Err(IntegrityError::new(
            object,
            format!(
                "header names generation {}, the object lies in generation {generation}",
                header.generation
            ),
        ));
    }
    if header.prev_revision != name.prev() || header.last_revision != name.last {
        return Err(IntegrityError::new(
            object,
            format!(
                "header holds revisions {}..={}, the name says {}..={}",
                header.prev_revision + 1,
                header.last_revision,
                name.first,
                name.last
            ),
        ));
    }
    Ok(())
}

/// A digest of a revision's events (not of when they were observed): two
/// segments holding the same revision must agree on it.
pub fn revision_digest(record: &RevisionRecord) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&record.revision.to_le_bytes());
    for e in &record.events {
        h.update(&[u8::from(e.kind == EventKind::Delete)]);
        for field in [e.create_revision, e.mod_revision, e.version, e.lease] {
            h.update(&field.to_le_bytes());
        }
        h.update(&(e.key.len() as u64).to_le_bytes());
        h.update(&e.key);
        h.update(&(e.value.len() as u64).to_le_bytes());
        h.update(&e.value);
    }
    *h.finalize().as_bytes()
}

/// Whether two encodings of the same segment name hold the same history
/// (the same events for every revision; observation times may differ, as
/// when two writers archived the same revisions). `theirs` is the stored
/// object, `ours` a copy about to be written.
///
/// # Errors
/// [`IntegrityError`] naming `object` when either copy cannot be decoded.
pub fn same_history(object: &str, theirs: &[u8], ours: &[u8]) -> Result<bool, IntegrityError> {
    let digests = |bytes: &[u8], which: &str| -> Result<Vec<[u8; 32]>, IntegrityError> {
        let (_, records) = crate::segment::decode_all(object, bytes)
            .map_err(|e| IntegrityError::new(object, format!("{which}: {e}")))?;
        Ok(records
            .iter()
            .filter_map(|r| match r {
                crate::segment::Record::Revision(r) => Some(revision_digest(r)),
                _ => None,
            })
            .collect())
    };
    Ok(digests(theirs, "stored copy")? == digests(ours, "new copy")?)
}

/// Checks that the revisions replayed from a chain follow each other; used
/// when replaying links that may overlap (revisions at or below `last` are
/// duplicates to skip).
#[derive(Clone, Copy, Debug)]
pub struct Continuity {
    last: Revision,
}

impl Continuity {
    /// Replay starts after `base`.
    pub fn after(base: Revision) -> Self {
        Self { last: base }
    }

    /// Whether `revision` (read from `object`) is new and should be applied.
    ///
    /// # Errors
    /// [`IntegrityError`] when a revision is skipped.
    pub fn admit(&mut self, object: &str, revision: Revision) -> Result<bool, IntegrityError> {
        if revision <= self.last {
            return Ok(false);
        }
        if revision != self.last + 1 {
            return Err(IntegrityError::new(
                object,
                format!("revision {revision} follows {} without a gap", self.last),
            ));
        }
        self.last = revision;
        Ok(true)
    }

    /// The last admitted revision.
    pub fn last(&self) -> Revision {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first: Revision, last: Revision, end_ms: i64) -> SegmentName {
        SegmentName {
            first,
            last,
            end_ms,
        }
    }

    fn chain(start: Revision, segs: &[SegmentName], snaps: &[Revision]) -> Chain {
        Chain::build(GenerationId(1), Some(start), segs, snaps)
    }

    #[test]
    fn a_clean_chain_is_one_run() {
        let c = chain(
            10,
            &[seg(11, 20, 1), seg(21, 20, 2), seg(21, 30, 3)],
            &[10, 25],
        );
        assert_eq!(c.links.len(), 3);
        assert!(c.superseded.is_empty());
        assert_eq!(c.runs.len(), 1);
        assert!(c.gaps().is_empty());
        assert_eq!(c.last_revision(), 30);
        assert_eq!(c.end_ms(), 3);
        assert_eq!(
            c.restorable(),
            vec![RestorableRange {
                generation: GenerationId(1),
                first: 10,
                last: 30,
                end_ms: 3
            }]
        );
        assert_eq!(c.base_for(24), Some(10));
        assert_eq!(c.base_for(25), Some(25));
        assert_eq!(
            c.links_between(10, 24),
            vec![seg(11, 20, 1), seg(21, 30, 3)]
        );
        assert_eq!(c.links_between(25, 25), Vec::<SegmentName>::new());
    }

    #[test]
    fn overlaps_from_two_writers_are_superseded_not_gaps() {
        // The reported case: 18-36 next to 18-37, two 17-17 with other end_ms.
        let segs = [
            seg(17, 17, 5),
            seg(17, 17, 6),
            seg(18, 36, 7),
            seg(18, 37, 8),
            seg(38, 40, 9),
            seg(37, 45, 10),
        ];
        let c = chain(16, &segs, &[16]);
        assert_eq!(
            c.links,
            vec![seg(17, 17, 6), seg(18, 37, 8), seg(37, 45, 10)]
        );
        assert_eq!(
            c.superseded,
            vec![seg(17, 17, 5), seg(18, 36, 7), seg(38, 40, 9)]
        );
        assert!(c.gaps().is_empty(), "{:?}", c.gaps());
        assert_eq!(c.last_revision(), 45);
        assert_eq!(c.restorable()[0].last, 45);
        // Replaying overlapping links skips what was already applied.
        let mut k = Continuity::after(16);
        let mut applied = Vec::new();
        for s in c.links_between(16, 45) {
            for r in s.first..=s.last {
                if k.admit("x", r).unwrap() {
                    applied.push(r);
                }
            }
        }
        assert_eq!(applied, (17..=45).collect::<Vec<_>>());
        assert!(Continuity::after(5).admit("obj", 7).is_err());
    }

    #[test]
    fn holes_make_runs_and_gaps() {
        let c = chain(
            4,
            &[seg(5, 9, 1), seg(10, 9, 2), seg(10, 20, 3), seg(25, 30, 4)],
            &[4, 27],
        );
        assert_eq!(c.runs.len(), 2);
        assert_eq!(
            c.gaps(),
            vec![Gap {
                after: 20,
                resumes_after: 24
            }]
        );
        assert_eq!(c.gaps()[0].to_string(), "revisions 21..=24 are missing");
        let r = c.restorable();
        assert_eq!((r[0].first, r[0].last), (4, 20));
        assert_eq!((r[1].first, r[1].last), (27, 30));
        assert_eq!(c.base_for(22), None);
        assert_eq!(c.base_for(26), None);
    }

    #[test]
    fn missing_first_segments_are_a_gap() {
        let c = chain(10, &[seg(15, 20, 1)], &[10]);
        assert_eq!(
            c.gaps(),
            vec![Gap {
                after: 10,
                resumes_after: 14
            }]
        );
        // The snapshot alone is still a restore point.
        let r = c.restorable();
        assert_eq!((r[0].first, r[0].last), (10, 10));
    }

    #[test]
    fn quiet_generation_and_empty_generation() {
        let c = chain(11, &[seg(12, 11, 100), seg(12, 11, 90)], &[11]);
        assert_eq!(c.links, vec![seg(12, 11, 90), seg(12, 11, 100)]);
        assert_eq!(c.last_revision(), 11);
        let r = c.restorable();
        assert_eq!((r[0].first, r[0].last, r[0].end_ms), (11, 11, 100));
        let empty = chain(7, &[], &[]);
        assert_eq!(empty.last_revision(), 7);
        assert!(empty.restorable().is_empty());
        assert!(empty.gaps().is_empty());
    }

    #[test]
    fn generations_of_a_deposed_writer_are_void() {
        use crate::manifest::{GapStart, GenerationManifest, StartReason};
        let gen = |id: u64, term: u64, previous: Option<u64>, terms: Vec<u64>| GenerationListing {
            id: Some(GenerationId(id)),
            manifest: Some(GenerationManifest {
                generation: GenerationId(id),
                cluster_id: 1,
                start_revision: 1,
                started_ms: 0,
                reason: StartReason::Compacted,
                previous: previous.map(|p| GapStart {
                    generation: GenerationId(p),
                    last_revision: 1,
                }),
                detail: String::new(),
                term,
                previous_digest: None,
            }),
            terms,
            ..GenerationListing::default()
        };
        // Term 3 took over generation 1 after term 2 (paused) had decided to
        // start generation 2; generation 3 follows the void one.
        let gens = vec![
            gen(1, 1, None, vec![2, 3]),
            gen(2, 2, Some(1), vec![]),
            gen(3, 2, Some(2), vec![]),
            gen(4, 3, Some(1), vec![]),
        ];
        assert_eq!(
            void_generations(&gens),
            vec![GenerationId(2), GenerationId(3)]
        );
        // Without elections every term is 0: nothing is void, also after
        // an elected writer marked the generation before.
        let legacy = vec![gen(1, 0, None, vec![3]), gen(2, 0, Some(1), vec![])];
        assert!(void_generations(&legacy).is_empty());
    }

    fn step(epoch_first: Revision, at: Revision, offset_ms: i64) -> ClockStep {
        ClockStep {
            epoch_first,
            at_revision: at,
            anchored_ms: 1_000 + at,
            wall_ms: 1_000 + at + offset_ms,
            offset_ms,
        }
    }

    #[test]
    fn clock_steps_widen_their_whole_epoch() {
        // Epochs from 5 and from 20; epoch 5 saw the wall clock 60 s ahead
        // after revision 12 and back near the anchor after 15; epoch 20 saw
        // it 30 s behind. Revisions before 5 predate clock records.
        let t = Timeline::new(
            &[5, 20],
            &[step(5, 15, 500), step(5, 12, 60_000), step(20, 25, -30_000)],
        );
        assert_eq!(t.epoch_of(4), None);
        assert_eq!(t.epoch_of(5), Some(5));
        assert_eq!(t.epoch_of(19), Some(5));
        assert_eq!(t.epoch_of(100), Some(20));
        assert_eq!(t.uncertainty(4), TimeUncertainty::default());
        // Revisions before the step are as doubtful as those after it.
        for r in [5, 12, 19] {
            assert_eq!(
                t.uncertainty(r),
                TimeUncertainty {
                    back_ms: 0,
                    fwd_ms: 60_000
                }
            );
        }
        assert_eq!(
            t.uncertainty(20),
            TimeUncertainty {
                back_ms: 30_000,
                fwd_ms: 0
            }
        );
        assert_eq!(t.widest_step(7, false).map(|s| s.at_revision), Some(12));
        assert_eq!(t.widest_step(7, true), None);
        assert_eq!(t.widest_step(21, true).map(|s| s.at_revision), Some(25));
        // A step whose epoch object is missing still starts its epoch.
        let orphan = Timeline::new(&[], &[step(9, 8, -5_000)]);
        assert_eq!(orphan.uncertainty(9).back_ms, 5_000);
        assert_eq!(orphan.uncertainty(8), TimeUncertainty::default());
        assert!(Timeline::default().is_empty() && !orphan.is_empty());
    }

    #[test]
    fn time_choices_are_refused_only_when_a_step_makes_them_ambiguous() {
        let obs = |revision, observed_ms| Observed {
            revision,
            observed_ms,
        };
        // The reported failure: the wall clock was 60 s behind while the
        // bad deploy (revision 13, committed at 100_000) was observed at
        // 40_000; then it was corrected (+60 s). Asking for 99_000 picks
        // revision 14 (observed 50_000, committed 110_000) at the latest.
        let behind = Timeline::new(&[5], &[step(5, 14, 60_000)]);
        let doubt = check_time_choice(
            &behind,
            99_000,
            Some(obs(14, 50_000)),
            Some(obs(15, 99_500)),
        )
        .unwrap_err();
        assert_eq!(
            doubt,
            TimeDoubt::ChosenMayBeLater {
                chosen: obs(14, 50_000),
                latest_ms: 110_000,
                step: step(5, 14, 60_000)
            }
        );
        // Far enough from every observation, the answer stands.
        assert!(check_time_choice(&behind, 200_000, Some(obs(15, 120_000)), None).is_ok());
        // The reverse: the clock correct, then 60 s behind (kept anchored),
        // the deploy observed at its true 100_000: 99_000 would pick the
        // revision before it, but the deploy may be as early as 40_000.
        let stepped_back = Timeline::new(&[5], &[step(5, 12, -60_000), step(5, 14, 0)]);
        let doubt = check_time_choice(
            &stepped_back,
            99_000,
            Some(obs(12, 90_000)),
            Some(obs(13, 100_000)),
        )
        .unwrap_err();
        assert!(
            matches!(doubt, TimeDoubt::NextMayBeEarlier { next, earliest_ms: 40_000, step } if next.revision == 13 && step.offset_ms == -60_000),
            "{doubt:?}"
        );
        assert!(check_time_choice(
            &stepped_back,
            99_000,
            Some(obs(12, 30_000)),
            Some(obs(13, 160_000))
        )
        .is_ok());
        // Without steps (or before any epoch), observed times are trusted.
        assert!(check_time_choice(
            &Timeline::default(),
            99_000,
            Some(obs(12, 99_000)),
            Some(obs(13, 99_001))
        )
        .is_ok());
        // A base snapshot without an observed time is never doubted.
        assert!(check_time_choice(&behind, 99_000, None, Some(obs(15, 200_000))).is_ok());
    }

    #[test]
    fn header_must_match_name_and_generation() {
        let name = seg(5, 9, 1);
        let header = SegmentHeader {
            generation: 2,
            prev_revision: 4,
            last_revision: 9,
            first_time_ms: 0,
            last_time_ms: 1,
            record_count: 1,
            version: 2,
            prev_digest: [0; 32],
            snapshot: None,
        };
        assert!(check_segment_header("o", GenerationId(2), &name, &header).is_ok());
        let e = check_segment_header("o", GenerationId(3), &name, &header).unwrap_err();
        assert!(e.to_string().contains("generation 2"), "{e}");
        let e = check_segment_header("o", GenerationId(2), &seg(5, 10, 1), &header).unwrap_err();
        assert!(e.to_string().starts_with("o: header holds"), "{e}");
    }
}
