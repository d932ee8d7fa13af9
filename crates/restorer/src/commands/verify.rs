//! `etcd-restorer verify`.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use etcdpitr_common::layout;
use etcdpitr_common::segment::Record;

use super::{load, tempfile_path};
use crate::source;

/// `etcd-restorer verify`: reads every object of the archive and checks it
/// (checksums, headers against names, revision continuity, manifests, and
/// holes in chains). Prints each problem and a summary.
///
/// # Errors
/// [`crate::VerifyFailed`] if any problem was found; store errors.
pub async fn verify(url: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let (archive, listing) = load(url).await?;
    let mut problems: Vec<String> = Vec::new();
    let (mut segments, mut revisions, mut snapshots, mut snapshot_bytes) = (0u64, 0u64, 0u64, 0u64);
    let scratch = tempfile_path("verify");
    for g in &listing.generations {
        let id = g.generation();
        match &g.manifest {
            None => problems.push(format!(
                "generation {id}: no {}",
                layout::GENERATION_MANIFEST_NAME
            )),
            Some(m) => {
                if g.runs()
                    .first()
                    .is_some_and(|r| r.after != m.start_revision)
                {
                    problems.push(format!(
                        "generation {id}: segments after revision {} are missing",
                        m.start_revision
                    ));
                }
            }
        }
        for pair in g.runs().windows(2) {
            problems.push(format!(
                "generation {id}: revisions {}..={} are missing",
                pair[0].last + 1,
                pair[1].after
            ));
        }
        let mut rx = source::prefetch_segments(archive.clone(), id, g.segments.clone());
        for name in &g.segments {
            let fetched = rx.recv().await.context("segment download stopped")?;
            let (key, bytes) = match fetched {
                Ok(kb) => kb,
                Err(e) if crate::classify(&e) == crate::ExitKind::StoreUnreachable => {
                    return Err(e)
                }
                Err(e) => {
                    problems.push(format!("{e:#}"));
                    rx = source::prefetch_segments(
                        archive.clone(),
                        id,
                        g.segments.iter().filter(|s| *s > name).copied().collect(),
                    );
                    continue;
                }
            };
            let mut count = 0u64;
            match source::for_each_record(&key, &bytes, name, &mut |r| {
                if matches!(r, Record::Revision(_)) {
                    count += 1;
                }
                Ok(())
            }) {
                Ok(()) => {
                    segments += 1;
                    revisions += count;
                }
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
        for &rev in &g.snapshots {
            match source::verify_snapshot(&archive, id, rev, &scratch).await {
                Ok(bytes) => {
                    snapshots += 1;
                    snapshot_bytes += bytes;
                }
                Err(e) if crate::classify(&e) == crate::ExitKind::StoreUnreachable => {
                    return Err(e)
                }
                Err(e) => problems.push(format!("{e:#}")),
            }
        }
    }
    for p in &problems {
        writeln!(out, "problem: {p}")?;
    }
    writeln!(
        out,
        "verified {segments} segments ({revisions} revisions) and {snapshots} snapshots ({snapshot_bytes} bytes) in {:.2} s: {}",
        started.elapsed().as_secs_f64(),
        if problems.is_empty() { "OK".to_owned() } else { format!("{} problems", problems.len()) }
    )?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(crate::VerifyFailed(problems.len()).into())
    }
}
