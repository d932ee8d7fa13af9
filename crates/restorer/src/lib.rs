//! etcd-restorer: lists archives made by etcd-archiver and restores them to
//! any archived revision or moment, by native snapshot synthesis.
//!
//! - [`point`]: revisions and moments as flags name them (one time parser),
//!   placed on a revision; when an archive is current.
//! - [`plan`]: which base snapshot and segments serve a target or a span (pure).
//! - [`source`]: verified reads of snapshots and segments; `--time` placement.
//! - [`bolt_writer`]: a streaming bbolt file writer.
//! - [`synth`]: the restored etcd snapshot file, and its read-back check.
//! - [`next_steps`]: the `snapshot restore` commands and Kubernetes advice
//!   printed after a restore.
//! - [`diff`]: the difference between two points from the keys a span touched (pure).
//! - [`commands`]: `list`, `restore`, `export`, `verify`, `history`, `diff`
//!   and `follow` as the binary runs them.
//!
//! Exit codes are part of the interface; see [`ExitKind`].

pub mod bolt_writer;
pub mod commands;
pub mod diff;
pub mod next_steps;
pub mod plan;
pub mod point;
pub mod source;
pub mod synth;

use etcdpitr_common::crypto::{self, CryptoFault};
use etcdpitr_common::errors;
use etcdpitr_common::store::StoreError;

/// Failure classes with distinct, documented exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// 1: anything else (local I/O such as a full disk, …).
    Other = 1,
    /// 2: usage or configuration error, including the store settings a
    /// [`Hint`] names (plain HTTP not allowed, a missing bucket, rejected
    /// credentials, a missing permission).
    Usage = 2,
    /// 3: the target is not restorable from this archive.
    NotRestorable = 3,
    /// 4: an archive object failed its integrity check.
    Integrity = 4,
    /// 5: the store could not be reached (or failed otherwise, not for
    /// one of its settings).
    StoreUnreachable = 5,
    /// 6: `follow`'s destination is not the archive's history (refused
    /// before writing, or written to by someone else while followed).
    Diverged = 6,
}

/// Classifies an error chain into an exit code (the table in
/// docs/exit-codes.md).
pub fn classify(error: &anyhow::Error) -> ExitKind {
    use etcdpitr_common::listing::ListingError;
    // A store setting to fix, whatever the step that met it.
    if errors::is_store_setting(error) {
        return ExitKind::Usage;
    }
    for cause in error.chain() {
        if cause.is::<plan::PlanError>() || cause.is::<commands::ArchiveEnds>() {
            return ExitKind::NotRestorable;
        }
        if cause.is::<commands::Diverged>() {
            return ExitKind::Diverged;
        }
        if cause.is::<UsageError>() {
            return ExitKind::Usage;
        }
        if cause.is::<VerifyFailed>() {
            return ExitKind::Integrity;
        }
        if is_local_io(cause) {
            return ExitKind::Other;
        }
        if cause.is::<etcdpitr_common::chain::IntegrityError>()
            || cause.is::<diff::MissingBefore>()
            || cause.is::<etcdpitr_common::segment::SegmentError>()
            || cause.is::<etcdpitr_common::snapshot::SnapshotError>()
            || cause.is::<etcdpitr_common::manifest::ManifestError>()
            || cause.is::<etcdpitr_common::bbolt::BoltError>()
        {
            return ExitKind::Integrity;
        }
        // Before the store and listing errors that may wrap one.
        match crypto::fault_of(cause) {
            Some(CryptoFault::WrongKeys) => return ExitKind::Usage,
            Some(CryptoFault::Damaged) => return ExitKind::Integrity,
            None => {}
        }
        if let Some(e) = cause.downcast_ref::<StoreError>() {
            return store_kind(e);
        }
        // `ListingError` is transparent: its source skips the store error.
        if let Some(e) = cause.downcast_ref::<ListingError>() {
            return match e {
                ListingError::Store(e) => store_kind(e),
                ListingError::Manifest(_) => ExitKind::Integrity,
                // Classified by `crypto::fault_of` above.
                ListingError::Keys(_) => ExitKind::Usage,
            };
        }
    }
    ExitKind::Other
}

/// A local file's I/O failure (disk full, permissions) reported inside an
/// error type that otherwise means a damaged archive object. A short read
/// or undecodable data is still the object's fault.
fn is_local_io(cause: &(dyn std::error::Error + 'static)) -> bool {
    use etcdpitr_common::{bbolt::BoltError, snapshot::SnapshotError};
    let ((Some(BoltError::Io(io)), _) | (_, Some(SnapshotError::Io { source: io, .. }))) = (
        cause.downcast_ref::<BoltError>(),
        cause.downcast_ref::<SnapshotError>(),
    ) else {
        return false;
    };
    !matches!(
        io.kind(),
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
    )
}

fn store_kind(e: &StoreError) -> ExitKind {
    match e {
        StoreError::InvalidUrl { .. } | StoreError::Credentials { .. } => ExitKind::Usage,
        // A crypto error was classified by `crypto::fault_of` first (key
        // problems are usage); what reaches here is a damaged object.
        StoreError::NotFound(_) | StoreError::Conflict(_) | StoreError::Crypto(_) => {
            ExitKind::Integrity
        }
        StoreError::Backend(_) | StoreError::NoWriteOnce { .. } => ExitKind::StoreUnreachable,
        StoreError::Io(_) => ExitKind::Other,
    }
}

/// `verify` found problems (each already printed).
#[derive(Debug, thiserror::Error)]
#[error("the archive has {0} problems")]
pub struct VerifyFailed(pub usize);

/// A usage error detected after flag parsing (e.g. a bad time).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Formats Unix milliseconds as RFC 3339 (UTC, milliseconds).
pub fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || format!("{ms} ms"),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )
}
