//! Connecting to etcd and the few reads the archiver makes besides the watch.

use anyhow::Context;
use etcd_client::{Client, GetOptions};
use etcdpitr_common::segment::{Event, EventKind, RevisionRecord};
use etcdpitr_common::Revision;

use crate::config::Config;

pub use etcdpitr_common::etcd::{is_denied, with_fresh_token, MAX_MESSAGE_BYTES};

/// What the cluster says about itself in a response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterInfo {
    /// Cluster ID.
    pub cluster_id: u64,
    /// Current revision.
    pub revision: Revision,
}

/// Connects to etcd with the configured endpoints, TLS and credentials.
///
/// # Errors
/// Connection or authentication failures.
pub async fn connect(config: &Config) -> anyhow::Result<Client> {
    config.etcd.connect().await
}

/// Reads the cluster ID and current revision (a linearizable read of one
/// key, which costs the same whatever the database size).
///
/// # Errors
/// RPC failures.
pub async fn cluster_info(client: &mut Client) -> anyhow::Result<ClusterInfo> {
    let resp = client
        .kv_client()
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .get(vec![0u8], Some(GetOptions::new().with_count_only()))
        .await
        .context("read cluster revision")?;
    let header = resp.header().context("etcd response without header")?;
    Ok(ClusterInfo {
        cluster_id: header.cluster_id(),
        revision: header.revision(),
    })
}

/// Whether the last archived revision still reads the same in the cluster.
#[derive(Debug, PartialEq, Eq)]
pub enum Lineage {
    /// Every checked event matches.
    Same,
    /// Something differs: the cluster's history is not the archived one.
    Diverged(String),
    /// The revision was compacted away, so it cannot be checked.
    Compacted,
}

/// How many events of the last revision are compared (a revision can hold
/// thousands; a handful is enough to tell two histories apart).
const LINEAGE_SAMPLE: usize = 16;

/// Checks that the events of `record` read the same at their revision.
///
/// # Errors
/// RPC failures other than compaction.
pub async fn check_lineage(
    client: &mut Client,
    record: &RevisionRecord,
) -> anyhow::Result<Lineage> {
    let kv = client
        .kv_client()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    for event in record.events.iter().rev().take(LINEAGE_SAMPLE) {
        let at = |revision: Revision| {
            let opts = GetOptions::new().with_revision(revision);
            let mut kv = kv.clone();
            let key = event.key.clone();
            async move { kv.get(key, Some(opts)).await }
        };
        let resp = match at(record.revision).await {
            Ok(r) => r,
            Err(e) => return lineage_error(e, record.revision),
        };
        let same = match (event.kind, resp.kvs().first()) {
            // A deleted key must also have existed just before: a delete of
            // a key the cluster never had reads the same "absent" at the
            // revision itself, whatever the history.
            (EventKind::Delete, None) => match at(record.revision - 1).await {
                Ok(before) => !before.kvs().is_empty(),
                Err(e) => return lineage_error(e, record.revision),
            },
            (EventKind::Put, Some(kv)) => same_put(event, kv),
            _ => false,
        };
        if !same {
            return Ok(Lineage::Diverged(format!(
                "key {:?} reads differently at revision {}",
                String::from_utf8_lossy(&event.key),
                record.revision
            )));
        }
    }
    Ok(Lineage::Same)
}

/// What a failed read-back says about lineage.
fn lineage_error(e: etcd_client::Error, revision: Revision) -> anyhow::Result<Lineage> {
    match e {
        etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted") => {
            Ok(Lineage::Compacted)
        }
        etcd_client::Error::GRpcStatus(s) if s.message().contains("future revision") => Ok(
            Lineage::Diverged(format!("revision {revision} is in the cluster's future")),
        ),
        e => Err(e).context("read the last archived revision back"),
    }
}

fn same_put(event: &Event, kv: &etcd_client::KeyValue) -> bool {
    kv.key() == event.key.as_slice()
        && kv.value() == event.value.as_slice()
        && kv.create_revision() == event.create_revision
        && kv.mod_revision() == event.mod_revision
        && kv.version() == event.version
        && kv.lease() == event.lease
}
