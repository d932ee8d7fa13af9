//! `etcd-restorer verify`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use etcdpitr_common::chain::{self, Chain, Continuity};
use etcdpitr_common::hashchain::{self, Digest, Evidence, Proof};
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::listing::GenerationListing;
use etcdpitr_common::manifest::{ClockEpoch, PruneRecord};
use etcdpitr_common::progress::{Mode, Progress, Unit};
use etcdpitr_common::segment::{self, Record};
use etcdpitr_common::store::{Archive, StoreError};
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
    /// Each generation's hash-chain proof, oldest first.
    proofs: Vec<(GenerationId, Proof)>,
    /// Objects listed but gone when read (deleted meanwhile, e.g. by a
    /// concurrent prune).
    vanished: Vec<String>,
}

/// Whether `e` says the object is gone.
fn is_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StoreError>(),
            Some(StoreError::NotFound(_))
        )
    })
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
/// chain, and that overlapping segments agree. Each segment read counts
/// one object of `progress`.
async fn verify_segments(
    archive: &Archive,
    id: GenerationId,
    chain: &Chain,
    report: &mut Report,
    evidence: &mut Evidence,
    progress: &Progress,
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
        progress.inc(1);
        let (key, bytes) = match fetched {
            Ok(kb) => kb,
            Err(e) if stops_verify(&e) => return Err(e),
            Err(e) => {
                if is_gone(&e) {
                    report.vanished.push(etcdpitr_common::errors::one_line(&e));
                } else {
                    report.problems.push(etcdpitr_common::errors::one_line(&e));
                }
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
            Ok(header) => {
                report.segments += 1;
                if is_link {
                    report.revisions += count;
                }
                evidence
                    .segments
                    .push((name, header, segment::digest(&bytes)));
            }
            Err(e) => report.problems.push(etcdpitr_common::errors::one_line(&e)),
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

/// Checks that a generation's retention records parse and match their
/// names: a forged or damaged record is a problem, since records decide
/// which holes count as pruned.
async fn verify_prune_records(
    archive: &Archive,
    g: &GenerationListing,
    report: &mut Report,
    evidence: &mut Evidence,
) -> anyhow::Result<()> {
    for range in &g.pruned {
        let key = layout::pruned_key(g.generation(), range);
        let bytes = archive.get(&key).await?;
        match PruneRecord::parse_named(&key, &bytes, *range) {
            Ok(record) => {
                let mut cut = Vec::new();
                for d in &record.cut_digests {
                    match hashchain::parse_hex(d) {
                        Some(d) => cut.push(d),
                        None => report
                            .problems
                            .push(format!("{key}: cut digest {d:?} is not 64 hex digits")),
                    }
                }
                evidence.cuts.push((*range, cut));
            }
            Err(e) => report.problems.push(e.to_string()),
        }
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
            Err(e) => report.problems.push(etcdpitr_common::errors::one_line(&e)),
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
        Err(e) => report.problems.push(etcdpitr_common::errors::one_line(&e)),
    }
    Ok(())
}

/// The objects [`verify_generation`] reads one by one (and counts as
/// progress): segments and snapshots.
fn objects_of(g: &GenerationListing) -> u64 {
    let chain = g.chain();
    (chain.links.len() + chain.superseded.len() + g.snapshots.len()) as u64
}

/// Checks a generation's manifest, chain gaps, segments and snapshots.
async fn verify_generation(
    archive: &Archive,
    g: &GenerationListing,
    scratch: &std::path::Path,
    report: &mut Report,
    progress: &Progress,
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
    for gap in chain.pruned_gaps() {
        report.notes.push(format!(
            "generation {id}: revisions {}..={} were pruned by retention",
            gap.after + 1,
            gap.resumes_after
        ));
    }
    let mut evidence = Evidence {
        anchor: archive
            .get_opt(&layout::generation_manifest_key(id))
            .await?
            .map(|bytes| hashchain::anchor(&bytes)),
        ..Evidence::default()
    };
    verify_prune_records(archive, g, report, &mut evidence).await?;
    verify_segments(archive, id, &chain, report, &mut evidence, progress).await?;
    verify_clock(archive, g, report).await?;
    for &rev in &g.snapshots {
        let verified = source::verify_snapshot(archive, id, rev, scratch).await;
        progress.inc(1);
        match verified {
            Ok(header) => {
                report.snapshots += 1;
                report.snapshot_bytes += header.db_bytes;
                evidence.snapshots.push(header);
            }
            Err(e) if stops_verify(&e) => return Err(e),
            Err(e) if is_gone(&e) => report.vanished.push(etcdpitr_common::errors::one_line(&e)),
            Err(e) => report.problems.push(etcdpitr_common::errors::one_line(&e)),
        }
    }
    let proof = hashchain::prove(id, &chain, &evidence);
    report
        .problems
        .extend(proof.problems.iter().map(ToString::to_string));
    report.notes.extend(proof.notes.iter().cloned());
    if let Some(previous) = g.manifest.as_ref().and_then(|m| m.previous) {
        check_previous(g, previous.generation, report);
    }
    report.proofs.push((id, proof));
    Ok(())
}

/// Checks that a generation's manifest names the previous generation's
/// last segment (its hash-chain head) as the one it follows.
fn check_previous(g: &GenerationListing, previous: GenerationId, report: &mut Report) {
    let key = layout::generation_manifest_key(g.generation());
    let Some(named) = g
        .manifest
        .as_ref()
        .and_then(|m| m.previous_digest.as_deref())
    else {
        return;
    };
    let Some(digest) = hashchain::parse_hex(named) else {
        report.problems.push(format!(
            "{key}: previous_digest {named:?} is not 64 hex digits"
        ));
        return;
    };
    match report.proofs.iter().find(|(id, _)| *id == previous) {
        Some((_, p)) if p.proven.contains(&digest) || p.cut.contains(&digest) => {}
        Some(_) => report.problems.push(format!(
            "{key}: breaks the hash chain: generation {previous} holds no segment with the digest it names as the one it follows (that generation's end was removed or replaced)"
        )),
        None => report.notes.push(format!(
            "generation {}: the generation it follows ({previous}) is not in the archive; its link to it cannot be checked",
            g.generation()
        )),
    }
}

/// `etcd-restorer verify`: reads every object of the archive and checks it
/// (checksums, headers against names, revision continuity, manifests,
/// holes in chains, agreement of overlapping segments, the hash chain).
/// Prints each problem and a summary with the archive's head digest, or
/// one JSON document with `json`. With `expect_head` (a head digest
/// recorded earlier), the archive must still hold that object on its hash
/// chain: otherwise it was cut back or rewritten.
///
/// # Errors
/// [`crate::VerifyFailed`] if any problem was found; store errors.
pub async fn verify(
    url: &str,
    key_files: &[PathBuf],
    json: bool,
    expect_head: Option<&str>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let expected: Option<Digest> = match expect_head {
        Some(h) => Some(hashchain::parse_hex(h).ok_or_else(|| {
            crate::UsageError(format!(
                "--expect-head: {h:?} is not a digest (64 hex digits, as `verify` prints it)"
            ))
        })?),
        None => None,
    };
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
    let mut objects: u64 = listing.generations.iter().map(objects_of).sum();
    let progress = Progress::new(Mode::Auto, "verify", Unit::Items("objects"), Some(objects));
    for g in &listing.generations {
        let (problems, notes) = (report.problems.len(), report.notes.len());
        let counts = (
            report.segments,
            report.revisions,
            report.snapshots,
            report.snapshot_bytes,
        );
        verify_generation(&archive, g, &scratch, &mut report, &progress).await?;
        if report.vanished.is_empty() {
            continue;
        }
        // Objects went between listing and reading (a prune running now):
        // read the generation again as it stands, once.
        report.problems.truncate(problems);
        report.notes.truncate(notes);
        report.proofs.pop();
        (
            report.segments,
            report.revisions,
            report.snapshots,
            report.snapshot_bytes,
        ) = counts;
        let gone = std::mem::take(&mut report.vanished);
        let relisted = ArchiveListing::load(&archive).await?;
        if let Some(again) = relisted.generations.iter().find(|x| x.id == g.id) {
            report.notes.push(format!(
                "generation {}: {} objects were deleted while verify read it (a prune running meanwhile?); read it again",
                g.generation(),
                gone.len()
            ));
            objects += objects_of(again);
            progress.set_total(objects);
            verify_generation(&archive, again, &scratch, &mut report, &progress).await?;
        }
        report.problems.extend(std::mem::take(&mut report.vanished));
    }
    progress.finish();
    let head = report.proofs.last().and_then(|(_, p)| p.head);
    if let Some(expected) = expected {
        if !report
            .proofs
            .iter()
            .any(|(_, p)| p.proven.contains(&expected))
        {
            report.problems.push(format!(
                "the archive no longer holds the head {} recorded earlier on its hash chain: objects were removed from its end, or it was rewritten (a prune that deleted that object also explains it)",
                hashchain::hex(&expected)
            ));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if json {
        let doc = serde_json::json!({
            "archive": url,
            "ok": report.problems.is_empty(),
            "problems": report.problems,
            "notes": report.notes,
            "segments": report.segments,
            "revisions": report.revisions,
            "snapshots": report.snapshots,
            "snapshot_bytes": report.snapshot_bytes,
            "head": head.as_ref().map(hashchain::hex),
            "head_generation": report.proofs.last().map(|(g, _)| g.0),
            "seconds": seconds,
        });
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        writeln!(out)?;
    } else {
        for n in &report.notes {
            writeln!(out, "note: {n}")?;
        }
        for p in &report.problems {
            writeln!(out, "problem: {p}")?;
        }
        if let Some(h) = &head {
            writeln!(out, "head: {}", hashchain::hex(h))?;
        }
        writeln!(
            out,
            "verified {} segments ({} revisions) and {} snapshots ({} bytes) in {seconds:.2} s: {}",
            report.segments,
            report.revisions,
            report.snapshots,
            report.snapshot_bytes,
            if report.problems.is_empty() {
                "OK".to_owned()
            } else {
                format!("{} problems", report.problems.len())
            }
        )?;
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(crate::VerifyFailed(report.problems.len()).into())
    }
}
