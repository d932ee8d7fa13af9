//! etcd-archiver: keeps a complete, restorable history of an etcd cluster in
//! object storage.
//!
//! - [`config`]: flags, environment and TOML file into one validated [`config::Config`].
//! - [`etcd`]: connecting, cluster identity, lineage checks.
//! - [`head`]: where the archive's newest chain ends (read from the store).
//! - [`lineage`]: HashKV fingerprints that prove the source's history.
//! - [`watch`]: one watch session, assembling complete revisions.
//! - [`segment_writer`]: the open segment; sealing by size and age.
//! - [`uploader`]: the durable spool and the in-order, write-once uploader.
//! - [`snapshot`] and [`snapshot_schedule`]: full snapshots, streamed.
//!
//! Invariants: within a generation, revisions are archived exactly once and
//! without holes; a generation is never continued on a history that differs
//! from the archived one; nothing sealed is dropped (it waits in the spool).

pub mod config;
pub mod etcd;
pub mod head;
pub mod lineage;
mod retry;
pub mod segment_writer;
pub mod snapshot;
pub mod snapshot_schedule;
pub mod uploader;
pub mod watch;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use etcd_client::Client;
use etcdpitr_common::catalog::Catalog;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::manifest::{
    ArchiveManifest, GapStart, GenerationManifest, LineageFingerprint, StartReason,
};
use etcdpitr_common::store::Archive;
use etcdpitr_common::{now_ms, Revision};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::etcd::{ClusterInfo, Lineage};
use crate::head::ChainHead;
use crate::retry::{pause, retry, RETRY_MIN};
use crate::segment_writer::{SealPolicy, SegmentWriter, Sink};
use crate::snapshot_schedule::SnapshotSchedule;
use crate::uploader::Spool;
use crate::watch::SessionEnd;

/// Store errors worth retrying (network, throttling), as opposed to bad
/// credentials, unknown formats or corrupted objects.
fn store_retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<etcdpitr_common::store::StoreError>()
            .is_some_and(etcdpitr_common::store::StoreError::is_retryable)
    })
}

/// The archive, the catalog and the lock on the data directory.
struct Opened {
    archive: Archive,
    catalog: Arc<Mutex<Catalog>>,
    _lock: std::fs::File,
}

/// Opens the archive (creating its manifest if new, refusing unknown
/// versions before anything else is written) and then the data directory.
async fn open(config: &Config, shutdown: &CancellationToken) -> anyhow::Result<Option<Opened>> {
    let archive = Archive::open(&config.archive)?;
    let checked = retry(
        "read the archive manifest",
        shutdown,
        store_retryable,
        || async {
            if let Some(bytes) = archive.get_opt(layout::MANIFEST_NAME).await? {
                ArchiveManifest::parse(layout::MANIFEST_NAME, &bytes)?;
            } else {
                let m = ArchiveManifest::new(now_ms());
                let json = serde_json::to_vec_pretty(&m).expect("manifest serializes");
                archive
                    .put_once(layout::MANIFEST_NAME, Bytes::from(json))
                    .await?;
                tracing::info!(archive = archive.url(), "created a new archive");
            }
            Ok(())
        },
    )
    .await?;
    if checked.is_none() {
        return Ok(None);
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
    let lock = std::fs::File::create(config.data_dir.join("lock"))
        .with_context(|| format!("open {}", config.data_dir.join("lock").display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "data directory {} is in use by another etcd-archiver",
            config.data_dir.display()
        );
    }
    snapshot::clean_scratch(&config.data_dir);
    let catalog = Catalog::open(&config.data_dir.join("catalog.db")).context("open catalog")?;
    Ok(Some(Opened {
        archive,
        catalog: Arc::new(Mutex::new(catalog)),
        _lock: lock,
    }))
}

/// What the archive knows about the end of the generation being continued,
/// to check the cluster's history against.
#[derive(Clone, Copy)]
struct Resume<'a> {
    manifest: &'a GenerationManifest,
    last_revision: Revision,
    last_record: Option<&'a etcdpitr_common::segment::RevisionRecord>,
    fingerprint: Option<LineageFingerprint>,
}

/// Decides whether the newest generation can be continued on this cluster.
/// Returns the reason for a new generation, or `None` to resume.
async fn must_start_generation(
    client: &mut Client,
    info: ClusterInfo,
    resume: Option<Resume<'_>>,
) -> anyhow::Result<Option<(StartReason, String)>> {
    let Some(resume) = resume else {
        return Ok(Some((StartReason::NewArchive, "first generation".into())));
    };
    let last_revision = resume.last_revision;
    if resume.manifest.cluster_id != info.cluster_id {
        return Ok(Some((
            StartReason::ClusterChanged,
            format!(
                "cluster ID changed from {:x} to {:x}",
                resume.manifest.cluster_id, info.cluster_id
            ),
        )));
    }
    if info.revision < last_revision {
        return Ok(Some((
            StartReason::LineageBroken,
            format!(
                "cluster is at revision {}, behind the archive's {last_revision} (was it restored?)",
                info.revision
            ),
        )));
    }
    let mut record_checked = false;
    if let Some(record) = resume.last_record {
        match etcd::check_lineage(client, record).await? {
            Lineage::Same => record_checked = true,
            Lineage::Diverged(detail) => return Ok(Some((StartReason::LineageBroken, detail))),
            Lineage::Compacted => {
                return Ok(Some((
                    StartReason::Compacted,
                    format!("revision {last_revision} was compacted before it could be re-checked"),
                )))
            }
        }
    }
    match resume.fingerprint {
        Some(fingerprint) => match lineage::check(client, &fingerprint).await? {
            lineage::Verdict::Same => {}
            lineage::Verdict::Differs(detail) => {
                return Ok(Some((StartReason::LineageBroken, detail)))
            }
            lineage::Verdict::Unverifiable(detail) if !record_checked => {
                return Ok(Some((
                    StartReason::LineageBroken,
                    format!("cannot prove the cluster's history is the archived one: {detail}"),
                )))
            }
            lineage::Verdict::Unverifiable(detail) => {
                tracing::info!(%detail, "lineage fingerprint not comparable; the last revision's events matched");
            }
        },
        None if !record_checked && last_revision > resume.manifest.start_revision => {
            // Revisions were archived but neither a record nor a fingerprint
            // can be read back: never continue blind.
            return Ok(Some((
                StartReason::LineageBroken,
                format!("cannot prove the cluster's history matches the archive at revision {last_revision}"),
            )));
        }
        None => {}
    }
    Ok(None)
}

/// Writes the manifest of a new generation and returns it.
async fn start_generation(
    archive: &Archive,
    catalog: &Arc<Mutex<Catalog>>,
    previous: Option<GapStart>,
    info: ClusterInfo,
    reason: StartReason,
    detail: String,
) -> anyhow::Result<GenerationManifest> {
    let id = previous.map_or(GenerationId(1), |p| p.generation.next());
    let manifest = GenerationManifest {
        generation: id,
        cluster_id: info.cluster_id,
        start_revision: info.revision,
        started_ms: now_ms(),
        reason,
        previous,
        detail,
    };
    let key = layout::generation_manifest_key(id);
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    archive
        .put_once(&key, Bytes::from(json))
        .await
        .with_context(|| format!("write {key}"))?;
    catalog
        .lock()
        .expect("catalog lock")
        .put_generation(&manifest)?;
    if let Some(p) = previous {
        tracing::warn!(
            generation = %id,
            gap_after = p.last_revision,
            resumes_at = info.revision,
            reason = ?reason,
            detail = %manifest.detail,
            "started a new generation: revisions between the generations are not archived"
        );
    } else {
        tracing::info!(generation = %id, start_revision = info.revision, "started the first generation");
    }
    Ok(manifest)
}

async fn connect_and_probe(config: &Config) -> anyhow::Result<(Client, ClusterInfo)> {
    let mut client = etcd::connect(config).await?;
    let info = etcd::cluster_info(&mut client).await?;
    Ok((client, info))
}

/// Runs the archiver until `shutdown` fires, then seals and uploads the open
/// segment within `config.shutdown_timeout`.
///
/// # Errors
/// Unusable configuration or archive; anything transient is retried.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(opened) = open(&config, &shutdown).await? else {
        return Ok(());
    };
    let Opened {
        archive, catalog, ..
    } = &opened;
    let (spool, leftovers) = Spool::open(&config.data_dir, config.spool_max_bytes)?;
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
    let abort_uploads = CancellationToken::new();
    let uploader = tokio::spawn(uploader::run_uploader(
        archive.clone(),
        spool.clone(),
        catalog.clone(),
        rx,
        abort_uploads.clone(),
    ));
    let (sealed, sealed_rx) = tokio::sync::mpsc::unbounded_channel();
    let spooler = tokio::spawn(uploader::run_spooler(
        spool.clone(),
        catalog.clone(),
        sealed_rx,
        uploads,
        abort_uploads.clone(),
    ));
    // The head is read from the store, so the spool must be empty first.
    while spool.bytes() > 0 {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let sink = Sink {
        spool: spool.clone(),
        sealed,
    };
    let policy = SealPolicy {
        max_age: config.segment_max_age,
        max_bytes: config.segment_max_bytes,
        idle_interval: config.idle_seal_interval,
    };
    let head = retry(
        "read the archive's newest generation",
        &shutdown,
        store_retryable,
        || head::load(archive, catalog),
    )
    .await?;
    let mut state = head.flatten().map(|h: ChainHead| {
        let has_snapshot = !h.snapshots.is_empty();
        let writer = SegmentWriter::new(
            h.generation(),
            h.last_revision,
            h.last_record,
            policy,
            sink.clone(),
        );
        (h.manifest, writer, has_snapshot, h.fingerprint)
    });
    let mut schedule: Option<SnapshotSchedule> = None;
    let mut forced: Option<(StartReason, String)> = None;
    let mut fatal: Option<anyhow::Error> = None;
    let mut delay = RETRY_MIN;
    while !shutdown.is_cancelled() {
        let connected = tokio::select! {
            () = shutdown.cancelled() => break,
            r = connect_and_probe(&config) => r,
        };
        let (mut client, info) = match connected {
            Ok(c) => c,
            Err(e) if etcd::is_denied(&e) => {
                fatal = Some(e.context("etcd refused the archiver's credentials"));
                break;
            }
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "etcd unreachable; retrying");
                if !pause(&mut delay, &shutdown).await {
                    break;
                }
                continue;
            }
        };
        let verdict = if let Some(reason) = forced.take() {
            Some(reason)
        } else {
            let resume = state.as_ref().map(|(m, w, _, f)| Resume {
                manifest: m,
                last_revision: w.last_revision(),
                last_record: w.last_record(),
                fingerprint: schedule
                    .as_ref()
                    .and_then(SnapshotSchedule::fingerprint)
                    .or(*f),
            });
            match must_start_generation(&mut client, info, resume).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "lineage check failed; retrying");
                    if !pause(&mut delay, &shutdown).await {
                        break;
                    }
                    continue;
                }
            }
        };
        if let Some((reason, detail)) = verdict {
            let previous = match &mut state {
                Some((m, w, _, _)) => {
                    w.seal()?;
                    Some(GapStart {
                        generation: m.generation,
                        last_revision: w.last_revision(),
                    })
                }
                None => None,
            };
            let manifest =
                match start_generation(archive, catalog, previous, info, reason, detail).await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            retry_in = ?delay,
                            "cannot start a new generation; retrying"
                        );
                        if !pause(&mut delay, &shutdown).await {
                            break;
                        }
                        continue;
                    }
                };
            let writer = SegmentWriter::new(
                manifest.generation,
                info.revision,
                None,
                policy,
                sink.clone(),
            );
            state = Some((manifest, writer, false, None));
            schedule = None;
        }
        let (manifest, writer, has_snapshot, fingerprint) =
            state.as_mut().expect("a generation exists here");
        let schedule = schedule.get_or_insert_with(|| {
            SnapshotSchedule::new(
                archive.clone(),
                catalog.clone(),
                config.data_dir.clone(),
                manifest.generation,
                manifest.start_revision,
                config.snapshot_interval,
                *has_snapshot,
                *fingerprint,
            )
        });
        schedule.start_if_due(&client);
        match watch::run(
            &mut client,
            writer,
            &spool,
            schedule,
            info.revision,
            &shutdown,
        )
        .await
        {
            SessionEnd::Shutdown => break,
            SessionEnd::Compacted { compact_revision } => {
                tracing::warn!(
                    compact_revision,
                    archived_through = writer.last_revision(),
                    "etcd compacted past the archive's resume point"
                );
                forced = Some((
                    StartReason::Compacted,
                    format!(
                        "etcd compacted to revision {compact_revision} past the resume point {}",
                        writer.last_revision() + 1
                    ),
                ));
            }
            SessionEnd::Diverged(detail) => {
                tracing::error!(%detail, "the watch does not continue the archived history");
                forced = Some((StartReason::LineageBroken, detail));
            }
            SessionEnd::Disconnected(e) => {
                tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "watch interrupted; reconnecting");
                if !pause(&mut delay, &shutdown).await {
                    break;
                }
                continue;
            }
        }
        delay = RETRY_MIN;
    }

    // Shutdown: seal what is open, then give the uploader a bounded time.
    drop(schedule);
    if let Some((_, mut writer, _, _)) = state {
        if let Err(e) = writer.seal() {
            tracing::error!(error = format!("{e:#}"), "cannot seal the open segment");
        }
    }
    drop(sink);
    let drained = async {
        spooler.await.ok();
        uploader.await.ok();
    };
    if tokio::time::timeout(config.shutdown_timeout, drained)
        .await
        .is_ok()
    {
        tracing::info!("all sealed segments uploaded; exiting");
    } else {
        abort_uploads.cancel();
        tracing::warn!(
            spooled_bytes = spool.bytes(),
            "store did not take every segment in time; they stay in the spool and are uploaded on the next start"
        );
    }
    fatal.map_or(Ok(()), Err)
}

/// Takes one full snapshot into the archive now (starting a generation if
/// the archive has none or the cluster's history differs), and returns its
/// revision.
///
/// # Errors
/// Unusable configuration, archive, etcd or store.
pub async fn snapshot_once(config: Config) -> anyhow::Result<Revision> {
    let never = CancellationToken::new();
    let opened = open(&config, &never).await?.expect("not cancelled");
    let head = head::load(&opened.archive, &opened.catalog).await?;
    let (mut client, info) = connect_and_probe(&config).await?;
    let resume = head.as_ref().map(|h| Resume {
        manifest: &h.manifest,
        last_revision: h.last_revision,
        last_record: h.last_record.as_ref(),
        fingerprint: h.fingerprint,
    });
    let manifest = match must_start_generation(&mut client, info, resume).await? {
        None => head.expect("resuming needs a head").manifest,
        Some((reason, detail)) => {
            let previous = head.map(|h| GapStart {
                generation: h.generation(),
                last_revision: h.last_revision,
            });
            start_generation(
                &opened.archive,
                &opened.catalog,
                previous,
                info,
                reason,
                detail,
            )
            .await?
        }
    };
    snapshot::take(
        &mut client,
        &opened.archive,
        &opened.catalog,
        &config.data_dir,
        manifest.generation,
        manifest.start_revision,
    )
    .await
    .map(|fingerprint| fingerprint.revision)
}
