//! Carrying out a retention plan ([`crate::retention`]) on an archive.
//!
//! Order makes it crash-safe: the retention records of every range to be
//! deleted are written (write-once) before the first deletion, then
//! objects go oldest first. Interrupted at any moment, the archive restores
//! every kept point and counts its holes as pruned; the next run finishes
//! the job. Objects are only ever deleted from the listing the plan was
//! made from, and the plan always keeps the archive's head, so a running
//! archiver (which only appends after its head) never loses what it needs.
//!
//! An object under S3 Object Lock (a retain-until date still ahead, or a
//! legal hold) is not deleted: on a versioned bucket the deletion would
//! only hide it behind a delete marker while its data stays. When the
//! bucket has Object Lock, each object is asked before its deletion (one
//! `HEAD`; a bucket without Object Lock costs one request per prune). A
//! locked object is reported with its lock and stays; a later prune, once
//! the date has passed, deletes it. A store that refuses a deletion (a
//! bucket policy) does not fail the prune either: the object is reported
//! and stays, and a later run tries again. Either way the archive stays
//! sound: a leftover object inside a pruned range is harmless.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::chain::IntegrityError;
use crate::layout::{self, GenerationId, GenerationObject, PrunedRange};
use crate::listing::{ArchiveListing, ListingError};
use crate::manifest::PruneRecord;
use crate::object_lock::Retention;
use crate::progress::{Mode, Progress, Unit};
use crate::retention::{self, Policy, PrunePlan};
use crate::snapshot::HeaderReadError;
use crate::store::{Archive, StoreError};
use crate::Revision;

/// Snapshot headers read at once.
const HEADER_READS_IN_FLIGHT: usize = 16;
/// Deletions (each with its Object Lock lookup) in flight.
const DELETES_IN_FLIGHT: usize = 16;

/// Errors of a prune.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// Listing the archive failed.
    #[error(transparent)]
    Listing(#[from] ListingError),
    /// The store failed (other than refusing a deletion).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A snapshot's header is damaged or does not match its name.
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
}

impl From<HeaderReadError> for PruneError {
    fn from(e: HeaderReadError) -> Self {
        match e {
            HeaderReadError::Store(e) => Self::Store(e),
            HeaderReadError::Integrity(e) => Self::Integrity(e),
        }
    }
}

/// An object the store refused to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Archive-relative key.
    pub object: String,
    /// The store's answer.
    pub reason: String,
}

/// An object left in place because it is under S3 Object Lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retained {
    /// Archive-relative key.
    pub object: String,
    /// Its lock (mode and retain-until date, legal hold).
    pub retention: Retention,
}

/// What a prune planned and did.
#[derive(Clone, Debug)]
pub struct PruneReport {
    /// The policy applied.
    pub policy: Policy,
    /// The plan.
    pub plan: PrunePlan,
    /// Whether deletions were carried out (`false`: a dry run).
    pub confirmed: bool,
    /// Objects deleted.
    pub deleted: usize,
    /// Objects the store refused to delete (or to tell its Object Lock);
    /// a later run tries again.
    pub refused: Vec<Refused>,
    /// Objects still under Object Lock, left in place; a later run deletes
    /// each once its lock has expired.
    pub retained: Vec<Retained>,
}

/// Plans a prune of `archive` under `policy` and, when `confirm`, carries
/// it out, showing the deletions (objects) per `progress`.
///
/// # Errors
/// Listing, store or snapshot-header failures. A store's refusal to delete
/// one object is not an error, nor is a lock on it: see
/// [`PruneReport::refused`] and [`PruneReport::retained`].
pub async fn prune(
    archive: &Archive,
    policy: &Policy,
    confirm: bool,
    progress: Mode,
) -> Result<PruneReport, PruneError> {
    let listing = ArchiveListing::load(archive).await?;
    let times = if policy.needs_snapshot_times() {
        snapshot_times(archive, &listing).await?
    } else {
        BTreeMap::new()
    };
    let plan = retention::plan(&listing, policy, &times);
    let mut report = PruneReport {
        policy: policy.clone(),
        plan,
        confirmed: confirm,
        deleted: 0,
        refused: Vec::new(),
        retained: Vec::new(),
    };
    if !confirm {
        return Ok(report);
    }
    let planned_ms = crate::now_ms();
    for &(generation, range) in &report.plan.records {
        let record = PruneRecord {
            first: range.first,
            last: range.last,
            pruned_ms: planned_ms,
            policy: policy.to_string(),
            cut_digests: cut_digests(archive, &report.plan, generation, range).await?,
        };
        let bytes = serde_json::to_vec_pretty(&record).expect("a record serializes");
        match archive
            .put_once(&layout::pruned_key(generation, &range), Bytes::from(bytes))
            .await
        {
            // Another prune recorded the same range first.
            Ok(()) | Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let ask_locks = archive.object_lock_enabled().await?;
    let deleting = Progress::new(
        progress,
        "delete pruned objects",
        Unit::Items("objects"),
        Some(report.plan.delete.len() as u64),
    );
    let mut results = futures::stream::iter(report.plan.delete.clone().into_iter().map(
        |key| async move {
            let result = delete_unless_locked(archive, &key, ask_locks, planned_ms).await;
            (key, result)
        },
    ))
    .buffered(DELETES_IN_FLIGHT);
    while let Some((key, result)) = results.next().await {
        deleting.inc(1);
        match result {
            Ok(None) => report.deleted += 1,
            Ok(Some(retention)) => report.retained.push(Retained {
                object: key,
                retention,
            }),
            Err(e) if refuses_deletion(&e) => report.refused.push(Refused {
                object: key,
                reason: e.to_string(),
            }),
            Err(e) => return Err(e.into()),
        }
    }
    deleting.finish();
    Ok(report)
}

/// The digests of the segments the plan deletes that end at `range.last`
/// (see [`crate::hashchain`]): one of them is the predecessor of the first
/// segment after the range. Read before anything is deleted.
async fn cut_digests(
    archive: &Archive,
    plan: &PrunePlan,
    generation: GenerationId,
    range: PrunedRange,
) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for key in &plan.delete {
        match layout::classify(key) {
            Some((g, GenerationObject::Segment(n))) if g == generation && n.last == range.last => {
                match archive.get(key).await {
                    Ok(bytes) => out.push(crate::hashchain::hex(&crate::segment::digest(&bytes))),
                    // Another prune deleted it, after recording this range.
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Deletes `key` unless (with `ask_locks`) an Object Lock holds it at
/// `now_ms`; returns that lock when it does.
async fn delete_unless_locked(
    archive: &Archive,
    key: &str,
    ask_locks: bool,
    now_ms: i64,
) -> Result<Option<Retention>, StoreError> {
    if ask_locks {
        if let Some(lock) = archive.retention(key).await? {
            if lock.holds_at(now_ms) {
                return Ok(Some(lock));
            }
        }
    }
    archive.delete(key).await?;
    Ok(None)
}

/// Whether the store refused to delete (rather than failed to answer):
/// retrying now does not help, but a later prune may succeed.
fn refuses_deletion(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Backend(
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotSupported { .. }
        )
    )
}

/// Each live base snapshot's recorded time, read from its header (a ranged
/// read of the header alone).
async fn snapshot_times(
    archive: &Archive,
    listing: &ArchiveListing,
) -> Result<BTreeMap<(GenerationId, Revision), i64>, PruneError> {
    let wanted: Vec<(GenerationId, Revision)> = listing
        .generations
        .iter()
        .flat_map(|g| g.snapshots.iter().map(|&s| (g.generation(), s)))
        .collect();
    let read: Vec<Option<((GenerationId, Revision), i64)>> =
        futures::stream::iter(wanted.into_iter().map(|(g, s)| async move {
            match crate::snapshot::read_header(archive, g, s).await {
                Ok(header) => Ok(Some(((g, s), header.taken_ms))),
                // Deleted since the listing (another prune): no time, kept.
                Err(HeaderReadError::Store(StoreError::NotFound(_))) => Ok(None),
                Err(e) => Err(PruneError::from(e)),
            }
        }))
        .buffer_unordered(HEADER_READS_IN_FLIGHT)
        .try_collect()
        .await?;
    Ok(read.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests;
