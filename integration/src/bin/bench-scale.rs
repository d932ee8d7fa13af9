//! GB-scale benchmark: etcd-pitr next to etcd's own tools on one database,
//! in one run.
//!
//! Starts etcd 3.5 (`--unsafe-no-fsync`), fills it with the Kubernetes-like
//! workload (`integration::loadgen`) until its database reaches SIZE, then:
//! 1. the archiver's first full snapshot (into a `file://` archive) until the
//!    listing shows it, next to `etcdctl snapshot save`;
//! 2. more writes at the highest rate (the archiver keeps up or lags);
//! 3. `etcd-restorer restore` of the newest revision next to `cp` + `sync` of
//!    etcd's own snapshot at that revision (output size too);
//! 4. the same restore from a read-only S3 endpoint serving the archive's
//!    files (`integration::file_s3`), directly and through a proxy adding
//!    latency per request, next to the local restore;
//! 5. a second archiver writing to S3 (moto) through such a proxy: its first
//!    snapshot, and whether it keeps up with writes at the highest rate;
//! 6. time to a running restored etcd (restore + `etcdutl snapshot restore` +
//!    start + first read) next to the same from etcd's own snapshot;
//! 7. `HashKV` of the restored member at the restored revision against the
//!    source's.
//!
//! Usage: `bench-scale SIZE [--writers N] [--more-secs N] [--delay-ms N]`
//! (SIZE e.g. `1GB`, `3GB`; defaults 64 writers, 10 s of writes after the
//! snapshot, 50 ms of latency added per request, half each way), after
//! `cargo build --release --bins`.
//! Needs about 5 × SIZE of free space in the temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::settings::parse_size;
use etcdpitr_common::store::Archive;
use integration::loadgen::{run_load, LoadOptions, LoadSummary, Until};
use integration::{
    archiver_args, binary, peak_rss_mib, timed, ArchiverProcess, DelayProxy, EtcdCluster,
    EtcdVersion, FileS3Server, RestoredEtcd, S3Server, Timing,
};

const USAGE: &str =
    "usage: bench-scale SIZE [--writers N] [--more-secs N] [--delay-ms N] [--rounds N]
       bench-scale --restore-only ARCHIVE_DIR REVISION REFERENCE_DB [--delay-ms N] [--rounds N]";
/// Free space needed, in multiples of SIZE: etcd's database, etcd's two
/// snapshots, the archive and the slow archiver's copy in moto, two restored
/// files and the restored members' data directories, not all at once.
const SPACE_FACTOR: u64 = 5;
/// Segment age limit of the benchmark's archivers.
const SEGMENT_MAX_AGE: &str = "2s";
const BUCKET: &str = "pitr";

/// What to run.
enum Run {
    /// Everything, on a database of this size.
    Full { size_bytes: u64, size_text: String },
    /// Only the restore rows, on an existing archive directory, against
    /// etcd's own snapshot at `revision`.
    RestoreOnly {
        archive_dir: PathBuf,
        revision: i64,
        reference: PathBuf,
    },
}

struct Settings {
    run: Run,
    writers: u64,
    more_secs: u64,
    /// Latency added per request (a round trip): half of it each way.
    delay: Duration,
    /// Rounds of the restore comparisons (medians are reported).
    rounds: usize,
}

fn settings() -> anyhow::Result<Settings> {
    let mut args = std::env::args().skip(1);
    let first = args.next().context(USAGE)?;
    let run = if first == "--restore-only" {
        let mut next = |what: &str| {
            args.next()
                .with_context(|| format!("{what} is missing\n{USAGE}"))
        };
        let archive_dir = PathBuf::from(next("ARCHIVE_DIR")?);
        let revision = next("REVISION")?;
        let revision = revision
            .parse()
            .with_context(|| format!("REVISION: {revision:?} is not a revision"))?;
        Run::RestoreOnly {
            archive_dir,
            revision,
            reference: PathBuf::from(next("REFERENCE_DB")?),
        }
    } else {
        Run::Full {
            size_bytes: parse_size("SIZE", &first)?,
            size_text: first,
        }
    };
    let mut s = Settings {
        run,
        writers: 64,
        more_secs: 10,
        delay: Duration::from_millis(50),
        rounds: 3,
    };
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number: u64 = value
            .parse()
            .with_context(|| format!("{flag}: {value:?} is not a whole number"))?;
        match flag.as_str() {
            "--writers" | "--more-secs" if matches!(s.run, Run::RestoreOnly { .. }) => {
                bail!("{flag} does not apply to --restore-only\n{USAGE}")
            }
            "--writers" => s.writers = number,
            "--more-secs" => s.more_secs = number,
            "--delay-ms" => s.delay = Duration::from_millis(number),
            "--rounds" if number > 0 => s.rounds = usize::try_from(number)?,
            other => bail!("unknown argument {other:?} (or a bad value)\n{USAGE}"),
        }
    }
    Ok(s)
}

/// How the benchmark's latency is described in its rows.
fn per_request(delay: Duration) -> String {
    format!(
        "{} ms added per request ({} ms each way)",
        delay.as_millis(),
        delay.as_secs_f64() * 500.0
    )
}

/// Bytes available to unprivileged users in the file system holding `dir`.
fn available_bytes(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(dir)
        .output()
        .context("run df")?;
    ensure!(
        out.status.success(),
        "df {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .context("parse df's output")
}

/// The newest archived revision of the (only) generation, if any.
async fn archived_revision(archive: &Archive) -> Option<i64> {
    let listing = ArchiveListing::load(archive).await.ok()?;
    let generation = listing.generations.last()?;
    let chain = generation.chain();
    (!chain.links.is_empty()).then(|| chain.last_revision())
}

/// Waits until the archive lists a base snapshot; returns how long it took.
async fn wait_snapshot(archive: &Archive, archiver: &ArchiverProcess) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(listing) = ArchiveListing::load(archive).await {
            if listing.generations.iter().any(|g| !g.snapshots.is_empty()) {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > Duration::from_mins(30) {
            bail!(
                "no snapshot listed after 30 min; see {}",
                archiver.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How an archiver followed writes at the highest rate.
struct KeepUp {
    writes: LoadSummary,
    /// Revisions written but not yet archived when the writes stopped.
    lag_revisions: i64,
    /// The largest such gap seen during the writes (sampled every 500 ms).
    max_lag_revisions: i64,
    /// From the end of the writes until everything was archived.
    catch_up: Duration,
}

/// Writes for `secs` at the highest rate while watching how far the archive
/// is behind etcd.
async fn writes_while_archiving(
    source: &EtcdCluster,
    archive: &Archive,
    options: &LoadOptions,
    secs: u64,
) -> anyhow::Result<KeepUp> {
    let endpoints = vec![source.endpoints()];
    let load_options = options.clone();
    let load = tokio::spawn(async move {
        run_load(
            &endpoints,
            &load_options,
            Until::Elapsed(Duration::from_secs(secs)),
        )
        .await
    });
    let mut client = source.client().await?;
    let mut max_lag_revisions = 0;
    while !load.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let head = integration::current_revision(&mut client).await?;
        if let Some(archived) = archived_revision(archive).await {
            max_lag_revisions = max_lag_revisions.max(head - archived);
        }
    }
    let writes = load.await??;
    let head = integration::current_revision(&mut client).await?;
    let ended = Instant::now();
    let lag_revisions = archived_revision(archive).await.map_or(head, |a| head - a);
    while archived_revision(archive).await.is_none_or(|a| a < head) {
        if ended.elapsed() > Duration::from_mins(10) {
            bail!("revision {head} not archived 10 min after the writes stopped");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(KeepUp {
        writes,
        lag_revisions,
        max_lag_revisions: max_lag_revisions.max(lag_revisions),
        catch_up: ended.elapsed(),
    })
}

/// `etcd-restorer restore` of `revision` into `output` under GNU time, with
/// the S3 endpoint of `s3_port` when the archive is in S3.
fn restore(
    url: &str,
    revision: i64,
    output: &Path,
    s3_port: Option<u16>,
) -> anyhow::Result<Timing> {
    let restorer = binary("etcd-restorer").display().to_string();
    let revision = revision.to_string();
    let output_arg = output.display().to_string();
    let mut args: Vec<String> = Vec::new();
    if let Some(port) = s3_port {
        args.extend(
            S3Server::env(port)
                .into_iter()
                .map(|(k, v)| format!("{k}={v}")),
        );
    }
    args.push(restorer);
    args.extend(
        [
            "restore",
            "--archive",
            url,
            "--revision",
            &revision,
            "--output",
            &output_arg,
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    timed(
        Path::new("/usr/bin/env"),
        &args,
        &output.with_extension("out"),
    )
}

/// What [`compare_restores`] leaves for the next steps.
struct Restores {
    /// The last local restore's output (the archive's newest revision).
    restored: PathBuf,
    /// The median local restore, in seconds.
    local_secs: f64,
}

/// The median of `values` (by wall time; of an even count, the mean of
/// the middle two), and the highest peak RSS.
fn median(mut values: Vec<Timing>) -> Timing {
    values.sort_by(|a, b| a.wall_secs.total_cmp(&b.wall_secs));
    let peak = values.iter().map(|t| t.peak_rss_mib).fold(0.0, f64::max);
    let mid = values.len() / 2;
    let wall_secs = if values.len().is_multiple_of(2) {
        f64::midpoint(values[mid - 1].wall_secs, values[mid].wall_secs)
    } else {
        values[mid].wall_secs
    };
    Timing {
        wall_secs,
        peak_rss_mib: peak,
    }
}

/// `low–high` seconds of `values`.
fn spread(values: &[Timing]) -> String {
    let (low, high) = values.iter().fold((f64::MAX, 0.0f64), |(l, h), t| {
        (l.min(t.wall_secs), h.max(t.wall_secs))
    });
    format!("{low:.1}–{high:.1} s")
}

/// The restore rows, over `rounds` rounds of, one after the other: `cp` +
/// `sync` of `reference` (etcd's own snapshot at `revision`), the restore
/// of `revision` from the archive in `archive_dir` as local files, from a
/// read-only S3 endpoint serving them (`integration::file_s3`), and from
/// that endpoint through a proxy adding `delay` per request. Medians are
/// reported: this machine's disk writes at 220–470 MB/s from one minute to
/// the next, so one run of each can mislead by half. Every S3 restore must
/// equal the local one byte for byte (checked in the first round).
#[allow(clippy::too_many_lines)]
async fn compare_restores(
    table: &mut Table,
    work: &Path,
    archive_dir: &Path,
    revision: i64,
    reference: &Path,
    delay: Duration,
    rounds: usize,
) -> anyhow::Result<Restores> {
    let local_url = format!("file://{}", archive_dir.display());
    let listing = ArchiveListing::load(&Archive::open(&local_url)?).await?;
    // The base the restore starts from: the newest snapshot at or before
    // the revision in the newest generation that reaches it.
    let base = listing
        .generations
        .iter()
        .rev()
        .find(|g| g.chain().last_revision() >= revision)
        .and_then(|g| g.snapshots.iter().copied().filter(|&r| r <= revision).max())
        .context("no generation of the archive reaches the revision from a snapshot")?;
    let s3_files = FileS3Server::start(archive_dir, BUCKET).await?;
    let s3_url = format!("s3://{BUCKET}");
    // The proxy delays each direction: a request and its answer get
    // `delay` between them.
    let files_proxy = DelayProxy::start(s3_files.port, delay / 2).await?;
    let per_request = per_request(delay);
    let restored = work.join("restored.db");
    let from_s3 = work.join("from-s3.db");
    let copy = work.join("copy.db");
    let (mut copies, mut locals, mut s3s, mut slows) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}: cp + sync, then restores of revision {revision} (base {base}): local, S3, S3 with {per_request}");
        copies.push(timed(
            Path::new("/bin/sh"),
            &[
                "-c",
                r#"cp "$1" "$2" && sync "$2""#,
                "sh",
                &reference.display().to_string(),
                &copy.display().to_string(),
            ],
            &work.join("copy.out"),
        )?);
        std::fs::remove_file(&copy)?;
        if restored.exists() {
            std::fs::remove_file(&restored)?;
        }
        locals.push(restore(&local_url, revision, &restored, None)?);
        for (port, timings) in [(s3_files.port, &mut s3s), (files_proxy.port, &mut slows)] {
            timings.push(restore(&s3_url, revision, &from_s3, Some(port))?);
            if round == 1 {
                ensure!(
                    same_content(&from_s3, &restored)?,
                    "the restore from S3 differs from the local one"
                );
            }
            std::fs::remove_file(&from_s3)?;
        }
    }
    let refused = s3_files.refused();
    ensure!(
        refused.is_empty(),
        "the restores sent the read-only S3 endpoint requests it refused: {refused:?}"
    );
    drop((files_proxy, s3_files));
    let restored_bytes = file_size(&restored)?;
    let reference_bytes = file_size(reference)?;
    let spreads = [&copies, &locals, &s3s, &slows].map(|t| spread(t));
    let [copy, local, s3, slow] = [copies, locals, s3s, slows].map(median);
    table.row(
        &format!(
            "`etcd-restorer restore` of revision {revision} ({} revisions on top of the base), median of {rounds}",
            revision - base
        ),
        format!(
            "{:.1} s ({}), {:.0} MiB highest peak RSS",
            local.wall_secs, spreads[1], local.peak_rss_mib
        ),
        format!(
            "`cp` + `sync` of etcd's own snapshot at that revision: {:.1} s ({})",
            copy.wall_secs, spreads[0]
        ),
        ratio(local.wall_secs, copy.wall_secs),
    );
    table.row(
        "restored file size",
        gb(restored_bytes),
        format!(
            "etcd's own snapshot at that revision: {}",
            gb(reference_bytes)
        ),
        ratio(restored_bytes as f64, reference_bytes as f64),
    );
    table.row(
        &format!("restore from S3: a read-only S3 endpoint serving the archive's files (integration::file_s3), median of {rounds}"),
        format!(
            "{:.1} s ({}), {:.0} MiB highest peak RSS",
            s3.wall_secs, spreads[2], s3.peak_rss_mib
        ),
        format!("restore from local files: {:.1} s", local.wall_secs),
        ratio(s3.wall_secs, local.wall_secs),
    );
    table.row(
        &format!("restore from S3 (the same endpoint) with {per_request}, median of {rounds}"),
        format!(
            "{:.1} s ({}), {:.0} MiB highest peak RSS",
            slow.wall_secs, spreads[3], slow.peak_rss_mib
        ),
        format!(
            "restore from local files: {:.1} s (from S3 without the delay: {:.1} s)",
            local.wall_secs, s3.wall_secs
        ),
        format!(
            "{} ({} of S3 without the delay)",
            ratio(slow.wall_secs, local.wall_secs),
            ratio(slow.wall_secs, s3.wall_secs)
        ),
    );
    Ok(Restores {
        restored,
        local_secs: local.wall_secs,
    })
}

/// Starts etcd on `snapshot` (`etcdutl snapshot restore`, start, first
/// read); returns it and how long that took.
async fn start_restored(snapshot: &Path) -> anyhow::Result<(RestoredEtcd, Duration)> {
    let started = Instant::now();
    let etcd = RestoredEtcd::start(EtcdVersion::V35, snapshot)
        .await
        .with_context(|| format!("start etcd on {}", snapshot.display()))?;
    Ok((etcd, started.elapsed()))
}

fn file_size(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("size of {}", path.display()))?
        .len())
}

/// Whether two files hold the same bytes.
fn same_content(first: &Path, second: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let open = |p: &Path| {
        std::fs::File::open(p)
            .map(|f| std::io::BufReader::with_capacity(1 << 20, f))
            .with_context(|| format!("open {}", p.display()))
    };
    if file_size(first)? != file_size(second)? {
        return Ok(false);
    }
    let (mut first, mut second) = (open(first)?, open(second)?);
    let (mut ours, mut theirs) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let read = first.read(&mut ours)?;
        if read == 0 {
            return Ok(true);
        }
        second.read_exact(&mut theirs[..read])?;
        if ours[..read] != theirs[..read] {
            return Ok(false);
        }
    }
}

/// Total size of the files under `dir`.
fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        total += if kind.is_dir() {
            dir_size(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

struct Table(Vec<[String; 4]>);

impl Table {
    fn row(&mut self, what: &str, ours: String, reference: String, ratio: String) {
        self.0.push([what.to_owned(), ours, reference, ratio]);
    }

    fn print(&self) {
        println!("| figure | etcd-pitr | reference in the same run | ratio |");
        println!("|---|---|---|---|");
        for [a, b, c, d] in &self.0 {
            println!("| {a} | {b} | {c} | {d} |");
        }
    }
}

fn ratio(ours: f64, reference: f64) -> String {
    format!("{:.2}×", ours / reference)
}

#[tokio::main]
#[allow(clippy::too_many_lines)]
async fn main() -> anyhow::Result<()> {
    let s = settings()?;
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let tmp = tempfile::Builder::new().prefix("bench-scale").tempdir()?;
    let (size_bytes, size_text) = match &s.run {
        Run::Full {
            size_bytes,
            size_text,
        } => (*size_bytes, size_text.clone()),
        Run::RestoreOnly {
            archive_dir,
            revision,
            reference,
        } => {
            let mut table = Table(Vec::new());
            let restores = compare_restores(
                &mut table,
                tmp.path(),
                archive_dir,
                *revision,
                reference,
                s.delay,
                s.rounds,
            )
            .await?;
            std::fs::remove_file(&restores.restored)?;
            println!("Command: `{command_line}`");
            println!();
            table.print();
            return Ok(());
        }
    };
    let available = available_bytes(tmp.path())?;
    let needed = size_bytes * SPACE_FACTOR;
    ensure!(
        available >= needed,
        "bench-scale {} needs about {} free in {} ({SPACE_FACTOR} × SIZE), only {} is available; free space or set TMPDIR to a larger file system",
        size_text,
        gb(needed),
        tmp.path().parent().unwrap_or(tmp.path()).display(),
        gb(available)
    );
    let mut table = Table(Vec::new());
    let source = integration::loadgen::start_source(size_bytes).await?;
    let endpoints = source.endpoints();
    let options = LoadOptions {
        writers: s.writers,
        ..LoadOptions::default()
    };

    eprintln!("filling etcd to {} with {} writers", size_text, s.writers);
    let fill = run_load(
        std::slice::from_ref(&endpoints),
        &options,
        Until::DbBytes(size_bytes),
    )
    .await?;
    let fill_secs = fill.elapsed.as_secs_f64();

    eprintln!("archiver: first snapshot");
    let local_url = format!("file://{}/archive", tmp.path().display());
    let local = Archive::open(&local_url)?;
    let args = archiver_args(
        &endpoints,
        &local_url,
        &tmp.path().join("archiver-data"),
        &["--no-election", "--segment-max-age", SEGMENT_MAX_AGE],
    );
    let mut archiver = ArchiverProcess::start(&args, &[], &tmp.path().join("archiver.log"))?;
    let pid = archiver.child.as_ref().expect("just started").id();
    let first_snapshot = wait_snapshot(&local, &archiver).await?.as_secs_f64();
    let archiver_rss = peak_rss_mib(pid);
    eprintln!("etcdctl snapshot save");
    let etcdctl = source.version.bin_dir().join("etcdctl");
    let etcdctl_first = tmp.path().join("etcdctl-first.db");
    let etcdctl_first_timing = timed(
        &etcdctl,
        &[
            "--endpoints",
            &endpoints,
            "snapshot",
            "save",
            &etcdctl_first.display().to_string(),
        ],
        &tmp.path().join("etcdctl-first.out"),
    )?;
    std::fs::remove_file(&etcdctl_first)?;
    table.row(
        "archiver's first full snapshot, until `list` shows it",
        format!("{first_snapshot:.1} s"),
        format!(
            "`etcdctl snapshot save`: {:.1} s",
            etcdctl_first_timing.wall_secs
        ),
        ratio(first_snapshot, etcdctl_first_timing.wall_secs),
    );

    eprintln!("{} s more of writes while archiving", s.more_secs);
    let more = writes_while_archiving(
        &source,
        &local,
        &LoadOptions {
            seed: options.seed + 1,
            ..options.clone()
        },
        s.more_secs,
    )
    .await?;
    let archiver_rss = archiver_rss.max(peak_rss_mib(pid));
    archiver.terminate(Duration::from_mins(1))?;
    table.row(
        "archiver peak RSS (first snapshot and writes)",
        format!("{archiver_rss:.0} MiB"),
        format!(
            "`etcdctl snapshot save`: {:.0} MiB",
            etcdctl_first_timing.peak_rss_mib
        ),
        "goal < 100 MiB".to_owned(),
    );
    let mut client = source.client().await?;
    let last = integration::current_revision(&mut client).await?;
    let listing = ArchiveListing::load(&local).await?;
    let base = listing.generations[0].snapshots[0];
    table.row(
        &format!(
            "archiver, local store, {} s of writes at {:.0} revisions/s",
            s.more_secs,
            more.writes.ops as f64 / more.writes.elapsed.as_secs_f64()
        ),
        format!(
            "behind by {} revisions when writes stopped (at most {}), caught up {:.1} s later",
            more.lag_revisions,
            more.max_lag_revisions,
            more.catch_up.as_secs_f64()
        ),
        "—".to_owned(),
        "—".to_owned(),
    );

    eprintln!("etcdctl snapshot save at revision {last}");
    let reference = tmp.path().join("etcdctl.db");
    let reference_save = timed(
        &etcdctl,
        &[
            "--endpoints",
            &endpoints,
            "snapshot",
            "save",
            &reference.display().to_string(),
        ],
        &tmp.path().join("etcdctl.out"),
    )?;
    let archive_bytes = dir_size(&tmp.path().join("archive"))?;

    let restores = compare_restores(
        &mut table,
        tmp.path(),
        &tmp.path().join("archive"),
        last,
        &reference,
        s.delay,
        s.rounds,
    )
    .await?;
    let (restored, local_restore) = (restores.restored, restores.local_secs);

    eprintln!("time to a running restored etcd");
    let (ours_etcd, ours_start) = start_restored(&restored).await?;
    let (ref_etcd, ref_start) = start_restored(&reference).await?;
    let ours_total = local_restore + ours_start.as_secs_f64();
    table.row(
        "time to a running restored etcd (the median restore + `etcdutl snapshot restore` + start + first read)",
        format!(
            "{ours_total:.1} s ({local_restore:.1} + {:.1})",
            ours_start.as_secs_f64()
        ),
        format!(
            "`etcdutl snapshot restore` of the `etcdctl snapshot save` file + start + first read: {:.1} s",
            ref_start.as_secs_f64()
        ),
        ratio(ours_total, ref_start.as_secs_f64()),
    );
    let hash = |c: etcd_client::Client| async move {
        anyhow::Ok(c.maintenance_client().hash_kv(last).await?.hash())
    };
    let source_hash = hash(source.client().await?).await?;
    let ours_hash = hash(ours_etcd.client().await?).await?;
    let ref_hash = hash(ref_etcd.client().await?).await?;
    drop((ours_etcd, ref_etcd));
    table.row(
        &format!("`HashKV` at revision {last}"),
        format!("restored member: {ours_hash}"),
        format!("source: {source_hash} (member from etcd's own snapshot: {ref_hash})"),
        if ours_hash == source_hash {
            "equal"
        } else {
            "DIFFERENT"
        }
        .to_owned(),
    );
    for file in [&restored, &reference] {
        std::fs::remove_file(file)?;
    }

    let per_request = per_request(s.delay);
    eprintln!("archiver writing to S3 (moto) with {per_request}");
    let s3 = S3Server::start(BUCKET).await?;
    let proxy = DelayProxy::start(s3.port, s.delay / 2).await?;
    let slow_url = format!("s3://{BUCKET}/slow");
    let slow = {
        let _env = integration::use_s3_in_process(s3.port).await;
        Archive::open(&slow_url)?
    };
    let args = archiver_args(
        &endpoints,
        &slow_url,
        &tmp.path().join("slow-archiver-data"),
        &["--no-election", "--segment-max-age", SEGMENT_MAX_AGE],
    );
    let mut slow_archiver = ArchiverProcess::start(
        &args,
        &S3Server::env(proxy.port),
        &tmp.path().join("slow-archiver.log"),
    )?;
    let slow_pid = slow_archiver.child.as_ref().expect("just started").id();
    let slow_snapshot = wait_snapshot(&slow, &slow_archiver).await?.as_secs_f64();
    let slow_more = writes_while_archiving(
        &source,
        &slow,
        &LoadOptions {
            seed: options.seed + 2,
            ..options.clone()
        },
        s.more_secs,
    )
    .await?;
    let slow_rss = peak_rss_mib(slow_pid);
    slow_archiver.terminate(Duration::from_mins(1))?;
    table.row(
        &format!("archiver's first full snapshot into S3 (moto) with {per_request}"),
        format!("{slow_snapshot:.1} s, {slow_rss:.0} MiB peak RSS"),
        format!("into local files: {first_snapshot:.1} s"),
        ratio(slow_snapshot, first_snapshot),
    );
    table.row(
        &format!(
            "archiver, S3 (moto) with {per_request}, {} s of writes at {:.0} revisions/s",
            s.more_secs,
            slow_more.writes.ops as f64 / slow_more.writes.elapsed.as_secs_f64()
        ),
        format!(
            "behind by {} revisions when writes stopped (at most {}), caught up {:.1} s later",
            slow_more.lag_revisions,
            slow_more.max_lag_revisions,
            slow_more.catch_up.as_secs_f64()
        ),
        format!(
            "local store: behind by {}, caught up {:.1} s later",
            more.lag_revisions,
            more.catch_up.as_secs_f64()
        ),
        "—".to_owned(),
    );

    println!("Command: `{command_line}`");
    println!(
        "Database: {} ({} revisions, {:.2} GB of values) filled in {fill_secs:.0} s ({:.0} operations/s) by {} writers; the archive's base snapshot is at revision {base}, the newest revision {last}; `etcdctl snapshot save` at {last}: {:.1} s",
        gb(u64::try_from(fill.db_size_bytes).unwrap_or(0)),
        fill.last_revision,
        fill.value_bytes as f64 / 1e9,
        fill.ops as f64 / fill_secs,
        s.writers,
        reference_save.wall_secs
    );
    println!(
        "Archive (local files) after the writes: {} for the base snapshot and {} revisions on top",
        gb(archive_bytes),
        last - base
    );
    println!();
    table.print();
    ensure!(
        ours_hash == source_hash,
        "the restored member's HashKV differs from the source's"
    );
    Ok(())
}
