//! `etcd-restorer verify`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use etcdpitr_common::chain::{self, Chain, Continuity};
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::listing::GenerationListing;
use etcdpitr_common::manifest::ClockEpoch;
use etcdpitr_common::segment::Record;
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;

use super::{load, scratch_file};
use crate::source;

/// What `verify` counted and found.
#[derive(Default)]
struct Report {
    problems: Vec<String>,
    notes: Vec<String>,
    segments: u64,
    revisions: u64,
    snapshots: u64,
    snapshot_bytes: u64,
}

/// Failures that are not a problem of one object but stop `verify`: an
/// unreachable store, or keys that cannot open the archive's objects.
fn stops_verify(e: &anyhow::Error) -> bool {
    matches!(
        crate::classify(e),
        crate::ExitKind::StoreUnreachable | crate::ExitKind::Usage
    )
}

/// Revisions held by more than one segment: each must hold the same events
/// everywhere (the chain rules make such overlaps benign only then).
struct Overlaps {
    ranges: Vec<(Revision, Revision)>,
    seen: HashMap<Revision, ([u8; 32], String)>,
}

impl Overlaps {
    fn of(chain: &Chain) -> Self {
        let mut ranges: Vec<(Revision, Revision)> = chain
            .superseded
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| (s.first, s.last))
            .collect();
        for pair in chain.links.windows(2) {
            if !pair[1].is_empty() && pair[1].first <= pair[0].last {
                ranges.push((pair[1].first, pair[0].last));
            }
        }
        Self {
            ranges,
            seen: HashMap::new(),
        }
    }

    /// Notes the digest of `revision` read from `object`; returns the other
    /// object when it held different events.
    fn check(
        &mut self,
        object: &str,
        revision: Revision,
        digest: [u8; 32],
    ) -> Option<(Revision, String)> {
        if !self
            .ranges
            .iter()
            .any(|&(a, b)| a <= revision && revision <= b)
        {
            return None;
        }
        match self.seen.get(&revision) {
            Some((d, _)) if *d == digest => None,
            Some((_, other)) => Some((revision, other.clone())),
            None => {
                self.seen.insert(revision, (digest, object.to_owned()));
                None
            }
        }
    }
}

/// Reads every segment of a generation (chain links first, then superseded
/// ones) and checks checksums, headers against names, continuity along the
/// chain, and that overlapping segments agree.
async fn verify_segments(
    archive: &Archive,
    id: GenerationId,
    chain: &Chain,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut overlaps = Overlaps::of(chain);
    let mut continuity = Continuity::after(chain.start);
    let order: Vec<(SegmentName, bool)> = chain
        .links
        .iter()
        .map(|s| (*s, true))
        .chain(chain.superseded.iter().map(|s| (*s, false)))
        .collect();
    let names: Vec<SegmentName> = order.iter().map(|(s, _)| *s).collect();
    let mut rx = source::prefetch_segments(archive.clone(), id, names.clone());
    for (i, &(name, is_link)) in order.iter().enumerate() {
        let fetched = rx.recv().await.context("segment download stopped")?;
        let (key, bytes) = match fetched {
            Ok(kb) => kb,
            Err(e) if stops_verify(&e) => return Err(e),
            Err(e) => {
                report.problems.push(format!("{e:#}"));
                rx = source::prefetch_segments(archive.clone(), id, names[i + 1..].to_vec());
                continue;
            }
        };
        if is_link && name.prev() > continuity.last() {
            // A new run after a gap (already reported from the names).
            continuity = Continuity::after(name.prev());
        }
        let mut count = 0u64;
        let result = source::for_each_record(&key, &bytes, id, &name, &mut |r| {
            if let Record::Revision(r) = r {
                count += 1;
                if is_link {
                    continuity.admit(&key, r.revision)?;
                }
                if let Some((rev, other)) =
                    overlaps.check(&key, r.revision, chain::revision_digest(&r))
                {
                    anyhow::bail!(chain::IntegrityError::new(
                        key.clone(),
                        format!("revision {rev} holds other events than in {other}")
                    ));
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                report.segments += 1;
                if is_link {
                    report.revisions += count;
                }
            }
            Err(e) => report.problems.push(format!("{e:#}")),
        }
    }
    if !chain.superseded.is_empty() {
        report.notes.push(format!(
            "generation {id}: {} segments duplicate revisions the chain already holds (written by another archiver or a retried upload); their content agrees unless a problem says otherwise",
            chain.superseded.len()
        ));
    }
    Ok(())
}

/// Checks a generation's clock records (epochs and steps parse and match
/// their names) and notes the steps.
async fn verify_clock(
    archive: &Archive,
    g: &GenerationListing,
    report: &mut Report,
) -> anyhow::Result<()> {
    let id = g.generation();
    for &first in &g.clock_epochs {
        let key = layout::clock_epoch_key(id, first);
        let checked = match archive.get(&key).await {
            Ok(bytes) => ClockEpoch::parse_at(&key, &bytes, first)
                .map(drop)
                .map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::Error::from(e).context(format!("download {key}"))),
        };
        match checked {
            Ok(()) => {}
            Err(e) if stops_verify(&e) => return Err(e),
            Err(e) => report.problems.push(format!("{e:#}")),
        }
    }
    match source::load_timeline(archive, g).await {
        Ok(_) if g.clock_steps.is_empty() => {}
        Ok(timeline) => {
            let (mut back, mut fwd) = (0, 0);
            for n in &g.clock_steps {
                let u = timeline.uncertainty(n.epoch_first);
                back = back.max(u.back_ms);
                fwd = fwd.max(u.fwd_ms);
            }
            report.notes.push(format!(
                "generation {id}: the archiver recorded {} wall-clock steps (revisions may have been committed up to {back} ms before or {fwd} ms after their observed time); `restore --time` refuses times they make ambiguous",
                g.clock_steps.len()
            ));
        }
        Err(e) if stops_verify(&e) => return Err(e),
        Err(e) => report.problems.push(format!("{e:#}")),
    }
    Ok(())
}

/// Checks a generation's manifest, chain gaps, segments and snapshots.
async fn verify_generation(
    archive: &Archive,
    g: &GenerationListing,
    scratch: &std::path::Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let id = g.generation();
    if g.manifest.is_none() {
        report.problems.push(format!(
            "generation {id}: no {}",
            layout::GENERATION_MANIFEST_NAME
        ));
    }
    let chain = g.chain();
    for gap in chain.gaps() {
        report.problems.push(format!("generation {id}: {gap}"));
    }
    verify_segments(archive, id, &chain, report).await?;
    verify_clock(archive, g, report).await?;
    for &rev in &g.snapshots {
        match source::verify_snapshot(archive, id, rev, scratch).await {
            Ok(bytes) => {
                report.snapshots += 1;
                report.snapshot_bytes += bytes;
            }
            Err(e) if stops_verify(&e) => return Err(e),
            Err(e) => report.problems.push(format!("{e:#}")),
        }
    }
    Ok(())
}

/// `etcd-restorer verify`: reads every object of the archive and checks it
/// (checksums, headers against names, revision continuity, manifests,
/// holes in chains, agreement of overlapping segments). Prints each problem
/// and a summary.
///
/// # Errors
/// [`crate::VerifyFailed`] if any problem was found; store errors.
pub async fn verify(url: &str, key_files: &[PathBuf], out: &mut dyn Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let (archive, listing) = load(url, key_files).await?;
    let mut report = Report::default();
    for key in &listing.strays {
        report.problems.push(format!(
            "{key}: not part of the etcd-pitr layout, inside the archive's namespace"
        ));
    }
    for g in &listing.void {
        report.notes.push(format!(
            "generation {} is void: it was started by an archiver that had lost leadership (term {}), and is ignored",
            g.generation(),
            g.manifest.as_ref().map_or(0, |m| m.term)
        ));
    }
    if !listing.foreign.is_empty() {
        report.notes.push(format!(
            "ignored {} objects outside the archive's namespace: {}",
            listing.foreign.len(),
            listing.foreign.join(", ")
        ));
    }
    let scratch = scratch_file("verify")?;
    for g in &listing.generations {
        verify_generation(&archive, g, &scratch, &mut report).await?;
    }
    for n in &report.notes {
        writeln!(out, "note: {n}")?;
    }
    for p in &report.problems {
        writeln!(out, "problem: {p}")?;
    }
    let Report {
        problems,
        segments,
        revisions,
        snapshots,
        snapshot_bytes,
        ..
    } = report;
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
