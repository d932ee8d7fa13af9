//! The spool and the uploader.
//!
//! A sealed segment leaves the watch path at once (so a slow disk never
//! stalls reading the watch); the spooler makes it durable in
//! `data-dir/spool` (temp file, fsync, rename), then the uploader uploads it
//! write-once (several at once, `--upload-concurrency`) and removes it from
//! the spool in order. So a `kill -9` loses nothing that was sealed, a
//! store outage only grows the spool, and "archived through revision N"
//! advances only when every earlier segment is in the store. When the spool holds
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
use futures::stream::{FuturesOrdered, StreamExt};
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

/// How an upload of one segment ended.
type Outcome = anyhow::Result<Option<(Digest, Option<u64>)>>;

/// Uploads one spooled segment write-once, retrying transient failures
/// (see [`run_uploader`]): its digest and the bytes put (`None` when the
/// store already held the same history from another writer), or `None`
/// if `abort` fired first.
async fn upload_one(
    archive: &Archive,
    spool: &Spool,
    observer: &Observer,
    abort: &CancellationToken,
    item: &SpoolItem,
) -> Outcome {
    let key = layout::segment_key(item.generation, &item.name);
    let what = format!("upload segment {key} (it stays in the spool)");
    retry(
        &what,
        abort,
        |e| !is_permanent_store_error(e),
        || async {
            let put = async {
                let data = Bytes::from(spool.read(item).await?);
                match archive.put_once(&key, data.clone()).await {
                    Err(StoreError::Conflict(_)) => resolve_conflict(archive, &key, &data)
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
    .await
}

/// Uploads spooled segments until the channel closes (then drains what is
/// queued) or `abort` fires. Returns the number uploaded.
///
/// Up to `concurrency` segments upload at once (a store's latency, not its
/// bandwidth, bounds one upload at a time), but they count as archived
/// strictly in order: a segment's digest reaches `tip`, its durability
/// `observer` (the archived revision), its catalog row `uploaded` and its
/// spool file is removed only once every segment before it did. One that
/// completes early waits for those before it.
///
/// Transient failures (network, throttling, a full local disk) are retried
/// with backoff. A permanent one ([`is_permanent_store_error`]: no such
/// bucket, access denied, a [`StoreError::Conflict`] with an existing
/// object) goes to `fatal` and the uploader stops as soon as every segment
/// before the failed one is counted; the failed segment and every later
/// one stay in the spool (a later one already in the store is uploaded
/// again, as the same bytes, on the next start).
///
/// Dropping it midway is safe: an item is removed from the spool only after
/// it and every item before it were uploaded, and a repeated upload of the
/// same bytes succeeds.
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
    concurrency: usize,
) -> u64 {
    let concurrency = concurrency.max(1);
    let mut uploaded = 0;
    let mut in_flight = FuturesOrdered::new();
    let mut queue_open = true;
    loop {
        let (item, done) = tokio::select! {
            // Count what is done before taking more.
            biased;
            Some(done) = in_flight.next(), if !in_flight.is_empty() => done,
            next = rx.recv(), if queue_open && in_flight.len() < concurrency => {
                match next {
                    Some(item) => {
                        let (archive, spool, observer, abort) = (&archive, &*spool, &observer, &abort);
                        in_flight.push_back(async move {
                            let done = upload_one(archive, spool, observer, abort, &item).await;
                            (item, done)
                        });
                    }
                    None => queue_open = false,
                }
                continue;
            }
            else => return uploaded,
        };
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
        tracing::debug!(segment = %layout::segment_key(item.generation, &item.name), "uploaded");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
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

    /// The state of a writer of generation 1 at revision 10: its fatal
    /// flag, chain tip and observer (with the observer's registry).
    fn writer_at_10() -> (
        Fatal,
        SharedTip,
        Observer,
        etcdpitr_common::metrics::Registry,
    ) {
        let fatal = Fatal::new(&CancellationToken::new());
        let tip = SharedTip::new(crate::tip::Tip::start(GenerationId(1), 10, [0; 32]));
        let (observer, registry) = Observer::new(
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
        (fatal, tip, observer, registry)
    }

    /// Runs the uploader on the one spooled item until it stops.
    async fn upload(s: &Setup) -> (u64, Fatal) {
        let archive =
            Archive::from_store(s.store.clone(), "", "memory://test").with_keys(s.keys.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(s.item.clone()).unwrap();
        drop(tx);
        let (fatal, tip, observer, _) = writer_at_10();
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
                crate::config::DEFAULT_UPLOAD_CONCURRENCY as usize,
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

    /// An in-memory store whose puts take `delay`, wait while their path
    /// holds a `held` text, fail for good when it holds `deny` and fail
    /// transiently while `flaky` counts down for it; it counts the puts
    /// running at once.
    #[derive(Debug, Default)]
    struct Gated {
        inner: object_store::memory::InMemory,
        delay: Duration,
        deny: Option<String>,
        held: Mutex<Vec<String>>,
        released: Notify,
        flaky: Mutex<Vec<(String, usize)>>,
        active: AtomicU64,
        max_active: AtomicU64,
    }

    impl Gated {
        fn release(&self, text: &str) {
            self.held.lock().unwrap().retain(|h| h != text);
            self.released.notify_waiters();
        }

        async fn stored(&self, key: &str) -> bool {
            self.inner.head(&StorePath::from(key)).await.is_ok()
        }
    }

    impl std::fmt::Display for Gated {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Gated")
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for Gated {
        async fn put_opts(
            &self,
            location: &StorePath,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let path = location.as_ref();
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_active.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            loop {
                let released = self.released.notified();
                if !self.held.lock().unwrap().iter().any(|h| path.contains(h)) {
                    break;
                }
                released.await;
            }
            self.active.fetch_sub(1, Ordering::SeqCst);
            if self.deny.as_deref().is_some_and(|d| path.contains(d)) {
                return Err(object_store::Error::PermissionDenied {
                    path: path.to_owned(),
                    source: "AccessDenied".into(),
                });
            }
            for (text, left) in self.flaky.lock().unwrap().iter_mut() {
                if path.contains(text.as_str()) && *left > 0 {
                    *left -= 1;
                    return Err(object_store::Error::Generic {
                        store: "Gated",
                        source: "connection reset".into(),
                    });
                }
            }
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &StorePath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &StorePath,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<StorePath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<StorePath>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&StorePath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&StorePath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &StorePath,
            to: &StorePath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// Eight spooled segments of generation 1 (revisions 11..=90, ten
    /// each, the n-th's store key ending in `-{n}`'s last revision), and
    /// a running uploader over `store` with `concurrency`.
    struct Many {
        _dir: tempfile::TempDir,
        store: Arc<Gated>,
        spool: Arc<Spool>,
        catalog: Arc<Mutex<Catalog>>,
        items: Vec<SpoolItem>,
        tip: SharedTip,
        registry: etcdpitr_common::metrics::Registry,
        fatal: Fatal,
        uploader: tokio::task::JoinHandle<u64>,
    }

    /// Last revision of the n-th segment (from 0) of [`Many`].
    fn last_of(n: usize) -> i64 {
        10 * (n as i64 + 2)
    }

    fn start_many(store: Gated, concurrency: usize) -> Many {
        let store = Arc::new(store);
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let (spool, _) = Spool::open(&data_dir, 1 << 30, Arc::default()).unwrap();
        let catalog = Arc::new(Mutex::new(
            Catalog::open(&data_dir.join("catalog.db")).unwrap(),
        ));
        let (tx, rx) = mpsc::unbounded_channel();
        let items: Vec<SpoolItem> = (0..8)
            .map(|n| {
                let name = SegmentName {
                    first: last_of(n) - 9,
                    last: last_of(n),
                    end_ms: 5,
                };
                let data = format!("segment {n}");
                spool.reserve(data.len() as u64);
                let item = spool.write(GenerationId(1), name, data.as_bytes()).unwrap();
                spool.written(item.bytes);
                tx.send(item.clone()).unwrap();
                item
            })
            .collect();
        drop(tx);
        let archive = Archive::from_store(store.clone(), "", "memory://test");
        let (fatal, tip, observer, registry) = writer_at_10();
        let uploader = tokio::spawn(run_uploader(
            archive,
            spool.clone(),
            catalog.clone(),
            rx,
            CancellationToken::new(),
            fatal.clone(),
            tip.clone(),
            observer,
            concurrency,
        ));
        Many {
            _dir: dir,
            store,
            spool,
            catalog,
            items,
            tip,
            registry,
            fatal,
            uploader,
        }
    }

    impl Many {
        fn key(&self, n: usize) -> String {
            layout::segment_key(GenerationId(1), &self.items[n].name)
        }

        /// Every view of "archived through": the chain's tip, the metric,
        /// the catalog and the spool agree on the last `n` segments counted.
        fn assert_counted(&self, n: usize) {
            let through = if n == 0 { 10 } else { last_of(n - 1) };
            assert_eq!(self.tip.get().segment.0, through, "tip");
            let metrics = self.registry.render();
            let line = format!("etcd_pitr_archived_revision {through}\n");
            assert!(metrics.contains(&line), "{line} in {metrics}");
            let catalog = self.catalog.lock().unwrap();
            let last = catalog.last_uploaded_segment(GenerationId(1)).unwrap();
            assert_eq!(last.map(|l| l.last), (n > 0).then_some(through), "catalog");
            for (i, item) in self.items.iter().enumerate() {
                assert_eq!(item.path.exists(), i >= n, "spool file of segment {i}");
            }
        }

        async fn wait_stored(&self, n: usize) {
            let key = self.key(n);
            tokio::time::timeout(Duration::from_secs(10), async {
                while !self.store.stored(&key).await {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the segment reaches the store");
        }
    }

    /// Segments that reach the store before an earlier one are not counted
    /// (tip, metric, catalog, spool) until it does.
    #[tokio::test]
    async fn the_watermark_advances_in_order_when_uploads_complete_out_of_order() {
        let mut m = start_many(Gated::default(), 4);
        m.store.held.lock().unwrap().extend([
            format!("-{:016x}", last_of(1)),
            format!("-{:016x}", last_of(5)),
        ]);
        // With four at once, 0 is counted and 2..=4 wait for 1; 5 cannot
        // start while the window is 1..=4.
        for n in [0, 2, 3, 4] {
            m.wait_stored(n).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m.assert_counted(1);
        m.store.release(&format!("-{:016x}", last_of(1)));
        for n in [1, 6, 7] {
            m.wait_stored(n).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m.assert_counted(5);
        m.store.release(&format!("-{:016x}", last_of(5)));
        assert_eq!((&mut m.uploader).await.unwrap(), 8);
        m.assert_counted(8);
        assert_eq!(m.spool.bytes(), 0);
        assert!(!m.fatal.failed());
    }

    /// A segment that fails for good stops the watermark before it, even
    /// though later ones reached the store; they stay in the spool.
    #[tokio::test]
    async fn a_failed_segment_is_never_passed() {
        let mut m = start_many(
            Gated {
                deny: Some(format!("-{:016x}", last_of(3))),
                delay: Duration::from_millis(20),
                ..Gated::default()
            },
            4,
        );
        m.store
            .held
            .lock()
            .unwrap()
            .push(format!("-{:016x}", last_of(3)));
        for n in 4..7 {
            m.wait_stored(n).await;
        }
        m.store.release(&format!("-{:016x}", last_of(3)));
        assert_eq!((&mut m.uploader).await.unwrap(), 3);
        m.assert_counted(3);
        let err = m.fatal.take().expect("the failure is kept");
        assert!(is_permanent_store_error(&err));
        assert!(format!("{err:#}").contains(&m.key(3)), "{err:#}");

        // A transient failure is retried while later segments wait for it.
        let mut m = start_many(
            Gated {
                flaky: Mutex::new(vec![(format!("-{:016x}", last_of(2)), 1)]),
                ..Gated::default()
            },
            4,
        );
        for n in [0, 1, 3, 4, 5] {
            m.wait_stored(n).await;
        }
        // Well before the retry (after RETRY_MIN).
        tokio::time::sleep(Duration::from_millis(50)).await;
        m.assert_counted(2);
        assert_eq!((&mut m.uploader).await.unwrap(), 8);
        m.assert_counted(8);
        assert!(!m.fatal.failed());
    }

    /// Uploads overlap: eight puts of 100 ms take about two rounds with
    /// four at once, never more than four at a time; one at a time takes
    /// eight rounds.
    #[tokio::test]
    async fn uploads_overlap_up_to_the_concurrency() {
        let slow = || Gated {
            delay: Duration::from_millis(100),
            ..Gated::default()
        };
        let started = std::time::Instant::now();
        let mut m = start_many(slow(), 4);
        assert_eq!((&mut m.uploader).await.unwrap(), 8);
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_millis(500), "{elapsed:?}");
        assert_eq!(m.store.max_active.load(Ordering::SeqCst), 4);
        m.assert_counted(8);

        let started = std::time::Instant::now();
        let mut m = start_many(slow(), 1);
        assert_eq!((&mut m.uploader).await.unwrap(), 8);
        assert!(started.elapsed() >= Duration::from_millis(800));
        assert_eq!(m.store.max_active.load(Ordering::SeqCst), 1);
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
