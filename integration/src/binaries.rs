//! The real binaries: `etcd-archiver` processes and `etcd-restorer` runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{current_revision, mixed_workload, wait_archived, Rng};

/// Path of a workspace binary built next to the running test or bench.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let mut dir = exe.parent().expect("target/<profile>");
    // Test executables live in target/<profile>/deps.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    dir.join(name)
}

/// Flags for `etcd-archiver run` against `endpoints`, archiving to `archive`
/// with `data_dir`, plus `extra` flags.
pub fn archiver_args(
    endpoints: &str,
    archive: &str,
    data_dir: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = ["--endpoints", endpoints, "--archive", archive, "--data-dir"]
        .iter()
        .map(ToString::to_string)
        .collect();
    args.push(data_dir.display().to_string());
    args.extend(extra.iter().map(ToString::to_string));
    args
}

/// A running `etcd-archiver run`.
pub struct ArchiverProcess {
    /// The process.
    pub child: Option<Child>,
    /// Log file.
    pub log: PathBuf,
    /// Length of the log when this process started (it is appended to).
    log_start: u64,
}

impl ArchiverProcess {
    /// Waits until this process writes the archive (it was elected and
    /// watches the source), so that its election key is already written.
    ///
    /// # Errors
    /// On timeout, with the log's tail.
    pub async fn wait_writing(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let text = std::fs::read(&self.log)?;
            let own = String::from_utf8_lossy(&text[(self.log_start as usize).min(text.len())..]);
            if own.contains("watching the whole keyspace") {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("etcd-archiver did not start writing within {limit:?}:\n{own}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the archiver with `args` after `run`, and environment `env`.
    ///
    /// # Errors
    /// If it cannot be spawned.
    pub fn start(args: &[String], env: &[(String, String)], log: &Path) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let file_len = file.metadata()?.len();
        let mut cmd = Command::new(binary("etcd-archiver"));
        cmd.arg("run").args(args).stdout(Stdio::null()).stderr(file);
        cmd.env("ETCD_ARCHIVER_LOG", "info,etcd_archiver=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(Self {
            child: Some(cmd.spawn().context("spawn etcd-archiver")?),
            log: log.to_owned(),
            log_start: file_len,
        })
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// SIGTERM, then waits; returns the exit status and how long it took.
    ///
    /// # Errors
    /// If it does not exit within `limit`.
    pub fn terminate(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let mut child = self.child.take().context("already stopped")?;
        let started = Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > limit {
                child.kill().ok();
                bail!("etcd-archiver did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ArchiverProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `etcd-restorer` with `args`, returning (exit code, stdout, stderr).
///
/// # Errors
/// If it cannot be spawned.
pub fn run_restorer(
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<(i32, String, String)> {
    run_to_end("etcd-restorer", args, env)
}

/// Restores revision `revision` of the archive at `url` as a `follow`
/// seed (leases lengthened to 10 minutes) into `dir/{name}.db`.
///
/// # Errors
/// If the restorer fails.
pub fn restore_follow_seed(
    url: &str,
    revision: i64,
    dir: &Path,
    name: &str,
) -> anyhow::Result<PathBuf> {
    let file = dir.join(format!("{name}.db"));
    let (code, out, err) = run_restorer(
        &[
            "restore",
            "--archive",
            url,
            "--revision",
            &revision.to_string(),
            "--output",
            &file.display().to_string(),
            "--min-lease-ttl",
            "10m",
        ],
        &[],
    )?;
    anyhow::ensure!(code == 0, "restore exited {code}: {out}{err}");
    Ok(file)
}

/// Runs an `etcd-archiver` command that ends by itself (`prune`,
/// `snapshot`), returning (exit code, stdout, stderr).
///
/// # Errors
/// If it cannot be spawned.
pub fn run_archiver(
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<(i32, String, String)> {
    run_to_end("etcd-archiver", args, env)
}

fn run_to_end(
    name: &str,
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<(i32, String, String)> {
    let mut cmd = Command::new(binary(name));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().with_context(|| format!("run {name}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs `etcd-archiver run` with `args` while `ops` mixed operations are
/// written, waits until generation `generation` of the archive at `url`
/// holds them all, then stops the archiver with SIGTERM (which must exit 0).
/// Returns the revision reached.
///
/// # Errors
/// etcd, archiver or timeout failures.
#[allow(clippy::too_many_arguments)]
pub async fn archive_while(
    args: &[String],
    log: &Path,
    url: &str,
    generation: u64,
    client: &mut etcd_client::Client,
    rng: &mut Rng,
    ops: usize,
) -> anyhow::Result<i64> {
    let mut archiver = ArchiverProcess::start(args, &[], log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    mixed_workload(client, rng, ops).await?;
    let rev = current_revision(client).await?;
    wait_archived(url, generation, rev, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    anyhow::ensure!(status.success(), "etcd-archiver exited with {status}");
    Ok(rev)
}
