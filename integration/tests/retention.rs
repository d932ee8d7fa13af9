//! Retention end to end: real etcd, the real archiver and restorer, local
//! and S3 archives. Kept restore points must stay exact (equal to etcd's
//! own reads), pruned ones must be refused as pruned, and `verify` must
//! pass after every prune.

use std::time::Duration;

use integration::{
    archiver_args, check_export, current_revision, mixed_workload, run_archiver, run_restorer,
    wait_archived, ArchiverProcess, EtcdCluster, EtcdVersion, Rng, S3Server,
};
use serde_json::Value;

/// Writes `rounds` rounds of mixed operations, a little more than a
/// snapshot interval apart, so that several base snapshots hold history
/// between them.
async fn write_rounds(
    client: &mut etcd_client::Client,
    rng: &mut Rng,
    rounds: usize,
) -> anyhow::Result<()> {
    for _ in 0..rounds {
        mixed_workload(client, rng, 30).await?;
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    Ok(())
}

fn json_of(out: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(out)?)
}

fn revisions(v: &Value, field: &str) -> Vec<i64> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x[field].as_i64()).collect())
        .unwrap_or_default()
}

/// An archive on S3 with several base snapshots, pruned with `--keep-last 2`
/// while the archiver keeps writing: a dry run changes nothing, the
/// confirmed run deletes, the archiver carries on, `verify` passes, every
/// kept point and the head restore exactly, a pruned revision is refused as
/// pruned (exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_on_s3_keeps_kept_points_exact_while_archiving() -> anyhow::Result<()> {
    let s3 = S3Server::start("pitr").await?;
    let env = S3Server::env(s3.port);
    // The test itself reads the archive too.
    for (k, v) in &env {
        std::env::set_var(k, v);
    }
    let cluster = EtcdCluster::start(EtcdVersion::V35, 1).await?;
    let mut client = cluster.client().await?;
    let tmp = tempfile::tempdir()?;
    let url = "s3://pitr/retention".to_owned();
    let log = tmp.path().join("archiver.log");
    let args = archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &["--segment-max-age", "300ms", "--snapshot-interval", "2s"],
    );
    let mut archiver = ArchiverProcess::start(&args, &env, &log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    let mut rng = Rng::new(71);
    write_rounds(&mut client, &mut rng, 4).await?;
    let before = current_revision(&mut client).await?;
    wait_archived(&url, 1, before, Duration::from_secs(30)).await?;

    let objects = || async {
        let archive = etcdpitr_common::store::Archive::open(&url)?;
        anyhow::Ok(archive.list("", None).await?)
    };
    let listed = objects().await?;
    let (code, out, err) = run_archiver(
        &["prune", "--archive", &url, "--keep-last", "2", "--json"],
        &env,
    )?;
    anyhow::ensure!(code == 0, "dry run exited {code}: {err}");
    let dry = json_of(&out)?;
    assert_eq!(dry["confirmed"], false);
    let planned = dry["delete"].as_array().map_or(0, Vec::len);
    assert!(planned > 0, "nothing to prune: {out}");
    let now = objects().await?;
    assert!(
        listed.iter().all(|k| now.contains(k)),
        "a dry run deleted objects"
    );

    let (code, out, err) = run_archiver(
        &[
            "prune",
            "--archive",
            &url,
            "--keep-last",
            "2",
            "--json",
            "--confirm",
        ],
        &env,
    )?;
    anyhow::ensure!(code == 0, "prune exited {code}: {err}");
    let done = json_of(&out)?;
    assert_eq!(done["confirmed"], true);
    assert_eq!(
        done["deleted"].as_u64(),
        done["delete"].as_array().map(|a| a.len() as u64)
    );
    let pruned = revisions(&done["pruned"], "first_revision");
    assert!(!pruned.is_empty(), "no range recorded as pruned: {out}");
    let kept = revisions(&done["kept"], "base_revision");
    assert!(kept.len() >= 2, "{out}");

    // The archiver, running all along, is unaffected.
    write_rounds(&mut client, &mut rng, 1).await?;
    let head = current_revision(&mut client).await?;
    wait_archived(&url, 1, head, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success(), "etcd-archiver exited with {status}");

    let (code, out, err) = run_restorer(&["verify", "--archive", &url], &env)?;
    assert_eq!(code, 0, "verify after a prune: {out}{err}");
    assert!(out.contains("pruned by retention"), "{out}");
    let (code, out, _) = run_restorer(&["list", "--archive", &url, "--json"], &env)?;
    assert_eq!(code, 0);
    let listed = json_of(&out)?;
    assert_eq!(
        revisions(&listed["generations"][0]["pruned"], "first_revision"),
        pruned
    );

    for target in kept.iter().copied().chain([head]) {
        check_export(&url, &env, &client, target).await?;
    }
    let gone = pruned[0];
    let (code, _, err) = run_restorer(
        &["export", "--archive", &url, "--revision", &gone.to_string()],
        &env,
    )?;
    assert_eq!(code, 3, "export of pruned revision {gone}: {err}");
    assert!(err.contains("was pruned"), "{err}");
    Ok(())
}

/// `etcd-archiver run --keep-last 1 --prune-interval 1s` prunes on its own
/// while it archives; the archive stays verifiable and its head exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_prunes_on_its_own() -> anyhow::Result<()> {
    let cluster = EtcdCluster::start(EtcdVersion::V35, 1).await?;
    let mut client = cluster.client().await?;
    let tmp = tempfile::tempdir()?;
    let url = format!("file://{}/archive", tmp.path().display());
    let log = tmp.path().join("archiver.log");
    let args = archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &[
            "--segment-max-age",
            "300ms",
            "--snapshot-interval",
            "2s",
            "--keep-last",
            "1",
            "--prune-interval",
            "1s",
        ],
    );
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    let mut rng = Rng::new(72);
    write_rounds(&mut client, &mut rng, 3).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let snapshots = loop {
        let (code, out, err) = run_restorer(&["list", "--archive", &url, "--json"], &[])?;
        anyhow::ensure!(code == 0, "list exited {code}: {err}");
        let v = json_of(&out)?;
        let g = &v["generations"][0];
        if !revisions(&g["pruned"], "first_revision").is_empty() {
            break g["snapshots"].as_array().map_or(0, Vec::len);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the archiver did not prune: {out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // One kept snapshot, perhaps one more taken since the last prune.
    assert!(snapshots <= 2, "{snapshots} snapshots after pruning to one");
    mixed_workload(&mut client, &mut rng, 30).await?;
    let head = current_revision(&mut client).await?;
    wait_archived(&url, 1, head, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success(), "etcd-archiver exited with {status}");
    let (code, out, err) = run_restorer(&["verify", "--archive", &url], &[])?;
    assert_eq!(code, 0, "verify: {out}{err}");
    check_export(&url, &[], &client, head).await?;
    Ok(())
}
