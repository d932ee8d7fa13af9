//! Highly available archiving: three archivers on one 3-member cluster and
//! one archive, the writer killed (`kill -9`) or frozen (SIGSTOP, then
//! SIGCONT) every few seconds under a mixed workload. Afterwards the archive
//! is one generation without a gap, equal to etcd's own history, `verify`
//! passes and exports at random revisions equal etcd's reads.
//!
//! `ETCD_PITR_HA_SECS` sets how long faults are injected (default 75 s per
//! store; `just soak-ha` runs longer).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration::{
    check_export, current_revision, mixed_workload, read_archive, run_restorer, verify_generation,
    wait_archived, ArchiverProcess, EtcdCluster, EtcdVersion, Rng, S3Server,
};

/// Small segments and frequent snapshots, so faults land everywhere.
const FAST: &[&str] = &["--segment-max-age", "300ms", "--snapshot-interval", "5s"];

fn fault_seconds() -> u64 {
    std::env::var("ETCD_PITR_HA_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(75)
}

/// The pid of the elected archiver, from the election's leader key.
async fn leader_pid(client: &etcd_client::Client) -> anyhow::Result<Option<u32>> {
    let resp = client
        .kv_client()
        .get(
            "/etcd-pitr/election/",
            Some(etcd_client::GetOptions::new().with_prefix().with_sort(
                etcd_client::SortTarget::Create,
                etcd_client::SortOrder::Ascend,
            )),
        )
        .await?;
    Ok(resp.kvs().first().and_then(|kv| {
        let holder = String::from_utf8_lossy(kv.value()).into_owned();
        holder.rsplit('/').next().and_then(|p| p.parse().ok())
    }))
}

/// Writes the marker key (retrying etcd's transient failures); returns its
/// revision.
async fn put_marker(client: &mut etcd_client::Client, round: u64) -> anyhow::Result<i64> {
    let mut attempts = 0;
    loop {
        match client.put("/ha/marker", round.to_string(), None).await {
            Ok(r) => return Ok(r.header().map_or(0, etcd_client::ResponseHeader::revision)),
            Err(e) if attempts < 20 => {
                eprintln!("marker: {e}; retrying");
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn signal(pid: u32, sig: &str) {
    std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .ok();
}

/// Runs the fault loop against `url` with `env`, then checks the archive.
async fn ha_round(url: &str, env: &[(String, String)], seed: u64) -> anyhow::Result<()> {
    let cluster = EtcdCluster::start(EtcdVersion::V35, 3).await?;
    let tmp = tempfile::tempdir()?;
    let args = |i: usize| {
        integration::archiver_args(
            &cluster.endpoints(),
            url,
            &tmp.path().join(format!("data{i}")),
            FAST,
        )
    };
    let logs: Vec<_> = (0..3)
        .map(|i| tmp.path().join(format!("archiver{i}.log")))
        .collect();
    let mut archivers: Vec<ArchiverProcess> = (0..3)
        .map(|i| ArchiverProcess::start(&args(i), env, &logs[i]))
        .collect::<anyhow::Result<_>>()?;

    // The workload runs throughout, on its own connection.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = cluster.client().await?;
    let workload = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            let mut failing_since: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                // The test is about the archivers: a request that etcd
                // fails under this load is retried, not fatal.
                match mixed_workload(&mut writer, &mut rng, 10).await {
                    Ok(()) => failing_since = None,
                    Err(e)
                        if failing_since.is_some_and(|t| t.elapsed() > Duration::from_secs(30)) =>
                    {
                        return Err(e.context("the workload failed for 30 s"));
                    }
                    Err(e) => {
                        eprintln!("workload: {e:#}; retrying");
                        failing_since.get_or_insert_with(Instant::now);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        })
    };

    let mut client = cluster.client().await?;
    let mut takeovers = Vec::new();
    let started = Instant::now();
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(fault_seconds()) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let Some(pid) = leader_pid(&client).await? else {
            continue;
        };
        let Some(i) = archivers
            .iter()
            .position(|a| a.child.as_ref().is_some_and(|c| c.id() == pid))
        else {
            continue;
        };
        let fault = Instant::now();
        let killed = round.is_multiple_of(2);
        if killed {
            archivers[i].kill9();
        } else {
            signal(pid, "-STOP");
        }
        // A write after the fault, archived by the new writer.
        let marker = put_marker(&mut client, round).await?;
        if let Err(e) = wait_archived(url, 1, marker, Duration::from_mins(1)).await {
            let tails: Vec<String> = logs
                .iter()
                .map(|l| {
                    let text = std::fs::read_to_string(l).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(30)..].join("\n")
                })
                .collect();
            anyhow::bail!(
                "{e:#} after fault {round}; logs:\n{}",
                tails.join("\n---\n")
            );
        }
        takeovers.push((killed, fault.elapsed()));
        if !killed {
            // The frozen writer wakes up deposed; it must not harm the archive.
            signal(pid, "-CONT");
        }
        if archivers[i].child.is_none() {
            archivers[i] = ArchiverProcess::start(&args(i), env, &logs[i])?;
        }
        round += 1;
    }
    stop.store(true, Ordering::Relaxed);
    workload.await??;
    let rev = current_revision(&mut client).await?;
    wait_archived(url, 1, rev, Duration::from_mins(1)).await?;
    for a in &mut archivers {
        let (status, _) = a.terminate(Duration::from_secs(40))?;
        anyhow::ensure!(status.success(), "an archiver exited with {status}");
    }
    for (killed, t) in &takeovers {
        eprintln!(
            "takeover after {}: archive current again {:.1} s after the fault",
            if *killed { "kill -9" } else { "SIGSTOP" },
            t.as_secs_f64()
        );
    }
    assert!(round >= 4, "too few faults injected ({round})");

    // One generation, no gap, equal to etcd's history.
    let generations = read_archive(url).await?;
    let log_text = || {
        logs.iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    assert_eq!(generations.len(), 1, "{}", log_text());
    verify_generation(&mut client, &generations[0], rev).await?;
    let (code, out, err) = run_restorer(&["verify", "--archive", url], env)?;
    assert_eq!(code, 0, "{out}{err}");

    // Exports at random restorable revisions equal etcd's own reads.
    let first = generations[0].snapshots[0];
    let last = generations[0]
        .revisions
        .last()
        .map_or(first, |r| r.revision);
    let mut rng = Rng::new(seed ^ 0x5eed);
    for _ in 0..20 {
        let target = first + rng.below((last - first + 1) as u64) as i64;
        check_export(url, env, &client, target).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_archivers_survive_killed_and_frozen_writers_on_local_files() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let url = format!("file://{}/archive", tmp.path().display());
    Box::pin(ha_round(&url, &[], 61)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_archivers_survive_killed_and_frozen_writers_on_s3() -> anyhow::Result<()> {
    let s3 = S3Server::start("ha-archive").await?;
    let env = S3Server::env(s3.port);
    let _env = integration::use_s3_in_process(s3.port).await;
    Box::pin(ha_round("s3://ha-archive/cluster", &env, 62)).await
}
