//! A streaming bbolt writer: trees are written bottom-up from sorted
//! entries, pages are appended in allocation order, and the meta pages are
//! written last. Memory holds one leaf plus one branch page per level of
//! each tree being built, never the data.
//!
//! A tree may continue an existing one ([`TreeBuilder::continue_from`]):
//! the pages left of its right edge stay where they are and only the edge
//! is written anew, which is how a restore appends revisions to a base
//! snapshot's `key` bucket without copying it.
//!
//! Files are written without a persisted freelist (`freelist = u64::MAX`,
//! as etcd runs bbolt with `NoFreelistSync`): pages nothing reaches any
//! more are free, and bbolt rebuilds its freelist from them when it opens
//! the file.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};

use etcdpitr_common::bbolt::{
    self, RightEdge, BRANCH_PAGE, BUCKET_LEAF_FLAG, ELEMENT_LEN, LEAF_PAGE, PAGE_HEADER_LEN,
};

/// Page size of the files the tests write from scratch (the size etcd
/// uses on common platforms); a restore keeps its base snapshot's.
#[cfg(test)]
const PAGE_SIZE: u64 = 4096;
/// bbolt keeps element counts in a u16.
const MAX_ELEMENTS: usize = 0xFFFF - 1;

/// Appends pages to a file.
pub struct PageWriter {
    out: BufWriter<File>,
    page_size: usize,
    next_pgid: u64,
    scratch: Vec<u8>,
    /// blake3 of every page appended, for reading the file back.
    appended: blake3::Hasher,
}

impl PageWriter {
    /// Creates the file and reserves the two meta pages.
    #[cfg(test)]
    fn create(path: &std::path::Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut w = Self::append_to(file, 2, PAGE_SIZE)?;
        w.out.seek(SeekFrom::Start(0))?;
        w.out.write_all(&vec![0u8; 2 * w.page_size])?;
        Ok(w)
    }

    /// Appends pages of `page_size` bytes to `file` from page `first_pgid`
    /// on, overwriting whatever the file holds there.
    ///
    /// # Errors
    /// I/O errors; a page size bbolt does not accept.
    pub fn append_to(file: File, first_pgid: u64, page_size: u64) -> io::Result<Self> {
        if !(bbolt::MIN_PAGE_SIZE..=bbolt::MAX_PAGE_SIZE).contains(&page_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("page size {page_size} is out of range"),
            ));
        }
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.seek(SeekFrom::Start(first_pgid * page_size))?;
        Ok(Self {
            out,
            page_size: page_size as usize,
            next_pgid: first_pgid,
            scratch: Vec::new(),
            appended: blake3::Hasher::new(),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.appended.update(bytes);
        self.out.write_all(bytes)
    }

    /// Writes one page (with overflow pages as needed) of `flags` holding
    /// `elements` elements; `body` is everything after the page header.
    fn write_page(&mut self, flags: u16, count: usize, body: &[u8]) -> io::Result<u64> {
        let len = PAGE_HEADER_LEN + body.len();
        let pages = len.div_ceil(self.page_size).max(1);
        let pgid = self.next_pgid;
        let mut header = [0u8; PAGE_HEADER_LEN];
        header[..8].copy_from_slice(&pgid.to_le_bytes());
        header[8..10].copy_from_slice(&flags.to_le_bytes());
        header[10..12].copy_from_slice(&(count as u16).to_le_bytes());
        header[12..16].copy_from_slice(&((pages - 1) as u32).to_le_bytes());
        self.write_all(&header)?;
        self.write_all(body)?;
        let padding = pages * self.page_size - len;
        self.write_all(&vec![0u8; padding])?;
        self.next_pgid += pages as u64;
        Ok(pgid)
    }

    /// Writes the meta pages (transactions `txid` and `txid - 1`, both
    /// naming `root_pgid`), cuts the file at the high-water mark and
    /// returns it, flushed but not synced, with the blake3 of the pages
    /// appended and the two meta pages as written.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(mut self, root_pgid: u64, txid: u64) -> io::Result<Finished> {
        let high_water = self.next_pgid;
        self.out.flush()?;
        let mut file = self
            .out
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        let mut meta = vec![0u8; 2 * self.page_size];
        for (pgid, txid) in [(0u64, txid), (1, txid - 1)] {
            let at = pgid as usize * self.page_size;
            let page =
                bbolt::encode_meta_page(pgid, self.page_size as u32, root_pgid, high_water, txid);
            meta[at..at + page.len()].copy_from_slice(&page);
        }
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&meta)?;
        file.set_len(high_water * self.page_size as u64)?;
        file.seek(SeekFrom::End(0))?;
        Ok(Finished {
            file,
            meta,
            high_water,
            appended: self.appended.finalize(),
        })
    }
}

/// A file whose pages and meta pages are written.
pub struct Finished {
    /// The file, positioned at its end.
    pub file: File,
    /// The two meta pages as written.
    pub meta: Vec<u8>,
    /// Its high-water mark.
    pub high_water: u64,
    /// blake3 of the pages appended.
    pub appended: blake3::Hash,
}

/// The children of one branch page being filled.
#[derive(Default)]
struct Pending {
    children: Vec<(Vec<u8>, u64)>,
    bytes: usize,
}

/// Builds one B+tree from entries given in strictly increasing key order.
/// Branch pages are written as soon as they fill up.
pub struct TreeBuilder {
    leaf_flags: u32,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    entries_bytes: usize,
    /// `levels[i]`: the children of the branch page being filled at height
    /// `i + 1` (leaves have height 0).
    levels: Vec<Pending>,
    last_key: Option<Vec<u8>>,
    count: u64,
}

impl TreeBuilder {
    /// A builder for a bucket's entries.
    pub fn new() -> Self {
        Self::with_flags(0)
    }

    /// A builder for the root tree, whose entries are buckets.
    pub fn for_buckets() -> Self {
        Self::with_flags(BUCKET_LEAF_FLAG)
    }

    fn with_flags(leaf_flags: u32) -> Self {
        Self {
            leaf_flags,
            entries: Vec::new(),
            entries_bytes: 0,
            levels: Vec::new(),
            last_key: None,
            count: 0,
        }
    }

    /// A builder that continues a bucket's existing tree: the pages left of
    /// `edge` are kept, the edge's leaf entries are written again with the
    /// entries added after them.
    pub fn continue_from(edge: RightEdge) -> Self {
        let mut tree = Self::new();
        for left in edge.branches.into_iter().rev() {
            let bytes = left.iter().map(|(k, _)| ELEMENT_LEN + k.len()).sum();
            tree.levels.push(Pending {
                children: left,
                bytes,
            });
        }
        for (k, v) in edge.leaf {
            tree.entries_bytes += ELEMENT_LEN + k.len() + v.len();
            tree.last_key = Some(k.clone());
            tree.entries.push((k, v));
        }
        tree
    }

    /// Entries added (not counting those of a continued edge's leaf).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds an entry.
    ///
    /// # Errors
    /// `InvalidInput` if keys are not strictly increasing; I/O errors.
    pub fn add(&mut self, w: &mut PageWriter, key: &[u8], value: &[u8]) -> io::Result<()> {
        if self.last_key.as_deref().is_some_and(|l| l >= key) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bbolt keys must be strictly increasing",
            ));
        }
        let size = ELEMENT_LEN + key.len() + value.len();
        if !self.entries.is_empty()
            && (PAGE_HEADER_LEN + self.entries_bytes + size > w.page_size
                || self.entries.len() >= MAX_ELEMENTS)
        {
            self.flush_leaf(w)?;
        }
        self.entries.push((key.to_vec(), value.to_vec()));
        self.entries_bytes += size;
        self.last_key = Some(key.to_vec());
        self.count += 1;
        Ok(())
    }

    fn flush_leaf(&mut self, w: &mut PageWriter) -> io::Result<()> {
        let n = self.entries.len();
        let mut body = std::mem::take(&mut w.scratch);
        body.clear();
        let mut data_at = n * ELEMENT_LEN;
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let pos = data_at - i * ELEMENT_LEN;
            body.extend_from_slice(&self.leaf_flags.to_le_bytes());
            body.extend_from_slice(&(pos as u32).to_le_bytes());
            body.extend_from_slice(&(k.len() as u32).to_le_bytes());
            body.extend_from_slice(&(v.len() as u32).to_le_bytes());
            data_at += k.len() + v.len();
        }
        for (k, v) in &self.entries {
            body.extend_from_slice(k);
            body.extend_from_slice(v);
        }
        let pgid = w.write_page(LEAF_PAGE, n, &body)?;
        w.scratch = body;
        let first = self
            .entries
            .first()
            .map(|(k, _)| k.clone())
            .unwrap_or_default();
        self.entries.clear();
        self.entries_bytes = 0;
        self.push_child(w, 0, first, pgid)
    }

    /// Adds a page of height `level` to the branch page being filled above
    /// it, writing that one first if the page would not fit.
    fn push_child(
        &mut self,
        w: &mut PageWriter,
        level: usize,
        key: Vec<u8>,
        pgid: u64,
    ) -> io::Result<()> {
        if self.levels.len() == level {
            self.levels.push(Pending::default());
        }
        let size = ELEMENT_LEN + key.len();
        let pending = &self.levels[level];
        if !pending.children.is_empty()
            && (PAGE_HEADER_LEN + pending.bytes + size > w.page_size
                || pending.children.len() >= MAX_ELEMENTS)
        {
            self.write_branch(w, level)?;
        }
        let pending = &mut self.levels[level];
        pending.bytes += size;
        pending.children.push((key, pgid));
        Ok(())
    }

    /// Writes the branch page being filled at `level` and passes it up.
    fn write_branch(&mut self, w: &mut PageWriter, level: usize) -> io::Result<()> {
        let children = std::mem::take(&mut self.levels[level]).children;
        let n = children.len();
        let mut body = Vec::new();
        let mut data_at = n * ELEMENT_LEN;
        for (i, (k, pgid)) in children.iter().enumerate() {
            let pos = data_at - i * ELEMENT_LEN;
            body.extend_from_slice(&(pos as u32).to_le_bytes());
            body.extend_from_slice(&(k.len() as u32).to_le_bytes());
            body.extend_from_slice(&pgid.to_le_bytes());
            data_at += k.len();
        }
        for (k, _) in &children {
            body.extend_from_slice(k);
        }
        let pgid = w.write_page(BRANCH_PAGE, n, &body)?;
        let first = children
            .into_iter()
            .next()
            .map(|(k, _)| k)
            .unwrap_or_default();
        self.push_child(w, level + 1, first, pgid)
    }

    /// Writes what remains and the branch levels; returns the root page.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(mut self, w: &mut PageWriter) -> io::Result<u64> {
        // Every level up to the root ends up with a child: the last leaf
        // (empty only for an empty tree) starts the climb.
        if !self.entries.is_empty() || self.levels.first().is_none_or(|p| p.children.is_empty()) {
            self.flush_leaf(w)?;
        }
        let mut level = 0;
        loop {
            let top = self.levels[level + 1..]
                .iter()
                .all(|p| p.children.is_empty());
            if top && self.levels[level].children.len() == 1 {
                return Ok(self.levels[level].children[0].1);
            }
            self.write_branch(w, level)?;
            level += 1;
        }
    }
}

impl Default for TreeBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// The value of a bucket entry in the root tree: `{root pgid, sequence}`.
pub fn bucket_header(root_pgid: u64, sequence: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&root_pgid.to_le_bytes());
    v[8..].copy_from_slice(&sequence.to_le_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcdpitr_common::bbolt::BoltReader;
    use std::path::Path;

    #[test]
    fn written_files_pass_the_consistency_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut w = PageWriter::create(&path).unwrap();
        let mut big = TreeBuilder::new();
        for i in 0..50_000u32 {
            let value = if i % 5000 == 0 {
                vec![7u8; 20_000]
            } else {
                i.to_le_bytes().to_vec()
            };
            big.add(&mut w, &i.to_be_bytes(), &value).unwrap();
        }
        assert!(big.add(&mut w, &1u32.to_be_bytes(), b"x").is_err());
        let big_root = big.finish(&mut w).unwrap();
        let empty_root = TreeBuilder::new().finish(&mut w).unwrap();
        let mut root = TreeBuilder::for_buckets();
        root.add(&mut w, b"a-empty", &bucket_header(empty_root, 0))
            .unwrap();
        root.add(&mut w, b"b-big", &bucket_header(big_root, 3))
            .unwrap();
        let root_pgid = root.finish(&mut w).unwrap();
        w.finish(root_pgid, 2).unwrap().file.sync_all().unwrap();

        let r = BoltReader::open(&path).unwrap();
        let counts = r.check().unwrap();
        assert_eq!(
            counts,
            vec![(b"a-empty".to_vec(), 0), (b"b-big".to_vec(), 50_000)]
        );
        assert_eq!(r.buckets().unwrap()[1], (b"b-big".to_vec(), 3));
        assert_eq!(
            r.get(b"b-big", &5000u32.to_be_bytes())
                .unwrap()
                .unwrap()
                .len(),
            20_000
        );
        let (k, _) = r.last_in_bucket(b"b-big").unwrap().unwrap();
        assert_eq!(k, 49_999u32.to_be_bytes());

        // The reader never panics on a damaged file: every check ends in
        // `Ok` or a named error.
        let good = std::fs::read(&path).unwrap();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let damaged = dir.path().join("damaged.db");
        for _ in 0..300 {
            let mut bytes = good.clone();
            for _ in 0..=(next() % 16) {
                // Aim at the meta pages and page headers, where damage matters most.
                let page = (next() as usize) % (bytes.len() / PAGE_SIZE as usize);
                let offset = (next() as usize) % 64;
                bytes[page * PAGE_SIZE as usize + offset] = next() as u8;
            }
            std::fs::write(&damaged, &bytes).unwrap();
            if let Ok(r) = BoltReader::open(&damaged) {
                let _ = r.check();
                let _ = r.buckets();
                let _ = r.last_in_bucket(b"b-big");
            }
        }
    }

    /// Writes a file holding bucket `b` with keys `0..n` (u32 big-endian)
    /// and returns its page count.
    fn write_numbers(path: &Path, n: u32) -> u64 {
        let mut w = PageWriter::create(path).unwrap();
        let mut tree = TreeBuilder::new();
        for i in 0..n {
            tree.add(&mut w, &i.to_be_bytes(), &[i as u8; 7]).unwrap();
        }
        let b = tree.finish(&mut w).unwrap();
        let mut root = TreeBuilder::for_buckets();
        root.add(&mut w, b"b", &bucket_header(b, 9)).unwrap();
        let root = root.finish(&mut w).unwrap();
        w.finish(root, 2).unwrap().high_water
    }

    /// Appends keys `from..to` to bucket `b` of the file at `path`.
    fn append_numbers(path: &Path, from: u32, to: u32) -> Finished {
        let r = BoltReader::open(path).unwrap();
        let edge = r.right_edge(b"b").unwrap().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let mut w = PageWriter::append_to(file, r.high_water(), r.page_size()).unwrap();
        let mut tree = TreeBuilder::continue_from(edge);
        for i in from..to {
            tree.add(&mut w, &i.to_be_bytes(), &[i as u8; 7]).unwrap();
        }
        assert!(tree.add(&mut w, &(from - 1).to_be_bytes(), b"x").is_err());
        let b = tree.finish(&mut w).unwrap();
        let mut root = TreeBuilder::for_buckets();
        root.add(&mut w, b"b", &bucket_header(b, 9)).unwrap();
        let root = root.finish(&mut w).unwrap();
        w.finish(root, r.txid() + 1).unwrap()
    }

    fn assert_numbers(path: &Path, n: u32) {
        let r = BoltReader::open(path).unwrap();
        assert_eq!(r.check().unwrap(), vec![(b"b".to_vec(), u64::from(n))]);
        assert_eq!(r.buckets().unwrap(), vec![(b"b".to_vec(), 9)]);
        let mut next = 0u32;
        r.for_each(b"b", &mut |k, v| {
            assert_eq!(k, next.to_be_bytes());
            assert_eq!(v, [next as u8; 7]);
            next += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(next, n);
        // The leaves found from the branch pages hold every entry.
        let leaves = r.leaf_pages(b"b").unwrap();
        let mut entries = 0;
        for pgid in 2..r.high_water() {
            if leaves.contains(pgid) {
                let mut head = [0u8; 16];
                std::os::unix::fs::FileExt::read_exact_at(
                    &File::open(path).unwrap(),
                    &mut head,
                    pgid * r.page_size(),
                )
                .unwrap();
                assert_eq!(u64::from_le_bytes(head[..8].try_into().unwrap()), pgid);
                assert_eq!(u16::from_le_bytes([head[8], head[9]]), LEAF_PAGE);
                entries += u64::from(u16::from_le_bytes([head[10], head[11]]));
            }
        }
        assert_eq!(entries, u64::from(n));
    }

    #[test]
    fn continued_trees_keep_the_pages_left_of_their_edge() {
        let dir = tempfile::tempdir().unwrap();
        // One leaf, two levels, three levels (about 170 entries per leaf,
        // 200 children per branch page).
        for (n, more) in [(5u32, 3u32), (1_000, 1), (60_000, 20_000), (60_000, 0)] {
            let path = dir.path().join(format!("{n}-{more}.db"));
            let pages = write_numbers(&path, n);
            let finished = append_numbers(&path, n, n + more);
            // Only the edge (one page per level) and the root tree are new,
            // besides the pages the new entries need.
            let added = finished.high_water - pages;
            assert!(
                added <= 4 + u64::from(more) / 150,
                "{n}+{more}: {added} pages added"
            );
            assert_numbers(&path, n + more);
            // Again on the continued file: its edge has other shapes.
            append_numbers(&path, n + more, n + more + 500);
            assert_numbers(&path, n + more + 500);
        }
    }
}
