//! Shared parts of etcd-pitr: what an archive looks like and how to read it.
//!
//! - [`layout`]: object names (generations, snapshots, segments), strict parsing.
//! - [`segment`]: the segment byte format (records, zstd body, blake3 trailer).
//! - [`snapshot`]: the snapshot object format (header + zstd of the bbolt file).
//! - [`manifest`]: the archive and generation manifests.
//! - [`listing`]: an archive's listing turned into generations.
//! - [`chain`]: the chain rules: links, gaps, overlaps, restorable ranges.
//! - [`store`]: archive URLs, object access, write-once puts.
//! - [`crypto`]: encryption at rest: keys and the sealed-object envelope.
//! - [`catalog`]: the local SQLite catalog (a cache of the store).
//! - [`bbolt`]: a read-only bbolt reader (snapshot revision, bucket walks).
//! - [`cli`]: logging, runtime and exit codes shared by the binaries.

pub mod bbolt;
pub mod catalog;
pub mod chain;
pub mod cli;
pub mod crypto;
pub mod layout;
pub mod listing;
pub mod manifest;
pub mod segment;
pub mod snapshot;
pub mod store;

/// An etcd revision (main revision number).
pub type Revision = i64;

/// Current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
