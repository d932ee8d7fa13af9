//! One watch session: the whole keyspace from the last archived revision + 1,
//! assembled into complete revisions and handed to the segment writer.
//!
//! Watch responses are requested fragmented, so no message grows past etcd's
//! request limit however large a revision is; fragments are reassembled here.
//! Only the revision being assembled is held in memory.

use std::time::Duration;

use anyhow::Context;
use std::sync::Arc;

use etcd_client::{Client, EventType, WatchOptions, WatchResponse, WatchResponseStream};
use etcdpitr_common::segment::{Event, EventKind, LeaseRecord, RevisionRecord};
use etcdpitr_common::{now_ms, Revision};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::etcd::MAX_MESSAGE_BYTES;
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
}

/// How often to ask for a progress notification while no events arrive.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How often to check whether the open segment is due for sealing.
const SEAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Runs one watch session until shutdown or failure.
///
/// `caught_up_at` is the cluster's revision when the session started:
/// revisions up to it were committed before they were observed, so their
/// observed time is flagged as an upper bound.
pub async fn run(
    client: &mut Client,
    writer: &mut SegmentWriter,
    spool: &Spool,
    snapshots: &mut SnapshotSchedule,
    caught_up_at: Revision,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let start = writer.last_revision() + 1;
    let options = WatchOptions::new()
        .with_all_keys()
        .with_start_revision(start)
        .with_fragment()
        .with_progress_notify();
    let mut watch_client = client
        .watch_client()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let (mut requests, responses) = match watch_client.watch(vec![0u8], Some(options)).await {
        Ok(s) => s.split(),
        Err(e) => return SessionEnd::Disconnected(anyhow::Error::from(e).context("open watch")),
    };
    let (mut received, _receiver) = receive(responses);
    tracing::info!(generation = %writer.generation(), from_revision = start, "watching the whole keyspace");
    // The revision being assembled from (possibly fragmented) responses.
    let mut pending: Option<RevisionRecord> = None;
    let mut progress_tick = tokio::time::interval(PROGRESS_INTERVAL);
    let mut seal_tick = tokio::time::interval(SEAL_CHECK_INTERVAL);
    let mut events_since_tick = true;
    loop {
        // Backpressure: while the spool is full, stop reading the watch.
        if let Err(e) = writer.seal_if_due() {
            return SessionEnd::Disconnected(e);
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            () = spool.wait_for_room() => {}
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            _ = seal_tick.tick() => {}
            result = snapshots.next_done() => {
                snapshots.finished(result);
            }
            _ = progress_tick.tick() => {
                if !std::mem::take(&mut events_since_tick) {
                    if let Err(e) = requests.request_progress().await {
                        return SessionEnd::Disconnected(anyhow::Error::from(e).context("request progress"));
                    }
                }
                snapshots.start_if_due(client);
            }
            message = received.recv() => {
                let response = match message {
                    Some((Ok(Some(r)), _permit)) => r,
                    None => return SessionEnd::Disconnected(anyhow::anyhow!("watch receiver stopped")),
                    Some((Ok(None), _)) => return SessionEnd::Disconnected(anyhow::anyhow!("watch stream closed by etcd")),
                    Some((Err(e), _)) => return SessionEnd::Disconnected(anyhow::Error::from(e).context("watch stream")),
                };
                if response.canceled() {
                    if response.compact_revision() > 0 {
                        return SessionEnd::Compacted { compact_revision: response.compact_revision() };
                    }
                    return SessionEnd::Disconnected(anyhow::anyhow!(
                        "watch canceled by etcd: {}", response.cancel_reason()
                    ));
                }
                let header_revision = response.header().map_or(0, etcd_client::ResponseHeader::revision);
                if response.events().is_empty() {
                    if !response.created() && pending.is_none() {
                        writer.note_progress(header_revision, now_ms());
                    }
                    continue;
                }
                events_since_tick = true;
                let observed_ms = now_ms();
                for event in response.events() {
                    let Some(kv) = event.kv() else {
                        return SessionEnd::Diverged("watch event without key-value".into());
                    };
                    let revision = kv.mod_revision();
                    let converted = convert(event.event_type(), kv);
                    match &mut pending {
                        Some(p) if p.revision == revision => p.events.push(converted),
                        _ => {
                            if let Some(done) = pending.take() {
                                if let Err(end) = complete(client, writer, done).await {
                                    return end;
                                }
                            }
                            if revision != writer.last_revision() + 1 {
                                return SessionEnd::Diverged(format!(
                                    "watch delivered revision {revision} after {}",
                                    writer.last_revision()
                                ));
                            }
                            pending = Some(RevisionRecord {
                                revision,
                                observed_ms,
                                catching_up: revision <= caught_up_at,
                                events: vec![converted],
                            });
                        }
                    }
                }
                // A response that is not a fragment ends at a revision boundary.
                if !response.0.fragment {
                    if let Some(done) = pending.take() {
                        if let Err(end) = complete(client, writer, done).await {
                            return end;
                        }
                    }
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

/// Aborts the receiver task when the session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the watch stream in its own task into a queue bounded by bytes.
fn receive(mut responses: WatchResponseStream) -> (mpsc::UnboundedReceiver<Received>, AbortOnDrop) {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(RECEIVE_BUFFER_BYTES as usize));
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
            let permits = u32::try_from(size)
                .unwrap_or(u32::MAX)
                .min(RECEIVE_BUFFER_BYTES);
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
    writer
        .append(&leases, record)
        .map_err(SessionEnd::Disconnected)
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
