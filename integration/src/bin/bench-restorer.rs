//! Restorer benchmark: an archive of a 100,000-key base snapshot plus at
//! least 1,000,000 revisions, made by the real archiver from a real etcd,
//! restored natively (time and peak RSS via GNU time); against a baseline
//! measured in the same run that replays the same revisions one transaction
//! at a time into a local etcd started with `--unsafe-no-fsync`.
//!
//! Usage: `bench-restorer [REVISIONS] [BASELINE_REVISIONS]` (defaults
//! 1000000 and 30000), after `cargo build --release --bins`.

use std::time::Instant;

use etcd_client::{Txn, TxnOp};
use etcdpitr_common::layout;
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::segment::{self, EventKind, Record};
use integration::{binary, timed, BenchArchive, EtcdCluster, EtcdVersion, BENCH_BASE_KEYS};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let revisions: u64 = args.next().map_or(Ok(1_000_000), |s| s.parse())?;
    let baseline_revisions: usize = args.next().map_or(Ok(30_000), |s| s.parse())?;
    let bench = Box::pin(BenchArchive::build(revisions)).await?;
    let (archive, base, last) = (&bench.archive, bench.base, bench.last);
    let listing = ArchiveListing::load(archive).await?;
    let generation = &listing.generations[0];

    eprintln!("restoring revision {last} from base {base}");
    let out = bench.tmp.path().join("restored.db");
    let timing = timed(
        &binary("etcd-restorer"),
        &[
            "restore",
            "--archive",
            &bench.url,
            "--revision",
            &last.to_string(),
            "--output",
            &out.display().to_string(),
        ],
        &bench.tmp.path().join("restore.out"),
    )?;
    let (wall_secs, rss_mib) = (timing.wall_secs, timing.peak_rss_mib);
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
        "| {BENCH_BASE_KEYS} | {replayed:.0} | {wall_secs:.2} | {rate:.0} | {rss_mib:.1} | {baseline_rate:.0} | {:.0}× |",
        rate / baseline_rate
    );
    Ok(())
}
