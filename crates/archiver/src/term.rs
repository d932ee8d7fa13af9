//! Writer terms: each leadership claims the next term number in the
//! archive (write-once, so two writers never hold the same term) and marks
//! every generation it writes. A generation started by a writer whose term
//! is older than a marker in the generation it follows was started after
//! that writer had been deposed; the chain rules treat it as void.

use anyhow::Context;
use bytes::Bytes;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::manifest::TermRecord;
use etcdpitr_common::store::{Archive, StoreError};
use etcdpitr_common::{now_ms, Revision};

/// Attempts at claiming a term before giving up (each lost race means
/// another writer claimed one in between).
const CLAIM_ATTEMPTS: usize = 8;

/// Claims the next term for `holder`.
///
/// # Errors
/// Store failures, or too many lost races.
pub async fn claim(
    archive: &Archive,
    holder: &str,
    election_revision: Revision,
) -> anyhow::Result<TermRecord> {
    for _ in 0..CLAIM_ATTEMPTS {
        let newest = archive
            .list(layout::TERMS_DIR, None)
            .await
            .context("list writer terms")?
            .iter()
            .filter_map(|k| layout::parse_term_key(k))
            .max()
            .unwrap_or(0);
        let record = TermRecord {
            term: newest + 1,
            holder: holder.to_owned(),
            election_revision,
            claimed_ms: now_ms(),
        };
        let json = serde_json::to_vec_pretty(&record).expect("term serializes");
        match archive
            .put_once(&layout::term_key(record.term), Bytes::from(json))
            .await
        {
            Ok(()) => return Ok(record),
            Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(anyhow::Error::from(e).context("claim a writer term")),
        }
    }
    anyhow::bail!("could not claim a writer term: {CLAIM_ATTEMPTS} races lost")
}

/// Marks `generation` as written by `record`'s term from now on.
///
/// # Errors
/// Store failures.
pub async fn mark(
    archive: &Archive,
    generation: GenerationId,
    record: &TermRecord,
) -> anyhow::Result<()> {
    let key = layout::generation_term_key(generation, record.term);
    let json = serde_json::to_vec_pretty(record).expect("term serializes");
    archive
        .put_once(&key, Bytes::from(json))
        .await
        .with_context(|| format!("write {key}"))
}
