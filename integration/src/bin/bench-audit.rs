//! Audit-trail benchmark: `etcd-restorer history` and `diff` over the
//! restorer benchmark's archive (a 100,000-key base snapshot plus at least
//! 1,000,000 revisions, made by the real archiver from a real etcd), each
//! timed with GNU time next to references measured in the same run:
//! `etcd-restorer export` of the last revision, and decoding every segment
//! in-process.
//!
//! Usage: `bench-audit [REVISIONS]` (default 1000000), after
//! `cargo build --release --bins`.

use std::time::Instant;

use etcdpitr_common::layout;
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::segment::{self, Record};
use integration::{bench_key, binary, timed, BenchArchive};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let revisions: u64 = std::env::args()
        .nth(1)
        .map_or(Ok(1_000_000), |s| s.parse())?;
    let bench = Box::pin(BenchArchive::build(revisions)).await?;
    let (url, base, last) = (bench.url.as_str(), bench.base, bench.last);
    let (base_text, last_text) = (base.to_string(), last.to_string());
    let mid_text = i64::midpoint(base, last).to_string();
    let one_key = bench_key(12_345);
    let hundred_keys = bench_key(12_300)[..10].to_owned();
    eprintln!("archive: base snapshot at {base}, last revision {last}");

    // Reference: decode every segment of the chain in-process.
    let listing = ArchiveListing::load(&bench.archive).await?;
    let generation = &listing.generations[0];
    let started = Instant::now();
    let (mut segments, mut decoded) = (0usize, 0usize);
    for name in &generation.chain().links {
        let key = layout::segment_key(generation.generation(), name);
        let bytes = bench.archive.get(&key).await?;
        let (_, records) = segment::decode_all(&key, &bytes)?;
        segments += 1;
        decoded += records
            .iter()
            .filter(|r| matches!(r, Record::Revision(_)))
            .count();
    }
    let decode_secs = started.elapsed().as_secs_f64();

    let runs: Vec<(&str, Vec<&str>)> = vec![
        (
            "export --revision LAST (reference)",
            vec!["export", "--archive", url, "--revision", &last_text],
        ),
        (
            "history --key ONE_KEY",
            vec!["history", "--archive", url, "--key", &one_key],
        ),
        (
            "history --key 100_KEYS --prefix --json --values",
            vec![
                "history",
                "--archive",
                url,
                "--key",
                &hundred_keys,
                "--prefix",
                "--json",
                "--values",
            ],
        ),
        (
            "history --key \"\" --prefix --json (every change)",
            vec![
                "history",
                "--archive",
                url,
                "--key",
                "",
                "--prefix",
                "--json",
            ],
        ),
        (
            "diff --from BASE --to LAST",
            vec![
                "diff",
                "--archive",
                url,
                "--from",
                &base_text,
                "--to",
                &last_text,
            ],
        ),
        (
            "diff --from MID --to LAST --json",
            vec![
                "diff",
                "--archive",
                url,
                "--from",
                &mid_text,
                "--to",
                &last_text,
                "--json",
            ],
        ),
        (
            "diff --from BASE --to LAST --prefix 100_KEYS --values",
            vec![
                "diff",
                "--archive",
                url,
                "--from",
                &base_text,
                "--to",
                &last_text,
                "--prefix",
                &hundred_keys,
                "--values",
            ],
        ),
    ];
    let restorer = binary("etcd-restorer");
    println!(
        "archive: {} base keys, base snapshot at revision {base}, last revision {last}; ONE_KEY = {one_key}, 100_KEYS = {hundred_keys}, MID = {mid_text}",
        integration::BENCH_BASE_KEYS
    );
    println!();
    println!("| command | wall s | peak RSS MiB | output lines |");
    println!("|---|---|---|---|");
    println!(
        "| decode all {segments} segments in-process ({decoded} revisions; reference) | {decode_secs:.2} | – | – |"
    );
    for (i, (label, args)) in runs.iter().enumerate() {
        let out = bench.tmp.path().join(format!("run-{i}.out"));
        let t = timed(&restorer, args, &out)?;
        let lines =
            std::io::BufRead::split(std::io::BufReader::new(std::fs::File::open(&out)?), b'\n')
                .count();
        std::fs::remove_file(&out)?;
        println!(
            "| `{label}` | {:.2} | {:.1} | {lines} |",
            t.wall_secs, t.peak_rss_mib
        );
    }
    Ok(())
}
