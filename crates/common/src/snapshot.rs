//! The snapshot object format: a fixed header and the zstd-compressed bbolt
//! file exactly as etcd's Maintenance.Snapshot streamed it (including etcd's
//! own sha256 trailer).
//!
//! ```text
//! offset size field
//!      0    8 magic            b"EPITRSNP"
//!      8    2 format version   u16 LE (1)
//!     10    1 codec            u8 (1 = zstd)
//!     11    5 reserved         zero
//!     16    8 generation       u64 LE
//!     24    8 revision         i64 LE (read from the file itself)
//!     32    8 taken_ms         i64 LE
//!     40    8 db_bytes         u64 LE, length of the uncompressed file
//!     48   32 db_blake3        blake3 of the uncompressed file
//!     80    8 header_check     first 8 bytes of blake3(bytes 0..80)
//!     88    … body             zstd frame(s) of the file
//! ```

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::Revision;

/// Magic bytes of a snapshot object.
pub const MAGIC: &[u8; 8] = b"EPITRSNP";
/// The snapshot format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 88;
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
    #[error("{object}: unsupported snapshot format version {version} (this build reads {FORMAT_VERSION})")]
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
        let check = blake3::hash(&out[..80]);
        out[80..88].copy_from_slice(&check.as_bytes()[..8]);
        out
    }

    /// Decodes and checks a header.
    ///
    /// # Errors
    /// [`SnapshotError`] naming `object`.
    pub fn decode(object: &str, bytes: &[u8]) -> Result<Self, SnapshotError> {
        let malformed = |reason: &str| SnapshotError::Malformed {
            object: object.to_owned(),
            reason: reason.to_owned(),
        };
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(malformed("bad magic"));
        }
        if blake3::hash(&bytes[..80]).as_bytes()[..8] != bytes[80..88] {
            return Err(SnapshotError::ChecksumMismatch {
                object: object.to_owned(),
            });
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                object: object.to_owned(),
                version,
            });
        }
        if bytes[10] != CODEC_ZSTD {
            return Err(malformed("unknown codec"));
        }
        let le64 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Ok(Self {
            generation: le64(16),
            revision: le64(24) as i64,
            taken_ms: le64(32) as i64,
            db_bytes: le64(40),
            db_blake3: bytes[48..80].try_into().expect("32 bytes"),
        })
    }
}

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
    let mut encoder = zstd::Encoder::new(out, 3)?;
    io::copy(db, &mut encoder)?;
    encoder.finish()?.flush()
}

/// Decompresses a snapshot object's body into `out`, checking length and
/// hash against the header. Streams.
///
/// # Errors
/// [`SnapshotError::ChecksumMismatch`] if the content does not match.
pub fn read_object(
    object: &str,
    input: &mut impl Read,
    out: &mut impl Write,
) -> Result<SnapshotHeader, SnapshotError> {
    let io_err = |source: io::Error| SnapshotError::Io {
        object: object.to_owned(),
        source,
    };
    let mut head = [0u8; HEADER_LEN];
    input.read_exact(&mut head).map_err(io_err)?;
    let header = SnapshotHeader::decode(object, &head)?;
    let mut decoder = zstd::Decoder::new(input).map_err(io_err)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                return Err(SnapshotError::ChecksumMismatch {
                    object: object.to_owned(),
                })
            }
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err)?;
        total += n as u64;
    }
    if total != header.db_bytes || hasher.finalize().as_bytes() != &header.db_blake3 {
        return Err(SnapshotError::ChecksumMismatch {
            object: object.to_owned(),
        });
    }
    Ok(header)
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
        };
        let mut obj = Vec::new();
        write_object(&header, &mut db.as_slice(), &mut obj).unwrap();
        let mut back = Vec::new();
        assert_eq!(
            read_object("s", &mut obj.as_slice(), &mut back).unwrap(),
            header
        );
        assert_eq!(back, db);

        let mut bad = obj.clone();
        let last = bad.len() - 3;
        bad[last] ^= 1;
        let err = read_object("gen/s.snap", &mut bad.as_slice(), &mut Vec::new()).unwrap_err();
        assert!(
            matches!(err, SnapshotError::ChecksumMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("gen/s.snap"));

        let mut bad = obj;
        bad[25] ^= 1;
        assert!(matches!(
            read_object("s", &mut bad.as_slice(), &mut Vec::new()),
            Err(SnapshotError::ChecksumMismatch { .. })
        ));
    }
}
