//! The bbolt reader (`BoltReader`, `etcd_revision`).
//!
//! The first byte's bit 0 recomputes both meta pages' checksums before
//! reading, so the page size, root, freelist and high-water checks and the
//! tree walks are reached; whatever the bytes, every call must end in `Ok`
//! or an error.

#![no_main]

use etcdpitr_common::bbolt::{self, fnv1a64, BoltReader, PAGE_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fn fix_meta(file: &mut [u8], at: usize) {
    let start = at + PAGE_HEADER_LEN;
    if let Some(m) = file.get_mut(start..start + 64) {
        let sum = fnv1a64(&m[..56]);
        m[56..64].copy_from_slice(&sum.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut file = rest.to_vec();
    if mode & 1 != 0 && file.len() >= 28 {
        fix_meta(&mut file, 0);
        let page_size = u32::from_le_bytes(file[24..28].try_into().unwrap()) as usize;
        fix_meta(&mut file, page_size);
    }
    let Ok(reader) = BoltReader::from_bytes(file) else {
        return;
    };
    let _ = reader.buckets();
    let _ = bbolt::etcd_revision(&reader);
    let _ = reader.for_each(b"key", &mut |_, _| Ok(()));
    let _ = reader.check();
});
