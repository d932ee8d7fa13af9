//! `etcd-restorer follow`: keeps a destination etcd cluster identical to
//! the archive's source, revision for revision.
//!
//! - [`proof`]: before the first write, the destination's keys at its
//!   revision must be the archive's.
//! - [`feed`]: the archive's revisions after that, as segments arrive.
//! - [`apply`]: each revision as one guarded transaction, several in flight.
//! - [`leases`]: leases granted with their ids and TTLs, kept alive, retired.

mod apply;
mod feed;
mod leases;
mod proof;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use etcdpitr_common::etcd::Connection;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::manifest::GenerationManifest;
use etcdpitr_common::metrics::{self, Kind, Registry};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;
use tokio::time::Instant;

use super::{list_archive, open};
use crate::plan;
use crate::UsageError;
use apply::{cluster_and_revision, current_revision, Applied, Applier};
use feed::Item;
use leases::KeepAlive;

/// The destination is not (or no longer) the archive's history; nothing
/// more was written to it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Diverged(pub String);

/// The archive cannot take follow any further: a gap, or its history
/// continues in another generation.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ArchiveEnds(pub String);

/// When follow stops on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// Never (until killed).
    Forever,
    /// Once the destination holds this revision.
    Revision(Revision),
    /// Once the destination holds the archive's last revision and the
    /// archive vouches that the source is still there (it quiesced).
    CaughtUp,
}

/// `follow`'s options.
#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// When to stop.
    pub until: Until,
    /// Transactions in flight at once.
    pub max_in_flight: usize,
    /// The destination's `--max-txn-ops`.
    pub max_txn_ops: usize,
    /// How often to look for new segments once caught up.
    pub poll_interval: Duration,
    /// How often to log progress.
    pub log_interval: Duration,
    /// Where to serve Prometheus metrics.
    pub metrics_addr: Option<SocketAddr>,
}

struct Metrics {
    applied: Arc<metrics::Metric>,
    archived: Arc<metrics::Metric>,
    lag: Arc<metrics::Metric>,
    total: Arc<metrics::Metric>,
}

impl Metrics {
    fn new() -> (Registry, Self) {
        let mut r = Registry::default();
        let m = Self {
            applied: r.register(
                "etcd_pitr_follow_applied_revision",
                "Newest archived revision the destination holds.",
                Kind::Gauge,
            ),
            archived: r.register(
                "etcd_pitr_follow_archive_revision",
                "Newest revision seen in the archive.",
                Kind::Gauge,
            ),
            lag: r.register(
                "etcd_pitr_follow_lag_seconds",
                "Seconds since the source wrote the oldest archived revision the destination does not hold yet (0 when it holds them all).",
                Kind::Gauge,
            ),
            total: r.register(
                "etcd_pitr_follow_applied_revisions_total",
                "Revisions applied to the destination by this process.",
                Kind::Counter,
            ),
        };
        (r, m)
    }
}

/// `etcd-restorer follow`.
///
/// # Errors
/// [`Diverged`] (the destination is not the archive's history),
/// [`ArchiveEnds`] or a [`plan::PlanError`] (the archive cannot serve the
/// destination's revision or what follows), store and etcd failures.
pub async fn follow(
    url: &str,
    key_files: &[PathBuf],
    destination: &Connection,
    options: &FollowOptions,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (registry, metrics) = Metrics::new();
    if let Some(addr) = options.metrics_addr {
        let bound = metrics::serve(addr, Arc::new(registry))
            .await
            .map_err(|e| UsageError(format!("{e:#}")))?;
        tracing::info!(%bound, "serving metrics");
    }
    let archive = open(url, key_files)?;
    let mut client = destination.connect().await?;
    let (cluster_id, _) = cluster_and_revision(&mut client).await?;
    refuse_source(&archive, cluster_id).await?;
    // Then, before anything slower, keep every lease the destination has
    // alive: a follow that was killed renews them no more, and one that
    // expires deletes its keys (a revision the source never had).
    let keep_alive = KeepAlive::start(&client);
    let existing: Vec<i64> = client
        .leases()
        .await
        .context("list the destination's leases")?
        .leases()
        .iter()
        .map(etcd_client::LeaseStatus::id)
        .collect();
    for &id in existing.iter().filter(|&&id| id != leases::HOLD_LEASE) {
        keep_alive.keep(id);
    }
    leases::hold(&mut client, &keep_alive).await?;
    let result = follow_held(
        &archive,
        url,
        &mut client,
        keep_alive,
        &existing,
        cluster_id,
        options,
        &metrics,
        out,
    )
    .await;
    leases::release(&mut client).await;
    result
}

/// `follow` once the destination is held.
#[allow(clippy::too_many_arguments)]
async fn follow_held(
    archive: &Archive,
    url: &str,
    client: &mut etcd_client::Client,
    keep_alive: KeepAlive,
    existing: &[i64],
    cluster_id: u64,
    options: &FollowOptions,
    metrics: &Metrics,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let listing = list_archive(archive, url).await?;
    let start = current_revision(client).await?;
    let until_revision = match options.until {
        Until::Revision(r) if r < start => bail!(UsageError(format!(
            "--until-revision {r}: the destination is already at revision {start}"
        ))),
        Until::Revision(r) => Some(r),
        _ => None,
    };
    let span = plan::plan_span(&listing, Some(start), None, None).map_err(|e| {
        if let plan::PlanError::BeyondLast { ranges, .. } = &e {
            return anyhow::Error::from(Diverged(format!(
                "the destination is at revision {start}, ahead of the archive ({}): it was written to after seeding, or seeded from elsewhere; nothing was written",
                etcdpitr_common::chain::describe(ranges)
            )));
        }
        anyhow::Error::from(e).context(format!(
            "the destination is at revision {start}, which the archive cannot serve"
        ))
    })?;
    let generation = span.from.generation;
    let g = listing
        .generations
        .iter()
        .find(|g| g.generation() == generation)
        .expect("the plan's generation is listed")
        .clone();
    let chain = g.chain();
    if let Some(gap) = chain
        .gaps()
        .into_iter()
        .chain(chain.pruned_gaps())
        .find(|gap| gap.after >= start && until_revision.is_none_or(|u| gap.after < u))
    {
        bail!(ArchiveEnds(format!(
            "generation {generation} has a gap after revision {}: {gap}; follow would have to stop there, so it starts nothing (seed the destination from a revision after the gap)",
            gap.after
        )));
    }
    tracing::info!(
        revision = start,
        generation = %generation,
        "proving that the destination holds the archive's history at its revision"
    );
    let proven = proof::prove(archive, &span.from, client).await?;
    let used: std::collections::HashSet<i64> = proven.book.used().collect();
    for id in existing
        .iter()
        .filter(|&&id| !used.contains(&id) && id != leases::HOLD_LEASE)
    {
        keep_alive.drop_lease(*id);
    }
    let applied = Applied {
        revision: start,
        observed_ms: proven.last.as_ref().map_or(0, |r| r.observed_ms),
        confirmed_ms: etcdpitr_common::now_ms(),
    };
    let mut applier = Applier::new(
        client.clone(),
        options.max_in_flight,
        options.max_txn_ops,
        applied,
        proven.last.as_ref(),
        proven.book,
        keep_alive,
    );
    applier.keep_used_leases().await?;
    let strict = Arc::new(std::sync::atomic::AtomicBool::new(
        options.until == Until::CaughtUp,
    ));
    let mut feed = feed::start(
        archive.clone(),
        g,
        start,
        until_revision,
        options.poll_interval,
        strict.clone(),
    );
    let mut archived = start;
    // SIGUSR1 asks a running follow for the cutover: it then stops once
    // caught up, as --until-caught-up does (no restart, no second proof).
    let mut until = options.until;
    let mut cutover_signal =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
            .context("listen for SIGUSR1")?;
    let mut next_log = Instant::now() + options.log_interval;
    let mut logged = (Instant::now(), start);
    let mut next_retire = Instant::now();
    metrics.applied.set(start as f64);
    tracing::info!(revision = start, "following");
    let mut lag_ms = 0;
    loop {
        let item = tokio::select! {
            item = feed.recv() => item,
            _ = cutover_signal.recv() => {
                if until != Until::CaughtUp {
                    tracing::info!("cutover requested (SIGUSR1): stopping once caught up");
                    until = Until::CaughtUp;
                    strict.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                continue;
            }
        };
        match item {
            Some(Ok(Item::Lease(l))) => applier.lease_granted(l.id, l.ttl_secs),
            Some(Ok(Item::Archived(last))) => archived = archived.max(last),
            Some(Ok(Item::Revision(r))) => {
                // The destination lags the source by the age of the oldest
                // archived revision it does not hold yet.
                lag_ms = (etcdpitr_common::now_ms() - r.observed_ms).max(0);
                metrics.lag.set(lag_ms as f64 / 1000.0);
                applier.apply(&r).await?;
            }
            Some(Ok(Item::Idle { last, vouched_ms })) => {
                applier.drain().await?;
                if let Some(ahead) = applier.ahead().filter(|&a| a > last) {
                    bail!(Diverged(format!(
                        "the destination is at revision {ahead}, beyond the archive's last revision {last}: something else wrote to it"
                    )));
                }
                applier.retire_leases().await?;
                lag_ms = 0;
                metrics.lag.set(0.0);
                let done = applier.applied();
                if until == Until::CaughtUp
                    && done.revision == last
                    && vouched_ms > done.observed_ms
                {
                    still_at(client, cluster_id, done.revision).await?;
                    report_cutover(out, done, vouched_ms, done.revision == start)?;
                    return Ok(());
                }
            }
            Some(Err(e)) => {
                // What the feed says wins, unless the destination diverged.
                return match applier.drain().await {
                    Err(d) if d.is::<Diverged>() => Err(d),
                    _ => Err(e),
                };
            }
            None => {
                applier.drain().await?;
                let done = applier.applied();
                if until_revision == Some(done.revision) {
                    still_at(client, cluster_id, done.revision).await?;
                    writeln!(
                        out,
                        "the destination holds revision {} (--until-revision)",
                        done.revision
                    )?;
                    return Ok(());
                }
                return Err(anyhow!("the archive feed stopped"));
            }
        }
        let done = applier.applied();
        if Instant::now() >= next_retire {
            applier.retire_leases().await?;
            next_retire = Instant::now() + Duration::from_millis(200);
        }
        metrics
            .total
            .add((done.revision - metrics.applied.get() as i64) as f64);
        metrics.applied.set(done.revision as f64);
        metrics.archived.set(archived as f64);

        if Instant::now() >= next_log {
            let secs = logged.0.elapsed().as_secs_f64();
            tracing::info!(
                applied = done.revision,
                archived,
                lag_s = lag_ms as f64 / 1000.0,
                per_s = ((done.revision - logged.1) as f64 / secs).round(),
                "following"
            );
            logged = (Instant::now(), done.revision);
            next_log = Instant::now() + options.log_interval;
        }
    }
}

/// Refuses the archive's own source cluster as a destination: its cluster
/// ID is in every generation manifest (read directly: a full listing of a
/// large archive takes longer than a short lease lives).
async fn refuse_source(archive: &Archive, cluster_id: u64) -> anyhow::Result<()> {
    let dirs = archive
        .list_root_dirs()
        .await
        .context("list the archive's generations")?;
    for g in dirs
        .iter()
        .filter_map(|d| GenerationId::parse_dir(d.trim_end_matches('/')))
    {
        let key = layout::generation_manifest_key(g);
        let Some(bytes) = archive.get_opt(&key).await? else {
            continue;
        };
        let manifest = GenerationManifest::parse_in(&key, &bytes, g)?;
        if manifest.cluster_id == cluster_id {
            bail!(Diverged(format!(
                "the destination is the archive's source cluster (cluster ID {cluster_id:x}, generation {g}): follow writes only to a new cluster seeded from a restore (restore its members with an --initial-cluster-token of their own if they keep the source's names and peer URLs); nothing was written"
            )));
        }
    }
    Ok(())
}

/// Reads the destination once more before reporting success: it must
/// still be the cluster followed, at `revision`.
async fn still_at(
    client: &mut etcd_client::Client,
    cluster_id: u64,
    revision: Revision,
) -> anyhow::Result<()> {
    let (id, now) = cluster_and_revision(client).await?;
    if id != cluster_id || now != revision {
        return Err(Diverged(format!(
            "the destination (cluster ID {id:x}) is at revision {now}, where follow left cluster {cluster_id:x} at revision {revision}: something else wrote to it"
        ))
        .into());
    }
    Ok(())
}

fn report_cutover(
    out: &mut dyn Write,
    done: Applied,
    vouched_ms: i64,
    held_at_start: bool,
) -> anyhow::Result<()> {
    let gap = if held_at_start {
        "unknown (the destination already held it when follow started)".to_owned()
    } else if done.observed_ms > 0 {
        format!(
            "{:.3} s (the source wrote it at {}, the destination held it at {})",
            (done.confirmed_ms - done.observed_ms) as f64 / 1000.0,
            crate::format_ms(done.observed_ms),
            crate::format_ms(done.confirmed_ms)
        )
    } else {
        "unknown (the archive holds no time for that revision)".to_owned()
    };
    writeln!(
        out,
        "caught up: the destination holds revision {}, the archive's last, and the source was still there at {}; cutover gap {gap}",
        done.revision,
        crate::format_ms(vouched_ms)
    )?;
    Ok(())
}
