//! Oracles: what the archive holds, what etcd's own history and reads say,
//! and comparisons between them.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcdpitr_common::chain;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::segment::{self, Record, RevisionRecord};
use etcdpitr_common::store::Archive;

/// Every revision archived in one generation, decoded and checked.
pub struct ArchivedGeneration {
    /// Generation id.
    pub id: GenerationId,
    /// The chain's start revision.
    pub start_revision: i64,
    /// Revisions in order.
    pub revisions: Vec<RevisionRecord>,
    /// Lease ids with a lease record.
    pub leases: Vec<i64>,
    /// Snapshot revisions.
    pub snapshots: Vec<i64>,
    /// The manifest's reason, as JSON text.
    pub reason: String,
}

/// Reads and decodes every generation of an archive, checking that each
/// chain is contiguous (every revision exactly once).
///
/// # Errors
/// Store or decode failures, or a chain with a hole or duplicate.
pub async fn read_archive(url: &str) -> anyhow::Result<Vec<ArchivedGeneration>> {
    read_archive_in(&Archive::open(url)?).await
}

/// [`read_archive`] through an archive handle (e.g. one with keys).
///
/// # Errors
/// As for [`read_archive`].
pub async fn read_archive_in(archive: &Archive) -> anyhow::Result<Vec<ArchivedGeneration>> {
    let listing = ArchiveListing::load(archive).await?;
    let mut out = Vec::new();
    for g in &listing.generations {
        let manifest = g.manifest.clone().context("generation without manifest")?;
        let chain = g.chain();
        if !chain.gaps().is_empty() {
            bail!(
                "generation {} has holes: {:?}",
                g.generation(),
                chain.gaps()
            );
        }
        let mut revisions: Vec<RevisionRecord> = Vec::new();
        let mut leases = Vec::new();
        let mut continuity = chain::Continuity::after(manifest.start_revision);
        for name in &chain.links {
            let key = layout::segment_key(g.generation(), name);
            let bytes = archive.get(&key).await?;
            let (header, records) = segment::decode_all(&key, &bytes)?;
            chain::check_segment_header(&key, g.generation(), name, &header)?;
            for r in records {
                match r {
                    Record::Revision(r) => {
                        if continuity.admit(&key, r.revision)? {
                            revisions.push(r);
                        } else {
                            // An overlap (another writer): it must agree.
                            let i = revisions
                                .binary_search_by_key(&r.revision, |x| x.revision)
                                .map_err(|_| {
                                    anyhow::anyhow!("{key}: revision {} unmatched", r.revision)
                                })?;
                            if chain::revision_digest(&revisions[i]) != chain::revision_digest(&r) {
                                bail!("{key}: revision {} differs from the chain's", r.revision);
                            }
                        }
                    }
                    Record::Lease(l) => leases.push(l.id),
                    Record::Progress { .. } => {}
                }
            }
        }
        out.push(ArchivedGeneration {
            id: g.generation(),
            start_revision: manifest.start_revision,
            revisions,
            leases,
            snapshots: g.snapshots.clone(),
            reason: format!("{:?}", manifest.reason),
        });
    }
    Ok(out)
}

/// The source's own history `from..=to`, read with a fresh watch: the oracle
/// the archive is compared with (the test clusters are never compacted in
/// that range).
///
/// # Errors
/// etcd failures.
pub async fn source_history(
    client: &mut etcd_client::Client,
    from: i64,
    to: i64,
) -> anyhow::Result<Vec<RevisionRecord>> {
    use etcd_client::WatchOptions;
    let mut out: Vec<RevisionRecord> = Vec::new();
    if from > to {
        return Ok(out);
    }
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(256 << 20)
        .watch(
            vec![0u8],
            Some(
                WatchOptions::new()
                    .with_all_keys()
                    .with_start_revision(from),
            ),
        )
        .await?;
    while out.last().is_none_or(|r| r.revision < to) {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .context("oracle watch stalled")??
            .context("oracle watch closed")?;
        for e in resp.events() {
            let kv = e.kv().context("event without kv")?;
            if kv.mod_revision() > to {
                continue;
            }
            let event = etcd_archiver::watch::convert(e.event_type(), kv);
            match out.last_mut() {
                Some(r) if r.revision == kv.mod_revision() => r.events.push(event),
                _ => out.push(RevisionRecord {
                    revision: kv.mod_revision(),
                    observed_ms: 0,
                    catching_up: false,
                    events: vec![event],
                }),
            }
        }
    }
    Ok(out)
}

/// Asserts that `archived` holds exactly the source's revisions, event for
/// event, and a lease record for every lease a put referenced.
///
/// # Errors
/// The first difference.
pub fn compare_with_source(
    archived: &ArchivedGeneration,
    source: &[RevisionRecord],
) -> anyhow::Result<()> {
    if archived.revisions.len() != source.len() {
        bail!(
            "archive holds {} revisions ({:?}..{:?}), source {} ({:?}..{:?})",
            archived.revisions.len(),
            archived.revisions.first().map(|r| r.revision),
            archived.revisions.last().map(|r| r.revision),
            source.len(),
            source.first().map(|r| r.revision),
            source.last().map(|r| r.revision)
        );
    }
    for (a, s) in archived.revisions.iter().zip(source) {
        if a.revision != s.revision || a.events != s.events {
            bail!(
                "revision {} differs from the source's {}:\narchived {:?}\nsource   {:?}",
                a.revision,
                s.revision,
                a.events,
                s.events
            );
        }
        for e in &a.events {
            if e.lease != 0 && !archived.leases.contains(&e.lease) {
                bail!(
                    "lease {:x} at revision {} has no lease record",
                    e.lease,
                    a.revision
                );
            }
        }
    }
    Ok(())
}

/// Checks one archived generation against the source: it must reach at
/// least `min_revision` and equal the source's history through its end.
///
/// # Errors
/// The first difference.
pub async fn verify_generation(
    client: &mut etcd_client::Client,
    archived: &ArchivedGeneration,
    min_revision: i64,
) -> anyhow::Result<()> {
    let last = archived
        .revisions
        .last()
        .map_or(archived.start_revision, |r| r.revision);
    if last < min_revision {
        bail!("archive ends at {last}, expected at least {min_revision}");
    }
    let source = source_history(client, archived.start_revision + 1, last).await?;
    compare_with_source(archived, &source)
}

/// Waits until generation `generation` of the archive holds revision `rev`.
///
/// # Errors
/// On timeout.
pub async fn wait_archived(
    url: &str,
    generation: u64,
    rev: i64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    wait_archived_in(&Archive::open(url)?, generation, rev, limit).await
}

/// [`wait_archived`] through an archive handle (e.g. one with keys).
///
/// # Errors
/// On timeout.
pub async fn wait_archived_in(
    archive: &Archive,
    generation: u64,
    rev: i64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(listing) = ArchiveListing::load(archive).await {
            let last = listing
                .generations
                .iter()
                .find(|g| g.id == Some(GenerationId(generation)))
                .map(etcdpitr_common::listing::GenerationListing::chain)
                .filter(|c| !c.links.is_empty())
                .map(|c| c.last_revision());
            if last.is_some_and(|l| l >= rev) {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > limit {
            bail!("revision {rev} not archived in generation {generation} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The source's live keys at `revision` (etcd's own `Range` of every key at
/// that revision), sorted by key.
///
/// # Errors
/// etcd failures.
pub async fn range_at(
    client: &etcd_client::Client,
    revision: i64,
) -> anyhow::Result<Vec<etcd_client::KeyValue>> {
    use etcd_client::GetOptions;
    let mut resp = client
        .kv_client()
        .max_decoding_message_size(512 << 20)
        .get(
            vec![0u8],
            Some(GetOptions::new().with_all_keys().with_revision(revision)),
        )
        .await?;
    Ok(resp.take_kvs())
}

/// The source's live keys at `revision`, in `export`'s JSON-lines form.
///
/// # Errors
/// etcd failures.
pub async fn oracle_export(
    client: &etcd_client::Client,
    revision: i64,
) -> anyhow::Result<Vec<String>> {
    Ok(range_at(client, revision)
        .await?
        .iter()
        .map(export_line)
        .collect())
}

/// etcd's own history of `key` (with `prefix`, of every key starting with
/// it) through revision `to`: a watch from revision 1 with the prefix
/// option, as (event type, key-value) pairs in revision order.
///
/// To know that the watch delivered everything through `to`, this first
/// writes one marker put under the key (the key itself without `prefix`)
/// and reads until the marker's revision: use it after the revisions that
/// matter are archived. The test clusters are never compacted in that range.
///
/// # Errors
/// etcd failures, or a watch that stalls.
pub async fn watch_key_history(
    client: &mut etcd_client::Client,
    key: &[u8],
    prefix: bool,
    to: i64,
) -> anyhow::Result<Vec<(etcd_client::EventType, etcd_client::KeyValue)>> {
    use etcd_client::WatchOptions;
    let mut marker = key.to_vec();
    if prefix {
        marker.extend_from_slice(b"\xff~watch-end");
    }
    let end = client
        .put(marker, "end", None)
        .await?
        .header()
        .context("put header")?
        .revision();
    anyhow::ensure!(end > to, "the marker at {end} is not after {to}");
    let options = WatchOptions::new().with_start_revision(1);
    // The empty prefix is every key: etcd's `"\0"..` range.
    let (watched, options) = match (prefix, key.is_empty()) {
        (true, true) => (vec![0u8], options.with_all_keys()),
        (true, false) => (key.to_vec(), options.with_prefix()),
        (false, _) => (key.to_vec(), options),
    };
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(256 << 20)
        .watch(watched, Some(options))
        .await?;
    let mut out = Vec::new();
    loop {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .context("oracle watch stalled")??
            .context("oracle watch closed")?;
        anyhow::ensure!(resp.compact_revision() == 0, "the history was compacted");
        for e in resp.events() {
            let kv = e.kv().context("event without kv")?;
            if kv.mod_revision() >= end {
                return Ok(out);
            }
            if kv.mod_revision() <= to {
                out.push((e.event_type(), kv.clone()));
            }
        }
    }
}

/// One key as `etcd-restorer export` prints it.
pub fn export_line(kv: &etcd_client::KeyValue) -> String {
    format!(
        "{{\"key\":\"{}\",\"create_revision\":{},\"mod_revision\":{},\"version\":{},\"value\":\"{}\",\"lease\":{}}}",
        base64(kv.key()),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        base64(kv.value()),
        kv.lease()
    )
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Runs `etcd-restorer export` at `target` and checks that it exits 0 and
/// prints exactly etcd's own read at that revision.
///
/// # Errors
/// A failed export or the first difference, naming the revision.
pub async fn check_export(
    url: &str,
    env: &[(String, String)],
    client: &etcd_client::Client,
    target: i64,
) -> anyhow::Result<()> {
    let (code, out, err) = crate::run_restorer(
        &[
            "export",
            "--archive",
            url,
            "--revision",
            &target.to_string(),
        ],
        env,
    )?;
    anyhow::ensure!(
        code == 0,
        "export at revision {target} exited {code}: {err}"
    );
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    anyhow::ensure!(
        lines == oracle_export(client, target).await?,
        "export at revision {target} differs from etcd's read"
    );
    Ok(())
}
