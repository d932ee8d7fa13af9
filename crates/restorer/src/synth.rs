//! Native snapshot synthesis: the base snapshot's buckets, the archived
//! events after its revision appended to the `key` bucket, lease records
//! merged into the `lease` bucket, then meta pages and etcd's sha256
//! trailer. Revisions only grow, so the `key` bucket is a pure append and
//! memory stays bounded whatever the number of revisions.

use std::collections::BTreeMap;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use etcdpitr_common::bbolt::{self, BoltError, BoltReader, PageSet};
use etcdpitr_common::progress::{Mode, Progress, Unit};
use etcdpitr_common::relay;
use etcdpitr_common::segment::{Event, EventKind, LeaseRecord, RevisionRecord};
use etcdpitr_common::snapshot::SnapshotHeader;
use etcdpitr_common::Revision;
use sha2::Digest;

use crate::bolt_writer::{bucket_header, Finished, PageWriter, TreeBuilder};

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

/// What [`synthesize`] wrote, for [`seal`] to read back.
pub struct Written {
    summary: Summary,
    page_size: u64,
    /// The base snapshot's first two pages (its meta pages, since
    /// overwritten) and its bytes after its high-water mark (etcd's sha256
    /// trailer, since overwritten).
    base_head: Vec<u8>,
    base_tail: Vec<u8>,
    base_high_water: u64,
    base_blake3: [u8; 32],
    /// The leaves of the base's `key` bucket (or the entries of an inline
    /// one), and the entries added to it: the restored bucket must hold the
    /// base's entries plus those.
    base_leaves: PageSet,
    inline_entries: u64,
    added: u64,
    finished: Finished,
}

/// Turns the base snapshot in `out_path` (the file etcd streamed, as
/// [`crate::source::fetch_snapshot`] wrote it; `base` is its object's
/// header) into the snapshot at `target`: the archived events up to it are
/// appended to the `key` bucket, whose pages left of its right edge stay
/// as they are (bbolt pages are copy-on-write); the small buckets are
/// written anew with the archived leases and `bump`; then the meta pages.
/// The replay shows its progress per `progress`. [`seal`] completes the
/// file.
///
/// # Errors
/// A chain that does not continue the base, I/O or integrity errors.
pub fn synthesize(
    out_path: &Path,
    base: &SnapshotHeader,
    target: Revision,
    events: &mut dyn EventSource,
    bump: Bump,
    progress: Mode,
) -> anyhow::Result<Written> {
    let reader = BoltReader::open(out_path).map_err(bolt_err)?;
    let buckets = reader.buckets().map_err(bolt_err)?;
    if !buckets.iter().any(|(n, _)| n == b"key") {
        bail!(bolt_err(BoltError::Invalid(
            "no `key` bucket: not an etcd snapshot".into()
        )));
    }
    let (page_size, base_high_water) = (reader.page_size(), reader.high_water());
    let base_leaves = reader.leaf_pages(b"key").map_err(bolt_err)?;
    let (mut added, mut inline_entries) = (0, 0);
    let werr = write_err(out_path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(out_path)
        .map_err(&werr)?;
    // etcd's snapshot is its pages and a sha256 trailer.
    let tail_len = base.db_bytes.checked_sub(base_high_water * page_size);
    let Some(tail_len) = tail_len.filter(|&n| n <= page_size) else {
        bail!(bolt_err(BoltError::Invalid(format!(
            "{} bytes do not hold {base_high_water} pages of {page_size} bytes and a trailer",
            base.db_bytes
        ))));
    };
    let mut base_head = vec![0u8; 2 * page_size as usize];
    let mut base_tail = vec![0u8; tail_len as usize];
    file.read_exact_at(&mut base_head, 0).map_err(&werr)?;
    file.read_exact_at(&mut base_tail, base_high_water * page_size)
        .map_err(&werr)?;
    let mut w = PageWriter::append_to(file, base_high_water, page_size).map_err(&werr)?;
    let mut leases: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut roots = Vec::new();
    let mut summary = Summary {
        revision: target + bump.revisions,
        key_entries: 0,
        replayed: 0,
        bytes: 0,
        lengthened_leases: 0,
    };
    let base_revision = base.revision;
    for (name, sequence) in &buckets {
        let root = match name.as_slice() {
            b"key" => {
                let edge = reader
                    .right_edge(b"key")
                    .map_err(bolt_err)?
                    .unwrap_or_default();
                // A small bucket lives inline in its parent, on no leaf page
                // of its own: its entries are counted here.
                if base_leaves.is_empty() {
                    inline_entries = edge.leaf.len() as u64;
                }
                let mut tree = TreeBuilder::continue_from(edge);
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
                added = tree.count();
                tree.finish(&mut w).map_err(&werr)?
            }
            b"lease" => {
                // The base's leases win: they carry what etcd itself stored.
                reader
                    .for_each(b"lease", &mut |k, v| {
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
                reader
                    .for_each(b"meta", &mut |k, v| {
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
                // Members, cluster, auth: small; written anew so that the
                // pages of the base's root tree can all be let go.
                let mut tree = TreeBuilder::new();
                let mut io_error = None;
                reader
                    .for_each(other, &mut |k, v| {
                        tree.add(&mut w, k, v).map_err(|e| {
                            io_error = Some(e);
                            BoltError::Invalid("write failed".into())
                        })
                    })
                    .map_err(|e| io_error.take().map_or_else(|| bolt_err(e), &werr))?;
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
    let finished = w.finish(root, reader.txid() + 2).map_err(&werr)?;
    Ok(Written {
        summary,
        page_size,
        base_head,
        base_tail,
        base_high_water,
        base_blake3: base.db_blake3,
        base_leaves,
        inline_entries,
        added,
        finished,
    })
}

fn write_map(w: &mut PageWriter, map: &BTreeMap<Vec<u8>, Vec<u8>>) -> io::Result<u64> {
    let mut tree = TreeBuilder::new();
    for (k, v) in map {
        tree.add(w, k, v)?;
    }
    tree.finish(w)
}

/// How [`seal`] checks the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SealOptions {
    /// Also run bbolt's whole consistency check (every page of every
    /// bucket), which reads the file's pages one by one a second time.
    pub paranoid: bool,
}

/// Completes the file [`synthesize`] wrote at `path`: reads it back once
/// while the disk syncs it, computing the sha256 trailer `etcdutl
/// snapshot restore` checks and checking that every byte is what was
/// meant (the base's pages hash to the archived snapshot's blake3 with the
/// replaced meta pages and trailer, the pages appended to what was
/// written, the meta pages to what was written), that it is a bbolt file
/// at the expected revision, and that every leaf of the `key` bucket is a
/// leaf page where the branch pages say (counting the entries). Then
/// appends the trailer and syncs. Shows the bytes read per `progress`.
///
/// # Errors
/// [`OutputError`]: `Read` or `Write` for local I/O failures, `Mismatch`
/// if the file reads back other than it was written.
pub fn seal(
    path: &Path,
    written: Written,
    options: SealOptions,
    progress: Mode,
) -> Result<Summary, OutputError> {
    let Written {
        mut summary,
        page_size,
        base_head,
        base_tail,
        base_high_water,
        base_blake3,
        base_leaves,
        inline_entries,
        added,
        finished,
    } = written;
    let read = |source: io::Error| OutputError::Read {
        path: path.to_owned(),
        source,
    };
    let write = |source: io::Error| OutputError::Write {
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
    let mut file = finished.file;
    let len = finished.high_water * page_size;
    // The disk writes the file back while it is read here.
    let syncing = {
        let file = file.try_clone().map_err(write)?;
        std::thread::spawn(move || file.sync_data())
    };
    let reader = BoltReader::open(path).map_err(bolt)?;
    let revision = bbolt::etcd_revision(&reader).map_err(bolt)?;
    if revision != summary.revision {
        return Err(mismatch(format!(
            "is at revision {revision}, expected {}",
            summary.revision
        )));
    }
    let leaves = reader.leaf_pages(b"key").map_err(bolt)?;
    let reading = Progress::new(progress, "read back restored file", Unit::Bytes, Some(len));
    let mut sha = sha2::Sha256::new();
    let mut base_hash = blake3::Hasher::new();
    let mut appended = blake3::Hasher::new();
    let base_end = base_high_water * page_size;
    let meta_len = base_head.len() as u64;
    let (mut key_entries, mut leaves_seen, mut base_entries) = (0u64, 0u64, inline_entries);
    // Reading, the checks and blake3 here; sha256, the longest of them, on
    // a second thread of its own.
    let mut check = |chunk: &[u8], at: u64| -> Result<(), OutputError> {
        // Pages of this chunk (chunks hold whole pages).
        let first = at / page_size;
        for (i, page) in chunk.chunks(page_size as usize).enumerate() {
            let pgid = first + i as u64;
            if leaves.contains(pgid) {
                let (id, flags, count) = bbolt::page_header(page);
                if id != pgid || flags != bbolt::LEAF_PAGE {
                    return Err(mismatch(format!(
                        "page {pgid}, a leaf of the key bucket, says it is page {id} with flags {flags:#x}"
                    )));
                }
                key_entries += u64::from(count);
                leaves_seen += 1;
            }
            if pgid < base_high_water && base_leaves.contains(pgid) {
                base_entries += u64::from(bbolt::page_header(page).2);
            }
        }
        // The byte ranges of the chunk in the base's pages and after.
        let end = at + chunk.len() as u64;
        if at < meta_len {
            let m = meta_len.min(end);
            if chunk[..(m - at) as usize] != finished.meta[at as usize..m as usize] {
                return Err(mismatch("its meta pages are not what was written".into()));
            }
            base_hash.update(&base_head[at as usize..m as usize]);
        }
        if end > meta_len && at < base_end {
            let (from, to) = (at.max(meta_len), end.min(base_end));
            base_hash.update(&chunk[(from - at) as usize..(to - at) as usize]);
        }
        if end > base_end {
            appended.update(&chunk[(at.max(base_end) - at) as usize..]);
        }
        Ok(())
    };
    let checked_to = relay::relay(
        relay::CHUNK_BYTES,
        |feed| {
            let mut at = 0u64;
            while at < len {
                let Some(mut buf) = feed.buffer() else {
                    break;
                };
                buf.resize(relay::CHUNK_BYTES.min((len - at) as usize), 0);
                file.read_exact_at(&mut buf, at).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        mismatch("shrank while being read back".into())
                    } else {
                        read(e)
                    }
                })?;
                check(&buf, at)?;
                at += buf.len() as u64;
                reading.inc(buf.len() as u64);
                if !feed.send(buf) {
                    break;
                }
            }
            Ok(at)
        },
        |chunk| {
            sha.update(chunk);
            Ok(())
        },
    )?;
    if checked_to != len {
        return Err(mismatch("was not read back whole".into()));
    }
    base_hash.update(&base_tail);
    if base_hash.finalize().as_bytes() != &base_blake3 {
        return Err(mismatch(
            "the base snapshot's pages differ from the archived snapshot".into(),
        ));
    }
    if appended.finalize() != finished.appended {
        return Err(mismatch(
            "the pages appended differ from what was written".into(),
        ));
    }
    if leaves_seen != leaves.len() {
        return Err(mismatch(
            "a leaf of the key bucket lies beyond its end".into(),
        ));
    }
    if key_entries != base_entries + added {
        return Err(mismatch(format!(
            "its key bucket holds {key_entries} entries, not the base snapshot's {base_entries} plus the {added} written"
        )));
    }
    summary.key_entries = key_entries;
    if options.paranoid {
        let counts = reader.check().map_err(bolt)?;
        let keys = counts
            .iter()
            .find(|(n, _)| n == b"key")
            .map_or(0, |(_, c)| *c);
        if keys != key_entries {
            return Err(mismatch(format!(
                "the consistency check counts {keys} key entries, the leaves {key_entries}"
            )));
        }
    }
    reading.finish();
    syncing
        .join()
        .map_err(|_| write(io::Error::other("the sync thread panicked")))?
        .map_err(write)?;
    // The trailer `etcdutl snapshot restore` checks.
    file.seek(SeekFrom::End(0)).map_err(write)?;
    file.write_all(&sha.finalize()).map_err(write)?;
    // Owner-only like `etcdctl snapshot save`'s files, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(
        etcdpitr_common::store::PRIVATE_FILE_MODE,
    ))
    .map_err(write)?;
    file.sync_all().map_err(write)?;
    summary.bytes = len + 32;
    Ok(summary)
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

    /// A real etcd 3.5.1 snapshot (`etcdctl snapshot save`) at revision 31
    /// with 30 key entries.
    const ETCD_SNAPSHOT: &[u8] = include_bytes!("../../common/testdata/etcd-3.5.1-rev31.db");

    struct Events(Vec<RevisionRecord>, Vec<LeaseRecord>);

    impl EventSource for Events {
        fn replay(
            &mut self,
            on_revision: &mut dyn FnMut(&RevisionRecord) -> anyhow::Result<()>,
            on_lease: &mut dyn FnMut(LeaseRecord),
        ) -> anyhow::Result<()> {
            for l in &self.1 {
                on_lease(*l);
            }
            self.0.iter().try_for_each(on_revision)
        }
    }

    /// Revisions 32..=`last` on top of the real snapshot: one put each
    /// (some with a lease and a large value), every tenth a delete.
    fn events(last: Revision) -> Events {
        let records = (32..=last)
            .map(|revision| {
                let key = format!("k{}", revision % 13).into_bytes();
                let event = if revision % 10 == 0 {
                    Event::deleted(key, revision)
                } else {
                    Event {
                        kind: EventKind::Put,
                        key,
                        value: vec![revision as u8; if revision % 97 == 0 { 9000 } else { 40 }],
                        create_revision: 32,
                        mod_revision: revision,
                        version: revision - 31,
                        lease: if revision % 3 == 0 { 77 } else { 0 },
                    }
                };
                RevisionRecord {
                    revision,
                    observed_ms: 0,
                    catching_up: false,
                    events: vec![event],
                }
            })
            .collect();
        let lease = LeaseRecord {
            id: 77,
            ttl_secs: 60,
            revision: 33,
        };
        // Like the archive's records: only leases referenced by then.
        Events(
            records,
            (last >= lease.revision)
                .then_some(lease)
                .into_iter()
                .collect(),
        )
    }

    fn base_header() -> SnapshotHeader {
        SnapshotHeader {
            generation: 1,
            revision: 31,
            taken_ms: 0,
            db_bytes: ETCD_SNAPSHOT.len() as u64,
            db_blake3: *blake3::hash(ETCD_SNAPSHOT).as_bytes(),
            prev_digest: [0; 32],
            prev_revision: 0,
        }
    }

    #[test]
    fn revisions_are_appended_to_the_base_pages_in_place() {
        let dir = tempfile::tempdir().unwrap();
        for (last, bump) in [
            (31, Bump::default()),
            (40, Bump::default()),
            (
                5_000,
                Bump {
                    revisions: 100,
                    mark_compacted: true,
                    min_lease_ttl_secs: 600,
                },
            ),
        ] {
            let path = dir.path().join(format!("{last}.db"));
            std::fs::write(&path, ETCD_SNAPSHOT).unwrap();
            let mut source = events(last);
            let written =
                synthesize(&path, &base_header(), last, &mut source, bump, Mode::Hidden).unwrap();
            let summary =
                seal(&path, written, SealOptions { paranoid: true }, Mode::Hidden).unwrap();
            let bumped = u64::from(bump.revisions > 0);
            assert_eq!(summary.revision, last + bump.revisions);
            assert_eq!(summary.replayed, (last - 31) as u64);
            assert_eq!(summary.key_entries, 30 + summary.replayed + bumped);
            assert_eq!(
                summary.lengthened_leases,
                u64::from(bump.min_lease_ttl_secs > 0)
            );
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(summary.bytes, bytes.len() as u64);
            // The trailer `etcdutl snapshot restore` checks.
            let (body, trailer) = bytes.split_at(bytes.len() - 32);
            assert_eq!(bytes.len() % 512, 32);
            assert_eq!(sha2::Sha256::digest(body).as_slice(), trailer);
            // The base's pages past its meta pages are untouched.
            let base_pages = ETCD_SNAPSHOT.len() - 32;
            assert_eq!(bytes[8192..base_pages], ETCD_SNAPSHOT[8192..base_pages]);

            let r = BoltReader::open(&path).unwrap();
            assert_eq!(bbolt::etcd_revision(&r).unwrap(), last + bump.revisions);
            let mut entries = Vec::new();
            for_each_key_entry(&r, &mut |e| entries.push(e)).unwrap();
            let replayed: Vec<Event> = source.0.iter().flat_map(|r| r.events.clone()).collect();
            let tail = &entries[30..30 + replayed.len()];
            for (got, want) in tail.iter().zip(&replayed) {
                assert_eq!(got.key, want.key);
                if want.kind == EventKind::Put {
                    assert_eq!(got, want);
                }
            }
            let lease = r.get(b"lease", &77i64.to_be_bytes()).unwrap();
            let expected_ttl = if bump.min_lease_ttl_secs > 0 { 600 } else { 60 };
            assert_eq!(
                lease.as_deref().and_then(decode_lease),
                (last >= 33).then_some((77, expected_ttl))
            );
            let compacted = r.get(b"meta", b"scheduledCompactRev").unwrap();
            assert_eq!(
                compacted.is_some_and(|v| v == revision_key(last + 100, 0, false)),
                bump.mark_compacted
            );
        }
    }

    #[test]
    fn a_file_that_reads_back_otherwise_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.db");
        // A base page changed after it was fetched, an appended page
        // changed after it was written, the file cut short.
        let damage: [(&str, fn(&Path, u64)); 3] = [
            ("base snapshot's pages differ", |p, _| {
                flip(p, 3 * 4096 + 100);
            }),
            ("appended differ", |p, len| flip(p, len - 100)),
            ("", |p, len| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(len - 4096)
                    .unwrap();
            }),
        ];
        for (needle, damage) in damage {
            std::fs::remove_file(&path).ok();
            std::fs::write(&path, ETCD_SNAPSHOT).unwrap();
            let written = synthesize(
                &path,
                &base_header(),
                400,
                &mut events(400),
                Bump::default(),
                Mode::Hidden,
            )
            .unwrap();
            damage(&path, std::fs::metadata(&path).unwrap().len());
            let err = seal(&path, written, SealOptions::default(), Mode::Hidden).unwrap_err();
            assert!(matches!(err, OutputError::Mismatch { .. }), "{err}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        // A file gone before it was read back is a local error (exit 1).
        std::fs::remove_file(&path).ok();
        std::fs::write(&path, ETCD_SNAPSHOT).unwrap();
        let written = synthesize(
            &path,
            &base_header(),
            40,
            &mut events(40),
            Bump::default(),
            Mode::Hidden,
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = seal(&path, written, SealOptions::default(), Mode::Hidden).unwrap_err();
        assert!(matches!(err, OutputError::Read { .. }), "{err}");
        assert!(err.to_string().contains("out.db"), "{err}");
        assert_eq!(
            crate::classify(&anyhow::Error::from(err)),
            crate::ExitKind::Other
        );
    }

    fn flip(path: &Path, at: u64) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x55], at).unwrap();
    }
}
