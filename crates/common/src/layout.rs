//! Object names inside an archive.
//!
//! Everything of one source cluster lives under one prefix:
//!
//! ```text
//! {prefix}/etcd-pitr.json                                   archive manifest (format version)
//! {prefix}/gen-{gen:016x}/generation.json                   why and when the generation started
//! {prefix}/gen-{gen:016x}/snapshots/{rev:016x}.snap         base snapshots (zstd bbolt + header)
//! {prefix}/gen-{gen:016x}/segments/{first:016x}-{last:016x}-{end_ms:016x}.seg
//! {prefix}/gen-{gen:016x}/lineage/{rev:016x}.json            the source's HashKV at a snapshot revision
//! {prefix}/gen-{gen:016x}/terms/{term:016x}.json             a writer's term began writing this generation
//! {prefix}/gen-{gen:016x}/clock/{first:016x}.json            a clock epoch began at revision `first`
//! {prefix}/gen-{gen:016x}/clock/{first:016x}-{at:016x}-{anchored_ms:016x}.json
//!                                                           a wall-clock step seen in that epoch
//! {prefix}/gen-{gen:016x}/pruned/{first:016x}-{last:016x}.json
//!                                                           retention deleted revisions first..=last
//! {prefix}/terms/{term:016x}.json                            writer terms, claimed write-once in order
//! ```
//!
//! Fixed-width lower-case hex makes listing order equal revision order. A
//! segment holds revisions `first..=last`; `first == last + 1` marks a segment
//! that holds no revision, only progress (the cluster was idle until `end_ms`).
//! `end_ms` is the last wall-clock time the segment vouches for, so a `--time`
//! restore can be planned from the listing alone. Names are parsed strictly:
//! a stray object under a generation is an error, never silently skipped.

use std::fmt;

use crate::Revision;

/// Name of the archive manifest object at the root of an archive.
pub const MANIFEST_NAME: &str = "etcd-pitr.json";
/// Name of the generation manifest object inside a generation directory.
pub const GENERATION_MANIFEST_NAME: &str = "generation.json";

/// A generation: one unbroken chain of a base snapshot plus contiguous segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GenerationId(pub u64);

impl GenerationId {
    /// The directory name of this generation, `gen-{id:016x}`.
    pub fn dir_name(self) -> String {
        format!("gen-{:016x}", self.0)
    }

    /// Parses a generation directory name such as `gen-0000000000000001`.
    pub fn parse_dir(name: &str) -> Option<Self> {
        let hex = name.strip_prefix("gen-")?;
        parse_hex16(hex).map(Self)
    }

    /// The next generation id.
    #[must_use]
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The revision range and end time of a segment, as carried by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    /// First revision held (`last + 1` when the segment holds none).
    pub first: Revision,
    /// Last revision held; every revision up to here is archived in the chain.
    pub last: Revision,
    /// Latest wall-clock time (Unix ms) at which `last` was known to be current.
    pub end_ms: i64,
}

impl SegmentName {
    /// The object file name, without directories.
    pub fn file_name(&self) -> String {
        format!(
            "{:016x}-{:016x}-{:016x}.seg",
            self.first, self.last, self.end_ms
        )
    }

    /// Parses a segment file name strictly.
    pub fn parse(name: &str) -> Option<Self> {
        let stem = name.strip_suffix(".seg")?;
        let mut parts = stem.split('-');
        let first = parse_rev(parts.next()?)?;
        let last = parse_rev(parts.next()?)?;
        let end_ms = parse_rev(parts.next()?)?;
        if parts.next().is_some() || first < 1 || first > last.checked_add(1)? {
            return None;
        }
        Some(Self {
            first,
            last,
            end_ms,
        })
    }

    /// The revision the previous segment (or the generation start) ended at.
    pub fn prev(&self) -> Revision {
        self.first - 1
    }

    /// Whether the segment holds no revision (only progress).
    pub fn is_empty(&self) -> bool {
        self.first > self.last
    }
}

/// Object file name of a snapshot at `revision`.
pub fn snapshot_file_name(revision: Revision) -> String {
    format!("{revision:016x}.snap")
}

/// Parses a snapshot file name strictly, returning its revision.
pub fn parse_snapshot_file_name(name: &str) -> Option<Revision> {
    parse_rev(name.strip_suffix(".snap")?)
}

/// Relative object key of a segment inside the archive.
pub fn segment_key(generation: GenerationId, name: &SegmentName) -> String {
    format!("{}/segments/{}", generation.dir_name(), name.file_name())
}

/// Relative object key of a snapshot inside the archive.
pub fn snapshot_key(generation: GenerationId, revision: Revision) -> String {
    format!(
        "{}/snapshots/{}",
        generation.dir_name(),
        snapshot_file_name(revision)
    )
}

/// Object file name of a lineage fingerprint at `revision`.
pub fn lineage_file_name(revision: Revision) -> String {
    format!("{revision:016x}.json")
}

/// Relative object key of a lineage fingerprint inside the archive.
pub fn lineage_key(generation: GenerationId, revision: Revision) -> String {
    format!(
        "{}/lineage/{}",
        generation.dir_name(),
        lineage_file_name(revision)
    )
}

/// Directory of the archive-wide writer terms.
pub const TERMS_DIR: &str = "terms";

/// Object file name of writer term `term`.
pub fn term_file_name(term: u64) -> String {
    format!("{term:016x}.json")
}

/// Relative object key of an archive-wide writer term.
pub fn term_key(term: u64) -> String {
    format!("{TERMS_DIR}/{}", term_file_name(term))
}

/// Parses an archive-wide term key (`terms/{term:016x}.json`).
pub fn parse_term_key(relative: &str) -> Option<u64> {
    parse_hex16(
        relative
            .strip_prefix(TERMS_DIR)?
            .strip_prefix('/')?
            .strip_suffix(".json")?,
    )
}

/// Relative object key of a term's marker inside a generation.
pub fn generation_term_key(generation: GenerationId, term: u64) -> String {
    format!("{}/terms/{}", generation.dir_name(), term_file_name(term))
}

/// Relative object key of a generation's manifest.
pub fn generation_manifest_key(generation: GenerationId) -> String {
    format!("{}/{GENERATION_MANIFEST_NAME}", generation.dir_name())
}

/// Directory of a generation's clock records.
const CLOCK_DIR: &str = "clock";

/// Relative object key of the clock epoch of `generation` that begins at
/// revision `first` (the first revision its writer appends).
pub fn clock_epoch_key(generation: GenerationId, first: Revision) -> String {
    format!("{}/{CLOCK_DIR}/{first:016x}.json", generation.dir_name())
}

/// A wall-clock step recorded in a clock epoch, as carried by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClockStepName {
    /// First revision of the epoch the step was seen in.
    pub epoch_first: Revision,
    /// The step was seen after this revision was appended
    /// (`epoch_first - 1` when seen before the epoch's first revision).
    pub at: Revision,
    /// The archiver's anchored time (Unix ms) when it saw the step; keeps
    /// the names of several steps after one revision apart.
    pub anchored_ms: i64,
}

impl ClockStepName {
    /// The object file name, without directories.
    pub fn file_name(&self) -> String {
        format!(
            "{:016x}-{:016x}-{:016x}.json",
            self.epoch_first, self.at, self.anchored_ms
        )
    }

    /// Parses a step file name strictly.
    pub fn parse(name: &str) -> Option<Self> {
        let stem = name.strip_suffix(".json")?;
        let mut parts = stem.split('-');
        let epoch_first = parse_rev(parts.next()?)?;
        let at = parse_rev(parts.next()?)?;
        let anchored_ms = parse_rev(parts.next()?)?;
        if parts.next().is_some() || epoch_first < 1 || at < epoch_first - 1 {
            return None;
        }
        Some(Self {
            epoch_first,
            at,
            anchored_ms,
        })
    }
}

/// Relative object key of a clock step of `generation`.
pub fn clock_step_key(generation: GenerationId, name: &ClockStepName) -> String {
    format!("{}/{CLOCK_DIR}/{}", generation.dir_name(), name.file_name())
}

/// Directory of a generation's retention records.
pub const PRUNED_DIR: &str = "pruned";

/// Revisions `first..=last` of a generation whose segments retention
/// deleted on purpose (see [`crate::retention`]): a hole there is pruned
/// history, not damage. Written before the first deletion, write-once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrunedRange {
    /// First pruned revision.
    pub first: Revision,
    /// Last pruned revision (`>= first`).
    pub last: Revision,
}

impl PrunedRange {
    /// The object file name, without directories.
    pub fn file_name(&self) -> String {
        format!("{:016x}-{:016x}.json", self.first, self.last)
    }

    /// Parses a retention record's file name strictly.
    pub fn parse(name: &str) -> Option<Self> {
        let (first, last) = name.strip_suffix(".json")?.split_once('-')?;
        let (first, last) = (parse_rev(first)?, parse_rev(last)?);
        (first >= 1 && first <= last).then_some(Self { first, last })
    }

    /// Whether the range holds `revision`.
    pub fn contains(&self, revision: Revision) -> bool {
        self.first <= revision && revision <= self.last
    }
}

impl fmt::Display for PrunedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.first, self.last)
    }
}

/// Relative object key of a retention record of `generation`.
pub fn pruned_key(generation: GenerationId, range: &PrunedRange) -> String {
    format!(
        "{}/{PRUNED_DIR}/{}",
        generation.dir_name(),
        range.file_name()
    )
}

/// One object of a generation, classified by its relative name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GenerationObject {
    /// `generation.json`
    Manifest,
    /// A snapshot at this revision.
    Snapshot(Revision),
    /// A segment.
    Segment(SegmentName),
    /// A lineage fingerprint at this revision.
    Lineage(Revision),
    /// A writer term began writing this generation.
    Term(u64),
    /// A clock epoch beginning at this revision.
    ClockEpoch(Revision),
    /// A wall-clock step seen in a clock epoch.
    ClockStep(ClockStepName),
    /// Retention deleted the segments holding these revisions.
    Pruned(PrunedRange),
}

/// Classifies a key relative to the archive root (`gen-…/…`).
///
/// Returns `None` for anything that does not follow the layout exactly.
pub fn classify(relative: &str) -> Option<(GenerationId, GenerationObject)> {
    let (dir, rest) = relative.split_once('/')?;
    let generation = GenerationId::parse_dir(dir)?;
    let object = if rest == GENERATION_MANIFEST_NAME {
        GenerationObject::Manifest
    } else if let Some(file) = rest.strip_prefix("snapshots/") {
        GenerationObject::Snapshot(parse_snapshot_file_name(file)?)
    } else if let Some(file) = rest.strip_prefix("segments/") {
        GenerationObject::Segment(SegmentName::parse(file)?)
    } else if let Some(file) = rest.strip_prefix("lineage/") {
        GenerationObject::Lineage(parse_rev(file.strip_suffix(".json")?)?)
    } else if let Some(file) = rest.strip_prefix("terms/") {
        GenerationObject::Term(parse_hex16(file.strip_suffix(".json")?)?)
    } else if let Some(file) = rest.strip_prefix(&format!("{PRUNED_DIR}/")) {
        GenerationObject::Pruned(PrunedRange::parse(file)?)
    } else if let Some(file) = rest.strip_prefix("clock/") {
        let stem = file.strip_suffix(".json")?;
        if stem.len() == 16 {
            let first = parse_rev(stem)?;
            if first < 1 {
                return None;
            }
            GenerationObject::ClockEpoch(first)
        } else {
            GenerationObject::ClockStep(ClockStepName::parse(file)?)
        }
    } else {
        return None;
    };
    Some((generation, object))
}

/// Whether an archive-relative key lies in the archive's own namespace (the
/// manifest, or anything under a `gen-` directory). Other names (a
/// `lost+found`, a README) are not the archive's and are ignored.
pub fn in_namespace(relative: &str) -> bool {
    relative == MANIFEST_NAME
        || relative.starts_with("gen-")
        || relative.starts_with(&format!("{TERMS_DIR}/"))
}

fn parse_hex16(s: &str) -> Option<u64> {
    if s.len() != 16
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn parse_rev(s: &str) -> Option<Revision> {
    i64::try_from(parse_hex16(s)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_sort() {
        let a = SegmentName {
            first: 5,
            last: 300,
            end_ms: 1_700_000_000_000,
        };
        let b = SegmentName {
            first: 301,
            last: 300,
            end_ms: 1_700_000_001_000,
        };
        let c = SegmentName {
            first: 301,
            last: 4096,
            end_ms: 1_700_000_000_500,
        };
        for n in [a, b, c] {
            assert_eq!(SegmentName::parse(&n.file_name()), Some(n));
        }
        let mut names = vec![c.file_name(), a.file_name(), b.file_name()];
        names.sort();
        assert_eq!(names, vec![a.file_name(), b.file_name(), c.file_name()]);
        assert!(b.is_empty());
        assert_eq!(c.prev(), 300);
    }

    #[test]
    fn strict_parsing_rejects_strays() {
        for bad in [
            "0000000000000005-000000000000012c.seg",
            "0000000000000005-000000000000012c-0000000000000001.seg.tmp",
            "000000000000005-000000000000012c-0000000000000001.seg",
            "0000000000000005-000000000000012C-0000000000000001.seg",
            "0000000000000005-0000000000000001-0000000000000001.seg",
            "0000000000000000-0000000000000001-0000000000000001.seg",
            "0000000000000005-000000000000012c-0000000000000001-00.seg",
            "+000000000000005-000000000000012c-0000000000000001.seg",
            // Found by fuzzing: `last + 1` overflowed.
            "0000000000000001-7fffffffffffffff-0000000000000001.seg",
        ] {
            assert_eq!(SegmentName::parse(bad), None, "{bad}");
        }
        assert_eq!(parse_snapshot_file_name("00000000000000ff.snap"), Some(255));
        assert_eq!(parse_snapshot_file_name("ff.snap"), None);
        assert_eq!(parse_snapshot_file_name("8000000000000000.snap"), None);
        assert_eq!(classify("gen-0000000000000001/other/x"), None);
        assert_eq!(classify("gen-1/generation.json"), None);
        assert_eq!(
            classify("gen-0000000000000002/snapshots/0000000000000010.snap"),
            Some((GenerationId(2), GenerationObject::Snapshot(16)))
        );
        assert_eq!(
            classify(&lineage_key(GenerationId(3), 17)),
            Some((GenerationId(3), GenerationObject::Lineage(17)))
        );
        assert_eq!(classify("gen-0000000000000002/lineage/11.json"), None);
        assert_eq!(
            classify(&generation_term_key(GenerationId(3), 9)),
            Some((GenerationId(3), GenerationObject::Term(9)))
        );
        assert_eq!(parse_term_key(&term_key(7)), Some(7));
        assert_eq!(parse_term_key("terms/7.json"), None);
        assert!(in_namespace("terms/x") && !in_namespace("lost+found/x"));
    }

    #[test]
    fn pruned_names_round_trip_and_parse_strictly() {
        let r = PrunedRange {
            first: 0x11,
            last: 0x24,
        };
        let key = pruned_key(GenerationId(2), &r);
        assert_eq!(
            key,
            "gen-0000000000000002/pruned/0000000000000011-0000000000000024.json"
        );
        assert_eq!(
            classify(&key),
            Some((GenerationId(2), GenerationObject::Pruned(r)))
        );
        for bad in [
            "0000000000000024-0000000000000011.json",
            "0000000000000000-0000000000000011.json",
            "0000000000000011-0000000000000024",
            "11-24.json",
            "0000000000000011-0000000000000024-00.json",
        ] {
            assert_eq!(PrunedRange::parse(bad), None, "{bad}");
        }
        assert!(r.contains(0x11) && r.contains(0x24) && !r.contains(0x25));
    }

    #[test]
    fn clock_names_round_trip_and_parse_strictly() {
        let g = GenerationId(4);
        assert_eq!(
            clock_epoch_key(g, 0x1f),
            "gen-0000000000000004/clock/000000000000001f.json"
        );
        assert_eq!(
            classify(&clock_epoch_key(g, 0x1f)),
            Some((g, GenerationObject::ClockEpoch(0x1f)))
        );
        let step = ClockStepName {
            epoch_first: 0x1f,
            at: 0x1e,
            anchored_ms: 1_700_000_000_123,
        };
        let key = clock_step_key(g, &step);
        assert_eq!(
            key,
            "gen-0000000000000004/clock/000000000000001f-000000000000001e-0000018bcfe5687b.json"
        );
        assert_eq!(classify(&key), Some((g, GenerationObject::ClockStep(step))));
        // Steps sort by epoch, then revision, then time.
        let later = ClockStepName { at: 0x20, ..step };
        assert!(step.file_name() < later.file_name() && step < later);
        for bad in [
            "gen-0000000000000004/clock/0000000000000000.json",
            "gen-0000000000000004/clock/1f.json",
            "gen-0000000000000004/clock/000000000000001F.json",
            "gen-0000000000000004/clock/000000000000001f.json.tmp",
            "gen-0000000000000004/clock/000000000000001f-000000000000001e.json",
            // A step seen before its epoch's start.
            "gen-0000000000000004/clock/000000000000001f-000000000000001d-0000000000000001.json",
            "gen-0000000000000004/clock/000000000000001f-000000000000001e-0000000000000001-00.json",
            "gen-0000000000000004/clock/000000000000001f-000000000000001e-8000000000000000.json",
            "gen-0000000000000004/clock/x/000000000000001f.json",
        ] {
            assert_eq!(classify(bad), None, "{bad}");
        }
    }
}
