//! The open segment of the current generation: revisions go in, sealed
//! segments go to the spool and the uploader.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcdpitr_common::hashchain::Digest;
use etcdpitr_common::layout::GenerationId;
use etcdpitr_common::segment::{self, LeaseRecord, Record, RevisionRecord, SegmentBuilder};
use etcdpitr_common::Revision;
use tokio::sync::mpsc;

use crate::clock::EpochClock;
use crate::tip::SharedTip;
use crate::uploader::{Sealed, Spool};

/// Limits that decide when a segment is sealed.
#[derive(Clone, Copy, Debug)]
pub struct SealPolicy {
    /// Seal when the first record is this old.
    pub max_age: Duration,
    /// Seal at this many uncompressed bytes.
    pub max_bytes: u64,
    /// Seal a segment holding only progress (an idle cluster) at this age.
    pub idle_interval: Duration,
}

/// Where sealed segments go.
#[derive(Clone)]
pub struct Sink {
    /// The spool (for its byte budget).
    pub spool: Arc<Spool>,
    /// The spooler's queue.
    pub sealed: mpsc::UnboundedSender<Sealed>,
}

struct OpenSegment {
    builder: SegmentBuilder,
    opened: Instant,
}

/// Appends revisions of one generation and seals segments.
pub struct SegmentWriter {
    generation: GenerationId,
    policy: SealPolicy,
    sink: Sink,
    last_revision: Revision,
    last_record: Option<RevisionRecord>,
    open: Option<OpenSegment>,
    latest_progress: Option<(Revision, i64)>,
    last_revision_ms: i64,
    known_leases: HashSet<i64>,
    clock: EpochClock,
    /// Digest of the segment sealed last (the next one's predecessor).
    prev_digest: Digest,
    tip: SharedTip,
}

/// Leases remembered per generation before the set is reset (a lease seen
/// again after a reset is simply archived again).
const MAX_KNOWN_LEASES: usize = 1 << 20;

impl SegmentWriter {
    /// A writer continuing `generation` after `last_revision`, observing
    /// times with `clock` (the epoch beginning at `last_revision + 1`).
    /// Its first segment follows `tip`'s newest segment in the hash chain;
    /// every segment commits to `tip`'s newest snapshot.
    pub fn new(
        generation: GenerationId,
        last_revision: Revision,
        last_record: Option<RevisionRecord>,
        policy: SealPolicy,
        sink: Sink,
        clock: EpochClock,
        tip: SharedTip,
    ) -> Self {
        let prev_digest = tip.get().segment.1;
        Self {
            prev_digest,
            tip,
            generation,
            policy,
            sink,
            last_revision,
            last_record,
            open: None,
            latest_progress: None,
            last_revision_ms: 0,
            known_leases: HashSet::new(),
            clock,
        }
    }

    /// The observed time for something seen now (see [`EpochClock`]):
    /// anchored, never decreasing; also checks the wall clock for a step.
    pub fn observe_ms(&mut self) -> i64 {
        self.clock.observe(self.last_revision)
    }

    /// Compares the wall clock with the anchored clock (a step is noted in
    /// [`Self::clock`]'s pending steps).
    pub fn check_clock(&mut self) {
        self.clock.check(self.last_revision);
    }

    /// The epoch's clock.
    pub fn clock(&self) -> &EpochClock {
        &self.clock
    }

    /// The epoch's clock, to mark steps recorded.
    pub fn clock_mut(&mut self) -> &mut EpochClock {
        &mut self.clock
    }

    /// The generation written.
    pub fn generation(&self) -> GenerationId {
        self.generation
    }

    /// Last revision appended (sealed or not).
    pub fn last_revision(&self) -> Revision {
        self.last_revision
    }

    /// The last revision's events.
    pub fn last_record(&self) -> Option<&RevisionRecord> {
        self.last_record.as_ref()
    }

    /// Whether a lease id still needs a lease record in this generation.
    pub fn lease_unknown(&self, id: i64) -> bool {
        id != 0 && !self.known_leases.contains(&id)
    }

    fn open_segment(&mut self) -> anyhow::Result<&mut OpenSegment> {
        if self.open.is_none() {
            self.open = Some(OpenSegment {
                builder: SegmentBuilder::new(
                    self.generation.0,
                    self.last_revision,
                    self.prev_digest,
                )?,
                opened: Instant::now(),
            });
        }
        Ok(self.open.as_mut().expect("just opened"))
    }

    /// Appends one complete revision, preceded by the records of leases it
    /// references for the first time.
    ///
    /// # Errors
    /// A revision that does not follow the last one, or spool failures.
    pub fn append(&mut self, leases: &[LeaseRecord], record: RevisionRecord) -> anyhow::Result<()> {
        if self.known_leases.len() >= MAX_KNOWN_LEASES {
            self.known_leases.clear();
        }
        let segment = self.open_segment()?;
        for lease in leases {
            segment.builder.push(&Record::Lease(*lease))?;
        }
        segment.builder.push_revision(&record)?;
        let full =
            segment.builder.is_full() || segment.builder.raw_bytes() >= self.policy.max_bytes;
        self.known_leases.extend(leases.iter().map(|l| l.id));
        self.last_revision = record.revision;
        self.last_revision_ms = record.observed_ms;
        self.last_record = Some(record);
        if full {
            self.seal()?;
        }
        Ok(())
    }

    /// Notes that the cluster was still at `revision` at `observed_ms`.
    pub fn note_progress(&mut self, revision: Revision, observed_ms: i64) {
        if revision == self.last_revision {
            self.latest_progress = Some((revision, observed_ms));
        }
    }

    /// Seals the open segment if it is old enough. Idle progress opens a
    /// segment only every `idle_interval`.
    ///
    /// # Errors
    /// Spool failures.
    pub fn seal_if_due(&mut self) -> anyhow::Result<()> {
        let due = match &self.open {
            Some(open) if open.builder.revisions() > 0 => {
                open.opened.elapsed() >= self.policy.max_age
            }
            _ => false,
        };
        if due {
            return self.seal();
        }
        if let Some((rev, ms)) = self.latest_progress {
            if ms > self.last_revision_ms {
                let idle_for = if let Some(open) = &self.open {
                    open.opened.elapsed()
                } else {
                    // Start the idle clock with the first progress record.
                    let segment = self.open_segment()?;
                    segment.builder.push(&Record::Progress {
                        revision: rev,
                        observed_ms: ms,
                    })?;
                    Duration::ZERO
                };
                if idle_for >= self.policy.idle_interval {
                    return self.seal();
                }
            }
        }
        Ok(())
    }

    /// How often idle progress is sealed (`--idle-interval`).
    pub fn idle_interval(&self) -> Duration {
        self.policy.idle_interval
    }

    /// Digest of the segment sealed last (the start of the chain when none
    /// was sealed): the generation's head in the hash chain.
    pub fn head_digest(&self) -> Digest {
        self.prev_digest
    }

    /// Seals the open segment (adding the latest progress) and hands it to
    /// the spooler. Does nothing if no segment is open.
    ///
    /// # Errors
    /// Compression failures, or a stopped spooler.
    pub fn seal(&mut self) -> anyhow::Result<()> {
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        if let Some((rev, ms)) = self.latest_progress.take() {
            if ms > self.last_revision_ms && rev == self.last_revision {
                open.builder.push(&Record::Progress {
                    revision: rev,
                    observed_ms: ms,
                })?;
                self.last_revision_ms = ms;
            }
        }
        let tip = self.tip.get();
        if let (true, Some((revision, digest))) = (tip.generation == self.generation, tip.snapshot)
        {
            open.builder.commit_snapshot(revision, digest);
        }
        let (name, data) = open.builder.finish().context("seal segment")?;
        self.prev_digest = segment::digest(&data);
        tracing::debug!(
            first = name.first,
            last = name.last,
            bytes = data.len(),
            "segment sealed"
        );
        self.sink.spool.reserve(data.len() as u64);
        self.sink
            .sealed
            .send(Sealed {
                generation: self.generation,
                name,
                data,
            })
            .map_err(|_| anyhow::anyhow!("spooler stopped"))?;
        Ok(())
    }
}
