//! A read-only bbolt reader: enough to read an etcd snapshot's revision and
//! walk its buckets without loading the file into memory.
//!
//! Layout (native endian = little endian on every platform etcd ships for):
//! page `n` lives at `n * page_size`; a page starts with a 16-byte header
//! `id u64, flags u16, count u16, overflow u32`. Meta pages 0 and 1 hold
//! `magic, version, page_size, flags, root bucket {pgid, seq}, freelist,
//! high-water pgid, txid, checksum (FNV-1a 64 of the preceding 56 bytes)`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use thiserror::Error;

/// Magic number in both meta pages.
pub const MAGIC: u32 = 0xED0C_DAED;
/// The only file format version bbolt writes.
pub const VERSION: u32 = 2;
/// Length of a page header.
pub const PAGE_HEADER_LEN: usize = 16;
/// Length of a leaf or branch element header.
pub const ELEMENT_LEN: usize = 16;
/// Page flag of a branch page.
pub const BRANCH_PAGE: u16 = 0x01;
/// Page flag of a leaf page.
pub const LEAF_PAGE: u16 = 0x02;
/// Page flag of a meta page.
pub const META_PAGE: u16 = 0x04;
/// Leaf element flag of a nested bucket.
pub const BUCKET_LEAF_FLAG: u32 = 0x01;
/// Guards against runaway recursion on a corrupted file.
const MAX_DEPTH: usize = 64;

/// Errors reading a bbolt file.
#[derive(Debug, Error)]
pub enum BoltError {
    /// I/O failure.
    #[error("read bbolt file: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not a valid bbolt database.
    #[error("invalid bbolt file: {0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> BoltError {
    BoltError::Invalid(msg.into())
}

/// FNV-1a 64, the checksum bbolt uses for its meta pages.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where a bucket's tree lives.
#[derive(Clone, Debug)]
enum BucketRoot {
    Page(u64),
    Inline(Vec<u8>),
}

/// An open bbolt file.
pub struct BoltReader {
    file: File,
    page_size: u64,
    root: u64,
    high_water: u64,
}

/// A decoded page (possibly with overflow pages).
struct Page {
    flags: u16,
    count: usize,
    data: Vec<u8>,
}

impl Page {
    fn leaf_element(&self, i: usize) -> Result<(u32, &[u8], &[u8]), BoltError> {
        let at = PAGE_HEADER_LEN + i * ELEMENT_LEN;
        let e = self
            .data
            .get(at..at + ELEMENT_LEN)
            .ok_or_else(|| invalid("element outside page"))?;
        let u32_at = |o: usize| u32::from_le_bytes(e[o..o + 4].try_into().expect("4 bytes"));
        let (flags, pos, ksize, vsize) = (
            u32_at(0),
            u32_at(4) as usize,
            u32_at(8) as usize,
            u32_at(12) as usize,
        );
        let k0 = at + pos;
        let key = self
            .data
            .get(k0..k0 + ksize)
            .ok_or_else(|| invalid("key outside page"))?;
        let value = self
            .data
            .get(k0 + ksize..k0 + ksize + vsize)
            .ok_or_else(|| invalid("value outside page"))?;
        Ok((flags, key, value))
    }

    fn branch_child(&self, i: usize) -> Result<u64, BoltError> {
        let at = PAGE_HEADER_LEN + i * ELEMENT_LEN;
        let e = self
            .data
            .get(at..at + ELEMENT_LEN)
            .ok_or_else(|| invalid("element outside page"))?;
        Ok(u64::from_le_bytes(e[8..16].try_into().expect("8 bytes")))
    }
}

impl BoltReader {
    /// Opens a bbolt file and selects its newest valid meta page.
    ///
    /// # Errors
    /// [`BoltError::Invalid`] if neither meta page is valid.
    pub fn open(path: &Path) -> Result<Self, BoltError> {
        let file = File::open(path)?;
        let mut best: Option<(u64, u64, u64, u64)> = None;
        // Meta page 1 sits one page in; try the common page sizes for it.
        let mut first = vec![0u8; 4096];
        let len = file.metadata()?.len();
        if len < 4096 {
            return Err(invalid("file shorter than one page"));
        }
        file.read_exact_at(&mut first, 0)?;
        let page_size = u64::from(u32::from_le_bytes(
            first[24..28].try_into().expect("4 bytes"),
        ));
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(invalid(format!("implausible page size {page_size}")));
        }
        for n in 0..2u64 {
            let mut m = vec![0u8; PAGE_HEADER_LEN + 64];
            if file.read_exact_at(&mut m, n * page_size).is_err() {
                continue;
            }
            let meta = &m[PAGE_HEADER_LEN..];
            let le32 = |o: usize| u32::from_le_bytes(meta[o..o + 4].try_into().expect("4 bytes"));
            let le64 = |o: usize| u64::from_le_bytes(meta[o..o + 8].try_into().expect("8 bytes"));
            if le32(0) != MAGIC || le32(4) != VERSION || fnv1a64(&meta[..56]) != le64(56) {
                continue;
            }
            let (root, high_water, txid) = (le64(16), le64(40), le64(48));
            if best.is_none_or(|b| txid > b.3) {
                best = Some((u64::from(le32(8)), root, high_water, txid));
            }
        }
        let (page_size, root, high_water, _txid) =
            best.ok_or_else(|| invalid("no valid meta page"))?;
        if high_water
            .checked_mul(page_size)
            .is_none_or(|bytes| bytes > len)
        {
            return Err(invalid(format!(
                "file is truncated: {len} bytes, meta claims {high_water} pages"
            )));
        }
        Ok(Self {
            file,
            page_size,
            root,
            high_water,
        })
    }

    fn read_page(&self, pgid: u64) -> Result<Page, BoltError> {
        if pgid < 2 || pgid >= self.high_water {
            return Err(invalid(format!("page {pgid} out of range")));
        }
        let mut head = vec![0u8; PAGE_HEADER_LEN];
        self.file.read_exact_at(&mut head, pgid * self.page_size)?;
        let overflow = u64::from(u32::from_le_bytes(
            head[12..16].try_into().expect("4 bytes"),
        ));
        if pgid + overflow >= self.high_water {
            return Err(invalid(format!("page {pgid} overflows the file")));
        }
        let mut data = vec![0u8; ((overflow + 1) * self.page_size) as usize];
        self.file.read_exact_at(&mut data, pgid * self.page_size)?;
        Ok(Page {
            flags: u16::from_le_bytes([data[8], data[9]]),
            count: usize::from(u16::from_le_bytes([data[10], data[11]])),
            data,
        })
    }

    fn inline_page(bytes: &[u8]) -> Result<Page, BoltError> {
        if bytes.len() < PAGE_HEADER_LEN {
            return Err(invalid("inline bucket too short"));
        }
        Ok(Page {
            flags: u16::from_le_bytes([bytes[8], bytes[9]]),
            count: usize::from(u16::from_le_bytes([bytes[10], bytes[11]])),
            data: bytes.to_vec(),
        })
    }

    fn bucket_root(value: &[u8]) -> Result<BucketRoot, BoltError> {
        if value.len() < 16 {
            return Err(invalid("bucket header too short"));
        }
        let root = u64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
        Ok(if root == 0 {
            BucketRoot::Inline(value[16..].to_vec())
        } else {
            BucketRoot::Page(root)
        })
    }

    /// Visits every `(key, value)` of the tree rooted at `root`, in key order.
    /// Nested buckets are reported with `is_bucket = true`.
    fn walk(
        &self,
        root: &BucketRoot,
        f: &mut dyn FnMut(&[u8], &[u8], bool) -> Result<(), BoltError>,
    ) -> Result<(), BoltError> {
        match root {
            BucketRoot::Inline(bytes) => self.walk_page(&Self::inline_page(bytes)?, 0, None, f),
            BucketRoot::Page(pgid) => self.walk_page(&self.read_page(*pgid)?, 0, None, f),
        }
    }

    /// The last `(key, value)` of a tree.
    fn last_entry(&self, root: &BucketRoot) -> Result<Option<(Vec<u8>, Vec<u8>)>, BoltError> {
        let mut page = match root {
            BucketRoot::Inline(bytes) => Self::inline_page(bytes)?,
            BucketRoot::Page(pgid) => self.read_page(*pgid)?,
        };
        for _ in 0..MAX_DEPTH {
            if page.count == 0 {
                return Ok(None);
            }
            match page.flags {
                LEAF_PAGE => {
                    let (_, k, v) = page.leaf_element(page.count - 1)?;
                    return Ok(Some((k.to_vec(), v.to_vec())));
                }
                BRANCH_PAGE => page = self.read_page(page.branch_child(page.count - 1)?)?,
                other => return Err(invalid(format!("unexpected page flags {other:#x}"))),
            }
        }
        Err(invalid("tree too deep"))
    }

    fn find_bucket(&self, name: &[u8]) -> Result<Option<BucketRoot>, BoltError> {
        let mut found = None;
        self.walk(&BucketRoot::Page(self.root), &mut |k, v, is_bucket| {
            if is_bucket && k == name {
                found = Some(Self::bucket_root(v)?);
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// Top-level buckets with their sequence numbers, in name order.
    ///
    /// # Errors
    /// I/O or structural errors, or a bucket that is not top-level only
    /// (etcd never nests buckets).
    pub fn buckets(&self) -> Result<Vec<(Vec<u8>, u64)>, BoltError> {
        let mut out = Vec::new();
        self.walk(&BucketRoot::Page(self.root), &mut |k, v, is_bucket| {
            if !is_bucket {
                return Err(invalid("a plain value in the root bucket"));
            }
            if v.len() < 16 {
                return Err(invalid("bucket header too short"));
            }
            out.push((
                k.to_vec(),
                u64::from_le_bytes(v[8..16].try_into().expect("8 bytes")),
            ));
            Ok(())
        })?;
        Ok(out)
    }

    /// bbolt's consistency check: every page below the high-water mark is
    /// reachable exactly once (the freelist is not persisted), and keys are
    /// strictly increasing in every bucket. Returns the number of entries per
    /// top-level bucket.
    ///
    /// # Errors
    /// [`BoltError::Invalid`] describing the first problem.
    pub fn check(&self) -> Result<Vec<(Vec<u8>, u64)>, BoltError> {
        let mut seen = vec![false; self.high_water as usize];
        seen[0] = true;
        seen[1] = true;
        let mut counts = Vec::new();
        let root = self.read_page(self.root)?;
        self.mark(self.root, &root, &mut seen)?;
        let mut buckets = Vec::new();
        self.walk_page(&root, 0, Some(&mut seen), &mut |k, v, is_bucket| {
            if !is_bucket {
                return Err(invalid("a plain value in the root bucket"));
            }
            buckets.push((k.to_vec(), Self::bucket_root(v)?));
            Ok(())
        })?;
        for (name, root) in buckets {
            let mut count = 0u64;
            let mut last: Option<Vec<u8>> = None;
            let mut visit = |k: &[u8], _: &[u8], is_bucket: bool| {
                if is_bucket {
                    return Err(invalid("nested bucket"));
                }
                if last.as_deref().is_some_and(|l| l >= k) {
                    return Err(invalid(format!(
                        "keys out of order in bucket {:?}",
                        String::from_utf8_lossy(&name)
                    )));
                }
                last = Some(k.to_vec());
                count += 1;
                Ok(())
            };
            match &root {
                BucketRoot::Inline(bytes) => {
                    self.walk_page(&Self::inline_page(bytes)?, 0, Some(&mut seen), &mut visit)?;
                }
                BucketRoot::Page(pgid) => {
                    let page = self.read_page(*pgid)?;
                    self.mark(*pgid, &page, &mut seen)?;
                    self.walk_page(&page, 0, Some(&mut seen), &mut visit)?;
                }
            }
            counts.push((name.clone(), count));
        }
        if let Some(p) = seen.iter().position(|s| !s) {
            return Err(invalid(format!("page {p} is unreachable")));
        }
        Ok(counts)
    }

    fn mark(&self, pgid: u64, page: &Page, seen: &mut [bool]) -> Result<(), BoltError> {
        let pages = page.data.len() as u64 / self.page_size;
        for p in pgid..pgid + pages {
            let slot = seen
                .get_mut(p as usize)
                .ok_or_else(|| invalid(format!("page {p} beyond the high-water mark")))?;
            if *slot {
                return Err(invalid(format!("page {p} is referenced twice")));
            }
            *slot = true;
        }
        Ok(())
    }

    /// Visits a page's entries in order, recursing into branches. With
    /// `seen`, every child page is also marked (and a second visit is an error).
    fn walk_page(
        &self,
        page: &Page,
        depth: usize,
        mut seen: Option<&mut [bool]>,
        f: &mut dyn FnMut(&[u8], &[u8], bool) -> Result<(), BoltError>,
    ) -> Result<(), BoltError> {
        if depth > MAX_DEPTH {
            return Err(invalid("tree too deep"));
        }
        match page.flags {
            LEAF_PAGE => {
                for i in 0..page.count {
                    let (flags, k, v) = page.leaf_element(i)?;
                    f(k, v, flags & BUCKET_LEAF_FLAG != 0)?;
                }
                Ok(())
            }
            BRANCH_PAGE => {
                if page.count == 0 {
                    return Err(invalid("empty branch page"));
                }
                for i in 0..page.count {
                    let child = page.branch_child(i)?;
                    let child_page = self.read_page(child)?;
                    if let Some(seen) = seen.as_deref_mut() {
                        self.mark(child, &child_page, seen)?;
                    }
                    self.walk_page(&child_page, depth + 1, seen.as_deref_mut(), f)?;
                }
                Ok(())
            }
            other => Err(invalid(format!("unexpected page flags {other:#x}"))),
        }
    }

    /// Visits every entry of a top-level bucket in key order; a missing bucket
    /// visits nothing.
    ///
    /// # Errors
    /// I/O or structural errors, or whatever `f` returns.
    pub fn for_each(
        &self,
        bucket: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> Result<(), BoltError>,
    ) -> Result<(), BoltError> {
        if let Some(root) = self.find_bucket(bucket)? {
            self.walk(&root, &mut |k, v, _| f(k, v))?;
        }
        Ok(())
    }

    /// The last key/value of a top-level bucket.
    ///
    /// # Errors
    /// I/O or structural errors.
    pub fn last_in_bucket(&self, bucket: &[u8]) -> Result<Option<(Vec<u8>, Vec<u8>)>, BoltError> {
        match self.find_bucket(bucket)? {
            Some(root) => self.last_entry(&root),
            None => Ok(None),
        }
    }

    /// A value of a top-level bucket.
    ///
    /// # Errors
    /// I/O or structural errors.
    pub fn get(&self, bucket: &[u8], key: &[u8]) -> Result<Option<Vec<u8>>, BoltError> {
        let mut found = None;
        self.for_each(bucket, &mut |k, v| {
            if k == key {
                found = Some(v.to_vec());
            }
            Ok(())
        })?;
        Ok(found)
    }
}

/// The revision an etcd backend file is at: the main revision of the last key
/// in the `key` bucket (1 when it is empty), raised to the compaction
/// revisions recorded in `meta` (a compaction can remove the newest
/// revision's keys when they were deletions; the marks still carry it).
///
/// # Errors
/// Structural errors, or a file without a `key` bucket.
pub fn etcd_revision(reader: &BoltReader) -> Result<i64, BoltError> {
    if reader.find_bucket(b"key")?.is_none() {
        return Err(invalid("no `key` bucket: not an etcd backend"));
    }
    // A new cluster's `key` bucket is empty and its revision is 1.
    let mut rev = 1i64;
    if let Some((k, _)) = reader.last_in_bucket(b"key")? {
        rev = revision_main(&k)?;
    }
    for mark in [&b"finishedCompactRev"[..], b"scheduledCompactRev"] {
        if let Some(v) = reader.get(b"meta", mark)? {
            rev = rev.max(revision_main(&v)?);
        }
    }
    Ok(rev)
}

/// The main revision of an etcd revision key (`main BE u64, '_', sub BE u64`).
///
/// # Errors
/// [`BoltError::Invalid`] if the key is shorter than 8 bytes.
pub fn revision_main(key: &[u8]) -> Result<i64, BoltError> {
    let head = key
        .get(..8)
        .ok_or_else(|| invalid("revision key shorter than 8 bytes"))?;
    Ok(i64::from_be_bytes(head.try_into().expect("8 bytes")))
}
