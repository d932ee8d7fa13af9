//! Retention end to end: real etcd, the real archiver and restorer, local
//! and S3 archives (one in an S3 Object Lock bucket). Kept restore points
//! must stay exact (equal to etcd's own reads), pruned ones must be refused
//! as pruned, locked objects must stay until their retention ends, and
//! `verify` must pass after every prune.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;

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
    let _env = integration::use_s3_in_process(s3.port).await;
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
    // Every recorded range shows as pruned (adjacent ones as one hole).
    let holes: Vec<(i64, i64)> = revisions(&listed["generations"][0]["pruned"], "first_revision")
        .into_iter()
        .zip(revisions(
            &listed["generations"][0]["pruned"],
            "last_revision",
        ))
        .collect();
    for first in &pruned {
        assert!(
            holes.iter().any(|(a, b)| a <= first && first <= b),
            "record from {first} not listed as pruned: {holes:?}"
        );
    }

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

    // A window of the last 2 s of the archive instead: every point in it
    // stays restorable and exact, and verify still passes.
    let (code, out, err) = run_archiver(
        &[
            "prune",
            "--archive",
            &url,
            "--keep-within",
            "2s",
            "--json",
            "--confirm",
        ],
        &env,
    )?;
    anyhow::ensure!(code == 0, "prune --keep-within exited {code}: {err}");
    let within = json_of(&out)?;
    let points: Vec<(i64, i64)> = within["kept"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["reasons"].to_string().contains("keep-within"))
                .filter_map(|p| {
                    Some((
                        p["base_revision"].as_i64()?,
                        p["through_revision"].as_i64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(!points.is_empty(), "no point kept for the window: {out}");
    let (code, out, err) = run_restorer(&["verify", "--archive", &url], &env)?;
    assert_eq!(code, 0, "verify after --keep-within: {out}{err}");
    for (base, through) in points {
        for target in [base, i64::midpoint(base, through), through] {
            check_export(&url, &env, &client, target).await?;
        }
    }
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

/// An archive in an S3 Object Lock bucket (moto, default retention
/// GOVERNANCE for a day): archiving is unaffected and the head exports
/// exactly. `prune --keep-last 1 --confirm` deletes nothing locked: every
/// object it would delete is reported with its retain-until date and stays,
/// `verify` passes, the kept point and the head restore exactly. Once the
/// retentions shortened to seconds have ended, a second prune deletes those
/// objects (their data stays as noncurrent versions) and still reports the
/// one whose retention runs for a day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_leaves_objects_under_object_lock_until_their_retention_ends() -> anyhow::Result<()> {
    let bucket = "pitr-locked";
    let s3 = S3Server::start_object_lock(bucket, "GOVERNANCE", 1).await?;
    let env = S3Server::env(s3.port);
    let _env = integration::use_s3_in_process(s3.port).await;
    let cluster = EtcdCluster::start(EtcdVersion::V35, 1).await?;
    let mut client = cluster.client().await?;
    let tmp = tempfile::tempdir()?;
    let url = format!("s3://{bucket}/locked");
    let args = archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &["--segment-max-age", "300ms", "--snapshot-interval", "2s"],
    );
    let mut archiver = ArchiverProcess::start(&args, &env, &tmp.path().join("archiver.log"))?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    let mut rng = Rng::new(73);
    write_rounds(&mut client, &mut rng, 3).await?;
    let head = current_revision(&mut client).await?;
    wait_archived(&url, 1, head, Duration::from_secs(30)).await?;
    // Stopped, so that both prunes plan from the same listing.
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success(), "etcd-archiver exited with {status}");
    check_export(&url, &env, &client, head).await?;

    let prune = |extra: &[&str]| {
        let mut args = vec!["prune", "--archive", &url, "--keep-last", "1"];
        args.extend(extra);
        let (code, out, err) = run_archiver(&args, &env)?;
        anyhow::ensure!(code == 0, "prune {extra:?} exited {code}: {err}");
        anyhow::Ok(out)
    };
    let dry = json_of(&prune(&["--json"])?)?;
    let doomed: Vec<String> = dry["delete"]
        .as_array()
        .context("no delete list")?
        .iter()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    // Every doomed object but one segment gets a retention that ends in
    // seconds; that segment keeps the bucket's default of a day.
    let long = doomed
        .iter()
        .rfind(|k| k.contains("/segments/"))
        .cloned()
        .with_context(|| format!("no segment to delete: {doomed:?}"))?;
    let short: Vec<String> = doomed.iter().filter(|k| **k != long).cloned().collect();
    assert!(!short.is_empty(), "{doomed:?}");
    let soon_ms = (etcdpitr_common::now_ms() / 1000 + 20) * 1000;
    let soon = chrono::DateTime::from_timestamp_millis(soon_ms)
        .context("date")?
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let short_in_bucket: Vec<String> = short.iter().map(|k| format!("locked/{k}")).collect();
    s3.retain(bucket, "GOVERNANCE", &soon, &short_in_bucket)?;

    let first = json_of(&prune(&["--confirm", "--json"])?)?;
    assert_eq!(first["delete"], dry["delete"]);
    assert_eq!(first["deleted"], 0, "{first}");
    let retained: BTreeMap<String, (String, String)> = first["retained"]
        .as_array()
        .context("no retained list")?
        .iter()
        .map(|x| {
            let text = |f: &str| x[f].as_str().unwrap_or_default().to_owned();
            (text("object"), (text("mode"), text("retain_until")))
        })
        .collect();
    assert_eq!(
        retained.keys().collect::<BTreeSet<_>>(),
        doomed.iter().collect::<BTreeSet<_>>(),
        "{first}"
    );
    for key in &short {
        assert_eq!(
            retained[key],
            ("GOVERNANCE".to_owned(), soon.clone()),
            "{key}"
        );
    }
    let (mode, until) = &retained[&long];
    assert_eq!(mode, "GOVERNANCE");
    let until_ms = chrono::DateTime::parse_from_rfc3339(until)?.timestamp_millis();
    assert!(
        until_ms > etcdpitr_common::now_ms() + 23 * 3_600_000,
        "default retention of a day, got {until}"
    );
    let objects = || async {
        let archive = etcdpitr_common::store::Archive::open(&url)?;
        anyhow::Ok(archive.list("", None).await?)
    };
    let listed = objects().await?;
    let missing: Vec<&String> = doomed.iter().filter(|k| !listed.contains(k)).collect();
    assert!(missing.is_empty(), "locked objects hidden: {missing:?}");
    let kept = revisions(&first["kept"], "base_revision");
    let check_restores = || async {
        let (code, out, err) = run_restorer(&["verify", "--archive", &url], &env)?;
        anyhow::ensure!(code == 0, "verify after a prune: {out}{err}");
        for &target in kept.iter().chain([&head]) {
            check_export(&url, &env, &client, target).await?;
        }
        anyhow::Ok(())
    };
    check_restores().await?;

    let wait_ms = soon_ms + 1500 - etcdpitr_common::now_ms();
    tokio::time::sleep(Duration::from_millis(wait_ms.try_into().unwrap_or(0))).await;
    let second = prune(&["--confirm"])?;
    assert!(
        second.contains(&format!(
            "deleted {} of {} objects\n",
            short.len(),
            doomed.len()
        )),
        "{second}"
    );
    assert!(
        second.contains(&format!(
            "kept by S3 Object Lock (a later prune deletes it once the lock ends): {long}: GOVERNANCE retention until {until}\n"
        )),
        "{second}"
    );
    let listed = objects().await?;
    assert!(listed.contains(&long));
    let left: Vec<&String> = short.iter().filter(|k| listed.contains(k)).collect();
    assert!(left.is_empty(), "not deleted: {left:?}");
    let noncurrent = s3.noncurrent_keys(bucket)?;
    let purged: Vec<&String> = short_in_bucket
        .iter()
        .filter(|k| !noncurrent.contains(k))
        .collect();
    assert!(purged.is_empty(), "no noncurrent version of {purged:?}");
    check_restores().await
}
