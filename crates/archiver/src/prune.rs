//! `etcd-archiver prune` and the periodic prune of `etcd-archiver run`:
//! the retention policy's flags, and reports of what a prune keeps and
//! deletes (rules in [`etcdpitr_common::retention`], execution in
//! [`etcdpitr_common::prune`]).

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use etcdpitr_common::chain;
use etcdpitr_common::prune::{prune, PruneReport};
use etcdpitr_common::retention::{Period, Policy};
use etcdpitr_common::store::Archive;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::parse_duration;

/// Default interval between prunes of `etcd-archiver run`.
pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_hours(1);

/// The retention policy's flags. No rule means nothing is ever deleted.
#[derive(Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// Keep every revision of the last DUR restorable (e.g. 7d, 36h),
    /// counted back from the newest moment the archive holds.
    #[arg(long, value_name = "DUR")]
    pub keep_within: Option<String>,
    /// Keep the newest N base snapshots as restore points.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the last base snapshot of each of the newest N hours (UTC).
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the last base snapshot of each of the newest N days (UTC).
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the last base snapshot of each of the newest N ISO weeks (UTC).
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the last base snapshot of each of the newest N months (UTC).
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the last base snapshot of each of the newest N years (UTC).
    #[arg(long, value_name = "N")]
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
}

/// Runs `etcd-archiver prune`: prints the report, deletes with `--confirm`.
///
/// # Errors
/// A bad policy or archive URL, or a listing, store or integrity failure.
pub async fn command(args: PruneArgs) -> anyhow::Result<()> {
    let policy = args.policy.resolve()?;
    if policy.is_empty() {
        bail!("no retention rule given (--keep-within, --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly or --keep-yearly): nothing would ever be deleted");
    }
    let archive = Archive::open(&args.archive)?;
    let report = prune(&archive, &policy, args.confirm).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&archive, &report))?
        );
    } else {
        print!("{}", to_text(&report));
    }
    Ok(())
}

/// Applies `policy` to the archive now and then every `interval` until
/// `stop`; failures are logged and retried at the next interval.
pub async fn periodically(
    archive: Archive,
    policy: Policy,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        match prune(&archive, &policy, true).await {
            Ok(r) => {
                if r.deleted > 0 || !r.refused.is_empty() {
                    tracing::info!(
                        policy = %r.policy,
                        deleted = r.deleted,
                        refused = r.refused.len(),
                        restorable = %chain::describe(&r.plan.restorable_after),
                        "pruned the archive"
                    );
                }
                for refused in &r.refused {
                    tracing::warn!(object = %refused.object, reason = %refused.reason, "the store refused to delete; trying again at the next prune");
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "prune failed; trying again at the next interval"
                );
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
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
    out += &format!(
        "restorable afterwards: {}\n",
        chain::describe(&r.plan.restorable_after)
    );
    if !r.confirmed && !r.plan.delete.is_empty() {
        out += "dry run: run again with --confirm to delete\n";
    }
    out
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
        "restorable_after": r.plan.restorable_after.iter().map(|x| json!({
            "generation": x.generation.0,
            "first_revision": x.first,
            "last_revision": x.last,
        })).collect::<Vec<_>>(),
    })
}
