//! End-to-end tests of what `etcd-archiver run` tells about itself:
//! Prometheus metrics, `/healthz`, `/readyz` and the heartbeat log line, on
//! a real etcd that is stopped and started again underneath the archiver.

use std::time::{Duration, Instant};

use integration::{
    current_revision, free_port, mixed_workload, ArchiverProcess, EtcdVersion, Rng, TestBed,
};

/// The bound `/readyz` is held to in these tests.
const READY_MAX_LAG: &str = "3s";

/// One HTTP answer: the status code and the body.
struct Answer {
    status: u16,
    body: String,
}

/// `GET path` from the archiver's metrics listener on `port`.
async fn get(port: u16, path: &str) -> anyhow::Result<Answer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    c.read_to_string(&mut out).await?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP head in {out:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    Ok(Answer {
        status,
        body: body.to_owned(),
    })
}

/// A metric's value in the text exposition format.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Whether the writer archived at least through `revision`, and as far as
/// it saw the source go (leases of the workload expire later, election
/// keys come and go: revisions after `revision` are written meanwhile).
fn caught_up(text: &str, revision: i64) -> bool {
    #[allow(clippy::cast_precision_loss)]
    let revision = revision as f64;
    let archived = metric(text, "etcd_pitr_archived_revision");
    archived.is_some_and(|a| a >= revision) && archived == metric(text, "etcd_pitr_source_revision")
}

/// Scrapes `/metrics` until `done` holds for it, or fails after `limit`
/// with the last scrape and the log.
async fn scrape_until(
    port: u16,
    limit: Duration,
    log: &std::path::Path,
    what: &str,
    mut done: impl FnMut(&str) -> bool,
) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let text = get(port, "/metrics")
            .await
            .map(|a| a.body)
            .unwrap_or_default();
        if done(&text) {
            return Ok(text);
        }
        if started.elapsed() > limit {
            anyhow::bail!(
                "{what}: not within {limit:?}; last scrape:\n{text}\nlog:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks `path` until it answers `status`; returns the answer and how long
/// it took.
async fn wait_status(
    port: u16,
    path: &str,
    status: u16,
    limit: Duration,
) -> anyhow::Result<(Answer, Duration)> {
    let started = Instant::now();
    loop {
        if let Ok(a) = get(port, path).await {
            if a.status == status {
                return Ok((a, started.elapsed()));
            }
            if started.elapsed() > limit {
                anyhow::bail!(
                    "{path} still answers {} after {limit:?}: {}",
                    a.status,
                    a.body
                );
            }
        } else if started.elapsed() > limit {
            anyhow::bail!("{path}: no answer within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_health_readiness_and_heartbeat_follow_etcd_going_away_and_back() {
    let TestBed {
        mut cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 1).await.unwrap();
    let (port, standby_port) = (free_port(), free_port());
    let extra = |port: u16| {
        let addr = format!("127.0.0.1:{port}");
        let flags = [
            "--metrics-addr",
            &addr,
            "--segment-max-age",
            "1s",
            "--idle-interval",
            "1s",
            "--ready-max-lag",
            READY_MAX_LAG,
            "--heartbeat-interval",
            "1s",
            // The writer stays the writer through the outage below.
            "--election-ttl",
            "60s",
        ];
        flags.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    let args = |port: u16, data: &str| {
        let extra = extra(port);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        integration::archiver_args(&cluster.endpoints(), &url, &tmp.path().join(data), &extra)
    };
    let mut archiver = ArchiverProcess::start(&args(port, "data"), &[], &log).unwrap();
    archiver
        .wait_writing(Duration::from_secs(20))
        .await
        .unwrap();
    let standby_log = tmp.path().join("standby.log");
    let mut standby =
        ArchiverProcess::start(&args(standby_port, "standby-data"), &[], &standby_log).unwrap();
    // Ready once it campaigns: its election key (a revision) is written.
    wait_status(standby_port, "/readyz", 200, Duration::from_secs(20))
        .await
        .unwrap();

    // During 6 s of writes: the archived revision and the uploaded bytes
    // move, and the lag stays under 3 s (segments are sealed every second).
    let writing = std::cell::Cell::new(true);
    let workload = async {
        let mut rng = Rng::new(9);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(6) {
            mixed_workload(&mut client, &mut rng, 20).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        writing.set(false);
    };
    let watching = async {
        let mut seen = Vec::new();
        while writing.get() {
            if let Ok(a) = get(port, "/metrics").await {
                let value = |name| metric(&a.body, name).unwrap();
                seen.push((
                    value("etcd_pitr_archived_revision"),
                    value("etcd_pitr_uploaded_bytes_total"),
                    value("etcd_pitr_archive_lag_seconds"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        seen
    };
    let ((), seen) = tokio::join!(workload, watching);
    let moved = |pick: fn(&(f64, f64, f64)) -> f64| {
        seen.windows(2)
            .filter(|w| pick(&w[1]) > pick(&w[0]))
            .count()
    };
    assert!(moved(|s| s.0) >= 3, "archived revision moved: {seen:?}");
    assert!(moved(|s| s.1) >= 3, "uploaded bytes moved: {seen:?}");
    let max_lag = seen.iter().map(|s| s.2).fold(0.0, f64::max);
    assert!(max_lag < 3.0, "lag under 3 s while writing: {seen:?}");
    let rev = current_revision(&mut client).await.unwrap();
    let text = scrape_until(port, Duration::from_secs(30), &log, "archived", |t| {
        caught_up(t, rev)
            && metric(t, "etcd_pitr_last_snapshot_timestamp_seconds").is_some_and(|v| v > 0.0)
    })
    .await
    .unwrap();
    assert!(
        metric(&text, "etcd_pitr_segments_uploaded_total").unwrap() > 0.0,
        "{text}"
    );
    assert!(
        metric(&text, "etcd_pitr_uploaded_bytes_total").unwrap() > 0.0,
        "{text}"
    );
    assert_eq!(metric(&text, "etcd_pitr_generation"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "etcd_pitr_leader"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "etcd_pitr_gaps_total"), Some(0.0), "{text}");
    assert_eq!(
        metric(&text, "etcd_pitr_upload_errors_total"),
        Some(0.0),
        "{text}"
    );
    let start = metric(&text, "etcd_pitr_restorable_start_revision").unwrap();
    #[allow(clippy::cast_precision_loss)]
    let in_range = start > 0.0 && start <= rev as f64;
    assert!(in_range, "{text}");
    assert!(metric(&text, "etcd_pitr_snapshot_duration_seconds").unwrap() > 0.0);
    assert!(metric(&text, "etcd_pitr_spool_bytes").is_some(), "{text}");
    for name in ["etcd_pitr_archive_lag_seconds", "etcd_pitr_gaps_total"] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has help");
    }
    // Idle and archived: the progress notifications prove it current.
    scrape_until(port, Duration::from_secs(10), &log, "lag 0", |t| {
        metric(t, "etcd_pitr_archive_lag_seconds") == Some(0.0)
    })
    .await
    .unwrap();
    assert_eq!(get(port, "/healthz").await.unwrap().status, 200);
    wait_status(port, "/readyz", 200, Duration::from_secs(10))
        .await
        .unwrap();

    // The standby is ready while it campaigns, and reports no writer facts.
    assert_eq!(get(standby_port, "/readyz").await.unwrap().status, 200);
    let standby_text = get(standby_port, "/metrics").await.unwrap().body;
    assert_eq!(
        metric(&standby_text, "etcd_pitr_leader"),
        Some(0.0),
        "{standby_text}"
    );
    assert_eq!(
        metric(&standby_text, "etcd_pitr_archived_revision"),
        Some(0.0),
        "{standby_text}"
    );

    // etcd goes away: not ready within the bound (+ 5 s for a loaded
    // machine), still healthy, and the lag grows past the bound (no word
    // from the source proves it current).
    cluster.members[0].kill();
    let (answer, took) = wait_status(port, "/readyz", 503, Duration::from_secs(3 + 5))
        .await
        .unwrap();
    assert!(answer.body.contains("etcd"), "{}", answer.body);
    eprintln!("/readyz turned 503 after {took:?}: {}", answer.body.trim());
    scrape_until(
        port,
        Duration::from_secs(10),
        &log,
        "lag past the bound",
        |t| metric(t, "etcd_pitr_archive_lag_seconds").is_some_and(|v| v > 3.0),
    )
    .await
    .unwrap();
    assert_eq!(get(port, "/healthz").await.unwrap().status, 200);
    let (answer, _) = wait_status(standby_port, "/readyz", 503, Duration::from_secs(15))
        .await
        .unwrap();
    assert!(answer.body.contains("campaign"), "{}", answer.body);
    assert_eq!(get(standby_port, "/healthz").await.unwrap().status, 200);

    // etcd is back: ready again once the watch proves the archive current.
    cluster.restart(0).unwrap();
    cluster.wait_ready().await.unwrap();
    wait_status(port, "/readyz", 200, Duration::from_secs(30))
        .await
        .unwrap();
    client.put("/observability/after", "x", None).await.unwrap();
    let rev = current_revision(&mut client).await.unwrap();
    // The standby campaigns again meanwhile (its election keys are more
    // revisions).
    let text = scrape_until(port, Duration::from_secs(30), &log, "archived after", |t| {
        caught_up(t, rev)
    })
    .await
    .unwrap();
    assert_eq!(
        metric(&text, "etcd_pitr_generation"),
        Some(1.0),
        "no gap: {text}"
    );
    assert_eq!(metric(&text, "etcd_pitr_gaps_total"), Some(0.0), "{text}");

    // One heartbeat line a second on the writer, none on the standby.
    let writer_log = std::fs::read_to_string(&log).unwrap();
    let beats: Vec<&str> = writer_log
        .lines()
        .filter(|l| l.contains("heartbeat"))
        .collect();
    assert!(beats.len() >= 3, "{writer_log}");
    for field in [
        "archived_revision=",
        "lag_seconds=",
        "segments=",
        "uploaded_bytes=",
        "spool_bytes=",
    ] {
        assert!(
            beats.iter().all(|l| l.contains(field)),
            "{field}: {beats:?}"
        );
    }
    assert!(beats.iter().all(|l| l.contains("INFO")), "{beats:?}");
    let snapshot_lines = writer_log
        .lines()
        .filter(|l| l.contains("snapshot archived"));
    assert!(snapshot_lines.clone().count() >= 1);
    for field in ["revision=", "object_bytes=", "seconds="] {
        assert!(snapshot_lines.clone().all(|l| l.contains(field)), "{field}");
    }
    let standby_written = std::fs::read_to_string(&standby_log).unwrap();
    assert!(
        !standby_written.lines().any(|l| l.contains("heartbeat")),
        "{standby_written}"
    );

    stop(&mut archiver, &log);
    stop(&mut standby, &standby_log);
}

/// The S3 store goes away while etcd keeps writing: not ready within the
/// bound (a store that takes no upload, then the lag), still healthy, the
/// spool holding what waits; ready again once the store is back. (The
/// proxy runs on the test's runtime: it must serve while the test waits for
/// the archiver to exit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_store_outage() {
    use integration::{EtcdCluster, Proxy, S3Server};
    let s3 = S3Server::start("pitr").await.unwrap();
    let proxy = Proxy::start(s3.port).await.unwrap();
    let cluster = EtcdCluster::start(EtcdVersion::V35, 1).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("archiver.log");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = integration::archiver_args(
        &cluster.endpoints(),
        "s3://pitr/clusters/test",
        &tmp.path().join("data"),
        &[
            "--metrics-addr",
            &addr,
            "--segment-max-age",
            "1s",
            "--idle-interval",
            "1s",
            "--ready-max-lag",
            READY_MAX_LAG,
        ],
    );
    let mut archiver = ArchiverProcess::start(&args, &S3Server::env(proxy.port), &log).unwrap();
    archiver
        .wait_writing(Duration::from_secs(30))
        .await
        .unwrap();
    mixed_workload(&mut client, &mut Rng::new(3), 50)
        .await
        .unwrap();
    wait_status(port, "/readyz", 200, Duration::from_secs(30))
        .await
        .unwrap();

    proxy.set_up(false);
    let mut rng = Rng::new(4);
    let outage = Instant::now();
    let mut not_ready = None;
    while outage.elapsed() < Duration::from_secs(10) && not_ready.is_none() {
        mixed_workload(&mut client, &mut rng, 5).await.unwrap();
        let answer = get(port, "/readyz").await.unwrap();
        if answer.status == 503 {
            not_ready = Some((answer.body, outage.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (reason, took) = not_ready.expect("/readyz turns 503 while the store is down");
    eprintln!("/readyz turned 503 after {took:?}: {}", reason.trim());
    assert!(
        reason.contains("store refuses uploads") || reason.contains("lags the source"),
        "{reason}"
    );
    assert_eq!(get(port, "/healthz").await.unwrap().status, 200);
    let text = scrape_until(port, Duration::from_secs(10), &log, "spool", |t| {
        metric(t, "etcd_pitr_spool_bytes").is_some_and(|v| v > 0.0)
    })
    .await
    .unwrap();
    assert!(
        metric(&text, "etcd_pitr_archived_revision").unwrap()
            < metric(&text, "etcd_pitr_source_revision").unwrap(),
        "{text}"
    );

    proxy.set_up(true);
    wait_status(port, "/readyz", 200, Duration::from_mins(1))
        .await
        .unwrap();
    let rev = current_revision(&mut client).await.unwrap();
    let text = scrape_until(port, Duration::from_secs(30), &log, "archived", |t| {
        caught_up(t, rev)
    })
    .await
    .unwrap();
    assert_eq!(metric(&text, "etcd_pitr_spool_bytes"), Some(0.0), "{text}");
    stop(&mut archiver, &log);
}

/// SIGTERM, and a clean exit within 20 s (or the log's tail).
fn stop(archiver: &mut ArchiverProcess, log: &std::path::Path) {
    let tail = || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    match archiver.terminate(Duration::from_secs(20)) {
        Ok((status, _)) => assert!(status.success(), "exit status {status}:\n{}", tail()),
        Err(e) => panic!("{e:#}; log:\n{}", tail()),
    }
}
