//! Retention: which restore points a policy keeps, and which objects no
//! kept point needs.
//!
//! Reachability is the only rule. A kept restore point is a revision range
//! `base..=through` of one generation: it needs the base snapshot at `base`
//! and every segment holding a revision in `base + 1..=through` (plus the
//! progress-only segments inside it, which vouch for its times). An object
//! goes only when no kept point needs it. Points come from the policy:
//!
//! - `keep_within`: every revision observed in the last DUR before the
//!   newest moment the archive vouches for stays restorable (measured from
//!   the archive's own newest time, not from the clock of whoever prunes,
//!   so an archive whose archiver stopped is not emptied);
//! - `keep_last N`: the N newest base snapshots;
//! - `keep_{hourly,daily,weekly,monthly,yearly} N`: for the N newest
//!   periods (UTC; ISO weeks) that hold a base snapshot, the period's last
//!   base snapshot, by the time recorded in its header;
//! - always the newest restorable point (the archive's head, which the
//!   archiver resumes from), and every generation newer than it whole (one
//!   being started has no snapshot yet).
//!
//! Ordering uses revisions and recorded times only. Generation records
//! (manifests, terms, clock epochs) and void generations are never pruned;
//! a lineage fingerprint goes with its snapshot. Deleting a chain link
//! leaves a hole, so the plan first writes retention records naming every
//! revision range it will delete ([`crate::layout::PrunedRange`]); the chain
//! rules then count such holes as pruned, not as damage, whatever moment a
//! prune is interrupted at.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Datelike, Timelike, Utc};

use crate::chain::{Chain, RestorableRange};
use crate::layout::{self, GenerationId, PrunedRange, SegmentName};
use crate::listing::{ArchiveListing, GenerationListing};
use crate::Revision;

/// A calendar period of a `keep-<period>` rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Period {
    /// An hour (UTC).
    Hourly,
    /// A day (UTC).
    Daily,
    /// An ISO week (Monday to Sunday, UTC).
    Weekly,
    /// A calendar month (UTC).
    Monthly,
    /// A calendar year (UTC).
    Yearly,
}

impl Period {
    /// Every period, shortest first.
    pub const ALL: [Period; 5] = [
        Period::Hourly,
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::Yearly,
    ];

    /// The policy flag's word (`keep-<word>`).
    pub fn word(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        }
    }

    /// The period holding `ms` (Unix ms), as printable text that sorts and
    /// compares like the period.
    pub fn of(self, ms: i64) -> String {
        let t: DateTime<Utc> = DateTime::from_timestamp_millis(ms).unwrap_or_default();
        match self {
            Period::Hourly => format!(
                "{:04}-{:02}-{:02}T{:02}",
                t.year(),
                t.month(),
                t.day(),
                t.hour()
            ),
            Period::Daily => format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day()),
            Period::Weekly => {
                let w = t.iso_week();
                format!("{:04}-W{:02}", w.year(), w.week())
            }
            Period::Monthly => format!("{:04}-{:02}", t.year(), t.month()),
            Period::Yearly => format!("{:04}", t.year()),
        }
    }
}

/// A retention policy. Empty means nothing is ever deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep every revision observed within this many ms of the archive's
    /// newest moment.
    pub keep_within_ms: Option<i64>,
    /// Keep the newest N base snapshots.
    pub keep_last: Option<u32>,
    /// Keep the last base snapshot of each of the newest N periods.
    pub keep_periods: BTreeMap<Period, u32>,
}

impl Policy {
    /// Whether the policy keeps everything (no rule given).
    pub fn is_empty(&self) -> bool {
        self.keep_within_ms.is_none() && self.keep_last.is_none() && self.keep_periods.is_empty()
    }

    /// Whether applying it needs the base snapshots' recorded times.
    pub fn needs_snapshot_times(&self) -> bool {
        !self.keep_periods.is_empty()
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rules = Vec::new();
        if let Some(ms) = self.keep_within_ms {
            let d = std::time::Duration::from_millis(ms.max(0) as u64);
            rules.push(format!("--keep-within {}", humantime::format_duration(d)));
        }
        if let Some(n) = self.keep_last {
            rules.push(format!("--keep-last {n}"));
        }
        for (p, n) in &self.keep_periods {
            rules.push(format!("--keep-{} {n}", p.word()));
        }
        if rules.is_empty() {
            return f.write_str("none (keep everything)");
        }
        f.write_str(&rules.join(" "))
    }
}

/// A restore point the policy keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptPoint {
    /// Generation.
    pub generation: GenerationId,
    /// Base snapshot revision.
    pub base: Revision,
    /// Every revision `base..=through` stays restorable.
    pub through: Revision,
    /// Which rules keep it (e.g. `keep-last`, `keep-daily 2026-11-25`).
    pub reasons: Vec<String>,
}

/// What a prune deletes and keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrunePlan {
    /// Kept restore points, by generation and base revision.
    pub kept: Vec<KeptPoint>,
    /// Retention records to write before any deletion.
    pub records: Vec<(GenerationId, PrunedRange)>,
    /// Archive-relative keys to delete, in deletion order.
    pub delete: Vec<String>,
    /// The restorable ranges once every deletion is done.
    pub restorable_after: Vec<RestorableRange>,
}

/// Plans a prune of `listing` under `policy`. `snapshot_times` maps a
/// (generation, revision) base snapshot to its recorded time (Unix ms); it
/// is needed only when [`Policy::needs_snapshot_times`], and a snapshot
/// without a time is then kept.
pub fn plan(
    listing: &ArchiveListing,
    policy: &Policy,
    snapshot_times: &BTreeMap<(GenerationId, Revision), i64>,
) -> PrunePlan {
    let chains: Vec<Chain> = listing.generations.iter().map(Chain::of).collect();
    if policy.is_empty() {
        return PrunePlan {
            restorable_after: chains.iter().flat_map(Chain::restorable).collect(),
            ..PrunePlan::default()
        };
    }
    let mut points: BTreeMap<(GenerationId, Revision, Revision), BTreeSet<String>> =
        BTreeMap::new();
    let mut keep = |g: GenerationId, base: Revision, through: Revision, why: String| {
        points.entry((g, base, through)).or_default().insert(why);
    };
    // The head: the newest restorable point. Generations after it have no
    // restorable point yet and are kept whole.
    let head = chains
        .iter()
        .rposition(|c| !c.restorable().is_empty())
        .map(|i| {
            (
                i,
                chains[i].restorable().last().copied().expect("non-empty"),
            )
        });
    if let Some((i, range)) = head {
        let base = chains[i]
            .base_for(range.last)
            .expect("a restorable range has a base");
        keep(range.generation, base, range.last, "newest".into());
    }
    let protected_from = head.map_or(0, |(i, _)| i + 1);
    if let Some(within) = policy.keep_within_ms {
        let newest = chains.iter().map(Chain::end_ms).max().unwrap_or(0);
        let cutoff = newest.saturating_sub(within);
        for chain in &chains {
            // The state at the cutoff: the revision before the first one
            // that may have been observed after it.
            let Some(from) = chain
                .links
                .iter()
                .find(|l| l.end_ms >= cutoff)
                .map(SegmentName::prev)
            else {
                continue;
            };
            for range in chain.restorable() {
                if range.last < from {
                    continue;
                }
                let start = from.max(range.first);
                let base = chain.base_for(start).expect("inside a restorable range");
                keep(chain.generation, base, range.last, "keep-within".into());
            }
        }
    }
    let mut snapshots: Vec<(GenerationId, Revision)> = chains
        .iter()
        .flat_map(|c| c.snapshots.iter().map(|&s| (c.generation, s)))
        .collect();
    snapshots.sort_unstable();
    if let Some(n) = policy.keep_last {
        for &(g, s) in snapshots.iter().rev().take(n as usize) {
            keep(g, s, s, "keep-last".into());
        }
    }
    for (&period, &n) in &policy.keep_periods {
        let mut timed: Vec<(i64, GenerationId, Revision)> = Vec::new();
        for &(g, s) in &snapshots {
            match snapshot_times.get(&(g, s)) {
                Some(&t) => timed.push((t, g, s)),
                None => keep(g, s, s, "time unknown".into()),
            }
        }
        timed.sort_unstable();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for &(t, g, s) in timed.iter().rev() {
            if seen.len() >= n as usize {
                break;
            }
            let key = period.of(t);
            if seen.insert(key.clone()) {
                keep(g, s, s, format!("keep-{} {key}", period.word()));
            }
        }
    }
    let kept: Vec<KeptPoint> = points
        .into_iter()
        .map(|((generation, base, through), reasons)| KeptPoint {
            generation,
            base,
            through,
            reasons: reasons.into_iter().collect(),
        })
        .collect();
    let mut out = PrunePlan::default();
    for (i, (g, chain)) in listing.generations.iter().zip(&chains).enumerate() {
        if i >= protected_from {
            out.restorable_after.extend(chain.restorable());
            continue;
        }
        let points: Vec<&KeptPoint> = kept
            .iter()
            .filter(|p| p.generation == chain.generation)
            .collect();
        let after = plan_generation(g, chain, &points, &mut out);
        out.restorable_after.extend(after.restorable());
    }
    out.kept = kept;
    out
}

/// Whether segment `s` holds a revision (or, holding none, vouches for a
/// moment) a kept point needs.
fn needed(s: &SegmentName, points: &[&KeptPoint]) -> bool {
    points.iter().any(|p| {
        if s.is_empty() {
            p.base <= s.last && s.last <= p.through
        } else {
            s.last > p.base && s.first <= p.through
        }
    })
}

/// Adds one generation's records and deletions to `out`; returns the
/// generation's chain once they are done.
fn plan_generation(
    g: &GenerationListing,
    chain: &Chain,
    points: &[&KeptPoint],
    out: &mut PrunePlan,
) -> Chain {
    let generation = chain.generation;
    // Records: the revision ranges of the chain's doomed links, merged
    // while contiguous.
    let bases: BTreeSet<Revision> = points.iter().map(|p| p.base).collect();
    let mut ranges: Vec<PrunedRange> = Vec::new();
    for link in chain.links.iter().filter(|l| !l.is_empty()) {
        if needed(link, points) {
            continue;
        }
        match ranges.last_mut() {
            // A kept base snapshot at a boundary ends the range: it must
            // not lie inside one (see `Chain::of`).
            Some(r) if r.last + 1 == link.first && !bases.contains(&r.last) => r.last = link.last,
            _ => ranges.push(PrunedRange {
                first: link.first,
                last: link.last,
            }),
        }
    }
    // Contiguity above is by revision: two doomed links around a kept one
    // cannot merge, since a kept link holds the revisions between them.
    out.records.extend(
        ranges
            .iter()
            .filter(|r| !chain.pruned.contains(r))
            .map(|&r| (generation, r)),
    );
    let doomed_segments: Vec<SegmentName> = g
        .segments
        .iter()
        .filter(|s| !needed(s, points))
        .copied()
        .collect();
    let doomed_snapshots: Vec<Revision> = g
        .snapshots
        .iter()
        .filter(|s| !bases.contains(s))
        .copied()
        .collect();
    out.delete.extend(
        doomed_segments
            .iter()
            .map(|s| layout::segment_key(generation, s)),
    );
    out.delete.extend(
        doomed_snapshots
            .iter()
            .map(|&s| layout::snapshot_key(generation, s)),
    );
    // A fingerprint goes with its snapshot; one newer than every kept base
    // (its snapshot may still be uploading) stays.
    let newest_base = bases.last().copied().unwrap_or(Revision::MIN);
    out.delete.extend(
        g.lineage
            .iter()
            .filter(|&&r| !bases.contains(&r) && (r < newest_base || points.is_empty()))
            .map(|&r| layout::lineage_key(generation, r)),
    );
    let mut pruned = chain.pruned.clone();
    pruned.extend(ranges);
    let segments: Vec<SegmentName> = g
        .segments
        .iter()
        .filter(|s| !doomed_segments.contains(s))
        .copied()
        .collect();
    let snapshots: Vec<Revision> = g
        .snapshots
        .iter()
        .filter(|s| bases.contains(s))
        .copied()
        .collect();
    Chain::build(generation, Some(chain.start), &segments, &snapshots).with_pruned(&pruned)
}

#[cfg(test)]
mod tests;
