//! The archive as a feed: every revision of one generation after a
//! position, in order, as segments arrive; then the archive's word that the
//! source is still there. A gap or the start of another generation ends
//! the feed with an error: follow never bridges two histories.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use etcdpitr_common::layout::{self, GenerationId, GenerationObject};
use etcdpitr_common::listing::{ArchiveListing, GenerationListing};
use etcdpitr_common::segment::{LeaseRecord, RevisionRecord};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::ArchiveEnds;
use crate::commands::ArchiveEvents;
use crate::plan::Replay;
use crate::synth::EventSource;

/// Items of the feed, in archive order.
#[derive(Debug)]
pub enum Item {
    /// A lease's granted TTL, before the revision that first uses it.
    Lease(LeaseRecord),
    /// The archive holds revisions through this one (more are coming).
    Archived(Revision),
    /// The next revision.
    Revision(RevisionRecord),
    /// The archive holds nothing after `last` yet; it vouches that the
    /// source was still at `last` at `vouched_ms` (0: it does not say).
    Idle {
        /// The archive's last revision.
        last: Revision,
        /// Latest time the archive vouches for `last`.
        vouched_ms: i64,
    },
}

/// How often the feed looks for a newer generation once caught up.
const GENERATION_CHECK: Duration = Duration::from_secs(5);

/// Feeds generation `g` after revision `pos` (through `until`, if given),
/// listing new segments every `poll`. While `strict_idle` is set, every
/// `Idle` comes after a look for a newer generation (whoever stops on it
/// must not miss one); else that look is taken every few seconds.
pub fn start(
    archive: Archive,
    g: GenerationListing,
    pos: Revision,
    until: Option<Revision>,
    poll: Duration,
    strict_idle: Arc<AtomicBool>,
) -> mpsc::Receiver<anyhow::Result<Item>> {
    let (tx, rx) = mpsc::channel(1024);
    let last_key = g
        .segments
        .last()
        .map(|s| layout::segment_key(g.generation(), s));
    let feed = Feed {
        archive,
        g,
        last_key,
        pos,
        until,
        poll,
        strict_idle,
    };
    tokio::spawn(async move {
        let tx2 = tx.clone();
        if let Err(e) = feed.run(tx2).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

struct Feed {
    archive: Archive,
    g: GenerationListing,
    last_key: Option<String>,
    pos: Revision,
    until: Option<Revision>,
    poll: Duration,
    strict_idle: Arc<AtomicBool>,
}

impl Feed {
    async fn run(mut self, tx: mpsc::Sender<anyhow::Result<Item>>) -> anyhow::Result<()> {
        let generation = self.g.generation();
        let mut next_generation_check = Instant::now();
        loop {
            let chain = self.g.chain();
            let run = chain
                .runs
                .iter()
                .find(|r| r.after <= self.pos && self.pos <= r.last)
                .copied()
                .ok_or_else(|| {
                    ArchiveEnds(format!(
                        "generation {generation} no longer holds revision {} (pruned?)",
                        self.pos
                    ))
                })?;
            let last = self.until.map_or(run.last, |u| run.last.min(u));
            if last > self.pos {
                tx.send(Ok(Item::Archived(run.last)))
                    .await
                    .map_err(|_| anyhow!("follow stopped"))?;
                let replay = Replay {
                    generation,
                    after: self.pos,
                    last,
                    segments: chain.links_between(self.pos, last),
                };
                let mut events = ArchiveEvents::new(&self.archive, replay);
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || {
                    // A closed channel (follow stopped) ends the replay at
                    // the next revision.
                    events.replay(
                        &mut |r| {
                            tx.blocking_send(Ok(Item::Revision(r.clone())))
                                .map_err(|_| anyhow!("follow stopped"))
                        },
                        &mut |l| {
                            let _ = tx.blocking_send(Ok(Item::Lease(l)));
                        },
                    )
                })
                .await??;
                self.pos = last;
                continue;
            }
            if self.until.is_some_and(|u| self.pos >= u) {
                return Ok(());
            }
            if let Some(gap) = chain
                .gaps()
                .into_iter()
                .chain(chain.pruned_gaps())
                .find(|g| g.after >= self.pos)
            {
                return Err(ArchiveEnds(format!(
                    "generation {generation} has a gap after revision {}: {gap}; follow cannot continue past it",
                    gap.after
                ))
                .into());
            }
            if self.strict_idle.load(Ordering::Relaxed) || Instant::now() >= next_generation_check {
                self.check_generations(generation).await?;
                next_generation_check = Instant::now() + GENERATION_CHECK;
            }
            tx.send(Ok(Item::Idle {
                last: self.pos,
                vouched_ms: run.end_ms,
            }))
            .await
            .map_err(|_| anyhow!("follow stopped"))?;
            tokio::time::sleep(self.poll).await;
            self.refresh().await?;
        }
    }

    /// Adds segments written since the last look.
    async fn refresh(&mut self) -> anyhow::Result<()> {
        let generation = self.g.generation();
        let dir = format!("{}/segments", generation.dir_name());
        let keys = self
            .archive
            .list(&dir, self.last_key.as_deref())
            .await
            .with_context(|| format!("list {dir}"))?;
        for key in keys {
            if let Some((g, GenerationObject::Segment(name))) = layout::classify(&key) {
                if g == generation {
                    self.g.segments.push(name);
                }
            }
            self.last_key = Some(key);
        }
        self.g.segments.sort();
        Ok(())
    }

    /// Ends the feed once the archive continues in a later generation (its
    /// writer started one: a gap or a lineage change).
    async fn check_generations(&self, ours: GenerationId) -> anyhow::Result<()> {
        let newer = self
            .archive
            .list_root_dirs()
            .await
            .context("list the archive's generations")?
            .iter()
            .filter_map(|d| GenerationId::parse_dir(d.trim_end_matches('/')))
            .any(|g| g > ours);
        if !newer {
            return Ok(());
        }
        let listing = ArchiveListing::load(&self.archive)
            .await
            .context("list the archive")?;
        if let Some(g) = listing.generations.iter().find(|g| g.generation() > ours) {
            return Err(ArchiveEnds(format!(
                "the archive continues in generation {} after generation {ours} ended at revision {}: its writer started a new generation (a gap or a different history); follow never bridges two generations; seed a new destination from generation {}",
                g.generation(),
                self.pos,
                g.generation()
            ))
            .into());
        }
        Ok(())
    }
}
