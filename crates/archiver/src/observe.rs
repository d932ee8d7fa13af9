//! What the archiver tells about itself: Prometheus metrics, `/healthz` and
//! `/readyz` (served by [`etcdpitr_common::metrics`] with `--metrics-addr`),
//! and the writer's heartbeat log line.
//!
//! Each fact is published where it is known: the election reports the
//! role, the session each generation and gap, the watch the source's
//! revision and whether etcd answers, the uploader each durable segment
//! and each failed upload, the snapshot schedule each snapshot, the
//! periodic prune the restorable start. [`Observer`] keeps them; what
//! depends on "now" (the lag) is computed when scraped.
//!
//! **Lag** ([`lag_ms`]): how long ago the archive last provably held the
//! source's current revision. Zero while the watch's latest word on the
//! source (a progress notification or an event response, at most
//! [`CURRENT_PROOF_MAX_AGE`] old) says the source is at the newest durable
//! revision; otherwise now minus the latest time the archive durably
//! vouches for its newest revision (the observed time of that revision, or
//! a later progress record of the same revision, i.e. the segment name's
//! `end_ms`), or the time the watch last saw the source still there. Times
//! are on the archiver's anchored clock (see [`crate::clock`]).
//!
//! **Readiness** ([`readiness`]): a writer is ready when etcd answers, the
//! store takes uploads and the lag is within `--ready-max-lag`. A standby
//! (not elected) is ready while it campaigns, since it is not expected to
//! write; it is not ready when it cannot campaign (etcd unreachable, the
//! election lease lost). **Health**: `/healthz` answers 200 while the
//! process works, and 503 once a permanent failure stops it.
//!
//! On a standby, the writer's gauges (source and archived revision, lag,
//! generation, restorable start, snapshot time and duration) are 0 and
//! `etcd_pitr_leader` is 0; counters keep counting across terms.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcdpitr_common::errors;
use etcdpitr_common::layout::{GenerationId, SegmentName};
use etcdpitr_common::metrics::{Kind, Metric, Registry};
use etcdpitr_common::Revision;
use tokio_util::sync::CancellationToken;

use crate::clock::AnchoredClock;
use crate::uploader::Spool;

/// How old the watch's latest word on the source may be for the archive to
/// count as provably current. While nothing is written the watch asks for
/// progress every second at most (see [`crate::watch`]), so a healthy
/// watch always has a word this recent.
pub const CURRENT_PROOF_MAX_AGE: Duration = Duration::from_secs(3);

/// The newest revision durable in the store, and the latest time (Unix ms,
/// anchored clock) the archive vouches that the source was still at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Durable {
    /// The newest revision every earlier one of which is in the store too.
    pub revision: Revision,
    /// Its observed time, or the time of a later durable progress record of it.
    pub vouched_ms: i64,
}

/// The source's revision as the watch last saw it, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The revision (a watch response header's).
    pub revision: Revision,
    /// When it was seen (Unix ms, anchored clock).
    pub at_ms: i64,
}

/// The archive's lag in milliseconds at `now_ms` (see the module docs):
/// zero while `source` is recent and not beyond `durable`, otherwise the
/// time since the source was last known to be at a durable revision.
pub fn lag_ms(durable: Durable, source: Option<Seen>, now_ms: i64) -> i64 {
    let proof_ms = i64::try_from(CURRENT_PROOF_MAX_AGE.as_millis()).unwrap_or(i64::MAX);
    let mut vouched_ms = durable.vouched_ms;
    if let Some(seen) = source.filter(|s| s.revision <= durable.revision) {
        if now_ms.saturating_sub(seen.at_ms) <= proof_ms {
            return 0;
        }
        vouched_ms = vouched_ms.max(seen.at_ms);
    }
    now_ms.saturating_sub(vouched_ms).max(0)
}

/// What this archiver does now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opening the archive.
    Starting,
    /// Waiting for leadership: `Ok` while campaigning, or why it cannot.
    Standby(Result<(), String>),
    /// Writing the archive.
    Writer,
}

/// What readiness is decided from.
#[derive(Clone, Debug)]
pub struct Status {
    /// The role.
    pub role: Role,
    /// The generation being written (writer only).
    pub generation: Option<GenerationId>,
    /// The durable watermark (writer only; `None` until the head is read).
    pub durable: Option<Durable>,
    /// The watch's latest word on the source (writer only).
    pub source: Option<Seen>,
    /// Why etcd cannot be reached or watched, until it answers again.
    pub etcd_error: Option<String>,
    /// Why the last upload failed, until one succeeds.
    pub store_error: Option<String>,
    /// Whether the generation has a base snapshot in the store: until it
    /// has, none of its revisions is restorable.
    pub restorable: bool,
}

impl Status {
    fn new(role: Role) -> Self {
        Self {
            role,
            generation: None,
            durable: None,
            source: None,
            etcd_error: None,
            store_error: None,
            restorable: false,
        }
    }
}

/// Whether the archiver is ready at `now_ms` (see the module docs); the
/// error is the reason, one line, for `/readyz`'s 503.
///
/// # Errors
/// The reason it is not ready.
pub fn readiness(status: &Status, now_ms: i64, max_lag: Duration) -> Result<(), String> {
    match &status.role {
        Role::Starting => Err("starting: opening the archive".into()),
        Role::Standby(Ok(())) => Ok(()),
        Role::Standby(Err(e)) => Err(format!("standby cannot campaign for leadership: {e}")),
        Role::Writer => {
            if let Some(e) = &status.etcd_error {
                return Err(format!("etcd unreachable: {e}"));
            }
            if let Some(e) = &status.store_error {
                return Err(format!("the store refuses uploads: {e}"));
            }
            let Some(durable) = status.durable else {
                return Err("starting: reading the archive's newest generation".into());
            };
            if !status.restorable {
                return Err(format!(
                    "generation {} has no base snapshot archived yet: none of its revisions is restorable",
                    status.generation.map_or(0, |g| g.0)
                ));
            }
            let lag = lag_ms(durable, status.source, now_ms);
            if u128::try_from(lag).unwrap_or(0) > max_lag.as_millis() {
                let source = status
                    .source
                    .map_or_else(|| "unknown".to_owned(), |s| s.revision.to_string());
                return Err(format!(
                    "the archive lags the source by {:.1}s, more than --ready-max-lag {} (archived revision {}, source revision {source})",
                    lag as f64 / 1000.0,
                    humantime::format_duration(max_lag),
                    durable.revision,
                ));
            }
            Ok(())
        }
    }
}

/// A finished snapshot, as the snapshot task reports it.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotDone {
    /// Its revision.
    pub revision: Revision,
    /// When it was started (Unix ms, wall clock, as in its header).
    pub taken_ms: i64,
    /// How long taking and uploading it took.
    pub duration: Duration,
    /// Bytes uploaded (0 when the store already held it).
    pub uploaded_bytes: u64,
}

struct Metrics {
    source_revision: Arc<Metric>,
    archived_revision: Arc<Metric>,
    lag_seconds: Arc<Metric>,
    generation: Arc<Metric>,
    gaps: Arc<Metric>,
    segments_uploaded: Arc<Metric>,
    uploaded_bytes: Arc<Metric>,
    upload_errors: Arc<Metric>,
    spool_bytes: Arc<Metric>,
    last_snapshot_timestamp: Arc<Metric>,
    snapshot_duration: Arc<Metric>,
    restorable_start: Arc<Metric>,
    leader: Arc<Metric>,
}

impl Metrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            source_revision: r.register(
                "etcd_pitr_source_revision",
                "The source cluster's current revision as the watch last saw it (0 on a standby).",
                Kind::Gauge,
            ),
            archived_revision: r.register(
                "etcd_pitr_archived_revision",
                "Newest revision of the generation being written that is durable in the store, every earlier one too (0 on a standby).",
                Kind::Gauge,
            ),
            lag_seconds: r.register(
                "etcd_pitr_archive_lag_seconds",
                "Seconds since the archive last provably held the source's current revision: 0 while the watch's latest word (at most 3s old) says the source is at the archived revision, else now minus the latest time the store vouches the source was at it (0 on a standby).",
                Kind::Gauge,
            ),
            generation: r.register(
                "etcd_pitr_generation",
                "Generation being written (0 on a standby).",
                Kind::Gauge,
            ),
            gaps: r.register(
                "etcd_pitr_gaps_total",
                "New generations this process started after an earlier one (compaction past the resume point, a changed cluster, a broken lineage): each leaves revisions unarchived.",
                Kind::Counter,
            ),
            segments_uploaded: r.register(
                "etcd_pitr_segments_uploaded_total",
                "Segments this process uploaded to the store.",
                Kind::Counter,
            ),
            uploaded_bytes: r.register(
                "etcd_pitr_uploaded_bytes_total",
                "Bytes of segments and snapshots this process uploaded (compressed, before encryption).",
                Kind::Counter,
            ),
            upload_errors: r.register(
                "etcd_pitr_upload_errors_total",
                "Failed attempts to upload a segment or a snapshot (each retry counts).",
                Kind::Counter,
            ),
            spool_bytes: r.register(
                "etcd_pitr_spool_bytes",
                "Sealed segment bytes waiting in the local spool for upload.",
                Kind::Gauge,
            ),
            last_snapshot_timestamp: r.register(
                "etcd_pitr_last_snapshot_timestamp_seconds",
                "Unix time at which the newest base snapshot of the generation being written was taken (0 until it has one; 0 on a standby).",
                Kind::Gauge,
            ),
            snapshot_duration: r.register(
                "etcd_pitr_snapshot_duration_seconds",
                "Seconds the newest snapshot this process archived took, streaming from etcd to the store (0 on a standby).",
                Kind::Gauge,
            ),
            restorable_start: r.register(
                "etcd_pitr_restorable_start_revision",
                "First revision of the newest restorable range of the generation being written: its oldest base snapshot from which the chain reaches the newest archived revision (0 until it has a snapshot; 0 on a standby).",
                Kind::Gauge,
            ),
            leader: r.register(
                "etcd_pitr_leader",
                "1 on the archiver that writes the archive (the elected one, or one run with --no-election), 0 on a standby.",
                Kind::Gauge,
            ),
        }
    }
}

struct Inner {
    clock: AnchoredClock,
    ready_max_lag: Duration,
    metrics: Metrics,
    status: Mutex<Status>,
    spool: Mutex<Option<Arc<Spool>>>,
}

/// The archiver's published state: metrics, readiness, heartbeat. Cheap to
/// clone; every clone publishes to the same registry.
#[derive(Clone)]
pub struct Observer(Arc<Inner>);

/// Revisions and times as gauge values (exact below 2^53).
#[allow(clippy::cast_precision_loss)]
fn value(v: i64) -> f64 {
    v as f64
}

impl Observer {
    /// A new observer whose times come from `clock`, and the registry its
    /// metrics, health and readiness are served from.
    pub fn new(clock: AnchoredClock, ready_max_lag: Duration) -> (Self, Registry) {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let observer = Self(Arc::new(Inner {
            clock,
            ready_max_lag,
            metrics,
            status: Mutex::new(Status::new(Role::Starting)),
            spool: Mutex::new(None),
        }));
        let refreshed = observer.clone();
        registry.on_render(move || refreshed.refresh());
        let checked = observer.clone();
        registry.readiness_check(move || checked.ready());
        (observer, registry)
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.0.status.lock().expect("observer lock")
    }

    /// Sets the values computed from "now": the lag and the spool's bytes.
    fn refresh(&self) {
        let now_ms = self.0.clock.now_ms();
        let lag = {
            let s = self.status();
            match (&s.role, s.durable) {
                (Role::Writer, Some(d)) => lag_ms(d, s.source, now_ms),
                _ => 0,
            }
        };
        self.0.metrics.lag_seconds.set(value(lag) / 1000.0);
        let spooled = self
            .0
            .spool
            .lock()
            .expect("observer lock")
            .as_ref()
            .map_or(0, |s| s.bytes());
        #[allow(clippy::cast_precision_loss)]
        self.0.metrics.spool_bytes.set(spooled as f64);
    }

    /// The readiness decision now.
    ///
    /// # Errors
    /// Why the archiver is not ready.
    pub fn ready(&self) -> Result<(), String> {
        readiness(&self.status(), self.0.clock.now_ms(), self.0.ready_max_lag)
    }

    /// Clears the writer's gauges (a standby reports 0 for them).
    fn clear_writer_gauges(&self) {
        let m = &self.0.metrics;
        for gauge in [
            &m.source_revision,
            &m.archived_revision,
            &m.lag_seconds,
            &m.generation,
            &m.last_snapshot_timestamp,
            &m.snapshot_duration,
            &m.restorable_start,
            &m.leader,
        ] {
            gauge.set(0.0);
        }
    }

    /// This archiver stands by: campaigning (`Ok`), or why it cannot.
    pub fn standby(&self, campaigning: Result<(), String>) {
        *self.status() = Status::new(Role::Standby(campaigning));
        self.clear_writer_gauges();
    }

    /// This archiver writes the archive from now on (elected, or alone).
    pub fn writing(&self) {
        *self.status() = Status::new(Role::Writer);
        self.clear_writer_gauges();
        self.0.metrics.leader.set(1.0);
    }

    /// The spool of the current term (its bytes are reported).
    pub fn spool(&self, spool: Arc<Spool>) {
        *self.0.spool.lock().expect("observer lock") = Some(spool);
    }

    /// etcd cannot be reached or watched (`error` says why).
    pub fn etcd_unreachable(&self, error: &anyhow::Error) {
        self.status().etcd_error = Some(errors::one_line(error));
    }

    /// The watch saw the source at `revision` just now (so etcd answers).
    pub fn source_at(&self, revision: Revision) {
        let at_ms = self.0.clock.now_ms();
        let mut s = self.status();
        s.etcd_error = None;
        s.source = Some(Seen { revision, at_ms });
        self.0.metrics.source_revision.set(value(revision));
    }

    /// `generation` is being written, durable through `durable`; its
    /// restorable start is not known yet.
    pub fn generation(&self, generation: GenerationId, durable: Durable) {
        let mut s = self.status();
        s.generation = Some(generation);
        s.durable = Some(durable);
        s.restorable = false;
        let m = &self.0.metrics;
        m.generation
            .set(value(i64::try_from(generation.0).unwrap_or(i64::MAX)));
        m.archived_revision.set(value(durable.revision));
        m.restorable_start.set(0.0);
        m.last_snapshot_timestamp.set(0.0);
        m.snapshot_duration.set(0.0);
    }

    /// A new generation started after an earlier one: a gap.
    pub fn gap(&self) {
        self.0.metrics.gaps.add(1.0);
    }

    /// A segment of `generation` named `name` is durable in the store;
    /// `uploaded_bytes` when this process uploaded it (`None`: the store
    /// already held the same revisions).
    pub fn segment_durable(
        &self,
        generation: GenerationId,
        name: &SegmentName,
        uploaded_bytes: Option<u64>,
    ) {
        let mut s = self.status();
        s.store_error = None;
        if let Some(bytes) = uploaded_bytes {
            self.0.metrics.segments_uploaded.add(1.0);
            #[allow(clippy::cast_precision_loss)]
            self.0.metrics.uploaded_bytes.add(bytes as f64);
        }
        if s.generation != Some(generation) {
            return;
        }
        let durable = match s.durable {
            Some(d) if d.revision > name.last => return,
            Some(d) if d.revision == name.last => Durable {
                revision: d.revision,
                vouched_ms: d.vouched_ms.max(name.end_ms),
            },
            _ => Durable {
                revision: name.last,
                vouched_ms: name.end_ms,
            },
        };
        s.durable = Some(durable);
        self.0
            .metrics
            .archived_revision
            .set(value(durable.revision));
    }

    /// An upload attempt failed (it is retried, or stops the archiver).
    pub fn upload_failed(&self, error: &anyhow::Error) {
        self.0.metrics.upload_errors.add(1.0);
        self.status().store_error = Some(errors::one_line(error));
    }

    /// A snapshot of `generation` is archived.
    pub fn snapshot_archived(&self, generation: GenerationId, done: &SnapshotDone) {
        let m = &self.0.metrics;
        #[allow(clippy::cast_precision_loss)]
        m.uploaded_bytes.add(done.uploaded_bytes as f64);
        let mut s = self.status();
        if s.generation != Some(generation) {
            return;
        }
        s.restorable = true;
        // A snapshot that reached the store clears an earlier failure.
        s.store_error = None;
        drop(s);
        m.last_snapshot_timestamp.set(value(done.taken_ms) / 1000.0);
        m.snapshot_duration.set(done.duration.as_secs_f64());
        if m.restorable_start.get() == 0.0 {
            m.restorable_start.set(value(done.revision));
        }
    }

    /// The newest restorable range of `generation` starts at `first`.
    pub fn restorable_start(&self, generation: GenerationId, first: Revision) {
        let mut s = self.status();
        if s.generation == Some(generation) {
            s.restorable = true;
            self.0.metrics.restorable_start.set(value(first));
        }
    }

    /// The time of `generation`'s newest snapshot, read from the archive
    /// when a writer resumes it (unless this process took a newer one).
    pub fn snapshot_time(&self, generation: GenerationId, taken_ms: i64) {
        let m = &self.0.metrics;
        let mut s = self.status();
        if s.generation == Some(generation) {
            s.restorable = true;
            if m.last_snapshot_timestamp.get() == 0.0 {
                m.last_snapshot_timestamp.set(value(taken_ms) / 1000.0);
            }
        }
    }

    /// The generation being written, if any.
    pub fn current_generation(&self) -> Option<GenerationId> {
        self.status().generation
    }

    /// Logs one INFO line every `interval` until `stop`: the archived
    /// revision, the lag, and the segments and bytes uploaded since the
    /// previous line.
    pub async fn heartbeat(self, interval: Duration, stop: CancellationToken) {
        let m = &self.0.metrics;
        let mut last = (m.segments_uploaded.get(), m.uploaded_bytes.get());
        let start = tokio::time::Instant::now() + interval;
        let mut tick = tokio::time::interval_at(start, interval);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.refresh();
            let now = (m.segments_uploaded.get(), m.uploaded_bytes.get());
            tracing::info!(
                generation = m.generation.get(),
                archived_revision = m.archived_revision.get(),
                source_revision = m.source_revision.get(),
                lag_seconds = m.lag_seconds.get(),
                segments = now.0 - last.0,
                uploaded_bytes = now.1 - last.1,
                spool_bytes = m.spool_bytes.get(),
                "heartbeat"
            );
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn durable(revision: Revision, vouched_ms: i64) -> Durable {
        Durable {
            revision,
            vouched_ms,
        }
    }

    #[allow(clippy::unnecessary_wraps)]
    fn seen(revision: Revision, at_ms: i64) -> Option<Seen> {
        Some(Seen { revision, at_ms })
    }

    #[test]
    fn lag_is_zero_only_while_a_recent_word_says_the_source_is_archived() {
        // Idle and current: the latest progress says the source is at 50.
        assert_eq!(
            lag_ms(durable(50, NOW - 40_000), seen(50, NOW - 1_000), NOW),
            0
        );
        assert_eq!(
            lag_ms(durable(50, NOW - 40_000), seen(50, NOW - 3_000), NOW),
            0
        );
        // The word is stale (etcd silent): counted from it, not zero.
        assert_eq!(
            lag_ms(durable(50, NOW - 40_000), seen(50, NOW - 10_000), NOW),
            10_000
        );
        // The source is ahead: from the time the store vouches for 50,
        // however fresh the word.
        assert_eq!(
            lag_ms(durable(50, NOW - 7_000), seen(60, NOW - 100), NOW),
            7_000
        );
        // Nothing seen yet: from the durable time.
        assert_eq!(lag_ms(durable(50, NOW - 2_000), None, NOW), 2_000);
        // Observed times ahead of now (a raised epoch) are no negative lag.
        assert_eq!(lag_ms(durable(50, NOW + 5_000), seen(60, NOW), NOW), 0);
    }

    fn writer(durable: Option<Durable>, source: Option<Seen>) -> Status {
        Status {
            generation: Some(GenerationId(3)),
            durable,
            source,
            restorable: true,
            ..Status::new(Role::Writer)
        }
    }

    #[test]
    fn readiness_of_a_writer() {
        let max = Duration::from_secs(30);
        let current = writer(Some(durable(50, NOW - 60_000)), seen(50, NOW - 500));
        assert_eq!(readiness(&current, NOW, max), Ok(()));
        // Behind, within the bound.
        let behind = writer(Some(durable(50, NOW - 29_000)), seen(70, NOW));
        assert_eq!(readiness(&behind, NOW, max), Ok(()));
        // Beyond it: the reason names the lag, the bound and both revisions.
        let late = writer(Some(durable(50, NOW - 31_000)), seen(70, NOW));
        let reason = readiness(&late, NOW, max).unwrap_err();
        assert!(reason.contains("31.0s"), "{reason}");
        assert!(reason.contains("--ready-max-lag 30s"), "{reason}");
        assert!(
            reason.contains("archived revision 50, source revision 70"),
            "{reason}"
        );
        // etcd gone: at once, whatever the lag.
        let mut down = current.clone();
        down.etcd_error = Some("connection refused".into());
        assert_eq!(
            readiness(&down, NOW, max).unwrap_err(),
            "etcd unreachable: connection refused"
        );
        // The store refusing uploads.
        let mut refused = current.clone();
        refused.store_error = Some("access denied".into());
        assert!(readiness(&refused, NOW, max)
            .unwrap_err()
            .starts_with("the store refuses uploads: access denied"));
        // The head not read yet.
        assert!(readiness(&writer(None, None), NOW, max)
            .unwrap_err()
            .starts_with("starting"));
        // A new generation before its base snapshot is in the store.
        let mut unrestorable = current.clone();
        unrestorable.restorable = false;
        assert_eq!(
            readiness(&unrestorable, NOW, max).unwrap_err(),
            "generation 3 has no base snapshot archived yet: none of its revisions is restorable"
        );
    }

    #[test]
    fn readiness_of_a_standby_is_campaigning() {
        let max = Duration::from_secs(30);
        assert_eq!(
            readiness(&Status::new(Role::Standby(Ok(()))), NOW, max),
            Ok(())
        );
        let stuck = Status::new(Role::Standby(Err("connection refused".into())));
        assert_eq!(
            readiness(&stuck, NOW, max).unwrap_err(),
            "standby cannot campaign for leadership: connection refused"
        );
        assert!(readiness(&Status::new(Role::Starting), NOW, max).is_err());
    }

    fn name(first: Revision, last: Revision, end_ms: i64) -> SegmentName {
        SegmentName {
            first,
            last,
            end_ms,
        }
    }

    #[test]
    fn the_watermark_follows_durable_segments_of_the_current_generation() {
        let clock = AnchoredClock::system();
        let (o, registry) = Observer::new(clock, Duration::from_secs(30));
        o.writing();
        o.generation(GenerationId(2), durable(10, 5));
        o.upload_failed(&anyhow::anyhow!("throttled"));
        assert!(o.ready().unwrap_err().contains("throttled"));
        o.segment_durable(GenerationId(2), &name(11, 20, 7), Some(100));
        o.segment_durable(GenerationId(1), &name(90, 99, 9), Some(50));
        // A progress-only segment vouches for a later time of revision 20.
        o.segment_durable(GenerationId(2), &name(21, 20, 8), None);
        let s = o.status().clone();
        assert_eq!(s.durable, Some(durable(20, 8)));
        assert_eq!(s.store_error, None, "an upload succeeded since");
        let text = registry.render();
        for line in [
            "etcd_pitr_archived_revision 20\n",
            "etcd_pitr_generation 2\n",
            "etcd_pitr_segments_uploaded_total 2\n",
            "etcd_pitr_uploaded_bytes_total 150\n",
            "etcd_pitr_upload_errors_total 1\n",
            "etcd_pitr_leader 1\n",
        ] {
            assert!(text.contains(line), "{line}in\n{text}");
        }
        o.snapshot_archived(
            GenerationId(2),
            &SnapshotDone {
                revision: 15,
                taken_ms: 1_700_000_000_000,
                duration: Duration::from_millis(1500),
                uploaded_bytes: 10,
            },
        );
        let text = registry.render();
        assert!(
            text.contains("etcd_pitr_restorable_start_revision 15\n"),
            "{text}"
        );
        assert!(text.contains("etcd_pitr_last_snapshot_timestamp_seconds 1700000000\n"));
        assert!(text.contains("etcd_pitr_snapshot_duration_seconds 1.5\n"));
        // Deposed: the writer's gauges read 0, the counters keep counting.
        o.standby(Ok(()));
        let text = registry.render();
        assert!(text.contains("etcd_pitr_leader 0\n"));
        assert!(text.contains("etcd_pitr_archived_revision 0\n"));
        assert!(text.contains("etcd_pitr_restorable_start_revision 0\n"));
        assert!(text.contains("etcd_pitr_segments_uploaded_total 2\n"));
        assert_eq!(o.ready(), Ok(()));
    }
}
