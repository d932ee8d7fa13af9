//! Follow benchmark: how fast `etcd-restorer follow` applies archived
//! revisions into an etcd with fsync, how far its destination lags behind
//! the source at sustained write rates (next to `etcdctl make-mirror` in the
//! same run), and how long the cutover takes once the source stops.
//!
//! Every etcd runs with fsync (3.5.1): the source, the follow destinations
//! and the make-mirror destinations. The archiver runs with
//! `--no-election --segment-max-age 1s --idle-interval 250ms` into a local
//! directory.
//!
//! 1. Ceiling: a backlog of single-put revisions (200-byte values, 64
//!    writers) is archived; a destination seeded before the backlog is
//!    brought forward with `follow --until-revision LAST` at
//!    `--max-in-flight` 1, 64, 256 and follow's default, each for at most
//!    45 s (the rate is then taken from the revision the destination holds).
//! 2. Lag: a paced writer puts into the source at a quarter of the ceiling
//!    measured at the default `--max-in-flight`, the ceiling, 1,000/s and
//!    3,000/s. For each rate a destination is seeded at the source's
//!    revision and followed with the default flags; then, with follow and
//!    its destination gone, the same paced run is copied by `make-mirror`
//!    (its prefix only) into a fresh etcd, so that neither shares the two
//!    cores with the other. Lag of a write = when the
//!    destination first showed it (polled every 20 ms) minus when the write
//!    returned at the source. follow keeps revisions, so its destination
//!    shows revision r when it holds r; make-mirror applies one transaction
//!    per source revision in order, so its destination holds the k-th
//!    write of the run (by source revision) once its own revision has moved
//!    k past where the run started.
//! 3. Cutover: a followed destination while the source writes for 10 s (at
//!    1,000/s or a quarter of the ceiling, whichever is lower); as soon as
//!    the last write returns, the running follow gets SIGUSR1 (the cutover
//!    request). The figure is the time from the source's last write until
//!    follow exits 0.
//!
//! Usage: `bench-follow [SECONDS] [BACKLOG]` (defaults 30 and 100000),
//! after `cargo build --release --workspace --bins`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use etcd_client::{Client, GetOptions, ResponseHeader};
use integration::{
    archiver_args, binary, current_revision, free_port, restore_follow_seed, wait_archived,
    ArchiverProcess, EtcdCluster, EtcdVersion, RestoredEtcd,
};

/// Writers of the backlog.
const BACKLOG_WRITERS: u64 = 64;
/// Concurrent writers of a paced run (each waits for its write's due time).
const PACED_WRITERS: usize = 128;
/// Clients the paced writers share.
const PACED_CLIENTS: usize = 16;
/// Bytes per value.
const VALUE_BYTES: usize = 200;
/// How long one ceiling run may apply before it is stopped and its rate
/// taken from what the destination holds (keeps the bench under about ten
/// minutes when follow is slow).
const CEILING_LIMIT: Duration = Duration::from_secs(45);
/// `--max-in-flight` values measured for the ceiling (and follow's
/// default, which sets the ceiling used for the lag).
const IN_FLIGHT: [usize; 3] = [1, 64, 256];
/// The archiver's flags.
const ARCHIVER_FLAGS: &[&str] = &[
    "--no-election",
    "--segment-max-age",
    "1s",
    "--idle-interval",
    "250ms",
];
/// How often the destinations' revisions are read.
const POLL: Duration = Duration::from_millis(20);
/// How long after a paced run follow may take to hold its last write.
const FOLLOW_DRAIN: Duration = Duration::from_secs(30);
/// How long after a paced run make-mirror may take to copy its last write.
const MIRROR_DRAIN: Duration = Duration::from_secs(30);
/// In follow's DEBUG line for a transaction that overtook its predecessor.
const OVERTAKEN: &str = "overtaken";
/// Keys per paced run's prefix (writes cycle through them).
const PACED_KEYS: u64 = 10_000;

/// follow's INFO line once it has proven the destination and starts applying.
const FOLLOWING: &str = "etcd_restorer::commands::follow: following revision=";
/// The cutover's paced run: this rate or a quarter of the ceiling,
/// whichever is lower, for this long.
const CUTOVER_RATE: u64 = 1000;
const CUTOVER_SECONDS: u64 = 10;

/// The load average (1, 5, 15 min): other work on the machine shows here.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A child process with stdout and stderr in files, killed (SIGKILL) and
/// reaped on drop.
struct Proc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, dir: &Path, name: &str) -> anyhow::Result<Self> {
        let (out, err) = (
            dir.join(format!("{name}.out")),
            dir.join(format!("{name}.err")),
        );
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Self { child, out, err })
    }

    /// The exit status, if it has exited.
    fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// How many lines of stderr contain `text`.
    fn stderr_count(&self, text: &str) -> usize {
        std::fs::read_to_string(&self.err)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(text))
            .count()
    }

    /// The last lines of stdout and stderr.
    fn logs(&self) -> String {
        let tail = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!("stdout:\n{}\nstderr:\n{}", tail(&self.out), tail(&self.err))
    }

    /// Fails (with the logs) if the process has exited.
    fn check_running(&mut self, what: &str) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{what} exited with {status}\n{}", self.logs());
        }
        Ok(())
    }

    /// Waits for the exit; returns the status and when it was seen (to
    /// within 10 ms).
    async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<(ExitStatus, Instant)> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, Instant::now()));
            }
            if started.elapsed() > limit {
                bail!("did not exit within {limit:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// `etcd-restorer follow` from `url` into `dest` with `extra` flags.
fn follow_cmd(url: &str, dest: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(binary("etcd-restorer"));
    cmd.args(["follow", "--archive", url, "--endpoints", dest])
        .args(extra)
        // DEBUG logs each overtaken transaction (counted below).
        .env("ETCD_RESTORER_LOG", "info,etcd_restorer=debug")
        .env("NO_COLOR", "1");
    cmd
}

/// follow's default `--max-in-flight`, from its help.
fn default_in_flight() -> anyhow::Result<usize> {
    let out = Command::new(binary("etcd-restorer"))
        .args(["follow", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    help.split_once("--max-in-flight")
        .and_then(|(_, rest)| rest.split_once("[default: "))
        .and_then(|(_, rest)| rest.split_once(']'))
        .and_then(|(n, _)| n.trim().parse().ok())
        .context("no default for --max-in-flight in `etcd-restorer follow --help`")
}

/// One Prometheus gauge from follow's /metrics.
async fn scrape(port: u16, name: &str) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let text = tokio::time::timeout(Duration::from_secs(2), async {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let mut out = String::new();
        c.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    })
    .await
    .context("metrics timed out")??;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

/// Writes `total` single-put revisions with [`BACKLOG_WRITERS`] writers.
async fn write_backlog(source: &EtcdCluster, total: u64) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..BACKLOG_WRITERS {
        let mut c = source.client().await?;
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let value = vec![b'b'; VALUE_BYTES];
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return anyhow::Ok(());
                }
                c.put(format!("/backlog/{:05}", n % 10_000), value.clone(), None)
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// One write of a paced run: its revision and when it returned.
#[derive(Clone, Copy)]
struct Write {
    revision: i64,
    at: Instant,
}

/// Puts `rate` times per second under `prefix` for `seconds` (cycling
/// through [`PACED_KEYS`] keys), each at its due time (as long as the
/// source keeps up). Returns the writes and
/// the rate achieved.
async fn paced_writes(
    source: &EtcdCluster,
    prefix: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(Vec<Write>, f64)> {
    let total = rate * seconds;
    let mut clients = Vec::new();
    for _ in 0..PACED_CLIENTS {
        clients.push(source.client().await?);
    }
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for w in 0..PACED_WRITERS {
        let mut c = clients[w % PACED_CLIENTS].clone();
        let (next, prefix) = (next.clone(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let value = vec![b'p'; VALUE_BYTES];
            let mut done = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return anyhow::Ok(done);
                }
                let due = t0 + Duration::from_secs_f64(n as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let resp = tokio::time::timeout(
                    Duration::from_secs(10),
                    c.put(
                        format!("{prefix}{:05}", n % PACED_KEYS),
                        value.clone(),
                        None,
                    ),
                )
                .await
                .context("a paced put took over 10 s")??;
                done.push(Write {
                    revision: resp.header().map_or(0, ResponseHeader::revision),
                    at: Instant::now(),
                });
            }
        }));
    }
    let mut writes = Vec::new();
    for t in tasks {
        writes.extend(t.await??);
    }
    writes.sort_by_key(|w| w.revision);
    let end = writes.iter().map(|w| w.at).max().unwrap_or(t0);
    let achieved = writes.len() as f64 / end.saturating_duration_since(t0).as_secs_f64();
    Ok((writes, achieved))
}

/// Reads a destination's revision every [`POLL`] until `stop`; returns
/// (when first seen, revision) each time it grew, and publishes the newest
/// in `latest`.
fn poll_revisions(
    mut client: Client,
    stop: Arc<AtomicBool>,
    latest: Arc<AtomicI64>,
) -> tokio::task::JoinHandle<Vec<(Instant, i64)>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut last = 0;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let get = client.get(
                "/bench-follow/probe",
                Some(GetOptions::new().with_count_only()),
            );
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), get).await {
                let rev = resp.header().map_or(0, ResponseHeader::revision);
                if rev > last {
                    last = rev;
                    samples.push((Instant::now(), rev));
                    latest.store(rev, Ordering::Relaxed);
                }
            }
        }
        samples
    })
}

/// When the destination first showed `revision`, if it did.
fn first_seen(samples: &[(Instant, i64)], revision: i64) -> Option<Instant> {
    let i = samples.partition_point(|(_, r)| *r < revision);
    samples.get(i).map(|(t, _)| *t)
}

/// A lag figure; a lower bound if the write was not seen by the end.
#[derive(Clone, Copy)]
struct Lag {
    secs: f64,
    seen: bool,
}

impl std::fmt::Display for Lag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.seen {
            write!(f, "{:.2}", self.secs)
        } else {
            write!(f, "≥{:.2}", self.secs)
        }
    }
}

/// p50, p99, max and how many writes were not seen.
struct Stats {
    p50: Lag,
    p99: Lag,
    max: Lag,
    unseen: usize,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {} / {}", self.p50, self.p99, self.max)?;
        if self.unseen > 0 {
            write!(f, " ({} writes not there yet)", self.unseen)?;
        }
        Ok(())
    }
}

/// Lags of `writes` (sorted by revision): `seen(k, write)` is when the
/// destination first held it; unseen writes count as `ended - returned`.
fn stats(
    writes: &[Write],
    ended: Instant,
    seen: impl Fn(usize, &Write) -> Option<Instant>,
) -> Stats {
    let mut lags: Vec<Lag> = writes
        .iter()
        .enumerate()
        .map(|(k, w)| match seen(k, w) {
            Some(t) => Lag {
                secs: t.saturating_duration_since(w.at).as_secs_f64(),
                seen: true,
            },
            None => Lag {
                secs: ended.saturating_duration_since(w.at).as_secs_f64(),
                seen: false,
            },
        })
        .collect();
    lags.sort_by(|a, b| a.secs.total_cmp(&b.secs).then(b.seen.cmp(&a.seen)));
    let at = |q: usize| lags[(lags.len() * q / 100).min(lags.len() - 1)];
    Stats {
        p50: at(50),
        p99: at(99),
        max: lags[lags.len() - 1],
        unseen: lags.iter().filter(|l| !l.seen).count(),
    }
}

/// What one paced run measured: follow's half, then make-mirror's.
struct Run {
    rate: u64,
    follow: FollowRun,
    mirror: MirrorRun,
}

/// follow's half of a paced run.
struct FollowRun {
    achieved: f64,
    writes: usize,
    lag: Stats,
    gauge_max: f64,
    source_rev: i64,
    dest_rev: i64,
    overtaken: usize,
}

/// make-mirror's half of a paced run.
struct MirrorRun {
    achieved: f64,
    writes: usize,
    lag: Stats,
    source_rev: i64,
    dest_rev: i64,
    /// Revisions its destination gained (its puts of the run).
    mirrored: i64,
}

/// A destination seeded from the archive at the source's current revision,
/// with `follow` (no `--until`) running into it.
struct Followed {
    dest: RestoredEtcd,
    follow: Proc,
    metrics_port: u16,
    seeded: i64,
}

/// The source, its archive and the bench's directory.
struct Bench<'a> {
    source: &'a EtcdCluster,
    url: &'a str,
    dir: &'a Path,
}

impl Bench<'_> {
    /// Seeds a destination at the source's current revision and starts
    /// follow into it; returns once follow has proven it and is applying.
    async fn followed(&self, name: &str) -> anyhow::Result<Followed> {
        let mut sc = self.source.client().await?;
        let seeded = current_revision(&mut sc).await?;
        wait_archived(self.url, 1, seeded, Duration::from_mins(1)).await?;
        let seed = restore_follow_seed(self.url, seeded, self.dir, &format!("seed-{name}"))?;
        let dest = RestoredEtcd::start(EtcdVersion::V35, &seed).await?;
        std::fs::remove_file(&seed)?;
        let metrics_port = free_port();
        let mut follow = Proc::spawn(
            &mut follow_cmd(
                self.url,
                &dest.client_url,
                &[
                    "--metrics-addr",
                    &format!("127.0.0.1:{metrics_port}"),
                    "--log-interval",
                    "5s",
                ],
            ),
            self.dir,
            &format!("follow-{name}"),
        )?;
        let started = Instant::now();
        while follow.stderr_count(FOLLOWING) == 0 {
            follow.check_running("follow")?;
            ensure!(
                started.elapsed() < Duration::from_mins(2),
                "follow did not start applying within 2 minutes\n{}",
                follow.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Followed {
            dest,
            follow,
            metrics_port,
            seeded,
        })
    }

    /// Waits until `f`'s destination holds the source's revision.
    async fn wait_caught_up(&self, f: &mut Followed, limit: Duration) -> anyhow::Result<()> {
        let mut sc = self.source.client().await?;
        let mut dc = f.dest.client().await?;
        let want = current_revision(&mut sc).await?;
        let started = Instant::now();
        while current_revision(&mut dc).await? < want {
            f.follow.check_running("follow")?;
            ensure!(
                started.elapsed() < limit,
                "follow's destination did not reach revision {want} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Applies the backlog after `seeded` through `last` from `seed` into a
    /// fresh etcd with `--max-in-flight in_flight`, for at most
    /// [`CEILING_LIMIT`].
    async fn ceiling(
        &self,
        seed: &Path,
        seeded: i64,
        last: i64,
        in_flight: usize,
    ) -> anyhow::Result<Ceiling> {
        eprintln!(
            "follow --max-in-flight {in_flight}: revisions {seeded}..{last} into a fresh etcd (at most {CEILING_LIMIT:?})"
        );
        let dest = RestoredEtcd::start(EtcdVersion::V35, seed).await?;
        let started = Instant::now();
        let mut p = Proc::spawn(
            &mut follow_cmd(
                self.url,
                &dest.client_url,
                &[
                    "--until-revision",
                    &last.to_string(),
                    "--max-in-flight",
                    &in_flight.to_string(),
                ],
            ),
            self.dir,
            &format!("ceiling-{in_flight}"),
        )?;
        let (finished, ended) = loop {
            if let Some(status) = p.exited()? {
                ensure!(
                    status.success(),
                    "follow --max-in-flight {in_flight} exited with {status}\n{}",
                    p.logs()
                );
                break (true, Instant::now());
            }
            if started.elapsed() >= CEILING_LIMIT {
                break (false, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let held = current_revision(&mut dest.client().await?).await?;
        if finished {
            ensure!(held == last, "the destination holds {held}, not {last}");
        }
        let overtaken = p.stderr_count(OVERTAKEN);
        drop(p);
        let c = Ceiling {
            in_flight,
            revisions: held - seeded,
            secs: ended.duration_since(started).as_secs_f64(),
            finished,
            overtaken,
        };
        eprintln!(
            "  {:.0} revisions/s, {} overtaken transactions",
            c.rate(),
            c.overtaken
        );
        Ok(c)
    }

    /// A paced run at `rate` for `seconds` into a fresh follow destination,
    /// then (once it is gone) the same into make-mirror and a fresh etcd:
    /// each tool gets the machine the other would otherwise share.
    async fn paced_run(&self, rate: u64, seconds: u64) -> anyhow::Result<Run> {
        let follow = Box::pin(self.paced_follow(rate, seconds)).await?;
        let mirror = Box::pin(self.paced_mirror(rate, seconds)).await?;
        Ok(Run {
            rate,
            follow,
            mirror,
        })
    }

    /// The follow half of a paced run.
    async fn paced_follow(&self, rate: u64, seconds: u64) -> anyhow::Result<FollowRun> {
        let mut f = self.followed(&rate.to_string()).await?;
        self.wait_caught_up(&mut f, Duration::from_secs(30)).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(AtomicI64::new(0));
        let poll = poll_revisions(f.dest.client().await?, stop.clone(), latest.clone());
        let port = f.metrics_port;
        let gauge_stop = stop.clone();
        let gauge = tokio::spawn(async move {
            let mut max = 0f64;
            while !gauge_stop.load(Ordering::Relaxed) {
                if let Ok(v) = scrape(port, "etcd_pitr_follow_lag_seconds").await {
                    max = max.max(v);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            max
        });
        let overtaken_before = f.follow.stderr_count(OVERTAKEN);
        let prefix = format!("/paced/{rate}/follow/");
        eprintln!("paced run: {rate} puts/s for {seconds} s under {prefix} (follow)");
        let (writes, achieved) = paced_writes(self.source, &prefix, rate, seconds).await?;
        let source_rev = writes.last().map_or(0, |w| w.revision);
        let wrote_at = Instant::now();
        while latest.load(Ordering::Relaxed) < source_rev && wrote_at.elapsed() <= FOLLOW_DRAIN {
            f.follow.check_running("follow")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ended = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let samples = poll.await?;
        let gauge_max = gauge.await?;
        let dest_rev = current_revision(&mut f.dest.client().await?).await?;
        f.follow.check_running("follow")?;
        let overtaken = f.follow.stderr_count(OVERTAKEN) - overtaken_before;
        drop(f);
        let lag = stats(&writes, ended, |_, w| first_seen(&samples, w.revision));
        eprintln!("  source {achieved:.0} puts/s; follow lag {lag}");
        Ok(FollowRun {
            achieved,
            writes: writes.len(),
            lag,
            gauge_max,
            source_rev,
            dest_rev,
            overtaken,
        })
    }

    /// The make-mirror half of a paced run.
    async fn paced_mirror(&self, rate: u64, seconds: u64) -> anyhow::Result<MirrorRun> {
        let mirror_etcd = EtcdCluster::start_with(EtcdVersion::V35, 1, true).await?;
        let mut mc = mirror_etcd.client().await?;
        let m0 = current_revision(&mut mc).await?;
        let prefix = format!("/paced/{rate}/mirror/");
        let mut mirror = Proc::spawn(
            Command::new(EtcdVersion::V35.bin_dir().join("etcdctl"))
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.source.endpoints(), "make-mirror"])
                .args(["--prefix", &prefix, &mirror_etcd.endpoints()]),
            self.dir,
            &format!("make-mirror-{rate}"),
        )?;
        // make-mirror copies one key first: then it watches.
        let mut sc = self.source.client().await?;
        sc.put(format!("{prefix}ready"), "1", None).await?;
        let started = Instant::now();
        while current_revision(&mut mc).await? <= m0 {
            mirror.check_running("make-mirror")?;
            ensure!(
                started.elapsed() < Duration::from_secs(30),
                "make-mirror copied nothing within 30 s\n{}",
                mirror.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let base = current_revision(&mut mc).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(AtomicI64::new(0));
        let poll = poll_revisions(mc.clone(), stop.clone(), latest.clone());
        eprintln!("paced run: {rate} puts/s for {seconds} s under {prefix} (make-mirror)");
        let (writes, achieved) = paced_writes(self.source, &prefix, rate, seconds).await?;
        let total = writes.len() as i64;
        let wrote_at = Instant::now();
        while latest.load(Ordering::Relaxed) < base + total && wrote_at.elapsed() <= MIRROR_DRAIN {
            mirror.check_running("make-mirror")?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ended = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let samples = poll.await?;
        let dest_rev = current_revision(&mut mc).await?;
        mirror.check_running("make-mirror")?;
        drop(mirror);
        let lag = stats(&writes, ended, |k, _| {
            first_seen(&samples, base + k as i64 + 1)
        });
        eprintln!("  source {achieved:.0} puts/s; make-mirror lag {lag}");
        Ok(MirrorRun {
            achieved,
            writes: writes.len(),
            lag,
            source_rev: writes.last().map_or(0, |w| w.revision),
            dest_rev,
            mirrored: dest_rev - base,
        })
    }

    /// A paced run at `rate` into a fresh follow destination; as soon as
    /// the last write returns, the running follow is asked for the cutover
    /// (SIGUSR1).
    async fn cutover(&self, rate: u64) -> anyhow::Result<Cutover> {
        let mut f = self.followed("cutover").await?;
        self.wait_caught_up(&mut f, Duration::from_secs(30)).await?;
        eprintln!("cutover: {rate} puts/s for {CUTOVER_SECONDS} s, then SIGUSR1 to follow");
        let (writes, _) =
            paced_writes(self.source, "/paced/cutover/", rate, CUTOVER_SECONDS).await?;
        let last_write = writes.iter().map(|w| w.at).max().context("no writes")?;
        let last_rev = writes.iter().map(|w| w.revision).max().unwrap_or(0);
        f.follow.check_running("follow")?;
        let signalled = Command::new("kill")
            .args(["-USR1", &f.follow.child.id().to_string()])
            .status()?;
        ensure!(signalled.success(), "kill -USR1 failed");
        let mut dc = f.dest.client().await?;
        let behind = last_rev - current_revision(&mut dc).await?;
        let (status, exited) = f.follow.wait_exit(Duration::from_mins(3)).await?;
        ensure!(
            status.success(),
            "follow after SIGUSR1 exited with {status}\n{}",
            f.follow.logs()
        );
        let line = f
            .follow
            .stdout()
            .lines()
            .find(|l| l.starts_with("caught up:"))
            .map(str::to_owned)
            .with_context(|| format!("no `caught up:` line\n{}", f.follow.logs()))?;
        let mut sc = self.source.client().await?;
        let source_rev = current_revision(&mut sc).await?;
        let dest_rev = current_revision(&mut dc).await?;
        let mut equal = true;
        for rev in [f.seeded, f.seeded.midpoint(source_rev), source_rev] {
            equal &= sc.hash_kv(rev).await?.hash() == dc.hash_kv(rev).await?.hash();
        }
        Ok(Cutover {
            rate,
            secs: exited.duration_since(last_write).as_secs_f64(),
            behind,
            line,
            source_rev,
            dest_rev,
            equal,
        })
    }
}

/// What one ceiling run measured.
struct Ceiling {
    in_flight: usize,
    revisions: i64,
    secs: f64,
    /// It reached the backlog's last revision (else stopped at the limit).
    finished: bool,
    overtaken: usize,
}

impl Ceiling {
    fn rate(&self) -> f64 {
        self.revisions as f64 / self.secs
    }
}

/// What the cutover measured.
struct Cutover {
    rate: u64,
    /// From the source's last write to `--until-caught-up` exiting 0.
    secs: f64,
    /// Revisions the destination lacked when follow was signalled.
    behind: i64,
    line: String,
    source_rev: i64,
    dest_rev: i64,
    /// HashKV equal at the seed, midway and the last revision.
    equal: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tokio::select! {
        r = Box::pin(run()) => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

async fn run() -> anyhow::Result<()> {
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(Ok(30), |s| s.parse())?;
    let backlog: u64 = args.next().map_or(Ok(100_000), |s| s.parse())?;
    let mut tmp = tempfile::Builder::new().prefix("bench-follow-").tempdir()?;
    if std::env::var_os("BENCH_FOLLOW_KEEP").is_some() {
        tmp.disable_cleanup(true);
        eprintln!("keeping {} (BENCH_FOLLOW_KEEP)", tmp.path().display());
    }
    let dir = tmp.path();
    let load_at_start = load_average();
    let url = format!("file://{}/archive", dir.display());

    let source = EtcdCluster::start_with(EtcdVersion::V35, 1, true).await?;
    let mut sc = source.client().await?;
    let args = archiver_args(
        &source.endpoints(),
        &url,
        &dir.join("archiver-data"),
        ARCHIVER_FLAGS,
    );
    let archiver = ArchiverProcess::start(&args, &[], &dir.join("archiver.log"))?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    for i in 0..10 {
        sc.put(format!("/bench-follow/init/{i}"), "x", None).await?;
    }
    let seeded = current_revision(&mut sc).await?;
    wait_archived(&url, 1, seeded, Duration::from_secs(30)).await?;
    let early_seed = restore_follow_seed(&url, seeded, dir, "seed-early")?;
    let bench = Bench {
        source: &source,
        url: &url,
        dir,
    };

    // 1. The ceiling: a backlog applied as fast as follow can.
    eprintln!("writing a backlog of {backlog} revisions with {BACKLOG_WRITERS} writers");
    let started = Instant::now();
    write_backlog(&source, backlog).await?;
    let backlog_rate = backlog as f64 / started.elapsed().as_secs_f64();
    let last = current_revision(&mut sc).await?;
    wait_archived(&url, 1, last, Duration::from_mins(5)).await?;
    let default = default_in_flight()?;
    let mut in_flights = IN_FLIGHT.to_vec();
    in_flights.push(default);
    in_flights.sort_unstable();
    in_flights.dedup();
    let mut ceilings = Vec::new();
    for in_flight in in_flights {
        ceilings.push(Box::pin(bench.ceiling(&early_seed, seeded, last, in_flight)).await?);
    }
    let ceiling = ceilings
        .iter()
        .find(|c| c.in_flight == default)
        .map_or(0, |c| (c.rate() / 100.0).floor() as u64 * 100);

    // 2. Lag at sustained rates, follow next to make-mirror.
    let quarter = ceiling / 4 / 50 * 50;
    let mut rates = vec![quarter, 1000, 3000, ceiling];
    rates.sort_unstable();
    rates.dedup();
    let mut runs = Vec::new();
    for rate in rates.into_iter().filter(|&r| r > 0) {
        runs.push(Box::pin(bench.paced_run(rate, seconds)).await?);
    }

    // 3. Cutover: the source stops; follow is restarted with --until-caught-up.
    let cutover_rate = CUTOVER_RATE.min(quarter.max(50));
    let cut = Box::pin(bench.cutover(cutover_rate)).await?;
    drop(archiver);

    println!("Command: `{command_line}`");
    println!();
    println!(
        "{} cores (load average {load_at_start} at the start, {} at the end); etcd 3.5.1 with fsync (source and every destination); archiver {}.",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        load_average(),
        ARCHIVER_FLAGS.join(" ")
    );
    println!();
    println!(
        "Ceiling: {backlog} single-put revisions of {VALUE_BYTES}-byte values ({BACKLOG_WRITERS} writers, {backlog_rate:.0} puts/s at the source), applied by `follow --until-revision {last}` into a fresh etcd seeded at revision {seeded}, for at most {} s each; wall time includes start and proof.",
        CEILING_LIMIT.as_secs()
    );
    println!();
    println!("| follow --max-in-flight | revisions applied | wall s | revisions/s | guards failed (overtaken, resent in order) |");
    println!("|---|---|---|---|---|");
    for c in &ceilings {
        println!(
            "| {}{} | {}{} | {:.2} | {:.0} | {} |",
            c.in_flight,
            if c.in_flight == default {
                " (default)"
            } else {
                ""
            },
            c.revisions,
            if c.finished {
                ""
            } else {
                " (stopped at the limit)"
            },
            c.secs,
            c.rate(),
            c.overtaken
        );
    }
    println!();
    println!(
        "Lag: {seconds} s paced runs of {VALUE_BYTES}-byte puts ({PACED_WRITERS} writers, {PACED_KEYS} keys per run) at each rate, first into a fresh follow destination seeded at the source's revision (follow with its default flags), then, with follow and its etcd gone, into a fresh make-mirror destination; the ceiling is the default --max-in-flight ({default}) rate rounded down to 100 ({ceiling}/s). Lag = first seen at the destination (polled every {} ms) − the source's reply; ≥: not there {} s (follow) / {} s (make-mirror) after the last write.",
        POLL.as_millis(),
        FOLLOW_DRAIN.as_secs(),
        MIRROR_DRAIN.as_secs()
    );
    println!();
    println!("| target puts/s | tool | source achieved puts/s | writes | lag p50 / p99 / max s | follow lag gauge max s | follow guards failed | revision at end: source / destination |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &runs {
        let label = if r.rate == ceiling {
            " (ceiling)"
        } else if r.rate == quarter {
            " (ceiling / 4)"
        } else {
            ""
        };
        let (f, m) = (&r.follow, &r.mirror);
        println!(
            "| {}{label} | follow | {:.0} | {} | {} | {:.2} | {} | {} / {} |",
            r.rate, f.achieved, f.writes, f.lag, f.gauge_max, f.overtaken, f.source_rev, f.dest_rev
        );
        println!(
            "| {}{label} | make-mirror | {:.0} | {} | {} | – | – | {} / {} ({} puts) |",
            r.rate, m.achieved, m.writes, m.lag, m.source_rev, m.dest_rev, m.mirrored
        );
    }
    println!();
    println!(
        "| cutover after {CUTOVER_SECONDS} s at {} puts/s | value |",
        cut.rate
    );
    println!("|---|---|");
    println!(
        "| source's last write → follow (SIGUSR1 at once) exit 0 | {:.2} s |",
        cut.secs
    );
    println!(
        "| revisions the destination lacked when follow was signalled | {} |",
        cut.behind
    );
    println!("| follow's line | {} |", cut.line);
    println!(
        "| final revision: source / follow destination | {} / {} (HashKV {}) |",
        cut.source_rev,
        cut.dest_rev,
        if cut.equal { "equal" } else { "DIFFERENT" }
    );
    Ok(())
}
