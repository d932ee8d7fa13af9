//! Archive keys: key files, key ids, and the keyring an archive is read
//! and written with.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::{Key, XChaCha20Poly1305};
use thiserror::Error;

/// Bytes of a key.
pub const KEY_BYTES: usize = 32;

/// blake3 key-derivation contexts (globally unique, never to change).
const CONTEXT_KEY_ID: &str = "etcd-pitr 2026-11 archive key id";
const CONTEXT_CIPHER_KEY: &str = "etcd-pitr 2026-11 object envelope cipher key";

/// The public name of a key: the first 8 bytes of a blake3 key derivation
/// from it, shown as 16 hex digits. Objects carry it in the clear.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl KeyId {
    /// Parses 16 hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16)
            .ok()
            .map(|v| Self(v.to_be_bytes()))
    }
}

/// Errors loading a key file: the caller's configuration is wrong.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("--encryption-key-file: cannot read {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a key.
    #[error("--encryption-key-file: {} is not a key file: {reason} (expected 32 random bytes in base64, e.g. from `head -c 32 /dev/urandom | base64`)", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Two files hold the same key.
    #[error("--encryption-key-file: {} and {} hold the same key (id {id})", first.display(), second.display())]
    Duplicate {
        /// The first file.
        first: PathBuf,
        /// The second file.
        second: PathBuf,
        /// The key's id.
        id: KeyId,
    },
}

/// One archive key.
#[derive(Clone)]
pub struct ArchiveKey {
    id: KeyId,
    pub(super) cipher: XChaCha20Poly1305,
}

impl fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArchiveKey({})", self.id)
    }
}

impl ArchiveKey {
    /// The key of 32 raw bytes.
    pub fn from_bytes(raw: &[u8; KEY_BYTES]) -> Self {
        let derived = blake3::derive_key(CONTEXT_KEY_ID, raw);
        let mut id = [0u8; 8];
        id.copy_from_slice(&derived[..8]);
        let cipher_key = Key::from(blake3::derive_key(CONTEXT_CIPHER_KEY, raw));
        Self {
            id: KeyId(id),
            cipher: XChaCha20Poly1305::new(&cipher_key),
        }
    }

    /// A fresh random key and its key-file text.
    ///
    /// # Errors
    /// The system's random source failed.
    pub fn generate() -> std::io::Result<(Self, String)> {
        let mut raw = [0u8; KEY_BYTES];
        getrandom::fill(&mut raw).map_err(std::io::Error::other)?;
        let text = base64::engine::general_purpose::STANDARD.encode(raw);
        Ok((Self::from_bytes(&raw), format!("{text}\n")))
    }

    /// Reads a key file.
    ///
    /// # Errors
    /// [`KeyError`] naming the file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read(path).map_err(|source| KeyError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| KeyError::Malformed {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses key-file text: 32 bytes in standard base64, whitespace around.
    ///
    /// # Errors
    /// What is wrong with the text (never the text itself).
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let trimmed = text.trim_ascii();
        if trimmed.is_empty() {
            return Err("it is empty".into());
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(trimmed)
            .map_err(|e| format!("not base64 ({e})"))?;
        let raw: [u8; KEY_BYTES] = raw
            .try_into()
            .map_err(|r: Vec<u8>| format!("it holds {} bytes, not {KEY_BYTES}", r.len()))?;
        Ok(Self::from_bytes(&raw))
    }

    /// The key's public id.
    pub fn id(&self) -> KeyId {
        self.id
    }
}

/// The keys an archive is read and written with: the first seals new
/// objects, every one opens the objects that name it. Empty for an
/// unencrypted archive.
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    keys: Vec<ArchiveKey>,
}

impl Keyring {
    /// A keyring of `keys`, the first sealing.
    pub fn new(keys: Vec<ArchiveKey>) -> Self {
        Self { keys }
    }

    /// Loads key files, in order (the first seals).
    ///
    /// # Errors
    /// [`KeyError`] naming the file.
    pub fn load(paths: &[PathBuf]) -> Result<Self, KeyError> {
        let mut keys: Vec<(ArchiveKey, &PathBuf)> = Vec::new();
        for path in paths {
            let key = ArchiveKey::load(path)?;
            if let Some((_, first)) = keys.iter().find(|(k, _)| k.id == key.id) {
                return Err(KeyError::Duplicate {
                    first: (*first).clone(),
                    second: path.clone(),
                    id: key.id,
                });
            }
            keys.push((key, path));
        }
        Ok(Self::new(keys.into_iter().map(|(k, _)| k).collect()))
    }

    /// Whether no key is given (the archive is not encrypted).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key that seals new objects.
    pub fn sealing(&self) -> Option<&ArchiveKey> {
        self.keys.first()
    }

    /// The ids of all keys, in order.
    pub fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }

    pub(super) fn find(&self, id: KeyId) -> Option<&ArchiveKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ArchiveKey {
        ArchiveKey::from_bytes(&[n; KEY_BYTES])
    }

    #[test]
    fn keys_parse_strictly_and_ids_are_stable() {
        let (k, text) = ArchiveKey::generate().unwrap();
        let again = ArchiveKey::parse(format!("  {text}\n").as_bytes()).unwrap();
        assert_eq!(k.id(), again.id());
        assert_eq!(KeyId::parse(&k.id().to_string()), Some(k.id()));
        // A fixed key has a fixed id: the derivation must never change.
        assert_eq!(key(0).id().to_string(), "0a96dbaabbb71763");
        for (bad, needle) in [
            (&b""[..], "empty"),
            (b"not base64!", "not base64"),
            (b"AAAA", "3 bytes"),
        ] {
            let err = ArchiveKey::parse(bad).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn keyring_loads_files_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, bad) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("bad"),
        );
        std::fs::write(&a, ArchiveKey::generate().unwrap().1).unwrap();
        std::fs::write(&b, ArchiveKey::generate().unwrap().1).unwrap();
        std::fs::write(&bad, "hunter2").unwrap();
        let keys = Keyring::load(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(keys.ids().len(), 2);
        assert_eq!(
            keys.sealing().unwrap().id(),
            ArchiveKey::load(&a).unwrap().id()
        );
        let err = Keyring::load(&[a.clone(), a.clone()]).unwrap_err();
        assert!(matches!(err, KeyError::Duplicate { .. }), "{err}");
        let err = Keyring::load(&[bad]).unwrap_err().to_string();
        assert!(
            err.contains("--encryption-key-file") && !err.contains("hunter2"),
            "{err}"
        );
        let err = Keyring::load(&[dir.path().join("missing")]).unwrap_err();
        assert!(matches!(err, KeyError::Unreadable { .. }), "{err}");
    }
}
