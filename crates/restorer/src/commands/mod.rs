//! The restorer's commands, as the binary (and the tests) run them: one
//! file per command, shared target resolution and event streaming here.

mod export;
mod list;
mod restore;
mod verify;

pub use export::export;
pub use list::{list, list_view, ListGap, ListGeneration, ListOutput, ListRange};
pub use restore::restore;
pub use verify::verify;

use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use etcdpitr_common::chain::{Continuity, IntegrityError};
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::segment::{LeaseRecord, Record, RevisionRecord};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;
use tokio::sync::mpsc;

use crate::plan::{self, RestorePlan};
use crate::source::{self, TimeChoice};
use crate::synth::EventSource;
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

pub(super) async fn load(url: &str) -> anyhow::Result<(Archive, ArchiveListing)> {
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
pub(super) async fn plan_target(
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

pub(super) fn describe_time_choice(target: &Target, choice: &TimeChoice) -> String {
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
pub(super) struct ArchiveEvents {
    rx: mpsc::Receiver<anyhow::Result<(String, Bytes)>>,
    generation: GenerationId,
    segments: Vec<SegmentName>,
    base: Revision,
    target: Revision,
    progress: indicatif::ProgressBar,
}

impl ArchiveEvents {
    pub(super) fn new(
        archive: &Archive,
        plan: &RestorePlan,
        progress: indicatif::ProgressBar,
    ) -> Self {
        Self {
            rx: source::prefetch_segments(archive.clone(), plan.generation, plan.segments.clone()),
            generation: plan.generation,
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
        let target = self.target;
        // Links may overlap (several writers): replay each revision once.
        let mut continuity = Continuity::after(self.base);
        let mut last_key = String::new();
        for name in &self.segments {
            let (key, bytes) = self
                .rx
                .blocking_recv()
                .context("segment download stopped")??;
            source::for_each_record(&key, &bytes, self.generation, name, &mut |record| {
                match record {
                    Record::Revision(r)
                        if r.revision <= target && continuity.admit(&key, r.revision)? =>
                    {
                        on_revision(&r)?;
                        self.progress.inc(1);
                    }
                    Record::Lease(l) if l.revision <= target => on_lease(l),
                    _ => {}
                }
                Ok(())
            })?;
            last_key = key;
        }
        if continuity.last() != target {
            return Err(IntegrityError::new(
                last_key,
                format!(
                    "the chain ends at revision {}, short of the target {target}",
                    continuity.last()
                ),
            )
            .into());
        }
        Ok(())
    }
}

pub(super) fn progress_bar(len: u64) -> indicatif::ProgressBar {
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
pub(super) struct Cleanup(pub(super) Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            std::fs::remove_file(&p).ok();
        }
    }
}

pub(super) fn tempfile_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("etcd-restorer-{what}-{}", std::process::id()))
}
