//! The segment decoder (`segment::open`, `RecordReader`, `decode_all`).
//!
//! The first byte picks how the rest is used:
//! - 0: an object as stored (almost always stopped by the checksum);
//! - 1: an object re-sealed here (body length and checksum fixed up), so
//!   every header check and the zstd body are reached;
//! - 2: `prev u32, revisions u8, record_count u16` and then raw records,
//!   compressed here behind a valid header, so the record decoder sees
//!   arbitrary records; whatever decodes must re-encode to the same records.
//!
//! Every error must name the object.

#![no_main]

use etcdpitr_common::segment::{self, RecordReader, SegmentBuilder, SegmentError};
use libfuzzer_sys::fuzz_target;

const OBJECT: &str = "gen-0000000000000003/segments/fuzz.seg";

fn named(e: &SegmentError) {
    assert!(e.to_string().starts_with(OBJECT), "{e}");
}

/// Streams every record, keeping none.
fn stream(object: &[u8]) {
    let (header, body) = match segment::open(OBJECT, object) {
        Ok(x) => x,
        Err(e) => return named(&e),
    };
    let mut reader = match RecordReader::new(OBJECT, &header, body) {
        Ok(r) => r,
        Err(e) => return named(&e),
    };
    loop {
        match reader.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => return named(&e),
        }
    }
}

fn seal(mut object: Vec<u8>) -> Vec<u8> {
    if object.len() >= segment::HEADER_LEN {
        let body_len = (object.len() - segment::HEADER_LEN) as u64;
        object[72..80].copy_from_slice(&body_len.to_le_bytes());
    }
    let hash = blake3::hash(&object);
    object.extend_from_slice(hash.as_bytes());
    object
}

fn raw_records(params: &[u8], raw: &[u8]) {
    let prev = i64::from(u32::from_le_bytes(params[0..4].try_into().unwrap()));
    let last = prev + i64::from(params[4]);
    let count = u16::from_le_bytes(params[5..7].try_into().unwrap());
    let mut object = Vec::new();
    object.extend_from_slice(segment::MAGIC);
    object.extend_from_slice(&segment::FORMAT_VERSION.to_le_bytes());
    object.push(segment::CODEC_ZSTD);
    object.extend_from_slice(&[0; 5]);
    for n in [3, prev, prev + 1, last, 0, 0, i64::from(count), 0] {
        object.extend_from_slice(&n.to_le_bytes());
    }
    object.extend_from_slice(&zstd::encode_all(raw, 1).unwrap());
    let object = seal(object);
    let records = match segment::decode_all(OBJECT, &object) {
        Ok((_, records)) => records,
        Err(e) => return named(&e),
    };
    // What the reader accepts, the writer accepts and writes back the same.
    let mut builder = SegmentBuilder::new(3, prev, [0; 32]).unwrap();
    for r in &records {
        builder
            .push(r)
            .expect("the writer accepts what the reader accepted");
    }
    let (name, bytes) = builder.finish().unwrap();
    assert_eq!((name.first, name.last), (prev + 1, last));
    let (_, again) = segment::decode_all(OBJECT, &bytes).expect("round trip");
    assert_eq!(again, records);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Err(e) = segment::decode_all(OBJECT, rest) {
                named(&e);
            }
        }
        1 => stream(&seal(rest.to_vec())),
        _ => {
            if rest.len() >= 7 {
                raw_records(&rest[..7], &rest[7..]);
            }
        }
    }
});
