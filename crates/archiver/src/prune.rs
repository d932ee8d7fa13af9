//! `etcd-archiver prune` and the periodic prune of `etcd-archiver run`:
//! the retention policy's flags, and reports of what a prune keeps and
//! deletes (rules in [`etcdpitr_common::retention`], execution in
//! [`etcdpitr_common::prune`]).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use etcdpitr_common::chain;
use etcdpitr_common::crypto::Keyring;
use etcdpitr_common::errors;
use etcdpitr_common::progress::Mode;
use etcdpitr_common::prune::{prune, PruneReport, Retained};
use etcdpitr_common::retention::{Period, Policy};
use etcdpitr_common::store::Archive;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{parse_duration, InvalidConfig};
use crate::observe::Observer;

/// Default interval between prunes of `etcd-archiver run`.
pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_hours(1);

/// Objects under Object Lock the text report lists one by one; beyond, it
/// gives their number and the first date one becomes deletable.
const RETAINED_LISTED: usize = 10;

/// The retention policy's flags. No rule means nothing is ever deleted.
#[derive(Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// Keep every revision of the last DUR restorable (e.g. 7d, 36h),
    /// counted back from the newest moment the archive holds.
    #[arg(long, env = "ETCD_ARCHIVER_KEEP_WITHIN", value_name = "DUR")]
    pub keep_within: Option<String>,
    /// Keep the newest N base snapshots as restore points.
    #[arg(long, env = "ETCD_ARCHIVER_KEEP_LAST", value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the last base snapshot of each of the newest N hours (UTC).
    #[arg(long, env = "ETCD_ARCHIVER_KEEP_HOURLY", value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the last base snapshot of each of the newest N days (UTC).
    #[arg(long, env = "ETCD_ARCHIVER_KEEP_DAILY", value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the last base snapshot of each of the newest N ISO weeks (UTC).
    #[arg(long, env = "ETCD_ARCHIVER_KEEP_WEEKLY", value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the last base snapshot of each of the newest N months (UTC).
    #[arg(long, env = "ETCD_ARCHIVER_KEEP_MONTHLY", value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the last base snapshot of each of the newest N years (UTC).
    #[arg(long, env = "ETCD_ARCHIVER_KEEP_YEARLY", value_name = "N")]
    pub keep_yearly: Option<u32>,
}

impl PolicyArgs {
    /// Fills unset rules from `other` (e.g. the TOML file).
    #[must_use]
    pub fn or(self, other: PolicyArgs) -> Self {
        Self {
            keep_within: self.keep_within.or(other.keep_within),
            keep_last: self.keep_last.or(other.keep_last),
            keep_hourly: self.keep_hourly.or(other.keep_hourly),
            keep_daily: self.keep_daily.or(other.keep_daily),
            keep_weekly: self.keep_weekly.or(other.keep_weekly),
            keep_monthly: self.keep_monthly.or(other.keep_monthly),
            keep_yearly: self.keep_yearly.or(other.keep_yearly),
        }
    }

    /// The policy the flags describe.
    ///
    /// # Errors
    /// A message naming the bad flag.
    pub fn resolve(self) -> anyhow::Result<Policy> {
        let count = |flag: &str, n: Option<u32>| match n {
            Some(0) => bail!("--{flag}: must be at least 1 (leave it out to keep no such points)"),
            n => Ok(n),
        };
        let keep_within_ms = match &self.keep_within {
            Some(s) => Some(
                i64::try_from(parse_duration("keep-within", s)?.as_millis())
                    .map_err(|_| anyhow::anyhow!("--keep-within: {s:?} is too long"))?,
            ),
            None => None,
        };
        let mut policy = Policy {
            keep_within_ms,
            keep_last: count("keep-last", self.keep_last)?,
            ..Policy::default()
        };
        for (period, n) in [
            (Period::Hourly, self.keep_hourly),
            (Period::Daily, self.keep_daily),
            (Period::Weekly, self.keep_weekly),
            (Period::Monthly, self.keep_monthly),
            (Period::Yearly, self.keep_yearly),
        ] {
            if let Some(n) = count(&format!("keep-{}", period.word()), n)? {
                policy.keep_periods.insert(period, n);
            }
        }
        Ok(policy)
    }
}

/// `etcd-archiver prune`'s flags.
#[derive(Args, Debug, Clone)]
pub struct PruneArgs {
    /// Archive URL: file:///abs/dir, s3://bucket/prefix, gs://…, az://…
    #[arg(long, env = "ETCD_ARCHIVER_ARCHIVE")]
    pub archive: String,
    /// The retention policy.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Delete; without it, only print what would be deleted.
    #[arg(long)]
    pub confirm: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Key file of an encrypted archive (repeat for the keys of earlier
    /// rotations; see `etcd-archiver run --encryption-key-file`).
    #[arg(
        long = "encryption-key-file",
        env = "ETCD_ARCHIVER_ENCRYPTION_KEY_FILE",
        value_delimiter = ','
    )]
    pub encryption_key_file: Vec<std::path::PathBuf>,
}

/// Runs `etcd-archiver prune`: prints the report, deletes with `--confirm`.
///
/// # Errors
/// A bad policy or archive URL, or a listing, store or integrity failure.
pub async fn command(args: PruneArgs) -> anyhow::Result<()> {
    let policy = args
        .policy
        .resolve()
        .map_err(|e| e.context(InvalidConfig))?;
    if policy.is_empty() {
        return Err(anyhow::anyhow!("no retention rule given (--keep-within, --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly or --keep-yearly): nothing would ever be deleted").context(InvalidConfig));
    }
    let keys = Keyring::load(&args.encryption_key_file)?;
    let archive = Archive::open(&args.archive)
        .map_err(|e| anyhow::Error::from(e).context(InvalidConfig))?
        .with_keys(Arc::new(keys));
    let report = prune(&archive, &policy, args.confirm, Mode::Auto).await?;
    let mut out = etcdpitr_common::cli::stdout();
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&to_json(&archive, &report))?
        )?;
    } else {
        write!(out, "{}", to_text(&report))?;
    }
    Ok(())
}

/// Applies `policy` to the archive every `interval` until `stop`, the first
/// time one interval after the writer started (once it has read and marked
/// its head); failures are logged and retried at the next interval.
///
/// After each prune, `observer` learns the restorable start of the
/// generation being written.
pub async fn periodically(
    archive: Archive,
    policy: Policy,
    interval: Duration,
    observer: Observer,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        // A daemon's stderr is a log, even on a terminal.
        match prune(&archive, &policy, true, Mode::Lines).await {
            Ok(r) => {
                if let Some(generation) = observer.current_generation() {
                    let newest = r
                        .plan
                        .restorable_after
                        .iter()
                        .rfind(|range| range.generation == generation);
                    if let Some(range) = newest {
                        observer.restorable_start(generation, range.first);
                    }
                }
                if r.deleted > 0 || !r.refused.is_empty() || !r.retained.is_empty() {
                    tracing::info!(
                        policy = %r.policy,
                        deleted = r.deleted,
                        refused = r.refused.len(),
                        retained = r.retained.len(),
                        restorable = %chain::describe(&r.plan.restorable_after),
                        "pruned the archive"
                    );
                }
                for refused in &r.refused {
                    tracing::warn!(object = %refused.object, reason = %refused.reason, "the store refused to delete; trying again at the next prune");
                }
                if !r.retained.is_empty() {
                    tracing::info!(
                        retained = r.retained.len(),
                        first_lock_end = first_release(&r.retained).as_deref().unwrap_or("none (legal holds)"),
                        "objects under S3 Object Lock stay; a later prune deletes each once its lock ends"
                    );
                }
            }
            Err(e) => {
                let e = anyhow::Error::from(e);
                tracing::warn!(
                    error = errors::one_line(&e),
                    hint = errors::hint(&e).map(tracing::field::display),
                    "prune failed; trying again at the next interval"
                );
            }
        }
    }
}

fn to_text(r: &PruneReport) -> String {
    let mut out = format!("policy: {}\nkept restore points:\n", r.policy);
    for p in &r.plan.kept {
        let span = if p.base == p.through {
            format!("revision {}", p.base)
        } else {
            format!(
                "revisions {}..={} (from the snapshot at {})",
                p.base, p.through, p.base
            )
        };
        out += &format!(
            "  generation {}, {span}: {}\n",
            p.generation,
            p.reasons.join(", ")
        );
    }
    for (g, range) in &r.plan.records {
        out += &format!("pruned: generation {g}, revisions {range}\n");
    }
    let verb = if r.confirmed {
        "deleted"
    } else {
        "would delete"
    };
    if r.plan.delete.is_empty() {
        out += "nothing to delete\n";
    } else if r.confirmed {
        out += &format!("{verb} {} of {} objects\n", r.deleted, r.plan.delete.len());
    } else {
        out += &format!("{verb} {} objects:\n", r.plan.delete.len());
        for key in &r.plan.delete {
            out += &format!("  {key}\n");
        }
    }
    for refused in &r.refused {
        out += &format!(
            "kept by the store (a later prune tries again): {}: {}\n",
            refused.object, refused.reason
        );
    }
    if r.retained.len() > RETAINED_LISTED {
        out += &format!(
            "kept by S3 Object Lock (a later prune deletes each once its lock ends): {} objects, the first deletable from {} (--json lists each)\n",
            r.retained.len(),
            first_release(&r.retained).as_deref().unwrap_or("no date: all under a legal hold"),
        );
    } else {
        for x in &r.retained {
            out += &format!(
                "kept by S3 Object Lock (a later prune deletes it once the lock ends): {}: {}\n",
                x.object, x.retention
            );
        }
    }
    out += &format!(
        "restorable afterwards: {}\n",
        chain::describe(&r.plan.restorable_after)
    );
    if !r.confirmed && !r.plan.delete.is_empty() {
        out += "dry run: run again with --confirm to delete\n";
    }
    out
}

/// The first retain-until date (RFC 3339) at which one of `retained`
/// becomes deletable; objects under a legal hold have none.
fn first_release(retained: &[Retained]) -> Option<String> {
    retained
        .iter()
        .filter(|x| !x.retention.legal_hold)
        .filter_map(|x| x.retention.period.map(|(_, until)| (until, x)))
        .min_by_key(|(until, _)| *until)
        .and_then(|(_, x)| x.retention.retain_until_rfc3339())
}

fn to_json(archive: &Archive, r: &PruneReport) -> serde_json::Value {
    json!({
        "archive": archive.url(),
        "policy": r.policy.to_string(),
        "confirmed": r.confirmed,
        "kept": r.plan.kept.iter().map(|p| json!({
            "generation": p.generation.0,
            "base_revision": p.base,
            "through_revision": p.through,
            "reasons": p.reasons,
        })).collect::<Vec<_>>(),
        "pruned": r.plan.records.iter().map(|(g, range)| json!({
            "generation": g.0,
            "first_revision": range.first,
            "last_revision": range.last,
        })).collect::<Vec<_>>(),
        "delete": r.plan.delete,
        "deleted": r.deleted,
        "refused": r.refused.iter().map(|x| json!({
            "object": x.object,
            "reason": x.reason,
        })).collect::<Vec<_>>(),
        "retained": r.retained.iter().map(|x| json!({
            "object": x.object,
            "mode": x.retention.period.map(|(mode, _)| mode.to_string()),
            "retain_until": x.retention.retain_until_rfc3339(),
            "legal_hold": x.retention.legal_hold,
        })).collect::<Vec<_>>(),
        "restorable_after": r.plan.restorable_after.iter().map(|x| json!({
            "generation": x.generation.0,
            "first_revision": x.first,
            "last_revision": x.last,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use etcdpitr_common::object_lock::{Retention, RetentionMode};
    use etcdpitr_common::retention::PrunePlan;

    use super::*;

    /// 2026-11-27T03:16:31Z.
    const UNTIL_MS: i64 = 1_795_749_391_000;

    fn retained(n: usize) -> Vec<Retained> {
        (0..n)
            .map(|i| Retained {
                object: format!("gen-1/segments/{i}"),
                retention: Retention {
                    period: Some((
                        RetentionMode::Compliance,
                        chrono::DateTime::from_timestamp_millis(UNTIL_MS + 1000 * (n - i) as i64)
                            .unwrap(),
                    )),
                    legal_hold: i == n - 1,
                },
            })
            .collect()
    }

    fn report(retained: Vec<Retained>) -> PruneReport {
        PruneReport {
            policy: Policy {
                keep_last: Some(1),
                ..Policy::default()
            },
            plan: PrunePlan {
                delete: retained.iter().map(|r| r.object.clone()).collect(),
                ..PrunePlan::default()
            },
            confirmed: true,
            deleted: 0,
            refused: Vec::new(),
            retained,
        }
    }

    #[test]
    fn reports_each_locked_object_with_its_date() {
        let text = to_text(&report(retained(2)));
        assert!(
            text.contains("kept by S3 Object Lock (a later prune deletes it once the lock ends): gen-1/segments/0: COMPLIANCE retention until 2026-11-27T03:16:33Z\n"),
            "{text}"
        );
        assert!(
            text.contains("gen-1/segments/1: COMPLIANCE retention until 2026-11-27T03:16:32Z and a legal hold\n"),
            "{text}"
        );
        let archive = Archive::from_store(
            std::sync::Arc::new(object_store::memory::InMemory::new()),
            "",
            "memory:///",
        );
        let json = to_json(&archive, &report(retained(2)));
        assert_eq!(
            json["retained"],
            serde_json::json!([
                {"object": "gen-1/segments/0", "mode": "COMPLIANCE", "retain_until": "2026-11-27T03:16:33Z", "legal_hold": false},
                {"object": "gen-1/segments/1", "mode": "COMPLIANCE", "retain_until": "2026-11-27T03:16:32Z", "legal_hold": true},
            ])
        );
    }

    #[test]
    fn summarizes_many_locked_objects_by_the_first_date_one_is_deletable() {
        let n = RETAINED_LISTED + 1;
        let text = to_text(&report(retained(n)));
        assert!(!text.contains("gen-1/segments/"), "{text}");
        // The newest date belongs to a legal hold, deletable at no date.
        assert!(
            text.contains(&format!(
                "{n} objects, the first deletable from 2026-11-27T03:16:33Z"
            )),
            "{text}"
        );
    }
}
