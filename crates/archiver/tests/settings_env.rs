//! Environment variables sit between flags and the config file: flag >
//! `ETCD_ARCHIVER_*` > file > default, for each kind of setting (duration,
//! size, list, bool). One test in its own binary: it alone changes this
//! process's environment.

use std::time::Duration;

use clap::{Args, FromArgMatches};
use etcd_archiver::config::{Config, Settings, DEFAULT_SNAPSHOT_INTERVAL};

/// `etcd-archiver run ARGS`, resolved.
fn resolve(args: &[&str]) -> anyhow::Result<Config> {
    let command = Settings::augment_args(clap::Command::new("run"));
    let matches =
        command.try_get_matches_from(std::iter::once("run").chain(args.iter().copied()))?;
    Settings::from_arg_matches(&matches)?.resolve()
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("settings.toml");
    std::fs::write(
        &file,
        "archive = \"file:///from/file\"\nsegment-max-age = \"3s\"\nsegment-max-bytes = \"3MiB\"\nendpoints = [\"http://127.0.0.3:2379\"]\nelection = false\n",
    )
    .unwrap();
    let env = [
        ("ETCD_ARCHIVER_CONFIG", file.display().to_string()),
        ("ETCD_ARCHIVER_SEGMENT_MAX_AGE", "2s".to_owned()),
        ("ETCD_ARCHIVER_SEGMENT_MAX_BYTES", "2.5MiB".to_owned()),
        (
            "ETCD_ARCHIVER_ENDPOINTS",
            "http://127.0.0.2:2379,http://127.0.0.5:2379".to_owned(),
        ),
        ("ETCD_ARCHIVER_NO_ELECTION", "false".to_owned()),
        ("ETCD_ARCHIVER_KEEP_DAILY", "4".to_owned()),
    ];
    for (name, value) in &env {
        std::env::set_var(name, value);
    }

    // Env over file (the file itself named by ETCD_ARCHIVER_CONFIG).
    let c = resolve(&[]).unwrap();
    assert_eq!(c.archive, "file:///from/file", "from the file");
    assert_eq!(c.segment_max_age, Duration::from_secs(2));
    assert_eq!(c.segment_max_bytes, 5 << 19);
    assert_eq!(
        c.etcd.endpoints,
        ["http://127.0.0.2:2379", "http://127.0.0.5:2379"]
    );
    assert!(
        c.election.is_some(),
        "NO_ELECTION=false beats election = false"
    );
    assert_eq!(c.retention.to_string(), "--keep-daily 4");
    assert_eq!(
        c.snapshot_interval, DEFAULT_SNAPSHOT_INTERVAL,
        "the default"
    );

    // Flags over env.
    let c = resolve(&[
        "--segment-max-age",
        "1s",
        "--segment-max-bytes",
        "1.5MiB",
        "--endpoints",
        "http://127.0.0.1:2379",
        "--no-election",
        "--keep-daily",
        "9",
    ])
    .unwrap();
    assert_eq!(c.segment_max_age, Duration::from_secs(1));
    assert_eq!(c.segment_max_bytes, 3 << 19);
    assert_eq!(c.etcd.endpoints, ["http://127.0.0.1:2379"]);
    assert!(c.election.is_none());
    assert_eq!(c.retention.to_string(), "--keep-daily 9");

    // A bad value from the environment names its flag.
    std::env::set_var("ETCD_ARCHIVER_SEGMENT_MAX_BYTES", "1.5");
    let err = resolve(&[]).unwrap_err();
    assert!(
        format!("{err:#}").contains("--segment-max-bytes: \"1.5\" is a fraction of a byte"),
        "{err:#}"
    );
    std::env::set_var("ETCD_ARCHIVER_NO_ELECTION", "maybe");
    assert!(resolve(&[]).is_err(), "not a boolean");

    for (name, _) in &env {
        std::env::remove_var(name);
    }
    std::env::remove_var("ETCD_ARCHIVER_SEGMENT_MAX_BYTES");
}
