//! Where the archive's newest chain ends, read from the store (the catalog
//! only narrows the listing).

use std::sync::{Arc, Mutex};

use anyhow::Context;
use etcdpitr_common::catalog::Catalog;
use etcdpitr_common::chain::{self, Chain};
use etcdpitr_common::hashchain::{self, Digest};
use etcdpitr_common::layout::GenerationObject;
use etcdpitr_common::layout::{self, GenerationId, PrunedRange, SegmentName};
use etcdpitr_common::listing::{list_generation_dir, GenerationListing};
use etcdpitr_common::manifest::{GenerationManifest, LineageFingerprint};
use etcdpitr_common::segment::{self, Record, RevisionRecord};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;

use crate::tip::Tip;

/// The end of the newest generation's chain.
#[derive(Clone, Debug)]
pub struct ChainHead {
    /// The generation's manifest.
    pub manifest: GenerationManifest,
    /// Last archived revision (the start revision if no segment exists yet).
    pub last_revision: Revision,
    /// The last archived revision's events, to check lineage against.
    pub last_record: Option<RevisionRecord>,
    /// The latest time (Unix ms) the chain vouches for (0 if none).
    pub end_ms: i64,
    /// Snapshot revisions of the generation.
    pub snapshots: Vec<Revision>,
    /// The newest lineage fingerprint at or below `last_revision`.
    pub fingerprint: Option<LineageFingerprint>,
    /// The id a new generation takes (one past every generation directory,
    /// void ones included).
    pub next_generation: GenerationId,
    /// The generation's newest archived objects in the hash chain.
    pub tip: Tip,
    /// When its newest snapshot was taken (Unix ms), if it has one.
    pub snapshot_taken_ms: Option<i64>,
}

impl ChainHead {
    /// The generation id.
    pub fn generation(&self) -> GenerationId {
        self.manifest.generation
    }

    /// The latest observed time archived in the generation: a new writer's
    /// observed times start no earlier.
    pub fn floor_ms(&self) -> i64 {
        self.last_record
            .as_ref()
            .map_or(0, |r| r.observed_ms)
            .max(self.end_ms)
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
    Ok(keys
        .iter()
        .filter_map(|k| {
            let name = k.rsplit('/').next().and_then(SegmentName::parse);
            if name.is_none() {
                tracing::warn!(object = %k, "ignoring an object that is not a segment");
            }
            name
        })
        .collect())
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
    let (header, records) = segment::decode_all(&key, &bytes)?;
    chain::check_segment_header(&key, generation, name, &header)?;
    Ok(records.into_iter().rev().find_map(|r| match r {
        Record::Revision(r) => Some(r),
        _ => None,
    }))
}

/// The newest generation that is not void, and the next free id.
struct NewestGeneration {
    generation: GenerationId,
    manifest: GenerationManifest,
    /// The digest of its manifest's bytes.
    anchor: Digest,
    next_generation: GenerationId,
}

/// Reads every generation's manifest and term markers (one per gap, so
/// few) and applies the chain rule for void generations.
async fn newest_live_generation(archive: &Archive) -> anyhow::Result<Option<NewestGeneration>> {
    let mut generations = Vec::new();
    let mut next_generation = None;
    for dir in archive.list_root_dirs().await.context("list the archive")? {
        // Names outside the archive's namespace (`lost+found`, a README
        // directory, …) are not ours; a malformed `gen-*` is.
        if !layout::in_namespace(&dir) {
            tracing::debug!(name = %dir, "ignoring a directory outside the archive's namespace");
            continue;
        }
        if dir == layout::TERMS_DIR {
            continue;
        }
        let id = GenerationId::parse_dir(&dir)
            .with_context(|| format!("unexpected directory {dir} in the archive"))?;
        next_generation = Some(id.next());
        let key = layout::generation_manifest_key(id);
        let Some(bytes) = archive
            .get_opt(&key)
            .await
            .with_context(|| format!("read {key}"))?
        else {
            // Its manifest is the first object a generation gets: this one
            // is being created right now (by a writer that lost the race).
            tracing::warn!(generation = %id, "ignoring a generation without {key}");
            continue;
        };
        let manifest = GenerationManifest::parse_in(&key, &bytes, id)?;
        let terms = list_generation_dir(archive, id, "terms")
            .await
            .with_context(|| format!("list {}/terms", id.dir_name()))?
            .into_iter()
            .filter_map(|o| match o {
                GenerationObject::Term(t) => Some(t),
                _ => None,
            })
            .collect();
        generations.push((
            GenerationListing {
                id: Some(id),
                manifest: Some(manifest),
                terms,
                ..GenerationListing::default()
            },
            hashchain::anchor(&bytes),
        ));
    }
    let Some(next_generation) = next_generation else {
        return Ok(None);
    };
    let listings: Vec<GenerationListing> = generations.iter().map(|(g, _)| g.clone()).collect();
    let void = chain::void_generations(&listings);
    for id in &void {
        tracing::warn!(generation = %id, "ignoring a generation started by an archiver that had lost leadership");
    }
    Ok(generations
        .into_iter()
        .rev()
        .find(|(g, _)| !void.contains(&g.generation()))
        .map(|(g, anchor)| NewestGeneration {
            generation: g.generation(),
            manifest: g.manifest.expect("loaded above"),
            anchor,
            next_generation,
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
    let Some(newest) = newest_live_generation(archive).await? else {
        return Ok(None);
    };
    let NewestGeneration {
        generation,
        manifest,
        anchor,
        next_generation,
    } = newest;

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
    if known.is_some() && !segments.iter().any(|s| !s.is_empty()) {
        // Only progress after the catalog's hint: the last revision record
        // lies further back.
        segments = list_segments(archive, generation, None).await?;
    }
    let listing = GenerationListing {
        id: Some(generation),
        manifest: Some(manifest.clone()),
        snapshots: list_generation_dir(archive, generation, "snapshots")
            .await?
            .into_iter()
            .filter_map(|o| match o {
                GenerationObject::Snapshot(rev) => Some(rev),
                _ => None,
            })
            .collect(),
        segments,
        ..GenerationListing::default()
    };
    // A listing narrowed by the catalog starts at the hint, not at the
    // generation's start.
    let start = known.map_or(manifest.start_revision, |n| n.prev());
    let pruned: Vec<PrunedRange> = list_generation_dir(archive, generation, layout::PRUNED_DIR)
        .await?
        .into_iter()
        .filter_map(|o| match o {
            GenerationObject::Pruned(r) => Some(r),
            _ => None,
        })
        .collect();
    let chain = Chain::build(
        generation,
        Some(start),
        &listing.segments,
        &listing.snapshots,
    )
    .with_pruned(&pruned);
    for gap in chain.gaps() {
        tracing::error!(generation = %generation, "{gap} from the archive and cannot be restored");
    }
    let last_revision = chain.last_revision();
    let last_link = chain.links.iter().rev().find(|s| !s.is_empty()).copied();
    let last_record = match &last_link {
        Some(n) => last_record_of(archive, generation, n).await?,
        None => None,
    };
    catalog
        .lock()
        .expect("catalog lock")
        .sync_generation(&listing)?;
    let fingerprint = crate::lineage::newest(archive, generation, last_revision).await?;
    let (tip, snapshot_taken_ms) = Tip::load(archive, &chain, anchor).await?;
    Ok(Some(ChainHead {
        tip,
        snapshot_taken_ms,
        manifest,
        last_revision,
        end_ms: chain.end_ms(),
        last_record,
        fingerprint,
        next_generation,
        snapshots: listing.snapshots,
    }))
}

/// The first revision of `manifest`'s generation's newest restorable range
/// (see [`Chain::restorable`]), from a full listing of the generation
/// (unlike [`load`], which the catalog may narrow to its newest segments);
/// `None` while it has no base snapshot.
///
/// # Errors
/// Store failures.
pub async fn restorable_start(
    archive: &Archive,
    manifest: &GenerationManifest,
) -> anyhow::Result<Option<Revision>> {
    let generation = manifest.generation;
    let mut listing = GenerationListing {
        id: Some(generation),
        manifest: Some(manifest.clone()),
        ..GenerationListing::default()
    };
    for dir in ["segments", "snapshots", layout::PRUNED_DIR] {
        for object in list_generation_dir(archive, generation, dir)
            .await
            .with_context(|| format!("list {}/{dir}", generation.dir_name()))?
        {
            match object {
                GenerationObject::Segment(name) => listing.segments.push(name),
                GenerationObject::Snapshot(revision) => listing.snapshots.push(revision),
                GenerationObject::Pruned(range) => listing.pruned.push(range),
                _ => {}
            }
        }
    }
    Ok(Chain::of(&listing).restorable().last().map(|r| r.first))
}
