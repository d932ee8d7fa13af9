//! Exactness at production size (long-running, ignored by default; run it
//! with `just scale-test`): a 1 GB etcd database built by the Kubernetes-like
//! load generator is archived while writes continue; the newest revision and
//! one in the middle of the writes on top of the base snapshot are restored,
//! etcd is started on each, and its `HashKV` at that revision must equal the
//! source's. `ETCD_PITR_SCALE_BYTES` overrides the size (e.g. `3GB`).

use std::time::Duration;

use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::settings::parse_size;
use etcdpitr_common::store::Archive;
use integration::loadgen::{run_load, LoadOptions, Until};
use integration::{
    archiver_args, current_revision, run_restorer, wait_archived, ArchiverProcess, EtcdVersion,
    RestoredEtcd,
};

/// Database size when `ETCD_PITR_SCALE_BYTES` is unset.
const DEFAULT_SCALE: &str = "1GB";
/// Writes on top of the base snapshot.
const MORE_WRITES: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long-running (a 1 GB database): just scale-test"]
async fn restores_a_gb_scale_database_exactly() -> anyhow::Result<()> {
    let size_text =
        std::env::var("ETCD_PITR_SCALE_BYTES").unwrap_or_else(|_| DEFAULT_SCALE.to_owned());
    let size = parse_size("ETCD_PITR_SCALE_BYTES", &size_text)?;
    let source = integration::loadgen::start_source(size).await?;
    let endpoints = source.endpoints();
    let options = LoadOptions::default();
    let fill = run_load(
        std::slice::from_ref(&endpoints),
        &options,
        Until::DbBytes(size),
    )
    .await?;
    eprintln!(
        "filled to {:.2} GB ({} revisions) in {:.0} s",
        fill.db_size_bytes as f64 / 1e9,
        fill.last_revision,
        fill.elapsed.as_secs_f64()
    );

    let tmp = tempfile::tempdir()?;
    let url = format!("file://{}/archive", tmp.path().display());
    let args = archiver_args(
        &endpoints,
        &url,
        &tmp.path().join("data"),
        &["--segment-max-age", "2s"],
    );
    let mut archiver = ArchiverProcess::start(&args, &[], &tmp.path().join("archiver.log"))?;
    let archive = Archive::open(&url)?;
    // The writes below go on top of the first snapshot (the restore's base).
    let started = std::time::Instant::now();
    while ArchiveListing::load(&archive).await.map_or(true, |l| {
        l.generations.iter().all(|g| g.snapshots.is_empty())
    }) {
        assert!(
            started.elapsed() < Duration::from_mins(10),
            "no snapshot listed within 10 min; see {}",
            archiver.log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let more = run_load(
        std::slice::from_ref(&endpoints),
        &LoadOptions {
            seed: options.seed + 1,
            ..options
        },
        Until::Elapsed(MORE_WRITES),
    )
    .await?;
    let mut client = source.client().await?;
    let last = current_revision(&mut client).await?;
    wait_archived(&url, 1, last, Duration::from_mins(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_mins(1))?;
    assert!(status.success(), "etcd-archiver exited with {status}");
    let listing = ArchiveListing::load(&archive).await?;
    let base = listing.generations[0].snapshots[0];
    assert!(
        base < more.last_revision,
        "the writes after the snapshot are not on top of the base"
    );
    let middle = base + (last - base) / 2;

    for revision in [last, middle] {
        let output = tmp.path().join(format!("{revision}.db"));
        let (code, out, err) = run_restorer(
            &[
                "restore",
                "--archive",
                &url,
                "--revision",
                &revision.to_string(),
                "--output",
                &output.display().to_string(),
            ],
            &[],
        )?;
        assert_eq!(code, 0, "restore of {revision}: {out}{err}");
        let restored = RestoredEtcd::start(EtcdVersion::V35, &output).await?;
        let mut restored_client = restored.client().await?;
        assert_eq!(current_revision(&mut restored_client).await?, revision);
        let ours = restored_client
            .maintenance_client()
            .hash_kv(revision)
            .await?
            .hash();
        let theirs = client.maintenance_client().hash_kv(revision).await?.hash();
        eprintln!("revision {revision} (base {base}): HashKV {ours}, source {theirs}");
        assert_eq!(
            ours, theirs,
            "HashKV of the member restored at {revision} differs from the source's"
        );
        drop(restored);
        std::fs::remove_file(&output)?;
    }
    Ok(())
}
