//! One watch session: the whole keyspace from the last archived revision + 1,
//! assembled into complete revisions and handed to the segment writer.
//!
//! Watch responses are requested fragmented, so no message grows past etcd's
//! request limit however large a revision is; fragments are reassembled here.
//! Only the revision being assembled is held in memory. When the watcher
//! falls far behind, revisions are fetched through several watchers over
//! consecutive revision windows, then one watcher follows the head again.

use std::time::Duration;

use anyhow::Context;
use std::sync::Arc;

use std::collections::VecDeque;

use etcd_client::{
    Client, EventType, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
};
use etcdpitr_common::segment::{Event, EventKind, LeaseRecord, RevisionRecord};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::etcd::MAX_MESSAGE_BYTES;
use crate::observe::Observer;
use crate::segment_writer::SegmentWriter;
use crate::snapshot_schedule::SnapshotSchedule;
use crate::uploader::Spool;

/// Why a watch session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// etcd compacted past the resume point.
    Compacted {
        /// The compaction revision etcd reported.
        compact_revision: Revision,
    },
    /// The stream skipped or repeated revisions: not the archived history.
    Diverged(String),
    /// The connection failed; reconnecting may help.
    Disconnected(anyhow::Error),
    /// A revision cannot be archived (e.g. it exceeds the format's limits);
    /// reading it again would fail again, so the archiver stops.
    Fatal(anyhow::Error),
}

/// How often to ask for a progress notification while no events arrive, at
/// most: a shorter `--idle-interval` asks as often (so that an idle source is
/// vouched for that soon, which a migration's cutover waits for).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How often to check whether the open segment is due for sealing.
const SEAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// A lag, in revisions, beyond which the session switches to windowed
/// catch-up. etcd serves a lagging watcher at most 1000 revisions per
/// 100 ms; several watchers over consecutive revision windows are each
/// served that much per pass, so catch-up runs several times faster.
const CATCH_UP_LAG: i64 = 5000;
/// Revisions per catch-up window: one etcd catch-up batch.
const CATCH_UP_WINDOW: i64 = 1000;
/// Catch-up windows in flight.
const CATCH_UP_WINDOWS: usize = 8;

/// Opens a watch of the whole keyspace from `start` and reads it in its own
/// task with `budget` bytes of buffer.
async fn open_watch(
    client: &Client,
    start: Revision,
    budget: u32,
) -> Result<
    (
        WatchRequestSender,
        mpsc::UnboundedReceiver<Received>,
        AbortOnDrop,
    ),
    SessionEnd,
> {
    let options = WatchOptions::new()
        .with_all_keys()
        .with_start_revision(start)
        .with_fragment()
        .with_progress_notify();
    let mut watch_client = client
        .watch_client()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (requests, responses) = match watch_client.watch(vec![0u8], Some(options)).await {
        Ok(s) => s.split(),
        Err(e) => {
            return Err(SessionEnd::Disconnected(
                anyhow::Error::from(e).context("open watch"),
            ))
        }
    };
    let (received, receiver) = receive(responses, budget);
    Ok((requests, received, receiver))
}

/// Takes the response out of a received message, or says how the stream ended.
fn response_of(message: Option<Received>) -> Result<WatchResponse, SessionEnd> {
    let response = match message {
        Some((Ok(Some(r)), _permit)) => r,
        None => {
            return Err(SessionEnd::Disconnected(anyhow::anyhow!(
                "watch receiver stopped"
            )))
        }
        Some((Ok(None), _)) => {
            return Err(SessionEnd::Disconnected(anyhow::anyhow!(
                "watch stream closed by etcd"
            )))
        }
        Some((Err(e), _)) => {
            return Err(SessionEnd::Disconnected(
                anyhow::Error::from(e).context("watch stream"),
            ))
        }
    };
    if response.canceled() {
        if response.compact_revision() > 0 {
            return Err(SessionEnd::Compacted {
                compact_revision: response.compact_revision(),
            });
        }
        return Err(SessionEnd::Disconnected(anyhow::anyhow!(
            "watch canceled by etcd: {}",
            response.cancel_reason()
        )));
    }
    Ok(response)
}

/// Assembles complete revisions from (possibly fragmented) responses and
/// hands them to the writer, refusing holes.
struct Assembler {
    /// The revision being assembled.
    pending: Option<RevisionRecord>,
    /// Revisions up to here were committed before they were observed.
    caught_up_at: Revision,
    /// Told the source's revision from every response's header.
    observer: Observer,
}

impl Assembler {
    /// Takes the response out of a received message (see [`response_of`]),
    /// telling the observer the source's revision its header carries.
    fn response(&self, message: Option<Received>) -> Result<WatchResponse, SessionEnd> {
        let response = response_of(message)?;
        if let Some(header) = response.header() {
            self.observer.source_at(header.revision());
        }
        Ok(response)
    }

    /// Feeds one response's events up to revision `until`; returns whether
    /// the response went past `until` (everything up to it is then complete).
    async fn feed(
        &mut self,
        client: &mut Client,
        writer: &mut SegmentWriter,
        response: &WatchResponse,
        until: Revision,
    ) -> Result<bool, SessionEnd> {
        let observed_ms = writer.observe_ms();
        let mut passed = false;
        for event in response.events() {
            let Some(kv) = event.kv() else {
                return Err(SessionEnd::Diverged("watch event without key-value".into()));
            };
            let revision = kv.mod_revision();
            if revision > until {
                passed = true;
                break;
            }
            let converted = convert(event.event_type(), kv);
            match &mut self.pending {
                Some(p) if p.revision == revision => p.events.push(converted),
                _ => {
                    if let Some(done) = self.pending.take() {
                        complete(client, writer, done).await?;
                    }
                    if revision != writer.last_revision() + 1 {
                        return Err(SessionEnd::Diverged(format!(
                            "watch delivered revision {revision} after {}",
                            writer.last_revision()
                        )));
                    }
                    self.pending = Some(RevisionRecord {
                        revision,
                        observed_ms,
                        catching_up: revision <= self.caught_up_at,
                        events: vec![converted],
                    });
                }
            }
        }
        // A response that is not a fragment ends at a revision boundary.
        if passed || !response.0.fragment {
            if let Some(done) = self.pending.take() {
                complete(client, writer, done).await?;
            }
        }
        Ok(passed)
    }
}

/// Records the clock steps the writer's clock has seen (see
/// [`crate::clock`]). Safe to drop.
async fn record_clock_steps(
    writer: &mut SegmentWriter,
    archive: &Archive,
    shutdown: &CancellationToken,
) -> Result<(), SessionEnd> {
    let generation = writer.generation();
    match crate::clock::record_pending(archive, shutdown, generation, writer.clock_mut()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(SessionEnd::Shutdown),
        // Still pending: the next session records it.
        Err(e) => Err(SessionEnd::Disconnected(e)),
    }
}

/// Records clock steps and seals what is due, then waits while the spool
/// is full. Safe to drop.
async fn make_room(
    writer: &mut SegmentWriter,
    spool: &Spool,
    archive: &Archive,
    shutdown: &CancellationToken,
) -> Result<(), SessionEnd> {
    record_clock_steps(writer, archive, shutdown).await?;
    writer.seal_if_due().map_err(SessionEnd::Disconnected)?;
    tokio::select! {
        biased;
        () = shutdown.cancelled() => Err(SessionEnd::Shutdown),
        () = spool.wait_for_room() => Ok(()),
    }
}

/// Fetches revisions up to `target` through consecutive revision windows,
/// each with its own watcher, appending them in order.
async fn catch_up(
    client: &mut Client,
    writer: &mut SegmentWriter,
    spool: &Spool,
    archive: &Archive,
    assembler: &mut Assembler,
    target: Revision,
    shutdown: &CancellationToken,
) -> Result<(), SessionEnd> {
    struct Window {
        last: Revision,
        received: mpsc::UnboundedReceiver<Received>,
        _requests: WatchRequestSender,
        _receiver: AbortOnDrop,
    }
    let budget = RECEIVE_BUFFER_BYTES / CATCH_UP_WINDOWS as u32;
    let mut next_first = writer.last_revision() + 1;
    let mut windows: VecDeque<Window> = VecDeque::new();
    tracing::info!(
        from_revision = next_first,
        to_revision = target,
        "catching up through parallel windows"
    );
    loop {
        while windows.len() < CATCH_UP_WINDOWS && next_first <= target {
            let last = (next_first + CATCH_UP_WINDOW - 1).min(target);
            let (requests, received, receiver) = open_watch(client, next_first, budget).await?;
            windows.push_back(Window {
                last,
                received,
                _requests: requests,
                _receiver: receiver,
            });
            next_first = last + 1;
        }
        let Some(window) = windows.front_mut() else {
            return Ok(());
        };
        while writer.last_revision() < window.last {
            make_room(writer, spool, archive, shutdown).await?;
            let message = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Err(SessionEnd::Shutdown),
                m = window.received.recv() => m,
            };
            let response = assembler.response(message)?;
            if assembler
                .feed(client, writer, &response, window.last)
                .await?
            {
                break;
            }
        }
        windows.pop_front();
    }
}

/// Runs one watch session until shutdown or failure.
///
/// `caught_up_at` is the cluster's revision when the session started:
/// revisions up to it were committed before they were observed, so their
/// observed time is flagged as an upper bound. Every response's header
/// tells `observer` the source's revision.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: &mut Client,
    writer: &mut SegmentWriter,
    spool: &Spool,
    archive: &Archive,
    snapshots: &mut SnapshotSchedule,
    caught_up_at: Revision,
    observer: &Observer,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let mut assembler = Assembler {
        pending: None,
        caught_up_at,
        observer: observer.clone(),
    };
    loop {
        let target = match follow(
            client,
            writer,
            spool,
            archive,
            snapshots,
            &mut assembler,
            shutdown,
        )
        .await
        {
            Ok(target) => target,
            Err(end) => return end,
        };
        // Everything up to `target` is already committed: observed late.
        assembler.caught_up_at = assembler.caught_up_at.max(target);
        if let Err(end) = catch_up(
            client,
            writer,
            spool,
            archive,
            &mut assembler,
            target,
            shutdown,
        )
        .await
        {
            return end;
        }
    }
}

/// Follows the head of the history with one watcher. Returns the cluster's
/// revision when the watcher fell more than [`CATCH_UP_LAG`] behind.
async fn follow(
    client: &mut Client,
    writer: &mut SegmentWriter,
    spool: &Spool,
    archive: &Archive,
    snapshots: &mut SnapshotSchedule,
    assembler: &mut Assembler,
    shutdown: &CancellationToken,
) -> Result<Revision, SessionEnd> {
    let start = writer.last_revision() + 1;
    let (mut requests, mut received, _receiver) =
        open_watch(client, start, RECEIVE_BUFFER_BYTES).await?;
    tracing::info!(generation = %writer.generation(), from_revision = start, "watching the whole keyspace");
    let mut progress_tick = tokio::time::interval(PROGRESS_INTERVAL.min(writer.idle_interval()));
    let mut seal_tick = tokio::time::interval(SEAL_CHECK_INTERVAL);
    let mut events_since_tick = true;
    loop {
        // Backpressure: while the spool is full, stop reading the watch.
        make_room(writer, spool, archive, shutdown).await?;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return Err(SessionEnd::Shutdown),
            _ = seal_tick.tick() => {}
            result = snapshots.next_done() => {
                snapshots.finished(result);
            }
            _ = progress_tick.tick() => {
                if !std::mem::take(&mut events_since_tick) {
                    if let Err(e) = requests.request_progress().await {
                        return Err(SessionEnd::Disconnected(anyhow::Error::from(e).context("request progress")));
                    }
                }
                snapshots.start_if_due(client);
                // A step seen here is recorded by `make_room` next.
                writer.check_clock();
            }
            message = received.recv() => {
                let response = assembler.response(message)?;
                let header_revision = response.header().map_or(0, etcd_client::ResponseHeader::revision);
                if response.events().is_empty() {
                    if !response.created() && assembler.pending.is_none() {
                        let observed_ms = writer.observe_ms();
                        writer.note_progress(header_revision, observed_ms);
                    }
                    continue;
                }
                events_since_tick = true;
                // Record a step before appending what was observed after it.
                writer.check_clock();
                record_clock_steps(writer, archive, shutdown).await?;
                assembler.feed(client, writer, &response, Revision::MAX).await?;
                if assembler.pending.is_none() && header_revision - writer.last_revision() > CATCH_UP_LAG {
                    return Ok(header_revision);
                }
            }
        }
    }
}

/// Bytes of received but unprocessed watch responses held at most. Reading
/// the stream never waits for sealing or a lease lookup: a watcher whose
/// server-side buffer fills is demoted by etcd to catch-up mode, which
/// delivers at most 1000 revisions per 100 ms and may never catch up.
const RECEIVE_BUFFER_BYTES: u32 = 64 << 20;

type Received = (
    Result<Option<WatchResponse>, etcd_client::Error>,
    Option<OwnedSemaphorePermit>,
);

/// Aborts a task when dropped (e.g. the watch receiver when its session
/// ends).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the watch stream in its own task into a queue bounded by bytes.
fn receive(
    mut responses: WatchResponseStream,
    budget_bytes: u32,
) -> (mpsc::UnboundedReceiver<Received>, AbortOnDrop) {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(budget_bytes as usize));
    let task = tokio::spawn(async move {
        loop {
            let message = responses.message().await;
            let size = match &message {
                Ok(Some(r)) => r
                    .events()
                    .iter()
                    .filter_map(etcd_client::Event::kv)
                    .map(|kv| kv.key().len() + kv.value().len() + 64)
                    .sum::<usize>(),
                _ => 0,
            };
            let last = !matches!(message, Ok(Some(_)));
            let permits = u32::try_from(size).unwrap_or(u32::MAX).min(budget_bytes);
            let permit = budget.clone().acquire_many_owned(permits).await.ok();
            if tx.send((message, permit)).is_err() || last {
                return;
            }
        }
    });
    (rx, AbortOnDrop(task))
}

/// Converts a watch event into the archived form.
pub fn convert(kind: EventType, kv: &etcd_client::KeyValue) -> Event {
    match kind {
        EventType::Put => Event {
            kind: EventKind::Put,
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
            lease: kv.lease(),
        },
        EventType::Delete => Event {
            kind: EventKind::Delete,
            key: kv.key().to_vec(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: kv.mod_revision(),
            version: 0,
            lease: 0,
        },
    }
}

/// Looks up leases the revision references for the first time, then appends.
async fn complete(
    client: &mut Client,
    writer: &mut SegmentWriter,
    record: RevisionRecord,
) -> Result<(), SessionEnd> {
    let mut leases: Vec<LeaseRecord> = Vec::new();
    for event in &record.events {
        if writer.lease_unknown(event.lease) && !leases.iter().any(|l| l.id == event.lease) {
            let ttl_secs = lease_ttl(client, event.lease)
                .await
                .map_err(SessionEnd::Disconnected)?;
            leases.push(LeaseRecord {
                id: event.lease,
                ttl_secs,
                revision: record.revision,
            });
        }
    }
    let revision = record.revision;
    writer
        .append(&leases, record)
        .map_err(|e| SessionEnd::Fatal(e.context(format!("archive revision {revision}"))))
}

/// Granted TTL of a lease. A lease that already expired reports no TTL;
/// its keys are about to be deleted, and 1 second is recorded so a restore
/// to a revision where they still live has a lease to attach them to.
async fn lease_ttl(client: &mut Client, id: i64) -> anyhow::Result<i64> {
    let resp = client
        .lease_time_to_live(id, None)
        .await
        .with_context(|| format!("look up lease {id:x}"))?;
    Ok(resp.granted_ttl().max(1))
}
