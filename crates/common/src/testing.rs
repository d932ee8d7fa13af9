//! An in-memory object store that injects faults, for in-process tests of
//! everything that writes or deletes archive objects (feature `testing`).
//! It can also lock objects as an S3 Object Lock bucket does: a locked
//! object is reported by [`ObjectLockSource::retention`] and, as on a
//! versioned bucket, deleting it still succeeds (S3 adds a delete marker).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path as StorePath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::object_lock::{ObjectLockSource, Retention};
use crate::store::StoreError;

/// How the store misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Nothing goes wrong.
    None,
    /// The first `n` writes fail with a transient error.
    FailFirstWrites(usize),
    /// Every write is refused (access denied).
    DenyWrites,
    /// The store has no create-if-absent puts.
    NoWriteOnce,
    /// Deleting an object whose path contains this text is refused (access
    /// denied), as a retention lock does.
    RefuseDeletes(&'static str),
    /// After `n` deletions, every deletion fails with a transient error (a
    /// process killed or a network lost mid-prune).
    FailDeletesAfter(usize),
    /// Every read takes this long (a store far away); the most reads in
    /// flight at once is counted ([`Faulty::most_reads_in_flight`]).
    SlowReads(std::time::Duration),
}

/// An in-memory store that injects one [`Fault`].
#[derive(Debug)]
pub struct Faulty {
    inner: InMemory,
    fault: Fault,
    writes: AtomicUsize,
    deletes: AtomicUsize,
    /// Object Lock: `None` for a bucket without it, else each locked
    /// object's lock by store path.
    locks: Mutex<Option<BTreeMap<String, Retention>>>,
    lock_lookups: AtomicUsize,
    reads_in_flight: AtomicUsize,
    most_reads_in_flight: AtomicUsize,
}

impl Faulty {
    /// An empty store with `fault`.
    pub fn new(fault: Fault) -> Self {
        Self {
            inner: InMemory::new(),
            fault,
            writes: AtomicUsize::new(0),
            deletes: AtomicUsize::new(0),
            locks: Mutex::new(None),
            lock_lookups: AtomicUsize::new(0),
            reads_in_flight: AtomicUsize::new(0),
            most_reads_in_flight: AtomicUsize::new(0),
        }
    }

    /// The most reads in flight at once so far (counted under
    /// [`Fault::SlowReads`]).
    pub fn most_reads_in_flight(&self) -> usize {
        self.most_reads_in_flight.load(Ordering::SeqCst)
    }

    /// Turns Object Lock on (for good, as on S3) and locks the object at
    /// store path `location` with `retention`, or unlocks it with `None`.
    pub fn set_retention(&self, location: &str, retention: Option<Retention>) {
        let mut locks = self.locks.lock().expect("no panics while held");
        let locks = locks.get_or_insert_with(BTreeMap::new);
        match retention {
            Some(r) => locks.insert(location.to_owned(), r),
            None => locks.remove(location),
        };
    }

    /// Object Lock questions asked so far (bucket and objects).
    pub fn lock_lookups(&self) -> usize {
        self.lock_lookups.load(Ordering::SeqCst)
    }

    /// Writes attempted so far (failed ones included).
    pub fn writes(&self) -> usize {
        self.writes.load(Ordering::SeqCst)
    }

    /// The underlying store, to read or plant objects past the faults.
    pub fn inner(&self) -> &InMemory {
        &self.inner
    }

    /// A store with `fault` holding a copy of `self`'s objects.
    pub async fn with_fault(&self, fault: Fault) -> object_store::Result<Self> {
        let copy = Self::new(fault);
        copy.locks
            .lock()
            .expect("no panics while held")
            .clone_from(&self.locks.lock().expect("no panics while held"));
        let metas: Vec<ObjectMeta> = self
            .inner
            .list(None)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<object_store::Result<_>>()?;
        for m in metas {
            let bytes = self
                .inner
                .get_opts(&m.location, GetOptions::default())
                .await?
                .bytes()
                .await?;
            copy.inner
                .put_opts(
                    &m.location,
                    PutPayload::from_bytes(bytes),
                    PutOptions::default(),
                )
                .await?;
        }
        Ok(copy)
    }

    fn check_write(&self, location: &StorePath) -> object_store::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        match self.fault {
            Fault::FailFirstWrites(k) if n < k => Err(object_store::Error::Generic {
                store: "Faulty",
                source: "connection reset".into(),
            }),
            Fault::DenyWrites => Err(object_store::Error::PermissionDenied {
                path: location.to_string(),
                source: "AccessDenied".into(),
            }),
            _ => Ok(()),
        }
    }

    fn check_delete(&self, location: &StorePath) -> object_store::Result<()> {
        match self.fault {
            Fault::RefuseDeletes(text) if location.as_ref().contains(text) => {
                Err(object_store::Error::PermissionDenied {
                    path: location.to_string(),
                    source: "AccessDenied: object is under retention".into(),
                })
            }
            Fault::FailDeletesAfter(k) if self.deletes.fetch_add(1, Ordering::SeqCst) >= k => {
                Err(object_store::Error::Generic {
                    store: "Faulty",
                    source: "connection reset".into(),
                })
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Faulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &StorePath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check_write(location)?;
        if self.fault == Fault::NoWriteOnce && opts.mode == object_store::PutMode::Create {
            return Err(object_store::Error::NotImplemented {
                operation: "PutMode::Create".into(),
                implementer: "Faulty".into(),
            });
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &StorePath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check_write(location)?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &StorePath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if let Fault::SlowReads(delay) = self.fault {
            /// Counts a read out when it ends, or is dropped.
            struct InFlight<'a>(&'a AtomicUsize);
            impl Drop for InFlight<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let now = self.reads_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            let _counted = InFlight(&self.reads_in_flight);
            self.most_reads_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<StorePath>>,
    ) -> BoxStream<'static, object_store::Result<StorePath>> {
        // Decide each deletion here, then let the inner store delete the
        // ones allowed.
        let decided: Vec<object_store::Result<StorePath>> =
            futures::executor::block_on(locations.collect::<Vec<_>>())
                .into_iter()
                .map(|l| l.and_then(|p| self.check_delete(&p).map(|()| p)))
                .collect();
        let (allowed, refused): (Vec<_>, Vec<_>) = decided.into_iter().partition(Result::is_ok);
        let deleted = self
            .inner
            .delete_stream(futures::stream::iter(allowed).boxed());
        deleted.chain(futures::stream::iter(refused)).boxed()
    }

    fn list(
        &self,
        prefix: Option<&StorePath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&StorePath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &StorePath,
        to: &StorePath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

impl ObjectLockSource for Faulty {
    fn bucket_lock_enabled(&self) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.lock_lookups.fetch_add(1, Ordering::SeqCst);
        let enabled = self.locks.lock().expect("no panics while held").is_some();
        Box::pin(async move { Ok(enabled) })
    }

    fn retention<'a>(
        &'a self,
        path: &'a StorePath,
    ) -> BoxFuture<'a, Result<Option<Retention>, StoreError>> {
        self.lock_lookups.fetch_add(1, Ordering::SeqCst);
        let lock = self
            .locks
            .lock()
            .expect("no panics while held")
            .as_ref()
            .and_then(|l| l.get(path.as_ref()).copied());
        Box::pin(async move { Ok(lock) })
    }
}
