//! The archive's hash chain: tamper evidence beyond checksums.
//!
//! A checksum proves an object is intact, not that it is the object that
//! was written: anyone able to write the store can replace a segment and
//! recompute its checksum. The hash chain ties every object to the ones
//! before it, so that removing, reordering or replacing an object in the
//! middle of a generation breaks a link that `verify` names, and a head
//! digest recorded elsewhere (`verify --expect-head`) also proves the
//! archive was not cut back from its end.
//!
//! Digests (blake3, 32 bytes):
//! - a generation's **anchor**: the digest of its `generation.json` bytes,
//!   whose `previous_digest` names the previous generation's last segment;
//! - a **segment**'s digest: its trailing checksum (the blake3 of all its
//!   bytes before it, header included);
//! - a **snapshot**'s digest: the blake3 of its header (which holds the
//!   blake3 of its content), see [`crate::snapshot`].
//!
//! Links:
//! - every segment names its predecessor: the segment its writer sealed
//!   before it in the generation (ending at its `prev_revision`), or the
//!   anchor for the first one;
//! - every segment commits to the newest base snapshot of the generation
//!   its writer knew archived (revision and digest), so a snapshot replaced
//!   later contradicts the commitment;
//! - every snapshot names the newest segment of the generation archived
//!   when its header was written (or the anchor), and the revision it ends
//!   at;
//! - a retention record names the digests of the segments it deleted that
//!   end at its last revision, one of which the first segment after the
//!   pruned range names as predecessor.
//!
//! [`prove`] decides, for one generation, which segments are reachable from
//! the anchor (or a retention record) through these links, and reports
//! every chain link, snapshot or commitment that is not. Objects written in
//! format 1 (before the hash chain) carry no links: they are accepted as
//! they are, and counted.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use crate::chain::{Chain, IntegrityError};
use crate::layout::{self, GenerationId, PrunedRange, SegmentName};
use crate::segment::SegmentHeader;
use crate::snapshot::SnapshotHeader;
use crate::Revision;

/// A blake3 digest.
pub type Digest = [u8; 32];

/// Lower-case hex of a digest.
pub fn hex(d: &Digest) -> String {
    d.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parses 64 hex digits.
pub fn parse_hex(s: &str) -> Option<Digest> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(d)
}

/// A generation's anchor: the digest of its manifest's bytes.
pub fn anchor(manifest_bytes: &[u8]) -> Digest {
    *blake3::hash(manifest_bytes).as_bytes()
}

/// What `verify` read of one generation, for [`prove`].
#[derive(Clone, Debug, Default)]
pub struct Evidence {
    /// The anchor (the manifest's digest), if the manifest exists.
    pub anchor: Option<Digest>,
    /// Every segment read: name, header and digest.
    pub segments: Vec<(SegmentName, SegmentHeader, Digest)>,
    /// Every snapshot header read.
    pub snapshots: Vec<SnapshotHeader>,
    /// Retention records and the digests each says it cut at.
    pub cuts: Vec<(PrunedRange, Vec<Digest>)>,
}

/// What [`prove`] found.
#[derive(Clone, Debug, Default)]
pub struct Proof {
    /// Broken links, naming the object.
    pub problems: Vec<IntegrityError>,
    /// Things that are not damage (format 1 objects, snapshots not yet
    /// committed to).
    pub notes: Vec<String>,
    /// Digests of every object present and reachable through the chain
    /// (counting a link that breaks it, already reported, as a new start).
    pub proven: HashSet<Digest>,
    /// Digests retention records say they cut at (objects now deleted).
    pub cut: HashSet<Digest>,
    /// The digest of the chain's last segment (the anchor when it has
    /// none).
    pub head: Option<Digest>,
}

/// Checks one generation's hash chain (see the module docs). `chain` is
/// the generation's chain ([`Chain::of`]); `evidence` holds what was read.
pub fn prove(generation: GenerationId, chain: &Chain, evidence: &Evidence) -> Proof {
    let mut proof = Proof::default();
    // Digests of reachable objects, by the revision they end at.
    let mut ends: HashMap<Revision, Vec<Digest>> = HashMap::new();
    if let Some(a) = evidence.anchor {
        ends.entry(chain.start).or_default().push(a);
        proof.proven.insert(a);
    }
    // A retention record vouches for the digests it cut at.
    for (range, cut) in &evidence.cuts {
        ends.entry(range.last).or_default().extend(cut);
        proof.cut.extend(cut);
    }
    // Revisions at which some object ends (its predecessor may be checked).
    let mut known: HashSet<Revision> = ends.keys().copied().collect();
    known.extend(evidence.segments.iter().map(|(n, _, _)| n.last));
    // A run after a damage gap cannot be reached; it is proven from its
    // first link on (the gap itself is reported by the chain rules).
    let damage: HashSet<Revision> = chain.gaps().iter().map(|g| g.resumes_after).collect();
    let mut segments: Vec<&(SegmentName, SegmentHeader, Digest)> =
        evidence.segments.iter().collect();
    // Predecessors first: by first revision, a progress-only segment (which
    // ends before its first revision) before the segment that follows it,
    // then by time.
    segments.sort_by_key(|(n, _, d)| (n.first, !n.is_empty(), n.end_ms, *d));
    let mut legacy = 0usize;
    let mut restarts = 0usize;
    let mut unproven: HashSet<SegmentName> = HashSet::new();
    for (name, header, digest) in segments {
        // No object ends where its predecessor did: that one was deleted
        // (a duplicate another writer left, which retention removed), so
        // the walk starts over here. A replaced object is still caught:
        // its successor names the original's digest.
        let predecessor_gone = !known.contains(&name.prev());
        let reachable = header.version < 2
            || ends
                .get(&name.prev())
                .is_some_and(|ds| ds.contains(&header.prev_digest))
            || damage.contains(&name.prev())
            || predecessor_gone;
        if predecessor_gone && header.version >= 2 && chain.links.contains(name) {
            restarts += 1;
        }
        if header.version < 2 {
            legacy += 1;
        }
        if reachable {
            ends.entry(name.last).or_default().push(*digest);
            proof.proven.insert(*digest);
        } else if let Some(i) = chain.links.iter().position(|l| l == name) {
            proof.problems.push(broken_link(generation, chain, i));
            // Go on from here: a later break is reported on its own.
            ends.entry(name.last).or_default().push(*digest);
            proof.proven.insert(*digest);
        } else {
            unproven.insert(*name);
        }
    }
    let stray = chain
        .superseded
        .iter()
        .filter(|s| unproven.contains(s))
        .count();
    if stray > 0 {
        proof.notes.push(format!(
            "generation {generation}: {stray} superseded segments do not link to the hash chain (a writer's copies whose predecessor never reached the store); restores do not use them"
        ));
    }
    if restarts > 0 {
        proof.notes.push(format!(
            "generation {generation}: {restarts} chain segments follow a segment no longer in the archive (a duplicate retention deleted); the chain is checked from each of them on"
        ));
    }
    if legacy > 0 {
        proof.notes.push(format!(
            "generation {generation}: {legacy} segments were written in format 1, before the hash chain; they are checked by checksum only"
        ));
    }
    prove_snapshots(generation, chain, evidence, &mut proof);
    proof.head = chain
        .links
        .last()
        .and_then(|l| {
            evidence
                .segments
                .iter()
                .find(|(n, _, _)| n == l)
                .map(|(_, _, d)| *d)
        })
        .or(evidence.anchor);
    proof
}

/// The problem of chain link `i`, which names a predecessor digest no
/// object ending at its `prev_revision` has. Names the object it follows
/// on the chain: the likeliest to have been replaced.
fn broken_link(generation: GenerationId, chain: &Chain, i: usize) -> IntegrityError {
    let link = chain.links[i];
    let before = match i.checked_sub(1).map(|j| chain.links[j]) {
        Some(p) if p.last == link.prev() => layout::segment_key(generation, &p),
        _ => format!("the generation's start (revision {})", chain.start),
    };
    IntegrityError::new(
        layout::segment_key(generation, &link),
        format!(
            "breaks the hash chain: it names a predecessor ending at revision {} whose digest no such object has; {before} (or this object) was replaced, or an object between them removed or reordered",
            link.prev()
        ),
    )
}

/// Snapshots: each names a reachable predecessor and agrees with every
/// reachable segment's commitment to it.
fn prove_snapshots(
    generation: GenerationId,
    chain: &Chain,
    evidence: &Evidence,
    proof: &mut Proof,
) {
    let commitments: Vec<(SegmentName, Revision, Digest)> = evidence
        .segments
        .iter()
        .filter(|(_, _, d)| proof.proven.contains(d))
        .filter_map(|(n, h, _)| h.snapshot.map(|(r, d)| (*n, r, d)))
        .collect();
    let gaps = chain.gaps();
    let mut uncommitted = Vec::new();
    for snap in &evidence.snapshots {
        let key = layout::snapshot_key(generation, snap.revision);
        let digest = snap.digest();
        if snap.prev_digest == [0; 32] {
            proof.notes.push(format!(
                "{key}: written in format 1, before the hash chain; checked by checksum only"
            ));
        } else if !proof.proven.contains(&snap.prev_digest)
            && !proof.cut.contains(&snap.prev_digest)
        {
            let deleted = !evidence
                .segments
                .iter()
                .any(|(n, _, _)| n.last == snap.prev_revision)
                && snap.prev_revision != chain.start;
            let in_hole = chain.pruned.iter().any(|r| r.contains(snap.prev_revision))
                || gaps
                    .iter()
                    .any(|g| g.after < snap.prev_revision && snap.prev_revision <= g.resumes_after);
            let gone = deleted || in_hole;
            if gone {
                proof.notes.push(format!(
                    "{key}: its predecessor (ending at revision {}) was pruned or is missing; the link cannot be checked",
                    snap.prev_revision
                ));
            } else {
                proof.problems.push(IntegrityError::new(
                    &key,
                    format!(
                        "breaks the hash chain: no segment ending at revision {} in the generation's chain has the digest it names as its predecessor (removed or replaced)",
                        snap.prev_revision
                    ),
                ));
            }
        }
        let mut committed = false;
        for (seg, rev, d) in &commitments {
            if *rev != snap.revision {
                continue;
            }
            if *d == digest {
                committed = true;
            } else {
                proof.problems.push(IntegrityError::new(
                    &key,
                    format!(
                        "differs from the snapshot segment {} committed to (replaced after it was archived)",
                        layout::segment_key(generation, seg)
                    ),
                ));
            }
        }
        if committed {
            proof.proven.insert(digest);
        } else if snap.prev_digest != [0; 32] {
            uncommitted.push(snap.revision);
        }
    }
    if !uncommitted.is_empty() {
        proof.notes.push(format!(
            "generation {generation}: snapshots at {uncommitted:?} are not yet committed to by a later segment (the writer commits to the newest snapshot it knows in every segment it seals)"
        ));
    }
}

#[cfg(test)]
mod tests;
