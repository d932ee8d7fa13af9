//! The restorer's commands, as the binary (and the tests) run them: one
//! file (or directory) per command, shared target resolution and event
//! streaming here.

mod diff;
mod export;
mod follow;
mod history;
mod list;
mod restore;
mod verify;

pub use crate::next_steps::EtcdRelease;
pub use diff::{diff, DiffOptions};
pub use export::export;
pub use follow::{follow, ArchiveEnds, Diverged, FollowOptions, Until};
pub use history::{history, HistoryOptions};
pub use list::{
    list, list_details, list_view, ListCurrent, ListDetails, ListGap, ListGeneration, ListOutput,
    ListPruned, ListRange, ListSnapshot,
};
pub use restore::{restore, RestoreOptions};
pub use verify::verify;

use std::collections::HashMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use bytes::Bytes;
use etcdpitr_common::chain::{self, Continuity, IntegrityError};
use etcdpitr_common::crypto::Keyring;
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::segment::{LeaseRecord, Record, RevisionRecord};
use etcdpitr_common::store::{Archive, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE};
use etcdpitr_common::Revision;
use tokio::sync::mpsc;

use crate::plan::{self, Replay, RestorePlan, SpanPlan};
use crate::point::{self, Point, TimeRules};
use crate::source::{self, TimeChoice};
use crate::synth::EventSource;
use crate::UsageError;

/// What to restore: a revision or a moment, optionally in one generation.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// `--revision`.
    pub revision: Option<Revision>,
    /// `--time` (see [`point::parse_time`]).
    pub time: Option<String>,
    /// `--generation`.
    pub generation: Option<u64>,
    /// How times are read.
    pub times: TimeFlags,
}

/// The flags that say how a command reads times.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeFlags {
    /// `--utc`: a time without a zone is UTC.
    pub utc: bool,
    /// `--max-staleness` (`None`: [`point::DEFAULT_MAX_STALENESS`]).
    pub max_staleness: Option<std::time::Duration>,
}

impl TimeFlags {
    /// The rules, with "now" read from the clock now.
    pub fn rules(self) -> TimeRules {
        TimeRules::now(self.utc, self.max_staleness)
    }
}

/// Opens the archive at `url` with the keys in `key_files` (none for an
/// unencrypted archive) and lists it.
pub(super) async fn load(
    url: &str,
    key_files: &[PathBuf],
) -> anyhow::Result<(Archive, ArchiveListing)> {
    let archive = open(url, key_files)?;
    let listing = list_archive(&archive, url).await?;
    Ok((archive, listing))
}

/// Opens the archive at `url` with the keys in `key_files`.
pub(super) fn open(url: &str, key_files: &[PathBuf]) -> anyhow::Result<Archive> {
    let keys = Keyring::load(key_files)?;
    Ok(Archive::open(url)?.with_keys(Arc::new(keys)))
}

/// Lists `archive` (at `url`), refusing a store that holds no archive.
pub(super) async fn list_archive(archive: &Archive, url: &str) -> anyhow::Result<ArchiveListing> {
    let listing = ArchiveListing::load(archive)
        .await
        .with_context(|| format!("list archive {url}"))?;
    if listing.manifest.is_none() {
        bail!(UsageError(format!(
            "{url} is not an etcd-pitr archive (no {})",
            layout::MANIFEST_NAME
        )));
    }
    Ok(listing)
}

/// Resolves the target to a plan and says what a `--time` was placed on.
pub(super) async fn plan_target(
    archive: &Archive,
    listing: &ArchiveListing,
    target: &Target,
) -> anyhow::Result<(RestorePlan, Option<TimeChoice>)> {
    let rules = target.times.rules();
    let point = Point::from_flags(target.revision, target.time.as_deref(), &rules)?;
    let placed = point::place(
        archive,
        listing,
        &point,
        target.generation.map(GenerationId),
        &rules,
    )
    .await?;
    Ok((
        plan::plan(listing, placed.revision, placed.generation)?,
        placed.choice,
    ))
}

pub(super) fn describe_time_choice(target: &Target, choice: &TimeChoice) -> String {
    point::describe_time_choice(target.time.as_deref().unwrap_or_default(), choice)
}

/// Two points of history, as `history` and `diff` take them.
#[derive(Clone, Debug, Default)]
pub struct Span {
    /// `--from` (a revision or a time); `None`: the range's start.
    pub from: Option<String>,
    /// `--to`; `None`: the range's end.
    pub to: Option<String>,
    /// `--generation`.
    pub generation: Option<u64>,
    /// How times are read.
    pub times: TimeFlags,
}

/// Resolves a span to a plan, printing on stderr what each time was placed
/// on and which revisions the span covers.
pub(super) async fn plan_span(
    archive: &Archive,
    listing: &ArchiveListing,
    span: &Span,
) -> anyhow::Result<SpanPlan> {
    let mut generation = span.generation.map(GenerationId);
    let rules = span.times.rules();
    let mut ends = [None, None];
    for (end, (flag, text)) in ends
        .iter_mut()
        .zip([("--from", &span.from), ("--to", &span.to)])
    {
        let Some(text) = text else { continue };
        let point = Point::parse(flag, text, &rules)?;
        let placed = point::place(archive, listing, &point, generation, &rules).await?;
        if let Some(choice) = &placed.choice {
            etcdpitr_common::cli::note(format_args!(
                "{flag} {}",
                point::describe_time_choice(text, choice)
            ));
        }
        // A time fixes the generation for the other end.
        generation = placed.generation;
        *end = Some(placed.revision);
    }
    if let [Some(from), Some(to)] = ends {
        if from > to {
            bail!(UsageError(format!(
                "--from (revision {from}) is after --to (revision {to})"
            )));
        }
    }
    let plan = plan::plan_span(listing, ends[0], ends[1], generation)?;
    etcdpitr_common::cli::note(format_args!(
        "generation {}: changes after revision {} through revision {}",
        plan.changes.generation,
        plan.from_revision(),
        plan.to_revision()
    ));
    Ok(plan)
}

/// The archive's events of a [`Replay`] (after a base snapshot, or between
/// two points), streamed from the store.
pub(super) struct ArchiveEvents {
    rx: mpsc::Receiver<anyhow::Result<(String, Bytes)>>,
    generation: GenerationId,
    segments: Vec<SegmentName>,
    base: Revision,
    target: Revision,
}

impl ArchiveEvents {
    pub(super) fn new(archive: &Archive, replay: Replay) -> Self {
        Self {
            rx: source::prefetch_segments(
                archive.clone(),
                replay.generation,
                replay.segments.clone(),
            ),
            generation: replay.generation,
            segments: replay.segments,
            base: replay.after,
            target: replay.last,
        }
    }
}

impl EventSource for ArchiveEvents {
    fn replay(
        &mut self,
        on_revision: &mut dyn FnMut(&RevisionRecord) -> anyhow::Result<()>,
        on_lease: &mut dyn FnMut(LeaseRecord),
    ) -> anyhow::Result<()> {
        let (base, target) = (self.base, self.target);
        // Links may overlap (several writers): replay each revision once,
        // and check that the copies of a revision agree (the chain rules
        // make an overlap benign only then).
        let mut continuity = Continuity::after(base);
        let mut shared: HashMap<Revision, ([u8; 32], String)> = HashMap::new();
        let mut last_key = String::new();
        for (i, name) in self.segments.iter().enumerate() {
            let (key, bytes) = self
                .rx
                .blocking_recv()
                .context("segment download stopped")??;
            // Revisions the next link holds too are remembered to compare.
            let next_first = self.segments.get(i + 1).map_or(Revision::MAX, |n| n.first);
            source::for_each_record(&key, &bytes, self.generation, name, &mut |record| {
                match record {
                    Record::Revision(r) if r.revision <= target => {
                        let admitted = continuity.admit(&key, r.revision)?;
                        if r.revision >= next_first || (!admitted && r.revision > base) {
                            let digest = chain::revision_digest(&r);
                            match shared.get(&r.revision) {
                                Some((d, other)) if *d != digest => {
                                    return Err(IntegrityError::new(
                                        key.clone(),
                                        format!(
                                            "revision {} holds other events than in {other}",
                                            r.revision
                                        ),
                                    )
                                    .into())
                                }
                                Some(_) => {}
                                None => {
                                    shared.insert(r.revision, (digest, key.clone()));
                                }
                            }
                        }
                        if admitted {
                            on_revision(&r)?;
                        }
                    }
                    Record::Lease(l) if l.revision <= target => on_lease(l),
                    _ => {}
                }
                Ok(())
            })?;
            shared.retain(|&rev, _| rev >= next_first);
            last_key = key;
        }
        if continuity.last() != target {
            return Err(IntegrityError::new(
                last_key,
                format!(
                    "the chain ends at revision {}, short of the target {target}",
                    continuity.last()
                ),
            )
            .into());
        }
        Ok(())
    }
}

/// Prefix of the restorer's scratch directories.
const SCRATCH_PREFIX: &str = ".etcd-restorer-";
/// The lock file inside a scratch directory, flock'd by its owner.
const SCRATCH_LOCK: &str = "lock";
/// A scratch directory without a lock file is stale once this old (its
/// owner died between creating it and its lock, a matter of microseconds).
const UNLOCKED_SCRATCH_AGE: std::time::Duration = std::time::Duration::from_mins(1);

/// A private scratch directory: mode 0700, an unpredictable name starting
/// with `.etcd-restorer-`, holding plaintext copies of the cluster's data
/// while a command runs.
///
/// It is removed when dropped (success, error or panic), and on SIGINT or
/// SIGTERM (see [`register_for_interrupt`]). A process killed with SIGKILL
/// leaves it behind; the next [`Scratch::new_in`] in the same directory
/// removes it: each scratch directory holds a lock file its owner keeps
/// flock'd, so one whose lock can be taken belongs to a dead process.
pub(super) struct Scratch {
    dir: Option<tempfile::TempDir>,
    _lock: std::fs::File,
}

impl Scratch {
    /// Creates a scratch directory in `parent`, first removing stale ones
    /// left there by dead processes.
    ///
    /// # Errors
    /// I/O errors naming `parent`.
    pub(super) fn new_in(parent: &Path) -> anyhow::Result<Self> {
        remove_stale_scratch(parent);
        let dir = tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .permissions(std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))
            .tempdir_in(parent)
            .with_context(|| format!("create a scratch directory in {}", parent.display()))?;
        // The lock is taken before its file appears under its final name,
        // so a lock file that can be locked is never a live one.
        let staged = dir.path().join(".lock.new");
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&staged)
            .with_context(|| format!("create {}", staged.display()))?;
        lock.try_lock()
            .with_context(|| format!("lock {}", staged.display()))?;
        std::fs::rename(&staged, dir.path().join(SCRATCH_LOCK))
            .with_context(|| format!("create the lock in {}", dir.path().display()))?;
        register_for_interrupt(dir.path());
        Ok(Self {
            dir: Some(dir),
            _lock: lock,
        })
    }

    /// The directory.
    pub(super) fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until dropped").path()
    }

    /// A file name inside the directory.
    pub(super) fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            unregister_for_interrupt(dir.path());
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                tracing::warn!(error = %e, dir = %path.display(), "cannot remove scratch directory");
            }
        }
    }
}

/// Removes scratch directories in `parent` left by dead processes (see
/// [`Scratch`]). Never fails: what cannot be checked or removed is kept.
fn remove_stale_scratch(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(SCRATCH_PREFIX)
        {
            continue;
        }
        // Not following links: only real directories are ours.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let stale = match std::fs::File::open(entry.path().join(SCRATCH_LOCK)) {
            // Locked by a live process: `WouldBlock`.
            Ok(lock) => lock.try_lock().is_ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age >= UNLOCKED_SCRATCH_AGE),
            // Another user's, or unreadable: not ours to judge.
            Err(_) => false,
        };
        if stale {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(
                    dir = %entry.path().display(),
                    "removed the scratch directory of a restorer that did not finish"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    dir = %entry.path().display(),
                    "cannot remove a stale scratch directory"
                ),
            }
        }
    }
}

/// Paths removed if the process is interrupted.
static ON_INTERRUPT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Whether a task is listening for SIGINT/SIGTERM.
static LISTENING: AtomicBool = AtomicBool::new(false);

/// Removes `path` (a file or a directory) if the process gets SIGINT or
/// SIGTERM before [`unregister_for_interrupt`], then exits with 130 or 143.
/// The blocking threads of a restore cannot be unwound, so an interrupt is
/// handled by removing what they write and exiting; a listener task is
/// started on the current Tokio runtime at the first registration.
pub(super) fn register_for_interrupt(path: &Path) {
    ON_INTERRUPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(path.to_owned());
    if !LISTENING.swap(true, Ordering::SeqCst) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(remove_on_interrupt());
            }
            Err(_) => LISTENING.store(false, Ordering::SeqCst),
        }
    }
}

/// Forgets a path registered with [`register_for_interrupt`].
pub(super) fn unregister_for_interrupt(path: &Path) {
    ON_INTERRUPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|p| p != path);
}

async fn remove_on_interrupt() {
    use tokio::signal::unix::{signal, SignalKind};
    /// Lets a later registration start a new listener when this one's
    /// runtime goes away (tests run many runtimes in one process).
    struct Listening;
    impl Drop for Listening {
        fn drop(&mut self) {
            LISTENING.store(false, Ordering::SeqCst);
        }
    }
    let _listening = Listening;
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!(
            "cannot listen for SIGINT/SIGTERM: scratch files stay behind if interrupted"
        );
        return;
    };
    let code = tokio::select! {
        _ = interrupt.recv() => 130,
        _ = terminate.recv() => 143,
    };
    let paths = std::mem::take(
        &mut *ON_INTERRUPT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for path in &paths {
        // A blocking thread may still be creating files: try twice.
        for _ in 0..2 {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            if removed.is_ok() || !path.exists() {
                break;
            }
        }
    }
    etcdpitr_common::cli::note(format_args!("error: interrupted; scratch files removed"));
    std::process::exit(code);
}

/// A scratch file in a private scratch directory of the system temp dir
/// (see [`Scratch`]); both go when this is dropped. Derefs to the file's
/// path.
pub(super) struct ScratchFile {
    path: PathBuf,
    _scratch: Scratch,
}

impl std::ops::Deref for ScratchFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

/// A path for scratch file `what`, in a new private scratch directory of the
/// system temp dir, removed when the returned value is dropped.
///
/// # Errors
/// When no private scratch directory can be made (nothing is written
/// anywhere predictable instead).
pub(super) fn scratch_file(what: &str) -> anyhow::Result<ScratchFile> {
    let scratch = Scratch::new_in(&std::env::temp_dir())?;
    Ok(ScratchFile {
        path: scratch.file(what),
        _scratch: scratch,
    })
}

/// An exclusive lock on a restore's output path, held for the whole
/// restore: a second restore to the same output fails at once instead of
/// both "succeeding". The lock file `.{name}.etcd-restorer-lock` next to the
/// output is removed when the lock is released.
pub(super) struct OutputLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl OutputLock {
    /// Takes the lock of `output` (whose directory is `dir`).
    ///
    /// # Errors
    /// [`UsageError`] naming the output if another restorer holds it; I/O
    /// errors naming the lock file.
    pub(super) fn acquire(output: &Path, dir: &Path, file_name: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let path = dir.join(format!(".{file_name}.etcd-restorer-lock"));
        // A holder removes the file when done; whoever locked the removed
        // file must try again on the new one.
        for _ in 0..8 {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(PRIVATE_FILE_MODE)
                .open(&path)
                .with_context(|| format!("open {}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => bail!(UsageError(format!(
                    "--output {}: another etcd-restorer is writing it (lock {} is held)",
                    output.display(),
                    path.display()
                ))),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("lock {}", path.display()))
                }
            }
            let held = file.metadata()?;
            let current = std::fs::metadata(&path).ok();
            if current.is_some_and(|c| c.dev() == held.dev() && c.ino() == held.ino()) {
                register_for_interrupt(&path);
                return Ok(Self { path, _file: file });
            }
        }
        bail!("cannot lock {}: it keeps being replaced", path.display())
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        unregister_for_interrupt(&self.path);
        // Removed while still locked (see `acquire`).
        std::fs::remove_file(&self.path).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_is_private_and_removed() {
        let parent = tempfile::tempdir().unwrap();
        let path = {
            let s = Scratch::new_in(parent.path()).unwrap();
            let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
            assert!(s
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(SCRATCH_PREFIX));
            std::fs::write(s.file("x"), b"secret").unwrap();
            s.path().to_owned()
        };
        assert!(!path.exists());
    }

    #[test]
    fn stale_scratch_of_dead_processes_is_removed_live_is_kept() {
        let parent = tempfile::tempdir().unwrap();
        let live = Scratch::new_in(parent.path()).unwrap();
        // A dead process's: its lock file exists but nobody holds it.
        let dead = parent.path().join(".etcd-restorer-dead");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(SCRATCH_LOCK), b"").unwrap();
        std::fs::write(dead.join("base.db"), b"plaintext").unwrap();
        // One just being created (no lock yet): kept.
        let young = parent.path().join(".etcd-restorer-young");
        std::fs::create_dir(&young).unwrap();
        let other = Scratch::new_in(parent.path()).unwrap();
        assert!(!dead.exists());
        assert!(young.exists());
        assert!(live.path().exists());
        assert!(other.path().exists());
    }

    #[test]
    fn scratch_file_is_private_and_removed() {
        let f = scratch_file("verify").unwrap();
        let dir = f.parent().unwrap().to_owned();
        assert_ne!(dir, std::env::temp_dir());
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(f);
        assert!(!dir.exists());
    }

    #[test]
    fn a_second_restore_to_the_same_output_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("snap.db");
        let first = OutputLock::acquire(&out, dir.path(), "snap.db").unwrap();
        let err = OutputLock::acquire(&out, dir.path(), "snap.db")
            .err()
            .expect("refused");
        assert!(err.is::<UsageError>());
        assert!(err.to_string().contains("snap.db"), "{err}");
        drop(first);
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
        let _again = OutputLock::acquire(&out, dir.path(), "snap.db").unwrap();
    }
}
