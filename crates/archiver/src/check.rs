//! `etcd-archiver check`: a restore drill a CronJob can run. It writes a
//! canary key into the source cluster, waits until the archive holds that
//! very write (its revision, key and value, read back from the sealed
//! segment), and reports the measured recovery point: how much history a
//! loss of the source at the moment of the write would have cost.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use etcdpitr_common::layout::{self, GenerationId, GenerationObject, SegmentName};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::manifest::ArchiveManifest;
use etcdpitr_common::segment::{self, EventKind, Record};
use etcdpitr_common::store::Archive;
use etcdpitr_common::{now_ms, Revision};

use crate::config::{parse_duration, InvalidConfig, Settings};

/// Default key prefix of the canary writes.
pub const DEFAULT_CANARY_PREFIX: &str = "/etcd-pitr/canary/";
/// The canary key's name under the prefix.
pub const CANARY_NAME: &str = "check";
/// How often the newest generation's segments are listed while waiting.
const POLL: Duration = Duration::from_millis(250);
/// How often the whole archive is listed while the canary's segment waits
/// for a base snapshot to make it restorable.
const RESTORABLE_POLL: Duration = Duration::from_secs(1);

/// `etcd-archiver check` flags: the archiver's settings (for the
/// connection, the archive and its keys) plus the bound.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The archiver's settings (only the connection, archive and keys matter).
    #[command(flatten)]
    pub settings: Settings,
    /// Fail unless the archive holds the canary write within this time.
    #[arg(long, env = "ETCD_ARCHIVER_MAX_RPO", default_value = "1m")]
    pub max_rpo: String,
    /// Key prefix of the canary: each check overwrites the key `check`
    /// under it (write access to it in the source cluster is needed).
    #[arg(long, env = "ETCD_ARCHIVER_CANARY_PREFIX", default_value = DEFAULT_CANARY_PREFIX)]
    pub canary_prefix: String,
}

/// The check's result.
#[derive(Debug)]
pub struct Checked {
    /// The canary key.
    pub key: String,
    /// Its revision in the source cluster.
    pub revision: Revision,
    /// The object that holds it.
    pub object: String,
    /// From the write's reply until the archive held it.
    pub recovery_point: Duration,
    /// The bound it was checked against.
    pub bound: Duration,
}

impl std::fmt::Display for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "recovery point {:.3} s (bound {}): canary {} written at revision {} is archived in {}",
            self.recovery_point.as_secs_f64(),
            humantime::format_duration(self.bound),
            self.key,
            self.revision,
            self.object
        )
    }
}

/// The archive did not hold the canary within `--max-rpo` (exit 3).
#[derive(Debug, thiserror::Error)]
#[error(
    "the archive did not hold the canary {key} (revision {revision}) within --max-rpo {}: {state}",
    humantime::format_duration(*bound)
)]
pub struct RpoExceeded {
    /// The canary key.
    pub key: String,
    /// Its revision.
    pub revision: Revision,
    /// The bound.
    pub bound: Duration,
    /// What the archive held when the time was up.
    pub state: String,
}

/// Runs the check.
///
/// # Errors
/// [`InvalidConfig`] for bad settings, [`RpoExceeded`] when the bound
/// passes first; etcd or store failures; an archive whose revision is not
/// the canary write (another cluster's archive).
pub async fn command(args: CheckArgs) -> anyhow::Result<Checked> {
    let config = args.settings.resolve().context(InvalidConfig)?;
    let bound = parse_duration("max-rpo", &args.max_rpo).context(InvalidConfig)?;
    if args.canary_prefix.is_empty() {
        return Err(anyhow::anyhow!("--canary-prefix: must not be empty").context(InvalidConfig));
    }
    let archive = Archive::open(&config.archive)?.with_keys(config.keys.clone());
    let manifest = archive
        .get_opt(layout::MANIFEST_NAME)
        .await?
        .with_context(|| format!("no archive at {}: nothing to check", archive.url()))?;
    ArchiveManifest::parse(layout::MANIFEST_NAME, &manifest)?.check_keys(&config.keys)?;
    // Listed before the write, so that afterwards only new names are.
    let mut segments = Segments::start(&archive).await?;

    // One key whatever the host (a CronJob's pods each have a new name):
    // the write is told apart by its revision and value.
    let key = format!("{}{CANARY_NAME}", args.canary_prefix);
    let holder = crate::holder_identity();
    let value = format!("etcd-archiver check by {holder} at {}", now_ms());
    let mut client = crate::etcd::connect(&config).await?;
    let put = client
        .put(key.as_str(), value.as_str(), None)
        .await
        .with_context(|| format!("write the canary {key}"))?;
    let written = Instant::now();
    let revision = put
        .header()
        .context("etcd reply without header")?
        .revision();
    tracing::info!(%key, revision, "canary written; waiting for the archive to hold it");

    loop {
        if let Some((generation, object, seen)) = segments
            .find(&archive, revision, key.as_bytes(), value.as_bytes())
            .await?
        {
            let restorable =
                restorable_since(&archive, generation, revision, seen, written + bound).await?;
            let state = match restorable.map(|at| at.duration_since(written)) {
                Some(recovery_point) if recovery_point <= bound => {
                    return Ok(Checked {
                        key,
                        revision,
                        object,
                        recovery_point,
                        bound,
                    })
                }
                Some(took) => format!(
                    "{object} holds it, restorable {:.3} s after the write",
                    took.as_secs_f64()
                ),
                None => format!(
                    "{object} holds it, but no base snapshot of generation {} serves revision {revision} yet",
                    generation.0
                ),
            };
            return Err(RpoExceeded {
                key,
                revision,
                bound,
                state,
            }
            .into());
        }
        if written.elapsed() > bound {
            return Err(RpoExceeded {
                key,
                revision,
                bound,
                state: segments.state(),
            }
            .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// When revision `revision` of `generation`, whose segment was listed at
/// `seen`, was restorable (the generation part of the archive's history,
/// not a deposed writer's, and a base snapshot serving the revision):
/// `seen` if the first listing of the whole archive shows it so, else the
/// start of the listing that does, listed every second until `deadline`
/// (then `None`).
///
/// # Errors
/// The generation is a deposed writer's; store failures.
async fn restorable_since(
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
    seen: Instant,
    deadline: Instant,
) -> anyhow::Result<Option<Instant>> {
    let mut listed = seen;
    loop {
        let listing = ArchiveListing::load(archive).await?;
        if let Some(g) = listing
            .generations
            .iter()
            .find(|g| g.id == Some(generation))
        {
            if g.chain().base_for(revision).is_some() {
                return Ok(Some(listed));
            }
        } else if listing.void.iter().any(|g| g.id == Some(generation)) {
            anyhow::bail!(
                "generation {} holds the canary but was started by a deposed writer: it is not part of the archive's history",
                generation.0
            );
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(RESTORABLE_POLL).await;
        listed = Instant::now();
    }
}

/// The newest generation's segments seen so far.
struct Segments {
    generation: Option<GenerationId>,
    names: Vec<SegmentName>,
}

impl Segments {
    /// The newest generation of the archive's history (one a deposed writer
    /// started is left out) and its segments.
    ///
    /// # Errors
    /// Store failures, unreadable manifests.
    async fn start(archive: &Archive) -> anyhow::Result<Self> {
        let listing = ArchiveListing::load(archive).await?;
        Ok(match listing.generations.last() {
            Some(g) => Self {
                generation: g.id,
                names: g.segments.clone(),
            },
            None => Self {
                generation: None,
                names: Vec::new(),
            },
        })
    }

    /// Lists what is new in the archive's newest generation and returns the
    /// object holding the canary write at `revision`, once there is one,
    /// with when the listing showed it.
    async fn find(
        &mut self,
        archive: &Archive,
        revision: Revision,
        key: &[u8],
        value: &[u8],
    ) -> anyhow::Result<Option<(GenerationId, String, Instant)>> {
        let newest = archive
            .list_root_dirs()
            .await?
            .iter()
            .filter_map(|d| GenerationId::parse_dir(d))
            .max();
        let Some(generation) = newest.max(self.generation) else {
            return Ok(None);
        };
        if self.generation != Some(generation) {
            *self = Self {
                generation: Some(generation),
                names: Vec::new(),
            };
        }
        let offset = self
            .names
            .last()
            .map(|n| layout::segment_key(generation, n));
        let dir = format!("{}/segments", generation.dir_name());
        for object in archive.list(&dir, offset.as_deref()).await? {
            if let Some((g, GenerationObject::Segment(name))) = layout::classify(&object) {
                if g == generation {
                    self.names.push(name);
                }
            }
        }
        let listed = Instant::now();
        let Some(name) = self
            .names
            .iter()
            .find(|n| n.first <= revision && revision <= n.last)
        else {
            return Ok(None);
        };
        let object = layout::segment_key(generation, name);
        let bytes = archive.get(&object).await?;
        let (_, records) = segment::decode_all(&object, &bytes)?;
        let holds = records.iter().any(|r| match r {
            Record::Revision(r) if r.revision == revision => r
                .events
                .iter()
                .any(|e| e.kind == EventKind::Put && e.key == key && e.value == value),
            _ => false,
        });
        anyhow::ensure!(
            holds,
            "{object} holds revision {revision}, but not the canary write: this archive is not this cluster's history (another cluster, or a restored one)"
        );
        Ok(Some((generation, object, listed)))
    }

    /// What the archive held, for the error message.
    fn state(&self) -> String {
        match (self.generation, self.names.last()) {
            (None, _) => "the archive has no generation yet".to_owned(),
            (Some(g), None) => format!("generation {} has no segment yet", g.dir_name()),
            (Some(g), Some(n)) => format!(
                "generation {} is archived through revision {}, current at {}",
                g.dir_name(),
                n.last,
                humantime::format_rfc3339_millis(
                    std::time::UNIX_EPOCH
                        + Duration::from_millis(u64::try_from(n.end_ms).unwrap_or(0))
                )
            ),
        }
    }
}
