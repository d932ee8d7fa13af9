//! End-to-end tests of `etcd-restorer`: archives made by the real archiver
//! from real etcd, restored and compared with the source's own reads.

use std::time::Duration;

use integration::{
    archive_while, archiver_args, check_export, current_revision, mixed_workload, oracle_export,
    read_archive, run_restorer, wait_archived, ArchiverProcess, EtcdVersion, RestoredEtcd, Rng,
    TestBed,
};

/// A (moment, revision) pair: the revision was the newest one at the moment.
struct Checkpoint {
    time: String,
    revision: i64,
}

fn rfc3339_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%3NZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn restore_round_trip(version: EtcdVersion) -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log: _,
    } = TestBed::start(version, 1).await?;
    let args = archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &[
            "--segment-max-age",
            "200ms",
            "--segment-max-bytes",
            "128KiB",
            "--snapshot-interval",
            "2s",
            // Idle progress reaches the store within a second, so the
            // archive soon vouches for the last checkpoint's moment.
            "--idle-interval",
            "1s",
        ],
    );
    let mut rng = Rng::new(42);
    mixed_workload(&mut client, &mut rng, 60).await?;
    let mut archiver = ArchiverProcess::start(&args, &[], &tmp.path().join("archiver.log"))?;
    let mut checkpoints = Vec::new();
    while checkpoints.len() < 6 {
        mixed_workload(&mut client, &mut rng, 60).await?;
        let revision = current_revision(&mut client).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let time = rfc3339_now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Expiring leases write on their own: keep the moment only if no
        // revision happened around it.
        if current_revision(&mut client).await? == revision {
            checkpoints.push(Checkpoint { time, revision });
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let last = current_revision(&mut client).await?;
    wait_archived(&url, 1, last, Duration::from_secs(30)).await?;
    // The archive vouches for a moment only once a progress notification
    // after it arrived (about every second): wait until it covers the last
    // checkpoint, or `--time` rightly says that moment is not archived yet.
    let newest_ms = checkpoints
        .iter()
        .filter_map(|c| chrono::DateTime::parse_from_rfc3339(&c.time).ok())
        .map(|t| t.timestamp_millis())
        .max()
        .unwrap_or(0);
    let archive = etcdpitr_common::store::Archive::open(&url)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while etcdpitr_common::listing::ArchiveListing::load(&archive)
        .await?
        .generations
        .first()
        .map_or(0, |g| g.chain().end_ms())
        < newest_ms
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the archive does not vouch for {newest_ms} ms"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());

    let generation = &read_archive(&url).await?[0];
    let snapshots = generation.snapshots.clone();
    assert!(snapshots.len() >= 3, "snapshots: {snapshots:?}");
    let archived_last = generation.revisions.last().unwrap().revision;
    let first = snapshots[0];

    // At least 20 targets: the first restorable revision, every snapshot
    // boundary and its neighbours, the last one, and revisions between.
    let mut targets = vec![first, first + 1, archived_last, archived_last - 1];
    for &s in &snapshots[1..] {
        targets.extend([s - 1, s, s + 1]);
    }
    let mut rng = Rng::new(9);
    while targets.len() < 24 {
        targets.push(first + rng.below((archived_last - first) as u64) as i64);
    }
    targets.retain(|&t| t >= first && t <= archived_last);
    targets.sort_unstable();
    targets.dedup();
    assert!(targets.len() >= 20);
    for &target in &targets {
        check_export(&url, &[], &client, target).await?;
    }

    // Several full restores through the release's own tools and a started etcd.
    let mut full = vec![
        first,
        snapshots[1] + 1,
        targets[targets.len() / 2],
        archived_last,
    ];
    full.sort_unstable();
    full.dedup();
    for &target in &full {
        let file = tmp.path().join(format!("restore-{target}.db"));
        let (code, out, err) = run_restorer(
            &[
                "restore",
                "--archive",
                &url,
                "--revision",
                &target.to_string(),
                "--output",
                &file.display().to_string(),
            ],
            &[],
        )?;
        assert_eq!(code, 0, "restore {target}: {err}");
        assert!(
            out.contains(&format!("restored revision {target}")),
            "{out}"
        );
        let status: serde_json::Value =
            serde_json::from_str(&RestoredEtcd::status(version, &file)?)?;
        assert_eq!(status["revision"], target);
        let restored = RestoredEtcd::start(version, &file).await?;
        let restored_client = restored.client().await?;
        let resp = restored_client.kv_client().get("nothing", None).await?;
        assert_eq!(
            resp.header().unwrap().revision(),
            target,
            "current revision after restore"
        );
        let got = oracle_export(&restored_client, target).await?;
        assert_eq!(
            got,
            oracle_export(&client, target).await?,
            "restored cluster at {target}"
        );
        // Every lease a live key references exists in the restored cluster.
        let mut lease_client = restored.client().await?;
        let leases: Vec<i64> = lease_client
            .leases()
            .await?
            .leases()
            .iter()
            .map(etcd_client::LeaseStatus::id)
            .collect();
        let kvs = restored_client
            .kv_client()
            .max_decoding_message_size(512 << 20)
            .get(
                vec![0u8],
                Some(etcd_client::GetOptions::new().with_all_keys()),
            )
            .await?;
        for kv in kvs.kvs() {
            if kv.lease() != 0 {
                assert!(
                    leases.contains(&kv.lease()),
                    "lease {:x} missing",
                    kv.lease()
                );
            }
        }
    }

    // --time picks the last revision observed at or before the moment.
    for c in &checkpoints {
        let (code, out, err) =
            run_restorer(&["export", "--archive", &url, "--time", &c.time], &[])?;
        assert_eq!(code, 0, "export --time {}: {err}", c.time);
        assert!(
            err.contains(&format!("-> revision {}", c.revision)),
            "{}: {err}",
            c.time
        );
        let lines: Vec<String> = out.lines().map(str::to_owned).collect();
        assert_eq!(lines, oracle_export(&client, c.revision).await?);
    }
    let c = &checkpoints[2];
    let file = tmp.path().join("by-time.db");
    let (code, out, err) = run_restorer(
        &[
            "restore",
            "--archive",
            &url,
            "--time",
            &c.time,
            "--output",
            &file.display().to_string(),
        ],
        &[],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("-> revision {}", c.revision)),
        "{out}"
    );

    // --dry-run prints the plan and writes nothing; without a target the
    // newest restorable revision is planned.
    let dry = tmp.path().join("dry.db");
    let (code, out, _) = run_restorer(
        &[
            "restore",
            "--archive",
            &url,
            "--output",
            &dry.display().to_string(),
            "--dry-run",
        ],
        &[],
    )?;
    assert_eq!(code, 0);
    assert!(
        out.contains("plan: generation 1, base snapshot at revision")
            && out.contains(&format!("target revision {archived_last}\n")),
        "{out}"
    );
    assert!(!dry.exists());

    // --bump-revision/--mark-compacted: revisions continue above, old ones are compacted.
    let bumped = tmp.path().join("bumped.db");
    let (code, _, err) = run_restorer(
        &[
            "restore",
            "--archive",
            &url,
            "--revision",
            &first.to_string(),
            "--output",
            &bumped.display().to_string(),
            "--bump-revision",
            "1000",
            "--mark-compacted",
        ],
        &[],
    )?;
    assert_eq!(code, 0, "{err}");
    let restored = RestoredEtcd::start(version, &bumped).await?;
    let mut bc = restored.client().await?;
    assert_eq!(current_revision(&mut bc).await?, first + 1000);
    let old = bc
        .get(
            "x",
            Some(etcd_client::GetOptions::new().with_revision(first)),
        )
        .await;
    assert!(old.is_err_and(|e| e.to_string().contains("compacted")));
    let put = bc.put("/after-bump", "v", None).await?;
    assert_eq!(put.header().unwrap().revision(), first + 1001);
    let exported_after_bump = oracle_export(&bc, first + 1000).await?;
    assert_eq!(exported_after_bump, oracle_export(&client, first).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_match_the_source_etcd_3_5() -> anyhow::Result<()> {
    Box::pin(restore_round_trip(EtcdVersion::V35)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_match_the_source_etcd_3_4() -> anyhow::Result<()> {
    Box::pin(restore_round_trip(EtcdVersion::V34)).await
}

/// Every refusal has its own message and exit code, and leaves no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_leave_nothing_behind() -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log: _,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let args = archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &["--segment-max-age", "200ms"],
    );
    let log = tmp.path().join("archiver.log");
    let mut rng = Rng::new(1);
    mixed_workload(&mut client, &mut rng, 30).await?;
    archive_while(&args, &log, &url, 1, &mut client, &mut rng, 30).await?;
    // A compaction overtakes the stopped archiver: generation 2 after a gap.
    mixed_workload(&mut client, &mut rng, 30).await?;
    let compacted = current_revision(&mut client).await?;
    client.compact(compacted, None).await?;
    archive_while(&args, &log, &url, 2, &mut client, &mut rng, 30).await?;
    let generations = read_archive(&url).await?;
    let first = generations[0].snapshots[0];
    let gen2_first = generations[1].snapshots[0];
    // What the archive holds, which lease expiries may have moved past the
    // revisions read while writing.
    let archived_last = |g: usize| {
        generations[g]
            .revisions
            .last()
            .map_or(generations[g].start_revision, |r| r.revision)
    };
    let (gen1_last, last) = (archived_last(0), archived_last(1));
    assert!(gen1_last + 2 < gen2_first, "a gap between the generations");

    let out_file = tmp.path().join("out.db");
    let out = out_file.display().to_string();
    let restore = |rev: i64| {
        run_restorer(
            &[
                "restore",
                "--archive",
                &url,
                "--revision",
                &rev.to_string(),
                "--output",
                &out,
            ],
            &[],
        )
    };
    let (code, _, err) = restore(first - 1)?;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("before the first restorable revision")
            && err.contains(&format!("generation 1: {first}..=")),
        "{err}"
    );
    let (code, _, err) = restore(last + 100)?;
    assert_eq!(code, 3);
    assert!(err.contains("beyond the last archived revision"), "{err}");
    let (code, _, err) = restore(gen1_last + 2)?;
    assert_eq!(code, 3);
    assert!(
        err.contains("falls in a gap") && err.contains("generation 2:"),
        "{err}"
    );
    assert!(!out_file.exists());

    // Both sides of the gap restore.
    assert_eq!(restore(gen1_last)?.0, 0);
    std::fs::remove_file(&out_file)?;
    assert_eq!(restore(gen2_first)?.0, 0);
    std::fs::remove_file(&out_file)?;
    let (code, listed, _) = run_restorer(&["list", "--archive", &url, "--json"], &[])?;
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&listed)?;
    assert_eq!(listed["gaps"][0]["reason"], "compacted");
    assert_eq!(listed["gaps"][0]["generation"], 1);
    assert_eq!(
        listed["generations"][1]["restorable"][0]["first_revision"],
        gen2_first
    );

    let (code, out, _) = run_restorer(&["verify", "--archive", &url], &[])?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": OK"), "{out}");

    // A corrupted segment is an integrity error naming the object.
    let seg_dir = tmp.path().join("archive/gen-0000000000000002/segments");
    let victim = std::fs::read_dir(&seg_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).map_or(0, |m| m.len()) > 200)
        .min()
        .expect("a segment");
    let mut bytes = std::fs::read(&victim)?;
    bytes[100] ^= 0xff;
    std::fs::write(&victim, bytes)?;
    let (code, _, err) = restore(last)?;
    assert_eq!(code, 4, "{err}");
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        err.contains(&name) && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(!out_file.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".out.db"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left behind");
    let (code, out, _) = run_restorer(&["verify", "--archive", &url], &[])?;
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains(&name) && out.contains("checksum mismatch") && out.contains("1 problems"),
        "{out}"
    );

    // Usage errors and an unreachable store.
    let (code, _, err) = run_restorer(
        &[
            "restore",
            "--archive",
            &url,
            "--time",
            "yesterday",
            "--output",
            &out,
        ],
        &[],
    )?;
    assert_eq!(code, 2);
    assert!(err.contains("--time"), "{err}");
    let (code, _, err) = run_restorer(&["list", "--archive", "ftp://nowhere/x"], &[])?;
    assert_eq!(code, 2);
    assert!(err.contains("unsupported scheme"), "{err}");
    let dead = integration::free_port();
    let env = integration::S3Server::env(dead);
    let (code, _, err) = run_restorer(&["list", "--archive", "s3://bucket/prefix"], &env)?;
    assert_eq!(code, 5, "{err}");
    Ok(())
}
