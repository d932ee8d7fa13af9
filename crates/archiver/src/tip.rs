//! The newest objects of the generation being written, as the hash chain
//! links them (see [`etcdpitr_common::hashchain`]): the segment writer
//! commits each sealed segment to the newest archived snapshot, and a
//! snapshot names the newest archived segment as its predecessor. The
//! uploader and the snapshot task keep it current.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use etcdpitr_common::chain::Chain;
use etcdpitr_common::hashchain::Digest;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::segment;
use etcdpitr_common::snapshot;
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;

/// The newest archived objects of one generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tip {
    /// The generation.
    pub generation: GenerationId,
    /// The newest segment in the store: its last revision and digest (the
    /// generation's start and anchor while it has none).
    pub segment: (Revision, Digest),
    /// The newest base snapshot in the store, if any.
    pub snapshot: Option<(Revision, Digest)>,
}

impl Tip {
    /// The tip of a generation that has nothing archived yet.
    pub fn start(generation: GenerationId, start_revision: Revision, anchor: Digest) -> Self {
        Self {
            generation,
            segment: (start_revision, anchor),
            snapshot: None,
        }
    }

    /// Reads the tip of a generation from the store: the digest of its
    /// chain's last segment and of its newest snapshot's header. Also
    /// returns when that snapshot was taken (Unix ms), if there is one.
    ///
    /// # Errors
    /// Store failures or a damaged snapshot header.
    pub async fn load(
        archive: &Archive,
        chain: &Chain,
        anchor: Digest,
    ) -> anyhow::Result<(Self, Option<i64>)> {
        let generation = chain.generation;
        let mut tip = Self::start(generation, chain.start, anchor);
        if let Some(last) = chain.links.last() {
            let key = layout::segment_key(generation, last);
            let bytes = archive
                .get(&key)
                .await
                .with_context(|| format!("read {key}"))?;
            segment::open(&key, &bytes)?;
            tip.segment = (last.last, segment::digest(&bytes));
        }
        let mut taken_ms = None;
        if let Some(&revision) = chain.snapshots.last() {
            let header = snapshot::read_header(archive, generation, revision)
                .await
                .with_context(|| format!("read the header of snapshot {revision}"))?;
            tip.snapshot = Some((revision, header.digest()));
            taken_ms = Some(header.taken_ms);
        }
        Ok((tip, taken_ms))
    }
}

/// A [`Tip`] shared by the writer, the uploader and the snapshot task.
#[derive(Clone, Debug)]
pub struct SharedTip(Arc<Mutex<Tip>>);

impl SharedTip {
    /// Shares `tip`.
    pub fn new(tip: Tip) -> Self {
        Self(Arc::new(Mutex::new(tip)))
    }

    /// The current tip.
    pub fn get(&self) -> Tip {
        *self.0.lock().expect("tip lock")
    }

    /// Starts over (another generation, or a resumed one).
    pub fn reset(&self, tip: Tip) {
        *self.0.lock().expect("tip lock") = tip;
    }

    /// A segment of `generation` ending at `last` is in the store.
    pub fn segment_archived(&self, generation: GenerationId, last: Revision, digest: Digest) {
        let mut tip = self.0.lock().expect("tip lock");
        if tip.generation == generation && last >= tip.segment.0 {
            tip.segment = (last, digest);
        }
    }

    /// A snapshot of `generation` at `revision` is in the store.
    pub fn snapshot_archived(&self, generation: GenerationId, revision: Revision, digest: Digest) {
        let mut tip = self.0.lock().expect("tip lock");
        if tip.generation == generation && tip.snapshot.is_none_or(|(r, _)| revision >= r) {
            tip.snapshot = Some((revision, digest));
        }
    }
}
