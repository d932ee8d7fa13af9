//! Reading an archive for a restore: verified snapshots, verified segment
//! records, and placing a wall-clock time on a revision.

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use etcdpitr_common::chain;
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::segment::{self, Record, RecordReader};
use etcdpitr_common::snapshot::{self, SnapshotHeader};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;
use tokio::sync::mpsc;

use crate::plan::{self, PlanError};

/// Downloads snapshot object `(generation, revision)` to `scratch`, checks
/// it (length and blake3 against its header, header against its name, and
/// the revision of the bbolt content against the header) and writes the etcd
/// snapshot file it holds to `db_path`. The scratch file is always removed.
async fn download_checked(
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
    scratch: &Path,
    db_path: &Path,
) -> anyhow::Result<SnapshotHeader> {
    let key = layout::snapshot_key(generation, revision);
    let checked = async {
        let mut file = tokio::fs::File::create(scratch)
            .await
            .with_context(|| format!("create {}", scratch.display()))?;
        archive
            .download(&key, &mut file)
            .await
            .with_context(|| format!("download {key}"))?;
        drop(file);
        let (src, key, db) = (scratch.to_owned(), key.clone(), db_path.to_owned());
        tokio::task::spawn_blocking(move || -> anyhow::Result<SnapshotHeader> {
            let mut input = std::io::BufReader::new(std::fs::File::open(&src)?);
            let out =
                std::fs::File::create(&db).with_context(|| format!("create {}", db.display()))?;
            let mut out = std::io::BufWriter::new(out);
            let header = snapshot::read_object(&key, &mut input, &mut out)?;
            std::io::Write::flush(&mut out)?;
            Ok(header)
        })
        .await?
    }
    .await;
    tokio::fs::remove_file(scratch).await.ok();
    let header = checked?;
    if header.revision != revision || header.generation != generation.0 {
        anyhow::bail!(
            "{key}: header says generation {} revision {}, its name says generation {generation} revision {revision} (object is corrupted)",
            header.generation,
            header.revision
        );
    }
    let db = db_path.to_owned();
    tokio::task::spawn_blocking(move || snapshot::check_content_revision(&key, &header, &db))
        .await??;
    Ok(header)
}

/// Downloads a snapshot object and writes the etcd snapshot file it holds to
/// `dest`, checking its length and blake3 hash.
///
/// # Errors
/// Store failures or an integrity error naming the object.
pub async fn fetch_snapshot(
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
    dest: &Path,
) -> anyhow::Result<SnapshotHeader> {
    download_checked(
        archive,
        generation,
        revision,
        &dest.with_extension("download"),
        dest,
    )
    .await
}

/// Downloads a snapshot object and checks its content against its header
/// (length, blake3 and the revision of the bbolt content) without keeping
/// the file. Returns the file's length.
///
/// # Errors
/// Store failures or an integrity error naming the object.
pub async fn verify_snapshot(
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
    scratch: &Path,
) -> anyhow::Result<u64> {
    // The content check reads the decompressed file: keep it in a private
    // temporary file, removed when dropped.
    let db = tempfile::NamedTempFile::new().context("create a temporary file")?;
    let header = download_checked(archive, generation, revision, scratch, db.path()).await?;
    Ok(header.db_bytes)
}

/// Number of segments fetched ahead of the one being replayed.
const PREFETCH: usize = 4;

/// Fetches `segments` in order in a background task, `PREFETCH` ahead.
/// Each item is the object key and its bytes (not yet checked).
pub fn prefetch_segments(
    archive: Archive,
    generation: GenerationId,
    segments: Vec<SegmentName>,
) -> mpsc::Receiver<anyhow::Result<(String, Bytes)>> {
    let (tx, rx) = mpsc::channel(PREFETCH);
    tokio::spawn(async move {
        for name in segments {
            let key = layout::segment_key(generation, &name);
            let result = archive
                .get(&key)
                .await
                .with_context(|| format!("download {key}"))
                .map(|b| (key, b));
            let failed = result.is_err();
            if tx.send(result).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Checks a segment and passes each of its records to `f`.
///
/// # Errors
/// An integrity error naming the object, or what `f` returns.
pub fn for_each_record(
    key: &str,
    bytes: &[u8],
    generation: GenerationId,
    expected: &SegmentName,
    f: &mut dyn FnMut(Record) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (header, body) = segment::open(key, bytes)?;
    chain::check_segment_header(key, generation, expected, &header)?;
    let mut reader = RecordReader::new(key, &header, body)?;
    while let Some(record) = reader.next_record()? {
        f(record)?;
    }
    Ok(())
}

/// The revision chosen for a `--time` target.
#[derive(Clone, Debug)]
pub struct TimeChoice {
    /// Generation the time was placed in.
    pub generation: GenerationId,
    /// The last revision observed at or before the time.
    pub revision: Revision,
    /// When that revision was observed (Unix ms), if it was observed here.
    pub observed_ms: Option<i64>,
    /// Set when the next revision was observed during a catch-up: it may
    /// have been committed before the requested time (earliest possible
    /// commit time, Unix ms).
    pub uncertain_after_ms: Option<i64>,
}

/// Places `time_ms` on a revision: the last one observed at or before it.
///
/// # Errors
/// [`PlanError::TimeNotCovered`] when the time is outside every generation
/// or in a gap; store or integrity errors.
pub async fn resolve_time(
    archive: &Archive,
    listing: &ArchiveListing,
    time_ms: i64,
    time_text: &str,
    only: Option<GenerationId>,
) -> anyhow::Result<TimeChoice> {
    let not_covered = |why: String| PlanError::TimeNotCovered {
        time: time_text.to_owned(),
        why,
        ranges: plan::ranges(listing),
    };
    let generations: Vec<_> = listing
        .generations
        .iter()
        .rev()
        .filter(|g| only.is_none_or(|id| g.id == Some(id)))
        .collect();
    for (newest, g) in generations.iter().enumerate().map(|(i, g)| (i == 0, g)) {
        let started_ms = g.manifest.as_ref().map_or(i64::MIN, |m| m.started_ms);
        if time_ms < started_ms {
            continue;
        }
        let chain = g.chain();
        let links = &chain.links;
        let Some(i) = links.iter().position(|s| s.end_ms >= time_ms) else {
            let latest = links.iter().map(|s| s.end_ms).max().unwrap_or(started_ms);
            return Err(not_covered(if newest {
                format!(
                    "is after the last archived moment ({})",
                    crate::format_ms(latest)
                )
            } else {
                format!(
                    "falls in the gap after generation {} (archived until {})",
                    g.generation(),
                    crate::format_ms(latest)
                )
            })
            .into());
        };
        let name = links[i];
        let key = layout::segment_key(g.generation(), &name);
        let bytes = archive
            .get(&key)
            .await
            .with_context(|| format!("download {key}"))?;
        let mut choice = TimeChoice {
            generation: g.generation(),
            revision: name.prev(),
            observed_ms: None,
            uncertain_after_ms: None,
        };
        let mut before_ms: Option<i64> = None;
        for_each_record(&key, &bytes, g.generation(), &name, &mut |record| {
            if let Record::Revision(r) = record {
                if r.observed_ms <= time_ms {
                    choice.revision = r.revision;
                    choice.observed_ms = Some(r.observed_ms);
                    if !r.catching_up {
                        before_ms = Some(r.observed_ms);
                    }
                } else if choice.uncertain_after_ms.is_none()
                    && r.catching_up
                    && r.revision == choice.revision + 1
                {
                    choice.uncertain_after_ms = Some(before_ms.unwrap_or(started_ms));
                }
            }
            Ok(())
        })?;
        if choice.observed_ms.is_none() {
            // The chosen revision ends an earlier segment: read its time there.
            if let Some(earlier) = links[..i].iter().rev().find(|s| !s.is_empty()) {
                let key = layout::segment_key(g.generation(), earlier);
                let bytes = archive
                    .get(&key)
                    .await
                    .with_context(|| format!("download {key}"))?;
                for_each_record(&key, &bytes, g.generation(), earlier, &mut |record| {
                    if let Record::Revision(r) = record {
                        if r.revision == choice.revision {
                            choice.observed_ms = Some(r.observed_ms);
                        }
                    }
                    Ok(())
                })?;
            }
        }
        return Ok(choice);
    }
    Err(not_covered("is before the first archived moment".into()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real etcd 3.5.1 snapshot at revision 31.
    const ETCD_SNAPSHOT: &[u8] = include_bytes!("../../common/testdata/etcd-3.5.1-rev31.db");

    /// Stores the snapshot as object `(generation 2, claimed)`, as if
    /// re-headed and renamed to claim that revision.
    async fn store_snapshot(archive: &Archive, claimed: Revision) {
        let header = SnapshotHeader {
            generation: 2,
            revision: claimed,
            taken_ms: 0,
            db_bytes: ETCD_SNAPSHOT.len() as u64,
            db_blake3: *blake3::hash(ETCD_SNAPSHOT).as_bytes(),
        };
        let mut obj = Vec::new();
        snapshot::write_object(&header, &mut &ETCD_SNAPSHOT[..], &mut obj).unwrap();
        let key = layout::snapshot_key(GenerationId(2), claimed);
        archive.put_once(&key, obj.into()).await.unwrap();
    }

    /// Issue 6.5 (5): restore and verify both refuse a snapshot whose
    /// content is at another revision than its header and name claim.
    #[tokio::test]
    async fn content_revision_is_checked_by_fetch_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("archive").display());
        let archive = Archive::open(&url).unwrap();
        store_snapshot(&archive, 31).await;
        store_snapshot(&archive, 41).await;
        let scratch = dir.path().join("scratch");
        let dest = dir.path().join("out.db");

        let g = GenerationId(2);
        assert_eq!(
            verify_snapshot(&archive, g, 31, &scratch).await.unwrap(),
            ETCD_SNAPSHOT.len() as u64
        );
        fetch_snapshot(&archive, g, 31, &dest).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), ETCD_SNAPSHOT);

        let key = layout::snapshot_key(g, 41);
        for err in [
            verify_snapshot(&archive, g, 41, &scratch)
                .await
                .unwrap_err(),
            fetch_snapshot(&archive, g, 41, &dest).await.unwrap_err(),
        ] {
            let text = format!("{err:#}");
            assert!(
                text.contains(&key) && text.contains("revision 31"),
                "{text}"
            );
            assert_eq!(crate::classify(&err), crate::ExitKind::Integrity);
        }
        assert!(!scratch.exists());
    }
}
