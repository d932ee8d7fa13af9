//! The sealed-object envelope: chunked XChaCha20-Poly1305 (STREAM), its
//! header, and the rule that an archive is never mixed (see [`Opener`]).

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{Tag, XNonce};
use thiserror::Error;

use super::key::{ArchiveKey, KeyId, Keyring};

/// Magic bytes of a sealed object.
pub const MAGIC: &[u8; 8] = b"EPITRENC";
/// The envelope version this build reads and writes.
const ENVELOPE_VERSION: u8 = 1;
/// Algorithm id of XChaCha20-Poly1305 in the STREAM construction.
const ALGORITHM_XCHACHA20POLY1305_STREAM: u8 = 1;
/// log2 of [`CHUNK_BYTES`], as recorded in the header.
const CHUNK_LOG2: u8 = 16;
/// Plaintext bytes per chunk.
const CHUNK_BYTES: usize = 1 << CHUNK_LOG2;
/// Authentication tag bytes per chunk.
const TAG_BYTES: usize = 16;
/// Length of the clear header.
const HEADER_LEN: usize = 40;
const NONCE_PREFIX: std::ops::Range<usize> = 24..39;
const KEY_ID: std::ops::Range<usize> = 16..24;
/// The name under which [`crate::manifest::ArchiveManifest`] records the scheme.
pub const SCHEME: &str = "xchacha20poly1305-stream-64k";

/// Errors opening a sealed object or matching keys to an archive.
#[derive(Debug, Error)]
pub enum CryptoError {
    /// The object is sealed with a key that was not given.
    #[error("{object}: sealed with key id {key_id}, {}", given(.known))]
    UnknownKey {
        /// Object name.
        object: String,
        /// The key it needs.
        key_id: KeyId,
        /// The keys that were given.
        known: Vec<KeyId>,
    },
    /// The archive is encrypted and no key was given.
    #[error("the archive is encrypted (scheme {scheme}, created with key id {key_id}): give its key with --encryption-key-file")]
    ArchiveEncrypted {
        /// The scheme recorded in the archive manifest.
        scheme: String,
        /// The key the archive was created with.
        key_id: String,
    },
    /// A key was given for an archive that is not encrypted.
    #[error("the archive is not encrypted, but --encryption-key-file was given (key id {key_id}): an archive is encrypted from its creation or never")]
    ArchiveNotEncrypted {
        /// The first key given.
        key_id: KeyId,
    },
    /// The archive records an encryption scheme this build does not know.
    #[error("the archive is encrypted with scheme {scheme:?}, which this build does not support (it supports {SCHEME})")]
    UnsupportedScheme {
        /// The scheme found.
        scheme: String,
    },
    /// An object of an encrypted archive is stored in plaintext.
    #[error("{object}: not encrypted, in an encrypted archive (object replaced or written by an archiver without its key)")]
    NotSealed {
        /// Object name.
        object: String,
    },
    /// A damaged or unknown envelope header.
    #[error("{object}: malformed encryption envelope: {reason}")]
    Malformed {
        /// Object name.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// A chunk failed authentication: the object was corrupted, truncated,
    /// extended, reordered or stored under another name.
    #[error("{object}: chunk {chunk} fails authentication with key id {key_id} (corrupted, truncated, or not written under this name)")]
    Authentication {
        /// Object name.
        object: String,
        /// The key used.
        key_id: KeyId,
        /// The chunk that failed (counting from 0).
        chunk: u64,
    },
}

fn given(known: &[KeyId]) -> String {
    if known.is_empty() {
        "but no --encryption-key-file was given".to_owned()
    } else {
        let ids: Vec<String> = known.iter().map(ToString::to_string).collect();
        format!(
            "which no --encryption-key-file given holds (given: {})",
            ids.join(", ")
        )
    }
}

impl CryptoError {
    /// Whether the caller gave the wrong keys (a configuration problem)
    /// rather than the object being damaged.
    pub fn is_key_problem(&self) -> bool {
        matches!(
            self,
            Self::UnknownKey { .. }
                | Self::ArchiveEncrypted { .. }
                | Self::ArchiveNotEncrypted { .. }
                | Self::UnsupportedScheme { .. }
        )
    }
}

/// The key id a stored object names, if it is sealed (starts with the
/// magic and holds a whole header).
pub fn sealed_key_id(stored: &[u8]) -> Option<KeyId> {
    let header = stored.get(..HEADER_LEN).filter(|h| h.starts_with(MAGIC))?;
    Some(KeyId(header[KEY_ID].try_into().expect("8 bytes")))
}

/// The nonce of chunk `index`.
fn nonce(prefix: &[u8], index: u64, last: bool) -> XNonce {
    let mut n = [0u8; 24];
    n[..15].copy_from_slice(prefix);
    n[15..23].copy_from_slice(&index.to_be_bytes());
    n[23] = u8::from(last);
    XNonce::from(n)
}

/// Associated data of every chunk: the header and the object's name.
fn associated_data(header: &[u8; HEADER_LEN], object: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + object.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(object.as_bytes());
    aad
}

/// Seals an object's bytes as they come, a chunk at a time.
pub struct Sealer {
    key: ArchiveKey,
    header: [u8; HEADER_LEN],
    aad: Vec<u8>,
    header_sent: bool,
    index: u64,
    /// Plaintext not sealed yet: at most one chunk, held back until it is
    /// known whether more follows.
    pending: Vec<u8>,
}

impl Sealer {
    /// Starts sealing object `object` (its archive-relative name) with `key`.
    ///
    /// # Errors
    /// The system's random source failed.
    pub fn new(key: &ArchiveKey, object: &str) -> std::io::Result<Self> {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8] = ENVELOPE_VERSION;
        header[9] = ALGORITHM_XCHACHA20POLY1305_STREAM;
        header[10] = CHUNK_LOG2;
        header[KEY_ID].copy_from_slice(&key.id().0);
        getrandom::fill(&mut header[NONCE_PREFIX]).map_err(std::io::Error::other)?;
        Ok(Self {
            key: key.clone(),
            aad: associated_data(&header, object),
            header,
            header_sent: false,
            index: 0,
            pending: Vec::with_capacity(CHUNK_BYTES),
        })
    }

    fn send_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_sent {
            out.extend_from_slice(&self.header);
            self.header_sent = true;
        }
    }

    fn seal_pending(&mut self, last: bool, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.pending);
        let n = nonce(&self.header[NONCE_PREFIX], self.index, last);
        let tag = self
            .key
            .cipher
            .encrypt_inout_detached(&n, &self.aad, (&mut out[start..]).into())
            .expect("a chunk of 64 KiB is far below XChaCha20-Poly1305's message limit");
        out.extend_from_slice(&tag);
        self.pending.clear();
        self.index += 1;
    }

    /// Seals `data`, appending sealed bytes to `out`.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        self.send_header(out);
        while !data.is_empty() {
            if self.pending.len() == CHUNK_BYTES {
                // More follows: the held-back chunk is not the last.
                self.seal_pending(false, out);
            }
            let take = (CHUNK_BYTES - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }

    /// Seals the rest as the final chunk.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        self.send_header(out);
        self.seal_pending(true, out);
    }
}

/// Seals a whole object.
///
/// # Errors
/// The system's random source failed.
pub fn seal(key: &ArchiveKey, object: &str, plaintext: &[u8]) -> std::io::Result<Vec<u8>> {
    let chunks = plaintext.len().div_ceil(CHUNK_BYTES).max(1);
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + chunks * TAG_BYTES);
    let mut sealer = Sealer::new(key, object)?;
    sealer.update(plaintext, &mut out);
    sealer.finish(&mut out);
    Ok(out)
}

/// Where an [`Opener`] is.
enum OpenState {
    /// Collecting the first bytes to tell a sealed object from a clear one.
    Header(Vec<u8>),
    /// A sealed object: its key, header and the chunks read so far.
    Sealed {
        key: ArchiveKey,
        header: [u8; HEADER_LEN],
        aad: Vec<u8>,
        index: u64,
        /// Sealed bytes not opened yet: at most one chunk and its tag, held
        /// back until it is known whether more follows.
        pending: Vec<u8>,
    },
    /// A clear object of an unencrypted archive (no keys given).
    Clear,
}

/// Opens an object's bytes as they come, a chunk at a time, and enforces
/// that an archive is never mixed: with keys, every object must be sealed
/// with one of them; without, a sealed object is an error naming its key.
pub struct Opener<'k> {
    keys: &'k Keyring,
    object: String,
    state: OpenState,
}

impl<'k> Opener<'k> {
    /// Starts opening object `object` (its archive-relative name).
    pub fn new(keys: &'k Keyring, object: &str) -> Self {
        Self {
            keys,
            object: object.to_owned(),
            state: OpenState::Header(Vec::with_capacity(HEADER_LEN)),
        }
    }

    fn malformed(&self, reason: impl Into<String>) -> CryptoError {
        CryptoError::Malformed {
            object: self.object.clone(),
            reason: reason.into(),
        }
    }

    /// Decides, from the complete header (or the whole object if shorter),
    /// how the object is read.
    fn start(&self, head: &[u8]) -> Result<OpenState, CryptoError> {
        if !head.starts_with(MAGIC) {
            return if self.keys.is_empty() {
                Ok(OpenState::Clear)
            } else {
                Err(CryptoError::NotSealed {
                    object: self.object.clone(),
                })
            };
        }
        let header: [u8; HEADER_LEN] = head.try_into().map_err(|_| {
            self.malformed(format!("{} bytes, shorter than its header", head.len()))
        })?;
        let key_id = sealed_key_id(&header).expect("a whole header with the magic");
        if header[8] != ENVELOPE_VERSION {
            return Err(self.malformed(format!(
                "envelope version {} (this build reads {ENVELOPE_VERSION})",
                header[8]
            )));
        }
        if header[9] != ALGORITHM_XCHACHA20POLY1305_STREAM || header[10] != CHUNK_LOG2 {
            return Err(self.malformed(format!(
                "algorithm {} with chunk size 2^{} (this build reads algorithm {ALGORITHM_XCHACHA20POLY1305_STREAM} with 2^{CHUNK_LOG2})",
                header[9], header[10]
            )));
        }
        if header[11..16]
            .iter()
            .chain(&header[39..40])
            .any(|&b| b != 0)
        {
            return Err(self.malformed("reserved header bytes are not zero"));
        }
        let key = self
            .keys
            .find(key_id)
            .ok_or_else(|| CryptoError::UnknownKey {
                object: self.object.clone(),
                key_id,
                known: self.keys.ids(),
            })?;
        Ok(OpenState::Sealed {
            key: key.clone(),
            aad: associated_data(&header, &self.object),
            header,
            index: 0,
            pending: Vec::with_capacity(CHUNK_BYTES + TAG_BYTES),
        })
    }

    /// Opens `data`, appending plaintext to `out`.
    ///
    /// # Errors
    /// [`CryptoError`] naming the object.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if let OpenState::Header(head) = &mut self.state {
            let take = (HEADER_LEN - head.len()).min(data.len());
            head.extend_from_slice(&data[..take]);
            data = &data[take..];
            if head.len() < HEADER_LEN {
                return Ok(());
            }
            let head = std::mem::take(head);
            self.state = self.start(&head)?;
            if let OpenState::Clear = self.state {
                out.extend_from_slice(&head);
            }
        }
        while !data.is_empty() {
            let pending = match &mut self.state {
                OpenState::Header(_) => unreachable!("the header was completed above"),
                OpenState::Clear => {
                    out.extend_from_slice(data);
                    return Ok(());
                }
                OpenState::Sealed { pending, .. } => pending,
            };
            if pending.len() == CHUNK_BYTES + TAG_BYTES {
                // More follows: the held-back chunk is not the last.
                self.open_pending(false, out)?;
                continue;
            }
            let take = (CHUNK_BYTES + TAG_BYTES - pending.len()).min(data.len());
            pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    fn open_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let OpenState::Sealed {
            key,
            header,
            aad,
            index,
            pending,
        } = &mut self.state
        else {
            unreachable!("only called on sealed objects")
        };
        let fail = |chunk: u64| CryptoError::Authentication {
            object: self.object.clone(),
            key_id: key.id(),
            chunk,
        };
        let Some(body_len) = pending.len().checked_sub(TAG_BYTES) else {
            return Err(fail(*index));
        };
        let tag = Tag::try_from(&pending[body_len..]).expect("16 bytes");
        let n = nonce(&header[NONCE_PREFIX], *index, last);
        let start = out.len();
        out.extend_from_slice(&pending[..body_len]);
        if key
            .cipher
            .decrypt_inout_detached(&n, aad, (&mut out[start..]).into(), &tag)
            .is_err()
        {
            out.truncate(start);
            return Err(fail(*index));
        }
        pending.clear();
        *index += 1;
        Ok(())
    }

    /// Opens the final chunk: the object must end here.
    ///
    /// # Errors
    /// [`CryptoError`] naming the object (a truncated object fails here).
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), CryptoError> {
        if let OpenState::Header(head) = &self.state {
            // The whole object is shorter than a header.
            let head = head.clone();
            self.state = self.start(&head)?;
            out.extend_from_slice(&head);
            return Ok(());
        }
        match self.state {
            OpenState::Clear => Ok(()),
            OpenState::Sealed { .. } => self.open_pending(true, out),
            OpenState::Header(_) => unreachable!("handled above"),
        }
    }
}

/// How many stored bytes of an object, read with `keys`, hold its first `n`
/// plaintext bytes: for a sealed object the chunks holding them plus one
/// byte that tells whether more follows; without keys, enough to recognize
/// (and refuse) a sealed object.
pub fn stored_prefix_len(n: u64, keys: &Keyring) -> u64 {
    if keys.is_empty() {
        return n.max(HEADER_LEN as u64);
    }
    let chunks = n.div_ceil(CHUNK_BYTES as u64).max(1);
    (HEADER_LEN + 1) as u64 + chunks * (CHUNK_BYTES + TAG_BYTES) as u64
}

/// Opens the plaintext that a prefix of an object's stored bytes holds,
/// read as [`stored_prefix_len`] says (`ended`: the prefix is the entire
/// object, so its last chunk is final).
///
/// # Errors
/// [`CryptoError`] naming the object.
pub fn open_prefix(
    keys: &Keyring,
    object: &str,
    stored: &[u8],
    ended: bool,
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(stored.len());
    let mut opener = Opener::new(keys, object);
    opener.update(stored, &mut out)?;
    // Without keys the object is clear (or refused from its header).
    if ended || keys.is_empty() {
        opener.finish(&mut out)?;
    }
    Ok(out)
}

/// Opens a whole object (see [`Opener`]).
///
/// # Errors
/// [`CryptoError`] naming the object.
pub fn open(keys: &Keyring, object: &str, stored: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(stored.len());
    let mut opener = Opener::new(keys, object);
    opener.update(stored, &mut out)?;
    opener.finish(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::key::KEY_BYTES;
    use super::*;

    fn key(n: u8) -> ArchiveKey {
        ArchiveKey::from_bytes(&[n; KEY_BYTES])
    }

    fn ring(keys: &[u8]) -> Keyring {
        Keyring::new(keys.iter().map(|&n| key(n)).collect())
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_at_every_chunk_boundary() {
        let k = key(1);
        for len in [
            0,
            1,
            HEADER_LEN,
            CHUNK_BYTES - 1,
            CHUNK_BYTES,
            CHUNK_BYTES + 1,
            3 * CHUNK_BYTES,
            3 * CHUNK_BYTES + 5,
        ] {
            let plain = body(len);
            let sealed = seal(&k, "gen-1/x", &plain).unwrap();
            let chunks = len.div_ceil(CHUNK_BYTES).max(1);
            assert_eq!(sealed.len(), HEADER_LEN + len + chunks * TAG_BYTES, "{len}");
            assert_eq!(
                open(&ring(&[1]), "gen-1/x", &sealed).unwrap(),
                plain,
                "{len}"
            );
        }
    }

    #[test]
    fn streaming_matches_whole_object_in_any_piece_sizes() {
        let k = key(2);
        let plain = body(2 * CHUNK_BYTES + 77);
        for piece in [1usize, 7, 4096, CHUNK_BYTES, CHUNK_BYTES + TAG_BYTES + 3] {
            let mut sealer = Sealer::new(&k, "o").unwrap();
            let mut sealed = Vec::new();
            for p in plain.chunks(piece) {
                sealer.update(p, &mut sealed);
            }
            sealer.finish(&mut sealed);
            let keys = ring(&[2]);
            let mut opener = Opener::new(&keys, "o");
            let mut back = Vec::new();
            for p in sealed.chunks(piece) {
                opener.update(p, &mut back).unwrap();
            }
            opener.finish(&mut back).unwrap();
            assert_eq!(back, plain, "pieces of {piece}");
        }
    }

    #[test]
    fn wrong_or_missing_keys_name_the_key_id() {
        let sealed = seal(&key(1), "gen-1/generation.json", b"{}").unwrap();
        let id = key(1).id();
        for keys in [Keyring::default(), ring(&[2, 3])] {
            let err = open(&keys, "gen-1/generation.json", &sealed).unwrap_err();
            assert!(
                matches!(&err, CryptoError::UnknownKey { key_id, .. } if *key_id == id),
                "{err}"
            );
            assert!(err.is_key_problem());
            assert!(err.to_string().contains(&id.to_string()), "{err}");
        }
        // Rotation: any key of the ring opens what it sealed.
        assert_eq!(
            open(&ring(&[2, 1]), "gen-1/generation.json", &sealed).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn archives_are_never_mixed() {
        // Without keys, clear objects read as they are.
        assert_eq!(open(&Keyring::default(), "o", b"{}").unwrap(), b"{}");
        assert_eq!(open(&Keyring::default(), "o", b"").unwrap(), b"");
        // With keys, a clear object is refused.
        for clear in [&b""[..], b"{}", &body(100)] {
            let err = open(&ring(&[1]), "o", clear).unwrap_err();
            assert!(matches!(err, CryptoError::NotSealed { .. }), "{err}");
            assert!(!err.is_key_problem());
        }
    }

    #[test]
    fn tampering_fails_authentication() {
        let k = key(1);
        let keys = ring(&[1]);
        let plain = body(3 * CHUNK_BYTES + 10);
        let sealed = seal(&k, "gen-1/segments/a.seg", &plain).unwrap();
        let auth = |r: Result<Vec<u8>, CryptoError>| match r {
            Err(CryptoError::Authentication { chunk, .. }) => chunk,
            other => panic!("expected an authentication failure, got {other:?}"),
        };
        // Another name: bodies cannot be swapped between objects.
        assert_eq!(auth(open(&keys, "gen-1/segments/b.seg", &sealed)), 0);
        // Truncated at a chunk boundary, inside a chunk, or to the header.
        let stride = CHUNK_BYTES + TAG_BYTES;
        assert_eq!(
            auth(open(
                &keys,
                "gen-1/segments/a.seg",
                &sealed[..HEADER_LEN + 2 * stride]
            )),
            1
        );
        assert_eq!(
            auth(open(
                &keys,
                "gen-1/segments/a.seg",
                &sealed[..sealed.len() - 1]
            )),
            3
        );
        assert_eq!(
            auth(open(&keys, "gen-1/segments/a.seg", &sealed[..HEADER_LEN])),
            0
        );
        // Extended by a chunk.
        let mut longer = sealed.clone();
        longer.extend_from_slice(&sealed[HEADER_LEN..HEADER_LEN + stride]);
        assert_eq!(auth(open(&keys, "gen-1/segments/a.seg", &longer)), 3);
        // Two chunks swapped.
        let mut swapped = sealed.clone();
        let (c0, c1) = (HEADER_LEN, HEADER_LEN + stride);
        let first = sealed[c0..c1].to_vec();
        swapped.copy_within(c1..c1 + stride, c0);
        swapped[c1..c1 + stride].copy_from_slice(&first);
        assert_eq!(auth(open(&keys, "gen-1/segments/a.seg", &swapped)), 0);
        // A chunk of another object sealed with the same key.
        let other = seal(&k, "gen-1/segments/a.seg", &plain).unwrap();
        let mut spliced = sealed.clone();
        spliced[c1..c1 + stride].copy_from_slice(&other[c1..c1 + stride]);
        assert_eq!(auth(open(&keys, "gen-1/segments/a.seg", &spliced)), 1);
        // A flipped bit in a body, a tag, the nonce prefix.
        for at in [
            HEADER_LEN + 5,
            HEADER_LEN + CHUNK_BYTES + 3,
            NONCE_PREFIX.start,
        ] {
            let mut flipped = sealed.clone();
            flipped[at] ^= 1;
            auth(open(&keys, "gen-1/segments/a.seg", &flipped));
        }
    }

    #[test]
    fn header_damage_is_named() {
        let sealed = seal(&key(1), "o", b"x").unwrap();
        for (at, needle) in [
            (8, "envelope version"),
            (9, "algorithm"),
            (10, "chunk size"),
            (12, "reserved"),
        ] {
            let mut bad = sealed.clone();
            bad[at] ^= 0x40;
            let err = open(&ring(&[1]), "o", &bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{at}: {err}");
        }
        let err = open(&ring(&[1]), "o", &sealed[..20])
            .unwrap_err()
            .to_string();
        assert!(err.contains("shorter than its header"), "{err}");
    }

    #[test]
    fn mutated_objects_never_panic_and_never_open() {
        let k = key(1);
        let keys = ring(&[1]);
        let plain = body(CHUNK_BYTES + 100);
        let sealed = seal(&k, "o", &plain).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..400 {
            let mut m = sealed.clone();
            match next() % 4 {
                0 => {
                    let at = (next() % m.len() as u64) as usize;
                    m[at] ^= 1 << (next() % 8);
                }
                1 => m.truncate((next() % m.len() as u64) as usize),
                2 => {
                    let at = (next() % m.len() as u64) as usize;
                    m.insert(at, next() as u8);
                }
                _ => {
                    let at = (next() % m.len() as u64) as usize;
                    m.remove(at);
                }
            }
            // Any mutation of a sealed object is refused, never opened to
            // other bytes.
            assert!(open(&keys, "o", &m).is_err());
            let _ = open(&Keyring::default(), "o", &m);
        }
    }

    /// The stored sample pins the format: a change that cannot open it is
    /// a new envelope version.
    #[test]
    fn opens_the_stored_sample() {
        let sealed = include_bytes!("../../testdata/sample-v1.sealed");
        let k = ArchiveKey::from_bytes(&[7; KEY_BYTES]);
        assert_eq!(&sealed[..8], MAGIC);
        assert_eq!(
            sealed[8..11],
            [ENVELOPE_VERSION, ALGORITHM_XCHACHA20POLY1305_STREAM, 16]
        );
        assert_eq!(sealed_key_id(sealed), Some(k.id()));
        assert_eq!(sealed_key_id(&sealed[..HEADER_LEN - 1]), None);
        assert_eq!(sealed_key_id(b"{}"), None);
        let plain: Vec<u8> = (0..CHUNK_BYTES + 1000).map(|i| (i % 251) as u8).collect();
        let keys = Keyring::new(vec![k]);
        let name = "gen-0000000000000001/segments/sample";
        assert_eq!(open(&keys, name, sealed).unwrap(), plain);
    }
}
