//! The snapshot object decoder (`SnapshotHeader::decode`, `read_object`).
//!
//! The first byte's bits choose fix-ups of the rest before decoding: bit 0
//! recomputes the header check, so the header's fields are reached; bit 1
//! also sets `db_bytes` and `db_blake3` from the body (when it decompresses
//! to at most 1 MiB), so the object must then decode to exactly that body.
//! At most `db_bytes` bytes may ever be written out, and every error must
//! name the object.

#![no_main]

use std::io::{Read, Write};

use etcdpitr_common::snapshot::{self, SnapshotHeader, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

const OBJECT: &str = "gen-0000000000000002/snapshots/fuzz.snap";

/// Keeps what is written, up to a limit it asserts.
struct Bounded {
    limit: u64,
    data: Vec<u8>,
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        assert!(
            self.data.len() as u64 + buf.len() as u64 <= self.limit,
            "wrote past db_bytes"
        );
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn fix_check(object: &mut [u8]) {
    let check = blake3::hash(&object[..80]);
    object[80..88].copy_from_slice(&check.as_bytes()[..8]);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut object = rest.to_vec();
    let mut expected = None;
    if object.len() >= HEADER_LEN && mode & 2 != 0 {
        let mut body = Vec::new();
        let decoded = zstd::stream::read::Decoder::new(&object[HEADER_LEN..])
            .and_then(|d| d.take(1 << 20).read_to_end(&mut body));
        if decoded.is_ok() && body.len() < 1 << 20 {
            object[40..48].copy_from_slice(&(body.len() as u64).to_le_bytes());
            object[48..80].copy_from_slice(blake3::hash(&body).as_bytes());
            expected = Some(body);
        }
    }
    if object.len() >= HEADER_LEN && mode & 3 != 0 {
        fix_check(&mut object);
    }
    let limit = match SnapshotHeader::decode(OBJECT, &object) {
        Ok(h) => h.db_bytes,
        Err(e) => {
            assert!(e.to_string().starts_with(OBJECT), "{e}");
            0
        }
    };
    let mut out = Bounded {
        limit,
        data: Vec::new(),
    };
    match snapshot::read_object(OBJECT, &mut object.as_slice(), &mut out) {
        Ok(header) => {
            assert_eq!(out.data.len() as u64, header.db_bytes);
            if let Some(body) = expected {
                assert_eq!(out.data, body);
            }
        }
        Err(e) => assert!(e.to_string().starts_with(OBJECT), "{e}"),
    }
});
