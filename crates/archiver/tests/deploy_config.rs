//! The example configuration files in `deploy/` are valid `--config` files:
//! every key is one `etcd-archiver run` reads (unknown keys are an error),
//! every value resolves, and each key lands in the setting it names. The
//! commented-out optional keys are checked too, uncommented.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_archiver::config::{parse_duration, parse_size, Config, Settings};
use etcdpitr_common::crypto::ArchiveKey;
use etcdpitr_common::retention::Period;

/// The example files, relative to the repository root.
const EXAMPLES: [&str; 2] = [
    "deploy/etcd-archiver.toml",
    "deploy/kubernetes/etcd-archiver.toml",
];

/// Keys whose values name files that resolution reads.
const FILE_KEYS: [&str; 5] = [
    "cacert",
    "cert",
    "key",
    "password-file",
    "encryption-key-file",
];

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

/// The file with every commented-out setting (`# key = value`) enabled.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| {
            let rest = line.strip_prefix("# ").unwrap_or(line);
            let is_setting = rest.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
            });
            if is_setting {
                rest
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Content that resolution accepts for a file named by `key`.
fn stand_in(key: &str) -> String {
    match key {
        "encryption-key-file" => ArchiveKey::generate().expect("generate a key").1,
        "password-file" => "example-password\n".to_owned(),
        _ => "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n".to_owned(),
    }
}

/// Resolves `text` as a `--config` file, after pointing every file it names
/// at a stand-in in `dir` (the real ones exist only where it is deployed).
fn resolve(text: &str, dir: &Path) -> (toml::Table, Config) {
    let table: toml::Table = toml::from_str(text).expect("valid TOML");
    let mut local = table.clone();
    for key in FILE_KEYS {
        let Some(value) = local.get_mut(key) else {
            continue;
        };
        let values: Vec<&mut toml::Value> = match value {
            toml::Value::Array(items) => items.iter_mut().collect(),
            one => vec![one],
        };
        for value in values {
            let path = PathBuf::from(value.as_str().expect("a path"));
            assert!(
                path.is_absolute(),
                "{key}: {} is not absolute",
                path.display()
            );
            let file = dir.join(path.file_name().expect("a file name"));
            std::fs::write(&file, stand_in(key)).unwrap();
            *value = toml::Value::String(file.display().to_string());
        }
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, toml::to_string(&local).unwrap()).unwrap();
    let config = Settings {
        config: Some(path),
        ..Settings::default()
    }
    .resolve()
    .unwrap_or_else(|e| panic!("{e:#}"));
    (table, config)
}

fn text(table: &toml::Table, key: &str) -> Option<String> {
    table
        .get(key)
        .map(|v| v.as_str().expect("a string").to_owned())
}

fn duration(table: &toml::Table, key: &str) -> Option<Duration> {
    text(table, key).map(|v| parse_duration(key, &v).unwrap())
}

fn count(table: &toml::Table, key: &str) -> Option<u32> {
    table
        .get(key)
        .map(|v| u32::try_from(v.as_integer().expect("an integer")).unwrap())
}

/// Checks that each key of `table` landed in `config`; returns the keys checked.
fn assert_applied(table: &toml::Table, config: &Config) -> Vec<&'static str> {
    let endpoints: Vec<String> = table["endpoints"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(config.etcd.endpoints, endpoints);
    assert_eq!(Some(&config.archive), text(table, "archive").as_ref());
    // The default data directory is relative to the working directory: a
    // deployment always names one.
    let data_dir = PathBuf::from(text(table, "data-dir").expect("data-dir is set"));
    assert!(data_dir.is_absolute(), "data-dir {}", data_dir.display());
    assert_eq!(config.data_dir, data_dir);
    let durations = [
        ("snapshot-interval", config.snapshot_interval),
        ("segment-max-age", config.segment_max_age),
        ("idle-interval", config.idle_seal_interval),
        ("shutdown-timeout", config.shutdown_timeout),
        ("prune-interval", config.prune_interval),
        ("ready-max-lag", config.ready_max_lag),
        ("heartbeat-interval", config.heartbeat_interval),
    ];
    for (key, value) in durations {
        if let Some(expected) = duration(table, key) {
            assert_eq!(value, expected, "{key}");
        }
    }
    for (key, value) in [
        ("segment-max-bytes", config.segment_max_bytes),
        ("spool-max-bytes", config.spool_max_bytes),
    ] {
        if let Some(expected) = text(table, key) {
            assert_eq!(value, parse_size(key, &expected).unwrap(), "{key}");
        }
    }
    if let Some(n) = count(table, "upload-concurrency") {
        assert_eq!(config.upload_concurrency, n as usize, "upload-concurrency");
    }
    assert_eq!(
        config.metrics_addr.map(|a| a.to_string()),
        text(table, "metrics-addr")
    );
    let tls = config.etcd.tls.as_ref();
    assert_eq!(
        tls.is_some_and(|t| t.ca_pem.is_some()),
        table.contains_key("cacert")
    );
    assert_eq!(
        tls.is_some_and(|t| t.identity.is_some()),
        table.contains_key("cert") && table.contains_key("key")
    );
    assert_eq!(
        config.etcd.auth.as_ref().map(|(user, _)| user.clone()),
        text(table, "user")
    );
    if table.get("election").and_then(toml::Value::as_bool) == Some(false) {
        assert!(config.election.is_none());
    } else {
        let election = config.election.as_ref().expect("an election");
        if let Some(prefix) = text(table, "election-prefix") {
            assert!(election.name.starts_with(&prefix), "{}", election.name);
        }
        if let Some(ttl) = duration(table, "election-ttl") {
            assert_eq!(election.ttl, ttl);
        }
    }
    let policy = &config.retention;
    assert_eq!(
        policy.keep_within_ms,
        duration(table, "keep-within").map(|d| i64::try_from(d.as_millis()).unwrap())
    );
    assert_eq!(policy.keep_last, count(table, "keep-last"));
    for (key, period) in [
        ("keep-hourly", Period::Hourly),
        ("keep-daily", Period::Daily),
        ("keep-weekly", Period::Weekly),
        ("keep-monthly", Period::Monthly),
        ("keep-yearly", Period::Yearly),
    ] {
        assert_eq!(
            policy.keep_periods.get(&period).copied(),
            count(table, key),
            "{key}"
        );
    }
    let key_files = table
        .get("encryption-key-file")
        .map_or(0, |v| v.as_array().expect("a list").len());
    assert_eq!(config.keys.ids().len(), key_files);
    vec![
        "endpoints",
        "archive",
        "data-dir",
        "snapshot-interval",
        "segment-max-age",
        "idle-interval",
        "shutdown-timeout",
        "prune-interval",
        "ready-max-lag",
        "heartbeat-interval",
        "segment-max-bytes",
        "spool-max-bytes",
        "upload-concurrency",
        "metrics-addr",
        "cacert",
        "cert",
        "key",
        "user",
        "password-file",
        "election",
        "election-prefix",
        "election-ttl",
        "keep-within",
        "keep-last",
        "keep-hourly",
        "keep-daily",
        "keep-weekly",
        "keep-monthly",
        "keep-yearly",
        "encryption-key-file",
    ]
}

#[test]
fn example_configs_resolve_and_every_key_applies() {
    for example in EXAMPLES {
        let original = std::fs::read_to_string(repo_file(example))
            .unwrap_or_else(|e| panic!("{example}: {e}"));
        let enabled = uncommented(&original);
        assert_ne!(enabled, original, "{example} shows no optional setting");
        for text in [original, enabled] {
            let dir = tempfile::tempdir().unwrap();
            let (table, config) = resolve(&text, dir.path());
            let checked = assert_applied(&table, &config);
            for key in table.keys() {
                assert!(
                    checked.contains(&key.as_str()),
                    "{example}: key {key} is not checked by this test; add it to assert_applied"
                );
            }
        }
    }
}

#[test]
fn a_misspelled_key_is_refused() {
    // The check above relies on unknown keys being errors.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "archive = \"file:///x\"\nmetrics-adr = \"127.0.0.1:9090\"\n",
    )
    .unwrap();
    let err = Settings {
        config: Some(path),
        ..Settings::default()
    }
    .resolve()
    .unwrap_err();
    assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
}
