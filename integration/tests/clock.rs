//! Time you can trust: the archiver's wall clock steps (libfaketime moves
//! it while the archiver runs), and `restore --time` / `export --time` for a
//! moment one second before a "bad deploy" never return a state holding
//! that deploy: they answer with an earlier revision or refuse (exit 3)
//! naming the clock step.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use integration::{
    archiver_args, base64, current_revision, run_restorer, wait_archived, ArchiverProcess,
    EtcdVersion, TestBed,
};

/// Debian's libfaketime (package `faketime`, installed by scripts/setup.sh).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The archiver's wall-clock offset, re-read by libfaketime on every call
/// (`FAKETIME_NO_CACHE`); the monotonic clock is left alone.
struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    fn new(dir: &Path, offset: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            Path::new(LIBFAKETIME).exists(),
            "{LIBFAKETIME} is missing: run scripts/setup.sh (Debian package faketime)"
        );
        let clock = Self {
            file: dir.join("faketime.rc"),
        };
        clock.set(offset)?;
        Ok(clock)
    }

    /// Sets the offset (e.g. `-60s`), atomically: a half-written file
    /// would be read as no offset.
    fn set(&self, offset: &str) -> anyhow::Result<()> {
        let staged = self.file.with_extension("new");
        std::fs::write(&staged, format!("{offset}\n"))?;
        std::fs::rename(&staged, &self.file)?;
        Ok(())
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", LIBFAKETIME.to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
            ("FAKETIME_NO_CACHE", "1".to_owned()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// The test's own (unfaked) clock, Unix ms.
fn real_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Unix ms as RFC 3339 (UTC), via date(1).
fn rfc3339(ms: i64) -> String {
    let out = std::process::Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000)),
            "+%Y-%m-%dT%H:%M:%S.%3NZ",
        ])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn put(client: &mut etcd_client::Client, key: &str, value: &str) -> anyhow::Result<i64> {
    let resp = client.put(key, value, None).await?;
    Ok(resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision))
}

/// How the archiver's wall clock moves around the deploy.
struct Scenario {
    /// Offset when the archiver starts.
    start: &'static str,
    /// Offset set after the good state is written (None: unchanged).
    before_deploy: Option<&'static str>,
    /// Offset set a few seconds after the deploy.
    after_deploy: &'static str,
    /// Clock steps the archiver must log and record.
    steps: usize,
}

/// Runs a scenario and checks that `--time` one second before the deploy
/// never yields the deploy.
async fn deploy_under_a_stepping_clock(s: Scenario) -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let clock = FakeClock::new(tmp.path(), s.start)?;
    let args = archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &["--segment-max-age", "200ms", "--idle-interval", "1s"],
    );
    let mut archiver = ArchiverProcess::start(&args, &clock.env(), &log)?;
    archiver.wait_writing(Duration::from_secs(20)).await?;

    put(&mut client, "/app/config", "good").await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if let Some(offset) = s.before_deploy {
        clock.set(offset)?;
        // The archiver compares clocks on its one-second tick.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let deploy_ms = real_now_ms();
    let deploy_rev = put(&mut client, "/app/config", "bad-deploy").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    clock.set(s.after_deploy)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..3 {
        put(&mut client, &format!("/app/later{i}"), "after").await?;
    }
    let last = current_revision(&mut client).await?;
    wait_archived(&url, 1, last, Duration::from_secs(20)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    anyhow::ensure!(status.success(), "archiver exited with {status}");

    // Each step was logged once and recorded in the archive.
    let text = std::fs::read_to_string(&log)?;
    let warned = text.matches("(a clock step)").count();
    let clock_dir = tmp.path().join("archive/gen-0000000000000001/clock");
    let mut recorded = Vec::new();
    for entry in std::fs::read_dir(&clock_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.matches('-').count() == 2 {
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(clock_dir.join(&name))?)?;
            recorded.push(json["offset_ms"].as_i64().unwrap_or(0));
        }
    }
    recorded.sort_unstable();
    assert_eq!(warned, s.steps, "clock-step warnings:\n{text}");
    assert_eq!(recorded.len(), s.steps, "recorded steps: {recorded:?}");
    assert!(
        recorded.iter().any(|o| o.abs() >= 55_000),
        "a step of about 60 s is recorded: {recorded:?}"
    );

    let time = rfc3339(deploy_ms - 1000);
    let bad = base64(b"bad-deploy");
    let (code, out, err) = run_restorer(&["export", "--archive", &url, "--time", &time], &[])?;
    match code {
        0 => assert!(
            !out.contains(&bad),
            "export --time {time} returned the deploy (revision {deploy_rev}):\n{out}\n{err}"
        ),
        3 => assert!(err.contains("wall clock stepped"), "{err}"),
        _ => panic!("export --time {time}: exit {code}\n{err}"),
    }
    let output = tmp.path().join("restored.db");
    let output_text = output.display().to_string();
    let (code, out, err) = run_restorer(
        &[
            "restore",
            "--archive",
            &url,
            "--time",
            &time,
            "--output",
            &output_text,
        ],
        &[],
    )?;
    match code {
        0 => {
            let revision: i64 = out
                .split("-> revision ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|r| r.parse().ok())
                .unwrap_or(i64::MAX);
            assert!(
                revision < deploy_rev,
                "restore --time {time} chose revision {revision}, the deploy is {deploy_rev}:\n{out}"
            );
        }
        3 => {
            assert!(err.contains("wall clock stepped"), "{err}");
            assert!(!output.exists());
        }
        _ => panic!("restore --time {time}: exit {code}\n{out}\n{err}"),
    }
    eprintln!("restore --time {time}: exit {code}\n{out}{err}");
    Ok(())
}

/// The reported failure: the archiver's clock 60 s behind, the deploy
/// written meanwhile, then the clock corrected.
#[tokio::test]
async fn a_clock_behind_then_corrected_never_shows_a_later_deploy() -> anyhow::Result<()> {
    Box::pin(deploy_under_a_stepping_clock(Scenario {
        start: "-60s",
        before_deploy: None,
        after_deploy: "+0s",
        steps: 1,
    }))
    .await
}

/// The reverse: a correct clock set 60 s back, the deploy written, then
/// corrected.
#[tokio::test]
async fn a_clock_stepped_back_then_corrected_never_shows_a_later_deploy() -> anyhow::Result<()> {
    Box::pin(deploy_under_a_stepping_clock(Scenario {
        start: "+0s",
        before_deploy: Some("-60s"),
        after_deploy: "+0s",
        steps: 2,
    }))
    .await
}
