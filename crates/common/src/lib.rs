//! Shared parts of etcd-pitr: what an archive looks like and how to read it.
//!
//! - [`layout`]: object names (generations, snapshots, segments), strict parsing.
//! - [`segment`]: the segment byte format (records, zstd body, blake3 trailer).
//! - [`snapshot`]: the snapshot object format (header + zstd of the bbolt file).
//! - [`manifest`]: the archive and generation manifests.
//! - [`listing`]: an archive's listing turned into generations.
//! - [`chain`]: the chain rules: links, gaps, overlaps, restorable ranges.
//! - [`retention`]: which restore points a policy keeps, what a prune deletes.
//! - [`prune`]: carrying out a retention plan, crash-safe.
//! - [`progress`]: progress of long steps: a bar on a terminal, log lines otherwise.
//! - [`relay`]: a long pass over a stream split between two threads.
//! - [`hashchain`]: tamper evidence: the links between objects, and their proof.
//! - [`store`]: archive URLs, object access, write-once puts.
//! - [`object_lock`]: S3 Object Lock (upload checksums, reading retentions).
//! - [`crypto`]: encryption at rest: keys and the sealed-object envelope.
//! - [`etcd`]: connecting to etcd (endpoints, TLS, credentials), error classes.
//! - [`catalog`]: the local SQLite catalog (a cache of the store).
//! - [`bbolt`]: a read-only bbolt reader (snapshot revision, bucket walks).
//! - `testing` (feature `testing`): a fault-injecting in-memory store.
//! - [`metrics`]: a Prometheus endpoint.
//! - [`cli`]: logging, runtime and exit codes shared by the binaries.
//! - [`errors`]: errors on one line, each cause once; hints for common mistakes.
//! - [`settings`]: durations, sizes and defaults of flags, env and config files.

pub mod bbolt;
pub mod catalog;
pub mod chain;
pub mod cli;
pub mod crypto;
pub mod errors;
pub mod etcd;
pub mod hashchain;
pub mod layout;
pub mod listing;
pub mod manifest;
pub mod metrics;
pub mod object_lock;
pub mod progress;
pub mod prune;
pub mod relay;
pub mod retention;
pub mod segment;
pub mod settings;
pub mod snapshot;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// An etcd revision (main revision number).
pub type Revision = i64;

/// Current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
