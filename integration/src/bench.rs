//! What the benchmarks share: a large archive made by the real archiver
//! from a real etcd, and timing a command with GNU `time -v`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use etcd_client::{Txn, TxnOp};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::store::Archive;

use crate::{
    archiver_args, current_revision, wait_archived, ArchiverProcess, EtcdCluster, EtcdVersion, Rng,
};

/// Keys loaded before the archiver starts (all in its base snapshot).
pub const BENCH_BASE_KEYS: usize = 100_000;
/// Concurrent writers of the revisions after the base snapshot.
const WRITERS: u64 = 64;

/// The name of base key `i`.
pub fn bench_key(i: usize) -> String {
    format!("/base/{i:06}")
}

/// A large archive: [`BENCH_BASE_KEYS`] keys of 100-byte values in the base
/// snapshot, then at least the asked number of revisions written by 64
/// writers (95 % puts of 100-byte values to random base keys, 5 % deletes).
pub struct BenchArchive {
    /// The source etcd (still running).
    pub source: EtcdCluster,
    /// Temporary directory holding the archive (removed on drop).
    pub tmp: tempfile::TempDir,
    /// `file://` URL of the archive.
    pub url: String,
    /// The archive.
    pub archive: Archive,
    /// The base snapshot's revision.
    pub base: i64,
    /// The last archived revision.
    pub last: i64,
}

impl BenchArchive {
    /// Builds the archive (the archiver is stopped when it returns).
    ///
    /// # Errors
    /// etcd, archiver or store failures.
    pub async fn build(revisions: u64) -> anyhow::Result<Self> {
        let source = EtcdCluster::start(EtcdVersion::V35, 1).await?;
        let mut client = source.client().await?;
        let tmp = tempfile::tempdir()?;
        let url = format!("file://{}/archive", tmp.path().display());

        eprintln!("loading {BENCH_BASE_KEYS} base keys");
        let value = vec![b'v'; 100];
        for chunk in (0..BENCH_BASE_KEYS).collect::<Vec<_>>().chunks(128) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|&i| TxnOp::put(bench_key(i), value.clone(), None))
                .collect();
            client.txn(Txn::new().and_then(ops)).await?;
        }
        let args = archiver_args(&source.endpoints(), &url, &tmp.path().join("data"), &[]);
        let mut archiver = ArchiverProcess::start(&args, &[], &tmp.path().join("archiver.log"))?;
        let archive = Archive::open(&url)?;
        while ArchiveListing::load(&archive)
            .await?
            .generations
            .first()
            .is_none_or(|g| g.snapshots.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        eprintln!("writing {revisions} revisions with {WRITERS} writers");
        let goal = current_revision(&mut client).await? + revisions as i64;
        let reached = Arc::new(AtomicI64::new(0));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let mut c = source.client().await?;
            let reached = reached.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng::new(w + 1);
                while reached.load(Ordering::Relaxed) < goal {
                    let key = bench_key(rng.below(BENCH_BASE_KEYS as u64) as usize);
                    let header = if rng.below(20) == 0 {
                        c.delete(key, None)
                            .await
                            .map(|r| r.header().map(etcd_client::ResponseHeader::revision))
                    } else {
                        c.put(key, rng.bytes(100), None)
                            .await
                            .map(|r| r.header().map(etcd_client::ResponseHeader::revision))
                    };
                    reached.fetch_max(header.expect("write").unwrap_or(0), Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let last = current_revision(&mut client).await?;
        wait_archived(&url, 1, last, Duration::from_mins(5)).await?;
        archiver.terminate(Duration::from_mins(1))?;
        let listing = ArchiveListing::load(&archive).await?;
        let base = listing.generations[0].snapshots[0];
        Ok(Self {
            source,
            tmp,
            url,
            archive,
            base,
            last,
        })
    }
}

/// What GNU `time -v` measured of one command.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Wall-clock seconds.
    pub wall_secs: f64,
    /// Peak resident set size in MiB.
    pub peak_rss_mib: f64,
}

/// Runs `program args` under `/usr/bin/time -v` with its stdout written to
/// `stdout`; it must succeed.
///
/// # Errors
/// If it cannot run or fails.
pub fn timed(program: &Path, args: &[&str], stdout: &Path) -> anyhow::Result<Timing> {
    let report_path = stdout.with_extension("time");
    let status = Command::new("/usr/bin/time")
        .args(["-v", "-o", &report_path.display().to_string()])
        .arg(program)
        .args(args)
        .stdout(Stdio::from(std::fs::File::create(stdout)?))
        .status()
        .context("run /usr/bin/time (Debian package `time`)")?;
    anyhow::ensure!(status.success(), "{} {args:?} failed", program.display());
    let report = std::fs::read_to_string(&report_path)?;
    let field = |name: &str| -> String {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss):");
    let wall_secs: f64 = wall
        .rsplit(':')
        .enumerate()
        .map(|(i, p)| p.parse::<f64>().unwrap_or(0.0) * 60f64.powi(i as i32))
        .sum();
    let peak_rss_mib = field("Maximum resident set size (kbytes):")
        .parse::<f64>()
        .unwrap_or(0.0)
        / 1024.0;
    Ok(Timing {
        wall_secs,
        peak_rss_mib,
    })
}

/// Peak resident set size of a process in MiB (`VmHWM`, what GNU time
/// reports as its maximum resident set size).
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
