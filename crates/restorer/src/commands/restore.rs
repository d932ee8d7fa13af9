//! `etcd-restorer restore`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use etcdpitr_common::bbolt::BoltError;
use etcdpitr_common::crypto::{self, CryptoFault};
use etcdpitr_common::layout;
use etcdpitr_common::progress::Mode;
use etcdpitr_common::snapshot::{BodyHash, SnapshotError};

use super::{describe_time_choice, load, plan_target, ArchiveEvents, OutputLock, Scratch, Target};
use crate::next_steps::{EtcdRelease, NextSteps, ReleaseChoice};
use crate::source;
use crate::synth::{self, Bump, SealOptions};
use crate::UsageError;

/// How `restore` runs, besides its target and output.
#[derive(Clone, Copy, Debug)]
pub struct RestoreOptions {
    /// `--dry-run`: print the plan, write nothing.
    pub dry_run: bool,
    /// `--bump-revision`, `--mark-compacted`, `--min-lease-ttl`.
    pub bump: Bump,
    /// `--force`: replace an existing output.
    pub force: bool,
    /// `--etcd-version`: the release of the next commands printed (`None`:
    /// read from the file).
    pub etcd_version: Option<EtcdRelease>,
    /// `--paranoid`: also run bbolt's whole consistency check on the file.
    pub paranoid: bool,
}

/// `etcd-restorer restore`: writes the file, then prints the result and
/// the next commands to `out`.
///
/// # Errors
/// Plan refusals, integrity, store and I/O errors; no output file is left
/// behind on error.
pub async fn restore(
    url: &str,
    key_files: &[PathBuf],
    target: &Target,
    output: &Path,
    options: &RestoreOptions,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let RestoreOptions {
        dry_run,
        bump,
        force,
        etcd_version,
        paranoid,
    } = *options;
    if bump.mark_compacted && bump.revisions == 0 {
        bail!(UsageError(
            "--mark-compacted needs --bump-revision N".into()
        ));
    }
    if bump.revisions < 0 {
        bail!(UsageError("--bump-revision must not be negative".into()));
    }
    let exists = || {
        UsageError(format!(
            "--output: {} already exists (remove it or pass --force)",
            output.display()
        ))
    };
    if !dry_run && output.exists() && !force {
        bail!(exists());
    }
    let started = Instant::now();
    let (archive, listing) = load(url, key_files).await?;
    let (plan, choice) = plan_target(&archive, &listing, target).await?;
    if let Some(choice) = &choice {
        writeln!(out, "{}", describe_time_choice(target, choice))?;
    }
    if dry_run {
        writeln!(
            out,
            "plan: generation {}, base snapshot at revision {} ({}), {} segments, target revision {}",
            plan.generation,
            plan.snapshot_revision,
            layout::snapshot_key(plan.generation, plan.snapshot_revision),
            plan.segments.len(),
            plan.target
        )?;
        for s in &plan.segments {
            writeln!(out, "  {}", layout::segment_key(plan.generation, s))?;
        }
        if bump.revisions > 0 {
            writeln!(
                out,
                "then bump the revision by {} to {}{}",
                bump.revisions,
                plan.target + bump.revisions,
                if bump.mark_compacted {
                    " and mark it compacted"
                } else {
                    ""
                }
            )?;
        }
        return Ok(());
    }
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = output
        .file_name()
        .context("--output must name a file")?
        .to_string_lossy()
        .into_owned();
    // Held until the file is in place: a concurrent restore to the same
    // output fails now rather than both "succeeding".
    let _lock = OutputLock::acquire(output, &dir, &file_name)?;
    if output.exists() && !force {
        bail!(exists());
    }
    // The file is written in a private scratch directory next to the
    // output (same file system, so the finished file is renamed into
    // place), removed on every exit path. The base snapshot is fetched
    // straight into it and stays in place: the restored file is the base's
    // pages with the replayed revisions appended.
    let scratch = Scratch::new_in(&dir)?;
    let partial = scratch.file(&file_name);
    // Its blake3 is checked by the read-back (`seal`), which reads it all.
    let base = source::fetch_snapshot(
        &archive,
        plan.generation,
        plan.snapshot_revision,
        &partial,
        Mode::Auto,
        BodyHash::Deferred,
    )
    .await
    .with_context(|| format!("fetch the base snapshot into {}", partial.display()))?;
    let mut events = ArchiveEvents::new(&archive, plan.replay());
    let (partial2, target) = (partial.clone(), plan.target);
    let seal = SealOptions { paranoid };
    let restored = tokio::task::spawn_blocking(move || -> anyhow::Result<synth::Summary> {
        let written = synth::synthesize(&partial2, &base, target, &mut events, bump, Mode::Auto)?;
        synth::seal(&partial2, written, seal, Mode::Auto).context("verify the restored file")
    })
    .await?;
    let summary = match restored {
        Ok(summary) => summary,
        // The base was read before its hash was checked (by `seal`): when
        // it is what failed, the archived object is checked, and a damaged
        // one is named as such (exit 4), not as a local fault.
        Err(e) if may_come_from_the_base(&e) => return Err(
            match source::check_snapshot_object(&archive, plan.generation, plan.snapshot_revision)
                .await
            {
                Err(check) if is_damaged(&check) => check.context(format!(
                    "the base snapshot is damaged (the restore failed: {e:#})"
                )),
                Err(check) => e.context(format!(
                    "the base snapshot could not be checked again: {check:#}"
                )),
                Ok(()) => e.context(
                    "the archived base snapshot matches its hash (checked again after the failure)",
                ),
            },
        ),
        Err(e) => return Err(e),
    };
    if force {
        std::fs::rename(&partial, output)
            .with_context(|| format!("move the restored file to {}", output.display()))?;
    } else {
        // No-clobber: an output that appeared meanwhile is never replaced.
        let finished = tempfile::TempPath::try_from_path(&partial)
            .with_context(|| format!("resolve {}", partial.display()))?;
        match finished.persist_noclobber(output) {
            Ok(()) => {}
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => bail!(exists()),
            Err(e) => {
                return Err(e.error)
                    .with_context(|| format!("move the restored file to {}", output.display()))
            }
        }
    }
    if let Err(e) = etcdpitr_common::store::fsync_dir(&dir) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot sync the output's directory");
    }
    drop(scratch);
    writeln!(
        out,
        "restored revision {} (generation {}, base snapshot {}, {} revisions replayed): {} key entries, {} bytes, {:.2} s -> {}",
        summary.revision,
        plan.generation,
        plan.snapshot_revision,
        summary.replayed,
        summary.key_entries,
        summary.bytes,
        started.elapsed().as_secs_f64(),
        output.display()
    )?;
    if summary.lengthened_leases > 0 {
        writeln!(
            out,
            "lengthened {} lease TTLs to {} s (--min-lease-ttl): keys attached to them now outlive a dead owner that long",
            summary.lengthened_leases, bump.min_lease_ttl_secs
        )?;
    }
    let release = ReleaseChoice::choose(etcd_version, output)
        .with_context(|| format!("read {}", output.display()))?;
    let steps = NextSteps {
        release,
        file: output,
        revision: plan.target,
        newest_archived: listing
            .generations
            .iter()
            .map(|g| g.chain().last_revision())
            .max()
            .unwrap_or(plan.target),
        bump,
    };
    write!(out, "{}", steps.render())?;
    Ok(())
}

/// Whether a failed synthesis or read-back may come from a base snapshot
/// that is not what its header says: bbolt refused the file, or it read
/// back other than written.
fn may_come_from_the_base(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<BoltError>()
            || matches!(
                c.downcast_ref::<synth::OutputError>(),
                Some(synth::OutputError::Mismatch { .. })
            )
    })
}

/// Whether [`source::check_snapshot_object`]'s error says the object is
/// damaged (not that the store failed or the object is gone).
fn is_damaged(e: &anyhow::Error) -> bool {
    e.chain().any(|c| match c.downcast_ref::<SnapshotError>() {
        Some(SnapshotError::Io { source, .. }) => matches!(
            source.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        ),
        Some(_) => true,
        None => crypto::fault_of(c) == Some(CryptoFault::Damaged),
    })
}
