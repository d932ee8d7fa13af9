//! Runs at most one snapshot at a time for the current generation: one as
//! soon as a generation has none, then one every `--snapshot-interval`.
//! Dropping the schedule aborts a snapshot in flight (scratch files are
//! cleaned on the next start). A failed snapshot is retried later, unless
//! the store failed for good (no such bucket, access denied): that stops
//! the archiver through [`Fatal`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use etcdpitr_common::catalog::Catalog;
use etcdpitr_common::errors;
use etcdpitr_common::layout::GenerationId;
use etcdpitr_common::manifest::LineageFingerprint;
use etcdpitr_common::store::{Archive, StoreError};
use etcdpitr_common::Revision;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use crate::observe::Observer;
use crate::snapshot::Taken;
use crate::tip::SharedTip;
use crate::uploader::{is_permanent_store_error, Fatal};

/// Delay before retrying a failed snapshot.
const RETRY_DELAY: Duration = Duration::from_secs(30);

/// The snapshot schedule of one generation.
pub struct SnapshotSchedule {
    archive: Archive,
    catalog: Arc<Mutex<Catalog>>,
    data_dir: PathBuf,
    generation: GenerationId,
    min_revision: Revision,
    interval: Duration,
    next_due: Instant,
    task: JoinSet<anyhow::Result<Taken>>,
    fingerprint: Option<LineageFingerprint>,
    fatal: Fatal,
    tip: SharedTip,
    observer: Observer,
}

impl SnapshotSchedule {
    /// A schedule for `generation`; the first snapshot is due now unless the
    /// generation already has one. `fingerprint` is the generation's newest
    /// lineage fingerprint so far. Permanent store failures go to `fatal`;
    /// outcomes are reported to `observer`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        archive: Archive,
        catalog: Arc<Mutex<Catalog>>,
        data_dir: PathBuf,
        generation: GenerationId,
        min_revision: Revision,
        interval: Duration,
        has_snapshot: bool,
        fingerprint: Option<LineageFingerprint>,
        fatal: Fatal,
        tip: SharedTip,
        observer: Observer,
    ) -> Self {
        let now = Instant::now();
        Self {
            archive,
            catalog,
            data_dir,
            generation,
            min_revision,
            interval,
            next_due: if has_snapshot { now + interval } else { now },
            task: JoinSet::new(),
            fingerprint,
            fatal,
            tip,
            observer,
        }
    }

    /// The newest lineage fingerprint of the generation (from its newest
    /// snapshot), to check the cluster against on reconnect.
    pub fn fingerprint(&self) -> Option<LineageFingerprint> {
        self.fingerprint
    }

    /// Starts a snapshot if one is due and none is running.
    pub fn start_if_due(&mut self, client: &Client) {
        if !self.task.is_empty() || Instant::now() < self.next_due {
            return;
        }
        let mut client = client.clone();
        let (archive, catalog, data_dir) = (
            self.archive.clone(),
            self.catalog.clone(),
            self.data_dir.clone(),
        );
        let (generation, min_revision) = (self.generation, self.min_revision);
        let tip = self.tip.clone();
        self.task.spawn(async move {
            crate::snapshot::take(
                &mut client,
                &archive,
                &catalog,
                &data_dir,
                generation,
                min_revision,
                &tip,
                // A daemon's stderr is a log, even on a terminal.
                etcdpitr_common::progress::Mode::Lines,
            )
            .await
        });
    }

    /// Waits for the running snapshot to finish; never returns if none runs.
    /// Safe to drop.
    pub async fn next_done(&mut self) -> Result<anyhow::Result<Taken>, JoinError> {
        match self.task.join_next().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }

    /// Records the outcome of a snapshot and schedules the next one.
    pub fn finished(&mut self, result: Result<anyhow::Result<Taken>, JoinError>) {
        let now = Instant::now();
        if let Ok(Err(e)) = &result {
            if e.chain().any(<dyn std::error::Error>::is::<StoreError>) {
                self.observer.upload_failed(e);
            }
        }
        match result {
            Ok(Ok(taken)) => {
                self.fingerprint = taken.fingerprint.or(self.fingerprint);
                self.next_due = now + self.interval;
                self.observer
                    .snapshot_archived(self.generation, &taken.done);
            }
            Ok(Err(e)) if is_permanent_store_error(&e) => {
                self.fatal.fail(e.context("snapshot"));
                self.next_due = now + self.interval;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = errors::one_line(&e), hint = errors::hint(&e).map(tracing::field::display), retry_in = ?RETRY_DELAY, "snapshot failed");
                self.next_due = now + RETRY_DELAY.min(self.interval);
            }
            Err(e) => {
                tracing::error!(error = %e, "snapshot task failed");
                self.next_due = now + RETRY_DELAY.min(self.interval);
            }
        }
    }
}
