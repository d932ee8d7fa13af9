//! Where the archive's newest chain ends, read from the store (the catalog
//! only narrows the listing).

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use etcdpitr_common::catalog::Catalog;
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::listing::GenerationListing;
use etcdpitr_common::manifest::GenerationManifest;
use etcdpitr_common::segment::{self, Record, RevisionRecord};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;

/// The end of the newest generation's chain.
#[derive(Clone, Debug)]
pub struct ChainHead {
    /// The generation's manifest.
    pub manifest: GenerationManifest,
    /// Last archived revision (the start revision if no segment exists yet).
    pub last_revision: Revision,
    /// The last archived revision's events, to check lineage against.
    pub last_record: Option<RevisionRecord>,
    /// Snapshot revisions of the generation.
    pub snapshots: Vec<Revision>,
}

impl ChainHead {
    /// The generation id.
    pub fn generation(&self) -> GenerationId {
        self.manifest.generation
    }
}

async fn list_segments(
    archive: &Archive,
    generation: GenerationId,
    after: Option<&SegmentName>,
) -> anyhow::Result<Vec<SegmentName>> {
    let dir = format!("{}/segments", generation.dir_name());
    let offset = after.map(|n| layout::segment_key(generation, n));
    let keys = archive
        .list(&dir, offset.as_deref())
        .await
        .with_context(|| format!("list {dir}"))?;
    keys.iter()
        .map(|k| {
            k.rsplit('/')
                .next()
                .and_then(SegmentName::parse)
                .with_context(|| format!("unexpected object {k} in the archive"))
        })
        .collect()
}

/// Reads the last revision record of a segment.
async fn last_record_of(
    archive: &Archive,
    generation: GenerationId,
    name: &SegmentName,
) -> anyhow::Result<Option<RevisionRecord>> {
    let key = layout::segment_key(generation, name);
    let bytes = archive
        .get(&key)
        .await
        .with_context(|| format!("read {key}"))?;
    let (_, records) = segment::decode_all(&key, &bytes)?;
    Ok(records.into_iter().rev().find_map(|r| match r {
        Record::Revision(r) => Some(r),
        _ => None,
    }))
}

/// Loads the head of the newest generation, or `None` for an empty archive.
///
/// # Errors
/// Store failures, or an archive that does not follow the layout.
pub async fn load(
    archive: &Archive,
    catalog: &Arc<Mutex<Catalog>>,
) -> anyhow::Result<Option<ChainHead>> {
    let mut generation = None;
    for dir in archive.list_root_dirs().await.context("list the archive")? {
        // Names outside the archive's namespace (`lost+found`, a README
        // directory, …) are not ours; a malformed `gen-*` is.
        if !dir.starts_with("gen-") {
            tracing::debug!(name = %dir, "ignoring a directory outside the archive's namespace");
            continue;
        }
        let id = GenerationId::parse_dir(&dir)
            .with_context(|| format!("unexpected directory {dir} in the archive"))?;
        generation = Some(id);
    }
    let Some(generation) = generation else {
        return Ok(None);
    };
    let manifest_key = layout::generation_manifest_key(generation);
    let manifest_bytes = archive
        .get(&manifest_key)
        .await
        .with_context(|| format!("read {manifest_key}"))?;
    let manifest = GenerationManifest::parse(&manifest_key, &manifest_bytes)?;
    if manifest.generation != generation {
        bail!("{manifest_key} names generation {}", manifest.generation);
    }

    // The catalog's newest uploaded segment narrows the listing; if it is
    // unknown to the store (a stale or foreign catalog) list everything.
    let known = catalog
        .lock()
        .expect("catalog lock")
        .last_uploaded_segment(generation)?;
    let known = match known {
        Some(n) if archive.exists(&layout::segment_key(generation, &n)).await? => Some(n),
        _ => None,
    };
    let mut segments = list_segments(archive, generation, known.as_ref()).await?;
    if let Some(n) = known {
        segments.insert(0, n);
    }
    let mut last_nonempty = segments.iter().rev().find(|s| !s.is_empty()).copied();
    if last_nonempty.is_none() && known.is_some() {
        segments = list_segments(archive, generation, None).await?;
        last_nonempty = segments.iter().rev().find(|s| !s.is_empty()).copied();
    }
    let listing = GenerationListing {
        id: Some(generation),
        manifest: Some(manifest.clone()),
        snapshots: archive
            .list(&format!("{}/snapshots", generation.dir_name()), None)
            .await?
            .iter()
            .filter_map(|k| {
                k.rsplit('/')
                    .next()
                    .and_then(layout::parse_snapshot_file_name)
            })
            .collect(),
        segments,
    };
    let runs = listing.runs();
    if runs.len() > 1 {
        tracing::error!(
            generation = %generation,
            "segments are missing inside the generation: revisions {}..={} cannot be restored",
            runs[0].last + 1,
            runs[1].after
        );
    }
    if known.is_none() {
        if let Some(first) = runs.first() {
            if first.after != manifest.start_revision {
                tracing::error!(generation = %generation, "the first segments of the generation are missing");
            }
        }
    }
    let last_revision = listing
        .segments
        .last()
        .map_or(manifest.start_revision, |s| s.last);
    let last_record = match &last_nonempty {
        Some(n) => last_record_of(archive, generation, n).await?,
        None => None,
    };
    catalog
        .lock()
        .expect("catalog lock")
        .sync_generation(&listing)?;
    Ok(Some(ChainHead {
        manifest,
        last_revision,
        last_record,
        snapshots: listing.snapshots,
    }))
}
