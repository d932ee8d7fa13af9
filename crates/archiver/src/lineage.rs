//! Lineage fingerprints: etcd's `HashKV` at a base snapshot's revision,
//! written to the archive when the snapshot is taken (before the snapshot
//! itself is uploaded) and asked again on every reconnect.
//!
//! A source restored underneath the archiver (same cluster ID, revisions
//! reused) answers differently for the same revision, so a generation is
//! never continued on another history even when it holds no revision
//! record yet (a quiet cluster). Hashes are only comparable at the same
//! compaction revision; when etcd compacted in between, the check says it
//! cannot tell, and the caller relies on the last revision's events or
//! starts a new generation.

use anyhow::Context;
use bytes::Bytes;
use etcd_client::Client;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::listing::list_generation_dir;
use etcdpitr_common::manifest::LineageFingerprint;
use etcdpitr_common::store::Archive;
use etcdpitr_common::{now_ms, Revision};

/// What the cluster answers for a recorded fingerprint.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Same hash at the same compaction revision: the same history.
    Same,
    /// Another hash at the same compaction revision: another history.
    Differs(String),
    /// The cluster compacted since, so the hashes cannot be compared.
    Unverifiable(String),
}

/// The cluster's `HashKV` at `revision`.
enum HashAt {
    Hash {
        hash: u32,
        compact_revision: Revision,
    },
    Compacted,
    Future,
}

async fn hash_at(client: &mut Client, revision: Revision) -> anyhow::Result<HashAt> {
    match client.maintenance_client().hash_kv(revision).await {
        Ok(r) => Ok(HashAt::Hash {
            hash: r.hash(),
            compact_revision: r.compact_version(),
        }),
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {
            Ok(HashAt::Compacted)
        }
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("future revision") => {
            Ok(HashAt::Future)
        }
        Err(e) => Err(e).with_context(|| format!("ask etcd for HashKV at revision {revision}")),
    }
}

/// Asks the cluster for its `HashKV` at `revision` (a snapshot just taken)
/// and writes the fingerprint to the archive. `None` when etcd compacted
/// past the revision meanwhile (a long snapshot of a large database): the
/// snapshot is still a valid base, only without a fingerprint of its own.
///
/// # Errors
/// etcd or store failures; a revision the member asked has not applied.
pub async fn record(
    client: &mut Client,
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
) -> anyhow::Result<Option<LineageFingerprint>> {
    let (hash, compact_revision) = match hash_at(client, revision).await? {
        HashAt::Hash {
            hash,
            compact_revision,
        } => (hash, compact_revision),
        HashAt::Compacted => {
            tracing::warn!(
                revision,
                "etcd compacted past the snapshot's revision before its HashKV could be asked; archiving the snapshot without a lineage fingerprint"
            );
            return Ok(None);
        }
        HashAt::Future => {
            anyhow::bail!("the etcd member asked has not applied revision {revision} yet")
        }
    };
    let fingerprint = LineageFingerprint {
        revision,
        hash,
        compact_revision,
        taken_ms: now_ms(),
    };
    let key = layout::lineage_key(generation, revision);
    let json = serde_json::to_vec_pretty(&fingerprint).expect("fingerprint serializes");
    match archive.put_once(&key, Bytes::from(json)).await {
        Ok(()) => Ok(Some(fingerprint)),
        // Another writer recorded this revision first (its `taken_ms`
        // differs): keep theirs if it states the same hash.
        Err(etcdpitr_common::store::StoreError::Conflict(_)) => {
            let theirs = newest_at(archive, generation, revision).await?;
            match theirs {
                Some(f) if (f.hash, f.compact_revision) == (hash, compact_revision) => Ok(Some(f)),
                _ => anyhow::bail!("{key} already records another hash for revision {revision}"),
            }
        }
        Err(e) => Err(anyhow::Error::from(e).context(format!("write {key}"))),
    }
}

async fn newest_at(
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
) -> anyhow::Result<Option<LineageFingerprint>> {
    let key = layout::lineage_key(generation, revision);
    match archive.get_opt(&key).await? {
        Some(bytes) => Ok(Some(LineageFingerprint::parse_at(&key, &bytes, revision)?)),
        None => Ok(None),
    }
}

/// The generation's newest fingerprint at or below `at_most`, if any.
///
/// # Errors
/// Store failures or an unreadable fingerprint object.
pub async fn newest(
    archive: &Archive,
    generation: GenerationId,
    at_most: Revision,
) -> anyhow::Result<Option<LineageFingerprint>> {
    let newest = list_generation_dir(archive, generation, "lineage")
        .await
        .with_context(|| format!("list {}/lineage", generation.dir_name()))?
        .into_iter()
        .filter_map(|o| match o {
            layout::GenerationObject::Lineage(rev) => Some(rev),
            _ => None,
        })
        .filter(|&rev| rev <= at_most)
        .max();
    match newest {
        Some(rev) => newest_at(archive, generation, rev).await,
        None => Ok(None),
    }
}

/// Asks the cluster again for a recorded fingerprint's revision.
///
/// # Errors
/// etcd failures.
pub async fn check(
    client: &mut Client,
    fingerprint: &LineageFingerprint,
) -> anyhow::Result<Verdict> {
    let rev = fingerprint.revision;
    Ok(match hash_at(client, rev).await? {
        // The caller has already read (linearizably) that the cluster is at
        // or past this revision: a member that has not applied it yet is
        // lagging, which a retry outlives; it is no proof of another history.
        HashAt::Future => anyhow::bail!(
            "the etcd member asked has not applied revision {rev} yet; asking again"
        ),
        HashAt::Compacted => Verdict::Unverifiable(format!(
            "revision {rev} (a base snapshot) was compacted, so its HashKV cannot be asked again"
        )),
        HashAt::Hash {
            hash,
            compact_revision,
        } if compact_revision == fingerprint.compact_revision => {
            if hash == fingerprint.hash {
                Verdict::Same
            } else {
                Verdict::Differs(format!(
                    "HashKV at revision {rev} is {hash:08x}, the archive recorded {:08x}: the cluster holds another history (was it restored?)",
                    fingerprint.hash
                ))
            }
        }
        HashAt::Hash {
            compact_revision, ..
        } => Verdict::Unverifiable(format!(
            "the cluster compacted (to revision {compact_revision}, was {}) since HashKV at revision {rev} was recorded",
            fingerprint.compact_revision
        )),
    })
}
