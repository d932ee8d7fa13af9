//! Applying archived revisions to the destination: each revision as one
//! transaction holding its events in order, several transactions in
//! flight.
//!
//! Each transaction is guarded by a compare that holds only once the
//! previous revision is applied: the previous revision's first put left
//! its key at exactly that mod revision, which no earlier state of the
//! destination can show. So a transaction that overtakes its predecessor
//! changes nothing (a failed compare with no else-branch writes nothing and
//! creates no revision) and is sent again. A revision after one that only
//! deletes has no such mark (an absent key may also be absent earlier): it
//! is sent once everything before it is confirmed, guarded by the deleted
//! key's absence. Each transaction also holds only while its own revision
//! is not applied (its first put's key has an older mod revision, or its
//! first deleted key still exists), so a copy sent again after a lost
//! answer, or by a second follow, changes nothing. After every commit the
//! response's header revision must equal the archived revision; anything
//! else means someone else wrote to the destination, and nothing more is
//! sent.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};
use etcdpitr_common::errors;
use etcdpitr_common::segment::{Event, EventKind, RevisionRecord};
use etcdpitr_common::Revision;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};

use super::leases::{self, KeepAlive, LeaseBook};
use super::Diverged;

/// How one revision is applied.
#[derive(Clone, Debug)]
enum Action {
    /// A transaction of `ops`; `deletes[i]` is how many keys op `i` must
    /// delete (`None` for a put).
    Txn {
        ops: Vec<TxnOp>,
        deletes: Vec<Option<i64>>,
    },
    /// A lease revoke: the revision deletes exactly the keys of this lease
    /// (the source revoked it or it expired), checked before revoking.
    Revoke { lease: i64, keys: Vec<Vec<u8>> },
}

struct Pending {
    revision: Revision,
    action: Action,
    /// The guard of the next revision: this revision's effect.
    guard_next: Option<Guard>,
    /// Compares that hold until this revision is applied.
    not_yet: Vec<Compare>,
    /// The first events of this revision, to recognise it in the destination.
    fingerprint: Vec<Event>,
    /// Its transaction succeeded (it is confirmed once all before are).
    done: bool,
    /// Its last copy went out with everything before it confirmed: a
    /// failed compare then means the destination is not where it should be.
    alone: bool,
}

type InFlight = FuturesOrdered<
    futures::future::BoxFuture<'static, (Revision, Result<TxnResponse, etcd_client::Error>)>,
>;

/// What the applier has done.
#[derive(Clone, Copy, Debug, Default)]
pub struct Applied {
    /// The destination's revision as last confirmed.
    pub revision: Revision,
    /// Unix ms the source's archiver observed that revision (0: unknown).
    pub observed_ms: i64,
    /// Unix ms it was confirmed in the destination.
    pub confirmed_ms: i64,
}

/// Sends revisions in order, `window` at a time, and confirms each.
pub struct Applier {
    client: Client,
    window: usize,
    max_txn_ops: usize,
    inflight: InFlight,
    /// The newest revision sent with a put, and that put's key, if no
    /// revision sent since deleted it (see [`guard_after`]).
    last_put: Option<(Vec<u8>, Revision)>,
    /// Answers taken from `inflight` before their turn to be handled.
    ready: VecDeque<(Revision, Result<TxnResponse, etcd_client::Error>)>,
    pending: VecDeque<(Pending, i64)>,
    applied: Applied,
    confirmed_guard: Option<Guard>,
    book: LeaseBook,
    keep_alive: KeepAlive,
    alive: HashSet<i64>,
    retire_at: Vec<(Revision, i64)>,
    /// The destination was found at this revision, beyond what this
    /// process sent (another follow got there first): revisions up to it
    /// are counted as applied as they arrive, and it is checked against
    /// the archive when it does.
    ahead: Option<Revision>,
}

impl Applier {
    /// An applier for a destination proven to hold the archive's revision
    /// `applied.revision`, whose live keys use the leases in `book`, all
    /// kept alive by `keep_alive`. `last` is that revision's record, if
    /// known (its effect guards the first transaction).
    pub fn new(
        client: Client,
        window: usize,
        max_txn_ops: usize,
        applied: Applied,
        last: Option<&RevisionRecord>,
        book: LeaseBook,
        keep_alive: KeepAlive,
    ) -> Self {
        Self {
            client,
            window: window.max(1),
            max_txn_ops: max_txn_ops.max(1),
            inflight: FuturesOrdered::new(),
            ready: VecDeque::new(),
            last_put: last.and_then(|r| last_put_after(r, None)),
            pending: VecDeque::new(),
            applied,
            confirmed_guard: last.and_then(|r| guard_after(r, None)),
            book,
            keep_alive,
            alive: HashSet::new(),
            retire_at: Vec::new(),
            ahead: None,
        }
    }

    /// Makes sure every lease the destination's keys use exists there and
    /// is kept alive (granted again with the archive's TTL if it is gone).
    ///
    /// # Errors
    /// etcd failures, or a lease the archive has no TTL for.
    pub async fn keep_used_leases(&mut self) -> anyhow::Result<()> {
        let used: Vec<i64> = self.book.used().collect();
        for id in used {
            let ttl = self
                .book
                .ttl(id)
                .with_context(|| format!("the archive has no TTL for lease {id:x}"))?;
            leases::ensure(&mut self.client, &self.keep_alive, &mut self.alive, id, ttl).await?;
        }
        Ok(())
    }

    /// The last confirmed revision.
    pub fn applied(&self) -> Applied {
        self.applied
    }

    /// The last revision sent (confirmed or not).
    pub fn sent(&self) -> Revision {
        self.pending
            .back()
            .map_or(self.applied.revision, |(p, _)| p.revision)
    }

    /// Records a lease's granted TTL from the archive.
    pub fn lease_granted(&mut self, id: i64, ttl_secs: i64) {
        self.book.granted(id, ttl_secs);
    }

    /// Sends `record` (the revision after the last one sent).
    ///
    /// # Errors
    /// [`Diverged`] when the destination is no longer the archive's
    /// history; etcd failures that outlast the retries.
    pub async fn apply(&mut self, record: &RevisionRecord) -> anyhow::Result<()> {
        let expected = self.sent() + 1;
        if record.revision != expected {
            bail!(
                "archive revision {} follows {}: the chain is broken",
                record.revision,
                expected - 1
            );
        }
        for e in &record.events {
            if e.kind == EventKind::Put && e.lease != 0 {
                let ttl = self.book.ttl(e.lease).with_context(|| {
                    format!(
                        "the archive has no TTL for lease {:x} of revision {}",
                        e.lease, record.revision
                    )
                })?;
                leases::ensure(
                    &mut self.client,
                    &self.keep_alive,
                    &mut self.alive,
                    e.lease,
                    ttl,
                )
                .await?;
            }
        }
        if let Some(ahead) = self.ahead.filter(|&a| record.revision <= a) {
            self.book_events(record);
            if record.revision == ahead {
                let events = &record.events[..record.events.len().min(FINGERPRINT)];
                check_holds(&mut self.client, ahead, events).await?;
                self.ahead = None;
            }
            self.confirmed_guard = guard_after(record, self.last_put.as_ref());
            self.last_put = last_put_after(record, self.last_put.take());
            self.applied = Applied {
                revision: record.revision,
                observed_ms: record.observed_ms,
                confirmed_ms: etcdpitr_common::now_ms(),
            };
            return Ok(());
        }
        let action = self.action_for(record).await?;
        self.book_events(record);
        let guard = self
            .pending
            .back()
            .map_or(self.confirmed_guard.clone(), |(p, _)| p.guard_next.clone());
        let guard_next = guard_after(record, self.last_put.as_ref());
        self.last_put = last_put_after(record, self.last_put.take());
        let pending = Pending {
            revision: record.revision,
            action,
            guard_next,
            not_yet: not_yet(record),
            fingerprint: record.events.iter().take(FINGERPRINT).cloned().collect(),
            done: false,
            alone: self.pending.is_empty(),
        };
        if let (
            Action::Txn { ops, .. },
            Some(Guard {
                compares,
                exact: true,
            }),
        ) = (&pending.action, guard)
        {
            let mut compares = compares;
            compares.extend(pending.not_yet.iter().cloned());
            let txn = Txn::new().when(compares).and_then(ops.clone());
            self.pending.push_back((pending, record.observed_ms));
            self.send(record.revision, txn);
            while self.outstanding() >= self.window {
                self.complete_one().await?;
            }
        } else {
            // Not pipelined (after a delete-only revision, nothing known of
            // the previous revision, or a revoke): only once everything
            // before it is confirmed.
            self.drain().await?;
            self.pending.push_back((pending, record.observed_ms));
            self.send_alone().await?;
        }
        Ok(())
    }

    /// Notes `record`'s effect on the leases' keys.
    fn book_events(&mut self, record: &RevisionRecord) {
        for e in &record.events {
            if let Some(lease) = self.book.apply(e) {
                self.retire_at.push((record.revision, lease));
            }
        }
    }

    /// The revision another follow took the destination to, beyond what
    /// this one has seen in the archive yet.
    pub fn ahead(&self) -> Option<Revision> {
        self.ahead
    }

    /// Waits until every revision sent is confirmed.
    ///
    /// # Errors
    /// As for [`Self::apply`].
    pub async fn drain(&mut self) -> anyhow::Result<()> {
        while self.outstanding() > 0 {
            self.complete_one().await?;
        }
        Ok(())
    }

    /// Transactions sent and not handled yet.
    fn outstanding(&self) -> usize {
        self.inflight.len() + self.ready.len()
    }

    /// Queues `txn` and polls the queue once, so that it goes out now (in
    /// queue order); answers already there are kept for their turn.
    fn send(&mut self, revision: Revision, txn: Txn) {
        tracing::trace!(revision, "send");
        let mut kv = self.client.kv_client();
        self.inflight
            .push_back(Box::pin(async move { (revision, kv.txn(txn).await) }));
        while let Some(Some(answer)) = self.inflight.next().now_or_never() {
            self.ready.push_back(answer);
        }
    }

    /// The next answer, in sending order.
    async fn next_answer(&mut self) -> Option<(Revision, Result<TxnResponse, etcd_client::Error>)> {
        match self.ready.pop_front() {
            Some(answer) => Some(answer),
            None => self.inflight.next().await,
        }
    }

    /// Sends the oldest pending revision on its own and confirms it,
    /// retrying etcd failures.
    async fn send_alone(&mut self) -> anyhow::Result<()> {
        let target = self.pending.front().expect("a pending revision").0.revision;
        let mut delay = Duration::from_millis(100);
        while self.applied.revision < target {
            let before = self.applied.revision;
            let (p, _) = self.pending.front().expect("a pending revision");
            let is_revoke = matches!(p.action, Action::Revoke { .. });
            let outcome = match &p.action {
                Action::Txn { ops, .. } => {
                    let mut compares: Vec<Compare> = match &self.confirmed_guard {
                        Some(g) => g.compares.clone(),
                        None => Vec::new(),
                    };
                    compares.extend(p.not_yet.iter().cloned());
                    let txn = Txn::new().when(compares).and_then(ops.clone());
                    self.client.txn(txn).await.map(Some)
                }
                Action::Revoke { lease, keys } => {
                    check_lease_keys(&mut self.client, target, *lease, keys).await?;
                    self.client.lease_revoke(*lease).await.map(|_| None)
                }
            };
            match outcome {
                Ok(Some(resp)) if resp.succeeded() => self.succeeded(0, &resp)?,
                Ok(None) => {
                    let now = current_revision(&mut self.client).await?;
                    if now != target {
                        return Err(diverged(target, now));
                    }
                    self.confirmed(target);
                }
                Ok(Some(_)) => {
                    // The guard failed although every earlier revision is
                    // confirmed, unless the destination moved meanwhile.
                    self.sync_position().await?;
                    if self.applied.revision == before {
                        return Err(Diverged(format!(
                            "the destination at revision {before} does not read as the archive's revision {before} (the guard of revision {target} failed); follow stopped and wrote nothing more"
                        ))
                        .into());
                    }
                }
                Err(e) if is_refusal(&e) && !is_revoke => return Err(refused(target, e)),
                Err(e) => {
                    // A revoke whose answer was lost finds the lease gone
                    // when sent again: the position tells.
                    tracing::warn!(revision = target, error = %e, "applying a revision failed; checking the destination");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    self.sync_position().await?;
                }
            }
        }
        Ok(())
    }

    /// Handles the next answer.
    async fn complete_one(&mut self) -> anyhow::Result<()> {
        let Some((revision, result)) = self.next_answer().await else {
            return Ok(());
        };
        self.handle(revision, result).await
    }

    /// Handles the answer to a transaction (in sending order).
    async fn handle(
        &mut self,
        revision: Revision,
        result: Result<TxnResponse, etcd_client::Error>,
    ) -> anyhow::Result<()> {
        tracing::trace!(revision, ok = result.is_ok(), "answer");
        let Some(i) = self.index_of(revision) else {
            // Confirmed meanwhile (by reading the destination).
            return Ok(());
        };
        match result {
            Ok(resp) if resp.succeeded() => self.succeeded(i, &resp),
            Ok(_) if self.pending[i].0.alone => {
                // Sent once everything before it was confirmed, and still
                // refused: unless the destination moved meanwhile, it is
                // not at the archive's previous revision.
                self.sync_position().await?;
                if self.index_of(revision).is_some() && self.applied.revision < revision {
                    let at = self.applied.revision;
                    return Err(Diverged(format!(
                        "the destination at revision {at} does not read as the archive's revision {at} (the guard of revision {revision} failed); follow stopped and wrote nothing more"
                    ))
                    .into());
                }
                self.recover().await
            }
            Ok(_) => {
                // Overtaken its predecessor: a failed compare changed
                // nothing. The ones after it fail likewise; send them all
                // again one by one (a burst sent at once is what gets
                // reordered), then pipelining resumes with new revisions.
                tracing::debug!(revision, "overtaken; sending the window again in order");
                self.sync_position().await?;
                self.recover().await
            }
            Err(e) if is_refusal(&e) => Err(refused(revision, e)),
            Err(e) => {
                tracing::warn!(revision, error = %e, "applying a revision failed; checking the destination");
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.sync_position().await?;
                self.recover().await
            }
        }
    }

    /// Position of pending revision `revision`, if still pending.
    fn index_of(&self, revision: Revision) -> Option<usize> {
        let front = self.pending.front()?.0.revision;
        usize::try_from(revision - front)
            .ok()
            .filter(|&i| i < self.pending.len())
    }

    /// Sends every pending revision again, one by one, after the
    /// destination's position was read (nothing else in flight): sent at
    /// once, a burst would be reordered again.
    async fn recover(&mut self) -> anyhow::Result<()> {
        while !self.pending.is_empty() {
            self.send_alone().await?;
        }
        Ok(())
    }

    /// A transaction of pending revision `i` committed: checks its revision
    /// and what it deleted, and confirms what is done in order.
    fn succeeded(&mut self, i: usize, resp: &TxnResponse) -> anyhow::Result<()> {
        let revision = self.pending[i].0.revision;
        Self::check_commit(revision, &self.pending[i].0.action, resp)?;
        self.pending[i].0.done = true;
        while self.pending.front().is_some_and(|(p, _)| p.done) {
            let r = self.pending[0].0.revision;
            self.confirmed(r);
        }
        Ok(())
    }

    /// Checks a committed transaction: its revision and what it deleted.
    fn check_commit(revision: Revision, action: &Action, resp: &TxnResponse) -> anyhow::Result<()> {
        let got = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        if got != revision {
            return Err(diverged(revision, got));
        }
        if let Action::Txn { deletes, .. } = action {
            for (i, (want, op)) in deletes.iter().zip(resp.op_responses()).enumerate() {
                if let (Some(want), TxnOpResponse::Delete(d)) = (want, op) {
                    if d.deleted() != *want {
                        return Err(Diverged(format!(
                            "archived revision {revision}: operation {i} deleted {} keys in the destination, the archive says {want}",
                            d.deleted()
                        ))
                        .into());
                    }
                }
            }
        }
        Ok(())
    }

    fn confirmed(&mut self, revision: Revision) {
        let (p, observed_ms) = self.pending.pop_front().expect("a pending revision");
        debug_assert_eq!(p.revision, revision);
        if let Action::Revoke { lease, .. } = p.action {
            self.keep_alive.drop_lease(lease);
            self.alive.remove(&lease);
        }
        self.confirmed_guard = p.guard_next;
        self.applied = Applied {
            revision,
            observed_ms,
            confirmed_ms: etcdpitr_common::now_ms(),
        };
    }

    /// Leases whose last key went away in a confirmed revision, and that
    /// no later revision sent uses again: revoke them in the destination.
    ///
    /// # Errors
    /// etcd failures.
    pub async fn retire_leases(&mut self) -> anyhow::Result<()> {
        let confirmed = self.applied.revision;
        let (due, later): (Vec<_>, Vec<_>) =
            self.retire_at.drain(..).partition(|&(r, _)| r <= confirmed);
        self.retire_at = later;
        for (_, id) in due {
            if !self.book.in_use(id) {
                leases::retire(&mut self.client, &self.keep_alive, &mut self.alive, id).await?;
            }
        }
        Ok(())
    }

    /// Waits for every answer still due, reads the destination's revision
    /// and counts the pending revisions it holds as confirmed, after
    /// recognising the newest of them there.
    async fn sync_position(&mut self) -> anyhow::Result<()> {
        // Answers still due are checked as they come, in order, as long as
        // they confirm the oldest pending revision.
        while let Some((revision, result)) = self.next_answer().await {
            if let (Ok(resp), Some(i)) = (result, self.index_of(revision)) {
                if resp.succeeded() {
                    self.succeeded(i, &resp)?;
                }
            }
        }
        let mut delay = Duration::from_millis(100);
        let now = loop {
            match current_revision(&mut self.client).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(
                        error = errors::one_line(&e),
                        hint = errors::hint(&e).map(tracing::field::display),
                        "cannot read the destination's revision; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let confirmed = self.applied.revision;
        if now < confirmed {
            return Err(Diverged(format!(
                "the destination is at revision {now}, behind revision {confirmed} follow confirmed there; follow stopped and wrote nothing more"
            ))
            .into());
        }
        if now > self.sent() {
            // Further than this process sent: another follow (or a
            // writer, found out when the archive reaches `now`).
            if let Some((p, _)) = self.pending.back() {
                check_holds(&mut self.client, p.revision, &p.fingerprint).await?;
            }
            while let Some(r) = self.pending.front().map(|(p, _)| p.revision) {
                self.confirmed(r);
            }
            tracing::info!(revision = now, "the destination is further than this follow sent (another follow?); counting up to it");
            self.ahead = Some(now);
            return Ok(());
        }
        if now > confirmed {
            let (p, _) = self
                .pending
                .iter()
                .find(|(p, _)| p.revision == now)
                .expect("a pending revision up to sent()");
            check_holds(&mut self.client, now, &p.fingerprint).await?;
            while self.applied.revision < now {
                let r = self.applied.revision + 1;
                self.confirmed(r);
            }
        }
        Ok(())
    }

    /// How to apply `record`: one op per event, or fewer when the
    /// destination's `--max-txn-ops` would refuse that many.
    async fn action_for(&mut self, record: &RevisionRecord) -> anyhow::Result<Action> {
        let events = &record.events;
        if events.len() > self.max_txn_ops && events.iter().all(|e| e.kind == EventKind::Delete) {
            if let Some(lease) = self.revoked_lease(events) {
                tracing::debug!(
                    revision = record.revision,
                    lease = format!("{lease:x}"),
                    "applied as a lease revoke"
                );
                return Ok(Action::Revoke {
                    lease,
                    keys: events.iter().map(|e| e.key.clone()).collect(),
                });
            }
        }
        let mut ops = Vec::new();
        let mut deletes = Vec::new();
        if events.len() <= self.max_txn_ops {
            for e in events {
                match e.kind {
                    EventKind::Put => {
                        let opts = (e.lease != 0)
                            .then(|| etcd_client::PutOptions::new().with_lease(e.lease));
                        ops.push(TxnOp::put(e.key.clone(), e.value.clone(), opts));
                        deletes.push(None);
                    }
                    EventKind::Delete => {
                        ops.push(TxnOp::delete(e.key.clone(), None));
                        deletes.push(Some(1));
                    }
                }
            }
        } else {
            // Runs of deletes become range deletes, each checked to cover
            // exactly the archived keys in the destination (which must be
            // at the previous revision to be counted).
            self.drain().await?;
            // etcd refuses a put inside a range deleted in the same
            // transaction: ranges never span one of this revision's puts.
            let puts: Vec<&[u8]> = events
                .iter()
                .filter(|e| e.kind == EventKind::Put)
                .map(|e| e.key.as_slice())
                .collect();
            let mut i = 0;
            while i < events.len() {
                let e = &events[i];
                if e.kind == EventKind::Put {
                    let opts =
                        (e.lease != 0).then(|| etcd_client::PutOptions::new().with_lease(e.lease));
                    ops.push(TxnOp::put(e.key.clone(), e.value.clone(), opts));
                    deletes.push(None);
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j + 1 < events.len()
                    && events[j + 1].kind == EventKind::Delete
                    && events[j + 1].key > events[j].key
                {
                    j += 1;
                }
                let keys: Vec<&[u8]> = events[i..=j].iter().map(|e| e.key.as_slice()).collect();
                for (from, to) in self.exact_ranges(record.revision - 1, &keys, &puts).await? {
                    let n = to - from;
                    let end = range_end_after(keys[to - 1]);
                    ops.push(TxnOp::delete(
                        keys[from].to_vec(),
                        Some(etcd_client::DeleteOptions::new().with_range(end)),
                    ));
                    deletes.push(Some(n as i64));
                }
                i = j + 1;
            }
            tracing::debug!(
                revision = record.revision,
                events = events.len(),
                ops = ops.len(),
                "applied with range deletes"
            );
            if ops.len() > self.max_txn_ops {
                bail!(
                    "archived revision {} holds {} events that need {} operations in one transaction, more than --max-txn-ops {}: raise etcd's --max-txn-ops on the destination and pass the same value to follow",
                    record.revision,
                    events.len(),
                    ops.len(),
                    self.max_txn_ops
                );
            }
        }
        Ok(Action::Txn { ops, deletes })
    }

    /// The lease whose keys are exactly those `deletes` removes, if any.
    fn revoked_lease(&self, deletes: &[Event]) -> Option<i64> {
        let lease = self.book.lease(&deletes.first()?.key)?;
        (self.book.key_count(lease) == deletes.len()
            && deletes
                .iter()
                .all(|e| self.book.lease(&e.key) == Some(lease))
            && deletes.windows(2).all(|w| w[0].key < w[1].key))
        .then_some(lease)
    }

    /// Splits sorted `keys` into index ranges `[from, to)` such that the
    /// destination at `revision` holds no other key between the first and
    /// the last key of each, and no key of `puts` lies between them.
    async fn exact_ranges(
        &mut self,
        revision: Revision,
        keys: &[&[u8]],
        puts: &[&[u8]],
    ) -> anyhow::Result<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        let mut todo = vec![(0, keys.len())];
        while let Some((from, to)) = todo.pop() {
            if to - from == 1 {
                out.push((from, to));
                continue;
            }
            let (first, last) = (keys[from], keys[to - 1]);
            let spans_put = puts.iter().any(|&p| p > first && p < last);
            let exact = !spans_put && {
                let resp = self
                    .client
                    .get(
                        first.to_vec(),
                        Some(
                            GetOptions::new()
                                .with_range(range_end_after(last))
                                .with_revision(revision)
                                .with_count_only(),
                        ),
                    )
                    .await
                    .context("count keys in the destination")?;
                resp.count() == (to - from) as i64
            };
            if exact {
                out.push((from, to));
            } else {
                let mid = from + (to - from) / 2;
                todo.push((mid, to));
                todo.push((from, mid));
            }
        }
        out.sort_unstable();
        Ok(out)
    }
}

/// The smallest key after `key` (a range `[a, range_end_after(b))` ends
/// right after `b`).
fn range_end_after(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    end.push(0);
    end
}

/// Compares that hold once a revision is applied.
#[derive(Clone, Debug)]
struct Guard {
    compares: Vec<Compare>,
    /// They hold only from that revision on (not at any earlier state of
    /// the destination), so a transaction guarded by them may be sent
    /// before its predecessor is confirmed.
    exact: bool,
}

/// The guard that holds once `record` is applied. A revision with a put
/// leaves that key at exactly its mod revision. A delete-only revision
/// leaves its first deleted key absent, which also holds before the key
/// was created; `last_put` (the newest earlier revision with a put, and
/// that put's key, untouched since) makes it exact: between that revision
/// and this one only deletes happened, so the deleted key existed at every
/// state from that revision until this one.
fn guard_after(record: &RevisionRecord, last_put: Option<&(Vec<u8>, Revision)>) -> Option<Guard> {
    if let Some(put) = record.events.iter().find(|e| e.kind == EventKind::Put) {
        return Some(Guard {
            compares: vec![Compare::mod_revision(
                put.key.clone(),
                CompareOp::Equal,
                record.revision,
            )],
            exact: true,
        });
    }
    let deleted = record.events.first()?;
    let absent = Compare::version(deleted.key.clone(), CompareOp::Equal, 0);
    Some(match last_put {
        Some((key, revision)) if !record.events.iter().any(|e| &e.key == key) => Guard {
            compares: vec![
                Compare::mod_revision(key.clone(), CompareOp::Equal, *revision),
                absent,
            ],
            exact: true,
        },
        _ => Guard {
            compares: vec![absent],
            exact: false,
        },
    })
}

/// The newest revision with a put and that put's key, after `record`.
fn last_put_after(
    record: &RevisionRecord,
    before: Option<(Vec<u8>, Revision)>,
) -> Option<(Vec<u8>, Revision)> {
    if let Some(put) = record.events.iter().find(|e| e.kind == EventKind::Put) {
        return Some((put.key.clone(), record.revision));
    }
    before.filter(|(key, _)| !record.events.iter().any(|e| &e.key == key))
}

/// Whether etcd refused a request for what it is (too large, too many
/// operations, a missing lease, no space, no permission): sending it again
/// cannot help. Told by etcd's messages, as the same status codes also
/// carry passing conditions (too many requests, an old auth revision).
fn is_refusal(e: &etcd_client::Error) -> bool {
    const REFUSALS: &[&str] = &[
        "too many operations in txn request",
        "request is too large",
        "requested lease not found",
        "duplicate key given in txn request",
        "database space exceeded",
        "permission denied",
        "authentication failed",
        "message length too large",
    ];
    matches!(e, etcd_client::Error::GRpcStatus(s) if REFUSALS.iter().any(|r| s.message().contains(r)))
}

fn refused(revision: Revision, e: etcd_client::Error) -> anyhow::Error {
    anyhow::Error::from(e).context(format!(
        "the destination refused archived revision {revision}; follow stopped (check the destination's --max-request-bytes, --max-txn-ops and --quota-backend-bytes against the source's)"
    ))
}

/// Events of a revision compared when recognising it in the destination.
const FINGERPRINT: usize = 16;

/// Compares that hold until `record` is applied: its first put's key has
/// an older mod revision, or else its first deleted key still exists (at
/// an older mod revision).
fn not_yet(record: &RevisionRecord) -> Vec<Compare> {
    let r = record.revision;
    if let Some(put) = record.events.iter().find(|e| e.kind == EventKind::Put) {
        return vec![Compare::mod_revision(put.key.clone(), CompareOp::Less, r)];
    }
    record
        .events
        .first()
        .map(|d| {
            vec![
                Compare::version(d.key.clone(), CompareOp::Greater, 0),
                Compare::mod_revision(d.key.clone(), CompareOp::Less, r),
            ]
        })
        .unwrap_or_default()
}

fn diverged(expected: Revision, got: Revision) -> anyhow::Error {
    Diverged(format!(
        "the destination is at revision {got} where archived revision {expected} was expected: something else wrote to it; follow stopped and wrote nothing more"
    ))
    .into()
}

/// The destination's cluster ID and current revision.
///
/// # Errors
/// etcd failures.
pub async fn cluster_and_revision(client: &mut Client) -> anyhow::Result<(u64, Revision)> {
    let resp = client
        .get(vec![0u8], Some(GetOptions::new().with_count_only()))
        .await
        .context("read the destination's revision")?;
    let header = resp.header().context("etcd response without header")?;
    Ok((header.cluster_id(), header.revision()))
}

/// The destination's current revision.
///
/// # Errors
/// etcd failures.
pub async fn current_revision(client: &mut Client) -> anyhow::Result<Revision> {
    Ok(cluster_and_revision(client).await?.1)
}

/// Checks, before revoking `lease` for archived revision `revision`, that
/// the destination's keys of that lease are exactly `keys` (the revision's
/// deletes): the revoke then deletes just those.
async fn check_lease_keys(
    client: &mut Client,
    revision: Revision,
    lease: i64,
    keys: &[Vec<u8>],
) -> anyhow::Result<()> {
    let status = client
        .lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .with_context(|| format!("look up lease {lease:x} in the destination"))?;
    let mut theirs = status.keys().to_vec();
    theirs.sort_unstable();
    if theirs != keys {
        return Err(Diverged(format!(
            "archived revision {revision} deletes the {} keys of lease {lease:x}, which has {} keys in the destination; follow stopped and wrote nothing more",
            keys.len(),
            theirs.len()
        ))
        .into());
    }
    Ok(())
}

/// Checks that the destination's revision `revision` is the archived one:
/// its first events' keys read as the archive says at that revision.
async fn check_holds(
    client: &mut Client,
    revision: Revision,
    events: &[Event],
) -> anyhow::Result<()> {
    for e in events {
        let resp = client
            .get(
                e.key.clone(),
                Some(GetOptions::new().with_revision(revision)),
            )
            .await
            .context("read the destination")?;
        let kv = resp.kvs().first();
        let same = match (e.kind, kv) {
            (EventKind::Put, Some(kv)) => {
                kv.mod_revision() == revision
                    && kv.create_revision() == e.create_revision
                    && kv.version() == e.version
                    && kv.value() == e.value.as_slice()
                    && kv.lease() == e.lease
            }
            (EventKind::Delete, None) => true,
            _ => false,
        };
        if !same {
            return Err(Diverged(format!(
                "the destination's revision {revision} is not the archive's: key {} differs",
                e.key.escape_ascii()
            ))
            .into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(revision: Revision, events: &[(EventKind, &str)]) -> RevisionRecord {
        RevisionRecord {
            revision,
            observed_ms: 0,
            catching_up: false,
            events: events
                .iter()
                .map(|&(kind, key)| Event {
                    kind,
                    key: key.as_bytes().to_vec(),
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: revision,
                    version: 0,
                    lease: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_revisions_mark_is_its_first_put_else_a_deleted_key_after_the_last_put() {
        let mixed = record(5, &[(EventKind::Delete, "a"), (EventKind::Put, "b")]);
        let g = guard_after(&mixed, None).expect("a guard");
        assert!(g.exact, "a put marks the revision exactly");
        assert_eq!(
            format!("{:?}", g.compares),
            format!("{:?}", [Compare::mod_revision("b", CompareOp::Equal, 5)])
        );
        let last_put = last_put_after(&mixed, None);
        assert_eq!(last_put, Some((b"b".to_vec(), 5)));
        let deletes = record(6, &[(EventKind::Delete, "x"), (EventKind::Delete, "y")]);
        let g = guard_after(&deletes, last_put.as_ref()).expect("a guard");
        assert!(g.exact, "the last put pins the state before the deletes");
        assert_eq!(
            format!("{:?}", g.compares),
            format!(
                "{:?}",
                [
                    Compare::mod_revision("b", CompareOp::Equal, 5),
                    Compare::version("x", CompareOp::Equal, 0)
                ]
            )
        );
        let still = last_put_after(&deletes, last_put);
        assert_eq!(still, Some((b"b".to_vec(), 5)));
        // Deleting the last put's key loses the pin.
        let gone = record(7, &[(EventKind::Delete, "b")]);
        let g = guard_after(&gone, still.as_ref()).expect("a guard");
        assert!(!g.exact);
        assert_eq!(last_put_after(&gone, still), None);
        assert!(!guard_after(&deletes, None).expect("a guard").exact);
    }

    #[test]
    fn a_range_ends_right_after_its_last_key() {
        assert_eq!(range_end_after(b"/a"), b"/a\0".to_vec());
        assert!(b"/a\0".as_slice() > b"/a".as_slice() && b"/a\0".as_slice() < b"/a\0\0".as_slice());
    }

    #[test]
    fn refusals_are_told_from_passing_conditions() {
        use tonic::Code;
        let status =
            |code, message: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, message));
        assert!(is_refusal(&status(
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request"
        )));
        assert!(is_refusal(&status(
            Code::InvalidArgument,
            "etcdserver: request is too large"
        )));
        assert!(is_refusal(&status(
            Code::NotFound,
            "etcdserver: requested lease not found"
        )));
        assert!(is_refusal(&status(
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded"
        )));
        assert!(!is_refusal(&status(
            Code::ResourceExhausted,
            "etcdserver: too many requests"
        )));
        assert!(!is_refusal(&status(
            Code::InvalidArgument,
            "etcdserver: revision of auth store is old"
        )));
        assert!(!is_refusal(&status(
            Code::Unavailable,
            "etcdserver: leader changed"
        )));
    }

    #[test]
    fn a_revision_not_yet_applied_is_told_by_its_first_change() {
        let put = record(9, &[(EventKind::Delete, "a"), (EventKind::Put, "b")]);
        let c = not_yet(&put);
        assert_eq!(
            format!("{c:?}"),
            format!("{:?}", [Compare::mod_revision("b", CompareOp::Less, 9)])
        );
        let del = record(9, &[(EventKind::Delete, "a")]);
        let c = not_yet(&del);
        assert_eq!(
            format!("{c:?}"),
            format!(
                "{:?}",
                [
                    Compare::version("a", CompareOp::Greater, 0),
                    Compare::mod_revision("a", CompareOp::Less, 9)
                ]
            )
        );
    }
}
