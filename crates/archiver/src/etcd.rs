//! Connecting to etcd and the few reads the archiver makes besides the watch.

use std::time::Duration;

use anyhow::Context;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use etcdpitr_common::segment::{Event, EventKind, RevisionRecord};
use etcdpitr_common::Revision;

use crate::config::Config;

/// Largest gRPC message accepted from etcd. Fragmented watch responses stay
/// near etcd's request limit, but a single event (or a snapshot of a key
/// with a huge value) may exceed tonic's 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// Whether an etcd error is final (bad credentials or permissions), as
/// opposed to a member or network failure worth retrying.
pub fn is_denied(error: &anyhow::Error) -> bool {
    error.chain().any(|c| {
        matches!(
            c.downcast_ref::<etcd_client::Error>(),
            Some(etcd_client::Error::GRpcStatus(s)) if matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || s.message().contains("authentication failed")
        )
    })
}

/// Whether an etcd error says the auth token is invalid or expired. Most
/// RPCs answer `Unauthenticated`; etcd 3.5's Maintenance.Snapshot answers
/// `Unknown` with "auth: invalid auth token", which the client's own refresh
/// does not recognize.
pub fn is_invalid_token(error: &etcd_client::Error) -> bool {
    matches!(
        error,
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unauthenticated
            || s.message().contains("invalid auth token")
    )
}

/// Runs `call`, and once more after re-authenticating if etcd says the
/// token expired (a no-op refresh without credentials).
///
/// # Errors
/// The call's error, or the re-authentication's.
pub async fn with_fresh_token<T, F, Fut>(client: &Client, mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match call().await {
        Err(e) if is_invalid_token(&e) => {
            tracing::debug!("etcd auth token expired; re-authenticating");
            client
                .refresh_token()
                .await
                .context("re-authenticate with etcd")?;
            Ok(call().await?)
        }
        other => Ok(other?),
    }
}

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
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let mut t = TlsOptions::new();
        if let Some(ca) = &tls.ca_pem {
            t = t.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(Identity::from_pem(cert, key));
        }
        opts = opts.with_tls(t);
    }
    if let Some((user, password)) = &config.auth {
        // etcd expires auth tokens (simple tokens after `--auth-token-ttl`
        // idle seconds, JWTs at their expiry). The client re-authenticates
        // and retries once on `Unauthenticated`; the snapshot RPC reports
        // an expired token differently, see `with_fresh_token`.
        opts = opts
            .with_user(user.clone(), password.0.clone())
            .with_auto_token_refresh(true);
    }
    Client::connect(&config.endpoints, Some(opts))
        .await
        .with_context(|| format!("connect to etcd at {}", config.endpoints.join(",")))
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
