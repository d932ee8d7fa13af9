//! `etcd-restorer list`.

use std::io::Write;
use std::path::PathBuf;

use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::Revision;
use serde::Serialize;

use super::load;
use crate::format_ms;

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
    /// Revision ranges retention deleted on purpose.
    pub pruned: Vec<ListPruned>,
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
        let chain = g.chain();
        for gap in chain.gaps() {
            gaps.push(ListGap {
                generation: g.generation().0,
                after_revision: gap.after,
                next_generation: g.generation().0,
                resumes_at_revision: gap.resumes_after + 1,
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
        let last_ms = (chain.end_ms() > 0).then(|| chain.end_ms());
        generations.push(ListGeneration {
            generation: g.generation().0,
            cluster_id: m.map(|m| format!("{:x}", m.cluster_id)).unwrap_or_default(),
            reason: m.map(|m| kebab(m.reason)).unwrap_or_default(),
            detail: m.map(|m| m.detail.clone()).unwrap_or_default(),
            started: m.map(|m| format_ms(m.started_ms)).unwrap_or_default(),
            start_revision: m.map_or(0, |m| m.start_revision),
            snapshots: g.snapshots.clone(),
            segments: g.segments.len(),
            last_revision: (!chain.links.is_empty()).then(|| chain.last_revision()),
            last_time: last_ms.map(format_ms),
            restorable: chain
                .restorable()
                .iter()
                .map(|r| ListRange {
                    first_revision: r.first,
                    last_revision: r.last,
                    last_time: (r.end_ms > 0).then(|| format_ms(r.end_ms)),
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
    ListOutput {
        archive: url.to_owned(),
        format_version: listing.manifest.as_ref().map_or(0, |m| m.version),
        generations,
        gaps,
        void_generations: listing.void.iter().map(|g| g.generation().0).collect(),
    }
}

/// `etcd-restorer list`.
///
/// # Errors
/// Store or layout errors.
pub async fn list(
    url: &str,
    key_files: &[PathBuf],
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (_, listing) = load(url, key_files).await?;
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
            "gap ({}): revisions after {} (generation {}) until {} (generation {}) are not archived",
            gap.reason, gap.after_revision, gap.generation, gap.resumes_at_revision, gap.next_generation
        )?;
    }
    Ok(())
}
