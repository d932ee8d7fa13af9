//! `etcd-restorer list`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use etcdpitr_common::layout::GenerationId;
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::snapshot::{self, HeaderReadError, SnapshotHeader};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::load;
use crate::format_ms;
use crate::point::{format_seconds, TimeRules};
use crate::source;

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
    /// Generations started by an archiver that had lost leadership: not
    /// part of the archive's history.
    pub void_generations: Vec<u64>,
    /// How current the archive is (null when it has no generation).
    pub current: Option<ListCurrent>,
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
    /// Base snapshots with their times and sizes, in revision order.
    pub base_snapshots: Vec<ListSnapshot>,
    /// Number of segments.
    pub segments: usize,
    /// Last archived revision (null if none yet).
    pub last_revision: Option<Revision>,
    /// Latest moment the archive vouches for (RFC 3339, null if none yet).
    pub last_time: Option<String>,
    /// Restorable revision ranges.
    pub restorable: Vec<ListRange>,
    /// Revision ranges retention deleted on purpose.
    pub pruned: Vec<ListPruned>,
}

/// A base snapshot in `list --json`.
#[derive(Serialize)]
pub struct ListSnapshot {
    /// Its revision.
    pub revision: Revision,
    /// When the archiver took it (RFC 3339; null if its header is damaged).
    pub time: Option<String>,
    /// Size of the etcd snapshot file it holds (bytes, uncompressed; null
    /// if its header is damaged).
    pub bytes: Option<u64>,
}

/// Revisions retention deleted, in `list --json`.
#[derive(Serialize)]
pub struct ListPruned {
    /// First pruned revision.
    pub first_revision: Revision,
    /// Last pruned revision.
    pub last_revision: Revision,
}

/// A restorable range in `list --json`.
#[derive(Serialize)]
pub struct ListRange {
    /// First restorable revision.
    pub first_revision: Revision,
    /// When its base snapshot was taken (RFC 3339, null if unknown): the
    /// source was at the first revision then.
    pub first_time: Option<String>,
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
    /// The latest moment the archive vouches for before the gap (RFC
    /// 3339, null if unknown).
    pub after_time: Option<String>,
    /// Generation after the gap (the same one for missing segments).
    pub next_generation: u64,
    /// First revision after the gap that the archive holds again.
    pub resumes_at_revision: Revision,
    /// When the archive holds history again (RFC 3339, null if unknown):
    /// the observed time of `resumes_at_revision` for missing segments,
    /// the next generation's start otherwise.
    pub resumes_at_time: Option<String>,
    /// Why (`compacted`, `cluster-changed`, `lineage-broken`, `missing-segments`).
    pub reason: String,
}

/// How current the archive is, in `list --json`: its newest generation's
/// newest revision and the newest moment the archive vouches for it.
#[derive(Serialize)]
pub struct ListCurrent {
    /// The newest generation.
    pub generation: u64,
    /// Its newest revision (null when it holds none yet).
    pub newest_revision: Option<Revision>,
    /// When the archiver observed that revision (RFC 3339; null when only
    /// a base snapshot holds it).
    pub newest_revision_time: Option<String>,
    /// The newest moment the archive vouches the source was still at that
    /// revision (RFC 3339; null when nothing is vouched for yet).
    pub vouched_until: Option<String>,
    /// Milliseconds from `vouched_until` to when `list` ran (null with it).
    pub vouched_age_ms: Option<i64>,
    /// Whether the archive is current: `vouched_age_ms` at most
    /// `max_staleness_ms` (a `--time` after `vouched_until` then takes the
    /// newest revision).
    pub current: bool,
    /// The bound it was judged by (`--max-staleness`, milliseconds).
    pub max_staleness_ms: i64,
}

/// What `list` reads beyond the names: snapshot headers, and the observed
/// times of the revisions where gaps end and of the newest revision.
#[derive(Default)]
pub struct ListDetails {
    /// Snapshot headers by (generation, revision); a damaged header is
    /// absent (`verify` reports it).
    pub snapshots: HashMap<(GenerationId, Revision), SnapshotHeader>,
    /// Observed times (Unix ms) by (generation, revision).
    pub observed: HashMap<(GenerationId, Revision), i64>,
}

/// Snapshot headers read at once.
const HEADER_READS: usize = 16;

/// Reads what [`list_view`] shows beyond the names: every snapshot
/// header (a ranged read each), and one segment for each gap inside a
/// generation and for the newest revision.
///
/// # Errors
/// Store errors, or a damaged segment.
pub async fn list_details(
    archive: &Archive,
    listing: &ArchiveListing,
) -> anyhow::Result<ListDetails> {
    let mut details = ListDetails::default();
    let wanted: Vec<(GenerationId, Revision)> = listing
        .generations
        .iter()
        .flat_map(|g| g.snapshots.iter().map(move |&r| (g.generation(), r)))
        .collect();
    let headers: Vec<_> = futures::stream::iter(wanted)
        .map(|(g, r)| async move {
            match snapshot::read_header(archive, g, r).await {
                Ok(h) => Ok(Some(((g, r), h))),
                Err(HeaderReadError::Integrity(e)) => {
                    tracing::warn!(error = %e, "snapshot header unreadable; run verify");
                    Ok(None)
                }
                Err(HeaderReadError::Store(e)) => Err(e),
            }
        })
        .buffer_unordered(HEADER_READS)
        .try_collect()
        .await?;
    details.snapshots = headers.into_iter().flatten().collect();
    for (i, g) in listing.generations.iter().enumerate() {
        let chain = g.chain();
        let mut revisions: Vec<Revision> = chain
            .gaps()
            .iter()
            .map(|gap| gap.resumes_after + 1)
            .collect();
        if i + 1 == listing.generations.len() {
            revisions.push(chain.last_revision());
        }
        for revision in revisions {
            let Some(link) = chain
                .links
                .iter()
                .find(|s| !s.is_empty() && s.first <= revision && revision <= s.last)
            else {
                continue;
            };
            if let Some(ms) = source::observed_in(archive, g.generation(), link, revision).await? {
                details.observed.insert((g.generation(), revision), ms);
            }
        }
    }
    Ok(details)
}

fn kebab(reason: etcdpitr_common::manifest::StartReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn time(ms: i64) -> Option<String> {
    (ms > 0).then(|| format_ms(ms))
}

/// Builds the `list` view of an archive from its listing, what
/// [`list_details`] read, and `rules` (for how current it is).
pub fn list_view(
    url: &str,
    listing: &ArchiveListing,
    details: &ListDetails,
    rules: &TimeRules,
) -> ListOutput {
    let mut generations = Vec::new();
    let mut gaps = Vec::new();
    let mut previous_end_ms: HashMap<GenerationId, i64> = HashMap::new();
    let taken = |g: GenerationId, r: Revision| details.snapshots.get(&(g, r));
    for g in &listing.generations {
        let id = g.generation();
        let m = g.manifest.as_ref();
        let chain = g.chain();
        for gap in chain.gaps() {
            let before = chain.runs.iter().find(|r| r.last == gap.after);
            gaps.push(ListGap {
                generation: id.0,
                after_revision: gap.after,
                after_time: before.and_then(|r| time(r.end_ms)),
                next_generation: id.0,
                resumes_at_revision: gap.resumes_after + 1,
                resumes_at_time: details
                    .observed
                    .get(&(id, gap.resumes_after + 1))
                    .map(|&ms| format_ms(ms)),
                reason: "missing-segments".into(),
            });
        }
        if let Some(prev) = m.and_then(|m| m.previous) {
            gaps.push(ListGap {
                generation: prev.generation.0,
                after_revision: prev.last_revision,
                after_time: previous_end_ms
                    .get(&prev.generation)
                    .and_then(|&ms| time(ms)),
                next_generation: id.0,
                resumes_at_revision: m.map_or(0, |m| m.start_revision),
                resumes_at_time: m.and_then(|m| time(m.started_ms)),
                reason: m.map(|m| kebab(m.reason)).unwrap_or_default(),
            });
        }
        previous_end_ms.insert(id, chain.end_ms());
        generations.push(ListGeneration {
            generation: id.0,
            cluster_id: m.map(|m| format!("{:x}", m.cluster_id)).unwrap_or_default(),
            reason: m.map(|m| kebab(m.reason)).unwrap_or_default(),
            detail: m.map(|m| m.detail.clone()).unwrap_or_default(),
            started: m.map(|m| format_ms(m.started_ms)).unwrap_or_default(),
            start_revision: m.map_or(0, |m| m.start_revision),
            snapshots: g.snapshots.clone(),
            base_snapshots: g
                .snapshots
                .iter()
                .map(|&r| ListSnapshot {
                    revision: r,
                    time: taken(id, r).map(|h| format_ms(h.taken_ms)),
                    bytes: taken(id, r).map(|h| h.db_bytes),
                })
                .collect(),
            segments: g.segments.len(),
            last_revision: (!chain.links.is_empty()).then(|| chain.last_revision()),
            last_time: time(chain.end_ms()),
            restorable: chain
                .restorable()
                .iter()
                .map(|r| ListRange {
                    first_revision: r.first,
                    first_time: taken(id, r.first).map(|h| format_ms(h.taken_ms)),
                    last_revision: r.last,
                    last_time: time(r.end_ms),
                })
                .collect(),
            pruned: chain
                .pruned_gaps()
                .iter()
                .map(|gap| ListPruned {
                    first_revision: gap.after + 1,
                    last_revision: gap.resumes_after,
                })
                .collect(),
        });
    }
    let current = listing.generations.last().map(|g| {
        let id = g.generation();
        let chain = g.chain();
        let newest = if chain.links.is_empty() {
            g.snapshots.last().copied()
        } else {
            Some(chain.last_revision())
        };
        let vouched_ms = chain.end_ms();
        let currency = rules.currency(vouched_ms);
        ListCurrent {
            generation: id.0,
            newest_revision: newest,
            newest_revision_time: newest
                .and_then(|r| details.observed.get(&(id, r)))
                .map(|&ms| format_ms(ms)),
            vouched_until: time(vouched_ms),
            vouched_age_ms: (vouched_ms > 0).then_some(currency.age_ms),
            current: currency.current,
            max_staleness_ms: currency.max_staleness_ms,
        }
    });
    ListOutput {
        archive: url.to_owned(),
        format_version: listing.manifest.as_ref().map_or(0, |m| m.version),
        generations,
        gaps,
        void_generations: listing.void.iter().map(|g| g.generation().0).collect(),
        current,
    }
}

/// `etcd-restorer list`: `max_staleness` is the bound the archive is
/// judged current by (`None`: the default).
///
/// # Errors
/// Store or layout errors.
pub async fn list(
    url: &str,
    key_files: &[PathBuf],
    json: bool,
    max_staleness: Option<Duration>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (archive, listing) = load(url, key_files).await?;
    let details = list_details(&archive, &listing).await?;
    let rules = TimeRules::now(false, max_staleness);
    let view = list_view(url, &listing, &details, &rules);
    if json {
        serde_json::to_writer_pretty(&mut *out, &view)?;
        writeln!(out)?;
        return Ok(());
    }
    write_text(&view, out)
}

fn or_unknown(t: Option<&String>) -> &str {
    t.map_or("(unknown)", String::as_str)
}

fn write_text(view: &ListOutput, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "archive {} (format {})",
        view.archive, view.format_version
    )?;
    if let Some(c) = &view.current {
        write_current(c, out)?;
    }
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
        for s in &g.base_snapshots {
            match (&s.time, s.bytes) {
                (Some(t), Some(b)) => writeln!(
                    out,
                    "  snapshot at revision {}: taken {t}, {b} bytes",
                    s.revision
                )?,
                _ => writeln!(
                    out,
                    "  snapshot at revision {}: header unreadable (run verify)",
                    s.revision
                )?,
            }
        }
        if g.restorable.is_empty() {
            writeln!(
                out,
                "  not restorable yet (no base snapshot with its chain)"
            )?;
        }
        for r in &g.restorable {
            writeln!(
                out,
                "  restorable revisions {}..={}, from {} until {}",
                r.first_revision,
                r.last_revision,
                or_unknown(r.first_time.as_ref()),
                r.last_time.as_deref().unwrap_or("(no segment yet)")
            )?;
        }
        for p in &g.pruned {
            writeln!(
                out,
                "  revisions {}..={} pruned by retention",
                p.first_revision, p.last_revision
            )?;
        }
    }
    for id in &view.void_generations {
        writeln!(
            out,
            "generation {id}: void (started by an archiver that had lost leadership; ignored)"
        )?;
    }
    for gap in &view.gaps {
        writeln!(
            out,
            "gap ({}): revisions after {} (generation {}, archived until {}) until {} (generation {}, from {}) are not archived",
            gap.reason,
            gap.after_revision,
            gap.generation,
            or_unknown(gap.after_time.as_ref()),
            gap.resumes_at_revision,
            gap.next_generation,
            or_unknown(gap.resumes_at_time.as_ref())
        )?;
    }
    Ok(())
}

fn write_current(c: &ListCurrent, out: &mut dyn Write) -> anyhow::Result<()> {
    let bound = humantime::format_duration(Duration::from_millis(
        c.max_staleness_ms.max(0).unsigned_abs(),
    ));
    let Some(revision) = c.newest_revision else {
        writeln!(
            out,
            "newest: generation {} holds no revision yet: not current",
            c.generation
        )?;
        return Ok(());
    };
    let observed = c
        .newest_revision_time
        .as_ref()
        .map_or_else(String::new, |t| format!(" (observed {t})"));
    match (&c.vouched_until, c.vouched_age_ms) {
        (Some(until), Some(age)) => writeln!(
            out,
            "newest: revision {revision} of generation {}{observed}, vouched for until {until} ({} ago): {}",
            c.generation,
            format_seconds(age),
            if c.current {
                format!("current (within --max-staleness {bound})")
            } else {
                format!("NOT current (older than --max-staleness {bound}: is the archiver running?)")
            }
        )?,
        _ => writeln!(
            out,
            "newest: revision {revision} of generation {}{observed}, no moment vouched for yet: not current",
            c.generation
        )?,
    }
    Ok(())
}
