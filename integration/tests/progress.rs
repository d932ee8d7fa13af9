//! Progress of long steps as people and log collectors see it: log lines
//! (text or JSON, never a bar's escape codes or carriage returns) when
//! stderr is not a terminal, and a bar when it is.

use std::time::Duration;

use integration::{
    archiver_args, current_revision, mixed_workload, run_archiver, run_restorer, wait_archived,
    ArchiverProcess, EtcdVersion, Rng, TestBed,
};

/// Whether `text` holds what only a terminal should get: ANSI escapes or
/// carriage returns (a bar redrawn in place).
fn has_terminal_codes(text: &str) -> bool {
    text.contains('\x1b') || text.contains('\r')
}

/// The text log lines that end step `step` (`{step}: done, …`); a `step`
/// ending in a space names the steps it begins (`upload snapshot at
/// revision `).
fn finished<'a>(log: &'a str, step: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| {
            let Some((_, message)) = l.split_once("etcdpitr_common::progress: ") else {
                return false;
            };
            message.split_once(": done, ").is_some_and(|(name, _)| {
                name == step || (step.ends_with(' ') && name.starts_with(step))
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_log_lines_off_a_terminal_and_a_bar_on_one() -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let data = tmp.path().join("data");
    let args = archiver_args(
        &cluster.endpoints(),
        &url,
        &data,
        &["--segment-max-age", "200ms", "--snapshot-interval", "1s"],
    );
    let mut rng = Rng::new(9);
    mixed_workload(&mut client, &mut rng, 40).await?;
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    mixed_workload(&mut client, &mut rng, 40).await?;
    // Past at least one periodic snapshot.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    mixed_workload(&mut client, &mut rng, 40).await?;
    let head = current_revision(&mut client).await?;
    wait_archived(&url, 1, head, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success(), "etcd-archiver exited with {status}");

    // The daemon's periodic snapshots: lines in its log, never a bar.
    let daemon = std::fs::read_to_string(&log)?;
    for step in ["receive etcd snapshot", "upload snapshot at revision "] {
        assert!(!finished(&daemon, step).is_empty(), "{step}: {daemon}");
    }
    assert!(!has_terminal_codes(&daemon));

    // restore with stderr in a pipe: a line at the end of every step.
    let out_dir = tempfile::tempdir()?;
    let restore = |name: &str, extra: &[&str]| {
        let output = out_dir.path().join(name).display().to_string();
        let mut args = vec![
            "restore",
            "--archive",
            &url,
            "--output",
            &output,
            "--revision",
        ];
        let revision = head.to_string();
        args.push(&revision);
        args.extend(extra);
        // The default filter: the progress lines show without asking.
        let (code, stdout, stderr) = run_restorer(&args, &[])?;
        anyhow::ensure!(code == 0, "restore exited {code}: {stderr}");
        anyhow::ensure!(stdout.contains(&format!("restored revision {head}")));
        anyhow::Ok(stderr)
    };
    let text = restore("text.db", &[])?;
    assert!(!has_terminal_codes(&text), "{text:?}");
    for step in [
        "fetch snapshot at revision ",
        "replay",
        "read back restored file",
    ] {
        let lines = finished(&text, step);
        assert_eq!(lines.len(), 1, "{step}: {text}");
        assert!(lines[0].contains(" INFO "), "{text}");
    }
    let replay = finished(&text, "replay")[0];
    assert!(replay.contains(" revisions in "), "{replay}");

    // With JSON logs: every line is a JSON object; the steps are fields.
    let json = restore("json.db", &["--log-format", "json"])?;
    assert!(!has_terminal_codes(&json), "{json:?}");
    let mut steps = Vec::new();
    for line in json.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON ({e}): {line:?}"))?;
        if value["target"] == "etcdpitr_common::progress" {
            steps.push(
                value["fields"]["step"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    for step in ["replay", "read back restored file"] {
        assert!(steps.iter().any(|s| s == step), "{step}: {json}");
    }

    // On a terminal (a pseudo-terminal from script(1)): a bar, drawn over
    // itself and cleared when its step ends.
    let output = out_dir.path().join("tty.db").display().to_string();
    let command = format!(
        "{} restore --archive {url} --output {output} --revision {head}",
        integration::binary("etcd-restorer").display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .env_remove("ETCD_RESTORER_LOG")
        .output()?;
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(
        shown.contains(&format!("restored revision {head}")),
        "{shown}"
    );
    // (A terminal ends every line with \r\n: look for the bar itself.)
    assert!(
        shown.contains("read back restored file ["),
        "no bar: {shown:?}"
    );
    assert!(
        shown.contains("\x1b[2K"),
        "the bar was not cleared: {shown:?}"
    );

    // A closed stderr (`2>&-`) loses the lines, not the restore.
    let output = out_dir.path().join("closed.db").display().to_string();
    let closed = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "{} restore --archive {url} --output {output} --revision {head} 2>&-",
                integration::binary("etcd-restorer").display()
            ),
        ])
        .env("ETCD_RESTORER_LOG", "info")
        .output()?;
    let said = String::from_utf8_lossy(&closed.stdout);
    assert!(closed.status.success(), "{said}");
    assert!(
        said.contains(&format!("restored revision {head}")),
        "{said}"
    );

    // One-shot snapshot and prune, off a terminal: lines.
    let endpoints = cluster.endpoints();
    let data = data.display().to_string();
    let (code, _, err) = run_archiver(
        &[
            "snapshot",
            "--endpoints",
            &endpoints,
            "--archive",
            &url,
            "--data-dir",
            &data,
        ],
        &[],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(!has_terminal_codes(&err), "{err:?}");
    for step in ["receive etcd snapshot", "upload snapshot at revision "] {
        assert_eq!(finished(&err, step).len(), 1, "{step}: {err}");
    }
    let (code, _, err) = run_archiver(
        &["prune", "--archive", &url, "--keep-last", "1", "--confirm"],
        &[],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(!has_terminal_codes(&err), "{err:?}");
    let deleted = finished(&err, "delete pruned objects");
    assert_eq!(deleted.len(), 1, "{err}");
    assert!(!deleted[0].contains("done, 0 objects"), "{err}");
    Ok(())
}
