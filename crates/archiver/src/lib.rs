//! etcd-archiver: keeps a complete, restorable history of an etcd cluster in
//! object storage.
//!
//! - [`config`]: flags, environment and TOML file into one validated [`config::Config`].
//! - [`etcd`]: connecting, cluster identity, lineage checks.
//! - [`head`]: where the archive's newest chain ends (read from the store).
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
use etcdpitr_common::manifest::{ArchiveManifest, GapStart, GenerationManifest, StartReason};
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
    // Owner-only, whatever the umask: the spool, catalog and snapshot
    // scratch hold the cluster's data.
    etcdpitr_common::store::create_private_dir_all(&config.data_dir)
        .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
    let lock_path = config.data_dir.join("lock");
    let lock = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false),
        etcdpitr_common::store::PRIVATE_FILE_MODE,
    )
    .open(&lock_path)
    .with_context(|| format!("open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "data directory {} is in use by another etcd-archiver",
            config.data_dir.display()
        );
    }
    snapshot::clean_scratch(&config.data_dir);
    // Uploads into a file:// archive killed midway leave hidden staging
    // files (see `snapshot::remove_abandoned_uploads` for which are removed).
    if archive.is_local() {
        match archive.list_root_dirs().await {
            Ok(dirs) => {
                for id in dirs.iter().filter_map(|d| GenerationId::parse_dir(d)) {
                    snapshot::remove_abandoned_uploads(&archive, id).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the archive for interrupted uploads"),
        }
    }
    let catalog = Catalog::open(&config.data_dir.join("catalog.db")).context("open catalog")?;
    Ok(Some(Opened {
        archive,
        catalog: Arc::new(Mutex::new(catalog)),
        _lock: lock,
    }))
}

/// Decides whether the newest generation can be continued on this cluster.
/// Returns the reason for a new generation, or `None` to resume.
async fn must_start_generation(
    client: &mut Client,
    info: ClusterInfo,
    manifest: Option<&GenerationManifest>,
    last_revision: Revision,
    last_record: Option<&etcdpitr_common::segment::RevisionRecord>,
) -> anyhow::Result<Option<(StartReason, String)>> {
    let Some(manifest) = manifest else {
        return Ok(Some((StartReason::NewArchive, "first generation".into())));
    };
    if manifest.cluster_id != info.cluster_id {
        return Ok(Some((
            StartReason::ClusterChanged,
            format!(
                "cluster ID changed from {:x} to {:x}",
                manifest.cluster_id, info.cluster_id
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
    if let Some(record) = last_record {
        match etcd::check_lineage(client, record).await? {
            Lineage::Same => {}
            Lineage::Diverged(detail) => return Ok(Some((StartReason::LineageBroken, detail))),
            Lineage::Compacted => {
                return Ok(Some((
                    StartReason::Compacted,
                    format!("revision {last_revision} was compacted before it could be re-checked"),
                )))
            }
        }
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
    // A permanent store failure of the uploader or a snapshot stops the
    // archiver as a signal would, and is returned.
    let background = uploader::Fatal::new(&shutdown);
    let shutdown = background.token();
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
        background.clone(),
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
        (h.manifest, writer, has_snapshot)
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
            let (manifest, last, record) = match &state {
                Some((m, w, _)) => (Some(m), w.last_revision(), w.last_record()),
                None => (None, 0, None),
            };
            match must_start_generation(&mut client, info, manifest, last, record).await {
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
                Some((m, w, _)) => {
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
            state = Some((manifest, writer, false));
            schedule = None;
        }
        let (manifest, writer, has_snapshot) = state.as_mut().expect("a generation exists here");
        let schedule = schedule.get_or_insert_with(|| {
            SnapshotSchedule::new(
                archive.clone(),
                catalog.clone(),
                config.data_dir.clone(),
                manifest.generation,
                manifest.start_revision,
                config.snapshot_interval,
                *has_snapshot,
                background.clone(),
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
    if let Some((_, mut writer, _)) = state {
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
        if !background.failed() {
            tracing::info!("all sealed segments uploaded; exiting");
        }
    } else {
        abort_uploads.cancel();
        tracing::warn!(
            spooled_bytes = spool.bytes(),
            "store did not take every segment in time; they stay in the spool and are uploaded on the next start"
        );
    }
    fatal.or_else(|| background.take()).map_or(Ok(()), Err)
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
    let (manifest, last, record) = match &head {
        Some(h) => (Some(&h.manifest), h.last_revision, h.last_record.as_ref()),
        None => (None, 0, None),
    };
    let manifest = match must_start_generation(&mut client, info, manifest, last, record).await? {
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
}
