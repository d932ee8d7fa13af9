//! Fills etcd with the Kubernetes-like workload of `integration::loadgen`
//! until its database reaches a size or for a number of seconds.
//!
//! Usage: `loadgen [--endpoints URLS] (--target-db-bytes SIZE | --seconds N)
//! [--writers N] [--seed N]`. SIZE is decimal or binary (`1GB`, `3GB`,
//! `512MiB`). Start etcd with a `--quota-backend-bytes` above the target
//! (etcd's default quota is 2 GiB) and, for speed, `--unsafe-no-fsync`.
//! The load never compacts etcd.

use std::time::Duration;

use anyhow::{bail, Context};
use etcdpitr_common::settings::parse_size;
use integration::loadgen::{run_load, LoadOptions, Until};

const USAGE: &str = "usage: loadgen [--endpoints URLS] (--target-db-bytes SIZE | --seconds N) [--writers N] [--seed N]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut endpoints = "http://127.0.0.1:2379".to_owned();
    let mut until = None;
    let mut options = LoadOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--endpoints" => endpoints = value()?,
            "--target-db-bytes" => {
                until = Some(Until::DbBytes(parse_size("--target-db-bytes", &value()?)?));
            }
            "--seconds" => {
                let secs: u64 = value()?.parse().context("--seconds: a whole number")?;
                until = Some(Until::Elapsed(Duration::from_secs(secs)));
            }
            "--writers" => options.writers = value()?.parse().context("--writers: a number")?,
            "--seed" => options.seed = value()?.parse().context("--seed: a number")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let until =
        until.with_context(|| format!("--target-db-bytes or --seconds is required\n{USAGE}"))?;
    let endpoints: Vec<String> = endpoints.split(',').map(str::to_owned).collect();
    let summary = run_load(&endpoints, &options, until).await?;
    let secs = summary.elapsed.as_secs_f64();
    println!(
        "{} operations in {secs:.1} s ({:.0}/s), {:.2} GB of values, last revision {}, etcd database {:.2} GB",
        summary.ops,
        summary.ops as f64 / secs,
        summary.value_bytes as f64 / 1e9,
        summary.last_revision,
        summary.db_size_bytes as f64 / 1e9
    );
    Ok(())
}
