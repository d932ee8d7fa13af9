//! Restorer benchmark: an archive of a 100,000-key base snapshot plus at
//! least 1,000,000 revisions, made by the real archiver from a real etcd,
//! restored natively (time and peak RSS via GNU time); against a baseline
//! measured in the same run that replays the same revisions one transaction
//! at a time into a local etcd started with `--unsafe-no-fsync`.
//!
//! Usage: `bench-restorer [REVISIONS] [BASELINE_REVISIONS]` (defaults
//! 1000000 and 30000), after `cargo build --release --bins`.

use std::process::Command;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Txn, TxnOp};
use etcdpitr_common::layout;
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::segment::{self, EventKind, Record};
use etcdpitr_common::store::Archive;
use integration::{
    archiver_args, binary, current_revision, wait_archived, ArchiverProcess, EtcdCluster,
    EtcdVersion, Rng,
};

const BASE_KEYS: usize = 100_000;
const WRITERS: u64 = 64;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let revisions: u64 = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let baseline_revisions: usize = args.next().map_or(Ok(30_000), |s| s.parse())?;
    let source = EtcdCluster::start(EtcdVersion::V35, 1).await?;
    let mut client = source.client().await?;
    let tmp = tempfile::tempdir()?;
    let url = format!("file://{}/archive", tmp.path().display());

    eprintln!("loading {BASE_KEYS} base keys");
    let value = vec![b'v'; 100];
    for chunk in (0..BASE_KEYS).collect::<Vec<_>>().chunks(128) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| TxnOp::put(format!("/base/{i:06}"), value.clone(), None))
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
                let key = format!("/base/{:06}", rng.below(BASE_KEYS as u64));
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
    let generation = &listing.generations[0];
    let base = generation.snapshots[0];

    eprintln!("restoring revision {last} from base {base}");
    let out = tmp.path().join("restored.db");
    let timing = tmp.path().join("time.txt");
    let status = Command::new("/usr/bin/time")
        .args(["-v", "-o", &timing.display().to_string()])
        .arg(binary("etcd-restorer"))
        .args([
            "restore",
            "--archive",
            &url,
            "--revision",
            &last.to_string(),
            "--output",
            &out.display().to_string(),
        ])
        .status()
        .context("run /usr/bin/time (Debian package `time`)")?;
    anyhow::ensure!(status.success(), "restore failed");
    let report = std::fs::read_to_string(&timing)?;
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
    let rss_mib = field("Maximum resident set size (kbytes):")
        .parse::<f64>()
        .unwrap_or(0.0)
        / 1024.0;
    let replayed = (last - base) as f64;

    eprintln!("baseline: replaying {baseline_revisions} revisions one transaction at a time");
    let target = EtcdCluster::start(EtcdVersion::V35, 1).await?;
    let mut tc = target.client().await?;
    let mut sent = 0usize;
    let started = Instant::now();
    'outer: for name in &generation.segments {
        let key = layout::segment_key(generation.generation(), name);
        let bytes = archive.get(&key).await?;
        let (_, records) = segment::decode_all(&key, &bytes)?;
        for record in records {
            let Record::Revision(r) = record else {
                continue;
            };
            if r.revision <= base {
                continue;
            }
            let ops: Vec<TxnOp> = r
                .events
                .iter()
                .map(|e| match e.kind {
                    EventKind::Put => TxnOp::put(e.key.clone(), e.value.clone(), None),
                    EventKind::Delete => TxnOp::delete(e.key.clone(), None),
                })
                .collect();
            tc.txn(Txn::new().and_then(ops)).await?;
            sent += 1;
            if sent >= baseline_revisions {
                break 'outer;
            }
        }
    }
    let baseline_rate = sent as f64 / started.elapsed().as_secs_f64();
    let rate = replayed / wall_secs;
    println!("| base keys | revisions replayed | restore wall s | restore revisions/s | restore peak RSS MiB | baseline revisions/s (etcd --unsafe-no-fsync, {sent} revisions) | speed-up |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {BASE_KEYS} | {replayed:.0} | {wall_secs:.2} | {rate:.0} | {rss_mib:.1} | {baseline_rate:.0} | {:.0}× |",
        rate / baseline_rate
    );
    Ok(())
}
