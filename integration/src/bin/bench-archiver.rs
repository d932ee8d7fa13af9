//! Archiver benchmark: etcd 3.5 (with fsync, as in production) under 64
//! concurrent writers of 1 KiB values while the release archiver archives it
//! into a local directory. Reports etcd's write rate, the archiver's CPU
//! time against etcd's, its peak RSS, and how long after a write it was
//! durable in the store.
//!
//! Usage: `bench-archiver [SECONDS] [--no-fsync]` (default 30 s, etcd with
//! fsync), after `cargo build --release --bins`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::store::Archive;
use integration::{archiver_args, peak_rss_mib, ArchiverProcess, EtcdCluster, EtcdVersion};

const WRITERS: usize = 64;
const VALUE_BYTES: usize = 1024;
const SEGMENT_MAX_AGE: &str = "2s";

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    ticks / 100.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).map_or(Ok(30), |s| s.parse())?;
    let fsync = std::env::args().nth(2).as_deref() != Some("--no-fsync");
    let cluster = EtcdCluster::start_with(EtcdVersion::V35, 1, fsync).await?;
    let etcd_pid = cluster.members[0].pid().expect("running");
    let tmp = tempfile::tempdir()?;
    let url = format!("file://{}/archive", tmp.path().display());
    let args = archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &["--segment-max-age", SEGMENT_MAX_AGE],
    );
    let mut archiver = ArchiverProcess::start(&args, &[], &tmp.path().join("archiver.log"))?;
    let archiver_pid = archiver.child.as_ref().expect("running").id();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let (etcd_cpu0, arch_cpu0) = (cpu_seconds(etcd_pid), cpu_seconds(archiver_pid));
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = cluster.client().await?;
        let (stop, puts) = (stop.clone(), puts.clone());
        writers.push(tokio::spawn(async move {
            let value = vec![b'x'; VALUE_BYTES];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client
                    .put(format!("/bench/{w}/{}", i % 1000), value.clone(), None)
                    .await
                    .is_ok()
                {
                    puts.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    // Durability probe: every 500 ms, a write's revision and when it returned;
    // a poller notes when the archive first holds it.
    let archive = Archive::open(&url)?;
    let mut probe = cluster.client().await?;
    let mut pending: Vec<(i64, Instant)> = Vec::new();
    let mut lags: Vec<f64> = Vec::new();
    let mut next_probe = Instant::now();
    let mut last_report = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) || !pending.is_empty() {
        if started.elapsed() >= Duration::from_secs(seconds) {
            stop.store(true, Ordering::Relaxed);
        }
        if !stop.load(Ordering::Relaxed) && Instant::now() >= next_probe {
            let resp = tokio::time::timeout(
                Duration::from_secs(10),
                probe.put("/bench/probe", "p", None),
            )
            .await
            .map_err(|_| anyhow::anyhow!("probe write timed out"))??;
            pending.push((
                resp.header()
                    .map_or(0, etcd_client::ResponseHeader::revision),
                Instant::now(),
            ));
            next_probe += Duration::from_millis(500);
        }
        let listing = tokio::time::timeout(Duration::from_secs(10), ArchiveListing::load(&archive))
            .await
            .map_err(|_| anyhow::anyhow!("archive listing timed out"))?;
        if let Ok(listing) = listing {
            let archived = listing
                .generations
                .last()
                .map_or(0, |g| g.chain().last_revision());
            pending.retain(|(rev, at)| {
                if *rev <= archived {
                    lags.push(at.elapsed().as_secs_f64());
                    false
                } else {
                    true
                }
            });
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "{:.0} s: {} puts, {} probes waiting for the archive",
                started.elapsed().as_secs_f64(),
                puts.load(Ordering::Relaxed),
                pending.len()
            );
        }
        if started.elapsed() > Duration::from_secs(seconds + 60) {
            anyhow::bail!("{} probe writes never reached the archive", pending.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let write_secs = seconds as f64;
    // Writers stopped at `stop`; one may still wait on an in-flight write.
    for w in writers {
        w.abort();
    }
    let (etcd_cpu, arch_cpu) = (
        cpu_seconds(etcd_pid) - etcd_cpu0,
        cpu_seconds(archiver_pid) - arch_cpu0,
    );
    let rss = peak_rss_mib(archiver_pid);
    archiver.terminate(Duration::from_secs(30))?;
    lags.sort_by(f64::total_cmp);
    let total = puts.load(Ordering::Relaxed);
    let p99 = lags[(lags.len() * 99 / 100).min(lags.len() - 1)];
    println!("etcd fsync: {fsync}");
    println!("| writers | puts/s | etcd CPU s | archiver CPU s | archiver/etcd CPU | archiver peak RSS MiB | durable lag p50 / p99 / max s (segment-max-age {SEGMENT_MAX_AGE}) |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {WRITERS} × 1 KiB | {:.0} | {etcd_cpu:.1} | {arch_cpu:.1} | {:.3} | {rss:.1} | {:.2} / {p99:.2} / {:.2} |",
        total as f64 / write_secs,
        arch_cpu / etcd_cpu,
        lags[lags.len() / 2],
        lags[lags.len() - 1]
    );
    Ok(())
}
