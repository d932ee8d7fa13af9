//! A read-only bbolt reader: enough to read an etcd snapshot's revision and
//! walk its buckets without loading the file into memory.
//!
//! Layout (native endian = little endian on every platform etcd ships for):
//! page `n` lives at `n * page_size`; a page starts with a 16-byte header
//! `id u64, flags u16, count u16, overflow u32`. Meta pages 0 and 1 hold
//! `magic, version, page_size, flags, root bucket {pgid, seq}, freelist,
//! high-water pgid, txid, checksum (FNV-1a 64 of the preceding 56 bytes)`.
//!
//! The file is untrusted: every offset, length, count and page id read from
//! it is checked before use, so a damaged file is an error, never a panic,
//! an out-of-bounds read, an allocation beyond the file's size or an endless
//! walk. Both meta pages must be valid: bbolt itself falls back to the other
//! meta page after a torn write, but etcd's snapshot stream (`Tx.WriteTo`)
//! and our writer always write both, so one invalid meta page means the file
//! is damaged. Every tree walk refuses a page reached twice (a cycle or a
//! shared page) and trees deeper than 64 levels.

use std::collections::HashSet;
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
/// Page flag of a freelist page.
pub const FREELIST_PAGE: u16 = 0x10;
/// Leaf element flag of a nested bucket.
pub const BUCKET_LEAF_FLAG: u32 = 0x01;
/// Smallest page size accepted.
pub const MIN_PAGE_SIZE: u64 = 512;
/// Largest page size accepted.
pub const MAX_PAGE_SIZE: u64 = 65536;
/// Freelist page id of a file whose freelist is not persisted.
pub const NO_FREELIST: u64 = u64::MAX;
/// Largest page run (a page with its overflow pages) read into memory:
/// 256 MiB. etcd's largest entries are a key and a value each well under
/// 64 MiB (see the segment limits); only a damaged file asks for more.
pub const MAX_PAGE_RUN_BYTES: u64 = 256 << 20;
/// Guards against runaway recursion on a corrupted file.
const MAX_DEPTH: usize = 64;
/// Length of the meta fields after the page header.
/// Bytes of the meta record after a meta page's header.
pub const META_LEN: usize = 64;

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

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Where a bucket's tree lives.
#[derive(Clone, Debug)]
enum BucketRoot {
    Page(u64),
    Inline(Vec<u8>),
}

/// The bytes of the database: a file read on demand, or bytes in memory.
enum Source {
    File(File),
    Bytes(Vec<u8>),
}

impl Source {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BoltError> {
        match self {
            Self::File(f) => Ok(f.read_exact_at(buf, offset)?),
            Self::Bytes(b) => {
                let slice = usize::try_from(offset)
                    .ok()
                    .and_then(|start| b.get(start..start.checked_add(buf.len())?))
                    .ok_or_else(|| BoltError::Io(std::io::ErrorKind::UnexpectedEof.into()))?;
                buf.copy_from_slice(slice);
                Ok(())
            }
        }
    }
}

/// The decoded fields of a valid meta page.
#[derive(Clone, Copy, Debug)]
struct Meta {
    page_size: u64,
    root: u64,
    freelist: u64,
    high_water: u64,
    txid: u64,
}

/// Decodes and validates meta page `n` (its full page header and fields)
/// of a file of `len` bytes.
fn decode_meta(n: u64, page: &[u8], len: u64) -> Result<Meta, BoltError> {
    let bad = |what: String| invalid(format!("meta page {n}: {what}"));
    let (id, flags) = (le64(page, 0), le16(page, 8));
    if id != n || flags != META_PAGE {
        return Err(bad(format!(
            "page header says page {id} with flags {flags:#x}"
        )));
    }
    let m = &page[PAGE_HEADER_LEN..PAGE_HEADER_LEN + META_LEN];
    if le32(m, 0) != MAGIC {
        return Err(bad(format!("bad magic {:#x}", le32(m, 0))));
    }
    if le32(m, 4) != VERSION {
        return Err(bad(format!("unsupported version {}", le32(m, 4))));
    }
    if fnv1a64(&m[..56]) != le64(m, 56) {
        return Err(bad("checksum mismatch".into()));
    }
    let meta = Meta {
        page_size: u64::from(le32(m, 8)),
        root: le64(m, 16),
        freelist: le64(m, 32),
        high_water: le64(m, 40),
        txid: le64(m, 48),
    };
    if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&meta.page_size)
        || !meta.page_size.is_power_of_two()
    {
        return Err(bad(format!(
            "page size {} is not a power of two in {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}",
            meta.page_size
        )));
    }
    if meta
        .high_water
        .checked_mul(meta.page_size)
        .is_none_or(|bytes| bytes > len)
    {
        return Err(bad(format!(
            "claims {} pages of {} bytes, the file has {len} bytes (truncated?)",
            meta.high_water, meta.page_size
        )));
    }
    if meta.root < 2 || meta.root >= meta.high_water {
        return Err(bad(format!(
            "root page {} is outside pages 2..{}",
            meta.root, meta.high_water
        )));
    }
    if meta.freelist != NO_FREELIST && (meta.freelist < 2 || meta.freelist >= meta.high_water) {
        return Err(bad(format!(
            "freelist page {} is outside pages 2..{}",
            meta.freelist, meta.high_water
        )));
    }
    Ok(meta)
}

/// Pages already reached by a walk: reaching one twice is an error (a cycle
/// or a page shared by two parents), which also bounds every walk by the
/// number of pages in the file.
enum Marks {
    /// Pages reached by one walk.
    Set(HashSet<u64>),
    /// Every page of the file (for the consistency check).
    All(Vec<bool>),
}

impl Marks {
    /// Marks pages `first..first + count`.
    fn mark(&mut self, first: u64, count: u64) -> Result<(), BoltError> {
        for p in first..first + count {
            let fresh = match self {
                Self::Set(set) => set.insert(p),
                Self::All(all) => {
                    let slot = usize::try_from(p)
                        .ok()
                        .and_then(|i| all.get_mut(i))
                        .ok_or_else(|| invalid(format!("page {p} beyond the high-water mark")))?;
                    !std::mem::replace(slot, true)
                }
            };
            if !fresh {
                return Err(invalid(format!("page {p} is referenced twice")));
            }
        }
        Ok(())
    }
}

/// The header of the page image `page` (at least [`PAGE_HEADER_LEN`]
/// bytes): its id, flags and element count.
///
/// # Panics
/// If `page` is shorter than a page header.
pub fn page_header(page: &[u8]) -> (u64, u16, u16) {
    (le64(page, 0), le16(page, 8), le16(page, 10))
}

/// An open bbolt file.
pub struct BoltReader {
    source: Source,
    page_size: u64,
    root: u64,
    freelist: u64,
    high_water: u64,
    txid: u64,
}

/// The right edge of a bucket's tree: what a writer appending keys after
/// the bucket's last one rewrites, while every page left of it stays as it
/// is (bbolt pages are copy-on-write).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RightEdge {
    /// One list per branch level, the root's first: the children left of
    /// the edge, as `(first key, page)`.
    pub branches: Vec<Vec<(Vec<u8>, u64)>>,
    /// The entries of the rightmost leaf.
    pub leaf: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A set of page ids below a file's high-water mark (one bit per page).
#[derive(Clone, Debug)]
pub struct PageSet {
    bits: Vec<u64>,
    len: u64,
}

impl PageSet {
    fn new(pages: u64) -> Result<Self, BoltError> {
        let words = usize::try_from(pages.div_ceil(64))
            .map_err(|_| invalid("high-water mark too large"))?;
        Ok(Self {
            bits: vec![0; words],
            len: 0,
        })
    }

    /// Adds a page; false if it was already there.
    fn insert(&mut self, pgid: u64) -> bool {
        let (word, bit) = ((pgid / 64) as usize, pgid % 64);
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        self.len += u64::from(fresh);
        fresh
    }

    /// Whether `pgid` is in the set.
    pub fn contains(&self, pgid: u64) -> bool {
        usize::try_from(pgid / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
            .is_some_and(|w| w & (1 << (pgid % 64)) != 0)
    }

    /// Number of pages in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A decoded page (possibly with overflow pages).
struct Page {
    flags: u16,
    count: usize,
    /// Number of pages it spans (1 + overflow); 0 for an inline page.
    pages: u64,
    data: Vec<u8>,
}

impl Page {
    /// Checks the flags and that `count` elements fit in the page.
    fn new(flags: u16, count: usize, pages: u64, data: Vec<u8>) -> Result<Self, BoltError> {
        if flags != LEAF_PAGE && flags != BRANCH_PAGE {
            return Err(invalid(format!("unexpected page flags {flags:#x}")));
        }
        if PAGE_HEADER_LEN + count * ELEMENT_LEN > data.len() {
            return Err(invalid(format!(
                "{count} elements do not fit in a page of {} bytes",
                data.len()
            )));
        }
        Ok(Self {
            flags,
            count,
            pages,
            data,
        })
    }

    fn element(&self, i: usize) -> Result<(usize, &[u8]), BoltError> {
        let at = PAGE_HEADER_LEN + i * ELEMENT_LEN;
        let e = self
            .data
            .get(at..at + ELEMENT_LEN)
            .ok_or_else(|| invalid("element outside page"))?;
        Ok((at, e))
    }

    fn leaf_element(&self, i: usize) -> Result<(u32, &[u8], &[u8]), BoltError> {
        let (at, e) = self.element(i)?;
        let (flags, pos, ksize, vsize) = (
            le32(e, 0),
            le32(e, 4) as usize,
            le32(e, 8) as usize,
            le32(e, 12) as usize,
        );
        let k0 = at
            .checked_add(pos)
            .ok_or_else(|| invalid("key outside page"))?;
        let k1 = k0
            .checked_add(ksize)
            .ok_or_else(|| invalid("key outside page"))?;
        let v1 = k1
            .checked_add(vsize)
            .ok_or_else(|| invalid("value outside page"))?;
        let key = self
            .data
            .get(k0..k1)
            .ok_or_else(|| invalid("key outside page"))?;
        let value = self
            .data
            .get(k1..v1)
            .ok_or_else(|| invalid("value outside page"))?;
        Ok((flags, key, value))
    }

    fn branch_key(&self, i: usize) -> Result<&[u8], BoltError> {
        let (at, e) = self.element(i)?;
        let (pos, ksize) = (le32(e, 0) as usize, le32(e, 4) as usize);
        at.checked_add(pos)
            .and_then(|k0| self.data.get(k0..k0.checked_add(ksize)?))
            .ok_or_else(|| invalid("key outside page"))
    }

    fn branch_child(&self, i: usize) -> Result<u64, BoltError> {
        let (_, e) = self.element(i)?;
        Ok(le64(e, 8))
    }
}

impl BoltReader {
    /// Opens a bbolt file, validates both meta pages and selects the newer.
    ///
    /// # Errors
    /// [`BoltError::Invalid`] if either meta page is invalid (magic,
    /// version, checksum, page size, root, freelist or high-water mark out
    /// of the file) or they disagree on the page size.
    pub fn open(path: &Path) -> Result<Self, BoltError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Self::from_source(Source::File(file), len)
    }

    /// Reads a bbolt database held in memory, with the same checks as
    /// [`BoltReader::open`].
    ///
    /// # Errors
    /// As for [`BoltReader::open`].
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, BoltError> {
        let len = bytes.len() as u64;
        Self::from_source(Source::Bytes(bytes), len)
    }

    fn from_source(source: Source, len: u64) -> Result<Self, BoltError> {
        let mut page = [0u8; PAGE_HEADER_LEN + META_LEN];
        if len < MIN_PAGE_SIZE * 2 {
            return Err(invalid(format!(
                "file of {len} bytes is shorter than two pages"
            )));
        }
        source.read_exact_at(&mut page, 0)?;
        let meta0 = decode_meta(0, &page, len)?;
        // Meta page 1 sits one page in: meta page 0 tells where.
        source.read_exact_at(&mut page, meta0.page_size)?;
        let meta1 = decode_meta(1, &page, len)?;
        if meta1.page_size != meta0.page_size {
            return Err(invalid(format!(
                "meta pages disagree on the page size ({} and {})",
                meta0.page_size, meta1.page_size
            )));
        }
        let meta = if meta1.txid > meta0.txid {
            meta1
        } else {
            meta0
        };
        Ok(Self {
            source,
            page_size: meta.page_size,
            root: meta.root,
            freelist: meta.freelist,
            high_water: meta.high_water,
            txid: meta.txid,
        })
    }

    /// Page size of the file.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The high-water mark: pages `0..high_water` make up the database.
    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Transaction id of the meta page in use.
    pub fn txid(&self) -> u64 {
        self.txid
    }

    /// Reads the header of page `pgid` (checking the id, and that the page
    /// and its overflow pages are below the high-water mark); returns its
    /// flags, count and number of pages.
    fn page_header(&self, pgid: u64) -> Result<(u16, usize, u64), BoltError> {
        if pgid < 2 || pgid >= self.high_water {
            return Err(invalid(format!(
                "page {pgid} is outside pages 2..{}",
                self.high_water
            )));
        }
        let mut head = [0u8; PAGE_HEADER_LEN];
        self.source
            .read_exact_at(&mut head, pgid * self.page_size)?;
        if le64(&head, 0) != pgid {
            return Err(invalid(format!(
                "page {pgid} says it is page {}",
                le64(&head, 0)
            )));
        }
        let pages = u64::from(le32(&head, 12)) + 1;
        if pages * self.page_size > MAX_PAGE_RUN_BYTES {
            return Err(invalid(format!(
                "page {pgid} spans {pages} pages, more than {MAX_PAGE_RUN_BYTES} bytes"
            )));
        }
        if pgid + pages > self.high_water {
            return Err(invalid(format!(
                "page {pgid} and its {} overflow pages go beyond the high-water mark {}",
                pages - 1,
                self.high_water
            )));
        }
        Ok((le16(&head, 8), usize::from(le16(&head, 10)), pages))
    }

    /// Reads page `pgid` with its overflow pages. The page lies within the
    /// file (the high-water mark was checked against the file's length) and
    /// spans at most [`MAX_PAGE_RUN_BYTES`], which bounds the buffer.
    fn read_page(&self, pgid: u64) -> Result<Page, BoltError> {
        let (flags, count, pages) = self.page_header(pgid)?;
        let len = usize::try_from(pages * self.page_size)
            .map_err(|_| invalid(format!("page {pgid} is too large")))?;
        let mut data = vec![0u8; len];
        self.source
            .read_exact_at(&mut data, pgid * self.page_size)?;
        Page::new(flags, count, pages, data).map_err(|e| match e {
            BoltError::Invalid(msg) => invalid(format!("page {pgid}: {msg}")),
            e @ BoltError::Io(_) => e,
        })
    }

    fn inline_page(bytes: &[u8]) -> Result<Page, BoltError> {
        if bytes.len() < PAGE_HEADER_LEN {
            return Err(invalid("inline bucket too short"));
        }
        let flags = le16(bytes, 8);
        if flags != LEAF_PAGE {
            return Err(invalid(format!(
                "inline bucket page has flags {flags:#x} (only leaves can be inline)"
            )));
        }
        Page::new(flags, usize::from(le16(bytes, 10)), 0, bytes.to_vec())
            .map_err(|e| invalid(format!("inline bucket: {e}")))
    }

    fn bucket_root(value: &[u8]) -> Result<BucketRoot, BoltError> {
        if value.len() < 16 {
            return Err(invalid("bucket header too short"));
        }
        let root = le64(value, 0);
        Ok(if root == 0 {
            BucketRoot::Inline(value[16..].to_vec())
        } else {
            BucketRoot::Page(root)
        })
    }

    /// Reads the root page of a tree and marks it.
    fn root_page(&self, root: &BucketRoot, marks: &mut Marks) -> Result<Page, BoltError> {
        match root {
            BucketRoot::Inline(bytes) => Self::inline_page(bytes),
            BucketRoot::Page(pgid) => {
                let page = self.read_page(*pgid)?;
                marks.mark(*pgid, page.pages)?;
                Ok(page)
            }
        }
    }

    /// Visits every `(key, value)` of the tree rooted at `root`, in key order.
    /// Nested buckets are reported with `is_bucket = true`.
    fn walk(
        &self,
        root: &BucketRoot,
        f: &mut dyn FnMut(&[u8], &[u8], bool) -> Result<(), BoltError>,
    ) -> Result<(), BoltError> {
        let mut marks = Marks::Set(HashSet::new());
        let page = self.root_page(root, &mut marks)?;
        self.walk_page(&page, 0, &mut marks, f)
    }

    /// The last `(key, value)` of a tree.
    fn last_entry(&self, root: &BucketRoot) -> Result<Option<(Vec<u8>, Vec<u8>)>, BoltError> {
        let mut marks = Marks::Set(HashSet::new());
        let mut page = self.root_page(root, &mut marks)?;
        for _ in 0..MAX_DEPTH {
            if page.flags == LEAF_PAGE {
                if page.count == 0 {
                    return Ok(None);
                }
                let (_, k, v) = page.leaf_element(page.count - 1)?;
                return Ok(Some((k.to_vec(), v.to_vec())));
            }
            if page.count == 0 {
                return Err(invalid("empty branch page"));
            }
            let child = page.branch_child(page.count - 1)?;
            page = self.read_page(child)?;
            marks.mark(child, page.pages)?;
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

    /// The right edge of top-level bucket `bucket`'s tree (`None` if there
    /// is no such bucket): the rightmost leaf's entries, and at each branch
    /// level the children left of the rightmost path.
    ///
    /// # Errors
    /// I/O or structural errors; a nested bucket.
    pub fn right_edge(&self, bucket: &[u8]) -> Result<Option<RightEdge>, BoltError> {
        let Some(root) = self.find_bucket(bucket)? else {
            return Ok(None);
        };
        let mut marks = Marks::Set(HashSet::new());
        let mut page = self.root_page(&root, &mut marks)?;
        let mut edge = RightEdge::default();
        for _ in 0..MAX_DEPTH {
            if page.flags == LEAF_PAGE {
                for i in 0..page.count {
                    let (flags, k, v) = page.leaf_element(i)?;
                    if flags & BUCKET_LEAF_FLAG != 0 {
                        return Err(invalid("nested bucket"));
                    }
                    edge.leaf.push((k.to_vec(), v.to_vec()));
                }
                return Ok(Some(edge));
            }
            if page.count == 0 {
                return Err(invalid("empty branch page"));
            }
            let mut left = Vec::with_capacity(page.count - 1);
            for i in 0..page.count - 1 {
                left.push((page.branch_key(i)?.to_vec(), page.branch_child(i)?));
            }
            edge.branches.push(left);
            let child = page.branch_child(page.count - 1)?;
            page = self.read_page(child)?;
            marks.mark(child, page.pages)?;
        }
        Err(invalid("tree too deep"))
    }

    /// The leaf pages of top-level bucket `bucket` (empty for a missing or
    /// inline bucket). Reads only branch pages: bbolt trees are balanced,
    /// so the children of the lowest branch level are the leaves, which a
    /// caller reading the whole file can then check in passing.
    ///
    /// # Errors
    /// I/O or structural errors (a page reached twice, a branch where a
    /// leaf must be).
    pub fn leaf_pages(&self, bucket: &[u8]) -> Result<PageSet, BoltError> {
        let mut leaves = PageSet::new(self.high_water)?;
        let Some(BucketRoot::Page(root)) = self.find_bucket(bucket)? else {
            return Ok(leaves);
        };
        // The height, along the leftmost path.
        let mut height = 1;
        let mut page = self.read_page(root)?;
        while page.flags == BRANCH_PAGE {
            if height > MAX_DEPTH {
                return Err(invalid("tree too deep"));
            }
            if page.count == 0 {
                return Err(invalid("empty branch page"));
            }
            page = self.read_page(page.branch_child(0)?)?;
            height += 1;
        }
        let mut branches = PageSet::new(self.high_water)?;
        let mut level = vec![root];
        for depth in 1..height {
            let mut next = Vec::new();
            for pgid in level {
                if pgid < 2 || pgid >= self.high_water || !branches.insert(pgid) {
                    return Err(invalid(format!(
                        "branch page {pgid} is out of range or referenced twice"
                    )));
                }
                let page = self.read_page(pgid)?;
                if page.flags != BRANCH_PAGE || page.count == 0 {
                    return Err(invalid(format!(
                        "page {pgid}: expected a branch page at depth {depth}"
                    )));
                }
                for i in 0..page.count {
                    let child = page.branch_child(i)?;
                    if depth + 1 == height {
                        if child < 2 || child >= self.high_water || !leaves.insert(child) {
                            return Err(invalid(format!(
                                "leaf page {child} is out of range or referenced twice"
                            )));
                        }
                    } else {
                        next.push(child);
                    }
                }
            }
            level = next;
        }
        if height == 1 {
            leaves.insert(root);
        }
        Ok(leaves)
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
            out.push((k.to_vec(), le64(v, 8)));
            Ok(())
        })?;
        Ok(out)
    }

    /// bbolt's consistency check: no page is reachable twice, keys are
    /// strictly increasing in every bucket, and every page below the
    /// high-water mark is reachable or free. Free pages are those the
    /// persisted freelist lists; without one (etcd runs bbolt so) bbolt
    /// rebuilds the freelist from the pages nothing reaches, so they are
    /// free by definition. Returns the number of entries per top-level
    /// bucket.
    ///
    /// # Errors
    /// [`BoltError::Invalid`] describing the first problem.
    pub fn check(&self) -> Result<Vec<(Vec<u8>, u64)>, BoltError> {
        let pages =
            usize::try_from(self.high_water).map_err(|_| invalid("high-water mark too large"))?;
        let mut marks = Marks::All(vec![false; pages]);
        marks.mark(0, 2)?;
        self.mark_freelist(&mut marks)?;
        let mut counts = Vec::new();
        let root = self.root_page(&BucketRoot::Page(self.root), &mut marks)?;
        let mut buckets = Vec::new();
        self.walk_page(&root, 0, &mut marks, &mut |k, v, is_bucket| {
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
            let page = self.root_page(&root, &mut marks)?;
            self.walk_page(&page, 0, &mut marks, &mut visit)?;
            counts.push((name.clone(), count));
        }
        if let Marks::All(all) = &marks {
            if let Some(p) = all.iter().position(|s| !s) {
                if self.freelist != NO_FREELIST {
                    return Err(invalid(format!(
                        "page {p} is neither reachable nor in the freelist"
                    )));
                }
            }
        }
        Ok(counts)
    }

    /// Marks the persisted freelist page (if any) and the free pages it
    /// lists.
    fn mark_freelist(&self, marks: &mut Marks) -> Result<(), BoltError> {
        if self.freelist == NO_FREELIST {
            return Ok(());
        }
        let pgid = self.freelist;
        let (flags, count, pages) = self.page_header(pgid)?;
        if flags != FREELIST_PAGE {
            return Err(invalid(format!(
                "freelist page {pgid} has flags {flags:#x}"
            )));
        }
        marks.mark(pgid, pages)?;
        let len =
            usize::try_from(pages * self.page_size).map_err(|_| invalid("freelist too large"))?;
        let mut data = vec![0u8; len];
        self.source
            .read_exact_at(&mut data, pgid * self.page_size)?;
        // A count of 0xFFFF means the real count is the first element.
        let (count, first) = if count == 0xFFFF {
            let n = data
                .get(PAGE_HEADER_LEN..PAGE_HEADER_LEN + 8)
                .map(|b| le64(b, 0))
                .ok_or_else(|| invalid("freelist page too short"))?;
            (n, PAGE_HEADER_LEN + 8)
        } else {
            (count as u64, PAGE_HEADER_LEN)
        };
        let ids = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(8))
            .and_then(|n| data.get(first..first.checked_add(n)?))
            .ok_or_else(|| invalid(format!("freelist of {count} ids does not fit its page")))?;
        for id in ids.chunks_exact(8).map(|b| le64(b, 0)) {
            if id < 2 || id >= self.high_water {
                return Err(invalid(format!("free page {id} out of range")));
            }
            marks.mark(id, 1)?;
        }
        Ok(())
    }

    /// Visits a page's entries in order, recursing into branches; every
    /// child page is marked (a second visit is an error).
    fn walk_page(
        &self,
        page: &Page,
        depth: usize,
        marks: &mut Marks,
        f: &mut dyn FnMut(&[u8], &[u8], bool) -> Result<(), BoltError>,
    ) -> Result<(), BoltError> {
        if depth > MAX_DEPTH {
            return Err(invalid("tree too deep"));
        }
        if page.flags == LEAF_PAGE {
            for i in 0..page.count {
                let (flags, k, v) = page.leaf_element(i)?;
                f(k, v, flags & BUCKET_LEAF_FLAG != 0)?;
            }
            return Ok(());
        }
        if page.count == 0 {
            return Err(invalid("empty branch page"));
        }
        for i in 0..page.count {
            let child = page.branch_child(i)?;
            let child_page = self.read_page(child)?;
            marks.mark(child, child_page.pages)?;
            self.walk_page(&child_page, depth + 1, marks, f)?;
        }
        Ok(())
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
/// [`BoltError::Invalid`] if the key is shorter than 8 bytes or the revision
/// is negative.
pub fn revision_main(key: &[u8]) -> Result<i64, BoltError> {
    let head = key
        .get(..8)
        .ok_or_else(|| invalid("revision key shorter than 8 bytes"))?;
    let rev = i64::from_be_bytes(head.try_into().expect("8 bytes"));
    if rev < 0 {
        return Err(invalid(format!("negative revision {rev}")));
    }
    Ok(rev)
}

/// The first bytes of meta page `pgid` (page header and meta, checksum
/// included) as etcd writes them: root bucket at `root`, no freelist
/// (bbolt rebuilds it), `high_water` pages, transaction `txid`. The rest of
/// the page is zero.
pub fn encode_meta_page(
    pgid: u64,
    page_size: u32,
    root: u64,
    high_water: u64,
    txid: u64,
) -> [u8; PAGE_HEADER_LEN + META_LEN] {
    let mut p = [0u8; PAGE_HEADER_LEN + META_LEN];
    p[..8].copy_from_slice(&pgid.to_le_bytes());
    p[8..10].copy_from_slice(&META_PAGE.to_le_bytes());
    let m = &mut p[PAGE_HEADER_LEN..];
    m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    m[4..8].copy_from_slice(&VERSION.to_le_bytes());
    m[8..12].copy_from_slice(&page_size.to_le_bytes());
    m[16..24].copy_from_slice(&root.to_le_bytes());
    m[32..40].copy_from_slice(&NO_FREELIST.to_le_bytes());
    m[40..48].copy_from_slice(&high_water.to_le_bytes());
    m[48..56].copy_from_slice(&txid.to_le_bytes());
    let sum = fnv1a64(&m[..56]);
    m[56..64].copy_from_slice(&sum.to_le_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real etcd 3.5.1 snapshot (`etcdctl snapshot save`) at revision 31.
    const ETCD_SNAPSHOT: &[u8] = include_bytes!("../testdata/etcd-3.5.1-rev31.db");
    const PS: usize = 4096;

    fn meta_page(n: u64, page_size: u32, root: u64, high_water: u64, txid: u64) -> Vec<u8> {
        let mut p = vec![0u8; PS];
        p[..PAGE_HEADER_LEN + META_LEN]
            .copy_from_slice(&encode_meta_page(n, page_size, root, high_water, txid));
        p
    }

    /// Re-computes a meta page's checksum after a test edited it.
    fn reseal_meta(file: &mut [u8], at: usize) {
        let m = &mut file[at + PAGE_HEADER_LEN..at + PAGE_HEADER_LEN + META_LEN];
        let sum = fnv1a64(&m[..56]);
        m[56..64].copy_from_slice(&sum.to_le_bytes());
    }

    /// A page image: header, then `body`, padded to whole pages.
    fn page(pgid: u64, flags: u16, count: u16, overflow: u32, body: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; PS * (overflow as usize + 1)];
        p[..8].copy_from_slice(&pgid.to_le_bytes());
        p[8..10].copy_from_slice(&flags.to_le_bytes());
        p[10..12].copy_from_slice(&count.to_le_bytes());
        p[12..16].copy_from_slice(&overflow.to_le_bytes());
        p[PAGE_HEADER_LEN..PAGE_HEADER_LEN + body.len()].copy_from_slice(body);
        p
    }

    fn leaf_body(entries: &[(u32, &[u8], &[u8])]) -> Vec<u8> {
        let mut elements = Vec::new();
        let mut data = Vec::new();
        for (i, (flags, k, v)) in entries.iter().enumerate() {
            let pos = (entries.len() - i) * ELEMENT_LEN + data.len();
            for n in [*flags, pos as u32, k.len() as u32, v.len() as u32] {
                elements.extend_from_slice(&n.to_le_bytes());
            }
            data.extend_from_slice(k);
            data.extend_from_slice(v);
        }
        elements.extend_from_slice(&data);
        elements
    }

    fn branch_body(children: &[u64]) -> Vec<u8> {
        let mut elements = Vec::new();
        for (i, pgid) in children.iter().enumerate() {
            let pos = (children.len() - i) * ELEMENT_LEN;
            elements.extend_from_slice(&(pos as u32).to_le_bytes());
            elements.extend_from_slice(&1u32.to_le_bytes());
            elements.extend_from_slice(&pgid.to_le_bytes());
        }
        elements.extend(std::iter::repeat_n(b'k', children.len()));
        elements
    }

    fn bucket_value(root: u64) -> Vec<u8> {
        let mut v = root.to_le_bytes().to_vec();
        v.extend_from_slice(&0u64.to_le_bytes());
        v
    }

    fn rev_key(main: u64) -> Vec<u8> {
        let mut k = main.to_be_bytes().to_vec();
        k.push(b'_');
        k.extend_from_slice(&0u64.to_be_bytes());
        k
    }

    /// A small etcd-like file: root (page 2) holds bucket `key` whose tree
    /// starts at page 3; `pages` are pages 3.. .
    fn file_with(pages: &[Vec<u8>]) -> Vec<u8> {
        let high_water = 3 + pages.iter().map(|p| (p.len() / PS) as u64).sum::<u64>();
        let mut f = meta_page(0, PS as u32, 2, high_water, 2);
        f.extend(meta_page(1, PS as u32, 2, high_water, 1));
        let key_bucket = bucket_value(3);
        f.extend(page(
            2,
            LEAF_PAGE,
            1,
            0,
            &leaf_body(&[(BUCKET_LEAF_FLAG, b"key", &key_bucket)]),
        ));
        for p in pages {
            f.extend_from_slice(p);
        }
        f
    }

    fn assert_invalid<T>(result: Result<T, BoltError>, needle: &str) {
        match result {
            Err(BoltError::Invalid(msg)) => {
                assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
            }
            Err(e) => panic!("expected Invalid({needle}), got {e}"),
            Ok(_) => panic!("expected Invalid({needle}), got Ok"),
        }
    }

    #[test]
    fn reads_a_real_etcd_snapshot() {
        let r = BoltReader::from_bytes(ETCD_SNAPSHOT.to_vec()).unwrap();
        assert_eq!(etcd_revision(&r).unwrap(), 31);
        let mut keys = 0;
        r.for_each(b"key", &mut |_, _| {
            keys += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(keys, 30);
        assert_eq!(r.buckets().unwrap().len(), 10);
        // etcd does not persist its freelist: a freed page is unreachable,
        // and free.
        let counts = r.check().unwrap();
        assert!(counts.contains(&(b"key".to_vec(), 30)), "{counts:?}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        std::fs::write(&path, ETCD_SNAPSHOT).unwrap();
        let r = BoltReader::open(&path).unwrap();
        assert_eq!(etcd_revision(&r).unwrap(), 31);
    }

    /// etcd 3.4.23, compacted at its last revision 25 (a delete, whose
    /// tombstone the compaction removed): the revision comes from the
    /// compaction mark.
    #[test]
    fn reads_a_compacted_etcd_3_4_snapshot() {
        let f = include_bytes!("../testdata/etcd-3.4.23-rev25-compacted.db");
        let r = BoltReader::from_bytes(f.to_vec()).unwrap();
        assert_eq!(etcd_revision(&r).unwrap(), 25);
        let (k, _) = r.last_in_bucket(b"key").unwrap().unwrap();
        assert_eq!(revision_main(&k).unwrap(), 24);
    }

    #[test]
    fn reads_a_hand_built_file() {
        let keys: Vec<_> = (1..=5).map(rev_key).collect();
        let entries: Vec<_> = keys.iter().map(|k| (0, k.as_slice(), &b"v"[..])).collect();
        let f = file_with(&[page(3, LEAF_PAGE, 5, 0, &leaf_body(&entries))]);
        let r = BoltReader::from_bytes(f).unwrap();
        assert_eq!(etcd_revision(&r).unwrap(), 5);
        assert_eq!(r.check().unwrap(), vec![(b"key".to_vec(), 5)]);
    }

    /// Issue 6.5 (4): meta page 1 with page size 0 and a valid checksum
    /// used to panic (`index out of bounds`); it is now an error, as is any
    /// other invalid meta page.
    #[test]
    fn both_meta_pages_are_validated() {
        let at1 = PS;
        let cases: Vec<(usize, usize, Vec<u8>, &str)> = vec![
            (
                at1,
                8,
                0u32.to_le_bytes().to_vec(),
                "meta page 1: page size 0",
            ),
            (at1, 8, 3000u32.to_le_bytes().to_vec(), "page size 3000"),
            (
                0,
                8,
                0u32.to_le_bytes().to_vec(),
                "meta page 0: page size 0",
            ),
            (
                at1,
                0,
                0xdead_beefu32.to_le_bytes().to_vec(),
                "meta page 1: bad magic",
            ),
            (
                at1,
                4,
                1u32.to_le_bytes().to_vec(),
                "meta page 1: unsupported version 1",
            ),
            (
                at1,
                16,
                0u64.to_le_bytes().to_vec(),
                "meta page 1: root page 0",
            ),
            (
                at1,
                16,
                99u64.to_le_bytes().to_vec(),
                "meta page 1: root page 99",
            ),
            (
                at1,
                32,
                1u64.to_le_bytes().to_vec(),
                "meta page 1: freelist page 1",
            ),
            (
                0,
                40,
                7u64.to_le_bytes().to_vec(),
                "meta page 0: claims 7 pages",
            ),
            (
                0,
                40,
                u64::MAX.to_le_bytes().to_vec(),
                "meta page 0: claims",
            ),
        ];
        for (page_at, field, value, needle) in cases {
            let mut f = ETCD_SNAPSHOT.to_vec();
            let at = page_at + PAGE_HEADER_LEN + field;
            f[at..at + value.len()].copy_from_slice(&value);
            // Meta page 1 also gets the highest txid: it would be chosen.
            let txid = at1 + PAGE_HEADER_LEN + 48;
            f[txid..txid + 8].copy_from_slice(&1000u64.to_le_bytes());
            reseal_meta(&mut f, 0);
            reseal_meta(&mut f, at1);
            assert_invalid(BoltReader::from_bytes(f), needle);
        }
        // A bad checksum on either meta page is an error, not a fallback.
        for page_at in [0, at1] {
            let mut f = ETCD_SNAPSHOT.to_vec();
            f[page_at + PAGE_HEADER_LEN + 48] ^= 1;
            assert_invalid(BoltReader::from_bytes(f), "checksum mismatch");
        }
        // The page header of a meta page must say what it is.
        let mut f = ETCD_SNAPSHOT.to_vec();
        f[at1] = 5;
        assert_invalid(
            BoltReader::from_bytes(f),
            "meta page 1: page header says page 5",
        );
        // Too short for any meta page.
        assert_invalid(
            BoltReader::from_bytes(vec![0; 100]),
            "shorter than two pages",
        );
    }

    /// Issue 6.5 (4): element positions and sizes, counts, overflow and page
    /// ids driven by file content are all checked.
    #[test]
    fn damaged_pages_are_errors() {
        let key = rev_key(1);
        let leaf = leaf_body(&[(0, key.as_slice(), &b"v"[..])]);
        let mut huge_pos = leaf.clone();
        huge_pos[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut huge_size = leaf.clone();
        huge_size[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut huge_value = leaf.clone();
        huge_value[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (page(3, LEAF_PAGE, 1, 0, &huge_pos), "key outside page"),
            (page(3, LEAF_PAGE, 1, 0, &huge_size), "key outside page"),
            (page(3, LEAF_PAGE, 1, 0, &huge_value), "value outside page"),
            (page(3, LEAF_PAGE, 300, 0, &leaf), "300 elements do not fit"),
            (
                page(3, LEAF_PAGE, 1, 5, &leaf)[..PS].to_vec(),
                "overflow pages go beyond",
            ),
            (page(3, 0x40, 1, 0, &leaf), "unexpected page flags 0x40"),
            (
                page(3, LEAF_PAGE, 1, 70_000, &leaf)[..PS].to_vec(),
                "spans 70001 pages",
            ),
            (page(7, LEAF_PAGE, 1, 0, &leaf), "page 3 says it is page 7"),
            (page(3, BRANCH_PAGE, 0, 0, &[]), "empty branch page"),
            (
                page(3, BRANCH_PAGE, 1, 0, &branch_body(&[1])),
                "page 1 is outside",
            ),
            (
                page(3, BRANCH_PAGE, 1, 0, &branch_body(&[9])),
                "page 9 is outside",
            ),
        ];
        for (p, needle) in cases {
            let r = BoltReader::from_bytes(file_with(&[p])).unwrap();
            assert_invalid(etcd_revision(&r), needle);
            assert_invalid(r.check(), needle);
        }
    }

    /// A page referenced twice (here: a branch pointing at itself twice)
    /// is an error instead of an endless walk.
    #[test]
    fn cycles_and_shared_pages_are_errors() {
        let self_loop = page(3, BRANCH_PAGE, 2, 0, &branch_body(&[3, 3]));
        let r = BoltReader::from_bytes(file_with(&[self_loop])).unwrap();
        assert_invalid(r.get(b"key", b"x"), "page 3 is referenced twice");
        assert_invalid(r.check(), "page 3 is referenced twice");
        // `last_in_bucket` follows the last child only: bounded by depth.
        assert_invalid(r.last_in_bucket(b"key"), "");

        let key = rev_key(1);
        let leaf = page(
            4,
            LEAF_PAGE,
            1,
            0,
            &leaf_body(&[(0, key.as_slice(), &b"v"[..])]),
        );
        let shared = page(3, BRANCH_PAGE, 2, 0, &branch_body(&[4, 4]));
        let r = BoltReader::from_bytes(file_with(&[shared, leaf])).unwrap();
        assert_invalid(
            r.for_each(b"key", &mut |_, _| Ok(())),
            "page 4 is referenced twice",
        );
    }

    #[test]
    fn unreachable_pages_are_free_only_without_a_persisted_freelist() {
        let key = rev_key(1);
        let leaf = page(
            3,
            LEAF_PAGE,
            1,
            0,
            &leaf_body(&[(0, key.as_slice(), &b"v"[..])]),
        );
        let stray = page(4, LEAF_PAGE, 0, 0, &[]);
        let f = file_with(&[leaf.clone(), stray.clone()]);
        let r = BoltReader::from_bytes(f.clone()).unwrap();
        assert_eq!(etcd_revision(&r).unwrap(), 1);
        assert_eq!(r.check().unwrap(), vec![(b"key".to_vec(), 1)]);

        // With a persisted freelist (page 5, listing nothing), page 4 is
        // neither reachable nor free.
        let mut f = f;
        f.extend(page(5, FREELIST_PAGE, 0, 0, &[]));
        for (at, pgid) in [(0, 0u64), (PS, 1)] {
            let m = at + PAGE_HEADER_LEN;
            f[m + 32..m + 40].copy_from_slice(&5u64.to_le_bytes());
            f[m + 40..m + 48].copy_from_slice(&6u64.to_le_bytes());
            reseal_meta(&mut f, at);
            assert_eq!(le64(&f, at), pgid);
        }
        let r = BoltReader::from_bytes(f).unwrap();
        assert_invalid(r.check(), "page 4 is neither reachable nor in the freelist");

        // An inline bucket must be a leaf.
        let mut inline = bucket_value(0);
        inline.extend(page(0, BRANCH_PAGE, 1, 0, &branch_body(&[3]))[..64].to_vec());
        let mut f = meta_page(0, PS as u32, 2, 3, 2);
        f.extend(meta_page(1, PS as u32, 2, 3, 1));
        f.extend(page(
            2,
            LEAF_PAGE,
            1,
            0,
            &leaf_body(&[(BUCKET_LEAF_FLAG, b"key", &inline)]),
        ));
        let r = BoltReader::from_bytes(f).unwrap();
        assert_invalid(etcd_revision(&r), "only leaves can be inline");
    }

    /// Random damage to a real snapshot: every call ends in `Ok` or an
    /// error, never a panic or an endless walk.
    #[test]
    fn damaged_real_snapshots_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut f = ETCD_SNAPSHOT.to_vec();
            for _ in 0..=(next() % 8) {
                let page = (next() as usize) % (f.len() / PS);
                let offset = (next() as usize) % 128;
                f[page * PS + offset] = next() as u8;
            }
            if next() % 2 == 0 {
                reseal_meta(&mut f, 0);
                reseal_meta(&mut f, PS);
            }
            if let Ok(r) = BoltReader::from_bytes(f) {
                let _ = r.check();
                let _ = r.buckets();
                let _ = etcd_revision(&r);
            }
        }
    }
}
