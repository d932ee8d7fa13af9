//! The snapshot object format: a fixed header and the zstd-compressed bbolt
//! file exactly as etcd's Maintenance.Snapshot streamed it (including etcd's
//! own sha256 trailer).
//!
//! ```text
//! offset size field
//!      0    8 magic            b"EPITRSNP"
//!      8    2 format version   u16 LE (2; version 1 has no prev_digest and
//!                              its header_check at 80)
//!     10    1 codec            u8 (1 = zstd)
//!     11    5 reserved         zero
//!     16    8 generation       u64 LE
//!     24    8 revision         i64 LE (read from the file itself)
//!     32    8 taken_ms         i64 LE
//!     40    8 db_bytes         u64 LE, length of the uncompressed file
//!     48   32 db_blake3        blake3 of the uncompressed file
//!     80   32 prev_digest      digest of the newest segment of the generation
//!                              archived when the header was written, or the
//!                              generation's anchor (see `crate::hashchain`)
//!    112    8 prev_revision    i64 LE, the last revision of that segment (the
//!                              generation's start for the anchor)
//!    120    8 header_check     first 8 bytes of blake3(bytes 0..120)
//!    128    … body             zstd frame(s) of the file
//! ```
//!
//! A snapshot's digest is the blake3 of its header's bytes 0..120 (as format
//! 2 encodes them, also for a format 1 object): it covers `db_blake3`, so
//! the whole content.

use std::io::{self, Read, Write};
use std::path::Path;

use thiserror::Error;

use crate::bbolt::{self, BoltError, BoltReader};
use crate::chain::IntegrityError;
use crate::layout::GenerationId;
use crate::relay;
use crate::segment::MAX_ZSTD_WINDOW_LOG;
use crate::store::{Archive, StoreError};
use crate::Revision;

/// Magic bytes of a snapshot object.
pub const MAGIC: &[u8; 8] = b"EPITRSNP";
/// The snapshot format version this build writes; it also reads version 1.
pub const FORMAT_VERSION: u16 = 2;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 128;
/// Length of the fixed header of format version 1.
pub const HEADER_LEN_V1: usize = 88;
/// Bytes of the header covered by its check (and by the digest).
const CHECKED_LEN: usize = 120;
const CODEC_ZSTD: u8 = 1;

/// Errors reading a snapshot object.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Not a snapshot object, or a damaged header.
    #[error("{object}: malformed snapshot header: {reason}")]
    Malformed {
        /// Object name.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// A format version this build does not know.
    #[error("{object}: unsupported snapshot format version {version} (this build reads 1 and {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// Object name.
        object: String,
        /// Version found.
        version: u16,
    },
    /// Content does not match its recorded hash or length.
    #[error("{object}: checksum mismatch (object is corrupted)")]
    ChecksumMismatch {
        /// Object name.
        object: String,
    },
    /// I/O error while decompressing.
    #[error("{object}: {source}")]
    Io {
        /// Object name.
        object: String,
        /// Cause.
        source: io::Error,
    },
    /// The etcd snapshot file inside the object is not a valid bbolt file.
    #[error("{object}: invalid etcd snapshot content: {source}")]
    Content {
        /// Object name.
        object: String,
        /// What is wrong with the file.
        source: BoltError,
    },
    /// The header's revision is not the revision of the etcd snapshot file
    /// it holds.
    #[error("{object}: header says revision {header}, its etcd snapshot content is at revision {content} (object is corrupted)")]
    RevisionMismatch {
        /// Object name.
        object: String,
        /// Revision in the header.
        header: Revision,
        /// Revision read from the bbolt content.
        content: Revision,
    },
}

/// The decoded header of a snapshot object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Generation.
    pub generation: u64,
    /// etcd revision of the snapshot.
    pub revision: Revision,
    /// When it was taken (Unix ms).
    pub taken_ms: i64,
    /// Length of the uncompressed file.
    pub db_bytes: u64,
    /// blake3 of the uncompressed file.
    pub db_blake3: [u8; 32],
    /// Digest of its predecessor in the generation's hash chain (zero in
    /// format version 1).
    pub prev_digest: [u8; 32],
    /// The last revision of that predecessor (0 in format version 1).
    pub prev_revision: Revision,
}

impl SnapshotHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[10] = CODEC_ZSTD;
        out[16..24].copy_from_slice(&self.generation.to_le_bytes());
        out[24..32].copy_from_slice(&self.revision.to_le_bytes());
        out[32..40].copy_from_slice(&self.taken_ms.to_le_bytes());
        out[40..48].copy_from_slice(&self.db_bytes.to_le_bytes());
        out[48..80].copy_from_slice(&self.db_blake3);
        out[80..112].copy_from_slice(&self.prev_digest);
        out[112..120].copy_from_slice(&self.prev_revision.to_le_bytes());
        let check = blake3::hash(&out[..CHECKED_LEN]);
        out[CHECKED_LEN..HEADER_LEN].copy_from_slice(&check.as_bytes()[..8]);
        out
    }

    /// The snapshot's digest in the hash chain (see the module docs).
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(&self.encode()[..CHECKED_LEN]).as_bytes()
    }

    /// The header length of the format version in `bytes[8..10]`, which
    /// must hold at least 10 bytes.
    ///
    /// # Errors
    /// [`SnapshotError`] naming `object` for bad magic or an unknown version.
    pub fn len_of(object: &str, bytes: &[u8]) -> Result<usize, SnapshotError> {
        if bytes.len() < 10 || &bytes[..8] != MAGIC {
            return Err(SnapshotError::Malformed {
                object: object.to_owned(),
                reason: "bad magic".to_owned(),
            });
        }
        match u16::from_le_bytes([bytes[8], bytes[9]]) {
            1 => Ok(HEADER_LEN_V1),
            FORMAT_VERSION => Ok(HEADER_LEN),
            version => Err(SnapshotError::UnsupportedVersion {
                object: object.to_owned(),
                version,
            }),
        }
    }

    /// Decodes and checks a header (of either format version) at the start
    /// of `bytes`.
    ///
    /// # Errors
    /// [`SnapshotError`] naming `object`.
    pub fn decode(object: &str, bytes: &[u8]) -> Result<Self, SnapshotError> {
        let malformed = |reason: &str| SnapshotError::Malformed {
            object: object.to_owned(),
            reason: reason.to_owned(),
        };
        let len = Self::len_of(object, bytes)?;
        if bytes.len() < len {
            return Err(malformed("shorter than its header"));
        }
        let checked = len - 8;
        if blake3::hash(&bytes[..checked]).as_bytes()[..8] != bytes[checked..len] {
            return Err(SnapshotError::ChecksumMismatch {
                object: object.to_owned(),
            });
        }
        if bytes[10] != CODEC_ZSTD {
            return Err(malformed(&format!(
                "unknown codec {} (byte 10; this build reads {CODEC_ZSTD} = zstd)",
                bytes[10]
            )));
        }
        if bytes[11..16] != [0; 5] {
            return Err(malformed("reserved bytes 11..16 are not zero"));
        }
        let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Ok(Self {
            generation: le64(16),
            revision: le64(24) as i64,
            taken_ms: le64(32) as i64,
            db_bytes: le64(40),
            db_blake3: bytes[48..80].try_into().expect("32 bytes"),
            prev_digest: if len == HEADER_LEN {
                bytes[80..112].try_into().expect("32 bytes")
            } else {
                [0; 32]
            },
            prev_revision: if len == HEADER_LEN {
                le64(112) as i64
            } else {
                0
            },
        })
    }
}

/// Reads and checks the header of the snapshot object of `generation` at
/// `revision` (a ranged read of the header alone).
///
/// # Errors
/// A store error, or an [`IntegrityError`] for a damaged header or one
/// naming another generation or revision.
pub async fn read_header(
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
) -> Result<SnapshotHeader, HeaderReadError> {
    let key = crate::layout::snapshot_key(generation, revision);
    let bytes = archive.get_prefix(&key, HEADER_LEN as u64).await?;
    let header = SnapshotHeader::decode(&key, &bytes)
        .map_err(|e| IntegrityError::new(&key, e.to_string()))?;
    if header.generation != generation.0 || header.revision != revision {
        return Err(IntegrityError::new(
            &key,
            format!(
                "header says generation {} revision {}",
                header.generation, header.revision
            ),
        )
        .into());
    }
    Ok(header)
}

/// Why [`read_header`] failed.
#[derive(Debug, Error)]
pub enum HeaderReadError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The header is damaged or names another object.
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
}

/// zstd level of snapshot bodies. On a 931 MB etcd 3.5 database of 2 KiB
/// JSON-like values, level 3 made the body 0.4% smaller than level 1 for
/// 1.8 times its CPU time; level 1 keeps compression, which runs while etcd
/// streams the file, from slowing a snapshot down.
pub const ZSTD_LEVEL: i32 = 1;

/// Writes a snapshot object: header, then `db` compressed. Streams.
///
/// # Errors
/// I/O errors.
pub fn write_object(
    header: &SnapshotHeader,
    db: &mut impl Read,
    out: &mut impl Write,
) -> io::Result<()> {
    out.write_all(&header.encode())?;
    let mut encoder = zstd::Encoder::new(out, ZSTD_LEVEL)?;
    io::copy(db, &mut encoder)?;
    encoder.finish()?.flush()
}

/// Writes a snapshot object while the etcd snapshot file streams in, when
/// the header cannot be known yet (it holds the whole file's hash and the
/// revision read from the file): a placeholder is written where the header
/// goes, the body is compressed (and hashed) as the bytes arrive, and
/// [`BodyWritten::write_header`] fills the header in place at the end.
pub struct ObjectWriter<W: Write> {
    encoder: zstd::Encoder<'static, W>,
    start: u64,
    hasher: blake3::Hasher,
    db_bytes: u64,
}

impl<W: Write + io::Seek> ObjectWriter<W> {
    /// Starts an object at the current position of `out` (normally an
    /// empty file): the header's place is reserved.
    ///
    /// # Errors
    /// I/O errors.
    pub fn new(mut out: W) -> io::Result<Self> {
        let start = out.stream_position()?;
        out.write_all(&[0; HEADER_LEN])?;
        Ok(Self {
            start,
            encoder: zstd::Encoder::new(out, ZSTD_LEVEL)?,
            hasher: blake3::Hasher::new(),
            db_bytes: 0,
        })
    }

    /// Appends the next bytes of the etcd snapshot file.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(&mut self, db: &[u8]) -> io::Result<()> {
        self.hasher.update(db);
        self.db_bytes += db.len() as u64;
        self.encoder.write_all(db)
    }

    /// Ends the body: what follows is the header, which needs the file's
    /// length and hash returned here.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish_body(self) -> io::Result<BodyWritten<W>> {
        Ok(BodyWritten {
            out: self.encoder.finish()?,
            start: self.start,
            db_bytes: self.db_bytes,
            db_blake3: *self.hasher.finalize().as_bytes(),
        })
    }
}

/// A snapshot object whose body is written and whose header is not.
pub struct BodyWritten<W> {
    out: W,
    start: u64,
    /// Length of the etcd snapshot file.
    pub db_bytes: u64,
    /// blake3 of the etcd snapshot file.
    pub db_blake3: [u8; 32],
}

impl<W: Write + io::Seek> BodyWritten<W> {
    /// Writes `header` in its place (the start of the object) and flushes,
    /// returning the output, positioned after the header.
    ///
    /// # Errors
    /// I/O errors; [`io::ErrorKind::InvalidInput`] if `header` does not
    /// describe the body written (its length or hash).
    pub fn write_header(mut self, header: &SnapshotHeader) -> io::Result<W> {
        if header.db_bytes != self.db_bytes || header.db_blake3 != self.db_blake3 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the snapshot header does not describe the body written",
            ));
        }
        self.out.seek(io::SeekFrom::Start(self.start))?;
        self.out.write_all(&header.encode())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Whether [`read_object`] checks the body's blake3 as it writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyHash {
    /// Hash the body while writing it and compare with the header.
    Check,
    /// Leave the hash to the caller, which reads the written file back in
    /// full anyway and compares its blake3 with the header's `db_blake3`
    /// before anything relies on the file (a restore's read-back), so that
    /// a long file is hashed once, not twice. Length and framing are still
    /// checked here.
    Deferred,
}

/// Decompresses a snapshot object's body into `out`, checking its length
/// against the header, and its hash per `hash`. Streams, and stops as soon
/// as the body decompresses to more than the header's `db_bytes`: at most
/// `db_bytes` bytes are ever written to `out`.
///
/// # Errors
/// [`SnapshotError::ChecksumMismatch`] if the content does not match (in
/// length, hash, or zstd framing); a header error from
/// [`SnapshotHeader::decode`]; [`SnapshotError::Io`] if reading the header
/// or writing `out` fails.
pub fn read_object(
    object: &str,
    input: &mut impl Read,
    out: &mut (impl Write + Send),
    hash: BodyHash,
) -> Result<SnapshotHeader, SnapshotError> {
    let io_err = |source: io::Error| SnapshotError::Io {
        object: object.to_owned(),
        source,
    };
    let mismatch = || SnapshotError::ChecksumMismatch {
        object: object.to_owned(),
    };
    let mut head = [0u8; HEADER_LEN];
    input.read_exact(&mut head[..10]).map_err(io_err)?;
    let len = SnapshotHeader::len_of(object, &head)?;
    input.read_exact(&mut head[10..len]).map_err(io_err)?;
    let header = SnapshotHeader::decode(object, &head[..len])?;
    let mut decoder = zstd::Decoder::new(input).map_err(io_err)?;
    decoder
        .window_log_max(MAX_ZSTD_WINDOW_LOG)
        .map_err(io_err)?;
    let mut hasher = (hash == BodyHash::Check).then(blake3::Hasher::new);
    // Decompression here, hashing and writing on a second thread.
    let total = relay::relay(
        relay::CHUNK_BYTES,
        |feed| {
            let mut total = 0u64;
            loop {
                let Some(mut buf) = feed.buffer() else {
                    return Ok(total);
                };
                // Ask for at most one byte beyond `db_bytes`: enough to
                // notice a body that is too long without decompressing (or
                // writing) more.
                let room = header.db_bytes - total;
                let want = relay::CHUNK_BYTES
                    .min(usize::try_from(room.saturating_add(1)).unwrap_or(usize::MAX));
                buf.resize(want, 0);
                // Whole chunks (the decoder returns less per call): the
                // buffer comes back this long and is not zeroed again.
                let mut n = 0;
                while n < want {
                    match decoder.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Err(mismatch()),
                    }
                }
                if n == 0 {
                    return Ok(total);
                }
                if n as u64 > room {
                    return Err(mismatch());
                }
                buf.truncate(n);
                total += n as u64;
                if !feed.send(buf) {
                    return Ok(total);
                }
            }
        },
        |chunk| {
            if let Some(h) = &mut hasher {
                h.update(chunk);
            }
            out.write_all(chunk).map_err(io_err)
        },
    )?;
    if total != header.db_bytes
        || hasher.is_some_and(|h| h.finalize().as_bytes() != &header.db_blake3)
    {
        return Err(mismatch());
    }
    Ok(header)
}

/// Checks that the etcd snapshot file at `db_path` (decompressed from
/// `object` by [`read_object`]) is at the revision its header claims: the
/// revision is read from the bbolt content itself with
/// [`bbolt::etcd_revision`].
///
/// # Errors
/// [`SnapshotError::RevisionMismatch`] naming the object and both
/// revisions; [`SnapshotError::Content`] if the file is not a valid etcd
/// bbolt file; [`SnapshotError::Io`] if it cannot be read.
pub fn check_content_revision(
    object: &str,
    header: &SnapshotHeader,
    db_path: &Path,
) -> Result<(), SnapshotError> {
    let content_err = |e: BoltError| match e {
        BoltError::Io(source) => SnapshotError::Io {
            object: object.to_owned(),
            source,
        },
        e @ BoltError::Invalid(_) => SnapshotError::Content {
            object: object.to_owned(),
            source: e,
        },
    };
    let reader = BoltReader::open(db_path).map_err(content_err)?;
    let content = bbolt::etcd_revision(&reader).map_err(content_err)?;
    if content != header.revision {
        return Err(SnapshotError::RevisionMismatch {
            object: object.to_owned(),
            header: header.revision,
            content,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let db: Vec<u8> = (0..200_000u32).flat_map(u32::to_le_bytes).collect();
        let header = SnapshotHeader {
            generation: 2,
            revision: 77,
            taken_ms: 5,
            db_bytes: db.len() as u64,
            db_blake3: *blake3::hash(&db).as_bytes(),
            prev_digest: [0; 32],
            prev_revision: 0,
        };
        let mut obj = Vec::new();
        write_object(&header, &mut db.as_slice(), &mut obj).unwrap();
        let mut back = Vec::new();
        assert_eq!(
            read_object("s", &mut obj.as_slice(), &mut back, BodyHash::Check).unwrap(),
            header
        );
        assert_eq!(back, db);

        let mut bad = obj.clone();
        let last = bad.len() - 3;
        bad[last] ^= 1;
        let err = read_object(
            "gen/s.snap",
            &mut bad.as_slice(),
            &mut Vec::new(),
            BodyHash::Check,
        )
        .unwrap_err();
        assert!(
            matches!(err, SnapshotError::ChecksumMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("gen/s.snap"));

        let mut bad = obj;
        bad[25] ^= 1;
        assert!(matches!(
            read_object("s", &mut bad.as_slice(), &mut Vec::new(), BodyHash::Check),
            Err(SnapshotError::ChecksumMismatch { .. })
        ));
    }
    /// Deferred hashing leaves the hash to the caller (a body whose hash
    /// differs from its header's is written whole) but still checks the
    /// length.
    #[test]
    fn deferred_hash_still_checks_the_length() {
        let db = vec![7u8; 10_000];
        let mut header = header_for(&db, 9);
        header.db_blake3 = [1; 32];
        let mut obj = Vec::new();
        write_object(&header, &mut db.as_slice(), &mut obj).unwrap();
        assert!(matches!(
            read_object("s", &mut obj.as_slice(), &mut Vec::new(), BodyHash::Check),
            Err(SnapshotError::ChecksumMismatch { .. })
        ));
        let mut back = Vec::new();
        let read = read_object("s", &mut obj.as_slice(), &mut back, BodyHash::Deferred);
        assert_eq!(read.unwrap(), header);
        assert_eq!(back, db);
        for db_bytes in [9_999, 10_001] {
            let mut obj = Vec::new();
            write_object(
                &SnapshotHeader { db_bytes, ..header },
                &mut db.as_slice(),
                &mut obj,
            )
            .unwrap();
            assert!(matches!(
                read_object(
                    "s",
                    &mut obj.as_slice(),
                    &mut Vec::new(),
                    BodyHash::Deferred
                ),
                Err(SnapshotError::ChecksumMismatch { .. })
            ));
        }
    }

    /// An object written as the file streams in, header last, reads back
    /// as one written in one go; a header for other content is refused.
    #[test]
    fn object_writer_fills_the_header_in_at_the_end() {
        let db: Vec<u8> = (0..300_000u32).flat_map(u32::to_le_bytes).collect();
        let mut out = io::Cursor::new(b"prefix".to_vec());
        out.set_position(6);
        let mut writer = ObjectWriter::new(out).unwrap();
        for chunk in db.chunks(32 * 1024 + 7) {
            writer.write(chunk).unwrap();
        }
        let body = writer.finish_body().unwrap();
        let mut header = header_for(&db, 9);
        assert_eq!(
            (body.db_bytes, body.db_blake3),
            (header.db_bytes, header.db_blake3)
        );
        header.db_bytes += 1;
        let mut wrong = BodyWritten {
            out: io::Cursor::new(Vec::new()),
            start: 0,
            db_bytes: body.db_bytes,
            db_blake3: body.db_blake3,
        };
        assert_eq!(
            wrong.write_header(&header).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        header.db_bytes -= 1;
        wrong = BodyWritten {
            out: io::Cursor::new(Vec::new()),
            start: 0,
            db_bytes: body.db_bytes,
            db_blake3: [1; 32],
        };
        assert!(wrong.write_header(&header).is_err());
        let obj = body.write_header(&header).unwrap().into_inner();
        assert_eq!(&obj[..6], b"prefix");
        let mut back = Vec::new();
        assert_eq!(
            read_object("s", &mut &obj[6..], &mut back, BodyHash::Check).unwrap(),
            header
        );
        assert!(back == db);
    }

    /// A real etcd 3.5.1 snapshot (`etcdctl snapshot save`) at revision 31.
    const ETCD_SNAPSHOT: &[u8] = include_bytes!("../testdata/etcd-3.5.1-rev31.db");

    fn header_for(db: &[u8], revision: Revision) -> SnapshotHeader {
        SnapshotHeader {
            generation: 2,
            revision,
            taken_ms: 5,
            db_bytes: db.len() as u64,
            db_blake3: *blake3::hash(db).as_bytes(),
            prev_digest: [0; 32],
            prev_revision: 0,
        }
    }

    /// A writer that counts what it was given.
    struct Counting(u64);

    impl Write for Counting {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A zstd frame of `len` zero bytes made of RLE blocks (see the segment
    /// tests): 4 bytes per 128 KiB.
    fn rle_zeros(len: u64) -> Vec<u8> {
        let mut f = vec![0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x38];
        let mut left = len;
        while left > 0 {
            let n = left.min(128 << 10);
            left -= n;
            let h = u32::from(left == 0) | (1 << 1) | ((n as u32) << 3);
            f.extend_from_slice(&h.to_le_bytes()[..3]);
            f.push(0);
        }
        f
    }

    /// Issue 6.5 (2): a body claiming 4 KiB that decompresses to 1 GiB is
    /// refused after at most 4 KiB were written.
    #[test]
    fn decompression_stops_at_the_claimed_length() {
        let header = header_for(&[0; 4096], 7);
        let mut obj = header.encode().to_vec();
        obj.extend_from_slice(&rle_zeros(1 << 30));
        let mut out = Counting(0);
        let err = read_object(
            "gen/bomb.snap",
            &mut obj.as_slice(),
            &mut out,
            BodyHash::Check,
        )
        .unwrap_err();
        assert!(
            matches!(err, SnapshotError::ChecksumMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("gen/bomb.snap"), "{err}");
        assert!(out.0 <= 4096, "{} bytes written", out.0);

        // The exact length passes; a shorter body is a mismatch.
        let mut obj = header.encode().to_vec();
        obj.extend_from_slice(&rle_zeros(4096));
        read_object("ok", &mut obj.as_slice(), &mut Counting(0), BodyHash::Check).unwrap();
        let mut obj = header.encode().to_vec();
        obj.extend_from_slice(&rle_zeros(4095));
        assert!(matches!(
            read_object(
                "short",
                &mut obj.as_slice(),
                &mut Counting(0),
                BodyHash::Check
            ),
            Err(SnapshotError::ChecksumMismatch { .. })
        ));
    }

    /// Issue 6.5 (3): reserved header bytes must be zero.
    #[test]
    fn reserved_bytes_must_be_zero() {
        let header = header_for(b"db", 7);
        for at in 11..16 {
            let mut bytes = header.encode();
            bytes[at] = 1;
            let check = blake3::hash(&bytes[..CHECKED_LEN]);
            bytes[CHECKED_LEN..HEADER_LEN].copy_from_slice(&check.as_bytes()[..8]);
            let err = SnapshotHeader::decode("gen-1/snapshots/r.snap", &bytes).unwrap_err();
            assert!(matches!(err, SnapshotError::Malformed { .. }), "{err}");
            let text = err.to_string();
            assert!(
                text.starts_with("gen-1/snapshots/r.snap") && text.contains("reserved"),
                "{text}"
            );
        }
        let mut bytes = header.encode();
        bytes[10] = 9;
        let check = blake3::hash(&bytes[..CHECKED_LEN]);
        bytes[CHECKED_LEN..HEADER_LEN].copy_from_slice(&check.as_bytes()[..8]);
        let err = SnapshotHeader::decode("c", &bytes).unwrap_err();
        assert!(err.to_string().contains("unknown codec 9"), "{err}");
    }

    #[test]
    fn format_1_objects_still_read() {
        let db = b"the database".to_vec();
        let mut header = header_for(&db, 7);
        header.prev_digest = [5; 32];
        header.prev_revision = 6;
        let mut v2 = Vec::new();
        write_object(&header, &mut db.as_slice(), &mut v2).unwrap();
        let mut v1 = v2[..80].to_vec();
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        let check = blake3::hash(&v1);
        v1.extend_from_slice(&check.as_bytes()[..8]);
        v1.extend_from_slice(&v2[HEADER_LEN..]);
        let mut out = Vec::new();
        let old = read_object("v1", &mut v1.as_slice(), &mut out, BodyHash::Check).unwrap();
        assert_eq!(out, db);
        assert_eq!((old.prev_digest, old.prev_revision), ([0; 32], 0));
        assert_eq!(SnapshotHeader::decode("v1", &v1).unwrap(), old);
        let mut out = Vec::new();
        assert_eq!(
            read_object("v2", &mut v2.as_slice(), &mut out, BodyHash::Check).unwrap(),
            header
        );
        assert_ne!(
            old.digest(),
            header.digest(),
            "the digest covers prev_digest"
        );
    }

    /// Issue 6.5 (5): an object re-headed to claim revision 41 while its
    /// content is at revision 31 is refused, naming the object.
    #[test]
    fn content_revision_must_match_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("snapshot.db");
        for (claimed, ok) in [(31, true), (41, false)] {
            let mut obj = Vec::new();
            write_object(
                &header_for(ETCD_SNAPSHOT, claimed),
                &mut &ETCD_SNAPSHOT[..],
                &mut obj,
            )
            .unwrap();
            let mut file = std::fs::File::create(&db_path).unwrap();
            let header = read_object(
                "gen-2/snapshots/x.snap",
                &mut obj.as_slice(),
                &mut file,
                BodyHash::Check,
            )
            .unwrap();
            drop(file);
            let result = check_content_revision("gen-2/snapshots/x.snap", &header, &db_path);
            if ok {
                result.unwrap();
                continue;
            }
            let err = result.unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::RevisionMismatch {
                        header: 41,
                        content: 31,
                        ..
                    }
                ),
                "{err}"
            );
            let text = err.to_string();
            assert!(text.starts_with("gen-2/snapshots/x.snap"), "{text}");
        }

        // Content that is not a bbolt file is a named content error.
        std::fs::write(&db_path, vec![7u8; 8192]).unwrap();
        let err = check_content_revision("bad.snap", &header_for(b"", 31), &db_path).unwrap_err();
        assert!(matches!(err, SnapshotError::Content { .. }), "{err}");
        assert!(err.to_string().starts_with("bad.snap"), "{err}");
    }
}
