//! End-to-end tests of `etcd-archiver` against real etcd servers and a real
//! S3-compatible server.

use std::time::Duration;

use integration::{
    archive_while, big_revision, check_export, current_revision, mixed_workload, read_archive,
    run_restorer, verify_generation, wait_archived, ArchiverProcess, EtcdCluster, EtcdVersion,
    Proxy, Rng, S3Server, TestBed,
};

/// Small segments and frequent snapshots, so the tests cross many boundaries.
const FAST: &[&str] = &[
    "--segment-max-age",
    "300ms",
    "--segment-max-bytes",
    "256KiB",
    "--snapshot-interval",
    "3s",
];

fn archiver_args(endpoints: &str, archive: &str, data_dir: &std::path::Path) -> Vec<String> {
    integration::archiver_args(endpoints, archive, data_dir, FAST)
}

/// Mixed workload across a `kill -9`, a clean restart and a restart with an
/// empty data directory: one generation, every revision exactly once, equal
/// to the source's own history.
async fn lossless_across_restarts(version: EtcdVersion) -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(version, 1).await?;
    let args = archiver_args(&cluster.endpoints(), &url, &tmp.path().join("data"));
    let mut rng = Rng::new(7);

    mixed_workload(&mut client, &mut rng, 100).await?;
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    mixed_workload(&mut client, &mut rng, 150).await?;
    big_revision(&mut client, 6000).await?;
    archiver.kill9();

    let down_from = current_revision(&mut client).await? + 1;
    mixed_workload(&mut client, &mut rng, 100).await?;
    let down_to = current_revision(&mut client).await?;
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    mixed_workload(&mut client, &mut rng, 100).await?;
    let rev = current_revision(&mut client).await?;
    wait_archived(&url, 1, rev, Duration::from_secs(30)).await?;
    let (status, took) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success(), "archiver exit status {status}");
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");

    mixed_workload(&mut client, &mut rng, 100).await?;
    let empty = archiver_args(&cluster.endpoints(), &url, &tmp.path().join("fresh-data"));
    let mut archiver = ArchiverProcess::start(&empty, &[], &log)?;
    mixed_workload(&mut client, &mut rng, 100).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // let short leases expire
    let rev = current_revision(&mut client).await?;
    wait_archived(&url, 1, rev, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());

    let generations = read_archive(&url).await?;
    assert_eq!(generations.len(), 1, "{}", std::fs::read_to_string(&log)?);
    let g = &generations[0];
    assert!(!g.snapshots.is_empty());
    assert!(g.snapshots[0] >= g.start_revision);
    verify_generation(&mut client, g, rev).await?;
    // Revisions written while the archiver was down were observed late,
    // and say so; the last ones were observed live.
    for r in &g.revisions {
        if (down_from..=down_to).contains(&r.revision) {
            assert!(
                r.catching_up,
                "revision {} written while down is not flagged",
                r.revision
            );
        }
    }
    assert!(!g.revisions.last().unwrap().catching_up);
    let biggest = g
        .revisions
        .iter()
        .map(|r| r.events.len())
        .max()
        .unwrap_or(0);
    assert!(biggest >= 6000, "the >4 MiB revision was archived whole");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossless_across_restarts_etcd_3_5() -> anyhow::Result<()> {
    Box::pin(lossless_across_restarts(EtcdVersion::V35)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossless_across_restarts_etcd_3_4() -> anyhow::Result<()> {
    Box::pin(lossless_across_restarts(EtcdVersion::V34)).await
}

/// A member of a 3-member cluster dies (twice, different members): the
/// archiver continues through the others without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continues_through_member_failures() -> anyhow::Result<()> {
    let TestBed {
        mut cluster,
        client: _,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 3).await?;
    let args = archiver_args(&cluster.endpoints(), &url, &tmp.path().join("data"));
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    let mut rng = Rng::new(11);
    for victim in [0, 1] {
        let mut client = cluster.client().await?;
        mixed_workload(&mut client, &mut rng, 80).await?;
        cluster.members[victim].kill();
        cluster.wait_ready().await?;
        let mut client = cluster.client().await?;
        mixed_workload(&mut client, &mut rng, 80).await?;
        cluster.restart(victim)?;
        cluster.wait_ready().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut client = cluster.client().await?;
    let rev = current_revision(&mut client).await?;
    wait_archived(&url, 1, rev, Duration::from_mins(1)).await?;
    archiver.terminate(Duration::from_secs(20))?;
    cluster.check_members_agree(rev).await?;
    let generations = read_archive(&url).await?;
    assert_eq!(generations.len(), 1, "{}", std::fs::read_to_string(&log)?);
    verify_generation(&mut client, &generations[0], rev).await?;
    Ok(())
}

/// The S3 store is unreachable for 30 s while writes continue: segments
/// wait in the spool and arrive in order afterwards, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_30s_store_outage_on_s3() -> anyhow::Result<()> {
    let s3 = S3Server::start("pitr").await?;
    let proxy = Proxy::start(s3.port).await?;
    let cluster = EtcdCluster::start(EtcdVersion::V35, 1).await?;
    let mut client = cluster.client().await?;
    let tmp = tempfile::tempdir()?;
    let url = "s3://pitr/clusters/test".to_owned();
    let log = tmp.path().join("archiver.log");
    let args = archiver_args(&cluster.endpoints(), &url, &tmp.path().join("data"));
    let env = S3Server::env(proxy.port);
    // The test reads the store through moto directly, past the proxy.
    let _env = integration::use_s3_in_process(s3.port).await;
    let mut archiver = ArchiverProcess::start(&args, &env, &log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    let mut rng = Rng::new(5);
    mixed_workload(&mut client, &mut rng, 100).await?;
    // A base snapshot and the first revisions are in the store before the cut.
    let before = current_revision(&mut client).await?;
    wait_archived(&url, 1, before, Duration::from_secs(30)).await?;
    proxy.set_up(false);
    let outage = std::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(30) {
        mixed_workload(&mut client, &mut rng, 20).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Written 30 s into the outage: the store cannot hold it yet.
    let during = current_revision(&mut client).await?;
    let archived = read_archive(&url)
        .await?
        .first()
        .and_then(|g| g.revisions.last().map(|r| r.revision))
        .unwrap_or(0);
    assert!(
        archived < during,
        "the outage held uploads back ({archived} < {during})"
    );
    proxy.set_up(true);
    mixed_workload(&mut client, &mut rng, 50).await?;
    let rev = current_revision(&mut client).await?;
    if let Err(e) = wait_archived(&url, 1, rev, Duration::from_mins(4)).await {
        let text = std::fs::read_to_string(&log)?;
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        anyhow::bail!("{e:#}; archiver log (newest first):\n{}", tail.join("\n"));
    }
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());
    let generations = read_archive(&url).await?;
    assert_eq!(generations.len(), 1, "{}", std::fs::read_to_string(&log)?);
    verify_generation(&mut client, &generations[0], rev).await?;
    // The restorer reads the same S3 archive: every object verifies and an
    // export equals the source's own read.
    let s3_env = S3Server::env(s3.port);
    let (code, out, err) = integration::run_restorer(&["verify", "--archive", &url], &s3_env)?;
    assert_eq!(code, 0, "{out}{err}");
    check_export(&url, &s3_env, &client, rev).await?;
    Ok(())
}

/// etcd compacts past the archiver's resume point while it is down: the
/// archiver records the gap and starts a new generation with a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_resume_point_starts_a_new_generation() -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let args = archiver_args(&cluster.endpoints(), &url, &tmp.path().join("data"));
    let mut rng = Rng::new(3);
    let first_end = archive_while(&args, &log, &url, 1, &mut client, &mut rng, 50).await?;

    mixed_workload(&mut client, &mut rng, 50).await?;
    let compact_at = current_revision(&mut client).await?;
    client.compact(compact_at, None).await?;
    let rev = archive_while(&args, &log, &url, 2, &mut client, &mut rng, 50).await?;

    let generations = read_archive(&url).await?;
    assert_eq!(generations.len(), 2);
    assert_eq!(generations[1].reason, "Compacted");
    assert!(generations[0].revisions.last().unwrap().revision >= first_end);
    assert!(generations[1].start_revision >= compact_at);
    assert!(!generations[1].snapshots.is_empty());
    let manifest = std::fs::read_to_string(
        tmp.path()
            .join("archive/gen-0000000000000002/generation.json"),
    )?;
    let manifest: serde_json::Value = serde_json::from_str(&manifest)?;
    assert_eq!(manifest["reason"], "compacted");
    assert_eq!(manifest["previous"]["generation"], 1);
    verify_generation(&mut client, &generations[1], rev).await?;
    Ok(())
}

/// The source is restored underneath the archiver from an older snapshot
/// (same cluster ID, history goes back): on reconnect the archiver sees it,
/// whether the cluster is behind the archive or already past it with other
/// content, and starts a new generation instead of splicing two histories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_restored_underneath_starts_new_generations() -> anyhow::Result<()> {
    let TestBed {
        mut cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let args = archiver_args(&cluster.endpoints(), &url, &tmp.path().join("data"));
    let mut rng = Rng::new(21);
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    mixed_workload(&mut client, &mut rng, 40).await?;
    let old = tmp.path().join("old.db");
    cluster.save_snapshot(&old)?;
    mixed_workload(&mut client, &mut rng, 80).await?;
    let gen1_last = current_revision(&mut client).await?;
    wait_archived(&url, 1, gen1_last, Duration::from_secs(30)).await?;
    archiver.terminate(Duration::from_secs(20))?;

    // Behind the archive: a watch from gen1_last + 1 would simply wait.
    cluster.restore_underneath(0, &old).await?;
    let mut client = cluster.client().await?;
    mixed_workload(&mut client, &mut rng, 10).await?;
    assert!(current_revision(&mut client).await? < gen1_last);
    archive_while(&args, &log, &url, 2, &mut client, &mut rng, 20).await?;

    // Past the archive with other content: the last archived revision reads differently.
    let gen2_last = read_archive(&url).await?[1]
        .revisions
        .last()
        .unwrap()
        .revision;
    cluster.restore_underneath(0, &old).await?;
    let mut client = cluster.client().await?;
    while current_revision(&mut client).await? <= gen2_last + 5 {
        mixed_workload(&mut client, &mut rng, 20).await?;
    }
    let rev = archive_while(&args, &log, &url, 3, &mut client, &mut rng, 20).await?;

    let generations = read_archive(&url).await?;
    assert_eq!(generations.len(), 3, "{}", std::fs::read_to_string(&log)?);
    assert_eq!(generations[1].reason, "LineageBroken");
    assert_eq!(generations[2].reason, "LineageBroken");
    verify_generation(&mut client, &generations[2], rev).await?;
    Ok(())
}

/// A generation holding a base snapshot but no revision yet (a quiet
/// cluster) is not continued on a source restored underneath it with the
/// same cluster ID: the HashKV fingerprint recorded with the snapshot no
/// longer matches, so a new generation starts and exports at the new
/// revisions equal etcd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_generation_is_not_spliced() -> anyhow::Result<()> {
    let TestBed {
        mut cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let args = archiver_args(&cluster.endpoints(), &url, &tmp.path().join("data"));
    let mut rng = Rng::new(33);
    mixed_workload(&mut client, &mut rng, 5).await?;
    let old = tmp.path().join("old.db");
    cluster.save_snapshot(&old)?;
    mixed_workload(&mut client, &mut rng, 10).await?;
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    // Its election key is the last write before the archive goes quiet.
    archiver.wait_writing(Duration::from_secs(30)).await?;
    let quiet = current_revision(&mut client).await?;
    let started = std::time::Instant::now();
    while read_archive(&url)
        .await
        .ok()
        .and_then(|g| g.first().map(|g| g.snapshots.clone()))
        != Some(vec![quiet])
    {
        assert!(started.elapsed() < Duration::from_secs(30), "no snapshot");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    archiver.terminate(Duration::from_secs(20))?;
    let generations = read_archive(&url).await?;
    assert!(
        generations[0].revisions.is_empty(),
        "the generation is quiet"
    );

    cluster.restore_underneath(0, &old).await?;
    let mut client = cluster.client().await?;
    while current_revision(&mut client).await? <= quiet + 3 {
        mixed_workload(&mut client, &mut rng, 3).await?;
    }
    let rev = archive_while(&args, &log, &url, 2, &mut client, &mut rng, 10).await?;
    let generations = read_archive(&url).await?;
    assert_eq!(generations.len(), 2, "{}", std::fs::read_to_string(&log)?);
    assert_eq!(generations[1].reason, "LineageBroken");
    verify_generation(&mut client, &generations[1], rev).await?;
    let mut targets = vec![generations[1].snapshots[0], rev];
    targets.extend(quiet + 1..=quiet + 3);
    for target in targets {
        if target < generations[1].snapshots[0] {
            let (code, _, err) = run_restorer(
                &[
                    "export",
                    "--archive",
                    &url,
                    "--revision",
                    &target.to_string(),
                ],
                &[],
            )?;
            assert_eq!(code, 3, "revision {target} precedes generation 2: {err}");
        } else {
            check_export(&url, &[], &client, target).await?;
        }
    }
    Ok(())
}

/// `etcd-archiver snapshot` takes one snapshot and exits; bad input is
/// refused with a message naming the problem before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_snapshot_and_input_errors() -> anyhow::Result<()> {
    let cluster = EtcdCluster::start(EtcdVersion::V34, 1).await?;
    let mut client = cluster.client().await?;
    let mut rng = Rng::new(2);
    mixed_workload(&mut client, &mut rng, 20).await?;
    let rev = current_revision(&mut client).await?;
    let tmp = tempfile::tempdir()?;
    let url = format!("file://{}/archive", tmp.path().display());
    let run = |args: &[&str]| -> anyhow::Result<(i32, String, String)> {
        let out = std::process::Command::new(integration::binary("etcd-archiver"))
            .args(args)
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    let data = tmp.path().join("data").display().to_string();
    let endpoints = cluster.endpoints();
    let (code, out, err) = run(&[
        "snapshot",
        "--endpoints",
        &endpoints,
        "--archive",
        &url,
        "--data-dir",
        &data,
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("snapshot archived at revision {rev}")),
        "{out}"
    );
    let generations = read_archive(&url).await?;
    assert_eq!(generations[0].snapshots, vec![rev]);

    // Bad input: each names the problem, exits non-zero, writes nothing.
    let fresh = tmp.path().join("fresh").display().to_string();
    for (args, needle) in [
        (
            vec!["run", "--archive", "ftp://x/y", "--data-dir", &fresh],
            "unsupported scheme",
        ),
        (
            vec![
                "run",
                "--archive",
                &url,
                "--endpoints",
                "127.0.0.1:2379",
                "--data-dir",
                &fresh,
            ],
            "--endpoints",
        ),
        (
            vec![
                "run",
                "--archive",
                &url,
                "--segment-max-age",
                "soon",
                "--data-dir",
                &fresh,
            ],
            "--segment-max-age",
        ),
        (
            vec![
                "run",
                "--archive",
                &url,
                "--cacert",
                "/nonexistent.pem",
                "--endpoints",
                "https://127.0.0.1:1",
                "--data-dir",
                &fresh,
            ],
            "--cacert",
        ),
        (
            vec!["run", "--archive", &url, "--no-such-flag"],
            "--no-such-flag",
        ),
    ] {
        let (code, _, err) = run(&args)?;
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let unknown = tmp.path().join("future");
    std::fs::create_dir_all(&unknown)?;
    std::fs::write(
        unknown.join("etcd-pitr.json"),
        r#"{"format":"etcd-pitr","version":99,"created_ms":0}"#,
    )?;
    let future_url = format!("file://{}", unknown.display());
    let (code, _, err) = run(&[
        "run",
        "--archive",
        &future_url,
        "--endpoints",
        &endpoints,
        "--data-dir",
        &fresh,
    ])?;
    assert_ne!(code, 0);
    assert!(
        err.contains("archive format version 99 is not supported"),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&fresh).exists(),
        "nothing written for bad input"
    );
    Ok(())
}

/// An idle cluster's archive still counts as current: progress
/// notifications move the archived "current until" time without writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_cluster_archive_stays_current() -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log: _,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let args = integration::archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &["--segment-max-age", "300ms", "--idle-interval", "1s"],
    );
    let mut archiver = ArchiverProcess::start(&args, &[], &tmp.path().join("archiver.log"))?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    client.put("/idle/k", "v", None).await?;
    let rev = current_revision(&mut client).await?;
    wait_archived(&url, 1, rev, Duration::from_secs(30)).await?;
    let written_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let archive = etcdpitr_common::store::Archive::open(&url)?;
    let listing = etcdpitr_common::listing::ArchiveListing::load(&archive).await?;
    let chain = listing.generations[0].chain();
    let end_ms = chain.end_ms();
    assert!(
        end_ms >= written_ms + 2000,
        "archive current until {end_ms}, last write {written_ms}"
    );
    assert_eq!(chain.last_revision(), rev, "no revision was invented");
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());
    Ok(())
}

fn openssl(args: &[&str], dir: &std::path::Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
fn make_certs(dir: &std::path::Path) -> anyhow::Result<()> {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=pitr-test-ca",
        ],
        dir,
    )?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        openssl(
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
            dir,
        )?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "1",
                "-extfile",
                ext,
            ],
            dir,
        )?;
    }
    Ok(())
}

/// etcd with client-certificate TLS, and etcd with user/password auth: the
/// archiver archives both; a wrong password is a clear, final error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_password_auth() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    make_certs(&certs)?;
    let cert = |f: &str| certs.join(f).display().to_string();

    // TLS with client certificates.
    let (client_port, peer_port) = (integration::free_port(), integration::free_port());
    let url = format!("https://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let etcd_bin = EtcdVersion::V35.bin_dir();
    let mut etcd = std::process::Command::new(etcd_bin.join("etcd"))
        .args([
            "--data-dir",
            &tmp.path().join("tls-etcd").display().to_string(),
        ])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args([
            "--initial-cluster",
            &format!("default={peer}"),
            "--unsafe-no-fsync",
        ])
        .args([
            "--cert-file",
            &cert("server.pem"),
            "--key-file",
            &cert("server.key"),
        ])
        .args(["--trusted-ca-file", &cert("ca.pem"), "--client-cert-auth"])
        .stderr(std::fs::File::create(tmp.path().join("tls-etcd.log"))?)
        .spawn()?;
    let etcdctl = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(etcd_bin.join("etcdctl"))
            .args([
                "--endpoints",
                &url,
                "--cacert",
                &cert("ca.pem"),
                "--cert",
                &cert("client.pem"),
                "--key",
                &cert("client.key"),
            ])
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while etcdctl(&["put", "/tls/a", "1"]).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "TLS etcd did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let archive = format!("file://{}/tls-archive", tmp.path().display());
    let tls_flags = [
        "--cacert",
        &cert("ca.pem"),
        "--cert",
        &cert("client.pem"),
        "--key",
        &cert("client.key"),
    ];
    let mut extra: Vec<&str> = FAST.to_vec();
    extra.extend(tls_flags.iter().copied());
    let args = integration::archiver_args(&url, &archive, &tmp.path().join("tls-data"), &extra);
    let mut archiver = ArchiverProcess::start(&args, &[], &tmp.path().join("tls-archiver.log"))?;
    for i in 0..20 {
        etcdctl(&["put", &format!("/tls/k{i}"), "v"])?;
    }
    let rev: i64 = etcdctl(&["get", "/tls/k19", "-w", "json"])?
        .split("\"revision\":")
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .and_then(|s| s.trim().parse().ok())
        .expect("revision in etcdctl output");
    wait_archived(&archive, 1, rev, Duration::from_secs(30)).await?;
    archiver.terminate(Duration::from_secs(20))?;
    etcd.kill().ok();
    etcd.wait().ok();

    // User and password (from the environment, never a flag).
    let cluster = EtcdCluster::start(EtcdVersion::V35, 1).await?;
    let mut client = cluster.client().await?;
    client.user_add("root", "s3cret", None).await?;
    client.user_grant_role("root", "root").await?;
    client.auth_enable().await?;
    let opts = etcd_client::ConnectOptions::new().with_user("root", "s3cret");
    let mut client =
        etcd_client::Client::connect([cluster.members[0].client_url.as_str()], Some(opts)).await?;
    let archive = format!("file://{}/auth-archive", tmp.path().display());
    let mut extra: Vec<&str> = FAST.to_vec();
    extra.extend(["--user", "root"]);
    let args = integration::archiver_args(
        &cluster.endpoints(),
        &archive,
        &tmp.path().join("auth-data"),
        &extra,
    );
    let env = [("ETCD_ARCHIVER_PASSWORD".to_owned(), "s3cret".to_owned())];
    let mut archiver = ArchiverProcess::start(&args, &env, &tmp.path().join("auth-archiver.log"))?;
    let mut rng = Rng::new(8);
    mixed_workload(&mut client, &mut rng, 40).await?;
    let rev = current_revision(&mut client).await?;
    wait_archived(&archive, 1, rev, Duration::from_secs(30)).await?;
    archiver.terminate(Duration::from_secs(20))?;
    verify_generation(&mut client, &read_archive(&archive).await?[0], rev).await?;

    let wrong = [("ETCD_ARCHIVER_PASSWORD".to_owned(), "wrong".to_owned())];
    let out = std::process::Command::new(integration::binary("etcd-archiver"))
        .arg("run")
        .args(integration::archiver_args(
            &cluster.endpoints(),
            &archive,
            &tmp.path().join("auth-data2"),
            &["--user", "root"],
        ))
        .envs(wrong)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the archiver's credentials"), "{err}");
    assert!(
        !err.contains("s3cret") && !err.contains("wrong\""),
        "no password in the output"
    );
    Ok(())
}

/// Far behind after a restart (tens of thousands of revisions), the archiver
/// catches up through parallel revision windows, without gap or duplicate,
/// then follows the head with one watcher again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catches_up_through_parallel_windows() -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let args = archiver_args(&cluster.endpoints(), &url, &tmp.path().join("data"));
    let mut rng = Rng::new(4);
    let rev = archive_while(&args, &log, &url, 1, &mut client, &mut rng, 30).await?;

    integration::bulk_puts(&cluster, 32, 30_000).await?;
    let behind = current_revision(&mut client).await?;
    let started = std::time::Instant::now();
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    wait_archived(&url, 1, behind, Duration::from_mins(1)).await?;
    eprintln!(
        "caught up {} revisions in {:.2} s",
        behind - rev,
        started.elapsed().as_secs_f64()
    );
    mixed_workload(&mut client, &mut rng, 30).await?;
    let rev = current_revision(&mut client).await?;
    wait_archived(&url, 1, rev, Duration::from_mins(1)).await?;
    archiver.terminate(Duration::from_secs(20))?;
    let text = std::fs::read_to_string(&log)?;
    assert!(
        text.contains("catching up through parallel windows"),
        "{text}"
    );
    let generations = read_archive(&url).await?;
    assert_eq!(generations.len(), 1);
    verify_generation(&mut client, &generations[0], rev).await?;
    Ok(())
}

/// Asserts every directory under `dir` is 0700 and every file 0600,
/// skipping the names in `foreign` (not created by etcd-pitr).
fn assert_owner_only(dir: &std::path::Path, foreign: &[&str]) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let entry = entry.expect("directory entry");
        if foreign.iter().any(|f| entry.file_name() == *f) {
            continue;
        }
        let meta = entry.metadata().expect("metadata");
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", entry.path().display());
            assert_owner_only(&entry.path(), &[]);
        } else {
            assert_eq!(mode, 0o600, "{}", entry.path().display());
        }
    }
}

/// etcd with password auth and 2-second simple tokens: the archiver's token
/// expires between snapshots, and snapshots keep being archived (the client
/// re-authenticates). A stray `lost+found` at the archive root does not stop
/// the archiver. Everything the archiver and the restorer create is
/// owner-only, and a second restore to the same output is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_auth_tokens_and_owner_only_files() -> anyhow::Result<()> {
    let cluster = EtcdCluster::start_with_flags(
        EtcdVersion::V35,
        1,
        false,
        &["--auth-token", "simple", "--auth-token-ttl", "2"],
    )
    .await?;
    let mut client = cluster.client().await?;
    client.user_add("root", "s3cret", None).await?;
    client.user_grant_role("root", "root").await?;
    client.auth_enable().await?;
    let opts = etcd_client::ConnectOptions::new()
        .with_user("root", "s3cret")
        .with_auto_token_refresh(true);
    let mut client =
        etcd_client::Client::connect([cluster.members[0].client_url.as_str()], Some(opts)).await?;

    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("archive");
    std::fs::create_dir(&root)?;
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    std::fs::create_dir(root.join("lost+found"))?;
    let archive = format!("file://{}", root.display());
    let data_dir = tmp.path().join("data");
    let mut extra: Vec<&str> = FAST.to_vec();
    extra.extend(["--user", "root"]);
    let args = integration::archiver_args(&cluster.endpoints(), &archive, &data_dir, &extra);
    let env = [("ETCD_ARCHIVER_PASSWORD".to_owned(), "s3cret".to_owned())];
    let log = tmp.path().join("archiver.log");
    let mut archiver = ArchiverProcess::start(&args, &env, &log)?;

    // Writes between snapshots give each one a new revision (and a new
    // object); the archiver's own token idles 3 s between snapshots.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut i = 0;
    loop {
        client.put(format!("/token/k{i}"), "v", None).await?;
        i += 1;
        let snapshots = read_archive(&archive)
            .await
            .ok()
            .and_then(|g| g.first().map(|g| g.snapshots.len()))
            .unwrap_or(0);
        if snapshots >= 3 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {snapshots} snapshots archived; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rev = current_revision(&mut client).await?;
    wait_archived(&archive, 1, rev, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success(), "archiver exit: {status}");
    let text = std::fs::read_to_string(&log)?;
    assert!(!text.contains("invalid auth token"), "{text}");

    assert_owner_only(&data_dir, &[]);
    assert_owner_only(&root, &["lost+found"]);

    let out_dir = tmp.path().join("restored");
    std::fs::create_dir(&out_dir)?;
    let output = out_dir.join("snap.db");
    let restore = [
        "restore",
        "--archive",
        &archive,
        "--revision",
        &rev.to_string(),
        "--output",
        &output.display().to_string(),
    ];
    let (code, _, stderr) = integration::run_restorer(&restore, &[])?;
    assert_eq!(code, 0, "{stderr}");
    assert_owner_only(&out_dir, &[]);
    let left: Vec<_> = std::fs::read_dir(&out_dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("snap.db")],
        "no scratch left"
    );
    let (code, _, stderr) = integration::run_restorer(&restore, &[])?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("snap.db"), "{stderr}");
    Ok(())
}

/// `etcd-archiver check`: the canary write is found in the archive and the
/// recovery point printed (exit 0); with the archiver stopped the bound
/// passes first (exit 3); another cluster's write at an archived revision
/// is told apart (exit 1); a bad bound is a usage error (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_measures_the_recovery_point() -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log: _,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let args = integration::archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &["--segment-max-age", "300ms", "--idle-interval", "1s"],
    );
    let mut archiver = ArchiverProcess::start(&args, &[], &tmp.path().join("archiver.log"))?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    for i in 0..40 {
        client.put(format!("/check/{i}"), "v", None).await?;
    }
    let endpoints = cluster.endpoints();
    let check = |extra: &[&str], endpoints: &str| {
        let mut a = vec!["check", "--endpoints", endpoints, "--archive", &url];
        a.extend_from_slice(extra);
        integration::run_archiver(&a, &[])
    };

    let (code, out, err) = check(
        &["--max-rpo", "30s", "--canary-prefix", "/drill/"],
        &endpoints,
    )?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("recovery point "), "{out}");
    let canary = client
        .get(
            "/drill/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let [kv] = canary.kvs() else {
        panic!("one canary key expected: {canary:?}");
    };
    let key = kv.key_str()?;
    assert!(
        out.contains(&format!(
            "canary {key} written at revision {} ",
            kv.mod_revision()
        )),
        "{out}"
    );

    // Another cluster's write at a revision this archive holds.
    let other = EtcdCluster::start(EtcdVersion::V35, 1).await?;
    let mut oc = other.client().await?;
    for i in 0..10 {
        oc.put(format!("/other/{i}"), "v", None).await?;
    }
    let (code, out, err) = check(&["--max-rpo", "10s"], &other.endpoints())?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("not this cluster's history"), "{err}");

    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());
    let (code, out, err) = check(&["--max-rpo", "2s"], &endpoints)?;
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("did not hold the canary"), "{err}");

    let (code, _, err) = check(&["--max-rpo", "soon"], &endpoints)?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-rpo"), "{err}");
    Ok(())
}
