//! Deliberately broken archives: each fixture starts from a small sound
//! archive (a real etcd 3.5.1 snapshot as base and 20 archived revisions on
//! top), breaks it one way, and checks the exact exit code and message of
//! `verify`, `export` and `restore`, and that hostile bytes stay far below
//! 200 MiB of memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use etcdpitr_common::bbolt::{self, BoltReader};
use etcdpitr_common::crypto::Keyring;
use etcdpitr_common::hashchain::{self, Digest};
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::manifest::{ArchiveManifest, GenerationManifest, StartReason};
use etcdpitr_common::segment::{self, Event, EventKind, RevisionRecord, SegmentBuilder};
use etcdpitr_common::snapshot::{self, SnapshotHeader};

const BASE_DB: &[u8] = include_bytes!("../testdata/etcd-3.5.1.db");
/// Peak memory allowed to any command on a hostile archive.
const MAX_RSS_KIB: u64 = 200 << 10;

/// A sound archive in a temporary directory.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    url: String,
    /// The base snapshot's revision.
    base: i64,
    /// Digests of the objects written so far, by the revision they end at
    /// (the generation's anchor at `base`): a new segment names the one
    /// ending where it starts as its predecessor.
    digests: RefCell<HashMap<i64, Digest>>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("archive");
        let base =
            bbolt::etcd_revision(&BoltReader::from_bytes(BASE_DB.to_vec()).unwrap()).unwrap();
        let f = Self {
            url: format!("file://{}", dir.display()),
            dir,
            _tmp: tmp,
            base,
            digests: RefCell::new(HashMap::new()),
        };
        f.write(
            layout::MANIFEST_NAME,
            &serde_json::to_vec(&ArchiveManifest::new(1, &Keyring::default())).unwrap(),
        );
        let manifest = GenerationManifest {
            generation: GenerationId(1),
            cluster_id: 7,
            start_revision: base,
            started_ms: 1,
            reason: StartReason::NewArchive,
            previous: None,
            detail: String::new(),
            term: 0,
            previous_digest: None,
        };
        let manifest = serde_json::to_vec(&manifest).unwrap();
        f.write(&layout::generation_manifest_key(GenerationId(1)), &manifest);
        f.digests
            .borrow_mut()
            .insert(base, hashchain::anchor(&manifest));
        f.write(
            &layout::snapshot_key(GenerationId(1), base),
            &snapshot_object(1, base, BASE_DB),
        );
        f.put_segment(1, base + 1, base + 10, b"a");
        f.put_segment(1, base + 11, base + 20, b"a");
        f
    }

    fn write(&self, key: &str, bytes: &[u8]) {
        let path = self.dir.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Writes revisions `first..=last` (one put of `/k{rev % 7}` each, with
    /// value `value`) as a segment of generation 1 whose header names
    /// `header_generation`.
    fn put_segment(&self, header_generation: u64, first: i64, last: i64, value: &[u8]) {
        let prev = self
            .digests
            .borrow()
            .get(&(first - 1))
            .copied()
            .unwrap_or_default();
        let bytes = segment_bytes(header_generation, first, last, value, prev);
        self.digests
            .borrow_mut()
            .insert(last, segment::digest(&bytes));
        self.write(&segment_key(first, last), &bytes);
    }

    fn run(&self, args: &[&str]) -> (i32, String, u64) {
        let rss = self.dir.with_extension("rss");
        let out = Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o"])
            .arg(&rss)
            .arg(integration::binary("etcd-restorer"))
            .args(args)
            // Without the progress lines: stdout and stderr are read as one.
            .env("ETCD_RESTORER_LOG", "warn")
            .output()
            .unwrap();
        let rss_kib = std::fs::read_to_string(&rss)
            .unwrap()
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text, rss_kib)
    }

    fn verify(&self) -> (i32, String, u64) {
        self.run(&["verify", "--archive", &self.url])
    }

    fn export(&self, revision: i64) -> (i32, String, u64) {
        self.run(&[
            "export",
            "--archive",
            &self.url,
            "--revision",
            &revision.to_string(),
        ])
    }

    fn restore(&self, revision: i64) -> (i32, String, u64) {
        let output = self.dir.with_extension(format!("restored-{revision}.db"));
        let result = self.run(&[
            "restore",
            "--archive",
            &self.url,
            "--revision",
            &revision.to_string(),
            "--output",
            output.to_str().unwrap(),
        ]);
        if result.0 != 0 {
            assert!(!output.exists(), "no output after a failed restore");
        }
        result
    }
}

fn segment_key(first: i64, last: i64) -> String {
    layout::segment_key(GenerationId(1), &name(first, last))
}

fn name(first: i64, last: i64) -> SegmentName {
    SegmentName {
        first,
        last,
        end_ms: 1000 + last,
    }
}

fn segment_bytes(generation: u64, first: i64, last: i64, value: &[u8], prev: Digest) -> Vec<u8> {
    let mut b = SegmentBuilder::new(generation, first - 1, prev).unwrap();
    for revision in first..=last {
        b.push_revision(&RevisionRecord {
            revision,
            observed_ms: 1000 + revision,
            catching_up: false,
            events: vec![Event {
                kind: EventKind::Put,
                key: format!("/k{}", revision % 7).into_bytes(),
                value: value.to_vec(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: 0,
            }],
        })
        .unwrap();
    }
    let (n, bytes) = b.finish().unwrap();
    assert_eq!((n.first, n.last, n.end_ms), (first, last, 1000 + last));
    bytes
}

fn snapshot_object(generation: u64, revision: i64, db: &[u8]) -> Vec<u8> {
    snapshot_object_claiming(generation, revision, db, db)
}

/// A snapshot object holding `db` whose header claims the blake3 of
/// `claimed` (a forger or a bit flip after hashing when they differ).
fn snapshot_object_claiming(generation: u64, revision: i64, db: &[u8], claimed: &[u8]) -> Vec<u8> {
    let header = SnapshotHeader {
        generation,
        revision,
        taken_ms: 1,
        db_bytes: db.len() as u64,
        db_blake3: *blake3::hash(claimed).as_bytes(),
        prev_digest: [0; 32],
        prev_revision: 0,
    };
    let mut out = Vec::new();
    snapshot::write_object(&header, &mut &db[..], &mut out).unwrap();
    out
}

/// Re-seals a segment after its header was edited (a forger who can write
/// valid checksums).
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 32;
    let hash = blake3::hash(&bytes[..n]);
    bytes[n..].copy_from_slice(hash.as_bytes());
    bytes
}

fn assert_outcome(what: &str, got: (i32, String, u64), code: i32, needles: &[&str]) {
    let (c, text, rss) = got;
    assert_eq!(c, code, "{what}: exit code; output:\n{text}");
    for n in needles {
        assert!(text.contains(n), "{what}: {n:?} not in:\n{text}");
    }
    assert!(!text.contains("panicked"), "{what}: panicked:\n{text}");
    assert!(rss < MAX_RSS_KIB, "{what}: peak RSS {rss} KiB");
}

#[test]
fn a_sound_fixture_passes() {
    let f = Fixture::new();
    assert_outcome("verify", f.verify(), 0, &["OK"]);
    let (code, out, _) = f.export(f.base + 15);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"mod_revision\":"), "{out}");
    assert_outcome("restore", f.restore(f.base + 15), 0, &["restored revision"]);
}

#[test]
fn a_hole_is_reported_and_targets_past_it_are_refused() {
    let f = Fixture::new();
    std::fs::remove_file(f.dir.join(segment_key(f.base + 1, f.base + 10))).unwrap();
    let missing = format!("revisions {}..={} are missing", f.base + 1, f.base + 10);
    assert_outcome("verify", f.verify(), 4, &[&missing]);
    assert_outcome(
        "export",
        f.export(f.base + 15),
        3,
        &[&format!("restorable: generation 1: {0}..={0}", f.base)],
    );
    assert_outcome("restore", f.restore(f.base), 0, &["restored revision"]);
}

#[test]
fn an_overlap_with_other_events_is_an_integrity_problem() {
    let f = Fixture::new();
    // Another copy of revisions 5..=12 holding other values.
    f.put_segment(1, f.base + 5, f.base + 12, b"forged");
    let other = segment_key(f.base + 5, f.base + 12);
    assert_outcome(
        "verify",
        f.verify(),
        4,
        &[&other, "holds other events than in"],
    );
    // Restores follow the chain, which does not use the superseded copy.
    assert_outcome("export", f.export(f.base + 15), 0, &[]);
}

#[test]
fn overlapping_links_with_other_events_are_never_spliced() {
    let f = Fixture::new();
    // A copy of 5..=25 that reaches further than the chain, so it becomes a
    // link, and holds other values for 5..=10 than the link before it.
    f.put_segment(1, f.base + 5, f.base + 25, b"forged");
    let forged = segment_key(f.base + 5, f.base + 25);
    let needles = [forged.as_str(), "holds other events than in"];
    assert_outcome("verify", f.verify(), 4, &needles);
    assert_outcome("export", f.export(f.base + 15), 4, &needles);
    assert_outcome("restore", f.restore(f.base + 15), 4, &needles);
}

#[test]
fn an_identical_overlap_is_benign() {
    let f = Fixture::new();
    f.put_segment(1, f.base + 5, f.base + 12, b"a");
    assert_outcome("verify", f.verify(), 0, &["OK", "duplicate revisions"]);
}

#[test]
fn strays_inside_the_namespace_are_problems_and_others_are_ignored() {
    let f = Fixture::new();
    f.write("gen-0000000000000001/segments/notes.txt", b"x");
    f.write("README", b"hello");
    f.write("lost+found/x", b"x");
    assert_outcome(
        "verify",
        f.verify(),
        4,
        &[
            "gen-0000000000000001/segments/notes.txt: not part of the etcd-pitr layout",
            "ignored 2 objects outside the archive's namespace",
        ],
    );
    assert_outcome("export", f.export(f.base + 15), 0, &[]);
    std::fs::remove_file(f.dir.join("gen-0000000000000001/segments/notes.txt")).unwrap();
    assert_outcome("verify", f.verify(), 0, &["OK", "README"]);
}

#[test]
fn a_segment_header_naming_another_generation_is_refused() {
    let f = Fixture::new();
    f.put_segment(2, f.base + 11, f.base + 20, b"a");
    let key = segment_key(f.base + 11, f.base + 20);
    let needles = [key.as_str(), "header names generation 2"];
    assert_outcome("verify", f.verify(), 4, &needles);
    assert_outcome("export", f.export(f.base + 15), 4, &needles);
    assert_outcome("restore", f.restore(f.base + 15), 4, &needles);
}

#[test]
fn a_segment_claiming_fifty_million_records_is_refused_cheaply() {
    let f = Fixture::new();
    let key = segment_key(f.base + 11, f.base + 20);
    let mut bytes = std::fs::read(f.dir.join(&key)).unwrap();
    bytes[64..72].copy_from_slice(&50_000_000u64.to_le_bytes());
    f.write(&key, &reseal(bytes));
    assert_outcome("verify", f.verify(), 4, &[&key]);
    assert_outcome("export", f.export(f.base + 15), 4, &[&key]);
    assert_outcome("restore", f.restore(f.base + 15), 4, &[&key]);
}

#[test]
fn a_reheaded_snapshot_is_refused() {
    let f = Fixture::new();
    // The base content claims to be 5 revisions newer than it is.
    let forged = f.base + 5;
    std::fs::remove_file(f.dir.join(layout::snapshot_key(GenerationId(1), f.base))).unwrap();
    let key = layout::snapshot_key(GenerationId(1), forged);
    f.write(&key, &snapshot_object(1, forged, BASE_DB));
    assert_outcome("verify", f.verify(), 4, &[&key]);
    assert_outcome("export", f.export(forged + 1), 4, &[&key]);
    assert_outcome("restore", f.restore(forged + 1), 4, &[&key]);
}

#[test]
fn a_snapshot_with_a_bad_meta_page_is_refused() {
    let f = Fixture::new();
    let mut db = BASE_DB.to_vec();
    // Meta page 1: page size 0, with a valid checksum.
    let page_size = u32::from_le_bytes(db[16 + 8..16 + 12].try_into().unwrap()) as usize;
    let meta = page_size + 16;
    db[meta + 8..meta + 12].copy_from_slice(&0u32.to_le_bytes());
    let sum = bbolt::fnv1a64(&db[meta..meta + 56]);
    db[meta + 56..meta + 64].copy_from_slice(&sum.to_le_bytes());
    let key = layout::snapshot_key(GenerationId(1), f.base);
    f.write(&key, &snapshot_object(1, f.base, &db));
    assert_outcome("verify", f.verify(), 4, &[&key]);
    assert_outcome("restore", f.restore(f.base + 3), 4, &[&key]);
}

/// A snapshot body that decompresses cleanly, at its declared length, but
/// is not the bytes its header's blake3 names (one byte flipped where the
/// replay never looks: the restore reads the base before hashing it) is
/// refused as damaged, naming the object, and leaves no output.
#[test]
fn a_snapshot_body_that_differs_from_its_hash_is_refused() {
    for at in [BASE_DB.len() / 2, BASE_DB.len() - 1] {
        let f = Fixture::new();
        let mut db = BASE_DB.to_vec();
        db[at] ^= 0x40;
        let key = layout::snapshot_key(GenerationId(1), f.base);
        f.write(&key, &snapshot_object_claiming(1, f.base, &db, BASE_DB));
        let what = format!("byte {at} flipped");
        assert_outcome(&format!("verify, {what}"), f.verify(), 4, &[&key]);
        assert_outcome(
            &format!("restore, {what}"),
            f.restore(f.base + 3),
            4,
            &[&key],
        );
        assert_outcome(&format!("export, {what}"), f.export(f.base + 3), 4, &[&key]);
    }
}

#[test]
fn a_decompression_bomb_is_stopped_at_the_declared_length() {
    let f = Fixture::new();
    // A header promising 4 KiB in front of a body that inflates to 1 GiB.
    let header = SnapshotHeader {
        generation: 1,
        revision: f.base,
        taken_ms: 1,
        db_bytes: 4096,
        db_blake3: [0; 32],
        prev_digest: [0; 32],
        prev_revision: 0,
    };
    let mut object = header.encode().to_vec();
    let mut encoder = zstd::Encoder::new(&mut object, 19).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut encoder, &zeros).unwrap();
    }
    encoder.finish().unwrap();
    let key = layout::snapshot_key(GenerationId(1), f.base);
    f.write(&key, &object);
    assert_outcome("verify", f.verify(), 4, &[&key]);
    assert_outcome("restore", f.restore(f.base + 3), 4, &[&key]);
    let big: Vec<PathBuf> = walk(f.dir.parent().unwrap())
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 64 << 20))
        .collect();
    assert!(big.is_empty(), "large scratch files left: {big:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The head digest `verify --json` reports for the fixture.
fn head_of(f: &Fixture) -> String {
    let (code, out, _) = f.run(&["verify", "--archive", &f.url, "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["ok"], true, "{out}");
    v["head"].as_str().unwrap().to_owned()
}

#[test]
fn a_middle_segment_replaced_with_valid_checksums_is_named() {
    let f = Fixture::new();
    f.put_segment(1, f.base + 21, f.base + 30, b"a");
    // A forger rewrites revisions 11..=20 with another value, keeping the
    // name, the predecessor digest and a correct checksum.
    let prev = f.digests.borrow()[&(f.base + 10)];
    let forged = segment_bytes(1, f.base + 11, f.base + 20, b"forged", prev);
    f.write(&segment_key(f.base + 11, f.base + 20), &forged);
    assert_outcome(
        "verify",
        f.verify(),
        4,
        &[
            "breaks the hash chain",
            &segment_key(f.base + 11, f.base + 20),
            &segment_key(f.base + 21, f.base + 30),
        ],
    );
}

#[test]
fn a_replaced_snapshot_is_named() {
    // The base snapshot re-written with another time and a valid header
    // check (its content unchanged): a later segment committed to the
    // original.
    let f = Fixture::new();
    let original = SnapshotHeader::decode(
        "base",
        &std::fs::read(f.dir.join(layout::snapshot_key(GenerationId(1), f.base))).unwrap(),
    )
    .unwrap();
    let prev = f.digests.borrow()[&f.base];
    let mut b = SegmentBuilder::new(1, f.base + 20, f.digests.borrow()[&(f.base + 20)]).unwrap();
    b.commit_snapshot(f.base, original.digest());
    b.push(&etcdpitr_common::segment::Record::Progress {
        revision: f.base + 20,
        observed_ms: 5000,
    })
    .unwrap();
    let (n, bytes) = b.finish().unwrap();
    f.write(&layout::segment_key(GenerationId(1), &n), &bytes);
    assert_outcome("verify", f.verify(), 0, &["OK"]);
    let forged = SnapshotHeader {
        taken_ms: 2,
        prev_digest: prev,
        prev_revision: f.base,
        ..original
    };
    let mut obj = Vec::new();
    snapshot::write_object(&forged, &mut &BASE_DB[..], &mut obj).unwrap();
    f.write(&layout::snapshot_key(GenerationId(1), f.base), &obj);
    assert_outcome(
        "verify",
        f.verify(),
        4,
        &[
            &layout::snapshot_key(GenerationId(1), f.base),
            "committed to",
        ],
    );
}

#[test]
fn a_cut_end_is_detected_with_the_head_recorded_earlier() {
    let f = Fixture::new();
    f.put_segment(1, f.base + 21, f.base + 30, b"a");
    let head = head_of(&f);
    assert_eq!(head.len(), 64);
    // Still there: the recorded head is on the chain.
    assert_outcome(
        "verify",
        f.run(&["verify", "--archive", &f.url, "--expect-head", &head]),
        0,
        &["OK", &format!("head: {head}")],
    );
    // The newest segment removed: the archive is sound on its own, but it
    // no longer holds the recorded head.
    std::fs::remove_file(f.dir.join(segment_key(f.base + 21, f.base + 30))).unwrap();
    assert_outcome("verify", f.verify(), 0, &["OK"]);
    assert_outcome(
        "verify",
        f.run(&["verify", "--archive", &f.url, "--expect-head", &head]),
        4,
        &["no longer holds the head", &head],
    );
    assert_outcome(
        "verify",
        f.run(&["verify", "--archive", &f.url, "--expect-head", "xyz"]),
        2,
        &["--expect-head"],
    );
}
