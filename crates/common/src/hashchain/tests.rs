//! Hash-chain proofs over real segment and snapshot headers.

use super::*;
use crate::segment::{self, Event, EventKind, Record, RevisionRecord, SegmentBuilder};

const G: GenerationId = GenerationId(1);

/// A sealed segment `prev+1..=last` (empty when `last == prev`) naming
/// `prev_digest`, with `value` in every put and an optional snapshot
/// commitment.
fn seg(
    prev: Revision,
    last: Revision,
    end_ms: i64,
    prev_digest: Digest,
    value: &[u8],
    commit: Option<(Revision, Digest)>,
) -> (SegmentName, SegmentHeader, Digest) {
    let mut b = SegmentBuilder::new(G.0, prev, prev_digest).unwrap();
    for revision in prev + 1..=last {
        b.push(&Record::Revision(RevisionRecord {
            revision,
            observed_ms: end_ms,
            catching_up: false,
            events: vec![Event {
                kind: EventKind::Put,
                key: b"k".to_vec(),
                value: value.to_vec(),
                create_revision: 2,
                mod_revision: revision,
                version: revision,
                lease: 0,
            }],
        }))
        .unwrap();
    }
    b.push(&Record::Progress {
        revision: last,
        observed_ms: end_ms,
    })
    .unwrap();
    if let Some((r, d)) = commit {
        b.commit_snapshot(r, d);
    }
    let (name, bytes) = b.finish().unwrap();
    let (header, _) = segment::open("t", &bytes).unwrap();
    (name, header, segment::digest(&bytes))
}

fn snap(
    revision: Revision,
    content: &[u8],
    prev: Digest,
    prev_revision: Revision,
) -> SnapshotHeader {
    SnapshotHeader {
        generation: G.0,
        revision,
        taken_ms: 0,
        db_bytes: content.len() as u64,
        db_blake3: *blake3::hash(content).as_bytes(),
        prev_digest: prev,
        prev_revision,
    }
}

/// Generation 1 from revision 10: a snapshot at 10, segments 11..=20 and
/// 21..=30, a progress-only segment, 31..=40; a snapshot at 30 that the
/// last segment commits to.
fn archive() -> Evidence {
    let anchor = anchor(b"{\"generation\":1}");
    let s10 = snap(10, b"db at 10", anchor, 10);
    let a = seg(10, 20, 1, anchor, b"a", Some((10, s10.digest())));
    let b = seg(20, 30, 2, a.2, b"b", Some((10, s10.digest())));
    let s30 = snap(30, b"db at 30", b.2, 30);
    let p = seg(30, 30, 3, b.2, b"", Some((10, s10.digest())));
    let c = seg(30, 40, 4, p.2, b"c", Some((30, s30.digest())));
    Evidence {
        anchor: Some(anchor),
        segments: vec![a, b, p, c],
        snapshots: vec![s10, s30],
        cuts: Vec::new(),
    }
}

fn chain_of(e: &Evidence, pruned: &[PrunedRange]) -> Chain {
    let names: Vec<SegmentName> = e.segments.iter().map(|s| s.0).collect();
    let snaps: Vec<Revision> = e.snapshots.iter().map(|s| s.revision).collect();
    Chain::build(G, Some(10), &names, &snaps).with_pruned(pruned)
}

fn problems(e: &Evidence, pruned: &[PrunedRange]) -> Vec<String> {
    prove(G, &chain_of(e, pruned), e)
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn an_untouched_archive_proves_and_names_its_head() {
    let e = archive();
    let proof = prove(G, &chain_of(&e, &[]), &e);
    assert!(proof.problems.is_empty(), "{:?}", proof.problems);
    assert_eq!(proof.head, Some(e.segments[3].2));
    for (_, _, d) in &e.segments {
        assert!(proof.proven.contains(d));
    }
    assert!(proof.proven.contains(&e.snapshots[1].digest()));
    assert_eq!(parse_hex(&hex(&e.segments[3].2)), Some(e.segments[3].2));
    assert_eq!(parse_hex("00"), None);
}

#[test]
fn a_replaced_middle_segment_is_named_even_with_a_valid_checksum() {
    let mut e = archive();
    let original = e.segments[1];
    // Same range and predecessor, other content, a correct checksum.
    e.segments[1] = seg(20, 30, 2, e.segments[0].2, b"forged", None);
    assert_eq!(e.segments[1].0.first, original.0.first);
    let found = problems(&e, &[]);
    // The segment and the snapshot that followed the original both say so.
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with(&layout::segment_key(G, &e.segments[2].0))
            && found[0].contains(&layout::segment_key(G, &e.segments[1].0))
            && found[0].contains("revision 30")
            && found[0].contains("replaced"),
        "{found:?}"
    );
    assert!(
        found[1].starts_with(&layout::snapshot_key(G, 30)),
        "{found:?}"
    );
}

#[test]
fn two_breaks_are_reported_each() {
    let mut e = archive();
    // Two objects far apart forged with wrong predecessors: each one and
    // each successor of one breaks a link of its own.
    e.segments[0] = seg(10, 20, 1, [3; 32], b"a", None);
    e.segments[2] = seg(30, 30, 3, [4; 32], b"", None);
    let found = problems(&e, &[]);
    for forged in [&e.segments[0].0, &e.segments[2].0] {
        let key = layout::segment_key(G, forged);
        assert!(
            found.iter().any(|p| p.starts_with(&key)),
            "{key}: {found:?}"
        );
    }
    assert!(found[0].contains("generation's start"), "{found:?}");
}

#[test]
fn a_replaced_snapshot_contradicts_the_commitment() {
    let mut e = archive();
    let forged = snap(30, b"another db at 30", e.segments[1].2, 30);
    e.snapshots[1] = forged;
    let found = problems(&e, &[]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with(&layout::snapshot_key(G, 30)) && found[0].contains("committed"),
        "{found:?}"
    );
}

#[test]
fn a_snapshot_naming_an_unknown_predecessor_is_named() {
    let mut e = archive();
    e.snapshots[1].prev_digest = [9; 32];
    let found = problems(&e, &[]);
    // Its own link, and the last segment's commitment to the original.
    assert!(found.iter().any(|p| p.contains("predecessor")), "{found:?}");
}

#[test]
fn a_removed_segment_is_a_gap_not_a_second_problem() {
    let mut e = archive();
    e.segments.remove(1);
    let chain = chain_of(&e, &[]);
    assert_eq!(chain.gaps().len(), 1);
    let proof = prove(G, &chain, &e);
    assert!(proof.problems.is_empty(), "{:?}", proof.problems);
}

#[test]
fn a_pruned_start_is_proven_from_the_records_cut_digests() {
    let mut e = archive();
    let cut = e.segments[1].2;
    e.segments.drain(..2);
    e.snapshots.remove(0);
    let range = PrunedRange {
        first: 11,
        last: 30,
    };
    e.cuts = vec![(range, vec![cut])];
    assert!(problems(&e, &[range]).is_empty());
    // A record naming another digest does not vouch for the cut.
    e.cuts = vec![(range, vec![[7; 32]])];
    let found = problems(&e, &[range]);
    assert!(found.iter().any(|p| p.contains("hash chain")), "{found:?}");
}

#[test]
fn a_leftover_inside_a_pruned_range_starts_over() {
    // A prune deleted 11..=20 but a lock kept 21..=30, whose predecessor is
    // gone; the record's cut digest names 21..=30 itself.
    let mut e = archive();
    let cut = e.segments[1].2;
    e.segments.remove(0);
    e.snapshots.remove(0);
    let range = PrunedRange {
        first: 11,
        last: 30,
    };
    e.cuts = vec![(range, vec![cut])];
    let chain = chain_of(&e, &[range]);
    assert!(chain.gaps().is_empty());
    assert!(problems(&e, &[range]).is_empty());
    // A present predecessor with another digest still breaks it.
    let mut forged = archive();
    forged.segments[0] = seg(10, 20, 1, forged.anchor.unwrap(), b"forged", None);
    let found = problems(&forged, &[]);
    assert!(
        found[0].starts_with(&layout::segment_key(G, &forged.segments[1].0)),
        "{found:?}"
    );
}

#[test]
fn overlapping_writers_each_link_to_what_they_followed() {
    let mut e = archive();
    // A second writer took over after 11..=20 and sealed 21..=35, 36..=40.
    let a = e.segments[0].2;
    let x = seg(20, 35, 5, a, b"b", None);
    let y = seg(35, 40, 6, x.2, b"c", None);
    e.segments.extend([x, y]);
    let chain = chain_of(&e, &[]);
    assert!(chain.superseded.len() >= 2);
    let proof = prove(G, &chain, &e);
    assert!(proof.problems.is_empty(), "{:?}", proof.problems);
}

#[test]
fn format_1_objects_are_accepted_and_counted() {
    let mut e = archive();
    for s in &mut e.segments {
        s.1.version = 1;
        s.1.prev_digest = [0; 32];
        s.1.snapshot = None;
    }
    for s in &mut e.snapshots {
        s.prev_digest = [0; 32];
        s.prev_revision = 0;
    }
    let proof = prove(G, &chain_of(&e, &[]), &e);
    assert!(proof.problems.is_empty(), "{:?}", proof.problems);
    assert!(
        proof.notes.iter().any(|n| n.contains("format 1")),
        "{:?}",
        proof.notes
    );
}
