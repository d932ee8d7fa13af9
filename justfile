# etcd-pitr tasks. `just demo` and `just test` are the README's quick start.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List recipes.
default:
    @just --list

# Install protoc, etcd 3.5/3.4, moto and just if missing.
setup:
    bash scripts/setup.sh

# Archive a throw-away local etcd into a local directory and show the result.
demo: setup
    cargo build --release --bins
    bash scripts/demo.sh

# Run every test: unit, and end-to-end against real etcd and S3 servers.
test: setup
    cargo build --workspace --bins
    # Two end-to-end tests at a time: each runs etcd, servers and the real
    # binaries, and the machine has two cores.
    cargo test --workspace --all-targets -- --test-threads=2

# Formatting and lints.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# What CI runs.
ci: lint test

# Archiver benchmark against a local etcd (see docs/benchmarks.md).
bench-archiver seconds="30": setup
    cargo build --release --workspace --bins
    target/release/bench-archiver {{seconds}}

# Restorer benchmark: native synthesis against replay into etcd (see docs/benchmarks.md).
bench-restorer revisions="1000000": setup
    cargo build --release --workspace --bins
    target/release/bench-restorer {{revisions}}

# history/diff benchmark on the restorer benchmark's archive, next to export (see docs/benchmarks.md).
bench-audit revisions="1000000": setup
    cargo build --release --workspace --bins
    target/release/bench-audit {{revisions}}

# Follow benchmark: apply ceiling, lag at sustained rates next to make-mirror, cutover (see docs/benchmarks.md).
bench-follow seconds="30" backlog="100000": setup
    cargo build --release --workspace --bins
    target/release/bench-follow {{seconds}} {{backlog}}

# Encryption overhead on a large snapshot and a full segment (see docs/benchmarks.md).
bench-envelope mib="512":
    cargo build --release -p integration --bin bench-envelope
    target/release/bench-envelope {{mib}}

# Kubernetes-like load into a running etcd until its database reaches a size (see docs/benchmarks.md).
loadgen endpoints="http://127.0.0.1:2379" size="1GB" writers="64":
    cargo build --release -p integration --bin loadgen
    target/release/loadgen --endpoints {{endpoints}} --target-db-bytes {{size}} --writers {{writers}}

# GB-scale benchmark: snapshot, restore (local, S3 with latency), slow store, time to a running etcd (see docs/benchmarks.md).
bench-scale size="1GB": setup
    cargo build --release --workspace --bins
    target/release/bench-scale {{size}}

# Archive size: segments at several zstd levels against gzip -6 and zstd -19, offline (see docs/benchmarks.md).
bench-size revisions="1000000":
    cargo build --release -p integration --bin bench-size
    target/release/bench-size {{revisions}}

# Long-running exactness test: HashKV of members restored from a 1 GB archive (ETCD_PITR_SCALE_BYTES overrides).
scale-test: setup
    cargo build --release --workspace --bins
    cargo test -p integration --release --test scale -- --ignored --nocapture

# Man pages of both binaries into target/man (docs/operations.md).
man:
    cargo build --release --bins -p etcd-archiver -p etcd-restorer
    target/release/etcd-archiver man --out-dir target/man
    target/release/etcd-restorer man --out-dir target/man

# Build and run with fresh formatting, for day-to-day work.
dev:
    cargo fmt --all
    cargo build --workspace

# Several archivers with the writer killed and frozen, for longer than `just test` does.
soak-ha seconds="600": setup
    cargo build --workspace --bins
    ETCD_PITR_HA_SECS={{seconds}} cargo test -p integration --test ha -- --nocapture --test-threads=1

# Fuzz one decoder (segment, names, snapshot or bbolt; docs/fuzzing.md). Not part of `test`;
# cargo-fuzz needs nightly flags, which stable Rust accepts with RUSTC_BOOTSTRAP=1.
fuzz target="segment" seconds="600":
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
    mkdir -p fuzz/target/corpus/{{target}}
    RUSTC_BOOTSTRAP=1 ASAN_OPTIONS=quarantine_size_mb=16 cargo fuzz run {{target}} fuzz/target/corpus/{{target}} fuzz/corpus/{{target}} -- -max_total_time={{seconds}} -rss_limit_mb=512 -malloc_limit_mb=256 -timeout=20
