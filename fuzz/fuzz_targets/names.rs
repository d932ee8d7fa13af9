//! The object-name parsers (`layout::classify`, `SegmentName::parse`, ...).
//! Names are parsed strictly: whatever parses must format back to exactly
//! the same name.

#![no_main]

use etcdpitr_common::layout::{self, GenerationId, GenerationObject, SegmentName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(n) = SegmentName::parse(s) {
        assert_eq!(n.file_name(), s);
        assert!(n.first >= 1 && n.prev() <= n.last, "{n:?}");
        let _ = n.is_empty();
    }
    if let Some(rev) = layout::parse_snapshot_file_name(s) {
        assert_eq!(layout::snapshot_file_name(rev), s);
    }
    if let Some(g) = GenerationId::parse_dir(s) {
        assert_eq!(g.dir_name(), s);
    }
    if let Some((g, object)) = layout::classify(s) {
        let key = match object {
            GenerationObject::Manifest => layout::generation_manifest_key(g),
            GenerationObject::Snapshot(rev) => layout::snapshot_key(g, rev),
            GenerationObject::Segment(n) => layout::segment_key(g, &n),
        };
        assert_eq!(key, s);
    }
});
