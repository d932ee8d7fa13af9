//! Leadership among several archivers of one archive, through etcd's own
//! election API on the source cluster.
//!
//! Each archiver grants a lease (`--election-ttl`) and campaigns under one
//! election name (`--election-prefix` + a hash of the archive URL). The
//! winner writes; the others wait in `Campaign` and one of them takes over
//! when the winner resigns (clean shutdown: its lease is revoked at once) or
//! its lease expires (kill -9, node loss, partition: within the TTL).
//!
//! The winner counts itself leader only while a keep-alive answered within
//! the TTL proves its lease alive: [`Leadership::lost`] fires before etcd
//! could expire it. A writer paused longer than that (SIGSTOP, a VM freeze)
//! may still finish an upload when it wakes; the archive's rules make that
//! harmless (identical overlapping segments are superseded, and a generation
//! it starts is void once a later term wrote the one it follows; see
//! `etcdpitr_common::chain`).
//!
//! What it writes to the source cluster: one key per candidate under the
//! election name (`{name}/{lease id}`), attached to its lease. Creating and
//! deleting these keys create revisions, which are archived like any other.

use std::time::Duration;

use anyhow::Context;
use etcd_client::Client;
use etcdpitr_common::Revision;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::observe::Observer;

/// Where and how long leadership is held.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// The election name (key prefix) in the source cluster.
    pub name: String,
    /// Lease TTL: how long a dead leader blocks a takeover.
    pub ttl: Duration,
}

/// Pause before another keep-alive attempt after one failed.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// How long resigning may wait for etcd.
const RESIGN_TIMEOUT: Duration = Duration::from_secs(3);

/// Slack subtracted from the proven lease lifetime, for clock-rate
/// differences between this host and etcd's.
const SAFETY: Duration = Duration::from_millis(500);

/// Held leadership. Dropping it stops the keep-alives (the lease then
/// expires on its own); [`Leadership::resign`] hands over at once.
pub struct Leadership {
    /// Create revision of the leader key: etcd's fencing token.
    pub election_revision: Revision,
    key: Vec<u8>,
    lease: i64,
    lost: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl Leadership {
    /// Fires when the lease can no longer be proven alive.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Asks etcd whether the leader key is still ours (a linearizable read),
    /// before an action that must not be taken by a deposed writer.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn confirm(&self, client: &mut Client) -> anyhow::Result<bool> {
        if self.lost.is_cancelled() {
            return Ok(false);
        }
        let resp = client
            .get(self.key.clone(), None)
            .await
            .context("read the election key")?;
        Ok(resp
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == self.election_revision)
            && !self.lost.is_cancelled())
    }

    /// Gives leadership up now by revoking the lease (its key goes with it),
    /// so a standby takes over without waiting for the TTL.
    /// Safe to call when already deposed (the lease may be gone); gives up
    /// after [`RESIGN_TIMEOUT`] when etcd cannot be reached.
    pub async fn resign(self, client: &mut Client) {
        self.keeper.abort();
        match tokio::time::timeout(RESIGN_TIMEOUT, client.lease_revoke(self.lease)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot revoke the election lease; it expires on its own");
            }
            Err(_) => {
                tracing::debug!("revoking the election lease timed out; it expires on its own");
            }
        }
    }
}

/// Campaigns until this archiver leads, shutdown (`Ok(None)`) or an error.
/// Once its lease is granted, `observer` learns that it campaigns.
/// Safe to drop: the lease then expires on its own.
///
/// # Errors
/// etcd failures (the caller retries).
pub async fn campaign(
    client: &Client,
    config: &ElectionConfig,
    holder: &str,
    observer: &Observer,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Leadership>> {
    let ttl_secs = i64::try_from(config.ttl.as_secs()).unwrap_or(i64::MAX);
    let mut client = client.clone();
    let granted_at = Instant::now();
    let lease = client
        .lease_grant(ttl_secs, None)
        .await
        .context("grant the election lease")?
        .id();
    let lost = CancellationToken::new();
    let keeper = tokio::spawn(keep_alive(
        client.clone(),
        lease,
        config.ttl,
        granted_at,
        lost.clone(),
    ));
    // Built before campaigning so that every early return drops it, which
    // stops the keep-alives.
    let mut held = Leadership {
        election_revision: 0,
        key: Vec::new(),
        lease,
        lost: lost.clone(),
        keeper,
    };
    observer.standby(Ok(()));
    let mut election = client.election_client();
    let response = tokio::select! {
        () = shutdown.cancelled() => {
            client.lease_revoke(lease).await.ok();
            return Ok(None);
        }
        () = lost.cancelled() => anyhow::bail!("the election lease expired while campaigning"),
        r = election.campaign(config.name.clone(), holder, lease) => r.context("campaign for leadership")?,
    };
    let leader = response
        .leader()
        .context("campaign answered without a leader key")?;
    held.election_revision = leader.rev();
    held.key = leader.key().to_vec();
    Ok(Some(held))
}

/// Keeps `lease` alive every third of its TTL; cancels `lost` as soon as
/// the newest answered keep-alive no longer proves it alive.
async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    granted_at: Instant,
    lost: CancellationToken,
) {
    let period = ttl / 3;
    let mut valid_until = granted_at + ttl.saturating_sub(SAFETY);
    let mut channel = None;
    loop {
        if Instant::now() >= valid_until {
            break;
        }
        // Nothing here may wait past `valid_until`: etcd being unreachable
        // must end leadership in time, not hang the watchdog.
        if channel.is_none() {
            channel = tokio::time::timeout_at(valid_until, client.lease_keep_alive(lease))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let mut answered_ok = false;
        if let Some((keeper, stream)) = &mut channel {
            let sent = Instant::now();
            let answered = async {
                keeper.keep_alive().await.ok()?;
                stream.message().await.ok()?
            };
            match tokio::time::timeout_at(valid_until.min(sent + period), answered).await {
                Ok(Some(r)) if r.ttl() > 0 => {
                    let proven = Duration::from_secs(r.ttl().unsigned_abs());
                    valid_until = sent + proven.saturating_sub(SAFETY);
                    answered_ok = true;
                }
                // The lease is gone (expired or revoked underneath us).
                Ok(Some(_)) => break,
                Ok(None) | Err(_) => channel = None,
            }
        }
        // After a failed attempt, try again soon rather than a period later.
        let pause = if answered_ok { period } else { RETRY_PAUSE };
        tokio::time::sleep_until(valid_until.min(Instant::now() + pause)).await;
    }
    tracing::warn!("leadership lost: the election lease could not be kept alive");
    lost.cancel();
}
