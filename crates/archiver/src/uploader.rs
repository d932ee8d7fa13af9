//! The spool and the uploader.
//!
//! A sealed segment leaves the watch path at once (so a slow disk never
//! stalls reading the watch); the spooler makes it durable in
//! `data-dir/spool` (temp file, fsync, rename), then the uploader uploads it
//! write-once, strictly in order, and removes it from the spool. So a `kill -9` loses nothing that was sealed, a store
//! outage only grows the spool, and "archived through revision N" advances
//! only when every earlier segment is in the store. When the spool holds
//! more than its limit, [`Spool::wait_for_room`] makes the watch reader wait:
//! etcd keeps the history until compaction, so waiting loses nothing.
//!
//! With an encrypted archive, spool files are sealed too (as
//! `spool/{file name}`, with the archive's sealing key), so the data
//! directory holds no key or value in plaintext except a snapshot's scratch
//! files while it is taken.
//!
//! Store failures that waiting does not fix (no such bucket, access denied,
//! a write-once conflict: [`StoreError::is_retryable`]) are not retried: the
//! uploader reports the first one through [`Fatal`] and stops, the segment
//! stays in the spool, and the archiver exits with the error.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use etcdpitr_common::catalog::{Catalog, ObjectState};
use etcdpitr_common::chain;
use etcdpitr_common::crypto::{self, Keyring};
use etcdpitr_common::errors;
use etcdpitr_common::hashchain::Digest;
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::segment;
use etcdpitr_common::store::{self, Archive, StoreError};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::observe::Observer;
use crate::retry::retry;
use crate::tip::SharedTip;

/// Whether an error chain holds a store failure that retrying cannot fix,
/// or an object (spooled or stored) the archive's keys cannot open.
pub fn is_permanent_store_error(error: &anyhow::Error) -> bool {
    error.chain().any(|c| {
        c.downcast_ref::<StoreError>()
            .is_some_and(|e| !e.is_retryable())
            || crypto::fault_of(c).is_some()
    })
}

/// The first permanent failure of a background task (the uploader, a
/// snapshot). [`Fatal::fail`] logs it once, keeps it and cancels
/// [`Fatal::token`], which the archiver's main loop runs under; the archiver
/// then shuts down as on a signal and returns the error.
#[derive(Clone, Debug)]
pub struct Fatal {
    stop: CancellationToken,
    error: Arc<Mutex<Option<anyhow::Error>>>,
}

impl Fatal {
    /// A handle whose token is a child of `shutdown`.
    pub fn new(shutdown: &CancellationToken) -> Self {
        Self {
            stop: shutdown.child_token(),
            error: Arc::default(),
        }
    }

    /// Cancelled on shutdown or on the first failure.
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Records a permanent failure and stops the archiver.
    pub fn fail(&self, error: anyhow::Error) {
        tracing::error!(
            error = errors::one_line(&error),
            hint = errors::hint(&error).map(tracing::field::display),
            "permanent failure; stopping"
        );
        let mut slot = self.error.lock().expect("fatal lock");
        if slot.is_none() {
            *slot = Some(error);
        }
        self.stop.cancel();
    }

    /// Whether a failure happened.
    pub fn failed(&self) -> bool {
        self.error.lock().expect("fatal lock").is_some()
    }

    /// The failure's message, if one happened (and was not taken yet).
    pub fn reason(&self) -> Option<String> {
        self.error
            .lock()
            .expect("fatal lock")
            .as_ref()
            .map(errors::one_line)
    }

    /// The failure, if one happened (taken once).
    pub fn take(&self) -> Option<anyhow::Error> {
        self.error.lock().expect("fatal lock").take()
    }
}

/// A sealed segment waiting in the spool.
#[derive(Clone, Debug)]
pub struct SpoolItem {
    /// Its generation.
    pub generation: GenerationId,
    /// Its name.
    pub name: SegmentName,
    /// Local file.
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
}

/// The spool directory and its byte budget.
pub struct Spool {
    dir: PathBuf,
    /// The archive's keys: spool files are sealed like archive objects.
    keys: Arc<Keyring>,
    /// Sealed bytes not yet uploaded (in memory or on disk).
    bytes: AtomicU64,
    /// Sealed bytes not yet written to disk (in memory).
    unwritten: AtomicU64,
    max_bytes: u64,
    room: Notify,
}

/// Sealed bytes allowed in memory on their way to the spool directory; keeps
/// memory bounded when the local disk is slower than the watch.
const MAX_UNWRITTEN_BYTES: u64 = 48 << 20;

impl Spool {
    /// Opens the spool under `data_dir`, returning leftovers of an earlier run
    /// in upload order. Spool files are sealed with `keys` (when not empty).
    ///
    /// # Errors
    /// I/O errors, or a file that does not belong in the spool.
    pub fn open(
        data_dir: &Path,
        max_bytes: u64,
        keys: Arc<Keyring>,
    ) -> anyhow::Result<(Arc<Self>, Vec<SpoolItem>)> {
        let dir = data_dir.join("spool");
        store::create_private_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut items = Vec::new();
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().extension().is_some_and(|e| e == "tmp") {
                std::fs::remove_file(entry.path())?;
                continue;
            }
            let parsed = file_name
                .split_once('_')
                .and_then(|(g, s)| Some((GenerationId::parse_dir(g)?, SegmentName::parse(s)?)));
            let Some((generation, name)) = parsed else {
                anyhow::bail!("unexpected file {} in the spool", entry.path().display());
            };
            items.push(SpoolItem {
                generation,
                name,
                path: entry.path(),
                bytes: entry.metadata()?.len(),
            });
        }
        items.sort_by_key(|i| (i.generation, i.name));
        let total = items.iter().map(|i| i.bytes).sum();
        Ok((
            Arc::new(Self {
                dir,
                keys,
                bytes: AtomicU64::new(total),
                unwritten: AtomicU64::new(0),
                max_bytes,
                room: Notify::new(),
            }),
            items,
        ))
    }

    /// Counts a sealed segment against the spool limit from the moment it
    /// is sealed (it is released once uploaded).
    pub fn reserve(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        self.unwritten.fetch_add(bytes, Ordering::SeqCst);
    }

    fn written(&self, bytes: u64) {
        self.unwritten.fetch_sub(bytes, Ordering::SeqCst);
        self.room.notify_waiters();
    }

    /// The name a spool file is sealed under.
    fn sealed_name(path: &Path) -> String {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned());
        format!("spool/{}", file.unwrap_or_default())
    }

    /// Makes a sealed segment durable in the spool (already reserved).
    ///
    /// # Errors
    /// I/O errors (disk full, …).
    pub fn write(
        &self,
        generation: GenerationId,
        name: SegmentName,
        data: &[u8],
    ) -> anyhow::Result<SpoolItem> {
        let path = self
            .dir
            .join(format!("{}_{}", generation.dir_name(), name.file_name()));
        let sealed;
        let stored = match self.keys.sealing() {
            Some(key) => {
                sealed = crypto::seal(key, &Self::sealed_name(&path), data)?;
                &sealed[..]
            }
            None => data,
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(store::PRIVATE_FILE_MODE)
            .open(&tmp)
            .with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(stored)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(SpoolItem {
            generation,
            name,
            path,
            bytes: data.len() as u64,
        })
    }

    /// Reads a spooled segment (opened, when spool files are sealed).
    ///
    /// # Errors
    /// I/O errors, or a file the keys cannot open.
    pub async fn read(&self, item: &SpoolItem) -> anyhow::Result<Vec<u8>> {
        let stored = tokio::fs::read(&item.path)
            .await
            .with_context(|| format!("read spooled {}", item.path.display()))?;
        Ok(crypto::open(
            &self.keys,
            &Self::sealed_name(&item.path),
            &stored,
        )?)
    }

    /// Bytes waiting for upload.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    fn release(&self, bytes: u64) {
        self.bytes.fetch_sub(bytes, Ordering::SeqCst);
        self.room.notify_waiters();
    }

    /// Waits until the spool is below its limit and the segments on their
    /// way to disk fit in memory. Safe to drop.
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.room.notified();
            if self.bytes() < self.max_bytes
                && self.unwritten.load(Ordering::SeqCst) < MAX_UNWRITTEN_BYTES
            {
                return;
            }
            notified.await;
        }
    }
}

/// Records a segment's state in the catalog; a failure is only logged, as
/// the store and the spool directory remain the truth.
fn note(catalog: &Mutex<Catalog>, item: &SpoolItem, state: ObjectState) {
    let result = catalog.lock().expect("catalog lock").put_segment(
        item.generation,
        &item.name,
        item.bytes,
        state,
    );
    if let Err(e) = result {
        tracing::warn!(error = %e, "catalog update failed (the store remains the truth)");
    }
}

/// A sealed segment on its way to the spool.
pub struct Sealed {
    /// Its generation.
    pub generation: GenerationId,
    /// Its name.
    pub name: SegmentName,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// Writes sealed segments to the spool in order and queues them for upload,
/// until the channel closes. A failing disk is retried, never skipped: the
/// spool limit keeps the watch reader waiting meanwhile.
pub async fn run_spooler(
    spool: Arc<Spool>,
    catalog: Arc<Mutex<Catalog>>,
    mut rx: mpsc::UnboundedReceiver<Sealed>,
    uploads: mpsc::UnboundedSender<SpoolItem>,
    abort: CancellationToken,
) {
    while let Some(sealed) = rx.recv().await {
        let sealed = Arc::new(sealed);
        let written = retry(
            "write the spool",
            &abort,
            |_| true,
            || {
                let (spool, sealed) = (spool.clone(), sealed.clone());
                async move {
                    tokio::task::spawn_blocking(move || {
                        spool.write(sealed.generation, sealed.name, &sealed.data)
                    })
                    .await?
                }
            },
        )
        .await;
        let Ok(Some(item)) = written else {
            return;
        };
        spool.written(item.bytes);
        note(&catalog, &item, ObjectState::Spooled);
        if uploads.send(item).is_err() {
            return;
        }
    }
}

/// The store already holds an object of this segment's name with other
/// bytes (another writer, or an earlier term of this one, observed the same
/// revisions at other times). By the chain rules that is benign when both
/// hold the same events for every revision: the stored copy stands and the
/// spooled one is dropped. Anything else is an integrity error.
async fn resolve_conflict(archive: &Archive, key: &str, ours: &[u8]) -> anyhow::Result<Digest> {
    let theirs = archive.get(key).await?;
    let conflict = || anyhow::Error::from(StoreError::Conflict(key.to_owned()));
    match chain::same_history(key, &theirs, ours) {
        Ok(true) => {
            tracing::info!(segment = %key, "the store already holds this segment's revisions from another writer; keeping that copy");
            Ok(segment::digest(&theirs))
        }
        Ok(false) => Err(conflict().context(chain::IntegrityError::new(
            key,
            "the stored object holds other events than the spooled segment",
        ))),
        Err(e) => Err(conflict().context(e)),
    }
}

/// Uploads spooled segments in order until the channel closes (then drains
/// what is queued) or `abort` fires. Returns the number uploaded.
///
/// Transient failures (network, throttling, a full local disk) are retried
/// with backoff. A permanent one ([`is_permanent_store_error`]: no such
/// bucket, access denied, a [`StoreError::Conflict`] with an existing
/// object) goes to `fatal` at once and the uploader stops; the segment stays
/// in the spool.
///
/// Dropping it midway is safe: an item is removed from the spool only after
/// its upload succeeded, and a repeated upload of the same bytes succeeds.
///
/// Each failed attempt and each durable segment is reported to `observer`.
#[allow(clippy::too_many_arguments)]
pub async fn run_uploader(
    archive: Archive,
    spool: Arc<Spool>,
    catalog: Arc<Mutex<Catalog>>,
    mut rx: mpsc::UnboundedReceiver<SpoolItem>,
    abort: CancellationToken,
    fatal: Fatal,
    tip: SharedTip,
    observer: Observer,
) -> u64 {
    let mut uploaded = 0;
    while let Some(item) = rx.recv().await {
        let key = layout::segment_key(item.generation, &item.name);
        let what = format!("upload segment {key} (it stays in the spool)");
        let done = retry(
            &what,
            &abort,
            |e| !is_permanent_store_error(e),
            || async {
                let put = async {
                    let data = spool.read(&item).await?;
                    match archive.put_once(&key, Bytes::from(data.clone())).await {
                        Err(StoreError::Conflict(_)) => resolve_conflict(&archive, &key, &data)
                            .await
                            .map(|digest| (digest, None)),
                        Err(e) => Err(e.into()),
                        Ok(()) => Ok((segment::digest(&data), Some(data.len() as u64))),
                    }
                }
                .await;
                if let Err(e) = &put {
                    observer.upload_failed(e);
                }
                put
            },
        )
        .await;
        match done {
            Ok(Some((digest, put_bytes))) => {
                tip.segment_archived(item.generation, item.name.last, digest);
                observer.segment_durable(item.generation, &item.name, put_bytes);
            }
            Ok(None) => return uploaded,
            Err(e) => {
                fatal.fail(e);
                return uploaded;
            }
        }
        note(&catalog, &item, ObjectState::Uploaded);
        if let Err(e) = std::fs::remove_file(&item.path) {
            tracing::warn!(error = %e, path = %item.path.display(), "cannot remove uploaded spool file");
        }
        spool.release(item.bytes);
        uploaded += 1;
        tracing::debug!(segment = %key, "uploaded");
    }
    uploaded
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    use etcdpitr_common::testing::{Fault, Faulty};
    use object_store::path::Path as StorePath;
    use object_store::ObjectStoreExt;

    use super::*;

    struct Setup {
        _dir: tempfile::TempDir,
        data_dir: PathBuf,
        store: Arc<Faulty>,
        spool: Arc<Spool>,
        catalog: Arc<Mutex<Catalog>>,
        item: SpoolItem,
        key: String,
        keys: Arc<Keyring>,
    }

    fn setup(fault: Fault) -> Setup {
        setup_with(fault, b"segment bytes")
    }

    fn setup_with(fault: Fault, data: &[u8]) -> Setup {
        setup_keyed(fault, data, Arc::default())
    }

    /// Revisions 11..=20 of generation 1, observed at `observed_ms`.
    fn segment(observed_ms: i64, value: &[u8]) -> Vec<u8> {
        use etcdpitr_common::segment::{Event, EventKind, RevisionRecord, SegmentBuilder};
        let mut b = SegmentBuilder::new(1, 10, [0; 32]).unwrap();
        for revision in 11..=20 {
            b.push_revision(&RevisionRecord {
                revision,
                observed_ms,
                catching_up: false,
                events: vec![Event {
                    kind: EventKind::Put,
                    key: b"k".to_vec(),
                    value: value.to_vec(),
                    create_revision: 11,
                    mod_revision: revision,
                    version: revision - 10,
                    lease: 0,
                }],
            })
            .unwrap();
        }
        b.finish().unwrap().1
    }

    fn setup_keyed(fault: Fault, data: &[u8], keys: Arc<Keyring>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let (spool, leftovers) = Spool::open(&data_dir, 1 << 30, keys.clone()).unwrap();
        assert!(leftovers.is_empty());
        let catalog = Catalog::open(&data_dir.join("catalog.db")).unwrap();
        let name = SegmentName {
            first: 11,
            last: 20,
            end_ms: 5,
        };
        spool.reserve(data.len() as u64);
        let item = spool.write(GenerationId(1), name, data).unwrap();
        spool.written(item.bytes);
        Setup {
            _dir: dir,
            data_dir,
            store: Arc::new(Faulty::new(fault)),
            spool,
            catalog: Arc::new(Mutex::new(catalog)),
            key: layout::segment_key(GenerationId(1), &name),
            item,
            keys,
        }
    }

    /// Runs the uploader on the one spooled item until it stops.
    async fn upload(s: &Setup) -> (u64, Fatal) {
        let archive =
            Archive::from_store(s.store.clone(), "", "memory://test").with_keys(s.keys.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(s.item.clone()).unwrap();
        drop(tx);
        let fatal = Fatal::new(&CancellationToken::new());
        let tip = SharedTip::new(crate::tip::Tip::start(GenerationId(1), 10, [0; 32]));
        let (observer, _) = Observer::new(
            crate::clock::AnchoredClock::system(),
            Duration::from_secs(30),
        );
        observer.writing();
        observer.generation(
            GenerationId(1),
            crate::observe::Durable {
                revision: 10,
                vouched_ms: 0,
            },
        );
        let uploaded = tokio::time::timeout(
            Duration::from_secs(20),
            run_uploader(
                archive,
                s.spool.clone(),
                s.catalog.clone(),
                rx,
                CancellationToken::new(),
                fatal.clone(),
                tip.clone(),
                observer.clone(),
            ),
        )
        .await
        .expect("the uploader stops");
        // Failed attempts are reported; a durable segment clears them.
        let ready = observer.ready();
        if uploaded == 1 {
            assert!(
                ready.as_ref().err().is_none_or(|r| !r.contains("store")),
                "{ready:?}"
            );
        } else {
            assert!(ready.unwrap_err().starts_with("the store refuses uploads"));
        }
        // An uploaded segment becomes the generation's newest in the chain.
        let newest = if uploaded == 1 { 20 } else { 10 };
        assert_eq!(tip.get().segment.0, newest);
        (uploaded, fatal)
    }

    #[tokio::test]
    async fn transient_failures_are_retried() {
        let s = setup(Fault::FailFirstWrites(2));
        let (uploaded, fatal) = upload(&s).await;
        assert_eq!(uploaded, 1);
        assert!(!fatal.failed());
        assert_eq!(s.store.writes(), 3);
        let stored = s.store.inner().get(&StorePath::from(s.key.as_str())).await;
        assert_eq!(
            stored.unwrap().bytes().await.unwrap().as_ref(),
            b"segment bytes"
        );
        assert!(!s.item.path.exists(), "removed from the spool");
        assert_eq!(s.spool.bytes(), 0);
    }

    #[tokio::test]
    async fn access_denied_fails_fast_and_keeps_the_segment() {
        let s = setup(Fault::DenyWrites);
        let started = std::time::Instant::now();
        let (uploaded, fatal) = upload(&s).await;
        assert_eq!(uploaded, 0);
        assert!(started.elapsed() < crate::retry::RETRY_MIN, "no retry");
        assert_eq!(s.store.writes(), 1);
        assert!(fatal.token().is_cancelled(), "the archiver is stopped");
        let err = fatal.take().expect("the failure is kept");
        assert!(is_permanent_store_error(&err));
        assert!(format!("{err:#}").contains(&s.key), "{err:#}");
        assert!(s.item.path.exists(), "the segment stays in the spool");
    }

    #[tokio::test]
    async fn a_conflicting_object_is_a_typed_error_not_a_retry_loop() {
        let s = setup(Fault::FailFirstWrites(0));
        s.store
            .inner()
            .put(&StorePath::from(s.key.as_str()), "other content".into())
            .await
            .unwrap();
        let (uploaded, fatal) = upload(&s).await;
        assert_eq!(uploaded, 0);
        let err = fatal.take().expect("the conflict is reported");
        assert!(
            err.chain()
                .any(|c| matches!(c.downcast_ref::<StoreError>(), Some(StoreError::Conflict(k)) if *k == s.key)),
            "{err:#}"
        );
        assert!(s.item.path.exists(), "the segment stays in the spool");
    }

    #[tokio::test]
    async fn a_store_without_write_once_puts_fails_fast_with_a_clear_error() {
        let s = setup(Fault::NoWriteOnce);
        let (uploaded, fatal) = upload(&s).await;
        assert_eq!(uploaded, 0);
        assert_eq!(s.store.writes(), 1, "no retry");
        let err = format!("{:#}", fatal.take().expect("the failure is kept"));
        assert!(err.contains("does not support write-once puts"), "{err}");
        assert!(err.contains(&s.key), "{err}");
        assert!(s.item.path.exists(), "the segment stays in the spool");
    }

    #[tokio::test]
    async fn a_copy_of_the_same_history_from_another_writer_is_kept_not_fatal() {
        let s = setup_with(Fault::FailFirstWrites(0), &segment(7, b"v"));
        let theirs = segment(9, b"v");
        s.store
            .inner()
            .put(&StorePath::from(s.key.as_str()), theirs.clone().into())
            .await
            .unwrap();
        let (uploaded, fatal) = upload(&s).await;
        assert_eq!(uploaded, 1);
        assert!(!fatal.failed());
        assert!(!s.item.path.exists(), "the redundant copy left the spool");
        let stored = s.store.inner().get(&StorePath::from(s.key.as_str())).await;
        assert_eq!(stored.unwrap().bytes().await.unwrap().as_ref(), &theirs[..]);
    }

    #[tokio::test]
    async fn a_copy_with_other_events_is_an_integrity_error() {
        let s = setup_with(Fault::FailFirstWrites(0), &segment(7, b"ours"));
        s.store
            .inner()
            .put(
                &StorePath::from(s.key.as_str()),
                segment(7, b"theirs").into(),
            )
            .await
            .unwrap();
        let (uploaded, fatal) = upload(&s).await;
        assert_eq!(uploaded, 0);
        let err = fatal.take().expect("the conflict is reported");
        assert!(format!("{err:#}").contains("holds other events"), "{err:#}");
        assert!(s.item.path.exists(), "the segment stays in the spool");
    }

    #[tokio::test]
    async fn with_encryption_spool_files_and_objects_are_sealed() {
        use etcdpitr_common::crypto::{ArchiveKey, KEY_BYTES};
        let secret = b"a value that must never be stored in plaintext";
        let key = ArchiveKey::from_bytes(&[5; KEY_BYTES]);
        let keys = Arc::new(Keyring::new(vec![key.clone()]));
        let s = setup_keyed(Fault::FailFirstWrites(0), &segment(7, secret), keys.clone());
        let spooled = std::fs::read(&s.item.path).unwrap();
        assert!(spooled.starts_with(crypto::MAGIC));
        assert!(!spooled.windows(secret.len()).any(|w| w == secret));
        let (uploaded, fatal) = upload(&s).await;
        assert_eq!(uploaded, 1, "{:?}", fatal.take());
        let stored = s.store.inner().get(&StorePath::from(s.key.as_str())).await;
        let stored = stored.unwrap().bytes().await.unwrap();
        assert!(stored.starts_with(crypto::MAGIC));
        let archive = Archive::from_store(s.store.clone(), "", "memory://test").with_keys(keys);
        assert_eq!(
            archive.get(&s.key).await.unwrap().as_ref(),
            &segment(7, secret)[..]
        );

        // A spool file sealed with a key the archiver no longer has stops
        // it at once, naming the key.
        let s = setup_keyed(
            Fault::FailFirstWrites(0),
            b"x",
            Arc::new(Keyring::new(vec![key.clone()])),
        );
        let rotated = Keyring::new(vec![ArchiveKey::from_bytes(&[6; KEY_BYTES])]);
        let (spool, leftovers) = Spool::open(&s.data_dir, 1 << 30, Arc::new(rotated)).unwrap();
        let s = Setup {
            spool,
            item: leftovers[0].clone(),
            keys: Arc::new(Keyring::new(vec![ArchiveKey::from_bytes(&[6; KEY_BYTES])])),
            ..s
        };
        let (uploaded, fatal) = upload(&s).await;
        assert_eq!(uploaded, 0);
        let err = fatal.take().expect("the failure is kept");
        assert!(is_permanent_store_error(&err));
        assert!(
            format!("{err:#}").contains(&key.id().to_string()),
            "{err:#}"
        );
        assert!(s.item.path.exists(), "the segment stays in the spool");
    }

    #[test]
    fn spool_and_data_dir_are_owner_only() {
        let s = setup(Fault::FailFirstWrites(0));
        for path in [s.data_dir.clone(), s.data_dir.join("spool")] {
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", path.display());
        }
        for entry in std::fs::read_dir(&s.data_dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                let mode = entry.metadata().unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", entry.path().display());
            }
        }
        let mode = std::fs::metadata(&s.item.path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
