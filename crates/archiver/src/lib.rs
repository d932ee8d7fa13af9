//! etcd-archiver: keeps a complete, restorable history of an etcd cluster in
//! object storage.
//!
//! - [`check`]: the `check` command's canary write and recovery-point measurement.
//! - [`config`]: flags, environment and TOML file into one validated [`config::Config`].
//! - [`election`] and [`term`]: which of several archivers writes, and the
//!   archive's record of each leadership.
//! - [`leader`]: one writer term (upload pipeline, watch sessions).
//! - [`generation`]: continue the newest generation or start a new one.
//! - [`etcd`]: connecting, cluster identity, lineage checks.
//! - [`head`]: where the archive's newest chain ends (read from the store).
//! - [`lineage`]: HashKV fingerprints that prove the source's history.
//! - [`watch`]: one watch session, assembling complete revisions.
//! - [`clock`]: the anchored clock of observed times; wall-clock steps.
//! - [`segment_writer`]: the open segment; sealing by size and age.
//! - [`uploader`]: the durable spool and the in-order, write-once uploader.
//! - [`snapshot`] and [`snapshot_schedule`]: full snapshots, streamed.
//! - [`observe`]: metrics, `/healthz`, `/readyz` and the heartbeat line.
//!
//! Invariants: within a generation, revisions are archived exactly once and
//! without holes; a generation is never continued on a history that differs
//! from the archived one; nothing sealed is dropped (it waits in the spool).

pub mod check;
pub mod clock;
pub mod config;
pub mod election;
pub mod etcd;
pub mod generation;
pub mod head;
pub mod leader;
pub mod lineage;
pub mod observe;
pub mod prune;
mod retry;
pub mod segment_writer;
pub mod snapshot;
pub mod snapshot_schedule;
pub mod term;
pub mod tip;
pub mod uploader;
pub mod watch;

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use bytes::Bytes;
use etcdpitr_common::catalog::Catalog;
use etcdpitr_common::errors;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::manifest::{ArchiveManifest, GapStart};
use etcdpitr_common::store::{Archive, StoreError};
use etcdpitr_common::{now_ms, Revision};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, InvalidConfig};
use crate::election::ElectionConfig;
use crate::generation::{NewGeneration, Resume};
use crate::leader::{Term, TermEnd};
use crate::observe::Observer;
use crate::retry::{pause, retry, RETRY_MIN};
use crate::tip::{SharedTip, Tip};

/// Store errors worth retrying (network, throttling), as opposed to bad
/// credentials, unknown formats or corrupted objects.
pub(crate) fn store_retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<etcdpitr_common::store::StoreError>()
            .is_some_and(etcdpitr_common::store::StoreError::is_retryable)
    })
}

/// The archive, the catalog and the lock on the data directory, and the
/// process's identity and anchored clock.
pub struct Opened {
    archive: Archive,
    catalog: Arc<Mutex<Catalog>>,
    _lock: std::fs::File,
    /// Host name and process id, as recorded in terms and clock epochs.
    holder: String,
    /// Observed times come from this clock, anchored once at start.
    clock: clock::AnchoredClock,
    /// Where facts about the archiver are published.
    observer: Observer,
}

/// Opens the archive (creating its manifest if new, refusing unknown
/// versions, and keys that do not suit it, before anything else is
/// written) and then the data directory.
async fn open(
    config: &Config,
    clock: clock::AnchoredClock,
    observer: Observer,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Opened>> {
    let archive = Archive::open(&config.archive)?.with_keys(config.keys.clone());
    let check = |bytes: &[u8]| -> anyhow::Result<()> {
        ArchiveManifest::parse(layout::MANIFEST_NAME, bytes)?.check_keys(&config.keys)?;
        Ok(())
    };
    let checked = retry(
        "read the archive manifest",
        shutdown,
        store_retryable,
        || async {
            if let Some(bytes) = archive.get_opt(layout::MANIFEST_NAME).await? {
                check(&bytes)?;
            } else {
                let m = ArchiveManifest::new(now_ms(), &config.keys);
                let json = serde_json::to_vec_pretty(&m).expect("manifest serializes");
                match archive
                    .put_once(layout::MANIFEST_NAME, Bytes::from(json))
                    .await
                {
                    Ok(()) => tracing::info!(
                        archive = archive.url(),
                        encryption_key_id = config.keys.sealing().map(|k| k.id().to_string()),
                        "created a new archive"
                    ),
                    // Another archiver created it a moment ago: check theirs.
                    Err(StoreError::Conflict(_)) => {
                        check(&archive.get(layout::MANIFEST_NAME).await?)?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        },
    )
    .await?;
    if let Some(key) = config.keys.sealing() {
        tracing::info!(key_id = %key.id(), "new objects are encrypted with this key");
    }
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
        holder: holder_identity(),
        clock,
        observer,
    }))
}

/// Who this archiver is, in the election and the archive's term records.
fn holder_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}/{}", std::process::id())
}

/// Waits for leadership, then claims the archive's next term.
async fn elect(
    config: &Config,
    election: &ElectionConfig,
    opened: &Opened,
    holder: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Term>> {
    let mut client = etcd::connect(config).await?;
    tracing::info!(election = %election.name, %holder, "standing by for leadership");
    let campaign = election::campaign(&client, election, holder, &opened.observer, shutdown);
    let Some(leadership) = campaign.await? else {
        return Ok(None);
    };
    let record = match term::claim(&opened.archive, holder, leadership.election_revision).await {
        Ok(r) => r,
        Err(e) => {
            leadership.resign(&mut client).await;
            return Err(e);
        }
    };
    tracing::info!(
        term = record.term,
        election_revision = leadership.election_revision,
        "elected: this archiver writes the archive"
    );
    Ok(Some(Term {
        leadership,
        record,
        client,
    }))
}

/// Runs the archiver until `shutdown` fires. With an election (the
/// default), it stands by until elected, writes while it leads, and stands
/// by again when deposed; on shutdown it seals and uploads the open segment
/// within `config.shutdown_timeout` and resigns.
///
/// # Errors
/// Unusable configuration, archive or credentials; anything transient is
/// retried.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // A permanent store failure of the uploader or a snapshot stops the
    // archiver as a signal would, and is returned.
    let background = uploader::Fatal::new(&shutdown);
    let shutdown = background.token();
    let clock = clock::AnchoredClock::system();
    let (observer, mut registry) = Observer::new(clock.clone(), config.ready_max_lag);
    if let Some(addr) = config.metrics_addr {
        let fatal = background.clone();
        registry.health_check(move || match fatal.reason() {
            Some(e) => Err(format!("stopping after a permanent failure: {e}")),
            None => Ok(()),
        });
        let bound = etcdpitr_common::metrics::serve(addr, Arc::new(registry))
            .await
            .context(InvalidConfig)?;
        tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    }
    let Some(opened) = open(&config, clock, observer, &shutdown).await? else {
        return Ok(());
    };
    let holder = opened.holder.clone();
    let mut delay = RETRY_MIN;
    while !shutdown.is_cancelled() {
        let term = match &config.election {
            None => None,
            Some(election) => match elect(&config, election, &opened, &holder, &shutdown).await {
                Ok(Some(t)) => Some(t),
                Ok(None) => break,
                Err(e) if etcd::is_denied(&e) => {
                    return Err(e.context("etcd refused the archiver's credentials"))
                }
                Err(e) => {
                    opened.observer.standby(Err(errors::one_line(&e)));
                    tracing::warn!(error = errors::one_line(&e), hint = errors::hint(&e).map(tracing::field::display), retry_in = ?delay, "cannot campaign for leadership; retrying");
                    if !pause(&mut delay, &shutdown).await {
                        break;
                    }
                    continue;
                }
            },
        };
        opened.observer.writing();
        let end = leader::lead(&config, &opened, term.as_ref(), &shutdown, &background).await;
        // Also when deposed: a lease that is still alive would only delay
        // this archiver's next campaign behind its own stale key.
        if let Some(Term {
            leadership,
            mut client,
            ..
        }) = term
        {
            leadership.resign(&mut client).await;
        }
        match end? {
            TermEnd::Shutdown => break,
            TermEnd::Deposed if config.election.is_none() => {
                unreachable!("deposed without an election")
            }
            TermEnd::Deposed => {
                opened
                    .observer
                    .standby(Err("no longer the writer; campaigning again".into()));
                delay = RETRY_MIN;
            }
        }
    }
    if let Some(e) = background.take() {
        return Err(e);
    }
    tracing::info!("exiting");
    Ok(())
}

/// Takes one full snapshot into the archive now (starting a generation if
/// the archive has none or the cluster's history differs), and returns its
/// revision. It takes no part in the election: a generation it would start
/// while an elected archiver starts one too is refused as taken.
///
/// # Errors
/// Unusable configuration, archive, etcd or store.
pub async fn snapshot_once(config: Config) -> anyhow::Result<Revision> {
    let never = CancellationToken::new();
    let clock = clock::AnchoredClock::system();
    // Nothing is served: the observer only keeps what would be published.
    let (observer, _) = Observer::new(clock.clone(), config.ready_max_lag);
    let opened = open(&config, clock, observer, &never)
        .await?
        .expect("not cancelled");
    let head = head::load(&opened.archive, &opened.catalog).await?;
    let mut client = etcd::connect(&config).await?;
    let info = etcd::cluster_info(&mut client).await?;
    let resume = head.as_ref().map(|h| Resume {
        manifest: &h.manifest,
        last_revision: h.last_revision,
        last_record: h.last_record.as_ref(),
        fingerprint: h.fingerprint,
    });
    let (manifest, tip) = match generation::must_start_generation(&mut client, info, resume).await?
    {
        None => {
            let h = head.expect("resuming needs a head");
            (h.manifest, h.tip)
        }
        Some((reason, detail)) => {
            let previous_digest = head.as_ref().map(|h| h.tip.segment.1);
            let new = NewGeneration {
                id: head.as_ref().map_or(GenerationId(1), |h| h.next_generation),
                previous: head.map(|h| GapStart {
                    generation: h.generation(),
                    last_revision: h.last_revision,
                }),
                term: 0,
                started_ms: now_ms(),
                reason,
                detail,
                previous_digest,
            };
            let (manifest, anchor) =
                generation::start_generation(&opened.archive, &opened.catalog, new, info).await?;
            let tip = Tip::start(manifest.generation, manifest.start_revision, anchor);
            (manifest, tip)
        }
    };
    snapshot::take(
        &mut client,
        &opened.archive,
        &opened.catalog,
        &config.data_dir,
        manifest.generation,
        manifest.start_revision,
        &SharedTip::new(tip),
        etcdpitr_common::progress::Mode::Auto,
    )
    .await
    .map(|taken| taken.done.revision)
}
