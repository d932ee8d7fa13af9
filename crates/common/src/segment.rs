//! The segment format: a self-describing, checksummed, zstd-compressed run of
//! archived revisions.
//!
//! ```text
//! offset size field
//!      0    8 magic            b"EPITRSEG"
//!      8    2 format version   u16 LE (2; version 1 ends the header at 80)
//!     10    1 codec            u8 (1 = zstd)
//!     11    1 flags            u8 (0)
//!     12    4 reserved         zero
//!     16    8 generation       u64 LE
//!     24    8 prev_revision    i64 LE, last revision of the previous segment
//!     32    8 first_revision   i64 LE, prev_revision + 1
//!     40    8 last_revision    i64 LE, >= prev_revision
//!     48    8 first_time_ms    i64 LE, observed time of the first record
//!     56    8 last_time_ms     i64 LE, time `last_revision` was last known current
//!     64    8 record_count     u64 LE
//!     72    8 body_len         u64 LE, bytes of compressed body
//!     80   32 prev_digest      digest of the segment the writer sealed before
//!                              this one in the generation, or the generation's
//!                              anchor (see `crate::hashchain`)
//!    112    8 snapshot_revision i64 LE, newest base snapshot of the generation
//!                              the writer knew archived when sealing (0: none)
//!    120   32 snapshot_digest  that snapshot's digest (zero: none)
//!    152    … body             zstd frame of records
//! 152+n    32 checksum         blake3 of every byte before it (the segment's
//!                              digest)
//! ```
//!
//! Records (little-endian, inside the body):
//!
//! ```text
//! revision: tag 1, revision i64, observed_ms i64, flags u8 (bit 0: observed
//!           while catching up, so observed_ms is only an upper bound),
//!           event count u32, then per event in sub-revision order:
//!           kind u8 (0 put, 1 delete), key (u32 len + bytes); puts add
//!           create_revision i64, mod_revision i64, version i64, lease i64,
//!           value (u32 len + bytes)
//! lease:    tag 2, lease id i64, granted TTL seconds i64, revision i64
//!           (first revision whose events referenced it)
//! progress: tag 3, revision i64, observed_ms i64 (the cluster's revision was
//!           still `revision` at `observed_ms`)
//! ```
//!
//! # Limits
//!
//! Everything read from the store is untrusted: a count or length is never
//! used to size an allocation. Every length is checked against the limits
//! below (the writer enforces the same limits, so whatever it writes can be
//! read) and against what the body can still hold; fields are read into
//! buffers that grow only as data arrives. The *decoded size* of a record
//! approximates its memory once decoded: [`RECORD_DECODED_OVERHEAD_BYTES`]
//! per record plus, for each event, [`EVENT_DECODED_OVERHEAD_BYTES`] and its
//! key and value bytes. A [`RecordReader`] holds one record at a time, so
//! its memory is bounded by [`MAX_REVISION_DECODED_BYTES`]; [`decode_all`]
//! holds a whole segment, at most [`MAX_SEGMENT_DECODED_BYTES`].

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::Revision;

/// Magic bytes at the start of every segment.
pub const MAGIC: &[u8; 8] = b"EPITRSEG";
/// The segment format version this build writes; it also reads version 1
/// (written before the hash chain, without its three fields).
pub const FORMAT_VERSION: u16 = 2;
/// Length of the fixed header of format version 1.
pub const HEADER_LEN_V1: usize = 80;
/// Codec id of zstd.
pub const CODEC_ZSTD: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 152;
/// Length of the blake3 trailer.
pub const TRAILER_LEN: usize = 32;

/// Largest key accepted (64 MiB). etcd bounds a whole request by
/// `--max-request-bytes` (1.5 MiB by default, 10 MiB recommended maximum).
pub const MAX_KEY_BYTES: u64 = 64 << 20;
/// Largest value accepted (64 MiB); see [`MAX_KEY_BYTES`].
pub const MAX_VALUE_BYTES: u64 = 64 << 20;
/// Most events in one revision. Puts are bounded by etcd's `--max-txn-ops`
/// (128 by default); a range delete or a lease revoke deletes many keys in
/// one revision, hence the wide margin.
pub const MAX_EVENTS_PER_REVISION: u64 = 1 << 20;
/// Decoded-size charge of one record, on top of its events.
pub const RECORD_DECODED_OVERHEAD_BYTES: u64 = 64;
/// Decoded-size charge of one event, on top of its key and value bytes.
pub const EVENT_DECODED_OVERHEAD_BYTES: u64 = 128;
/// Largest decoded size of one revision record (192 MiB): room for a
/// largest key and value plus half a million small events.
pub const MAX_REVISION_DECODED_BYTES: u64 = 192 << 20;
/// Largest decoded size of all records of one segment (256 MiB); the
/// archiver seals segments at 16 MiB of records by default.
pub const MAX_SEGMENT_DECODED_BYTES: u64 = 256 << 20;
/// Most records in one segment: the decoded-size limit allows no more.
pub const MAX_RECORDS_PER_SEGMENT: u64 = MAX_SEGMENT_DECODED_BYTES / RECORD_DECODED_OVERHEAD_BYTES;
/// Largest decompressed body (256 MiB). A record's encoding is never longer
/// than its decoded size, so a body within the limits above fits; the cap
/// stops a small "zstd bomb" from being decompressed any further.
pub const MAX_BODY_BYTES: u64 = 256 << 20;
/// Largest zstd window accepted (log2: 8 MiB). The archiver compresses
/// segments and snapshots at level 1 (a 512 KiB window; earlier snapshots
/// used level 3, 2 MiB); a frame asking for more would only make the
/// decoder allocate more.
pub const MAX_ZSTD_WINDOW_LOG: u32 = 23;

const TAG_REVISION: u8 = 1;
const TAG_LEASE: u8 = 2;
const TAG_PROGRESS: u8 = 3;
const FLAG_CATCHING_UP: u8 = 1;
/// zstd level of segments built with [`SegmentBuilder::new`]: level 1 keeps
/// the archiver's CPU far below etcd's own (see "Archive size" in
/// `docs/benchmarks.md`).
pub const ZSTD_LEVEL: i32 = 1;
/// Highest zstd level a segment may be built with
/// ([`SegmentBuilder::with_level`]): zstd's levels above it use windows
/// larger than [`MAX_ZSTD_WINDOW_LOG`], which readers refuse.
pub const MAX_ZSTD_LEVEL: i32 = 19;
/// Initial capacity of a field buffer: larger fields grow as data arrives.
const FIELD_CHUNK: u64 = 64 << 10;
/// Initial capacity of a revision's event list.
const EVENTS_CHUNK: u64 = 1024;

/// Errors reading a segment.
#[derive(Debug, Error)]
pub enum SegmentError {
    /// The object does not start with the segment magic.
    #[error("{object}: not a segment (bad magic)")]
    BadMagic {
        /// Object the bytes came from.
        object: String,
    },
    /// A format version this build does not know.
    #[error("{object}: unsupported segment format version {version} (this build reads 1 and {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// Object the bytes came from.
        object: String,
        /// Version found.
        version: u16,
    },
    /// The stored checksum does not match the content.
    #[error("{object}: checksum mismatch (object is corrupted)")]
    ChecksumMismatch {
        /// Object the bytes came from.
        object: String,
    },
    /// The bytes are structurally invalid.
    #[error("{object}: malformed segment: {reason}")]
    Malformed {
        /// Object the bytes came from.
        object: String,
        /// What is wrong.
        reason: String,
    },
}

/// Put or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A key was created or updated.
    Put,
    /// A key was deleted (tombstone).
    Delete,
}

/// One watch event, with everything needed to rebuild the key at its revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for deletes).
    pub value: Vec<u8>,
    /// Revision the key was created at (0 for deletes).
    pub create_revision: Revision,
    /// Revision of this modification.
    pub mod_revision: Revision,
    /// Version of the key after this modification (0 for deletes).
    pub version: i64,
    /// Lease attached to the key (0 for none).
    pub lease: i64,
}

impl Event {
    /// The delete of `key` at revision `mod_revision`, as etcd reports it
    /// (the key and the revision only).
    pub fn deleted(key: Vec<u8>, mod_revision: Revision) -> Self {
        Self {
            kind: EventKind::Delete,
            key,
            value: Vec::new(),
            create_revision: 0,
            mod_revision,
            version: 0,
            lease: 0,
        }
    }
}

/// All events of one revision, in sub-revision order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevisionRecord {
    /// The revision.
    pub revision: Revision,
    /// Wall-clock time (Unix ms) the archiver observed it.
    pub observed_ms: i64,
    /// Observed while catching up: committed earlier than `observed_ms`.
    pub catching_up: bool,
    /// Events in sub-revision order; never empty.
    pub events: Vec<Event>,
}

/// A lease referenced by archived keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Lease id.
    pub id: i64,
    /// Granted TTL in seconds.
    pub ttl_secs: i64,
    /// First revision whose events referenced this lease.
    pub revision: Revision,
}

/// One record of a segment body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A revision and its events.
    Revision(RevisionRecord),
    /// A lease.
    Lease(LeaseRecord),
    /// The cluster was still at `revision` at `observed_ms`.
    Progress {
        /// Current revision.
        revision: Revision,
        /// Wall-clock time (Unix ms).
        observed_ms: i64,
    },
}

/// The decoded fixed header of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Generation the segment belongs to.
    pub generation: u64,
    /// Last revision of the previous segment (or the generation's start).
    pub prev_revision: Revision,
    /// Last revision held.
    pub last_revision: Revision,
    /// Observed time of the first record.
    pub first_time_ms: i64,
    /// Time `last_revision` was last known current.
    pub last_time_ms: i64,
    /// Number of records in the body.
    pub record_count: u64,
    /// The format version it was written in.
    pub version: u16,
    /// Digest of its predecessor in the generation's hash chain (zero in
    /// format version 1).
    pub prev_digest: [u8; 32],
    /// The newest base snapshot (revision, digest) the writer knew
    /// archived when sealing it, if any.
    pub snapshot: Option<(Revision, [u8; 32])>,
}

/// Builds one segment in memory, compressing as records arrive.
///
/// Memory use is the compressed size of the segment so far.
pub struct SegmentBuilder {
    generation: u64,
    prev_revision: Revision,
    last_revision: Revision,
    first_time_ms: Option<i64>,
    last_time_ms: i64,
    record_count: u64,
    raw_bytes: u64,
    decoded_bytes: u64,
    revisions: u64,
    encoder: zstd::Encoder<'static, Vec<u8>>,
    scratch: Vec<u8>,
    prev_digest: [u8; 32],
    snapshot: Option<(Revision, [u8; 32])>,
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The decoded size of a revision record, or why it exceeds the limits.
fn revision_decoded_bytes(r: &RevisionRecord) -> Result<u64, String> {
    if r.events.len() as u64 > MAX_EVENTS_PER_REVISION {
        return Err(format!(
            "revision {} has {} events, more than the format allows ({MAX_EVENTS_PER_REVISION})",
            r.revision,
            r.events.len()
        ));
    }
    let mut size = RECORD_DECODED_OVERHEAD_BYTES;
    for e in &r.events {
        let value_len = match e.kind {
            EventKind::Put => e.value.len() as u64,
            EventKind::Delete => 0,
        };
        if e.key.len() as u64 > MAX_KEY_BYTES || value_len > MAX_VALUE_BYTES {
            return Err(format!(
                "revision {}: a key of {} bytes or value of {value_len} bytes is larger than the format allows ({MAX_KEY_BYTES}, {MAX_VALUE_BYTES})",
                r.revision,
                e.key.len()
            ));
        }
        size += EVENT_DECODED_OVERHEAD_BYTES + e.key.len() as u64 + value_len;
    }
    if size > MAX_REVISION_DECODED_BYTES {
        return Err(format!(
            "revision {} decodes to {size} bytes, more than the format allows ({MAX_REVISION_DECODED_BYTES})",
            r.revision
        ));
    }
    Ok(size)
}

impl SegmentBuilder {
    /// Starts a segment that follows `prev_revision` and, in the
    /// generation's hash chain, the object with digest `prev_digest`.
    pub fn new(
        generation: u64,
        prev_revision: Revision,
        prev_digest: [u8; 32],
    ) -> io::Result<Self> {
        Self::with_level(generation, prev_revision, prev_digest, ZSTD_LEVEL)
    }

    /// As [`SegmentBuilder::new`], compressing at zstd level `level`
    /// (negative levels are zstd's fast ones).
    ///
    /// # Errors
    /// `InvalidInput` for a level above [`MAX_ZSTD_LEVEL`]: its frames
    /// would need a window that readers refuse.
    pub fn with_level(
        generation: u64,
        prev_revision: Revision,
        prev_digest: [u8; 32],
        level: i32,
    ) -> io::Result<Self> {
        if level > MAX_ZSTD_LEVEL {
            return Err(invalid_input(format!(
                "zstd level {level} is above {MAX_ZSTD_LEVEL}: its window would exceed what segment readers accept (2^{MAX_ZSTD_WINDOW_LOG} bytes)"
            )));
        }
        Ok(Self {
            generation,
            prev_revision,
            last_revision: prev_revision,
            first_time_ms: None,
            last_time_ms: 0,
            record_count: 0,
            raw_bytes: 0,
            decoded_bytes: 0,
            revisions: 0,
            encoder: zstd::Encoder::new(Vec::new(), level)?,
            scratch: Vec::new(),
            prev_digest,
            snapshot: None,
        })
    }

    /// Commits the segment to a base snapshot of its generation (the newest
    /// known archived; see `crate::hashchain`).
    pub fn commit_snapshot(&mut self, revision: Revision, digest: [u8; 32]) {
        self.snapshot = Some((revision, digest));
    }

    /// Appends a record.
    ///
    /// # Errors
    /// `InvalidInput` if a revision does not directly follow the previous one,
    /// or a revision has no events: the chain must have no holes. Also
    /// `InvalidInput` if the record exceeds a format limit (see the module
    /// documentation), or would make the segment exceed one: seal the segment
    /// when [`SegmentBuilder::is_full`] says so.
    pub fn push(&mut self, record: &Record) -> io::Result<()> {
        match record {
            Record::Revision(r) => self.push_revision(r),
            Record::Progress {
                revision,
                observed_ms,
            } => {
                let time = (*revision == self.last_revision).then_some(*observed_ms);
                self.scratch.clear();
                encode_record(record, &mut self.scratch);
                self.append_scratch(time, RECORD_DECODED_OVERHEAD_BYTES)
            }
            Record::Lease(_) => {
                self.scratch.clear();
                encode_record(record, &mut self.scratch);
                self.append_scratch(None, RECORD_DECODED_OVERHEAD_BYTES)
            }
        }
    }

    /// Appends a revision record.
    ///
    /// # Errors
    /// As for [`SegmentBuilder::push`].
    pub fn push_revision(&mut self, r: &RevisionRecord) -> io::Result<()> {
        if self.last_revision.checked_add(1) != Some(r.revision) || r.events.is_empty() {
            return Err(invalid_input(format!(
                "revision {} ({} events) does not follow {}",
                r.revision,
                r.events.len(),
                self.last_revision
            )));
        }
        let decoded = revision_decoded_bytes(r).map_err(invalid_input)?;
        self.scratch.clear();
        encode_revision(r, &mut self.scratch);
        self.append_scratch(Some(r.observed_ms), decoded)?;
        self.last_revision = r.revision;
        self.revisions += 1;
        Ok(())
    }

    /// Compresses the encoded record in `scratch`, noting its time.
    fn append_scratch(&mut self, time_ms: Option<i64>, decoded: u64) -> io::Result<()> {
        if self.record_count >= MAX_RECORDS_PER_SEGMENT
            || self.decoded_bytes + decoded > MAX_SEGMENT_DECODED_BYTES
            || self.raw_bytes + self.scratch.len() as u64 > MAX_BODY_BYTES
        {
            return Err(invalid_input(format!(
                "segment after revision {} is full: {} records decoding to {} bytes (limits {MAX_RECORDS_PER_SEGMENT} and {MAX_SEGMENT_DECODED_BYTES})",
                self.prev_revision, self.record_count, self.decoded_bytes
            )));
        }
        self.encoder.write_all(&self.scratch)?;
        if let Some(t) = time_ms {
            self.first_time_ms.get_or_insert(t);
            self.last_time_ms = self.last_time_ms.max(t);
        }
        self.record_count += 1;
        self.raw_bytes += self.scratch.len() as u64;
        self.decoded_bytes += decoded;
        Ok(())
    }

    /// Uncompressed bytes appended so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes
    }

    /// True when a largest possible revision (and a lease record for each of
    /// its events) might no longer fit within the segment limits: seal the
    /// segment before pushing more.
    pub fn is_full(&self) -> bool {
        self.decoded_bytes + MAX_REVISION_DECODED_BYTES > MAX_SEGMENT_DECODED_BYTES
            || self.record_count + MAX_EVENTS_PER_REVISION + 1 > MAX_RECORDS_PER_SEGMENT
    }

    /// Number of revisions held.
    pub fn revisions(&self) -> u64 {
        self.revisions
    }

    /// Last revision held (or the previous segment's when empty).
    pub fn last_revision(&self) -> Revision {
        self.last_revision
    }

    /// Seals the segment: returns its name and complete bytes.
    pub fn finish(self) -> io::Result<(crate::layout::SegmentName, Vec<u8>)> {
        let body = self.encoder.finish()?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.push(CODEC_ZSTD);
        out.push(0);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.prev_revision.to_le_bytes());
        out.extend_from_slice(&(self.prev_revision + 1).to_le_bytes());
        out.extend_from_slice(&self.last_revision.to_le_bytes());
        out.extend_from_slice(&self.first_time_ms.unwrap_or(0).to_le_bytes());
        out.extend_from_slice(&self.last_time_ms.to_le_bytes());
        out.extend_from_slice(&self.record_count.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.prev_digest);
        let (snap_rev, snap_digest) = self.snapshot.unwrap_or((0, [0; 32]));
        out.extend_from_slice(&snap_rev.to_le_bytes());
        out.extend_from_slice(&snap_digest);
        debug_assert_eq!(out.len(), HEADER_LEN);
        out.extend_from_slice(&body);
        let hash = blake3::hash(&out);
        out.extend_from_slice(hash.as_bytes());
        let name = crate::layout::SegmentName {
            first: self.prev_revision + 1,
            last: self.last_revision,
            end_ms: self.last_time_ms,
        };
        Ok((name, out))
    }
}

/// Checks a whole segment's header and checksum; returns the header and the
/// compressed body.
///
/// # Errors
/// A [`SegmentError`] naming `object`: bad magic, checksum mismatch, unknown
/// version or codec, non-zero flags or reserved bytes, an inconsistent
/// revision range, or a record count beyond [`MAX_RECORDS_PER_SEGMENT`].
pub fn open<'a>(object: &str, bytes: &'a [u8]) -> Result<(SegmentHeader, &'a [u8]), SegmentError> {
    let malformed = |reason: String| SegmentError::Malformed {
        object: object.to_owned(),
        reason,
    };
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(SegmentError::BadMagic {
            object: object.to_owned(),
        });
    }
    if bytes.len() < HEADER_LEN_V1 + TRAILER_LEN {
        return Err(malformed("shorter than header and trailer".into()));
    }
    let (content, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    if blake3::hash(content).as_bytes() != trailer {
        return Err(SegmentError::ChecksumMismatch {
            object: object.to_owned(),
        });
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    let header_len = match version {
        1 => HEADER_LEN_V1,
        FORMAT_VERSION => HEADER_LEN,
        _ => {
            return Err(SegmentError::UnsupportedVersion {
                object: object.to_owned(),
                version,
            })
        }
    };
    if content.len() < header_len {
        return Err(malformed("shorter than header and trailer".into()));
    }
    if bytes[10] != CODEC_ZSTD {
        return Err(malformed(format!(
            "unknown codec {} (header byte 10; this build reads {CODEC_ZSTD} = zstd)",
            bytes[10]
        )));
    }
    if bytes[11] != 0 {
        return Err(malformed(format!(
            "unknown flags {:#04x} (header byte 11 must be 0)",
            bytes[11]
        )));
    }
    if bytes[12..16] != [0; 4] {
        return Err(malformed(
            "reserved header bytes 12..16 are not zero".into(),
        ));
    }
    let le64 = |at: usize| i64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let mut header = SegmentHeader {
        generation: le64(16) as u64,
        prev_revision: le64(24),
        last_revision: le64(40),
        first_time_ms: le64(48),
        last_time_ms: le64(56),
        record_count: le64(64) as u64,
        version,
        prev_digest: [0; 32],
        snapshot: None,
    };
    if version == FORMAT_VERSION {
        header.prev_digest = bytes[80..112].try_into().expect("32 bytes");
        let snap_rev = le64(112);
        let snap_digest: [u8; 32] = bytes[120..152].try_into().expect("32 bytes");
        header.snapshot = match (snap_rev, snap_digest == [0; 32]) {
            (0, true) => None,
            (r, false) if r > 0 => Some((r, snap_digest)),
            _ => {
                return Err(malformed(format!(
                    "snapshot commitment with revision {snap_rev} and {} digest",
                    if snap_digest == [0; 32] {
                        "a zero"
                    } else {
                        "a"
                    }
                )))
            }
        };
    }
    if header.prev_revision < 0
        || header.last_revision == Revision::MAX
        || le64(32) != header.prev_revision + 1
        || header.last_revision < header.prev_revision
    {
        return Err(malformed(format!(
            "inconsistent revision range in header (prev_revision {}, first_revision {}, last_revision {})",
            header.prev_revision,
            le64(32),
            header.last_revision
        )));
    }
    if header.record_count > MAX_RECORDS_PER_SEGMENT {
        return Err(malformed(format!(
            "header claims {} records, more than the format allows ({MAX_RECORDS_PER_SEGMENT})",
            header.record_count
        )));
    }
    // Every revision is one record.
    if (header.last_revision - header.prev_revision) as u64 > header.record_count {
        return Err(malformed(format!(
            "header claims {} records for {} revisions",
            header.record_count,
            header.last_revision - header.prev_revision
        )));
    }
    let body_len = le64(72) as u64;
    if body_len != (content.len() - header_len) as u64 {
        return Err(malformed("body length does not match object size".into()));
    }
    Ok((header, &content[header_len..]))
}

/// A checked segment's digest: its trailing checksum, the blake3 of
/// everything before it (header included). Only meaningful for bytes
/// [`open`] accepted.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    bytes[bytes.len().saturating_sub(TRAILER_LEN)..]
        .try_into()
        .unwrap_or([0; 32])
}

/// A segment body being decompressed: refuses to produce more than
/// [`MAX_BODY_BYTES`], and tells how much it may still produce.
struct BodyReader<'a> {
    decoder: zstd::Decoder<'static, io::BufReader<&'a [u8]>>,
    produced: u64,
}

impl BodyReader<'_> {
    /// Bytes the body may still produce.
    fn room(&self) -> u64 {
        MAX_BODY_BYTES - self.produced
    }
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = self.room();
        if room == 0 {
            let mut probe = [0u8; 1];
            return match self.decoder.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("decompressed body is larger than {MAX_BODY_BYTES} bytes"),
                )),
            };
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.decoder.read(&mut buf[..want])?;
        self.produced += n as u64;
        Ok(n)
    }
}

/// Why a record could not be decoded (the object name is added by the
/// caller).
type Reason = String;

fn io_reason(e: &io::Error) -> Reason {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        "truncated record (the body ends inside it)".to_owned()
    } else {
        e.to_string()
    }
}

/// Streams the records of a checked segment body.
///
/// Memory is bounded by one record: at most [`MAX_REVISION_DECODED_BYTES`]
/// (plus the zstd window, at most 2^[`MAX_ZSTD_WINDOW_LOG`] bytes).
pub struct RecordReader<'a> {
    object: String,
    body: BodyReader<'a>,
    remaining: u64,
    expected_next: Revision,
    last_revision: Revision,
    decoded_bytes: u64,
}

impl<'a> RecordReader<'a> {
    /// Reads the records of a segment opened with [`open`].
    ///
    /// # Errors
    /// [`SegmentError::Malformed`] if the body is not a zstd stream or the
    /// header is inconsistent.
    pub fn new(object: &str, header: &SegmentHeader, body: &'a [u8]) -> Result<Self, SegmentError> {
        let malformed = |reason: String| SegmentError::Malformed {
            object: object.to_owned(),
            reason,
        };
        if header.record_count > MAX_RECORDS_PER_SEGMENT {
            return Err(malformed(format!(
                "header claims {} records, more than the format allows ({MAX_RECORDS_PER_SEGMENT})",
                header.record_count
            )));
        }
        let expected_next = header
            .prev_revision
            .checked_add(1)
            .ok_or_else(|| malformed("prev_revision out of range".into()))?;
        let mut decoder = zstd::Decoder::new(body).map_err(|e| malformed(e.to_string()))?;
        decoder
            .window_log_max(MAX_ZSTD_WINDOW_LOG)
            .map_err(|e| malformed(e.to_string()))?;
        Ok(Self {
            object: object.to_owned(),
            body: BodyReader {
                decoder,
                produced: 0,
            },
            remaining: header.record_count,
            expected_next,
            last_revision: header.last_revision,
            decoded_bytes: 0,
        })
    }

    fn malformed(&self, reason: impl Into<String>) -> SegmentError {
        SegmentError::Malformed {
            object: self.object.clone(),
            reason: reason.into(),
        }
    }

    /// The next record, or `None` after the last one.
    ///
    /// # Errors
    /// [`SegmentError::Malformed`] on truncated or inconsistent records,
    /// including a revision that does not follow its predecessor, and on
    /// any count or length beyond the format's limits.
    pub fn next_record(&mut self) -> Result<Option<Record>, SegmentError> {
        if self.remaining == 0 {
            let mut probe = [0u8; 1];
            return match self.body.read(&mut probe) {
                Ok(0) if self.expected_next.checked_sub(1) == Some(self.last_revision) => Ok(None),
                Ok(0) => Err(self.malformed(format!(
                    "the body ends at revision {} but the header claims {}",
                    self.expected_next - 1,
                    self.last_revision
                ))),
                Ok(_) => Err(self.malformed("trailing bytes after the last record")),
                Err(e) => Err(self.malformed(io_reason(&e))),
            };
        }
        self.remaining -= 1;
        let record = self.decode_record().map_err(|r| self.malformed(r))?;
        Ok(Some(record))
    }

    /// Decoded-size budget left for the next record.
    fn budget(&self) -> u64 {
        MAX_REVISION_DECODED_BYTES.min(MAX_SEGMENT_DECODED_BYTES - self.decoded_bytes)
    }

    fn decode_record(&mut self) -> Result<Record, Reason> {
        let budget = self.budget();
        let mut size = 0;
        charge(&mut size, RECORD_DECODED_OVERHEAD_BYTES, budget, "a record")?;
        let record = match read_u8(&mut self.body)? {
            TAG_REVISION => Record::Revision(self.decode_revision(&mut size, budget)?),
            TAG_LEASE => Record::Lease(LeaseRecord {
                id: read_i64(&mut self.body)?,
                ttl_secs: read_i64(&mut self.body)?,
                revision: read_i64(&mut self.body)?,
            }),
            TAG_PROGRESS => Record::Progress {
                revision: read_i64(&mut self.body)?,
                observed_ms: read_i64(&mut self.body)?,
            },
            tag => return Err(format!("unknown record tag {tag}")),
        };
        self.decoded_bytes += size;
        Ok(record)
    }

    fn decode_revision(&mut self, size: &mut u64, budget: u64) -> Result<RevisionRecord, Reason> {
        let revision = read_i64(&mut self.body)?;
        if revision > self.last_revision {
            return Err(format!(
                "revision {revision} is beyond the header's last revision {}",
                self.last_revision
            ));
        }
        if revision != self.expected_next {
            return Err(format!(
                "revision {revision} found where {} was expected",
                self.expected_next
            ));
        }
        let observed_ms = read_i64(&mut self.body)?;
        let flags = read_u8(&mut self.body)?;
        if flags & !FLAG_CATCHING_UP != 0 {
            return Err(format!("revision {revision}: unknown flags {flags:#04x}"));
        }
        let count = u64::from(read_u32(&mut self.body)?);
        if count == 0 {
            return Err(format!("revision {revision} has no events"));
        }
        if count > MAX_EVENTS_PER_REVISION {
            return Err(format!(
                "revision {revision} claims {count} events, more than the format allows ({MAX_EVENTS_PER_REVISION})"
            ));
        }
        let mut events = Vec::with_capacity(count.min(EVENTS_CHUNK) as usize);
        for i in 0..count {
            let what = |field: &str| format!("revision {revision} event {i}: {field}");
            charge(size, EVENT_DECODED_OVERHEAD_BYTES, budget, &what("event"))?;
            let kind = match read_u8(&mut self.body)? {
                0 => EventKind::Put,
                1 => EventKind::Delete,
                k => return Err(what(&format!("unknown event kind {k}"))),
            };
            let key = self.read_field(MAX_KEY_BYTES, size, budget, &what("key"))?;
            let event = if kind == EventKind::Put {
                let create_revision = read_i64(&mut self.body)?;
                let mod_revision = read_i64(&mut self.body)?;
                let version = read_i64(&mut self.body)?;
                let lease = read_i64(&mut self.body)?;
                let value = self.read_field(MAX_VALUE_BYTES, size, budget, &what("value"))?;
                Event {
                    kind,
                    key,
                    value,
                    create_revision,
                    mod_revision,
                    version,
                    lease,
                }
            } else {
                Event::deleted(key, revision)
            };
            events.push(event);
        }
        self.expected_next = revision
            .checked_add(1)
            .ok_or_else(|| "revision out of range".to_owned())?;
        Ok(RevisionRecord {
            revision,
            observed_ms,
            catching_up: flags & FLAG_CATCHING_UP != 0,
            events,
        })
    }

    /// Reads a length-prefixed field, checking its length against `max`,
    /// the record's decoded-size budget and what the body can still hold
    /// before reading; the buffer grows only as data arrives.
    fn read_field(
        &mut self,
        max: u64,
        size: &mut u64,
        budget: u64,
        what: &str,
    ) -> Result<Vec<u8>, Reason> {
        let len = u64::from(read_u32(&mut self.body)?);
        if len > max {
            return Err(format!(
                "{what} length {len} exceeds the format's limit of {max} bytes"
            ));
        }
        if len > self.body.room() {
            return Err(format!(
                "{what} length {len} exceeds what the body can still hold ({} bytes)",
                self.body.room()
            ));
        }
        charge(size, len, budget, what)?;
        let mut v = Vec::with_capacity(len.min(FIELD_CHUNK) as usize);
        (&mut self.body)
            .take(len)
            .read_to_end(&mut v)
            .map_err(|e| io_reason(&e))?;
        if v.len() as u64 != len {
            return Err(format!(
                "{what} length {len} exceeds the rest of the body ({} bytes)",
                v.len()
            ));
        }
        Ok(v)
    }
}

/// Charges `size` more decoded bytes to a record whose budget is `budget`.
fn charge(total: &mut u64, size: u64, budget: u64, what: &str) -> Result<(), Reason> {
    *total += size;
    if *total > budget {
        let limit = if budget == MAX_REVISION_DECODED_BYTES {
            format!("a revision's limit of {MAX_REVISION_DECODED_BYTES} decoded bytes")
        } else {
            format!("the segment's limit of {MAX_SEGMENT_DECODED_BYTES} decoded bytes")
        };
        return Err(format!("{what} exceeds {limit}"));
    }
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode_revision(r: &RevisionRecord, out: &mut Vec<u8>) {
    out.push(TAG_REVISION);
    out.extend_from_slice(&r.revision.to_le_bytes());
    out.extend_from_slice(&r.observed_ms.to_le_bytes());
    out.push(if r.catching_up { FLAG_CATCHING_UP } else { 0 });
    out.extend_from_slice(&(r.events.len() as u32).to_le_bytes());
    for e in &r.events {
        out.push(match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        put_bytes(out, &e.key);
        if e.kind == EventKind::Put {
            for n in [e.create_revision, e.mod_revision, e.version, e.lease] {
                out.extend_from_slice(&n.to_le_bytes());
            }
            put_bytes(out, &e.value);
        }
    }
}

fn encode_record(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::Revision(r) => encode_revision(r, out),
        Record::Lease(l) => {
            out.push(TAG_LEASE);
            for n in [l.id, l.ttl_secs, l.revision] {
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
        Record::Progress {
            revision,
            observed_ms,
        } => {
            out.push(TAG_PROGRESS);
            out.extend_from_slice(&revision.to_le_bytes());
            out.extend_from_slice(&observed_ms.to_le_bytes());
        }
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> Result<[u8; N], Reason> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).map_err(|e| io_reason(&e))?;
    Ok(b)
}

fn read_u8(r: &mut impl Read) -> Result<u8, Reason> {
    Ok(read_array::<1>(r)?[0])
}

fn read_u32(r: &mut impl Read) -> Result<u32, Reason> {
    Ok(u32::from_le_bytes(read_array(r)?))
}

fn read_i64(r: &mut impl Read) -> Result<i64, Reason> {
    Ok(i64::from_le_bytes(read_array(r)?))
}

/// Decodes every record of a segment (checks included). Holds the whole
/// segment in memory (at most about [`MAX_SEGMENT_DECODED_BYTES`]); use
/// [`open`] and [`RecordReader`] to stream.
///
/// # Errors
/// A [`SegmentError`] naming `object`.
pub fn decode_all(
    object: &str,
    bytes: &[u8],
) -> Result<(SegmentHeader, Vec<Record>), SegmentError> {
    let (header, body) = open(object, bytes)?;
    let mut reader = RecordReader::new(object, &header, body)?;
    let mut records = Vec::new();
    while let Some(r) = reader.next_record()? {
        records.push(r);
    }
    Ok((header, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_records() -> Vec<Record> {
        vec![
            Record::Lease(LeaseRecord {
                id: 0x1234,
                ttl_secs: 30,
                revision: 11,
            }),
            Record::Revision(RevisionRecord {
                revision: 11,
                observed_ms: 1_700_000_000_000,
                catching_up: true,
                events: vec![
                    Event {
                        kind: EventKind::Put,
                        key: b"/a\x00\xff".to_vec(),
                        value: b"v1".to_vec(),
                        create_revision: 11,
                        mod_revision: 11,
                        version: 1,
                        lease: 0x1234,
                    },
                    Event {
                        kind: EventKind::Delete,
                        key: b"/b".to_vec(),
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: 11,
                        version: 0,
                        lease: 0,
                    },
                ],
            }),
            Record::Revision(RevisionRecord {
                revision: 12,
                observed_ms: 1_700_000_000_010,
                catching_up: false,
                events: vec![Event {
                    kind: EventKind::Put,
                    key: b"/a\x00\xff".to_vec(),
                    value: vec![7; 100_000],
                    create_revision: 11,
                    mod_revision: 12,
                    version: 2,
                    lease: 0,
                }],
            }),
            Record::Progress {
                revision: 12,
                observed_ms: 1_700_000_005_000,
            },
        ]
    }

    fn build(records: &[Record]) -> Vec<u8> {
        let mut b = SegmentBuilder::new(3, 10, [0; 32]).unwrap();
        for r in records {
            b.push(r).unwrap();
        }
        b.finish().unwrap().1
    }

    #[test]
    fn round_trip() {
        let records = sample_records();
        let mut b = SegmentBuilder::new(3, 10, [0; 32]).unwrap();
        for r in &records {
            b.push(r).unwrap();
        }
        let (name, bytes) = b.finish().unwrap();
        assert_eq!(
            (name.first, name.last, name.end_ms),
            (11, 12, 1_700_000_005_000)
        );
        let (header, decoded) = decode_all("x", &bytes).unwrap();
        assert_eq!(decoded, records);
        assert_eq!(header.generation, 3);
        assert_eq!(header.prev_revision, 10);
        assert_eq!(header.last_revision, 12);
        assert_eq!(header.first_time_ms, 1_700_000_000_000);
        assert_eq!(header.record_count, 4);
    }

    /// Every level `with_level` accepts writes frames that readers accept,
    /// up to the highest, whose window is exactly the readers' limit; a
    /// level beyond it is refused before anything is written.
    #[test]
    fn chosen_levels_round_trip_up_to_the_readers_window() {
        // More than one zstd block (128 KiB), so the encoder does not know
        // the size in advance and uses the level's full window.
        let text: Vec<u8> = (0..300_000u32)
            .map(|i| b"etcd-pitr segment "[(i % 18) as usize] ^ (i / 7919) as u8)
            .collect();
        let mut records = sample_records();
        let Record::Revision(r) = &mut records[2] else {
            unreachable!()
        };
        r.events[0].value = text;
        for level in [-5, ZSTD_LEVEL, 9, MAX_ZSTD_LEVEL] {
            let mut b = SegmentBuilder::with_level(3, 10, [0; 32], level).unwrap();
            for r in &records {
                b.push(r).unwrap();
            }
            let (_, bytes) = b.finish().unwrap();
            let (_, decoded) = decode_all("level", &bytes).unwrap();
            assert_eq!(decoded, records, "level {level}");
            if level == MAX_ZSTD_LEVEL {
                // Frame header: magic, descriptor (single-segment flag 0x20
                // clear), window descriptor (exponent in the high 5 bits).
                let body = &bytes[HEADER_LEN..];
                assert_eq!(body[4] & 0x20, 0, "a windowed frame");
                assert_eq!(10 + u32::from(body[5] >> 3), MAX_ZSTD_WINDOW_LOG);
            }
        }
        let err = SegmentBuilder::with_level(3, 10, [0; 32], MAX_ZSTD_LEVEL + 1)
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("zstd level 20"), "{err}");
    }

    #[test]
    fn progress_only_segment_is_empty_range() {
        let mut b = SegmentBuilder::new(1, 99, [0; 32]).unwrap();
        b.push(&Record::Progress {
            revision: 99,
            observed_ms: 5,
        })
        .unwrap();
        let (name, bytes) = b.finish().unwrap();
        assert!(name.is_empty());
        assert_eq!(name.end_ms, 5);
        let (header, records) = decode_all("x", &bytes).unwrap();
        assert_eq!(header.last_revision, 99);
        assert_eq!(records.len(), 1);
    }

    #[test]
    fn holes_are_refused_when_writing() {
        let mut b = SegmentBuilder::new(1, 10, [0; 32]).unwrap();
        let Record::Revision(mut r) = sample_records()[2].clone() else {
            unreachable!()
        };
        r.revision = 13;
        assert!(b.push(&Record::Revision(r)).is_err());
    }

    #[test]
    fn every_flipped_byte_is_detected_and_names_the_object() {
        let bytes = build(&sample_records());
        for i in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            let err = decode_all("gen-1/segments/x.seg", &bad).unwrap_err();
            assert!(err.to_string().starts_with("gen-1/segments/x.seg"), "{err}");
            if i >= 8 {
                assert!(
                    matches!(err, SegmentError::ChecksumMismatch { .. }),
                    "byte {i}: {err}"
                );
            }
        }
        assert!(matches!(
            decode_all("t", &bytes[..bytes.len() - 1]),
            Err(SegmentError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn unknown_version_is_a_named_error() {
        let mut bytes = build(&sample_records());
        bytes[8] = 9;
        let n = bytes.len() - TRAILER_LEN;
        let hash = blake3::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(hash.as_bytes());
        let err = decode_all("obj", &bytes).unwrap_err();
        assert!(matches!(
            err,
            SegmentError::UnsupportedVersion { version: 9, .. }
        ));
        assert!(err
            .to_string()
            .contains("unsupported segment format version 9"));
    }

    #[test]
    fn the_hash_chain_fields_round_trip_and_version_1_still_reads() {
        let mut b = SegmentBuilder::new(3, 10, [7; 32]).unwrap();
        for r in sample_records() {
            b.push(&r).unwrap();
        }
        b.commit_snapshot(9, [8; 32]);
        let (_, bytes) = b.finish().unwrap();
        let (header, records) = decode_all("v2", &bytes).unwrap();
        assert_eq!(header.version, 2);
        assert_eq!(header.prev_digest, [7; 32]);
        assert_eq!(header.snapshot, Some((9, [8; 32])));
        assert_eq!(
            digest(&bytes),
            *blake3::hash(&bytes[..bytes.len() - TRAILER_LEN]).as_bytes()
        );

        // The same segment as format 1 wrote it: no chain fields.
        let mut v1 = bytes[..HEADER_LEN_V1].to_vec();
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&bytes[HEADER_LEN..bytes.len() - TRAILER_LEN]);
        let hash = blake3::hash(&v1);
        v1.extend_from_slice(hash.as_bytes());
        let (old, old_records) = decode_all("v1", &v1).unwrap();
        assert_eq!(
            (old.version, old.prev_digest, old.snapshot),
            (1, [0; 32], None)
        );
        assert_eq!(old_records, records);

        // A commitment must name both a revision and a digest.
        let mut bad = bytes.clone();
        bad[120..152].fill(0);
        let n = bad.len() - TRAILER_LEN;
        let hash = blake3::hash(&bad[..n]);
        bad[n..].copy_from_slice(hash.as_bytes());
        let err = decode_all("bad", &bad).unwrap_err();
        assert!(err.to_string().contains("snapshot commitment"), "{err}");
    }

    /// Decoding never panics, whatever the bytes: mutated, truncated and
    /// re-checksummed variants of a valid segment all end in `Ok` or a
    /// named error.
    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        let valid = build(&sample_records());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..=(next() % 8) {
                let i = (next() as usize) % bytes.len();
                bytes[i] = next() as u8;
            }
            if next() % 4 == 0 {
                let cut = (next() as usize) % bytes.len();
                bytes.truncate(cut);
            }
            // Re-seal half of them so the body parser, not just the
            // checksum, sees the damage.
            if next() % 2 == 0 && bytes.len() >= HEADER_LEN + TRAILER_LEN {
                let n = bytes.len() - TRAILER_LEN;
                let hash = blake3::hash(&bytes[..n]);
                bytes[n..].copy_from_slice(hash.as_bytes());
            }
            let _ = decode_all("fuzz", &bytes);
        }
    }

    /// A zstd frame of `len` copies of `byte`, made of RLE blocks: four
    /// bytes per 128 KiB of output, the cheapest possible "zstd bomb".
    fn rle_frame(byte: u8, len: u64) -> Vec<u8> {
        // Magic, frame header descriptor (no content size, not single
        // segment), window descriptor 2^17.
        let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x38];
        let mut left = len;
        while left > 0 {
            let n = left.min(128 << 10);
            left -= n;
            let header = u32::from(left == 0) | (1 << 1) | ((n as u32) << 3);
            f.extend_from_slice(&header.to_le_bytes()[..3]);
            f.push(byte);
        }
        f
    }

    /// A complete, correctly checksummed segment around `body` (already
    /// compressed), with the given header fields.
    fn seal(prev: i64, last: i64, record_count: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.push(CODEC_ZSTD);
        out.extend_from_slice(&[0; 5]);
        for n in [3, prev, prev + 1, last, 0, 0, record_count as i64] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        // No hash chain: zero digest, no snapshot commitment.
        out.extend_from_slice(&[0; HEADER_LEN - HEADER_LEN_V1]);
        out.extend_from_slice(body);
        let hash = blake3::hash(&out);
        out.extend_from_slice(hash.as_bytes());
        out
    }

    /// Re-computes the trailer after a test edited the bytes.
    fn reseal(bytes: &mut [u8]) {
        let n = bytes.len() - TRAILER_LEN;
        let hash = blake3::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(hash.as_bytes());
    }

    fn zstd(raw: &[u8]) -> Vec<u8> {
        zstd::encode_all(raw, 1).unwrap()
    }

    /// Start of a revision record holding `count` events.
    fn revision_head(revision: i64, count: u32) -> Vec<u8> {
        let mut r = vec![TAG_REVISION];
        r.extend_from_slice(&revision.to_le_bytes());
        r.extend_from_slice(&0i64.to_le_bytes());
        r.push(0);
        r.extend_from_slice(&count.to_le_bytes());
        r
    }

    /// Peak resident memory of this test process.
    fn peak_rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    fn assert_malformed(err: &SegmentError, object: &str, needle: &str) {
        assert!(
            matches!(err, SegmentError::Malformed { .. }),
            "expected Malformed, got {err}"
        );
        let text = err.to_string();
        assert!(text.starts_with(object), "{text}");
        assert!(text.contains(needle), "{text:?} should mention {needle:?}");
    }

    /// Issue 6.5 (1): a 23 KB segment claiming 50 million records (and
    /// decompressing to 850 MB of progress records) used to be decoded into
    /// a 2.9 GB vector. The header's count is now checked against the limit.
    #[test]
    fn a_huge_record_count_is_refused_before_decoding() {
        let body = rle_frame(TAG_PROGRESS, 50_000_000 * 17);
        assert!(body.len() < 30_000);
        let bytes = seal(10, 10, 50_000_000, &body);
        let err = decode_all("gen-3/segments/bomb.seg", &bytes).unwrap_err();
        assert_malformed(&err, "gen-3/segments/bomb.seg", "50000000 records");
        // A forged header handed straight to the reader is refused as well.
        let header = SegmentHeader {
            generation: 3,
            prev_revision: 10,
            last_revision: 10,
            first_time_ms: 0,
            last_time_ms: 0,
            record_count: 50_000_000,
            version: 2,
            prev_digest: [0; 32],
            snapshot: None,
        };
        let err = RecordReader::new("bomb", &header, &body).err().unwrap();
        assert_malformed(&err, "bomb", "50000000 records");
    }

    /// Records beyond the header's count stop the reader at once, however
    /// much more the body would decompress to.
    #[test]
    fn a_decompression_bomb_after_the_last_record_is_refused() {
        let bytes = seal(10, 10, 1000, &rle_frame(TAG_PROGRESS, 1 << 30));
        let err = decode_all("bomb.seg", &bytes).unwrap_err();
        assert_malformed(&err, "bomb.seg", "trailing bytes");
        assert!(peak_rss_bytes() < 1 << 30, "{}", peak_rss_bytes());
    }

    /// Issue 6.5 (2): a body is never decompressed beyond `MAX_BODY_BYTES`.
    #[test]
    fn bodies_are_decompressed_with_a_hard_cap() {
        let frame = rle_frame(0, MAX_BODY_BYTES + (1 << 20));
        let mut body = BodyReader {
            decoder: zstd::Decoder::new(frame.as_slice()).unwrap(),
            produced: 0,
        };
        let err = io::copy(&mut body, &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        assert_eq!(body.produced, MAX_BODY_BYTES);
    }

    /// A revision claiming more events than allowed is refused before any
    /// event is read.
    #[test]
    fn too_many_events_are_refused() {
        let raw = revision_head(11, 0x0101_0101);
        let bytes = seal(10, 11, 1, &zstd(&raw));
        let err = decode_all("many.seg", &bytes).unwrap_err();
        assert_malformed(&err, "many.seg", "16843009 events");
    }

    /// Lengths beyond the limits, or beyond what the body still holds, are
    /// refused without allocating them.
    #[test]
    fn lengths_are_checked_before_allocating() {
        // A key longer than the key limit.
        let mut raw = revision_head(11, 1);
        raw.push(1);
        raw.extend_from_slice(&(MAX_KEY_BYTES as u32 + 1).to_le_bytes());
        let err = decode_all("key.seg", &seal(10, 11, 1, &zstd(&raw))).unwrap_err();
        assert_malformed(
            &err,
            "key.seg",
            "key length 67108865 exceeds the format's limit",
        );

        // A value of 60 MiB of which only 3 bytes exist.
        let mut raw = revision_head(11, 1);
        raw.push(0);
        raw.extend_from_slice(&1u32.to_le_bytes());
        raw.push(b'k');
        raw.extend_from_slice(&[0; 32]);
        raw.extend_from_slice(&(60u32 << 20).to_le_bytes());
        raw.extend_from_slice(b"abc");
        let err = decode_all("value.seg", &seal(10, 11, 1, &zstd(&raw))).unwrap_err();
        assert_malformed(&err, "value.seg", "exceeds the rest of the body (3 bytes)");
        assert!(peak_rss_bytes() < 1 << 30);

        // Keys whose total exceeds a revision's decoded-size limit: the third
        // 64 MiB key is refused before it is read. Each key is its own RLE
        // frame, so the object stays small.
        let mut body = zstd(&revision_head(11, 3));
        for _ in 0..3 {
            let mut event = vec![1];
            event.extend_from_slice(&(MAX_KEY_BYTES as u32).to_le_bytes());
            body.extend_from_slice(&zstd(&event));
            body.extend_from_slice(&rle_frame(b'k', MAX_KEY_BYTES));
        }
        let err = decode_all("big.seg", &seal(10, 11, 1, &body)).unwrap_err();
        assert_malformed(
            &err,
            "big.seg",
            "revision 11 event 2: key exceeds a revision's limit",
        );
    }

    /// Issue 6.5 (3): flags and reserved header bytes must be zero.
    #[test]
    fn flags_and_reserved_bytes_must_be_zero() {
        let good = build(&sample_records());
        for (at, needle) in [(11, "flags"), (12, "reserved"), (15, "reserved")] {
            let mut bytes = good.clone();
            bytes[at] = 1;
            reseal(&mut bytes);
            let err = decode_all("gen-1/segments/f.seg", &bytes).unwrap_err();
            assert_malformed(&err, "gen-1/segments/f.seg", needle);
        }
    }

    /// Issue 6.5 (7): an unknown codec is a named error.
    #[test]
    fn unknown_codec_is_a_named_error() {
        let mut bytes = build(&sample_records());
        bytes[10] = 2;
        reseal(&mut bytes);
        let err = decode_all("c.seg", &bytes).unwrap_err();
        assert_malformed(&err, "c.seg", "unknown codec 2");
    }

    /// Header revision ranges and counts must be consistent.
    #[test]
    fn inconsistent_headers_are_refused() {
        let body = zstd(&[]);
        for (prev, last, count, needle) in [
            (-5i64, 1i64, 10, "revision range"),
            (10, i64::MAX, 10, "revision range"),
            (10, 20, 3, "3 records for 10 revisions"),
        ] {
            let mut bytes = seal(0, 0, count, &body);
            bytes[24..32].copy_from_slice(&prev.to_le_bytes());
            bytes[32..40].copy_from_slice(&prev.wrapping_add(1).to_le_bytes());
            bytes[40..48].copy_from_slice(&last.to_le_bytes());
            reseal(&mut bytes);
            let err = decode_all("h.seg", &bytes).unwrap_err();
            assert_malformed(&err, "h.seg", needle);
        }
    }

    /// A revision beyond the header's last revision is refused when read.
    #[test]
    fn revisions_beyond_the_header_are_refused() {
        let mut raw = Vec::new();
        for rev in [11, 12] {
            let r = RevisionRecord {
                revision: rev,
                observed_ms: 0,
                catching_up: false,
                events: vec![Event {
                    kind: EventKind::Delete,
                    key: b"k".to_vec(),
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: rev,
                    version: 0,
                    lease: 0,
                }],
            };
            encode_revision(&r, &mut raw);
        }
        let err = decode_all("r.seg", &seal(10, 11, 2, &zstd(&raw))).unwrap_err();
        assert_malformed(
            &err,
            "r.seg",
            "revision 12 is beyond the header's last revision 11",
        );
        let mut flagged = raw.clone();
        flagged[17] = 0x80;
        let err = decode_all("r.seg", &seal(10, 12, 2, &zstd(&flagged))).unwrap_err();
        assert_malformed(&err, "r.seg", "unknown flags 0x80");
    }

    /// The writer refuses what the reader would refuse, so everything
    /// written can be read back.
    #[test]
    fn the_writer_enforces_the_limits() {
        let mut b = SegmentBuilder::new(1, 10, [0; 32]).unwrap();
        let big = RevisionRecord {
            revision: 11,
            observed_ms: 0,
            catching_up: false,
            events: vec![Event {
                kind: EventKind::Put,
                key: b"k".to_vec(),
                value: vec![0; MAX_VALUE_BYTES as usize + 1],
                create_revision: 11,
                mod_revision: 11,
                version: 1,
                lease: 0,
            }],
        };
        let err = b.push_revision(&big).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(b.last_revision(), 10);
        assert!(!b.is_full());
        // The refused revision left nothing behind.
        let Record::Revision(mut ok) = sample_records()[1].clone() else {
            unreachable!()
        };
        ok.revision = 11;
        b.push_revision(&ok).unwrap();
        let (_, bytes) = b.finish().unwrap();
        assert_eq!(decode_all("w", &bytes).unwrap().1.len(), 1);
    }

    /// The stored sample keeps the byte layout in `docs/archive-format.md`
    /// and the code in step: a format change must add a new version.
    #[test]
    fn stored_sample_decodes() {
        let sample = include_bytes!("../testdata/sample-v1.seg");
        let (header, records) = decode_all("sample-v1.seg", sample).unwrap();
        assert_eq!(records, sample_records());
        assert_eq!(header.prev_revision, 10);
        assert_eq!(&sample[..8], MAGIC);
        assert_eq!(u16::from_le_bytes([sample[8], sample[9]]), 1);
        let sample = include_bytes!("../testdata/sample-v2.seg");
        let (header, records) = decode_all("sample-v2.seg", sample).unwrap();
        assert_eq!(records, sample_records());
        assert_eq!(
            (header.version, header.prev_digest, header.snapshot),
            (2, [7; 32], Some((9, [8; 32])))
        );
    }
}
