//! One writer term: everything the archiver does while it may write the
//! archive. The upload pipeline (spool, spooler, uploader) is started, the
//! archive's head is read, and watch sessions run until shutdown, until
//! leadership is lost, or until a fatal error. Generations are decided here
//! (see [`crate::generation`]).

use std::time::Duration;

use etcd_client::Client;
use etcdpitr_common::errors;
use etcdpitr_common::layout::GenerationId;
use etcdpitr_common::manifest::{
    GapStart, GenerationManifest, LineageFingerprint, StartReason, TermRecord,
};
use etcdpitr_common::store::StoreError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::{self, EpochClock};
use crate::config::Config;
use crate::election::Leadership;
use crate::etcd::{self, ClusterInfo};
use crate::generation::{self, GenerationTaken, NewGeneration, Resume};
use crate::head::{self, ChainHead};
use crate::observe::Durable;
use crate::retry::{pause, retry, RETRY_MIN};
use crate::segment_writer::{SealPolicy, SegmentWriter, Sink};
use crate::snapshot_schedule::SnapshotSchedule;
use crate::tip::{SharedTip, Tip};
use crate::uploader::{self, Fatal, Spool};
use crate::watch::{self, AbortOnDrop, SessionEnd};
use crate::{store_retryable, term, Opened};

/// A won election: the leadership and the archive term it claimed.
pub struct Term {
    /// The etcd leadership (lease, key, loss signal).
    pub leadership: Leadership,
    /// The archive's record of this term.
    pub record: TermRecord,
    /// The client holding the leadership, to resign with.
    pub client: Client,
}

/// How a term ended.
#[derive(Debug, PartialEq, Eq)]
pub enum TermEnd {
    /// Shutdown was requested; the open segment was sealed and uploaded
    /// within the shutdown budget.
    Shutdown,
    /// Leadership was lost, or another writer started a generation: stop
    /// writing at once and stand by.
    Deposed,
}

/// The generation being written.
struct Current {
    manifest: GenerationManifest,
    writer: SegmentWriter,
    has_snapshot: bool,
    fingerprint: Option<LineageFingerprint>,
}

/// The upload pipeline of one term.
struct Pipeline {
    spool: std::sync::Arc<Spool>,
    sink: Sink,
    abort: CancellationToken,
    spooler: JoinHandle<()>,
    uploader: JoinHandle<u64>,
}

impl Pipeline {
    /// Opens the spool and starts uploading what an earlier run left in it.
    fn start(
        config: &Config,
        opened: &Opened,
        fatal: &Fatal,
        tip: &SharedTip,
    ) -> anyhow::Result<Self> {
        let (spool, leftovers) = Spool::open(
            &config.data_dir,
            config.spool_max_bytes,
            config.keys.clone(),
        )?;
        let (uploads, rx) = tokio::sync::mpsc::unbounded_channel();
        if !leftovers.is_empty() {
            tracing::info!(
                segments = leftovers.len(),
                "uploading segments left in the spool by an earlier run"
            );
        }
        for item in leftovers {
            uploads.send(item).expect("receiver alive");
        }
        opened.observer.spool(spool.clone());
        let abort = CancellationToken::new();
        let uploader = tokio::spawn(uploader::run_uploader(
            opened.archive.clone(),
            spool.clone(),
            opened.catalog.clone(),
            rx,
            abort.clone(),
            fatal.clone(),
            tip.clone(),
            opened.observer.clone(),
            config.upload_concurrency,
        ));
        let (sealed, sealed_rx) = tokio::sync::mpsc::unbounded_channel();
        let spooler = tokio::spawn(uploader::run_spooler(
            spool.clone(),
            opened.catalog.clone(),
            sealed_rx,
            uploads,
            abort.clone(),
        ));
        let sink = Sink {
            spool: spool.clone(),
            sealed,
        };
        Ok(Self {
            spool,
            sink,
            abort,
            spooler,
            uploader,
        })
    }

    /// Waits until the spool is empty (the head is read from the store).
    async fn drain_leftovers(&self, stop: &CancellationToken) {
        while self.spool.bytes() > 0 {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// Shutdown: gives the uploader a bounded time for what is sealed.
    async fn finish(self, timeout: Duration, fatal: &Fatal) {
        let Self {
            spool,
            sink,
            abort,
            spooler,
            uploader,
        } = self;
        drop(sink);
        let drained = async {
            spooler.await.ok();
            uploader.await.ok();
        };
        if tokio::time::timeout(timeout, drained).await.is_ok() {
            if !fatal.failed() {
                tracing::info!("all sealed segments uploaded");
            }
        } else {
            abort.cancel();
            tracing::warn!(
                spooled_bytes = spool.bytes(),
                "store did not take every segment in time; they stay in the spool and are uploaded on the next start"
            );
        }
    }

    /// Deposed: stops uploading at once; sealed segments stay in the spool.
    fn abort(self) {
        self.abort.cancel();
        self.spooler.abort();
        self.uploader.abort();
    }
}

/// Cancels `stop` when leadership is lost.
struct LossWatch(Option<JoinHandle<()>>);

impl LossWatch {
    fn start(term: Option<&Term>, stop: &CancellationToken) -> Self {
        Self(term.map(|t| {
            let (lost, stop) = (t.leadership.lost().clone(), stop.clone());
            tokio::spawn(async move {
                lost.cancelled().await;
                stop.cancel();
            })
        }))
    }
}

impl Drop for LossWatch {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

async fn connect_and_probe(config: &Config) -> anyhow::Result<(Client, ClusterInfo)> {
    let mut client = etcd::connect(config).await?;
    let info = etcd::cluster_info(&mut client).await?;
    Ok((client, info))
}

/// Writes the archive for one term (`None`: without an election) until
/// shutdown, loss of leadership or a fatal error.
///
/// # Errors
/// Credentials refused, unusable archive or data directory.
pub async fn lead(
    config: &Config,
    opened: &Opened,
    term: Option<&Term>,
    shutdown: &CancellationToken,
    fatal: &Fatal,
) -> anyhow::Result<TermEnd> {
    let stop = shutdown.child_token();
    let _loss = LossWatch::start(term, &stop);
    // Until the head is read, nothing of a generation is known.
    let tip = SharedTip::new(Tip::start(GenerationId(0), 0, [0; 32]));
    let pipeline = Pipeline::start(config, opened, fatal, &tip)?;
    let _heartbeat = AbortOnDrop(tokio::spawn(
        opened
            .observer
            .clone()
            .heartbeat(config.heartbeat_interval, stop.clone()),
    ));
    pipeline.drain_leftovers(&stop).await;
    // Only the writer prunes; a prune stopped midway is safe by design.
    let _pruning = (!config.retention.is_empty()).then(|| {
        AbortOnDrop(tokio::spawn(crate::prune::periodically(
            opened.archive.clone(),
            config.retention.clone(),
            config.prune_interval,
            opened.observer.clone(),
            stop.clone(),
        )))
    });
    let mut session = Session {
        config,
        opened,
        term,
        stop: &stop,
        policy: SealPolicy {
            max_age: config.segment_max_age,
            max_bytes: config.segment_max_bytes,
            idle_interval: config.idle_seal_interval,
        },
        sink: pipeline.sink.clone(),
        spool: pipeline.spool.clone(),
        current: None,
        next_id: GenerationId(1),
        schedule: None,
        fatal: fatal.clone(),
        tip,
        restorable: None,
    };
    let outcome = session.run().await;
    let deposed = !shutdown.is_cancelled() && stop.is_cancelled()
        || matches!(outcome, Ok(SessionOutcome::Deposed));
    let current = session.current.take();
    // Every sender of sealed segments must be gone for the spooler to end.
    drop(session);
    if deposed {
        tracing::warn!("no longer the writer: stopped writing; standing by");
        pipeline.abort();
        outcome?;
        return Ok(TermEnd::Deposed);
    }
    if let Some(mut current) = current {
        if let Err(e) = current.writer.seal() {
            tracing::error!(
                error = errors::one_line(&e),
                hint = errors::hint(&e).map(tracing::field::display),
                "cannot seal the open segment"
            );
        }
    }
    pipeline.finish(config.shutdown_timeout, fatal).await;
    outcome.map(|_| TermEnd::Shutdown)
}

/// How the session loop ended (besides errors).
enum SessionOutcome {
    Stopped,
    Deposed,
}

/// The state of one term's watch sessions.
struct Session<'a> {
    config: &'a Config,
    opened: &'a Opened,
    term: Option<&'a Term>,
    stop: &'a CancellationToken,
    policy: SealPolicy,
    sink: Sink,
    spool: std::sync::Arc<Spool>,
    current: Option<Current>,
    next_id: GenerationId,
    schedule: Option<SnapshotSchedule>,
    fatal: Fatal,
    /// The current generation's newest archived objects (hash chain).
    tip: SharedTip,
    /// Reads the resumed generation's restorable start for the metrics.
    restorable: Option<AbortOnDrop>,
}

impl Session<'_> {
    /// Reads the head and marks the generation with this term.
    async fn load_head(&mut self) -> anyhow::Result<bool> {
        let (archive, catalog) = (&self.opened.archive, &self.opened.catalog);
        let Some(head) = retry(
            "read the archive's newest generation",
            self.stop,
            store_retryable,
            || head::load(archive, catalog),
        )
        .await?
        else {
            return Ok(false);
        };
        if let Some(h) = head {
            if let Some(term) = self.term {
                let marked = retry(
                    "mark the generation with this term",
                    self.stop,
                    store_retryable,
                    || term::mark(archive, h.generation(), &term.record),
                )
                .await?;
                if marked.is_none() {
                    return Ok(false);
                }
            }
            self.next_id = h.next_generation;
            let Some(clock) = self
                .begin_epoch(h.generation(), h.last_revision + 1, h.floor_ms())
                .await?
            else {
                return Ok(false);
            };
            self.publish_resumed(&h);
            self.current = Some(self.resume(h, clock));
        }
        Ok(true)
    }

    /// Begins this process's clock epoch in `generation` at revision
    /// `first` (see [`crate::clock`]): records it, and a step it starts
    /// with, before any of its segments can be uploaded. `None` when
    /// shutdown came first.
    async fn begin_epoch(
        &self,
        generation: GenerationId,
        first: etcdpitr_common::Revision,
        floor_ms: i64,
    ) -> anyhow::Result<Option<EpochClock>> {
        let archive = &self.opened.archive;
        let (mut epoch, record) =
            EpochClock::begin(&self.opened.clock, first, floor_ms, &self.opened.holder);
        let written = retry("record the clock epoch", self.stop, store_retryable, || {
            clock::write_epoch(archive, generation, &record)
        })
        .await?;
        if written.is_none() {
            return Ok(None);
        }
        if !clock::record_pending(archive, self.stop, generation, &mut epoch).await? {
            return Ok(None);
        }
        tracing::debug!(generation = %generation, epoch_first = first, began_ms = record.began_ms, "clock epoch recorded");
        Ok(Some(epoch))
    }

    /// Publishes the resumed generation: its durable end, its newest
    /// snapshot's time, and (read in the background, from a full listing)
    /// its restorable start.
    fn publish_resumed(&mut self, h: &ChainHead) {
        let observer = &self.opened.observer;
        let generation = h.generation();
        observer.generation(
            generation,
            Durable {
                revision: h.last_revision,
                vouched_ms: h.floor_ms(),
            },
        );
        if let Some(ms) = h.snapshot_taken_ms {
            observer.snapshot_time(generation, ms);
        }
        let (archive, manifest, observer) = (
            self.opened.archive.clone(),
            h.manifest.clone(),
            observer.clone(),
        );
        self.restorable = Some(AbortOnDrop(tokio::spawn(async move {
            match head::restorable_start(&archive, &manifest).await {
                Ok(Some(first)) => observer.restorable_start(generation, first),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    error = errors::one_line(&e),
                    hint = errors::hint(&e).map(tracing::field::display),
                    "cannot list the generation for its restorable start (etcd_pitr_restorable_start_revision stays 0 until the next snapshot)"
                ),
            }
        })));
    }

    fn resume(&self, h: ChainHead, clock: EpochClock) -> Current {
        self.tip.reset(h.tip);
        Current {
            has_snapshot: !h.snapshots.is_empty(),
            writer: SegmentWriter::new(
                h.generation(),
                h.last_revision,
                h.last_record,
                self.policy,
                self.sink.clone(),
                clock,
                self.tip.clone(),
            ),
            manifest: h.manifest,
            fingerprint: h.fingerprint,
        }
    }

    /// Whether the current generation can be continued on the cluster.
    async fn verdict(
        &self,
        client: &mut Client,
        info: ClusterInfo,
    ) -> anyhow::Result<Option<(StartReason, String)>> {
        let resume = self.current.as_ref().map(|c| Resume {
            manifest: &c.manifest,
            last_revision: c.writer.last_revision(),
            last_record: c.writer.last_record(),
            fingerprint: self
                .schedule
                .as_ref()
                .and_then(SnapshotSchedule::fingerprint)
                .or(c.fingerprint),
        });
        generation::must_start_generation(client, info, resume).await
    }

    /// Starts a new generation (after confirming leadership). Returns
    /// `false` when this writer was deposed.
    async fn start(
        &mut self,
        client: &mut Client,
        info: ClusterInfo,
        reason: StartReason,
        detail: String,
    ) -> anyhow::Result<bool> {
        if let Some(term) = self.term {
            if !term.leadership.confirm(client).await? {
                return Ok(false);
            }
        }
        let mut previous_digest = None;
        let previous = match &mut self.current {
            Some(c) => {
                c.writer.seal()?;
                previous_digest = Some(c.writer.head_digest());
                // Steps the ending epoch saw and could not record yet.
                let (archive, stop) = (&self.opened.archive, self.stop);
                let generation = c.manifest.generation;
                if !clock::record_pending(archive, stop, generation, c.writer.clock_mut()).await? {
                    anyhow::bail!("shutdown requested before the clock steps were recorded");
                }
                Some(GapStart {
                    generation: c.manifest.generation,
                    last_revision: c.writer.last_revision(),
                })
            }
            None => None,
        };
        let new_has_previous = previous.is_some();
        let new = NewGeneration {
            id: self.next_id,
            previous,
            term: self.term.map_or(0, |t| t.record.term),
            started_ms: self.opened.clock.now_ms(),
            reason,
            detail,
            previous_digest,
        };
        let (manifest, anchor) =
            match generation::start_generation(&self.opened.archive, &self.opened.catalog, new, info)
                .await
            {
                Ok(m) => m,
                Err(e) if e.is::<GenerationTaken>() && self.term.is_some() => {
                    tracing::warn!(error = %e, "another writer started a generation");
                    return Ok(false);
                }
                Err(e) if e.is::<GenerationTaken>() => {
                    return Err(e.context(
                        "another archiver writes this archive; run every archiver of an archive with an election (without --no-election)",
                    ))
                }
                Err(e) => return Err(e),
            };
        self.next_id = manifest.generation.next();
        if new_has_previous {
            self.opened.observer.gap();
        }
        self.opened.observer.generation(
            manifest.generation,
            Durable {
                revision: info.revision,
                vouched_ms: self.opened.clock.now_ms(),
            },
        );
        let Some(clock) = self
            .begin_epoch(manifest.generation, info.revision + 1, 0)
            .await?
        else {
            anyhow::bail!("shutdown requested before the clock epoch was recorded");
        };
        self.tip
            .reset(Tip::start(manifest.generation, info.revision, anchor));
        let writer = SegmentWriter::new(
            manifest.generation,
            info.revision,
            None,
            self.policy,
            self.sink.clone(),
            clock,
            self.tip.clone(),
        );
        self.current = Some(Current {
            manifest,
            writer,
            has_snapshot: false,
            fingerprint: None,
        });
        self.schedule = None;
        Ok(true)
    }

    /// Connects, decides the generation and runs watch sessions until
    /// stopped, deposed or a fatal error.
    async fn run(&mut self) -> anyhow::Result<SessionOutcome> {
        if !self.load_head().await? {
            return Ok(SessionOutcome::Stopped);
        }
        let mut forced: Option<(StartReason, String)> = None;
        let mut delay = RETRY_MIN;
        let stop = self.stop;
        while !stop.is_cancelled() {
            let connected = tokio::select! {
                () = stop.cancelled() => break,
                r = connect_and_probe(self.config) => r,
            };
            let (mut client, info) = match connected {
                Ok(c) => c,
                Err(e) if etcd::is_denied(&e) => {
                    return Err(e.context("etcd refused the archiver's credentials"))
                }
                Err(e) => {
                    self.opened.observer.etcd_unreachable(&e);
                    tracing::warn!(error = errors::one_line(&e), hint = errors::hint(&e).map(tracing::field::display), retry_in = ?delay, "etcd unreachable; retrying");
                    if !pause(&mut delay, stop).await {
                        break;
                    }
                    continue;
                }
            };
            self.opened.observer.source_at(info.revision);
            let verdict = match forced.take() {
                Some(reason) => Ok(Some(reason)),
                None => self.verdict(&mut client, info).await,
            };
            let started = match verdict {
                Ok(None) => Ok(true),
                Ok(Some((reason, detail))) => self.start(&mut client, info, reason, detail).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(true) => {}
                Ok(false) => return Ok(SessionOutcome::Deposed),
                // A store setting the operator must fix (bucket, credentials,
                // permissions) is not retried: the archiver exits 2.
                Err(e) if errors::is_store_setting(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = errors::one_line(&e), hint = errors::hint(&e).map(tracing::field::display), retry_in = ?delay, "cannot decide or start the generation; retrying");
                    if !pause(&mut delay, stop).await {
                        break;
                    }
                    continue;
                }
            }
            match self.watch(&mut client, info).await {
                SessionEnd::Shutdown => break,
                SessionEnd::Compacted { compact_revision } => {
                    let last = self
                        .current
                        .as_ref()
                        .map_or(0, |c| c.writer.last_revision());
                    tracing::warn!(
                        compact_revision,
                        archived_through = last,
                        "etcd compacted past the archive's resume point"
                    );
                    forced = Some((
                        StartReason::Compacted,
                        format!(
                            "etcd compacted to revision {compact_revision} past the resume point {}",
                            last + 1
                        ),
                    ));
                }
                SessionEnd::Fatal(e) => return Err(e),
                SessionEnd::Diverged(detail) => {
                    tracing::error!(%detail, "the watch does not continue the archived history");
                    forced = Some((StartReason::LineageBroken, detail));
                }
                SessionEnd::Disconnected(e) if errors::is_store_setting(&e) => return Err(e),
                SessionEnd::Disconnected(e) => {
                    // A clock step the store did not take ends a session too.
                    if e.chain().any(<dyn std::error::Error>::is::<StoreError>) {
                        self.opened.observer.upload_failed(&e);
                    } else {
                        self.opened.observer.etcd_unreachable(&e);
                    }
                    tracing::warn!(error = errors::one_line(&e), hint = errors::hint(&e).map(tracing::field::display), retry_in = ?delay, "watch interrupted; reconnecting");
                    if !pause(&mut delay, stop).await {
                        break;
                    }
                    continue;
                }
            }
            delay = RETRY_MIN;
        }
        Ok(SessionOutcome::Stopped)
    }

    /// One watch session on the current generation.
    async fn watch(&mut self, client: &mut Client, info: ClusterInfo) -> SessionEnd {
        let current = self.current.as_mut().expect("a generation exists here");
        let (archive, catalog) = (&self.opened.archive, &self.opened.catalog);
        let schedule = self.schedule.get_or_insert_with(|| {
            SnapshotSchedule::new(
                archive.clone(),
                catalog.clone(),
                self.config.data_dir.clone(),
                current.manifest.generation,
                current.manifest.start_revision,
                self.config.snapshot_interval,
                current.has_snapshot,
                current.fingerprint,
                self.fatal.clone(),
                self.tip.clone(),
                self.opened.observer.clone(),
            )
        });
        schedule.start_if_due(client);
        watch::run(
            client,
            &mut current.writer,
            &self.spool,
            archive,
            schedule,
            info.revision,
            &self.opened.observer,
            self.stop,
        )
        .await
    }
}
