//! The clock observed times come from, and the record of the wall clock's
//! steps.
//!
//! Observed times (a revision's `observed_ms`, progress records, a
//! segment's `end_ms`) are what a person searches by with `restore --time`,
//! which assumes they only grow. The wall clock does not: NTP steps it, an
//! operator sets it, a VM resumes with it wrong. So the archiver reads the
//! wall clock **once** per process ([`AnchoredClock`]) and from then on
//! adds the monotonic clock's elapsed time. It never follows a step.
//!
//! Each generation a process writes is an **epoch** ([`EpochClock`]): its
//! anchored clock, raised if needed so that it starts no earlier than the
//! generation's latest archived time (so observed times never decrease
//! within a generation, across restarts and writers), and its first
//! revision. The epoch is recorded (`gen-…/clock/{first}.json`) before any
//! of its segments can be uploaded.
//!
//! Whenever an observation is taken, and on the watch's one-second tick,
//! the wall clock is compared with the anchored time. A difference that
//! moved by more than [`STEP_TOLERANCE_MS`] since the last one recorded is a
//! **step**: logged once at WARN and recorded
//! (`gen-…/clock/{first}-{at}-{anchored_ms}.json`, with the cumulative
//! offset `wall - anchored`) before any revision observed after it is
//! appended. An epoch that had to be raised to the generation's floor, or
//! whose process clock already disagrees with the wall clock, records that
//! difference as a step at its start. The restorer widens the possible
//! commit time of every revision of an epoch by its steps' offsets
//! (`etcdpitr_common::chain::Timeline`) and refuses `--time` answers they
//! make ambiguous.
//!
//! Labels that are not searched by (`started_ms` of a generation started
//! by `etcd-archiver snapshot`, `claimed_ms` of terms, `taken_ms` of
//! snapshots and lineage fingerprints, the archive's `created_ms`) stay on
//! the wall clock.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::manifest::{ClockEpoch, ClockStep};
use etcdpitr_common::store::{Archive, StoreError};
use etcdpitr_common::Revision;
use tokio_util::sync::CancellationToken;

use crate::retry::retry;
use crate::store_retryable;

/// A change of the difference between the wall clock and the anchored
/// clock beyond this is a step. NTP keeps well-run clocks within
/// milliseconds, and slews (never steps) differences below 128 ms; `--time`
/// answers are trusted to about this much.
pub const STEP_TOLERANCE_MS: i64 = 2_000;

/// Where a clock reads time. The system's, or a fake one in tests.
pub trait TimeSource: Send + Sync {
    /// The wall clock, in Unix milliseconds.
    fn wall_ms(&self) -> i64;
    /// A monotonic clock: time elapsed since some fixed origin.
    fn monotonic(&self) -> Duration;
}

/// The system's wall clock and `std::time::Instant`.
struct SystemTime;

impl TimeSource for SystemTime {
    fn wall_ms(&self) -> i64 {
        etcdpitr_common::now_ms()
    }

    fn monotonic(&self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }
}

/// A wall-clock time read once, advanced by the monotonic clock.
#[derive(Clone)]
pub struct AnchoredClock {
    source: Arc<dyn TimeSource>,
    anchor_ms: i64,
    anchor_mono: Duration,
}

impl fmt::Debug for AnchoredClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnchoredClock")
            .field("anchor_ms", &self.anchor_ms)
            .finish_non_exhaustive()
    }
}

impl AnchoredClock {
    /// Anchors the system's clocks now.
    pub fn system() -> Self {
        Self::with_source(Arc::new(SystemTime))
    }

    /// Anchors `source` now.
    pub fn with_source(source: Arc<dyn TimeSource>) -> Self {
        let anchor_mono = source.monotonic();
        let anchor_ms = source.wall_ms();
        Self {
            source,
            anchor_ms,
            anchor_mono,
        }
    }

    /// The wall-clock time (Unix ms) read at the anchor.
    pub fn anchor_ms(&self) -> i64 {
        self.anchor_ms
    }

    /// The anchored time (Unix ms): the anchor plus monotonic time elapsed.
    pub fn now_ms(&self) -> i64 {
        let elapsed = self.source.monotonic().saturating_sub(self.anchor_mono);
        self.anchor_ms
            .saturating_add(i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
    }

    /// The wall clock now (Unix ms).
    pub fn wall_ms(&self) -> i64 {
        self.source.wall_ms()
    }
}

/// The anchored clock of one epoch: observed times for one generation
/// written by this process, and the steps seen meanwhile.
#[derive(Debug)]
pub struct EpochClock {
    clock: AnchoredClock,
    /// Added to the process's anchored time (raised to the floor).
    raise_ms: i64,
    epoch_first: Revision,
    /// The latest time handed out (or the floor): times never decrease.
    last_ms: i64,
    /// `wall - anchored` when the last step was recorded (or at the start).
    reported_offset_ms: i64,
    /// Steps seen and not yet recorded in the archive, oldest first.
    pending: Vec<ClockStep>,
}

impl EpochClock {
    /// Begins the epoch whose first revision is `epoch_first` (the last
    /// archived + 1) in a generation whose latest archived time is
    /// `floor_ms` (0 for a new generation). Returns the clock and the epoch
    /// record to write before any of its segments; when its time disagrees
    /// with the wall clock beyond the tolerance (raised to the floor, or a
    /// process clock that saw a step earlier), a step is pending at once.
    pub fn begin(
        clock: &AnchoredClock,
        epoch_first: Revision,
        floor_ms: i64,
        holder: &str,
    ) -> (Self, ClockEpoch) {
        let now = clock.now_ms();
        let raise_ms = floor_ms.saturating_sub(now).max(0);
        let began_ms = now + raise_ms;
        let mut epoch = Self {
            clock: clock.clone(),
            raise_ms,
            epoch_first,
            last_ms: began_ms,
            reported_offset_ms: 0,
            pending: Vec::new(),
        };
        if raise_ms > 0 {
            tracing::info!(
                epoch_first,
                raised_by_ms = raise_ms,
                "the generation's archived times are later than this archiver's clock: observed times continue from them"
            );
        }
        epoch.check_at(epoch_first - 1, began_ms);
        let record = ClockEpoch {
            epoch_first,
            anchor_ms: clock.anchor_ms(),
            began_ms,
            floor_ms,
            holder: holder.to_owned(),
        };
        (epoch, record)
    }

    /// The epoch's first revision.
    pub fn epoch_first(&self) -> Revision {
        self.epoch_first
    }

    /// The anchored time now, not below any time handed out before.
    fn anchored_ms(&self) -> i64 {
        (self.clock.now_ms() + self.raise_ms).max(self.last_ms)
    }

    /// The observed time for something seen now, after revision `after`
    /// was appended; also checks for a step. Never decreases.
    pub fn observe(&mut self, after: Revision) -> i64 {
        let t = self.anchored_ms();
        self.check_at(after, t);
        self.last_ms = t;
        t
    }

    /// Compares the wall clock with the anchored time now (after revision
    /// `after` was appended) and notes a step.
    pub fn check(&mut self, after: Revision) {
        let t = self.anchored_ms();
        self.check_at(after, t);
    }

    fn check_at(&mut self, after: Revision, anchored_ms: i64) {
        let wall_ms = self.clock.wall_ms();
        let offset_ms = wall_ms.saturating_sub(anchored_ms);
        if (offset_ms - self.reported_offset_ms).abs() <= STEP_TOLERANCE_MS {
            return;
        }
        let step = ClockStep {
            epoch_first: self.epoch_first,
            at_revision: after.max(self.epoch_first - 1),
            anchored_ms,
            wall_ms,
            offset_ms,
        };
        // Names must differ: a second step in the same millisecond after
        // the same revision waits for the next check.
        if self.pending.last().is_some_and(|p| p.name() == step.name()) {
            return;
        }
        tracing::warn!(
            epoch_first = self.epoch_first,
            after_revision = step.at_revision,
            wall = %format_ms(wall_ms),
            anchored = %format_ms(anchored_ms),
            offset_ms,
            "the wall clock disagrees with the archiver's anchored clock (a clock step): observed times keep following the anchored clock; the step is recorded in the archive"
        );
        self.reported_offset_ms = offset_ms;
        self.pending.push(step);
    }

    /// Steps seen and not yet recorded, oldest first.
    pub fn pending_steps(&self) -> &[ClockStep] {
        &self.pending
    }

    /// The oldest `n` pending steps are now recorded in the archive.
    pub fn recorded(&mut self, n: usize) {
        self.pending.drain(..n.min(self.pending.len()));
    }
}

/// Unix milliseconds as RFC 3339, for logs.
fn format_ms(ms: i64) -> String {
    let t = u64::try_from(ms).map_or(UNIX_EPOCH, |ms| UNIX_EPOCH + Duration::from_millis(ms));
    humantime::format_rfc3339_millis(t).to_string()
}

/// Writes the epoch record of `generation` (write-once). A record of
/// another epoch with the same first revision already there is kept: that
/// epoch archived no revision (this one starts at the same place), so the
/// revisions from there on are this epoch's, and the steps recorded under
/// that first revision (both epochs') all widen their times.
///
/// # Errors
/// Store failures.
pub async fn write_epoch(
    archive: &Archive,
    generation: GenerationId,
    epoch: &ClockEpoch,
) -> anyhow::Result<()> {
    let key = layout::clock_epoch_key(generation, epoch.epoch_first);
    let json = serde_json::to_vec_pretty(epoch).expect("clock epoch serializes");
    match archive.put_once(&key, Bytes::from(json)).await {
        Ok(()) => Ok(()),
        Err(StoreError::Conflict(_)) => {
            tracing::info!(object = %key, "an earlier epoch that archived no revision began at the same revision; keeping its record");
            Ok(())
        }
        Err(e) => Err(anyhow::Error::from(e).context(format!("write {key}"))),
    }
}

/// Writes a step record of `generation` (write-once; a retry that finds it
/// is a success).
///
/// # Errors
/// Store failures.
pub async fn write_step(
    archive: &Archive,
    generation: GenerationId,
    step: &ClockStep,
) -> anyhow::Result<()> {
    let key = layout::clock_step_key(generation, &step.name());
    let json = serde_json::to_vec_pretty(step).expect("clock step serializes");
    match archive.put_once(&key, Bytes::from(json)).await {
        Ok(()) => Ok(()),
        Err(StoreError::Conflict(_)) => {
            // Another writer saw a step in the same epoch, after the same
            // revision, in the same millisecond: its record widens the
            // epoch's times as well.
            tracing::warn!(object = %key, "another clock step is recorded under this name; keeping it");
            Ok(())
        }
        Err(e) => Err(anyhow::Error::from(e)).with_context(|| format!("write {key}")),
    }
}

/// Records the steps `epoch` of `generation` has seen and not yet
/// recorded, oldest first, retrying store failures. Returns `false` when
/// `stop` came first. Safe to drop: a step is marked recorded only after
/// its object is written.
///
/// # Errors
/// Store failures that retrying cannot fix.
pub async fn record_pending(
    archive: &Archive,
    stop: &CancellationToken,
    generation: GenerationId,
    epoch: &mut EpochClock,
) -> anyhow::Result<bool> {
    while let Some(step) = epoch.pending_steps().first().copied() {
        let written = retry("record a clock step", stop, store_retryable, || {
            write_step(archive, generation, &step)
        })
        .await?;
        if written.is_none() {
            return Ok(false);
        }
        epoch.recorded(1);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    /// A clock whose wall and monotonic readings the test sets.
    #[derive(Default)]
    struct FakeTime {
        wall_ms: AtomicI64,
        mono_ms: AtomicI64,
    }

    impl FakeTime {
        /// Both clocks advance.
        fn advance(&self, ms: i64) {
            self.wall_ms.fetch_add(ms, Ordering::SeqCst);
            self.mono_ms.fetch_add(ms, Ordering::SeqCst);
        }
        /// Only the wall clock jumps.
        fn step(&self, ms: i64) {
            self.wall_ms.fetch_add(ms, Ordering::SeqCst);
        }
    }

    impl TimeSource for FakeTime {
        fn wall_ms(&self) -> i64 {
            self.wall_ms.load(Ordering::SeqCst)
        }
        fn monotonic(&self) -> Duration {
            Duration::from_millis(self.mono_ms.load(Ordering::SeqCst).try_into().unwrap())
        }
    }

    fn fake(wall_ms: i64) -> (Arc<FakeTime>, AnchoredClock) {
        let t = Arc::new(FakeTime::default());
        t.wall_ms.store(wall_ms, Ordering::SeqCst);
        t.mono_ms.store(5_000, Ordering::SeqCst);
        let clock = AnchoredClock::with_source(t.clone());
        (t, clock)
    }

    #[test]
    fn observed_times_follow_the_monotonic_clock_not_wall_steps() {
        let (t, clock) = fake(1_000_000);
        let (mut epoch, record) = EpochClock::begin(&clock, 11, 0, "h/1");
        assert_eq!(
            record,
            ClockEpoch {
                epoch_first: 11,
                anchor_ms: 1_000_000,
                began_ms: 1_000_000,
                floor_ms: 0,
                holder: "h/1".into()
            }
        );
        assert!(epoch.pending_steps().is_empty());
        t.advance(1_500);
        assert_eq!(epoch.observe(10), 1_001_500);
        // The wall clock is set 60 s back: observed times go on.
        t.step(-60_000);
        t.advance(500);
        assert_eq!(epoch.observe(11), 1_002_000);
        assert_eq!(
            epoch.pending_steps(),
            &[ClockStep {
                epoch_first: 11,
                at_revision: 11,
                anchored_ms: 1_002_000,
                wall_ms: 942_000,
                offset_ms: -60_000
            }]
        );
        // Seen once: later checks at the same offset add nothing.
        t.advance(1_000);
        epoch.check(12);
        assert_eq!(epoch.observe(12), 1_003_000);
        assert_eq!(epoch.pending_steps().len(), 1);
        epoch.recorded(1);
        assert!(epoch.pending_steps().is_empty());
        // Corrected (forwards) on the tick: a second step, cumulative offset.
        t.step(59_990);
        t.advance(1_000);
        epoch.check(12);
        let steps = epoch.pending_steps();
        assert_eq!((steps.len(), steps[0].offset_ms), (1, -10));
        assert_eq!(steps[0].anchored_ms, 1_004_000);
        // Drift within the tolerance is not a step.
        t.step(STEP_TOLERANCE_MS);
        epoch.check(12);
        assert_eq!(epoch.pending_steps().len(), 1);
    }

    #[test]
    fn an_epoch_starts_at_the_generation_floor_and_records_the_difference() {
        // The previous writer's clock ran 30 s ahead of this host's.
        let (t, clock) = fake(1_000_000);
        t.advance(2_000);
        let (mut epoch, record) = EpochClock::begin(&clock, 50, 1_032_000, "h/2");
        assert_eq!((record.began_ms, record.floor_ms), (1_032_000, 1_032_000));
        assert_eq!(record.anchor_ms, 1_000_000);
        assert_eq!(
            epoch.pending_steps(),
            &[ClockStep {
                epoch_first: 50,
                at_revision: 49,
                anchored_ms: 1_032_000,
                wall_ms: 1_002_000,
                offset_ms: -30_000
            }]
        );
        t.advance(10);
        assert_eq!(epoch.observe(49), 1_032_010);
        // A floor below the clock changes nothing.
        let (plain, record) = EpochClock::begin(&clock, 60, 900_000, "h/2");
        assert_eq!(record.began_ms, 1_002_010);
        assert!(plain.pending_steps().is_empty());
    }

    #[test]
    fn a_later_epoch_of_the_same_process_starts_with_the_known_offset() {
        let (t, clock) = fake(1_000_000);
        t.step(60_000);
        let (epoch, _) = EpochClock::begin(&clock, 7, 0, "h/3");
        let steps = epoch.pending_steps();
        assert_eq!(
            (steps.len(), steps[0].offset_ms, steps[0].at_revision),
            (1, 60_000, 6)
        );
    }

    #[test]
    fn observed_times_never_decrease() {
        let (t, clock) = fake(1_000_000);
        let (mut epoch, _) = EpochClock::begin(&clock, 1, 0, "h/4");
        t.advance(100);
        let a = epoch.observe(0);
        // A monotonic clock that went back (it cannot) still gives no
        // earlier time.
        t.mono_ms.fetch_sub(50, Ordering::SeqCst);
        assert_eq!(epoch.observe(0), a);
    }

    #[test]
    fn the_system_clock_is_anchored() {
        let clock = AnchoredClock::system();
        let d = clock.now_ms() - clock.wall_ms();
        assert!(d.abs() < 1_000, "{d}");
        assert!(format_ms(0).starts_with("1970-01-01T00:00:00.000"));
    }
}
