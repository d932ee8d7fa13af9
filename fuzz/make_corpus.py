#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (small, committed).

Seeds start with the mode byte each target documents. Objects whose
checksums Python cannot compute (blake3) use the targets' fix-up modes.
Run from the repository root: python3 fuzz/make_corpus.py
"""
import os
import struct
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
TESTDATA = os.path.join(ROOT, "crates", "common", "testdata")


def zstd(data, decompress=False):
    args = ["zstd", "-q", "-c"] + (["-d"] if decompress else ["-1"])
    return subprocess.run(args, input=data, capture_output=True, check=True).stdout


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def rle_frame(byte, length):
    """A zstd frame of `length` copies of `byte` in RLE blocks: 4 bytes per
    128 KiB, a "zstd bomb"."""
    f = bytes([0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x38])
    while length > 0:
        n = min(length, 128 << 10)
        length -= n
        header = (1 if length == 0 else 0) | (1 << 1) | (n << 3)
        f += struct.pack("<I", header)[:3] + bytes([byte])
    return f


def segment_header(prev, last, count):
    """A segment header; the harness's mode 1 fixes body length and checksum."""
    return (b"EPITRSEG" + struct.pack("<HB", 1, 1) + b"\0" * 5
            + struct.pack("<Qqqqqqqq", 3, prev, prev + 1, last, 0, 0, count, 0))


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def tiny_bbolt(ps=512):
    """An etcd-like bbolt file with 512-byte pages: buckets `key` (inline,
    two revisions) and `meta` (page 3, a compaction mark)."""

    def page(pgid, flags, count, body, overflow=0):
        p = struct.pack("<QHHI", pgid, flags, count, overflow) + body
        return p + b"\0" * (ps * (overflow + 1) - len(p))

    def leaf(entries):
        elems, data = b"", b""
        for i, (flags, k, v) in enumerate(entries):
            pos = (len(entries) - i) * 16 + len(data)
            elems += struct.pack("<IIII", flags, pos, len(k), len(v))
            data += k + v
        return elems + data

    def rev(main, sub=0):
        return struct.pack(">Q", main) + b"_" + struct.pack(">Q", sub)

    key_page = struct.pack("<QHHI", 0, 0x02, 2, 0) + leaf(
        [(0, rev(2), b"\x0a\x01a"), (0, rev(3), b"\x0a\x01b")]
    )
    key_bucket = struct.pack("<QQ", 0, 0) + key_page
    meta_bucket = struct.pack("<QQ", 3, 0)
    root = page(2, 0x02, 2, leaf([(1, b"key", key_bucket), (1, b"meta", meta_bucket)]))
    meta = page(3, 0x02, 1, leaf([(0, b"finishedCompactRev", rev(4))]))

    def meta_page(n, txid):
        m = struct.pack("<IIIIQQQQQ", 0xED0CDAED, 2, ps, 0, 2, 0, 2**64 - 1, 4, txid)
        m += struct.pack("<Q", fnv1a64(m))
        return page(n, 0x04, 0, m)

    return meta_page(0, 2) + meta_page(1, 1) + root + meta


def main():
    sample = open(os.path.join(TESTDATA, "sample-v1.seg"), "rb").read()
    # The sample's records with a short value (its 100 kB value would make
    # every input that long).
    def field(b):
        return struct.pack("<I", len(b)) + b
    raw = b"\x02" + struct.pack("<qqq", 0x1234, 30, 11)
    raw += b"\x01" + struct.pack("<qqBI", 11, 1700000000000, 1, 2)
    raw += b"\x00" + field(b"/a\x00\xff") + struct.pack("<qqqq", 11, 11, 1, 0x1234) + field(b"v1")
    raw += b"\x01" + field(b"/b")
    raw += b"\x01" + struct.pack("<qqBI", 12, 1700000000010, 0, 1)
    raw += b"\x00" + field(b"/a\x00\xff") + struct.pack("<qqqq", 11, 12, 2, 0) + field(b"\x07" * 100)
    raw += b"\x03" + struct.pack("<qq", 12, 1700000005000)
    write("segment", "stored-sample", b"\x00" + sample)
    write("segment", "resealed-sample", b"\x01" + sample[:-32])
    write("segment", "raw-sample-records", b"\x02" + struct.pack("<IBH", 10, 2, 4) + raw)
    write("segment", "raw-progress", b"\x02" + struct.pack("<IBH", 7, 0, 1)
          + b"\x03" + struct.pack("<qq", 7, 1700000000000))

    # Bombs: 100 MB of progress records behind a header claiming 1000; a
    # revision whose 60 MiB key is one RLE frame.
    write("segment", "bomb-progress", b"\x01" + segment_header(10, 10, 1000)
          + rle_frame(3, 100 << 20))
    head = b"\x01" + struct.pack("<qqBI", 11, 0, 0, 1) + b"\x01" + struct.pack("<I", 60 << 20)
    write("segment", "bomb-key", b"\x01" + segment_header(10, 11, 1) + zstd(head)
          + rle_frame(ord("k"), 60 << 20))

    for i, name in enumerate([
        "gen-0000000000000001/generation.json",
        "gen-0000000000000001/snapshots/000000000000001f.snap",
        "gen-0000000000000002/segments/000000000000000b-000000000000000c-0000018bcfe56800.seg",
        "0000000000000005-000000000000012c-0000000000000001.seg",
        "000000000000001f.snap",
        "gen-00000000000000ff",
        "0000000000000001-7fffffffffffffff-0000000000000001.seg",
    ]):
        write("names", f"name-{i}", name.encode())

    tiny = tiny_bbolt()
    real = [open(os.path.join(TESTDATA, f), "rb").read()
            for f in ("etcd-3.5.1-rev31.db", "etcd-3.4.23-rev25-compacted.db")]
    write("bbolt", "tiny-512", b"\x00" + tiny)
    write("bbolt", "tiny-512-fixed", b"\x01" + tiny)
    write("bbolt", "etcd-3.5.1", b"\x00" + real[0])
    write("bbolt", "etcd-3.4.23", b"\x01" + real[1])

    header = (b"EPITRSNP" + struct.pack("<HB", 1, 1) + b"\0" * 5
              + struct.pack("<QqqQ", 2, 4, 1700000000000, 0) + b"\0" * 40)
    write("snapshot", "tiny-fixed", b"\x03" + header + zstd(tiny))
    write("snapshot", "tiny-check-only", b"\x01" + header + zstd(tiny))
    write("snapshot", "raw", b"\x00" + header + zstd(tiny))
    bomb = header[:40] + struct.pack("<Q", 4096) + header[48:]
    write("snapshot", "bomb", b"\x01" + bomb + rle_frame(0, 100 << 20))


if __name__ == "__main__":
    main()
