//! Archive and generation manifests (small JSON objects, written once).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::crypto::{self, CryptoError, Keyring};
use crate::layout::{ClockStepName, GenerationId};
use crate::Revision;

/// The archive format version this build reads and writes.
pub const ARCHIVE_FORMAT_VERSION: u32 = 1;

/// Errors reading manifests.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// Not valid JSON of the expected shape.
    #[error("{object}: malformed manifest: {reason}")]
    Malformed {
        /// Object name.
        object: String,
        /// Parser message.
        reason: String,
    },
    /// An archive format this build does not know.
    #[error("{object}: archive format version {version} is not supported (this build reads {ARCHIVE_FORMAT_VERSION})")]
    UnsupportedVersion {
        /// Object name.
        object: String,
        /// Version found.
        version: u32,
    },
}

/// `etcd-pitr.json` at the archive root.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchiveManifest {
    /// Always `"etcd-pitr"`.
    pub format: String,
    /// Archive format version.
    pub version: u32,
    /// When the archive was created (Unix ms).
    pub created_ms: i64,
    /// Set when the archive is encrypted (from its creation on; absent in
    /// archives made before encryption existed, which are not encrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<ArchiveEncryption>,
}

/// How an archive is encrypted ([`crate::crypto`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchiveEncryption {
    /// The envelope scheme, [`crypto::SCHEME`].
    pub scheme: String,
    /// The id of the key the archive was created with (objects name their
    /// own key; later ones may use rotated keys).
    pub key_id: String,
}

impl ArchiveManifest {
    /// A manifest for a new archive, encrypted when `keys` holds a key.
    pub fn new(created_ms: i64, keys: &Keyring) -> Self {
        Self {
            format: "etcd-pitr".into(),
            version: ARCHIVE_FORMAT_VERSION,
            created_ms,
            encryption: keys.sealing().map(|k| ArchiveEncryption {
                scheme: crypto::SCHEME.into(),
                key_id: k.id().to_string(),
            }),
        }
    }

    /// Checks that `keys` suit the archive: keys for an encrypted archive
    /// (in a scheme this build knows), none for an unencrypted one. An
    /// archive is never mixed.
    ///
    /// # Errors
    /// [`CryptoError`] saying which.
    pub fn check_keys(&self, keys: &Keyring) -> Result<(), CryptoError> {
        match (&self.encryption, keys.sealing()) {
            (None, Some(k)) => Err(CryptoError::ArchiveNotEncrypted { key_id: k.id() }),
            (Some(e), _) if e.scheme != crypto::SCHEME => Err(CryptoError::UnsupportedScheme {
                scheme: e.scheme.clone(),
            }),
            (Some(e), None) => Err(CryptoError::ArchiveEncrypted {
                scheme: e.scheme.clone(),
                key_id: e.key_id.clone(),
            }),
            (None, None) | (Some(_), Some(_)) => Ok(()),
        }
    }

    /// Parses and checks the manifest.
    ///
    /// # Errors
    /// [`ManifestError`] naming the object.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Self = serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed {
            object: object.into(),
            reason: e.to_string(),
        })?;
        if m.format != "etcd-pitr" {
            return Err(ManifestError::Malformed {
                object: object.into(),
                reason: format!("format is {:?}, expected \"etcd-pitr\"", m.format),
            });
        }
        if m.version != ARCHIVE_FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion {
                object: object.into(),
                version: m.version,
            });
        }
        Ok(m)
    }
}

/// Why a generation was started.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StartReason {
    /// First generation of the archive.
    NewArchive,
    /// etcd compacted past the archiver's resume point: revisions were lost.
    Compacted,
    /// The cluster ID changed.
    ClusterChanged,
    /// The source's history no longer matches the archive (it was restored).
    LineageBroken,
}

/// The previous generation's end, i.e. where the gap begins.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GapStart {
    /// Previous generation.
    pub generation: GenerationId,
    /// Its last archived revision.
    pub last_revision: Revision,
}

/// `gen-…/generation.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenerationManifest {
    /// This generation.
    pub generation: GenerationId,
    /// etcd cluster ID of the source.
    pub cluster_id: u64,
    /// The chain starts after this revision (first segment's `prev`).
    pub start_revision: Revision,
    /// When the generation was started (Unix ms).
    pub started_ms: i64,
    /// Why it was started.
    pub reason: StartReason,
    /// Where the previous generation ended, if there was one.
    pub previous: Option<GapStart>,
    /// Human-readable detail of the reason.
    pub detail: String,
    /// The writer term that started it (0: written without an election).
    #[serde(default)]
    pub term: u64,
    /// Hex digest of the previous generation's last segment (its head in
    /// the hash chain, see [`crate::hashchain`]); absent in archives
    /// written before the hash chain and for the first generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_digest: Option<String>,
}

impl GenerationManifest {
    /// Parses the manifest.
    ///
    /// # Errors
    /// [`ManifestError::Malformed`] naming the object.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<Self, ManifestError> {
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed {
            object: object.into(),
            reason: e.to_string(),
        })
    }
}

impl GenerationManifest {
    /// Parses the manifest stored in `generation`'s directory, checking that
    /// it names that generation.
    ///
    /// # Errors
    /// [`ManifestError::Malformed`] naming the object.
    pub fn parse_in(
        object: &str,
        bytes: &[u8],
        generation: GenerationId,
    ) -> Result<Self, ManifestError> {
        let manifest = Self::parse(object, bytes)?;
        if manifest.generation != generation {
            return Err(ManifestError::Malformed {
                object: object.into(),
                reason: format!(
                    "names generation {}, the object lies in generation {generation}",
                    manifest.generation
                ),
            });
        }
        Ok(manifest)
    }
}

/// `gen-…/lineage/{rev}.json`: etcd's `HashKV` of the source at a base
/// snapshot's revision, asked right after the snapshot was taken. Asking
/// again later tells whether the cluster still has the same history up to
/// that revision (a restored source answers differently), even when the
/// generation holds no revision record yet.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LineageFingerprint {
    /// The snapshot revision the hash covers.
    pub revision: Revision,
    /// `HashKV(revision).hash`.
    pub hash: u32,
    /// The compaction revision the hash started from; hashes are only
    /// comparable at equal compaction revisions.
    pub compact_revision: Revision,
    /// When it was asked (Unix ms).
    pub taken_ms: i64,
}

impl LineageFingerprint {
    /// Parses a fingerprint object, checking it covers `revision`.
    ///
    /// # Errors
    /// [`ManifestError::Malformed`] naming the object.
    pub fn parse_at(object: &str, bytes: &[u8], revision: Revision) -> Result<Self, ManifestError> {
        let f: Self = serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed {
            object: object.into(),
            reason: e.to_string(),
        })?;
        if f.revision != revision {
            return Err(ManifestError::Malformed {
                object: object.into(),
                reason: format!("covers revision {}, its name says {revision}", f.revision),
            });
        }
        Ok(f)
    }
}

/// `terms/{term}.json` (and the same content as `gen-…/terms/{term}.json`):
/// one archiver's leadership. Terms are claimed write-once in increasing
/// order, so a later term proves an earlier writer had lost leadership.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TermRecord {
    /// The term number.
    pub term: u64,
    /// Who holds it (host name and process id).
    pub holder: String,
    /// The source cluster's revision of the election key (etcd's fencing
    /// token for this leadership).
    pub election_revision: Revision,
    /// When it was claimed (Unix ms).
    pub claimed_ms: i64,
}

impl TermRecord {
    /// Parses a term record.
    ///
    /// # Errors
    /// [`ManifestError::Malformed`] naming the object.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<Self, ManifestError> {
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed {
            object: object.into(),
            reason: e.to_string(),
        })
    }
}

/// `gen-…/pruned/{first}-{last}.json`: retention deleted the segments
/// holding revisions `first..=last` of the generation on purpose. The name
/// carries the range; the content says when and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PruneRecord {
    /// First pruned revision (as in the name).
    pub first: Revision,
    /// Last pruned revision (as in the name).
    pub last: Revision,
    /// When the prune that wrote it planned its deletions (Unix ms).
    pub pruned_ms: i64,
    /// The retention policy that decided it, as given.
    pub policy: String,
    /// Hex digests of the deleted segments that end at `last` (one of them
    /// is the predecessor of the first segment after the range, see
    /// [`crate::hashchain`]).
    #[serde(default)]
    pub cut_digests: Vec<String>,
}

impl PruneRecord {
    /// Parses a retention record and checks it against its name.
    ///
    /// # Errors
    /// [`ManifestError::Malformed`] naming the object.
    pub fn parse_named(
        object: &str,
        bytes: &[u8],
        range: crate::layout::PrunedRange,
    ) -> Result<Self, ManifestError> {
        let record: Self = serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed {
            object: object.into(),
            reason: e.to_string(),
        })?;
        if (record.first, record.last) != (range.first, range.last) {
            return Err(ManifestError::Malformed {
                object: object.into(),
                reason: format!(
                    "records revisions {}..={}, its name {range}",
                    record.first, record.last
                ),
            });
        }
        Ok(record)
    }
}

/// `gen-…/clock/{epoch_first}.json`: a clock epoch began. An epoch is one
/// archiver process writing one generation with its anchored clock (wall
/// time read once, then advanced by the monotonic clock); it holds the
/// generation's revisions from `epoch_first` up to the next epoch's first
/// revision - 1. Written before any segment of the epoch can be uploaded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClockEpoch {
    /// The first revision the epoch's writer appends (last archived + 1).
    pub epoch_first: Revision,
    /// The wall-clock time (Unix ms) the process read once to anchor its
    /// clock.
    pub anchor_ms: i64,
    /// The anchored time (Unix ms) when the epoch began; raised to
    /// `floor_ms` when the generation's archived times were later.
    pub began_ms: i64,
    /// The generation's latest archived time (Unix ms) when the epoch
    /// began (0 for a new generation): observed times never go below it.
    pub floor_ms: i64,
    /// Who wrote it (host name and process id).
    pub holder: String,
}

impl ClockEpoch {
    /// Parses an epoch object, checking it begins at `epoch_first`.
    ///
    /// # Errors
    /// [`ManifestError::Malformed`] naming the object.
    pub fn parse_at(
        object: &str,
        bytes: &[u8],
        epoch_first: Revision,
    ) -> Result<Self, ManifestError> {
        let e: Self = parse_json(object, bytes)?;
        if e.epoch_first != epoch_first {
            return Err(malformed(
                object,
                format!(
                    "begins at revision {}, its name says {epoch_first}",
                    e.epoch_first
                ),
            ));
        }
        Ok(e)
    }
}

/// `gen-…/clock/{epoch_first}-{at}-{anchored_ms}.json`: the wall clock
/// stepped away from the epoch's anchored clock (which the archiver keeps
/// using). `offset_ms = wall_ms - anchored_ms` is cumulative since the
/// anchor, not the change since the previous step.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClockStep {
    /// First revision of the epoch the step was seen in.
    pub epoch_first: Revision,
    /// The step was seen after this revision was appended (`epoch_first -
    /// 1`: before the epoch's first revision, e.g. when the epoch began with
    /// its clock raised to the generation's floor).
    pub at_revision: Revision,
    /// The anchored clock's time when the step was seen (Unix ms).
    pub anchored_ms: i64,
    /// The wall clock's time then (Unix ms).
    pub wall_ms: i64,
    /// `wall_ms - anchored_ms`.
    pub offset_ms: i64,
}

impl ClockStep {
    /// The object name this step is stored under.
    pub fn name(&self) -> ClockStepName {
        ClockStepName {
            epoch_first: self.epoch_first,
            at: self.at_revision,
            anchored_ms: self.anchored_ms,
        }
    }

    /// Parses a step object, checking it against its name.
    ///
    /// # Errors
    /// [`ManifestError::Malformed`] naming the object.
    pub fn parse_named(
        object: &str,
        bytes: &[u8],
        name: &ClockStepName,
    ) -> Result<Self, ManifestError> {
        let s: Self = parse_json(object, bytes)?;
        if s.name() != *name {
            return Err(malformed(
                object,
                format!(
                    "records epoch {} revision {} at {} ms, its name says epoch {} revision {} at {} ms",
                    s.epoch_first, s.at_revision, s.anchored_ms, name.epoch_first, name.at, name.anchored_ms
                ),
            ));
        }
        if s.wall_ms.checked_sub(s.anchored_ms) != Some(s.offset_ms) {
            return Err(malformed(
                object,
                format!(
                    "offset_ms {} is not wall_ms - anchored_ms ({} - {})",
                    s.offset_ms, s.wall_ms, s.anchored_ms
                ),
            ));
        }
        Ok(s)
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(
    object: &str,
    bytes: &[u8],
) -> Result<T, ManifestError> {
    serde_json::from_slice(bytes).map_err(|e| malformed(object, e.to_string()))
}

fn malformed(object: &str, reason: String) -> ManifestError {
    ManifestError::Malformed {
        object: object.into(),
        reason,
    }
}

impl Serialize for GenerationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for GenerationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_objects_parse_against_their_names() {
        let step = ClockStep {
            epoch_first: 5,
            at_revision: 9,
            anchored_ms: 1_000,
            wall_ms: 61_000,
            offset_ms: 60_000,
        };
        let json = serde_json::to_vec(&step).unwrap();
        assert_eq!(
            ClockStep::parse_named("o", &json, &step.name()).unwrap(),
            step
        );
        let other = ClockStepName {
            at: 10,
            ..step.name()
        };
        let e = ClockStep::parse_named("o", &json, &other).unwrap_err();
        assert!(e.to_string().starts_with("o: malformed"), "{e}");
        let bad = ClockStep {
            offset_ms: 1,
            ..step
        };
        let e = ClockStep::parse_named("o", &serde_json::to_vec(&bad).unwrap(), &bad.name())
            .unwrap_err();
        assert!(e.to_string().contains("offset_ms"), "{e}");
        assert!(ClockStep::parse_named("o", b"{}", &step.name()).is_err());

        let epoch = ClockEpoch {
            epoch_first: 5,
            anchor_ms: 10,
            began_ms: 20,
            floor_ms: 20,
            holder: "h/1".into(),
        };
        let json = serde_json::to_vec(&epoch).unwrap();
        assert_eq!(ClockEpoch::parse_at("o", &json, 5).unwrap(), epoch);
        assert!(ClockEpoch::parse_at("o", &json, 6).is_err());
    }

    #[test]
    fn archive_manifest_records_encryption_and_refuses_mixing() {
        use crate::crypto::{ArchiveKey, KEY_BYTES};
        let keys = Keyring::new(vec![ArchiveKey::from_bytes(&[1; KEY_BYTES])]);
        let other = Keyring::new(vec![ArchiveKey::from_bytes(&[2; KEY_BYTES])]);
        let none = Keyring::default();

        // A manifest written before encryption existed reads as plaintext.
        let old = br#"{"format":"etcd-pitr","version":1,"created_ms":5}"#;
        let plain = ArchiveManifest::parse("m", old).unwrap();
        assert_eq!(plain, ArchiveManifest::new(5, &none));
        assert!(!serde_json::to_string(&plain)
            .unwrap()
            .contains("encryption"));
        plain.check_keys(&none).unwrap();
        let err = plain.check_keys(&keys).unwrap_err();
        assert!(
            matches!(err, CryptoError::ArchiveNotEncrypted { .. }),
            "{err}"
        );

        let sealed = ArchiveManifest::new(5, &keys);
        let json = serde_json::to_vec(&sealed).unwrap();
        let sealed = ArchiveManifest::parse("m", &json).unwrap();
        sealed.check_keys(&keys).unwrap();
        // Another key may be a rotation: objects are checked one by one.
        sealed.check_keys(&other).unwrap();
        let err = sealed.check_keys(&none).unwrap_err();
        let id = keys.ids()[0].to_string();
        assert!(err.to_string().contains(&id), "{err}");
        let mut future = sealed.clone();
        future.encryption.as_mut().unwrap().scheme = "rot13".into();
        let err = future.check_keys(&keys).unwrap_err();
        assert!(
            matches!(err, CryptoError::UnsupportedScheme { .. }),
            "{err}"
        );
    }
}
