//! Whether to continue the archive's newest generation on the cluster as it
//! is now, and starting a new one when not.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use etcd_client::Client;
use etcdpitr_common::catalog::Catalog;
use etcdpitr_common::hashchain::{self, Digest};
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::manifest::{GapStart, GenerationManifest, LineageFingerprint, StartReason};
use etcdpitr_common::segment::RevisionRecord;
use etcdpitr_common::store::{Archive, StoreError};
use etcdpitr_common::Revision;

use crate::etcd::{self, ClusterInfo, Lineage};
use crate::lineage;

/// What the archive knows about the end of the generation being continued,
/// to check the cluster's history against.
#[derive(Clone, Copy)]
pub struct Resume<'a> {
    /// The generation's manifest.
    pub manifest: &'a GenerationManifest,
    /// Its last archived revision.
    pub last_revision: Revision,
    /// That revision's events, if archived.
    pub last_record: Option<&'a RevisionRecord>,
    /// Its newest lineage fingerprint.
    pub fingerprint: Option<LineageFingerprint>,
}

/// Decides whether the newest generation can be continued on this cluster.
/// Returns the reason for a new generation, or `None` to resume.
///
/// # Errors
/// etcd failures (the caller retries).
pub async fn must_start_generation(
    client: &mut Client,
    info: ClusterInfo,
    resume: Option<Resume<'_>>,
) -> anyhow::Result<Option<(StartReason, String)>> {
    let Some(resume) = resume else {
        return Ok(Some((StartReason::NewArchive, "first generation".into())));
    };
    let last_revision = resume.last_revision;
    if resume.manifest.cluster_id != info.cluster_id {
        return Ok(Some((
            StartReason::ClusterChanged,
            format!(
                "cluster ID changed from {:x} to {:x}",
                resume.manifest.cluster_id, info.cluster_id
            ),
        )));
    }
    if info.revision < last_revision {
        return Ok(Some((
            StartReason::LineageBroken,
            format!(
                "cluster is at revision {}, behind the archive's {last_revision} (was it restored?)",
                info.revision
            ),
        )));
    }
    let mut record_checked = false;
    if let Some(record) = resume.last_record {
        match etcd::check_lineage(client, record).await? {
            Lineage::Same => record_checked = true,
            Lineage::Diverged(detail) => return Ok(Some((StartReason::LineageBroken, detail))),
            Lineage::Compacted => {
                return Ok(Some((
                    StartReason::Compacted,
                    format!("revision {last_revision} was compacted before it could be re-checked"),
                )))
            }
        }
    }
    match resume.fingerprint {
        Some(fingerprint) => match lineage::check(client, &fingerprint).await? {
            lineage::Verdict::Same => {}
            lineage::Verdict::Differs(detail) => {
                return Ok(Some((StartReason::LineageBroken, detail)))
            }
            lineage::Verdict::Unverifiable(detail) if !record_checked => {
                return Ok(Some((
                    StartReason::LineageBroken,
                    format!("cannot prove the cluster's history is the archived one: {detail}"),
                )))
            }
            lineage::Verdict::Unverifiable(detail) => {
                tracing::info!(%detail, "lineage fingerprint not comparable; the last revision's events matched");
            }
        },
        None if !record_checked && last_revision > resume.manifest.start_revision => {
            // Revisions were archived but neither a record nor a fingerprint
            // can be read back: never continue blind.
            return Ok(Some((
                StartReason::LineageBroken,
                format!("cannot prove the cluster's history matches the archive at revision {last_revision}"),
            )));
        }
        None => {}
    }
    Ok(None)
}

/// Another archiver created the generation first: this one was deposed
/// (or raced a writer that ran without an election).
#[derive(Debug, thiserror::Error)]
#[error("generation {0} was started by another archiver")]
pub struct GenerationTaken(pub GenerationId);

/// A new generation to start.
pub struct NewGeneration {
    /// Its id: one past every generation directory in the archive.
    pub id: GenerationId,
    /// Where the generation it follows ended.
    pub previous: Option<GapStart>,
    /// The writer term starting it (0 without an election).
    pub term: u64,
    /// When it starts (Unix ms): the anchored clock's time when a running
    /// archiver starts it, so that `--time` compares it with observed
    /// times on one clock.
    pub started_ms: i64,
    /// Why.
    pub reason: StartReason,
    /// Detail of why.
    pub detail: String,
    /// The hash-chain head of the generation it follows, if any.
    pub previous_digest: Option<Digest>,
}

/// Writes the manifest of a new generation; returns it and its digest
/// (the generation's anchor in the hash chain).
///
/// # Errors
/// [`GenerationTaken`] if the id is taken; store failures.
pub async fn start_generation(
    archive: &Archive,
    catalog: &Arc<Mutex<Catalog>>,
    new: NewGeneration,
    info: ClusterInfo,
) -> anyhow::Result<(GenerationManifest, Digest)> {
    let NewGeneration {
        id,
        previous,
        term,
        started_ms,
        reason,
        detail,
        previous_digest,
    } = new;
    let manifest = GenerationManifest {
        generation: id,
        cluster_id: info.cluster_id,
        start_revision: info.revision,
        started_ms,
        reason,
        previous,
        detail,
        term,
        previous_digest: previous_digest.as_ref().map(hashchain::hex),
    };
    let key = layout::generation_manifest_key(id);
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    let anchor = hashchain::anchor(&json);
    match archive.put_once(&key, Bytes::from(json)).await {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => return Err(GenerationTaken(id).into()),
        Err(e) => return Err(anyhow::Error::from(e).context(format!("write {key}"))),
    }
    catalog
        .lock()
        .expect("catalog lock")
        .put_generation(&manifest)?;
    if let Some(p) = previous {
        tracing::warn!(
            generation = %id,
            gap_after = p.last_revision,
            resumes_at = info.revision,
            reason = ?reason,
            detail = %manifest.detail,
            "started a new generation: revisions between the generations are not archived"
        );
    } else {
        tracing::info!(generation = %id, start_revision = info.revision, "started the first generation");
    }
    Ok((manifest, anchor))
}
