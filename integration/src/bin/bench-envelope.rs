//! Encryption overhead benchmark: the cost of sealing and opening objects
//! (XChaCha20-Poly1305 in 64 KiB chunks, see `etcdpitr_common::crypto`)
//! against encoding and decoding them, for a large snapshot object and a
//! full-size segment, in memory (CPU only, no disk or network).
//!
//! Usage: `bench-envelope [SNAPSHOT_MIB]` (default 512), after
//! `cargo build --release --bins`.

use std::time::Instant;

use etcdpitr_common::crypto::{ArchiveKey, Keyring, Opener, Sealer};
use etcdpitr_common::segment::{self, Event, EventKind, RevisionRecord, SegmentBuilder};
use etcdpitr_common::snapshot::{self, SnapshotHeader};
use integration::Rng;

/// Plaintext handed to the sealer at a time, as `Archive::upload_file` does.
const PIECE_BYTES: usize = 1 << 20;

/// Seals `plain` piece by piece; returns the sealed bytes and seconds taken.
fn seal(key: &ArchiveKey, name: &str, plain: &[u8]) -> anyhow::Result<(Vec<u8>, f64)> {
    let started = Instant::now();
    let mut sealer = Sealer::new(key, name)?;
    let mut out = Vec::with_capacity(plain.len() + plain.len() / 1000 + 64);
    for piece in plain.chunks(PIECE_BYTES) {
        sealer.update(piece, &mut out);
    }
    sealer.finish(&mut out);
    Ok((out, started.elapsed().as_secs_f64()))
}

/// Opens `sealed` piece by piece; returns seconds taken.
fn open(keys: &Keyring, name: &str, sealed: &[u8], plain: &[u8]) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut opener = Opener::new(keys, name);
    let mut out = Vec::with_capacity(plain.len());
    for piece in sealed.chunks(PIECE_BYTES) {
        opener.update(piece, &mut out)?;
    }
    opener.finish(&mut out)?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(out == plain, "{name}: opened bytes differ");
    Ok(secs)
}

/// A bbolt-like file: pages of key/value data with runs of free space.
fn snapshot_like(rng: &mut Rng, bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        for i in 0..40u32 {
            out.extend_from_slice(
                format!("/registry/pods/ns-{}/pod-{i}", rng.below(50)).as_bytes(),
            );
            out.extend_from_slice(&rng.bytes(40));
            out.extend_from_slice(&[b'x'; 20]);
        }
        out.resize(out.len().next_multiple_of(4096) + 4096, 0);
    }
    out.truncate(bytes);
    out
}

/// A segment of about 16 MiB of 100-byte puts, as the archiver seals.
fn full_segment(rng: &mut Rng) -> anyhow::Result<Vec<u8>> {
    let mut b = SegmentBuilder::new(1, 0, [0; 32])?;
    let mut revision = 0;
    let mut raw = 0usize;
    while raw < 16 << 20 {
        revision += 1;
        let key = format!(
            "/registry/configmaps/ns-{}/cm-{}",
            rng.below(100),
            rng.below(10_000)
        );
        let value = rng.bytes(100);
        raw += key.len() + value.len() + 40;
        b.push_revision(&RevisionRecord {
            revision,
            observed_ms: 1_700_000_000_000 + revision,
            catching_up: false,
            events: vec![Event {
                kind: EventKind::Put,
                key: key.into_bytes(),
                value,
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: 0,
            }],
        })?;
    }
    Ok(b.finish()?.1)
}

fn row(what: &str, bytes: usize, encode_s: f64, seal_s: f64, open_s: f64, decode_s: f64) {
    let mib = bytes as f64 / f64::from(1 << 20);
    println!(
        "| {what} | {mib:.1} | {encode_s:.3} | {seal_s:.3} ({:.0} MiB/s) | {:.1} % | {decode_s:.3} | {open_s:.3} ({:.0} MiB/s) | {:.1} % |",
        mib / seal_s,
        100.0 * seal_s / encode_s,
        mib / open_s,
        100.0 * open_s / decode_s,
    );
}

fn main() -> anyhow::Result<()> {
    let snapshot_mib: usize = std::env::args().nth(1).map_or(Ok(512), |s| s.parse())?;
    let (key, _) = ArchiveKey::generate()?;
    let keys = Keyring::new(vec![key.clone()]);
    let mut rng = Rng::new(3);
    println!("| object | sealed MiB | encode s | seal s | seal / encode | decode s | open s | open / decode |");
    println!("|---|---|---|---|---|---|---|---|");

    let db = snapshot_like(&mut rng, snapshot_mib << 20);
    let header = SnapshotHeader {
        generation: 1,
        revision: 1,
        taken_ms: 0,
        db_bytes: db.len() as u64,
        db_blake3: *blake3::hash(&db).as_bytes(),
        prev_digest: [0; 32],
        prev_revision: 0,
    };
    let started = Instant::now();
    let mut object = Vec::new();
    snapshot::write_object(&header, &mut &db[..], &mut object)?;
    let encode_s = started.elapsed().as_secs_f64();
    let name = "gen-0000000000000001/snapshots/0000000000000001.snap";
    let (sealed, seal_s) = seal(&key, name, &object)?;
    let open_s = open(&keys, name, &sealed, &object)?;
    let started = Instant::now();
    let mut back = Vec::with_capacity(db.len());
    snapshot::read_object(name, &mut &object[..], &mut back, snapshot::BodyHash::Check)?;
    let decode_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(back == db, "snapshot round trip");
    row(
        &format!("snapshot object ({snapshot_mib} MiB file)"),
        sealed.len(),
        encode_s,
        seal_s,
        open_s,
        decode_s,
    );

    let started = Instant::now();
    let segment = full_segment(&mut rng)?;
    let encode_s = started.elapsed().as_secs_f64();
    let name = "gen-0000000000000001/segments/segment.seg";
    let (sealed, seal_s) = seal(&key, name, &segment)?;
    let open_s = open(&keys, name, &sealed, &segment)?;
    let started = Instant::now();
    segment::decode_all(name, &segment)?;
    let decode_s = started.elapsed().as_secs_f64();
    row(
        "segment (16 MiB of records)",
        sealed.len(),
        encode_s,
        seal_s,
        open_s,
        decode_s,
    );
    let overhead = sealed.len() - segment.len();
    println!(
        "\nsize overhead: {overhead} bytes on {} ({:.3} %)",
        segment.len(),
        100.0 * overhead as f64 / segment.len() as f64
    );
    Ok(())
}
