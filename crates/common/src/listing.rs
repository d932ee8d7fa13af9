//! An archive's object listing, turned into generations and their chains.
//!
//! Everything a restore plan needs comes from names alone (one LIST, no
//! per-object reads) plus the small generation manifests.

use thiserror::Error;

use crate::chain::Chain;
use crate::crypto::CryptoError;
use crate::layout::{
    self, ClockStepName, GenerationId, GenerationObject, PrunedRange, SegmentName,
};
use crate::manifest::{ArchiveManifest, GenerationManifest, ManifestError};
use crate::store::{Archive, StoreError};
use crate::Revision;

/// Errors loading a listing.
#[derive(Debug, Error)]
pub enum ListingError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest is unreadable or of an unknown version.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The keys given do not suit the archive.
    #[error(transparent)]
    Keys(#[from] CryptoError),
}

/// The objects of one generation.
#[derive(Clone, Debug, Default)]
pub struct GenerationListing {
    /// The generation id.
    pub id: Option<GenerationId>,
    /// Its manifest, if written.
    pub manifest: Option<GenerationManifest>,
    /// Snapshot revisions, ascending.
    pub snapshots: Vec<Revision>,
    /// Segments in name (= revision) order.
    pub segments: Vec<SegmentName>,
    /// Revisions with a lineage fingerprint, ascending.
    pub lineage: Vec<Revision>,
    /// Writer terms that began writing this generation after it started.
    pub terms: Vec<u64>,
    /// First revisions of the generation's clock epochs, ascending.
    pub clock_epochs: Vec<Revision>,
    /// Wall-clock steps recorded in those epochs, in name order (their
    /// offsets are in the objects; see [`crate::chain::Timeline`]).
    pub clock_steps: Vec<ClockStepName>,
    /// Revision ranges retention deleted on purpose, in name order.
    pub pruned: Vec<PrunedRange>,
}

impl GenerationListing {
    /// The generation id (always set for listings loaded from a store).
    pub fn generation(&self) -> GenerationId {
        self.id.expect("listing loaded from a store has an id")
    }

    /// The generation's chain (see [`crate::chain`]).
    pub fn chain(&self) -> Chain {
        Chain::of(self)
    }
}

/// The objects in one subdirectory of a generation (`snapshots`,
/// `lineage`, `terms`, …), classified by [`layout::classify`]; names that do
/// not parse are left out (`verify` reports them from a full listing).
///
/// # Errors
/// A store error.
pub async fn list_generation_dir(
    archive: &Archive,
    generation: GenerationId,
    subdir: &str,
) -> Result<Vec<GenerationObject>, StoreError> {
    let dir = format!("{}/{subdir}", generation.dir_name());
    Ok(archive
        .list(&dir, None)
        .await?
        .iter()
        .filter_map(|k| match layout::classify(k) {
            Some((g, object)) if g == generation => Some(object),
            _ => None,
        })
        .collect())
}

/// All generations of an archive.
#[derive(Clone, Debug, Default)]
pub struct ArchiveListing {
    /// The archive manifest, if the archive exists.
    pub manifest: Option<ArchiveManifest>,
    /// Generations in id order.
    pub generations: Vec<GenerationListing>,
    /// Objects inside a generation's directory that do not follow the
    /// layout (an integrity problem `verify` reports; restores ignore them).
    pub strays: Vec<String>,
    /// Objects outside the archive's namespace (a `lost+found`, a README):
    /// ignored, and reported by `verify`.
    pub foreign: Vec<String>,
    /// Archive-wide writer terms claimed so far, ascending.
    pub terms: Vec<u64>,
    /// Generations started by a writer that had lost leadership
    /// ([`crate::chain::void_generations`]): not part of the archive's
    /// history, kept out of [`Self::generations`].
    pub void: Vec<GenerationListing>,
}

impl ArchiveListing {
    /// Lists the whole archive, after checking that the archive handle's
    /// keys suit it ([`ArchiveManifest::check_keys`]).
    ///
    /// # Errors
    /// Storage errors, unreadable manifests, keys that do not suit the
    /// archive, or objects outside the layout.
    pub async fn load(archive: &Archive) -> Result<Self, ListingError> {
        let manifest = match archive.get_opt(layout::MANIFEST_NAME).await? {
            Some(b) => Some(ArchiveManifest::parse(layout::MANIFEST_NAME, &b)?),
            None => None,
        };
        if let Some(m) = &manifest {
            m.check_keys(archive.keys())?;
        }
        let mut listing = Self {
            manifest,
            ..Self::default()
        };
        for key in archive.list("", None).await? {
            if key == layout::MANIFEST_NAME {
                continue;
            }
            if let Some(term) = layout::parse_term_key(&key) {
                listing.terms.push(term);
                continue;
            }
            let Some((generation, object)) = layout::classify(&key) else {
                if layout::in_namespace(&key) {
                    listing.strays.push(key);
                } else {
                    listing.foreign.push(key);
                }
                continue;
            };
            if listing.generations.last().and_then(|g| g.id) != Some(generation) {
                listing.generations.push(GenerationListing {
                    id: Some(generation),
                    ..GenerationListing::default()
                });
            }
            let g = listing.generations.last_mut().expect("just pushed");
            match object {
                GenerationObject::Manifest => {
                    let bytes = archive.get(&key).await?;
                    let manifest = GenerationManifest::parse_in(&key, &bytes, generation)?;
                    g.manifest = Some(manifest);
                }
                GenerationObject::Snapshot(rev) => g.snapshots.push(rev),
                GenerationObject::Segment(name) => g.segments.push(name),
                GenerationObject::Lineage(rev) => g.lineage.push(rev),
                GenerationObject::Term(term) => g.terms.push(term),
                GenerationObject::ClockEpoch(first) => g.clock_epochs.push(first),
                GenerationObject::ClockStep(name) => g.clock_steps.push(name),
                GenerationObject::Pruned(range) => g.pruned.push(range),
            }
        }
        let void = crate::chain::void_generations(&listing.generations);
        let (live, stale) = std::mem::take(&mut listing.generations)
            .into_iter()
            .partition(|g| !void.contains(&g.generation()));
        listing.generations = live;
        listing.void = stale;
        Ok(listing)
    }
}
