//! A streaming bbolt writer: buckets are written bottom-up from sorted
//! entries, pages are appended in allocation order, and the meta pages are
//! written last. Memory holds one leaf plus one (key, page) pair per page of
//! the level above, never the data.
//!
//! The file has no persisted freelist (`freelist = u64::MAX`, as etcd writes
//! with `NoFreelistSync`) and every page below the high-water mark is
//! reachable, so bbolt's consistency check passes.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use etcdpitr_common::bbolt::{
    self, BRANCH_PAGE, BUCKET_LEAF_FLAG, ELEMENT_LEN, LEAF_PAGE, PAGE_HEADER_LEN,
};

/// Page size of the files written (the size etcd uses on common platforms).
pub const PAGE_SIZE: usize = 4096;
/// bbolt keeps element counts in a u16.
const MAX_ELEMENTS: usize = 0xFFFF - 1;

/// Appends pages to a new file.
pub struct PageWriter {
    out: BufWriter<File>,
    next_pgid: u64,
    scratch: Vec<u8>,
}

impl PageWriter {
    /// Creates the file and reserves the two meta pages.
    ///
    /// # Errors
    /// I/O errors.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; 2 * PAGE_SIZE])?;
        Ok(Self {
            out,
            next_pgid: 2,
            scratch: Vec::new(),
        })
    }

    /// Bytes written so far (the pages appended, with the two reserved
    /// for the meta pages).
    pub fn len_bytes(&self) -> u64 {
        self.next_pgid * PAGE_SIZE as u64
    }

    /// Writes one page (with overflow pages as needed) of `flags` holding
    /// `elements` elements; `body` is everything after the page header.
    fn write_page(&mut self, flags: u16, count: usize, body: &[u8]) -> io::Result<u64> {
        let len = PAGE_HEADER_LEN + body.len();
        let pages = len.div_ceil(PAGE_SIZE).max(1);
        let pgid = self.next_pgid;
        let mut header = [0u8; PAGE_HEADER_LEN];
        header[..8].copy_from_slice(&pgid.to_le_bytes());
        header[8..10].copy_from_slice(&flags.to_le_bytes());
        header[10..12].copy_from_slice(&(count as u16).to_le_bytes());
        header[12..16].copy_from_slice(&((pages - 1) as u32).to_le_bytes());
        self.out.write_all(&header)?;
        self.out.write_all(body)?;
        let padding = pages * PAGE_SIZE - len;
        self.out.write_all(&vec![0u8; padding])?;
        self.next_pgid += pages as u64;
        Ok(pgid)
    }

    /// Writes the meta pages and returns the file, flushed but not synced.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(mut self, root_pgid: u64) -> io::Result<File> {
        let high_water = self.next_pgid;
        self.out.flush()?;
        let mut file = self
            .out
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        for (pgid, txid) in [(0u64, 2u64), (1, 1)] {
            let mut page = vec![0u8; PAGE_SIZE];
            let meta = bbolt::encode_meta_page(pgid, PAGE_SIZE as u32, root_pgid, high_water, txid);
            page[..meta.len()].copy_from_slice(&meta);
            file.seek(SeekFrom::Start(pgid * PAGE_SIZE as u64))?;
            file.write_all(&page)?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(file)
    }
}

/// Builds one B+tree from entries given in strictly increasing key order.
pub struct TreeBuilder {
    leaf_flags: u32,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    entries_bytes: usize,
    /// First key and page of every page written, one list per level.
    levels: Vec<Vec<(Vec<u8>, u64)>>,
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
            levels: vec![Vec::new()],
            last_key: None,
            count: 0,
        }
    }

    /// Entries added so far.
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
            && (PAGE_HEADER_LEN + self.entries_bytes + size > PAGE_SIZE
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
        self.levels[0].push((first, pgid));
        self.entries.clear();
        self.entries_bytes = 0;
        Ok(())
    }

    fn write_branch(w: &mut PageWriter, children: &[(Vec<u8>, u64)]) -> io::Result<u64> {
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
        for (k, _) in children {
            body.extend_from_slice(k);
        }
        w.write_page(BRANCH_PAGE, n, &body)
    }

    /// Writes what remains and the branch levels; returns the root page.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(mut self, w: &mut PageWriter) -> io::Result<u64> {
        if !self.entries.is_empty() || self.levels[0].is_empty() {
            self.flush_leaf(w)?;
        }
        let mut level = std::mem::take(&mut self.levels[0]);
        while level.len() > 1 {
            let mut parents = Vec::new();
            let mut chunk: Vec<(Vec<u8>, u64)> = Vec::new();
            let mut chunk_bytes = PAGE_HEADER_LEN;
            for child in level {
                let size = ELEMENT_LEN + child.0.len();
                if !chunk.is_empty()
                    && (chunk_bytes + size > PAGE_SIZE || chunk.len() >= MAX_ELEMENTS)
                {
                    let first = chunk[0].0.clone();
                    parents.push((first, Self::write_branch(w, &chunk)?));
                    chunk.clear();
                    chunk_bytes = PAGE_HEADER_LEN;
                }
                chunk_bytes += size;
                chunk.push(child);
            }
            let first = chunk[0].0.clone();
            parents.push((first, Self::write_branch(w, &chunk)?));
            level = parents;
        }
        Ok(level[0].1)
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
        w.finish(root_pgid).unwrap().sync_all().unwrap();

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
                let page = (next() as usize) % (bytes.len() / PAGE_SIZE);
                let offset = (next() as usize) % 64;
                bytes[page * PAGE_SIZE + offset] = next() as u8;
            }
            std::fs::write(&damaged, &bytes).unwrap();
            if let Ok(r) = BoltReader::open(&damaged) {
                let _ = r.check();
                let _ = r.buckets();
                let _ = r.last_in_bucket(b"b-big");
            }
        }
    }
}
