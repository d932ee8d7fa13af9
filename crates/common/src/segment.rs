//! The segment format: a self-describing, checksummed, zstd-compressed run of
//! archived revisions.
//!
//! ```text
//! offset size field
//!      0    8 magic            b"EPITRSEG"
//!      8    2 format version   u16 LE (1)
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
//!     80    … body             zstd frame of records
//!  80+n    32 checksum         blake3 of every byte before it
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

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::Revision;

/// Magic bytes at the start of every segment.
pub const MAGIC: &[u8; 8] = b"EPITRSEG";
/// The only segment format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Codec id of zstd.
pub const CODEC_ZSTD: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 80;
/// Length of the blake3 trailer.
pub const TRAILER_LEN: usize = 32;

const TAG_REVISION: u8 = 1;
const TAG_LEASE: u8 = 2;
const TAG_PROGRESS: u8 = 3;
const FLAG_CATCHING_UP: u8 = 1;
/// zstd level: level 1 keeps the archiver's CPU far below etcd's own.
const ZSTD_LEVEL: i32 = 1;

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
    #[error("{object}: unsupported segment format version {version} (this build reads {FORMAT_VERSION})")]
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
    revisions: u64,
    encoder: zstd::Encoder<'static, Vec<u8>>,
    scratch: Vec<u8>,
}

impl SegmentBuilder {
    /// Starts a segment that follows `prev_revision`.
    pub fn new(generation: u64, prev_revision: Revision) -> io::Result<Self> {
        Ok(Self {
            generation,
            prev_revision,
            last_revision: prev_revision,
            first_time_ms: None,
            last_time_ms: 0,
            record_count: 0,
            raw_bytes: 0,
            revisions: 0,
            encoder: zstd::Encoder::new(Vec::new(), ZSTD_LEVEL)?,
            scratch: Vec::new(),
        })
    }

    /// Appends a record.
    ///
    /// # Errors
    /// `InvalidInput` if a revision does not directly follow the previous one,
    /// or a revision has no events: the chain must have no holes.
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
                self.append_scratch(time)
            }
            Record::Lease(_) => {
                self.scratch.clear();
                encode_record(record, &mut self.scratch);
                self.append_scratch(None)
            }
        }
    }

    /// Appends a revision record.
    ///
    /// # Errors
    /// As for [`SegmentBuilder::push`].
    pub fn push_revision(&mut self, r: &RevisionRecord) -> io::Result<()> {
        if r.revision != self.last_revision + 1 || r.events.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "revision {} ({} events) does not follow {}",
                    r.revision,
                    r.events.len(),
                    self.last_revision
                ),
            ));
        }
        self.last_revision = r.revision;
        self.revisions += 1;
        self.scratch.clear();
        encode_revision(r, &mut self.scratch);
        self.append_scratch(Some(r.observed_ms))
    }

    /// Compresses the encoded record in `scratch`, noting its time.
    fn append_scratch(&mut self, time_ms: Option<i64>) -> io::Result<()> {
        if let Some(t) = time_ms {
            self.first_time_ms.get_or_insert(t);
            self.last_time_ms = self.last_time_ms.max(t);
        }
        self.encoder.write_all(&self.scratch)?;
        self.record_count += 1;
        self.raw_bytes += self.scratch.len() as u64;
        Ok(())
    }

    /// Uncompressed bytes appended so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes
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
/// A [`SegmentError`] naming `object`.
pub fn open<'a>(object: &str, bytes: &'a [u8]) -> Result<(SegmentHeader, &'a [u8]), SegmentError> {
    let malformed = |reason: &str| SegmentError::Malformed {
        object: object.to_owned(),
        reason: reason.to_owned(),
    };
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(SegmentError::BadMagic {
            object: object.to_owned(),
        });
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(malformed("shorter than header and trailer"));
    }
    let (content, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    if blake3::hash(content).as_bytes() != trailer {
        return Err(SegmentError::ChecksumMismatch {
            object: object.to_owned(),
        });
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(SegmentError::UnsupportedVersion {
            object: object.to_owned(),
            version,
        });
    }
    if bytes[10] != CODEC_ZSTD {
        return Err(malformed(&format!("unknown codec {}", bytes[10])));
    }
    let le64 = |at: usize| i64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let header = SegmentHeader {
        generation: le64(16) as u64,
        prev_revision: le64(24),
        last_revision: le64(40),
        first_time_ms: le64(48),
        last_time_ms: le64(56),
        record_count: le64(64) as u64,
    };
    if le64(32) != header.prev_revision + 1 || header.last_revision < header.prev_revision {
        return Err(malformed("inconsistent revision range in header"));
    }
    let body_len = le64(72) as u64;
    if body_len != (content.len() - HEADER_LEN) as u64 {
        return Err(malformed("body length does not match object size"));
    }
    Ok((header, &content[HEADER_LEN..]))
}

/// Streams the records of a checked segment body.
pub struct RecordReader<'a> {
    object: String,
    decoder: zstd::Decoder<'static, io::BufReader<&'a [u8]>>,
    remaining: u64,
    expected_next: Revision,
    last_revision: Revision,
}

impl<'a> RecordReader<'a> {
    /// Reads the records of a segment opened with [`open`].
    ///
    /// # Errors
    /// [`SegmentError::Malformed`] if the body is not a zstd frame.
    pub fn new(object: &str, header: &SegmentHeader, body: &'a [u8]) -> Result<Self, SegmentError> {
        let decoder = zstd::Decoder::new(body).map_err(|e| SegmentError::Malformed {
            object: object.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            object: object.to_owned(),
            decoder,
            remaining: header.record_count,
            expected_next: header.prev_revision + 1,
            last_revision: header.last_revision,
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
    /// including a revision that does not follow its predecessor.
    pub fn next_record(&mut self) -> Result<Option<Record>, SegmentError> {
        if self.remaining == 0 {
            let mut probe = [0u8; 1];
            return match self.decoder.read(&mut probe) {
                Ok(0) if self.expected_next == self.last_revision + 1 => Ok(None),
                Ok(0) => Err(self.malformed("fewer revisions than the header claims")),
                Ok(_) => Err(self.malformed("trailing bytes after the last record")),
                Err(e) => Err(self.malformed(e.to_string())),
            };
        }
        self.remaining -= 1;
        let record = decode_record(&mut self.decoder).map_err(|e| self.malformed(e.to_string()))?;
        if let Record::Revision(r) = &record {
            if r.revision != self.expected_next || r.events.is_empty() {
                let reason = format!(
                    "revision {} found where {} was expected",
                    r.revision, self.expected_next
                );
                return Err(self.malformed(reason));
            }
            self.expected_next += 1;
        }
        Ok(Some(record))
    }
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

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_i64(r: &mut impl Read) -> io::Result<i64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(i64::from_le_bytes(b))
}

/// Largest key or value length accepted when decoding (etcd's own limits are
/// far lower); guards allocations against corrupted lengths.
const MAX_FIELD_LEN: u32 = 1 << 30;

fn read_bytes(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = read_u32(r)?;
    if len > MAX_FIELD_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "field too long"));
    }
    let mut v = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut v)?;
    if v.len() != len as usize {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(v)
}

fn decode_record(r: &mut impl Read) -> io::Result<Record> {
    match read_u8(r)? {
        TAG_REVISION => {
            let revision = read_i64(r)?;
            let observed_ms = read_i64(r)?;
            let flags = read_u8(r)?;
            let count = read_u32(r)?;
            let mut events = Vec::with_capacity(count.min(4096) as usize);
            for _ in 0..count {
                let kind = match read_u8(r)? {
                    0 => EventKind::Put,
                    1 => EventKind::Delete,
                    k => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("unknown event kind {k}"),
                        ))
                    }
                };
                let key = read_bytes(r)?;
                let event = if kind == EventKind::Put {
                    let create_revision = read_i64(r)?;
                    let mod_revision = read_i64(r)?;
                    let version = read_i64(r)?;
                    let lease = read_i64(r)?;
                    let value = read_bytes(r)?;
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
                    Event {
                        kind,
                        key,
                        value: Vec::new(),
                        create_revision: 0,
                        mod_revision: revision,
                        version: 0,
                        lease: 0,
                    }
                };
                events.push(event);
            }
            Ok(Record::Revision(RevisionRecord {
                revision,
                observed_ms,
                catching_up: flags & FLAG_CATCHING_UP != 0,
                events,
            }))
        }
        TAG_LEASE => Ok(Record::Lease(LeaseRecord {
            id: read_i64(r)?,
            ttl_secs: read_i64(r)?,
            revision: read_i64(r)?,
        })),
        TAG_PROGRESS => Ok(Record::Progress {
            revision: read_i64(r)?,
            observed_ms: read_i64(r)?,
        }),
        tag => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown record tag {tag}"),
        )),
    }
}

/// Decodes every record of a segment (checks included).
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
        let mut b = SegmentBuilder::new(3, 10).unwrap();
        for r in records {
            b.push(r).unwrap();
        }
        b.finish().unwrap().1
    }

    #[test]
    fn round_trip() {
        let records = sample_records();
        let mut b = SegmentBuilder::new(3, 10).unwrap();
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

    #[test]
    fn progress_only_segment_is_empty_range() {
        let mut b = SegmentBuilder::new(1, 99).unwrap();
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
        let mut b = SegmentBuilder::new(1, 10).unwrap();
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
    }
}
