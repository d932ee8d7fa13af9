//! Leases while following: which leases the destination's keys use, their
//! granted TTLs, and a task that keeps them alive so that the destination
//! never expires one on its own (the source's expiries arrive as archived
//! delete events).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use etcd_client::{
    Client, LeaseClient, LeaseGrantOptions, LeaseKeepAliveStream, LeaseKeeper,
    LeaseTimeToLiveOptions,
};
use etcdpitr_common::errors;
use etcdpitr_common::segment::{Event, EventKind};
use tokio::sync::mpsc;

use super::Diverged;
use tokio::time::Instant;

/// The leases of the destination's live keys, as the applied revisions
/// leave them, and every lease's granted TTL as the archive recorded it.
#[derive(Debug, Default)]
pub struct LeaseBook {
    ttl: HashMap<i64, i64>,
    lease_of: HashMap<Vec<u8>, i64>,
    keys_of: HashMap<i64, usize>,
}

impl LeaseBook {
    /// Records a lease's granted TTL (seconds).
    pub fn granted(&mut self, id: i64, ttl_secs: i64) {
        self.ttl.insert(id, ttl_secs);
    }

    /// The granted TTL the archive recorded for `id`.
    pub fn ttl(&self, id: i64) -> Option<i64> {
        self.ttl.get(&id).copied()
    }

    /// Notes that live key `key` uses lease `lease`. Returns the lease it
    /// used before, if any.
    pub fn attach(&mut self, key: Vec<u8>, lease: i64) -> Option<i64> {
        *self.keys_of.entry(lease).or_default() += 1;
        self.lease_of.insert(key, lease)
    }

    /// Applies one event. Returns the lease that lost its last key, if any.
    pub fn apply(&mut self, event: &Event) -> Option<i64> {
        let before = match event.kind {
            EventKind::Put if event.lease != 0 => self.attach(event.key.clone(), event.lease),
            _ => self.lease_of.remove(&event.key),
        }?;
        let n = self.keys_of.get_mut(&before).expect("a counted lease");
        *n -= 1;
        if *n == 0 {
            self.keys_of.remove(&before);
            return Some(before);
        }
        None
    }

    /// Whether any live key uses `id`.
    pub fn in_use(&self, id: i64) -> bool {
        self.keys_of.contains_key(&id)
    }

    /// The lease of live key `key`, if it has one.
    pub fn lease(&self, key: &[u8]) -> Option<i64> {
        self.lease_of.get(key).copied()
    }

    /// How many live keys use `id`.
    pub fn key_count(&self, id: i64) -> usize {
        self.keys_of.get(&id).copied().unwrap_or(0)
    }

    /// Leases with live keys.
    pub fn used(&self) -> impl Iterator<Item = i64> + '_ {
        self.keys_of.keys().copied()
    }
}

enum Command {
    Keep(i64),
    Drop(i64),
}

/// Keeps leases of the destination alive: each every third of its TTL (as
/// the renewals report it), so that none reaches its end while followed.
#[derive(Clone)]
pub struct KeepAlive {
    tx: mpsc::UnboundedSender<Command>,
}

struct Kept {
    due: Instant,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl KeepAlive {
    /// Starts the task on `client`'s lease service.
    pub fn start(client: &Client) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let leases = client.lease_client();
        tokio::spawn(async move {
            let mut kept: HashMap<i64, Kept> = HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    command = rx.recv() => match command {
                        Some(Command::Keep(id)) => {
                            kept.entry(id).or_insert(Kept { due: Instant::now(), stream: None });
                        }
                        Some(Command::Drop(id)) => {
                            kept.remove(&id);
                        }
                        None => return,
                    },
                    _ = tick.tick() => {
                        // All due leases at once: one slow answer must not
                        // hold back the others' renewals.
                        let now = Instant::now();
                        let renewals = kept.iter_mut().filter(|(_, k)| k.due <= now).map(|(id, k)| {
                            let mut leases = leases.clone();
                            async move { (*id, renew(&mut leases, *id, k).await, k) }
                        });
                        let mut gone = Vec::new();
                        for (id, result, k) in futures::future::join_all(renewals).await {
                            match result {
                                Ok(Some(ttl)) => k.due = now + (ttl / 3).max(Duration::from_millis(300)),
                                Ok(None) => gone.push(id),
                                Err(e) => {
                                    k.stream = None;
                                    k.due = now + Duration::from_millis(200);
                                    tracing::warn!(lease = format!("{id:x}"), error = errors::one_line(&e), hint = errors::hint(&e).map(tracing::field::display), "cannot keep a destination lease alive; retrying");
                                }
                            }
                        }
                        for id in gone {
                            // Its keys are gone with it, which follow sees
                            // as a revision the archive does not have.
                            tracing::warn!(lease = format!("{id:x}"), "the destination no longer has a lease follow keeps alive");
                            kept.remove(&id);
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Keeps `id` alive from now on, renewing it at once.
    pub fn keep(&self, id: i64) {
        let _ = self.tx.send(Command::Keep(id));
    }

    /// Stops keeping `id` alive.
    pub fn drop_lease(&self, id: i64) {
        let _ = self.tx.send(Command::Drop(id));
    }
}

/// Renews `id`; returns its TTL, or `None` when the destination no longer
/// has it.
async fn renew(
    leases: &mut LeaseClient,
    id: i64,
    k: &mut Kept,
) -> anyhow::Result<Option<Duration>> {
    if k.stream.is_none() {
        k.stream = match leases.keep_alive(id).await {
            Ok(s) => Some(s),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
    }
    let (keeper, stream) = k.stream.as_mut().expect("just opened");
    keeper.keep_alive().await?;
    let response = tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .context("no keep-alive answer within 2 s")??
        .context("keep-alive stream closed")?;
    // etcd answers TTL 0 for a lease it no longer has.
    Ok((response.ttl() > 0).then(|| Duration::from_secs(response.ttl() as u64)))
}

/// Makes sure the destination has lease `id` with granted TTL `ttl_secs`
/// and keeps it alive. A lease the destination still has is renewed at
/// once (back to its full TTL); a missing one is granted with the same id.
/// A lease past its end that the destination has not revoked yet can be
/// neither renewed nor granted: it is granted again once it is gone.
///
/// # Errors
/// etcd failures.
pub async fn ensure(
    client: &mut Client,
    keep_alive: &KeepAlive,
    alive: &mut HashSet<i64>,
    id: i64,
    ttl_secs: i64,
) -> anyhow::Result<()> {
    if alive.contains(&id) {
        return Ok(());
    }
    // etcd revokes expired leases every 500 ms.
    for _ in 0..100 {
        let status = client
            .lease_time_to_live(id, None)
            .await
            .with_context(|| format!("look up lease {id:x} in the destination"))?;
        let held = if status.ttl() > 0 {
            // It may expire meanwhile: then it is granted again below.
            renew_once(client, id).await.unwrap_or(false)
        } else {
            tracing::debug!(lease = format!("{id:x}"), "grant");
            match client
                .lease_grant(ttl_secs, Some(LeaseGrantOptions::new().with_id(id)))
                .await
            {
                Ok(_) => true,
                Err(etcd_client::Error::GRpcStatus(s))
                    if s.message().contains("already exists") =>
                {
                    false
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("grant lease {id:x} in the destination"))
                }
            }
        };
        if held {
            keep_alive.keep(id);
            alive.insert(id);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("lease {id:x} in the destination is past its end but not revoked after 10 s")
}

async fn renew_once(client: &mut Client, id: i64) -> Result<bool, etcd_client::Error> {
    let (mut keeper, mut stream) = client.lease_keep_alive(id).await?;
    keeper.keep_alive().await?;
    Ok(stream.message().await?.is_some_and(|r| r.ttl() > 0))
}

/// The lease by which one follow holds its destination ("etcdpitr" in
/// ASCII). No key ever uses it, so holding it creates no revision; a second
/// follow on the same destination finds it renewed and refuses, as two
/// would apply the same revisions twice.
pub const HOLD_LEASE: i64 = 0x6574_6364_7069_7472;
/// TTL of [`HOLD_LEASE`] (etcd raises it to its minimum, about 2 s by
/// default): a killed follow's hold lapses within it.
const HOLD_TTL_SECS: i64 = 2;

/// Takes [`HOLD_LEASE`] in the destination and keeps it alive. A hold left
/// by a follow that is gone lapses within its TTL and is then taken; one
/// that is still renewed refuses.
///
/// # Errors
/// [`Diverged`] when another follow holds the destination; etcd failures.
pub async fn hold(client: &mut Client, keep_alive: &KeepAlive) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match client
            .lease_grant(
                HOLD_TTL_SECS,
                Some(LeaseGrantOptions::new().with_id(HOLD_LEASE)),
            )
            .await
        {
            Ok(_) => {
                keep_alive.keep(HOLD_LEASE);
                return Ok(());
            }
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("already exists") => {}
            Err(e) => return Err(e).context("take the follow hold lease in the destination"),
        }
        let granted = client
            .lease_time_to_live(HOLD_LEASE, None)
            .await
            .context("look up the follow hold lease in the destination")?
            .granted_ttl();
        // A hold nobody renews lapses within its TTL (etcd revokes expired
        // leases every 500 ms); one still there after that is renewed.
        let lapse = Duration::from_secs(granted.max(HOLD_TTL_SECS) as u64 + 2);
        if started.elapsed() > lapse {
            return Err(Diverged(format!(
                "another follow holds this destination (it renews lease {HOLD_LEASE:x}): stop it first; two would apply the same revisions twice"
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Gives up [`HOLD_LEASE`] (on the way out; a failure only delays the
/// next follow by the lease's TTL).
pub async fn release(client: &mut Client) {
    if let Err(e) = client.lease_revoke(HOLD_LEASE).await {
        tracing::debug!(error = %e, "cannot release the follow hold lease");
    }
}

/// Revokes lease `id` in the destination if no key uses it there (a
/// revoke that deletes nothing creates no revision), and stops keeping it
/// alive. A lease that still has keys there is left alone.
///
/// # Errors
/// etcd failures.
pub async fn retire(
    client: &mut Client,
    keep_alive: &KeepAlive,
    alive: &mut HashSet<i64>,
    id: i64,
) -> anyhow::Result<()> {
    let status = client
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .with_context(|| format!("look up lease {id:x} in the destination"))?;
    if !status.keys().is_empty() && status.ttl() > 0 {
        // Still kept alive: its keys must not expire.
        tracing::warn!(
            lease = format!("{id:x}"),
            keys = status.keys().len(),
            "a lease the archive no longer uses still has keys in the destination; kept alive"
        );
        return Ok(());
    }
    keep_alive.drop_lease(id);
    alive.remove(&id);
    if status.ttl() <= 0 {
        return Ok(());
    }
    tracing::debug!(lease = format!("{id:x}"), "revoke");
    match client.lease_revoke(id).await {
        Ok(_) => Ok(()),
        // Expired meanwhile: nothing to revoke.
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Ok(()),
        Err(e) => Err(e).with_context(|| format!("revoke lease {id:x} in the destination")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, lease: i64) -> Event {
        Event {
            kind: EventKind::Put,
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease,
        }
    }

    fn delete(key: &str) -> Event {
        Event {
            kind: EventKind::Delete,
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: 2,
            version: 0,
            lease: 0,
        }
    }

    #[test]
    fn a_lease_is_free_once_its_last_key_goes() {
        let mut book = LeaseBook::default();
        assert_eq!(book.apply(&put("a", 7)), None);
        assert_eq!(book.apply(&put("b", 7)), None);
        assert_eq!(book.key_count(7), 2);
        // Rewriting a key with the same lease keeps the count.
        assert_eq!(book.apply(&put("a", 7)), None);
        assert_eq!(book.key_count(7), 2);
        assert_eq!(book.apply(&delete("a")), None);
        // Moving the last key to another lease frees the first.
        assert_eq!(book.apply(&put("b", 9)), Some(7));
        assert!(!book.in_use(7));
        assert_eq!(book.lease(b"b"), Some(9));
        // Dropping the lease from a key (a put without one) frees it too.
        assert_eq!(book.apply(&put("b", 0)), Some(9));
        assert_eq!(book.used().count(), 0);
        // Deleting a key without a lease changes nothing.
        assert_eq!(book.apply(&delete("b")), None);
    }
}
