//! End-to-end tests of what both binaries share (`etcdpitr_common::cli`):
//! the archiver keeps archiving with its stderr closed or broken, results
//! printed to a reader that went away are no error, `--log-format json`
//! prints one JSON object per line, a bare `debug` filter leaves out the
//! HTTP/2 stack's chatter, text logs are coloured only on a terminal and
//! without `NO_COLOR`, and shell completions and man pages come out of the
//! clap definitions.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use integration::{
    archiver_args, binary, current_revision, mixed_workload, wait_archived, EtcdVersion, Rng,
    TestBed,
};

/// Segments sealed fast, so a few hundred writes are archived in seconds.
const FAST: &[&str] = &["--segment-max-age", "300ms", "--snapshot-interval", "3s"];

/// A running `etcd-archiver run`, killed on drop (a failed test leaves no
/// archiver behind).
struct Archiver(Option<Child>);

impl Archiver {
    /// Starts `etcd-archiver run` for the bed's cluster and archive with
    /// `log_filter`, extra flags `extra`, and `stderr` as its stderr.
    fn start(
        bed: &TestBed,
        log_filter: &str,
        extra: &[&str],
        stderr: Stdio,
    ) -> anyhow::Result<Self> {
        let mut flags = FAST.to_vec();
        flags.extend_from_slice(extra);
        let args = archiver_args(
            &bed.cluster.endpoints(),
            &bed.url,
            &bed.tmp.path().join("data"),
            &flags,
        );
        let child = Command::new(binary("etcd-archiver"))
            .arg("run")
            .args(&args)
            .env("ETCD_ARCHIVER_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("spawn etcd-archiver")?;
        Ok(Self(Some(child)))
    }

    /// Fails if the process has exited.
    fn running(&mut self) -> anyhow::Result<()> {
        let child = self.0.as_mut().context("stopped")?;
        if let Some(status) = child.try_wait()? {
            bail!("etcd-archiver exited with {status}");
        }
        Ok(())
    }

    /// SIGTERM, then waits up to 20 s for the exit status.
    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.0.take().context("stopped")?;
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > Duration::from_secs(20) {
                child.kill().ok();
                child.wait().ok();
                bail!("etcd-archiver did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// Writes through the bed's client while `archiver` runs, waits until the
/// archive's first generation holds every write, checks the archiver still
/// runs, and returns the revision reached.
async fn archive_some(
    bed: &mut TestBed,
    archiver: &mut Archiver,
    seed: u64,
) -> anyhow::Result<i64> {
    let mut rng = Rng::new(seed);
    mixed_workload(&mut bed.client, &mut rng, 300).await?;
    let rev = current_revision(&mut bed.client).await?;
    wait_archived(&bed.url, 1, rev, Duration::from_mins(1)).await?;
    archiver.running()?;
    Ok(rev)
}

/// `etcd-archiver run 2>&-` with debug logging: writes are archived, and
/// SIGTERM still ends it cleanly. Then `etcd-restorer list` and `history`
/// whose readers closed their ends before the output came: no error, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_with_stderr_closed() -> anyhow::Result<()> {
    let mut bed = TestBed::start(EtcdVersion::V35, 1).await?;
    // `2>&-` as a shell does it: the archiver starts without an fd 2.
    let mut args = vec!["-c".to_owned(), r#"exec "$0" run "$@" 2>&-"#.to_owned()];
    args.push(binary("etcd-archiver").display().to_string());
    args.extend(archiver_args(
        &bed.cluster.endpoints(),
        &bed.url,
        &bed.tmp.path().join("data"),
        FAST,
    ));
    let child = Command::new("sh")
        .args(&args)
        .env("ETCD_ARCHIVER_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let mut archiver = Archiver(Some(child));
    let rev = archive_some(&mut bed, &mut archiver, 21).await?;
    let status = archiver.terminate()?;
    ensure!(status.success(), "etcd-archiver exited with {status}");

    // The restorer sees the archive through `rev`, and a closed stdout
    // (`etcd-restorer list | head -0`) is no failure.
    let (code, out, err) =
        integration::run_restorer(&["list", "--archive", &bed.url, "--json"], &[])?;
    ensure!(code == 0, "list exited {code}: {err}");
    let listing: serde_json::Value = serde_json::from_str(&out)?;
    let restorable_to = listing["generations"][0]["restorable"][0]["last_revision"].as_i64();
    ensure!(
        restorable_to >= Some(rev),
        "list does not show revision {rev} restorable: {out}"
    );
    let mut list = Command::new(binary("etcd-restorer"))
        .args(["list", "--archive", &bed.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(list.stdout.take());
    let done = list.wait_with_output()?;
    let err = String::from_utf8_lossy(&done.stderr);
    ensure!(
        done.status.success() && err.is_empty(),
        "list into a closed pipe: {}: {err}",
        done.status
    );
    // `history` writes a note to stderr and results to stdout: both gone.
    let mut history = Command::new(binary("etcd-restorer"))
        .args(["history", "--archive", &bed.url, "--key", "/w/", "--prefix"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(history.stdout.take());
    drop(history.stderr.take());
    let status = history.wait()?;
    ensure!(status.success(), "history into closed pipes: {status}");
    Ok(())
}

/// The archiver's stderr is a pipe whose reader is gone (a log collector
/// died): every log write fails with EPIPE, and it keeps archiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_with_a_broken_stderr() -> anyhow::Result<()> {
    let mut bed = TestBed::start(EtcdVersion::V35, 1).await?;
    let mut archiver = Archiver::start(&bed, "debug", &[], Stdio::piped())?;
    let stderr = archiver.0.as_mut().and_then(|c| c.stderr.take());
    drop(stderr);
    archive_some(&mut bed, &mut archiver, 22).await?;
    // Once more, well after the first failed writes.
    archive_some(&mut bed, &mut archiver, 23).await?;
    let status = archiver.terminate()?;
    ensure!(status.success(), "etcd-archiver exited with {status}");
    Ok(())
}

/// Lines per target of a JSON log, failing on a line that is not a JSON
/// object with `timestamp`, `level`, `target` and `fields`.
fn json_targets(log: &Path) -> anyhow::Result<BTreeMap<(String, String), usize>> {
    let text = std::fs::read_to_string(log)?;
    let mut targets = BTreeMap::new();
    for line in text.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(serde_json::Value::as_str)
                .map(ToOwned::to_owned)
                .with_context(|| format!("no {name} in {line}"))
        };
        field("timestamp")?;
        ensure!(
            value
                .get("fields")
                .is_some_and(serde_json::Value::is_object),
            "no fields in {line}"
        );
        *targets
            .entry((field("target")?, field("level")?))
            .or_insert(0) += 1;
    }
    ensure!(!targets.is_empty(), "empty log");
    Ok(targets)
}

/// Dependency crates that must stay out of a bare `debug` log.
const NOISY: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "reqwest",
    "rustls",
];

fn is_noise(target: &str) -> bool {
    NOISY
        .iter()
        .any(|n| target == *n || target.starts_with(&format!("{n}::")))
}

/// `--log-format json` with `ETCD_ARCHIVER_LOG=debug`: every line is a JSON
/// object, the archiver's own debug lines are there, the HTTP/2 stack's are
/// not. Naming a crate (`debug,h2=debug`) brings its lines back, so their
/// absence above is the filter's doing; the text format written to a file
/// has no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_without_dependency_noise() -> anyhow::Result<()> {
    let mut bed = TestBed::start(EtcdVersion::V35, 1).await?;
    let log = bed.tmp.path().join("json.log");
    let mut archiver = Archiver::start(
        &bed,
        "debug",
        &["--log-format", "json"],
        std::fs::File::create(&log)?.into(),
    )?;
    archive_some(&mut bed, &mut archiver, 31).await?;
    ensure!(archiver.terminate()?.success());
    let targets = json_targets(&log)?;
    let noise: Vec<_> = targets.keys().filter(|(t, _)| is_noise(t)).collect();
    ensure!(
        noise.is_empty(),
        "dependency lines under a bare debug: {noise:?}"
    );
    ensure!(
        targets
            .keys()
            .any(|(t, l)| t.starts_with("etcd_archiver") && l == "DEBUG"),
        "no debug line of the archiver's own: {targets:?}"
    );

    let text_log = bed.tmp.path().join("text.log");
    let mut archiver = Archiver::start(
        &bed,
        "debug,h2=debug",
        &[],
        std::fs::File::create(&text_log)?.into(),
    )?;
    archive_some(&mut bed, &mut archiver, 32).await?;
    ensure!(archiver.terminate()?.success());
    let text = std::fs::read_to_string(&text_log)?;
    ensure!(
        text.lines().any(|l| l.contains(" h2::")),
        "h2 named in the filter, yet no h2 line"
    );
    ensure!(
        !text
            .lines()
            .any(|l| l.contains(" hyper_util::") || l.contains(" tower::")),
        "only h2 was named"
    );
    ensure!(!text.contains('\u{1b}'), "colour codes in a log file");
    // The format from the environment: a one-off snapshot.
    let data = bed.tmp.path().join("data").display().to_string();
    let endpoints = bed.cluster.endpoints();
    let (code, out, err) = integration::run_archiver(
        &[
            "snapshot",
            "--endpoints",
            &endpoints,
            "--archive",
            &bed.url,
            "--data-dir",
            &data,
        ],
        &[
            ("ETCD_ARCHIVER_LOG".to_owned(), "debug".to_owned()),
            ("ETCD_ARCHIVER_LOG_FORMAT".to_owned(), "json".to_owned()),
        ],
    )?;
    ensure!(
        code == 0 && out.starts_with("snapshot archived"),
        "snapshot: {err}"
    );
    let snapshot_log = bed.tmp.path().join("snapshot.log");
    std::fs::write(&snapshot_log, err)?;
    json_targets(&snapshot_log)?;
    Ok(())
}

/// The subcommands a binary's `--help` lists (without `help`).
fn subcommands(name: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new(binary(name)).arg("--help").output()?;
    ensure!(out.status.success());
    let help = String::from_utf8(out.stdout)?;
    let commands = help
        .split("Commands:\n")
        .nth(1)
        .context("no Commands section")?
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(ToOwned::to_owned)
        .collect::<Vec<_>>();
    ensure!(commands.len() >= 4, "{help}");
    Ok(commands)
}

/// Completion scripts for every shell; the bash one names every
/// subcommand. Man pages for the binary and each subcommand, each a roff
/// page with its title, rendered by `man -l` where man is installed.
#[test]
fn completions_and_man_pages() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let have_man = Command::new("man").arg("-w").arg("man").output().is_ok();
    for name in ["etcd-archiver", "etcd-restorer"] {
        let commands = subcommands(name)?;
        ensure!(commands.iter().any(|c| c == "completions") && commands.iter().any(|c| c == "man"));
        for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
            let out = Command::new(binary(name))
                .args(["completions", shell])
                .output()?;
            ensure!(out.status.success(), "{name} completions {shell}: {out:?}");
            let script = String::from_utf8(out.stdout)?;
            ensure!(script.contains(name), "{name} completions {shell}");
            if shell == "bash" {
                for c in &commands {
                    let case = format!("{}__subcmd__{c}", name.replace('-', "__"));
                    ensure!(script.contains(&case), "{name}: bash completion lacks {c}");
                }
            }
        }
        let dir = tmp.path().join(name);
        let out = Command::new(binary(name))
            .args(["man", "--out-dir", &dir.display().to_string()])
            .output()?;
        ensure!(out.status.success(), "{name} man: {out:?}");
        let pages =
            std::iter::once(name.to_owned()).chain(commands.iter().map(|c| format!("{name}-{c}")));
        for page in pages {
            let path = dir.join(format!("{page}.1"));
            let text = std::fs::read_to_string(&path).with_context(|| format!("{page}.1"))?;
            // roff's apostrophe preamble (`.ie`/`.el`), then the title.
            let title = text
                .lines()
                .find(|l| !l.starts_with(".ie ") && !l.starts_with(".el "))
                .unwrap_or_default();
            ensure!(
                title.starts_with(&format!(".TH {page} 1 ")),
                "{page}.1: {title}"
            );
            ensure!(text.contains(".SH NAME") && text.contains(".SH SYNOPSIS"));
            if have_man {
                let out = Command::new("man")
                    .arg("-l")
                    .arg(&path)
                    .env("MANPAGER", "cat")
                    .env("MANWIDTH", "80")
                    .output()?;
                let err = String::from_utf8_lossy(&out.stderr);
                ensure!(
                    out.status.success() && err.is_empty(),
                    "man -l {page}.1: {err}"
                );
                ensure!(String::from_utf8_lossy(&out.stdout).contains("SYNOPSIS"));
            }
        }
    }
    Ok(())
}

/// Text logs are coloured on a terminal (a pty from `script`), and not
/// with `NO_COLOR` set.
#[test]
fn colour_only_on_a_terminal_without_no_color() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    for (no_color, coloured) in [("", true), ("1", false)] {
        let dir = tmp.path().join(format!("no-color-{no_color}"));
        // No etcd at port 1: the archiver logs that it created the archive,
        // then retries until `timeout` ends it.
        let archiver = format!(
            "timeout -s TERM 3 {} run --endpoints http://127.0.0.1:1 --archive file://{}/archive --data-dir {}/data",
            binary("etcd-archiver").display(),
            dir.display(),
            dir.display()
        );
        let out = Command::new("script")
            .args(["-qec", &archiver, "/dev/null"])
            .env("NO_COLOR", no_color)
            .stdin(Stdio::null())
            .output()
            .context("run script (util-linux)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(text.contains("created a new archive"), "{text}");
        ensure!(
            text.contains('\u{1b}') == coloured,
            "NO_COLOR={no_color:?}: {text}"
        );
    }
    Ok(())
}

/// The option blocks of a long `--help`: the flag (`--name`) and its text.
fn help_blocks(binary_name: &str, args: &[&str]) -> anyhow::Result<BTreeMap<String, String>> {
    let out = Command::new(binary(binary_name))
        .args(args)
        .arg("--help")
        .output()?;
    ensure!(out.status.success(), "{args:?} --help: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    let mut blocks = BTreeMap::new();
    for block in text.split("\n      --").skip(1) {
        let name = block.split([' ', '[', '\n']).next().unwrap_or_default();
        blocks.insert(
            format!("--{name}"),
            block.split_whitespace().collect::<Vec<_>>().join(" "),
        );
    }
    Ok(blocks)
}

/// `--help` shows every default next to its flag, from the constants that
/// resolution applies, and the environment variable of every setting; a
/// setting given only as a variable (or in the file the variable names) is
/// used: a bad one is refused with exit 2 naming the flag.
#[test]
fn help_shows_defaults_and_env_vars_and_env_is_read() -> anyhow::Result<()> {
    use etcd_archiver::config as c;
    use etcdpitr_common::settings::{format_duration, format_size};
    let run = help_blocks("etcd-archiver", &["run"])?;
    let defaults = [
        ("--endpoints", c::DEFAULT_ENDPOINT.to_owned()),
        ("--data-dir", c::DEFAULT_DATA_DIR.to_owned()),
        (
            "--snapshot-interval",
            format_duration(c::DEFAULT_SNAPSHOT_INTERVAL),
        ),
        (
            "--segment-max-age",
            format_duration(c::DEFAULT_SEGMENT_MAX_AGE),
        ),
        (
            "--segment-max-bytes",
            format_size(c::DEFAULT_SEGMENT_MAX_BYTES),
        ),
        ("--spool-max-bytes", format_size(c::DEFAULT_SPOOL_MAX_BYTES)),
        (
            "--upload-concurrency",
            c::DEFAULT_UPLOAD_CONCURRENCY.to_string(),
        ),
        (
            "--idle-interval",
            format_duration(c::DEFAULT_IDLE_SEAL_INTERVAL),
        ),
        (
            "--shutdown-timeout",
            format_duration(c::DEFAULT_SHUTDOWN_TIMEOUT),
        ),
        ("--election-prefix", c::DEFAULT_ELECTION_PREFIX.to_owned()),
        ("--election-ttl", format_duration(c::DEFAULT_ELECTION_TTL)),
        (
            "--prune-interval",
            format_duration(etcd_archiver::prune::DEFAULT_PRUNE_INTERVAL),
        ),
        ("--ready-max-lag", format_duration(c::DEFAULT_READY_MAX_LAG)),
        (
            "--heartbeat-interval",
            format_duration(c::DEFAULT_HEARTBEAT_INTERVAL),
        ),
    ];
    for (flag, default) in &defaults {
        let block = run
            .get(*flag)
            .with_context(|| format!("{flag} in run --help"))?;
        ensure!(
            block.contains(&format!("[default: {default}]")),
            "{flag}: {block}"
        );
    }
    ensure!(run["--segment-max-bytes"].contains("[default: 16MiB]"));
    for (flag, block) in &run {
        if flag == "--help" || flag == "--log-format" {
            continue;
        }
        let env = format!(
            "[env: ETCD_ARCHIVER_{}=",
            flag[2..].to_uppercase().replace('-', "_")
        );
        ensure!(block.contains(&env), "{flag}: {block}");
    }
    let check = help_blocks("etcd-archiver", &["check"])?;
    ensure!(
        check["--max-rpo"].contains("[default: 1m]"),
        "{}",
        check["--max-rpo"]
    );
    ensure!(check["--segment-max-age"].contains("[default: 5s]"));
    let restorer = help_blocks("etcd-restorer", &["restore"])?;
    ensure!(
        restorer["--max-staleness"].contains("[default: 2m]")
            && restorer["--max-staleness"].contains("[env: ETCD_RESTORER_MAX_STALENESS="),
        "{}",
        restorer["--max-staleness"]
    );
    ensure!(
        !restorer["--output"].contains("[env:"),
        "a target is never a variable"
    );
    let follow = help_blocks("etcd-restorer", &["follow"])?;
    ensure!(follow["--poll-interval"].contains("[default: 200ms]"));

    // Env and the file named by env are read before anything connects.
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("settings.toml");
    std::fs::write(
        &file,
        "archive = \"file:///nonexistent\"\nspool-max-bytes = \"0.5\"\n",
    )?;
    let out = Command::new(binary("etcd-archiver"))
        .arg("snapshot")
        .env("ETCD_ARCHIVER_CONFIG", &file)
        .env("ETCD_ARCHIVER_SEGMENT_MAX_BYTES", "1.5MiB")
        .env("ETCD_ARCHIVER_LOG", "warn")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "{out:?}");
    ensure!(
        stderr.contains("--spool-max-bytes: \"0.5\" is a fraction of a byte"),
        "{stderr}"
    );
    let out = Command::new(binary("etcd-archiver"))
        .args(["snapshot", "--spool-max-bytes", "1GiB"])
        .env("ETCD_ARCHIVER_CONFIG", &file)
        .env("ETCD_ARCHIVER_SEGMENT_MAX_BYTES", "-1MiB")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "{out:?}");
    ensure!(
        stderr.contains("--segment-max-bytes: \"-1MiB\""),
        "{stderr}"
    );
    Ok(())
}
