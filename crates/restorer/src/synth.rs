//! Native snapshot synthesis: the base snapshot's buckets, the archived
//! events after its revision appended to the `key` bucket, lease records
//! merged into the `lease` bucket, then meta pages and etcd's sha256
//! trailer. Revisions only grow, so the `key` bucket is a pure append and
//! memory stays bounded whatever the number of revisions.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use etcdpitr_common::bbolt::{self, BoltError, BoltReader};
use etcdpitr_common::progress::{Mode, Progress, Unit};
use etcdpitr_common::segment::{Event, EventKind, LeaseRecord, RevisionRecord};
use etcdpitr_common::Revision;
use sha2::Digest;

use crate::bolt_writer::{bucket_header, PageWriter, TreeBuilder};

/// etcd's revision key: 8-byte big-endian main, `_`, 8-byte big-endian sub,
/// plus `t` for a tombstone.
pub fn revision_key(main: Revision, sub: i64, tombstone: bool) -> Vec<u8> {
    let mut k = Vec::with_capacity(18);
    k.extend_from_slice(&main.to_be_bytes());
    k.push(b'_');
    k.extend_from_slice(&sub.to_be_bytes());
    if tombstone {
        k.push(b't');
    }
    k
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_int_field(out: &mut Vec<u8>, field: u8, v: i64) {
    if v != 0 {
        out.push(field << 3);
        put_varint(out, v as u64);
    }
}

fn put_bytes_field(out: &mut Vec<u8>, field: u8, v: &[u8]) {
    if !v.is_empty() {
        out.push((field << 3) | 2);
        put_varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

/// `mvccpb.KeyValue` as etcd marshals it (zero fields omitted); a tombstone
/// stores the key only.
pub fn encode_key_value(event: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(event.key.len() + event.value.len() + 40);
    put_bytes_field(&mut out, 1, &event.key);
    if event.kind == EventKind::Put {
        put_int_field(&mut out, 2, event.create_revision);
        put_int_field(&mut out, 3, event.mod_revision);
        put_int_field(&mut out, 4, event.version);
        put_bytes_field(&mut out, 5, &event.value);
        put_int_field(&mut out, 6, event.lease);
    }
    out
}

fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Decodes a `mvccpb.KeyValue` stored in the `key` bucket (the inverse of
/// [`encode_key_value`]; unknown fields are skipped).
pub fn decode_key_value(b: &[u8], kind: EventKind) -> Option<Event> {
    let mut e = Event {
        kind,
        key: Vec::new(),
        value: Vec::new(),
        create_revision: 0,
        mod_revision: 0,
        version: 0,
        lease: 0,
    };
    let mut at = 0;
    while at < b.len() {
        let tag = get_varint(b, &mut at)?;
        match (tag >> 3, tag & 7) {
            (field, 0) => {
                let v = get_varint(b, &mut at)? as i64;
                match field {
                    2 => e.create_revision = v,
                    3 => e.mod_revision = v,
                    4 => e.version = v,
                    6 => e.lease = v,
                    _ => {}
                }
            }
            (field, 2) => {
                let len = usize::try_from(get_varint(b, &mut at)?).ok()?;
                let bytes = b.get(at..at.checked_add(len)?)?.to_vec();
                at += len;
                match field {
                    1 => e.key = bytes,
                    5 => e.value = bytes,
                    _ => {}
                }
            }
            _ => return None,
        }
    }
    Some(e)
}

/// Passes every entry of an etcd backend's `key` bucket to `f` as an event,
/// in revision order (a tombstone as a delete, with its key only).
///
/// # Errors
/// Structural errors of the file, or an entry that does not decode
/// ([`BoltError::Invalid`] naming its revision key).
pub fn for_each_key_entry(db: &BoltReader, f: &mut dyn FnMut(Event)) -> Result<(), BoltError> {
    db.for_each(b"key", &mut |k, v| {
        let kind = if k.len() == 18 && k[17] == b't' {
            EventKind::Delete
        } else {
            EventKind::Put
        };
        let event = decode_key_value(v, kind).ok_or_else(|| {
            BoltError::Invalid(format!(
                "the key bucket holds an undecodable key-value at {}",
                k.escape_ascii()
            ))
        })?;
        f(event);
        Ok(())
    })
}

/// `leasepb.Lease{ID, TTL}`.
pub fn encode_lease(lease: &LeaseRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    put_int_field(&mut out, 1, lease.id);
    put_int_field(&mut out, 2, lease.ttl_secs);
    out
}

/// `leasepb.Lease` as etcd stores it: its ID and granted TTL (the inverse
/// of [`encode_lease`]; other fields are skipped).
pub fn decode_lease(b: &[u8]) -> Option<(i64, i64)> {
    let (mut id, mut ttl) = (None, 0);
    let mut at = 0;
    while at < b.len() {
        let tag = get_varint(b, &mut at)?;
        match (tag >> 3, tag & 7) {
            (field, 0) => {
                let v = get_varint(b, &mut at)? as i64;
                match field {
                    1 => id = Some(v),
                    2 => ttl = v,
                    _ => {}
                }
            }
            (_, 2) => {
                let len = usize::try_from(get_varint(b, &mut at)?).ok()?;
                at = at.checked_add(len).filter(|&end| end <= b.len())?;
            }
            _ => return None,
        }
    }
    Some((id?, ttl))
}

/// How the restored file departs from the archived state at the target:
/// revisions skipped after it (like etcd 3.6's `etcdutl snapshot restore
/// --bump-revision N --mark-compacted`), and lease TTLs lengthened for a
/// `follow` seed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bump {
    /// Revisions to skip after the target.
    pub revisions: i64,
    /// Also mark the bumped revision as compacted.
    pub mark_compacted: bool,
    /// Leases granted for fewer seconds get this TTL (0: none changed).
    /// etcd gives every restored lease its full TTL when the member
    /// starts; a seed that `follow` attaches to later must not expire a
    /// lease on its own in between.
    pub min_lease_ttl_secs: i64,
}

/// Feeds the events that follow the base snapshot.
pub trait EventSource {
    /// Calls `on_revision` for every revision in `(base, target]` in order
    /// and `on_lease` for every lease record up to the target.
    ///
    /// # Errors
    /// Whatever reading the archive or the callbacks fail with.
    fn replay(
        &mut self,
        on_revision: &mut dyn FnMut(&RevisionRecord) -> anyhow::Result<()>,
        on_lease: &mut dyn FnMut(LeaseRecord),
    ) -> anyhow::Result<()>;
}

/// What a synthesis wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Revision of the file (target plus bump).
    pub revision: Revision,
    /// Entries in the `key` bucket (what `etcdutl snapshot status` calls keys).
    pub key_entries: u64,
    /// Revisions replayed on top of the base.
    pub replayed: u64,
    /// Bytes of the file (with the sha256 trailer).
    pub bytes: u64,
    /// Leases whose TTL was raised to [`Bump::min_lease_ttl_secs`].
    pub lengthened_leases: u64,
}

/// The restored file could not be written or did not read back as written.
/// These are local problems (disk full, permissions, a failing disk), not
/// damaged archive objects, and exit with 1, not 4.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Writing the file failed.
    #[error("write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Reading the file back failed.
    #[error("read back {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The file reads back other than it was written.
    #[error("{}: {reason}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
}

/// Wraps a write error of the output file. Out-of-order keys are refused by
/// the page writer with `InvalidInput`: they come from a base snapshot whose
/// bucket is not sorted, an integrity problem of that object.
fn write_err(path: &Path) -> impl Fn(io::Error) -> anyhow::Error + '_ {
    move |e| {
        if e.kind() == io::ErrorKind::InvalidInput {
            bolt_err(BoltError::Invalid(e.to_string()))
        } else {
            OutputError::Write {
                path: path.to_owned(),
                source: e,
            }
            .into()
        }
    }
}

fn bolt_err(e: BoltError) -> anyhow::Error {
    anyhow::Error::from(e).context("read base snapshot")
}

/// Writes the restored snapshot file at `out_path` from the base snapshot at
/// `base_path` (revision `base_revision`) and the events up to `target`,
/// showing per `progress` the copy of the base's keys (bytes written) and
/// the replay (revisions).
///
/// # Errors
/// A chain that does not continue the base, I/O or integrity errors.
pub fn synthesize(
    base_path: &Path,
    base_revision: Revision,
    target: Revision,
    events: &mut dyn EventSource,
    bump: Bump,
    out_path: &Path,
    progress: Mode,
) -> anyhow::Result<Summary> {
    let base = BoltReader::open(base_path).context("open base snapshot")?;
    let buckets = base.buckets().map_err(bolt_err)?;
    if !buckets.iter().any(|(n, _)| n == b"key") {
        bail!("base snapshot has no `key` bucket: not an etcd snapshot");
    }
    let werr = write_err(out_path);
    let mut w = PageWriter::create(out_path).map_err(&werr)?;
    let mut leases: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut roots = Vec::new();
    let mut summary = Summary {
        revision: target + bump.revisions,
        key_entries: 0,
        replayed: 0,
        bytes: 0,
        lengthened_leases: 0,
    };
    for (name, sequence) in &buckets {
        let root = match name.as_slice() {
            b"key" => {
                let mut tree = TreeBuilder::new();
                // The other buckets are small: only the keys' copy shows.
                let copying = Progress::new(progress, "copy base snapshot", Unit::Bytes, None);
                copy_bucket(&base, b"key", &mut tree, &mut w, &werr, &copying)?;
                copying.finish();
                let replaying = Progress::new(
                    progress,
                    "replay",
                    Unit::Items("revisions"),
                    Some((target - base_revision) as u64),
                );
                let mut expected = base_revision + 1;
                events.replay(
                    &mut |record| {
                        if record.revision != expected {
                            bail!(
                                "archive chain broken: revision {} follows {}",
                                record.revision,
                                expected - 1
                            );
                        }
                        for (sub, event) in record.events.iter().enumerate() {
                            let key = revision_key(
                                record.revision,
                                sub as i64,
                                event.kind == EventKind::Delete,
                            );
                            tree.add(&mut w, &key, &encode_key_value(event))
                                .map_err(&werr)?;
                        }
                        expected += 1;
                        replaying.inc(1);
                        Ok(())
                    },
                    &mut |lease| {
                        leases.insert(lease.id.to_be_bytes().to_vec(), encode_lease(&lease));
                    },
                )?;
                if expected != target + 1 {
                    bail!(
                        "archive chain ends at revision {} before the target {target}",
                        expected - 1
                    );
                }
                replaying.finish();
                summary.replayed = (target - base_revision) as u64;
                if bump.revisions > 0 {
                    tree.add(
                        &mut w,
                        &revision_key(target + bump.revisions, 0, false),
                        &[],
                    )
                    .map_err(&werr)?;
                }
                summary.key_entries = tree.count();
                tree.finish(&mut w).map_err(&werr)?
            }
            b"lease" => {
                // The base's leases win: they carry what etcd itself stored.
                base.for_each(b"lease", &mut |k, v| {
                    leases.insert(k.to_vec(), v.to_vec());
                    Ok(())
                })
                .map_err(bolt_err)?;
                if bump.min_lease_ttl_secs > 0 {
                    // Every lease is written anew: without a remaining TTL
                    // checkpointed by etcd, each starts with its full TTL.
                    for v in leases.values_mut() {
                        let (id, ttl) = decode_lease(v)
                            .context("base snapshot: a lease entry does not decode")?;
                        if ttl < bump.min_lease_ttl_secs {
                            summary.lengthened_leases += 1;
                        }
                        *v = encode_lease(&LeaseRecord {
                            id,
                            ttl_secs: ttl.max(bump.min_lease_ttl_secs),
                            revision: 0,
                        });
                    }
                }
                write_map(&mut w, &leases).map_err(&werr)?
            }
            b"meta" => {
                let mut meta = BTreeMap::new();
                base.for_each(b"meta", &mut |k, v| {
                    meta.insert(k.to_vec(), v.to_vec());
                    Ok(())
                })
                .map_err(bolt_err)?;
                if bump.mark_compacted {
                    meta.insert(
                        b"scheduledCompactRev".to_vec(),
                        revision_key(target + bump.revisions, 0, false),
                    );
                }
                write_map(&mut w, &meta).map_err(&werr)?
            }
            other => {
                let mut tree = TreeBuilder::new();
                copy_bucket(&base, other, &mut tree, &mut w, &werr, &Progress::hidden())?;
                tree.finish(&mut w).map_err(&werr)?
            }
        };
        roots.push((name.clone(), bucket_header(root, *sequence)));
    }
    let mut root_tree = TreeBuilder::for_buckets();
    for (name, header) in &roots {
        root_tree.add(&mut w, name, header).map_err(&werr)?;
    }
    let root = root_tree.finish(&mut w).map_err(&werr)?;
    let mut file = w.finish(root).map_err(&werr)?;
    append_sha256(&mut file).map_err(&werr)?;
    // Owner-only like `etcdctl snapshot save`'s files, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(
        etcdpitr_common::store::PRIVATE_FILE_MODE,
    ))
    .map_err(&werr)?;
    file.sync_all().map_err(&werr)?;
    summary.bytes = file.metadata().map_err(&werr)?.len();
    Ok(summary)
}

/// Streams every entry of a base bucket into `tree`; `progress` follows
/// the bytes written.
fn copy_bucket(
    base: &BoltReader,
    bucket: &[u8],
    tree: &mut TreeBuilder,
    w: &mut PageWriter,
    werr: &dyn Fn(io::Error) -> anyhow::Error,
    progress: &Progress,
) -> anyhow::Result<()> {
    let mut io_error = None;
    base.for_each(bucket, &mut |k, v| {
        let added = tree.add(w, k, v).map_err(|e| {
            io_error = Some(e);
            BoltError::Invalid("write failed".into())
        });
        progress.set_done(w.len_bytes());
        added
    })
    .map_err(|e| io_error.take().map_or_else(|| bolt_err(e), werr))
}

fn write_map(w: &mut PageWriter, map: &BTreeMap<Vec<u8>, Vec<u8>>) -> io::Result<u64> {
    let mut tree = TreeBuilder::new();
    for (k, v) in map {
        tree.add(w, k, v)?;
    }
    tree.finish(w)
}

/// Appends sha256 of the whole file, the trailer `etcdutl snapshot restore`
/// checks.
fn append_sha256(file: &mut std::fs::File) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    file.seek(SeekFrom::End(0))?;
    file.write_all(&hasher.finalize())
}

/// Reads a synthesized file back: bbolt's consistency check, the revision
/// it claims and its sha256 trailer. Shows per `progress` the bytes read:
/// the file once for the check (counted when it ends), once for the hash.
///
/// # Errors
/// [`OutputError`]: `Read` if reading it fails, `Mismatch` if it differs
/// from what was written.
pub fn verify_output(path: &Path, expected: &Summary, progress: Mode) -> Result<(), OutputError> {
    let read = |source: io::Error| OutputError::Read {
        path: path.to_owned(),
        source,
    };
    let mismatch = |reason: String| OutputError::Mismatch {
        path: path.to_owned(),
        reason,
    };
    // Our own file: a bbolt I/O error is a local read failure, anything
    // else it reports is a file that is not what was written.
    let bolt = |e: BoltError| match e {
        BoltError::Io(e) if e.kind() != io::ErrorKind::UnexpectedEof => read(e),
        other => mismatch(other.to_string()),
    };
    let progress = Progress::new(
        progress,
        "verify restored file",
        Unit::Bytes,
        Some(2 * expected.bytes),
    );
    let reader = BoltReader::open(path).map_err(bolt)?;
    let counts = reader.check().map_err(bolt)?;
    progress.inc(expected.bytes);
    let keys = counts
        .iter()
        .find(|(n, _)| n == b"key")
        .map_or(0, |(_, c)| *c);
    if keys != expected.key_entries {
        return Err(mismatch(format!(
            "holds {keys} key entries, expected {}",
            expected.key_entries
        )));
    }
    let revision = bbolt::etcd_revision(&reader).map_err(bolt)?;
    if revision != expected.revision {
        return Err(mismatch(format!(
            "is at revision {revision}, expected {}",
            expected.revision
        )));
    }
    let mut file = std::fs::File::open(path).map_err(read)?;
    let len = file.metadata().map_err(read)?.len();
    if len % 512 != 32 {
        return Err(mismatch("has no sha256 trailer".into()));
    }
    let mut hasher = sha2::Sha256::new();
    let mut remaining = len - 32;
    let mut buf = vec![0u8; 1 << 20];
    while remaining > 0 {
        let n = file
            .read(&mut buf[..remaining.min(1 << 20) as usize])
            .map_err(read)?;
        if n == 0 {
            return Err(mismatch("shrank while being verified".into()));
        }
        hasher.update(&buf[..n]);
        remaining -= n as u64;
        progress.inc(n as u64);
    }
    let mut trailer = [0u8; 32];
    file.read_exact(&mut trailer).map_err(read)?;
    if hasher.finalize().as_slice() != trailer {
        return Err(mismatch("sha256 trailer does not match".into()));
    }
    progress.inc(trailer.len() as u64);
    progress.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_decode_as_encoded_and_as_etcd_stores_them() {
        let lease = LeaseRecord {
            id: 0x694d_7a1b_2c3d_4e5f,
            ttl_secs: 5,
            revision: 0,
        };
        assert_eq!(decode_lease(&encode_lease(&lease)), Some((lease.id, 5)));
        // etcd may add RemainingTTL (field 3); it is skipped.
        let mut with_remaining = encode_lease(&lease);
        with_remaining.extend([0x18, 0x03]);
        assert_eq!(decode_lease(&with_remaining), Some((lease.id, 5)));
        assert_eq!(decode_lease(&[0x10, 0x05]), None, "no id");
        assert_eq!(decode_lease(&[0x08]), None, "truncated");
    }

    #[test]
    fn key_value_encoding_matches_etcd() {
        // Bytes etcd 3.5 stored for put("a", "b") at revision 2 (create 2,
        // mod 2, version 1) and for its tombstone.
        let put = Event {
            kind: EventKind::Put,
            key: b"a".to_vec(),
            value: b"b".to_vec(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            lease: 0,
        };
        assert_eq!(
            encode_key_value(&put),
            vec![0x0a, 1, b'a', 0x10, 2, 0x18, 2, 0x20, 1, 0x2a, 1, b'b']
        );
        let del = Event {
            kind: EventKind::Delete,
            value: Vec::new(),
            ..put.clone()
        };
        assert_eq!(encode_key_value(&del), vec![0x0a, 1, b'a']);
        assert_eq!(
            decode_key_value(&encode_key_value(&put), EventKind::Put),
            Some(put.clone())
        );
        assert_eq!(
            revision_key(258, 1, true),
            b"\0\0\0\0\0\0\x01\x02_\0\0\0\0\0\0\0\x01t".to_vec()
        );
        let lease = LeaseRecord {
            id: 300,
            ttl_secs: 5,
            revision: 0,
        };
        assert_eq!(encode_lease(&lease), vec![0x08, 0xac, 0x02, 0x10, 5]);
    }

    #[test]
    fn local_io_errors_exit_1_and_damaged_objects_exit_4() {
        use crate::{classify, ExitKind};
        use etcdpitr_common::snapshot::SnapshotError;
        let full = || io::Error::from(io::ErrorKind::StorageFull);
        let object = || "gen-1/snapshots/x.snap".to_owned();
        let cases: Vec<(anyhow::Error, ExitKind)> = vec![
            // Disk full while writing the base snapshot or the output.
            (
                anyhow::Error::from(SnapshotError::Io {
                    object: object(),
                    source: full(),
                })
                .context("fetch the base snapshot into /out/.etcd-restorer-x/base.db"),
                ExitKind::Other,
            ),
            (
                OutputError::Write {
                    path: "/out/snap.db".into(),
                    source: full(),
                }
                .into(),
                ExitKind::Other,
            ),
            (
                anyhow::Error::from(BoltError::Io(io::Error::from(
                    io::ErrorKind::PermissionDenied,
                )))
                .context("read base snapshot"),
                ExitKind::Other,
            ),
            // The archive object is short or damaged.
            (
                SnapshotError::Io {
                    object: object(),
                    source: io::Error::from(io::ErrorKind::UnexpectedEof),
                }
                .into(),
                ExitKind::Integrity,
            ),
            (
                SnapshotError::ChecksumMismatch { object: object() }.into(),
                ExitKind::Integrity,
            ),
            (
                bolt_err(BoltError::Invalid("bad page".into())),
                ExitKind::Integrity,
            ),
        ];
        for (error, kind) in cases {
            assert_eq!(classify(&error), kind, "{error:#}");
        }
        let out = OutputError::Write {
            path: "/out/snap.db".into(),
            source: full(),
        };
        assert!(out.to_string().contains("/out/snap.db"), "{out}");
    }

    #[test]
    fn reading_back_a_missing_output_is_a_local_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.db");
        let summary = Summary {
            revision: 1,
            key_entries: 0,
            replayed: 0,
            bytes: 0,
            lengthened_leases: 0,
        };
        let err = verify_output(&path, &summary, Mode::Hidden).unwrap_err();
        assert!(matches!(err, OutputError::Read { .. }), "{err}");
        assert!(err.to_string().contains("gone.db"), "{err}");
        assert_eq!(
            crate::classify(&anyhow::Error::from(err)),
            crate::ExitKind::Other
        );
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let err = verify_output(&path, &summary, Mode::Hidden).unwrap_err();
        assert!(matches!(err, OutputError::Mismatch { .. }), "{err}");
    }
}
