//! The restorer's commands, as the binary (and the tests) run them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use base64::Engine;
use bytes::Bytes;
use etcdpitr_common::bbolt::BoltReader;
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::segment::{Event, EventKind, LeaseRecord, Record, RevisionRecord};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::plan::{self, RestorePlan};
use crate::source::{self, TimeChoice};
use crate::synth::{self, Bump, EventSource};
use crate::{format_ms, parse_time, UsageError};

/// What to restore: a revision or a moment, optionally in one generation.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// `--revision`.
    pub revision: Option<Revision>,
    /// `--time` (RFC 3339).
    pub time: Option<String>,
    /// `--generation`.
    pub generation: Option<u64>,
}

async fn load(url: &str) -> anyhow::Result<(Archive, ArchiveListing)> {
    let archive = Archive::open(url)?;
    let listing = ArchiveListing::load(&archive)
        .await
        .with_context(|| format!("list archive {url}"))?;
    if listing.manifest.is_none() {
        bail!(UsageError(format!(
            "{url} is not an etcd-pitr archive (no {})",
            layout::MANIFEST_NAME
        )));
    }
    Ok((archive, listing))
}

/// Resolves the target to a plan, printing what a `--time` was placed on.
async fn plan_target(
    archive: &Archive,
    listing: &ArchiveListing,
    target: &Target,
) -> anyhow::Result<(RestorePlan, Option<TimeChoice>)> {
    let generation = target.generation.map(GenerationId);
    let (revision, generation, choice) = match (target.revision, &target.time) {
        (Some(r), None) => (r, generation, None),
        (None, Some(t)) => {
            let ms = parse_time(t)?;
            let choice = source::resolve_time(archive, listing, ms, t, generation).await?;
            (choice.revision, Some(choice.generation), Some(choice))
        }
        _ => bail!(UsageError(
            "give exactly one of --revision or --time".into()
        )),
    };
    Ok((plan::plan(listing, revision, generation)?, choice))
}

fn describe_time_choice(target: &Target, choice: &TimeChoice) -> String {
    let mut s = format!(
        "time {} -> revision {} (generation {}",
        target.time.as_deref().unwrap_or_default(),
        choice.revision,
        choice.generation
    );
    if let Some(ms) = choice.observed_ms {
        s += &format!(", observed {}", format_ms(ms));
    }
    s.push(')');
    if let Some(after) = choice.uncertain_after_ms {
        s += &format!(
            "; note: revision {} was observed while catching up and may have been committed as early as {}",
            choice.revision + 1,
            format_ms(after)
        );
    }
    s
}

/// The archive's events after a base snapshot, streamed from the store.
struct ArchiveEvents {
    rx: mpsc::Receiver<anyhow::Result<(String, Bytes)>>,
    segments: Vec<SegmentName>,
    base: Revision,
    target: Revision,
    progress: indicatif::ProgressBar,
}

impl ArchiveEvents {
    fn new(archive: &Archive, plan: &RestorePlan, progress: indicatif::ProgressBar) -> Self {
        Self {
            rx: source::prefetch_segments(archive.clone(), plan.generation, plan.segments.clone()),
            segments: plan.segments.clone(),
            base: plan.snapshot_revision,
            target: plan.target,
            progress,
        }
    }
}

impl EventSource for ArchiveEvents {
    fn replay(
        &mut self,
        on_revision: &mut dyn FnMut(&RevisionRecord) -> anyhow::Result<()>,
        on_lease: &mut dyn FnMut(LeaseRecord),
    ) -> anyhow::Result<()> {
        let (base, target) = (self.base, self.target);
        for name in &self.segments {
            let (key, bytes) = self
                .rx
                .blocking_recv()
                .context("segment download stopped")??;
            source::for_each_record(&key, &bytes, name, &mut |record| {
                match record {
                    Record::Revision(r) if r.revision > base && r.revision <= target => {
                        on_revision(&r)?;
                        self.progress.inc(1);
                    }
                    Record::Lease(l) if l.revision <= target => on_lease(l),
                    _ => {}
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

fn progress_bar(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} revisions {per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    bar
}

/// Removes a path when dropped, unless disarmed.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            std::fs::remove_file(&p).ok();
        }
    }
}

/// `etcd-restorer restore`.
///
/// # Errors
/// Plan refusals, integrity, store and I/O errors; no output file is left
/// behind on error.
pub async fn restore(
    url: &str,
    target: &Target,
    output: &Path,
    dry_run: bool,
    bump: Bump,
    force: bool,
) -> anyhow::Result<()> {
    if bump.mark_compacted && bump.revisions == 0 {
        bail!(UsageError(
            "--mark-compacted needs --bump-revision N".into()
        ));
    }
    if bump.revisions < 0 {
        bail!(UsageError("--bump-revision must not be negative".into()));
    }
    if !dry_run && output.exists() && !force {
        bail!(UsageError(format!(
            "--output: {} already exists (remove it or pass --force)",
            output.display()
        )));
    }
    let started = Instant::now();
    let (archive, listing) = load(url).await?;
    let (plan, choice) = plan_target(&archive, &listing, target).await?;
    if let Some(choice) = &choice {
        println!("{}", describe_time_choice(target, choice));
    }
    if dry_run {
        println!(
            "plan: generation {}, base snapshot at revision {} ({}), {} segments, target revision {}",
            plan.generation,
            plan.snapshot_revision,
            layout::snapshot_key(plan.generation, plan.snapshot_revision),
            plan.segments.len(),
            plan.target
        );
        for s in &plan.segments {
            println!("  {}", layout::segment_key(plan.generation, s));
        }
        if bump.revisions > 0 {
            println!(
                "then bump the revision by {} to {}{}",
                bump.revisions,
                plan.target + bump.revisions,
                if bump.mark_compacted {
                    " and mark it compacted"
                } else {
                    ""
                }
            );
        }
        return Ok(());
    }
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = output
        .file_name()
        .context("--output must name a file")?
        .to_string_lossy()
        .into_owned();
    let base_path = dir.join(format!(".{file_name}.base-{}", std::process::id()));
    let partial = dir.join(format!(".{file_name}.partial-{}", std::process::id()));
    let _base_guard = Cleanup(Some(base_path.clone()));
    let mut partial_guard = Cleanup(Some(partial.clone()));
    source::fetch_snapshot(
        &archive,
        plan.generation,
        plan.snapshot_revision,
        &base_path,
    )
    .await?;
    let bar = progress_bar((plan.target - plan.snapshot_revision) as u64);
    let mut events = ArchiveEvents::new(&archive, &plan, bar.clone());
    let (base2, partial2, plan2) = (base_path.clone(), partial.clone(), plan.clone());
    let summary = tokio::task::spawn_blocking(move || -> anyhow::Result<synth::Summary> {
        let summary = synth::synthesize(
            &base2,
            plan2.snapshot_revision,
            plan2.target,
            &mut events,
            bump,
            &partial2,
        )?;
        synth::verify_output(&partial2, &summary).context("verify the restored file")?;
        Ok(summary)
    })
    .await??;
    bar.finish_and_clear();
    std::fs::rename(&partial, output)
        .with_context(|| format!("move the restored file to {}", output.display()))?;
    partial_guard.0 = None;
    if let Ok(d) = std::fs::File::open(&dir) {
        d.sync_all().ok();
    }
    println!(
        "restored revision {} (generation {}, base snapshot {}, {} revisions replayed): {} key entries, {} bytes, {:.2} s -> {}",
        summary.revision,
        plan.generation,
        plan.snapshot_revision,
        summary.replayed,
        summary.key_entries,
        summary.bytes,
        started.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}

/// One line of `export`: the fields etcdctl's JSON output uses.
#[derive(Serialize)]
struct ExportedKey {
    key: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    value: String,
    lease: i64,
}

/// `etcd-restorer export`: the live keys at the target as JSON lines,
/// sorted by key.
///
/// # Errors
/// As for `restore`.
pub async fn export(
    url: &str,
    target: &Target,
    prefix: Option<&str>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (archive, listing) = load(url).await?;
    let (plan, choice) = plan_target(&archive, &listing, target).await?;
    if let Some(choice) = &choice {
        eprintln!("{}", describe_time_choice(target, choice));
    }
    let scratch = tempfile_path("export-base");
    let _guard = Cleanup(Some(scratch.clone()));
    source::fetch_snapshot(&archive, plan.generation, plan.snapshot_revision, &scratch).await?;
    let mut events = ArchiveEvents::new(&archive, &plan, indicatif::ProgressBar::hidden());
    let prefix = prefix.unwrap_or_default().as_bytes().to_vec();
    let live = tokio::task::spawn_blocking(move || -> anyhow::Result<BTreeMap<Vec<u8>, Event>> {
        let base = BoltReader::open(&scratch)?;
        let mut live: BTreeMap<Vec<u8>, Event> = BTreeMap::new();
        let mut apply = |event: Event| {
            if !event.key.starts_with(&prefix) {
                return;
            }
            match event.kind {
                EventKind::Put => {
                    live.insert(event.key.clone(), event);
                }
                EventKind::Delete => {
                    live.remove(&event.key);
                }
            }
        };
        let mut bad = None;
        base.for_each(b"key", &mut |k, v| {
            let kind = if k.len() == 18 && k[17] == b't' {
                EventKind::Delete
            } else {
                EventKind::Put
            };
            match synth::decode_key_value(v, kind) {
                Some(e) => apply(e),
                None => bad = Some(k.to_vec()),
            }
            Ok(())
        })?;
        if let Some(k) = bad {
            bail!("base snapshot holds an undecodable key-value at {k:?}");
        }
        events.replay(
            &mut |r| {
                for e in &r.events {
                    apply(e.clone());
                }
                Ok(())
            },
            &mut |_| {},
        )?;
        Ok(live)
    })
    .await??;
    let b64 = base64::engine::general_purpose::STANDARD;
    for e in live.values() {
        let line = ExportedKey {
            key: b64.encode(&e.key),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            version: e.version,
            value: b64.encode(&e.value),
            lease: e.lease,
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn tempfile_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("etcd-restorer-{what}-{}", std::process::id()))
}

/// `etcd-restorer verify`: reads every object of the archive and checks it
/// (checksums, headers against names, revision continuity, manifests, and
/// holes in chains). Prints each problem and a summary.
///
/// # Errors
/// [`crate::VerifyFailed`] if any problem was found; store errors.
pub async fn verify(url: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let (archive, listing) = load(url).await?;
    let mut problems: Vec<String> = Vec::new();
    let (mut segments, mut revisions, mut snapshots, mut snapshot_bytes) = (0u64, 0u64, 0u64, 0u64);
    let scratch = tempfile_path("verify");
    for g in &listing.generations {
        let id = g.generation();
        match &g.manifest {
            None => problems.push(format!(
                "generation {id}: no {}",
                layout::GENERATION_MANIFEST_NAME
            )),
            Some(m) => {
                if g.runs()
                    .first()
                    .is_some_and(|r| r.after != m.start_revision)
                {
                    problems.push(format!(
                        "generation {id}: segments after revision {} are missing",
                        m.start_revision
                    ));
                }
            }
        }
        for pair in g.runs().windows(2) {
            problems.push(format!(
                "generation {id}: revisions {}..={} are missing",
                pair[0].last + 1,
                pair[1].after
            ));
        }
        let mut rx = source::prefetch_segments(archive.clone(), id, g.segments.clone());
        for name in &g.segments {
            let fetched = rx.recv().await.context("segment download stopped")?;
            let (key, bytes) = match fetched {
                Ok(kb) => kb,
                Err(e) if crate::classify(&e) == crate::ExitKind::StoreUnreachable => {
                    return Err(e)
                }
                Err(e) => {
                    problems.push(format!("{e:#}"));
                    rx = source::prefetch_segments(
                        archive.clone(),
                        id,
                        g.segments.iter().filter(|s| *s > name).copied().collect(),
                    );
                    continue;
                }
            };
            let mut count = 0u64;
            match source::for_each_record(&key, &bytes, name, &mut |r| {
                if matches!(r, Record::Revision(_)) {
                    count += 1;
                }
                Ok(())
            }) {
                Ok(()) => {
                    segments += 1;
                    revisions += count;
                }
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        for &rev in &g.snapshots {
            match source::verify_snapshot(&archive, id, rev, &scratch).await {
                Ok(bytes) => {
                    snapshots += 1;
                    snapshot_bytes += bytes;
                }
                Err(e) if crate::classify(&e) == crate::ExitKind::StoreUnreachable => {
                    return Err(e)
                }
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
    }
    for p in &problems {
        writeln!(out, "problem: {p}")?;
    }
    writeln!(
        out,
        "verified {segments} segments ({revisions} revisions) and {snapshots} snapshots ({snapshot_bytes} bytes) in {:.2} s: {}",
        started.elapsed().as_secs_f64(),
        if problems.is_empty() { "OK".to_owned() } else { format!("{} problems", problems.len()) }
    )?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(crate::VerifyFailed(problems.len()).into())
    }
}

/// `list --json` output (stable, documented in docs/restorer.md).
#[derive(Serialize)]
pub struct ListOutput {
    /// Archive URL.
    pub archive: String,
    /// Archive format version.
    pub format_version: u32,
    /// Generations, oldest first.
    pub generations: Vec<ListGeneration>,
    /// Stretches of history the archive cannot restore.
    pub gaps: Vec<ListGap>,
}

/// One generation in `list --json`.
#[derive(Serialize)]
pub struct ListGeneration {
    /// Generation id.
    pub generation: u64,
    /// Source cluster ID (hex).
    pub cluster_id: String,
    /// Why it started (`new-archive`, `compacted`, `cluster-changed`, `lineage-broken`).
    pub reason: String,
    /// Detail of the reason.
    pub detail: String,
    /// When it started (RFC 3339).
    pub started: String,
    /// Revision the chain starts after.
    pub start_revision: Revision,
    /// Base snapshot revisions.
    pub snapshots: Vec<Revision>,
    /// Number of segments.
    pub segments: usize,
    /// Last archived revision (null if none yet).
    pub last_revision: Option<Revision>,
    /// Latest moment the archive vouches for (RFC 3339, null if none yet).
    pub last_time: Option<String>,
    /// Restorable revision ranges.
    pub restorable: Vec<ListRange>,
}

/// A restorable range in `list --json`.
#[derive(Serialize)]
pub struct ListRange {
    /// First restorable revision.
    pub first_revision: Revision,
    /// Last restorable revision.
    pub last_revision: Revision,
    /// Latest restorable moment (RFC 3339, null if unknown).
    pub last_time: Option<String>,
}

/// A gap in `list --json`.
#[derive(Serialize)]
pub struct ListGap {
    /// Generation before the gap.
    pub generation: u64,
    /// Last revision before the gap.
    pub after_revision: Revision,
    /// Generation after the gap (the same one for missing segments).
    pub next_generation: u64,
    /// First revision after the gap that the archive holds again.
    pub resumes_at_revision: Revision,
    /// Why (`compacted`, `cluster-changed`, `lineage-broken`, `missing-segments`).
    pub reason: String,
}

fn kebab(reason: etcdpitr_common::manifest::StartReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Builds the `list` view of an archive.
pub fn list_view(url: &str, listing: &ArchiveListing) -> ListOutput {
    let mut generations = Vec::new();
    let mut gaps = Vec::new();
    for g in &listing.generations {
        let m = g.manifest.as_ref();
        let runs = g.runs();
        for pair in runs.windows(2) {
            gaps.push(ListGap {
                generation: g.generation().0,
                after_revision: pair[0].last,
                next_generation: g.generation().0,
                resumes_at_revision: pair[1].after + 1,
                reason: "missing-segments".into(),
            });
        }
        if let Some(prev) = m.and_then(|m| m.previous) {
            gaps.push(ListGap {
                generation: prev.generation.0,
                after_revision: prev.last_revision,
                next_generation: g.generation().0,
                resumes_at_revision: m.map_or(0, |m| m.start_revision),
                reason: m.map(|m| kebab(m.reason)).unwrap_or_default(),
            });
        }
        let last_ms = g.segments.iter().map(|s| s.end_ms).max();
        generations.push(ListGeneration {
            generation: g.generation().0,
            cluster_id: m.map(|m| format!("{:x}", m.cluster_id)).unwrap_or_default(),
            reason: m.map(|m| kebab(m.reason)).unwrap_or_default(),
            detail: m.map(|m| m.detail.clone()).unwrap_or_default(),
            started: m.map(|m| format_ms(m.started_ms)).unwrap_or_default(),
            start_revision: m.map_or(0, |m| m.start_revision),
            snapshots: g.snapshots.clone(),
            segments: g.segments.len(),
            last_revision: runs.first().map(|r| r.last),
            last_time: last_ms.map(format_ms),
            restorable: plan::generation_ranges(g)
                .iter()
                .map(|r| ListRange {
                    first_revision: r.first,
                    last_revision: r.last,
                    last_time: (r.end_ms > 0).then(|| format_ms(r.end_ms)),
                })
                .collect(),
        });
    }
    ListOutput {
        archive: url.to_owned(),
        format_version: listing.manifest.as_ref().map_or(0, |m| m.version),
        generations,
        gaps,
    }
}

/// `etcd-restorer list`.
///
/// # Errors
/// Store or layout errors.
pub async fn list(url: &str, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let (_, listing) = load(url).await?;
    let view = list_view(url, &listing);
    if json {
        serde_json::to_writer_pretty(&mut *out, &view)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "archive {} (format {})",
        view.archive, view.format_version
    )?;
    for g in &view.generations {
        writeln!(
            out,
            "generation {}: cluster {}, started {} ({}), {} snapshots, {} segments",
            g.generation,
            g.cluster_id,
            g.started,
            g.reason,
            g.snapshots.len(),
            g.segments
        )?;
        if g.restorable.is_empty() {
            writeln!(
                out,
                "  not restorable yet (no base snapshot with its chain)"
            )?;
        }
        for r in &g.restorable {
            writeln!(
                out,
                "  restorable revisions {}..={}, until {}",
                r.first_revision,
                r.last_revision,
                r.last_time.as_deref().unwrap_or("(no segment yet)")
            )?;
        }
    }
    for gap in &view.gaps {
        writeln!(
            out,
            "gap ({}): revisions after {} (generation {}) until {} (generation {}) are not archived",
            gap.reason, gap.after_revision, gap.generation, gap.resumes_at_revision, gap.next_generation
        )?;
    }
    Ok(())
}
