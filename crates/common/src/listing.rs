//! An archive's object listing, turned into generations and their chains.
//!
//! Everything a restore plan needs comes from names alone (one LIST, no
//! per-object reads) plus the small generation manifests.

use thiserror::Error;

use crate::layout::{self, GenerationId, GenerationObject, SegmentName};
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
    /// An object that does not follow the archive layout.
    #[error("unexpected object {0} in the archive (not part of the etcd-pitr layout)")]
    UnexpectedObject(String),
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
}

/// A contiguous run of segments inside a generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The run covers revisions after this one …
    pub after: Revision,
    /// … through this one.
    pub last: Revision,
    /// Index of its first segment in [`GenerationListing::segments`].
    pub first_segment: usize,
    /// Index one past its last segment.
    pub end_segment: usize,
    /// Latest time the run vouches for (Unix ms).
    pub end_ms: i64,
}

impl GenerationListing {
    /// The generation id (always set for listings loaded from a store).
    pub fn generation(&self) -> GenerationId {
        self.id.expect("listing loaded from a store has an id")
    }

    /// Splits the segments into contiguous runs. A well-formed generation
    /// has exactly one; more mean segments are missing (a hole).
    pub fn runs(&self) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        for (i, s) in self.segments.iter().enumerate() {
            match runs.last_mut() {
                Some(run) if s.prev() == run.last => {
                    run.last = s.last;
                    run.end_segment = i + 1;
                    run.end_ms = run.end_ms.max(s.end_ms);
                }
                _ => runs.push(Run {
                    after: s.prev(),
                    last: s.last,
                    first_segment: i,
                    end_segment: i + 1,
                    end_ms: s.end_ms,
                }),
            }
        }
        runs
    }

    /// The last archived revision of the generation's first run (its
    /// unbroken chain), if any segment exists.
    pub fn last_revision(&self) -> Option<Revision> {
        self.runs().last().map(|r| r.last)
    }
}

/// All generations of an archive.
#[derive(Clone, Debug, Default)]
pub struct ArchiveListing {
    /// The archive manifest, if the archive exists.
    pub manifest: Option<ArchiveManifest>,
    /// Generations in id order.
    pub generations: Vec<GenerationListing>,
}

impl ArchiveListing {
    /// Lists the whole archive.
    ///
    /// # Errors
    /// Storage errors, unreadable manifests, or objects outside the layout.
    pub async fn load(archive: &Archive) -> Result<Self, ListingError> {
        let manifest = match archive.get_opt(layout::MANIFEST_NAME).await? {
            Some(b) => Some(ArchiveManifest::parse(layout::MANIFEST_NAME, &b)?),
            None => None,
        };
        let mut listing = Self {
            manifest,
            generations: Vec::new(),
        };
        for key in archive.list("", None).await? {
            if key == layout::MANIFEST_NAME {
                continue;
            }
            let (generation, object) = layout::classify(&key)
                .ok_or_else(|| ListingError::UnexpectedObject(key.clone()))?;
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
                    g.manifest = Some(GenerationManifest::parse(&key, &bytes)?);
                }
                GenerationObject::Snapshot(rev) => g.snapshots.push(rev),
                GenerationObject::Segment(name) => g.segments.push(name),
            }
        }
        Ok(listing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(first: Revision, last: Revision) -> SegmentName {
        SegmentName {
            first,
            last,
            end_ms: last,
        }
    }

    #[test]
    fn runs_detect_holes() {
        let g = GenerationListing {
            segments: vec![seg(5, 9), seg(10, 9), seg(10, 20), seg(25, 30)],
            ..GenerationListing::default()
        };
        let runs = g.runs();
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].after, runs[0].last, runs[0].end_segment),
            (4, 20, 3)
        );
        assert_eq!((runs[1].after, runs[1].last), (24, 30));
    }
}
