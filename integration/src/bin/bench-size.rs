//! Archive size benchmark: compressed bytes per million revisions of the
//! Kubernetes-like workload ([`integration::loadgen`]) in segments written
//! at several zstd levels, against `gzip -6` and `zstd -19` of the same
//! record bytes, with the CPU the archiver spends encoding them.
//!
//! Offline, no etcd: the operations of 64 writers (seed 1) are interleaved
//! round-robin and turned into the events etcd would record by a minimal
//! model of etcd's MVCC ([`Mvcc`]). They are encoded as the archiver does
//! (`SegmentWriter::append`): the records of leases referenced for the
//! first time, then the revision record, sealing a segment when
//! `SegmentBuilder::is_full` says so or at the archiver's default
//! `--segment-max-bytes` of records. The segment boundaries depend only on
//! the record bytes, so every level seals the same segments; the reference
//! tools compress each segment's record bytes (its decompressed body) on
//! their own, and the sizes are summed.
//!
//! CPU is the encoding thread's own CPU time (`/proc/thread-self/schedstat`)
//! around the builder calls only: building the records is not counted. The
//! reference tools' CPU is their user + system time as child processes.
//!
//! Usage: `bench-size [REVISIONS]` (default 1,000,000), after
//! `cargo build --release -p integration --bin bench-size`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_archiver::config::DEFAULT_SEGMENT_MAX_BYTES;
use etcdpitr_common::segment::{
    self, Event, EventKind, LeaseRecord, Record, RevisionRecord, SegmentBuilder, ZSTD_LEVEL,
};
use etcdpitr_common::Revision;
use integration::loadgen::{Op, Workload, DEFAULT_SEED, DEFAULT_WRITERS, EVENT_LEASE_TTL_SECS};

/// zstd levels compared (the default one is marked in the table).
const LEVELS: &[i32] = &[-5, -1, 1, 2, 3, 4, 6, 9];
/// Revisions generated before each level encodes them.
const BATCH_REVISIONS: usize = 4096;
/// Observed times advance as if etcd wrote this many revisions per second
/// (about what the load generator reaches here).
const REVISIONS_PER_SEC: i64 = 2000;
/// Observed time of revision 0 (Unix ms).
const START_MS: i64 = 1_764_144_000_000;
/// Lease IDs are numbered from here (etcd's look alike: a member prefix
/// and a counter).
const LEASE_ID_BASE: i64 = 0x694d_7c2e_a1b0_0000;
/// Clock ticks per second of `/proc` CPU times (Linux's `USER_HZ`, 100 on
/// every architecture Linux exposes to user space).
const USER_HZ: u64 = 100;
/// Segments queued for the reference tools before encoding waits.
const REFERENCE_QUEUE: usize = 4;

/// One revision as the archiver appends it: the lease records it needs
/// first, then its events.
struct Append {
    leases: Vec<LeaseRecord>,
    record: RevisionRecord,
}

/// What etcd keeps of a live key.
struct KeyMeta {
    create_revision: Revision,
    version: i64,
    lease: i64,
}

/// A minimal model of etcd's MVCC store: enough to give every event the
/// revision, create revision, version and lease etcd would, and to know
/// which operations create no revision.
#[derive(Default)]
struct Mvcc {
    revision: Revision,
    keys: HashMap<Vec<u8>, KeyMeta>,
    /// Keys attached to each lease, in byte order (etcd's revoke deletes
    /// them sorted).
    lease_keys: HashMap<i64, BTreeSet<Vec<u8>>>,
    /// (writer, lease slot) → lease ID.
    leases: HashMap<(u64, u64), i64>,
    granted: i64,
    /// Leases that already have a lease record (the archiver's per
    /// generation set).
    archived_leases: HashSet<i64>,
}

impl Mvcc {
    fn put(&mut self, revision: Revision, key: Vec<u8>, value: Vec<u8>, lease: i64) -> Event {
        let (create_revision, version, old_lease) = match self.keys.get(&key) {
            Some(meta) => (meta.create_revision, meta.version + 1, meta.lease),
            None => (revision, 1, 0),
        };
        if old_lease != lease {
            self.detach(old_lease, &key);
        }
        if lease != 0 {
            self.lease_keys
                .entry(lease)
                .or_default()
                .insert(key.clone());
        }
        self.keys.insert(
            key.clone(),
            KeyMeta {
                create_revision,
                version,
                lease,
            },
        );
        Event {
            kind: EventKind::Put,
            key,
            value,
            create_revision,
            mod_revision: revision,
            version,
            lease,
        }
    }

    /// The delete event of a live `key`; `None` if it does not exist.
    fn delete(&mut self, revision: Revision, key: Vec<u8>) -> Option<Event> {
        let meta = self.keys.remove(&key)?;
        self.detach(meta.lease, &key);
        Some(Event::deleted(key, revision))
    }

    fn detach(&mut self, lease: i64, key: &[u8]) {
        if let Some(keys) = self.lease_keys.get_mut(&lease) {
            keys.remove(key);
        }
    }

    fn lease(&self, writer: u64, slot: u64) -> i64 {
        *self
            .leases
            .get(&(writer, slot))
            .expect("the workload grants a lease before it uses or revokes it")
    }

    /// Applies `writer`'s `op`; the revision it creates, if any.
    fn apply(&mut self, writer: u64, op: Op) -> Option<Append> {
        let revision = self.revision + 1;
        let events = match op {
            Op::Create { key, value } => {
                let key = key.into_bytes();
                if self.keys.contains_key(&key) {
                    return None;
                }
                vec![self.put(revision, key, value, 0)]
            }
            Op::Update { key, value } => vec![self.put(revision, key.into_bytes(), value, 0)],
            Op::Delete { key } => vec![self.delete(revision, key.into_bytes())?],
            Op::GrantLease { slot } => {
                self.granted += 1;
                self.leases
                    .insert((writer, slot), LEASE_ID_BASE + self.granted);
                return None;
            }
            Op::RevokeLease { slot } => {
                let id = self.lease(writer, slot);
                self.leases.remove(&(writer, slot));
                let keys = self.lease_keys.remove(&id).unwrap_or_default();
                keys.into_iter()
                    .filter_map(|key| self.delete(revision, key))
                    .collect()
            }
            Op::Event { key, value, slot } => {
                let lease = self.lease(writer, slot);
                vec![self.put(revision, key.into_bytes(), value, lease)]
            }
            Op::Txn { puts } => {
                // Compares every key's version with 0: all must exist.
                if !puts
                    .iter()
                    .all(|(k, _)| self.keys.contains_key(k.as_bytes()))
                {
                    return None;
                }
                puts.into_iter()
                    .map(|(k, v)| self.put(revision, k.into_bytes(), v, 0))
                    .collect()
            }
        };
        if events.is_empty() {
            return None;
        }
        self.revision = revision;
        let mut leases: Vec<LeaseRecord> = Vec::new();
        for e in &events {
            if e.lease != 0 && self.archived_leases.insert(e.lease) {
                leases.push(LeaseRecord {
                    id: e.lease,
                    ttl_secs: EVENT_LEASE_TTL_SECS,
                    revision,
                });
            }
        }
        Some(Append {
            leases,
            record: RevisionRecord {
                revision,
                observed_ms: START_MS + revision * 1000 / REVISIONS_PER_SEC,
                catching_up: false,
                events,
            },
        })
    }
}

/// CPU time of the calling thread so far.
fn thread_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("read /proc/thread-self/schedstat")?;
    let ns = stat
        .split_whitespace()
        .next()
        .context("empty /proc/thread-self/schedstat")?
        .parse()
        .context("parse /proc/thread-self/schedstat")?;
    Ok(Duration::from_nanos(ns))
}

/// User + system CPU time of this process's waited-for children so far.
fn children_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
    // Fields after the command name, which may hold spaces: state is the
    // 3rd field, cutime and cstime the 16th and 17th.
    let rest = stat.rsplit_once(')').context("parse /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .context("short /proc/self/stat")?
            .parse()
            .context("parse /proc/self/stat")
    };
    let ticks = field(13)? + field(14)?;
    Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// The segments of one zstd level, built as the archiver builds them.
struct Encoding {
    zstd_level: i32,
    open: Option<SegmentBuilder>,
    prev_revision: Revision,
    prev_digest: [u8; 32],
    /// (first revision, last revision, record bytes) of each sealed segment.
    sealed: Vec<(Revision, Revision, u64)>,
    compressed_bytes: u64,
    cpu: Duration,
    /// The first sealed segment, decoded once at the end as a check.
    first: Option<Vec<u8>>,
    /// Sealed segments kept for the reference tools (one level only).
    keep: Option<Vec<Vec<u8>>>,
}

impl Encoding {
    fn new(level: i32, prev_revision: Revision, keep: bool) -> Self {
        Self {
            zstd_level: level,
            open: None,
            prev_revision,
            prev_digest: [0; 32],
            sealed: Vec::new(),
            compressed_bytes: 0,
            cpu: Duration::ZERO,
            first: None,
            keep: keep.then(Vec::new),
        }
    }

    /// Appends `batch` (timed).
    fn append(&mut self, batch: &[Append]) -> anyhow::Result<()> {
        let started = thread_cpu()?;
        for a in batch {
            if self.open.is_none() {
                self.open = Some(SegmentBuilder::with_level(
                    1,
                    self.prev_revision,
                    self.prev_digest,
                    self.zstd_level,
                )?);
            }
            let builder = self.open.as_mut().expect("opened above");
            for lease in &a.leases {
                builder.push(&Record::Lease(*lease))?;
            }
            builder.push_revision(&a.record)?;
            if builder.is_full() || builder.raw_bytes() >= DEFAULT_SEGMENT_MAX_BYTES {
                self.seal()?;
            }
        }
        self.cpu += thread_cpu()?.saturating_sub(started);
        Ok(())
    }

    /// Seals the open segment (timed).
    fn finish(&mut self) -> anyhow::Result<()> {
        let started = thread_cpu()?;
        self.seal()?;
        self.cpu += thread_cpu()?.saturating_sub(started);
        Ok(())
    }

    fn seal(&mut self) -> anyhow::Result<()> {
        let Some(builder) = self.open.take() else {
            return Ok(());
        };
        let raw = builder.raw_bytes();
        let (name, bytes) = builder.finish().context("seal segment")?;
        self.prev_revision = name.last;
        self.prev_digest = segment::digest(&bytes);
        self.sealed.push((name.first, name.last, raw));
        self.compressed_bytes += bytes.len() as u64;
        if self.first.is_none() {
            self.first = Some(bytes.clone());
        }
        if let Some(keep) = &mut self.keep {
            keep.push(bytes);
        }
        Ok(())
    }

    fn raw_bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.2).sum()
    }
}

/// A reference compressor: a command run on each segment's record bytes.
struct Reference {
    name: &'static str,
    queue: std::sync::mpsc::SyncSender<Arc<Vec<u8>>>,
    thread: JoinHandle<anyhow::Result<(u64, Duration)>>,
}

impl Reference {
    /// Starts a thread running `program args` once per segment queued;
    /// `reaper` serializes waiting for children, so each child's CPU time
    /// is attributed to it alone.
    fn start(
        name: &'static str,
        program: &'static str,
        args: &'static [&'static str],
        reaper: Arc<Mutex<()>>,
    ) -> Self {
        let (queue, segments) = sync_channel(REFERENCE_QUEUE);
        let thread = std::thread::spawn(move || compress_each(program, args, &segments, &reaper));
        Self {
            name,
            queue,
            thread,
        }
    }
}

/// Runs `program args` on each segment received; returns the output bytes
/// and the children's CPU time, summed.
fn compress_each(
    program: &str,
    args: &[&str],
    segments: &Receiver<Arc<Vec<u8>>>,
    reaper: &Mutex<()>,
) -> anyhow::Result<(u64, Duration)> {
    let (mut out_bytes, mut cpu) = (0u64, Duration::ZERO);
    for raw in segments {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {program} (is it installed?)"))?;
        let mut stdin = child.stdin.take().context("child stdin")?;
        let mut stdout = child.stdout.take().context("child stdout")?;
        let counted = std::thread::scope(|s| {
            let feeder = s.spawn(move || stdin.write_all(&raw));
            let counted = std::io::copy(&mut stdout, &mut std::io::sink())?;
            feeder.join().expect("feeder thread")?;
            std::io::Result::Ok(counted)
        })
        .with_context(|| format!("pipe a segment through {program}"))?;
        let _reaping = reaper.lock().expect("reaper lock");
        let before = children_cpu()?;
        let status = child
            .wait()
            .with_context(|| format!("wait for {program}"))?;
        cpu += children_cpu()?.saturating_sub(before);
        anyhow::ensure!(status.success(), "{program} {args:?} failed: {status}");
        out_bytes += counted;
    }
    Ok((out_bytes, cpu))
}

/// The record bytes of a sealed segment: its decompressed body.
fn record_bytes(segment: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (_, body) = segment::open("bench", segment)?;
    let mut raw = Vec::new();
    zstd::Decoder::new(body)?.read_to_end(&mut raw)?;
    Ok(raw)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn main() -> anyhow::Result<()> {
    let revisions: u64 = std::env::args().nth(1).map_or(Ok(1_000_000), |s| {
        s.replace(['_', ','], "")
            .parse()
            .with_context(|| format!("REVISIONS must be a number, not {s:?}"))
    })?;
    anyhow::ensure!(revisions > 0, "REVISIONS must be at least 1");
    let started = Instant::now();
    let load_before = load_average();
    eprintln!(
        "bench-size: {revisions} revisions of {DEFAULT_WRITERS} writers (seed {DEFAULT_SEED}), zstd levels {LEVELS:?}, segments sealed at {DEFAULT_SEGMENT_MAX_BYTES} bytes of records"
    );

    let mut workloads: Vec<Workload> = (0..DEFAULT_WRITERS)
        .map(|w| Workload::new(DEFAULT_SEED, w))
        .collect();
    let mut mvcc = Mvcc {
        // A new cluster is at revision 1; its first write makes 2.
        revision: 1,
        ..Mvcc::default()
    };
    let mut levels: Vec<Encoding> = LEVELS
        .iter()
        .enumerate()
        .map(|(i, &level)| Encoding::new(level, mvcc.revision, i == 0))
        .collect();
    let reaper = Arc::new(Mutex::new(()));
    let references = [
        Reference::start("gzip -6", "gzip", &["-6", "-c"], reaper.clone()),
        Reference::start(
            "zstd -19",
            "zstd",
            &["-19", "--single-thread", "-c", "-q"],
            reaper.clone(),
        ),
    ];

    let (mut ops, mut events, mut lease_records, mut made) = (0u64, 0u64, 0u64, 0u64);
    let mut writer = 0u64;
    let mut batch = Vec::with_capacity(BATCH_REVISIONS);
    let mut last_report = Instant::now();
    let mut queued = 0usize;
    let mut raw_checked = 0u64;
    while made < revisions {
        batch.clear();
        while batch.len() < BATCH_REVISIONS && made < revisions {
            let op = workloads[writer as usize].next_op();
            ops += 1;
            if let Some(a) = mvcc.apply(writer, op) {
                events += a.record.events.len() as u64;
                lease_records += a.leases.len() as u64;
                made += 1;
                batch.push(a);
            }
            writer = (writer + 1) % DEFAULT_WRITERS;
        }
        for level in &mut levels {
            level.append(&batch)?;
        }
        if made == revisions {
            for level in &mut levels {
                level.finish()?;
            }
        }
        // Sealed segments of the first level go to the reference tools.
        let keep = levels[0].keep.as_mut().expect("the first level keeps");
        for segment in std::mem::take(keep) {
            let raw = record_bytes(&segment)?;
            let expected = levels[0].sealed[queued].2;
            anyhow::ensure!(
                raw.len() as u64 == expected,
                "segment {queued} decompresses to {} bytes, but {expected} were appended",
                raw.len()
            );
            raw_checked += expected;
            queued += 1;
            let raw = Arc::new(raw);
            if references
                .iter()
                .any(|r| r.queue.send(raw.clone()).is_err())
            {
                // A reference tool failed: its thread has the error.
                for r in references {
                    drop(r.queue);
                    r.thread.join().expect("reference thread")?;
                }
                anyhow::bail!("a reference compressor stopped");
            }
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "bench-size: {made} revisions, {queued} segments, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let encoded_at = started.elapsed();
    let main_cpu = thread_cpu()?;

    // Every level sealed the same segments, and the first segment of each
    // decodes to the same records.
    let (first_revision, last_revision) = (levels[0].sealed[0].0, mvcc.revision);
    let mut first_records = None;
    for level in &levels {
        anyhow::ensure!(
            level.sealed == levels[0].sealed,
            "level {} sealed other segments than level {}",
            level.zstd_level,
            levels[0].zstd_level
        );
        let (_, records) = segment::decode_all("first", level.first.as_deref().unwrap_or(&[]))
            .with_context(|| format!("decode a level {} segment", level.zstd_level))?;
        let records = Some(records);
        anyhow::ensure!(
            first_records.is_none() || first_records == records,
            "level {} decodes differently",
            level.zstd_level
        );
        first_records = records;
    }
    anyhow::ensure!(
        levels[0].sealed.last().map(|s| s.1) == Some(last_revision)
            && raw_checked == levels[0].raw_bytes(),
        "the segments do not hold every revision"
    );

    let mut reference_results = Vec::new();
    for r in references {
        drop(r.queue);
        let (bytes, cpu) = r
            .thread
            .join()
            .expect("reference thread")
            .with_context(|| format!("compress with {}", r.name))?;
        reference_results.push((r.name, bytes, cpu));
    }

    let raw = levels[0].raw_bytes();
    let per_million = |x: f64| x * 1e6 / revisions as f64;
    println!(
        "Command: `target/release/bench-size {revisions}`. {revisions} revisions ({first_revision}..={last_revision}) from {ops} operations: {events} events, {lease_records} lease records; {} segments, {:.1} MB of records ({:.0} bytes per revision). Generating and encoding took {:.1} s (wall; {:.1} s of CPU outside the encoders), everything {:.1} s. Load average {load_before} before, {} after.",
        levels[0].sealed.len(),
        raw as f64 / 1e6,
        raw as f64 / revisions as f64,
        encoded_at.as_secs_f64(),
        main_cpu
            .saturating_sub(levels.iter().map(|l| l.cpu).sum())
            .as_secs_f64(),
        started.elapsed().as_secs_f64(),
        load_average(),
    );
    println!();
    println!("| codec | MB per million revisions | of the record bytes | CPU s per million revisions | MB/s of records per CPU second |");
    println!("|---|---|---|---|---|");
    println!(
        "| none (record bytes) | {:.1} | 100 % | — | — |",
        per_million(raw as f64) / 1e6
    );
    let row = |name: String, bytes: u64, cpu: Duration| {
        println!(
            "| {name} | {:.1} | {:.1} % | {:.2} | {:.0} |",
            per_million(bytes as f64) / 1e6,
            100.0 * bytes as f64 / raw as f64,
            per_million(cpu.as_secs_f64()),
            raw as f64 / 1e6 / cpu.as_secs_f64().max(1e-9),
        );
    };
    for level in &levels {
        let name = if level.zstd_level == ZSTD_LEVEL {
            format!("segments, zstd {} (default)", level.zstd_level)
        } else {
            format!("segments, zstd {}", level.zstd_level)
        };
        row(name, level.compressed_bytes, level.cpu);
    }
    for (name, bytes, cpu) in reference_results {
        row(format!("`{name}` of each segment's records"), bytes, cpu);
    }
    Ok(())
}
