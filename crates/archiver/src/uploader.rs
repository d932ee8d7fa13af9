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

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use etcdpitr_common::catalog::{Catalog, ObjectState};
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::store::Archive;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::retry::retry;

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
    /// in upload order.
    ///
    /// # Errors
    /// I/O errors, or a file that does not belong in the spool.
    pub fn open(data_dir: &Path, max_bytes: u64) -> anyhow::Result<(Arc<Self>, Vec<SpoolItem>)> {
        let dir = data_dir.join("spool");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
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
        let tmp = path.with_extension("tmp");
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(data)?;
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

/// Uploads spooled segments in order until the channel closes (then drains
/// what is queued) or `abort` fires. Returns the number uploaded.
///
/// Dropping it midway is safe: an item is removed from the spool only after
/// its upload succeeded, and a repeated upload of the same bytes succeeds.
pub async fn run_uploader(
    archive: Archive,
    spool: Arc<Spool>,
    catalog: Arc<Mutex<Catalog>>,
    mut rx: mpsc::UnboundedReceiver<SpoolItem>,
    abort: CancellationToken,
) -> u64 {
    let mut uploaded = 0;
    while let Some(item) = rx.recv().await {
        let key = layout::segment_key(item.generation, &item.name);
        let what = format!("upload segment {key} (it stays in the spool)");
        let done = retry(
            &what,
            &abort,
            |_| true,
            || async {
                let data = tokio::fs::read(&item.path)
                    .await
                    .with_context(|| format!("read spooled {}", item.path.display()))?;
                Ok(archive.put_once(&key, Bytes::from(data)).await?)
            },
        )
        .await;
        if !matches!(done, Ok(Some(()))) {
            return uploaded;
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
