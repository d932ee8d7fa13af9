//! Typed, validated configuration: flags, environment and an optional TOML
//! file land in one [`Config`]. Precedence: flag > environment > file > default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use etcdpitr_common::crypto::{ArchiveKey, KeyId, Keyring};
use etcdpitr_common::etcd::{Connection, ConnectionFlags};

use crate::election::ElectionConfig;
use crate::prune::{PolicyArgs, DEFAULT_PRUNE_INTERVAL};
use etcdpitr_common::retention::Policy;
use serde::Deserialize;

use etcdpitr_common::settings::{format_duration, format_size, with_default};
pub use etcdpitr_common::settings::{parse_duration, parse_size};

/// Default etcd endpoint.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";
/// Default data directory (catalog, spool, snapshot scratch space).
pub const DEFAULT_DATA_DIR: &str = "etcd-archiver-data";
/// Default interval between full snapshots.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_hours(1);
/// Default age at which an open segment is sealed.
pub const DEFAULT_SEGMENT_MAX_AGE: Duration = Duration::from_secs(5);
/// Default uncompressed size at which an open segment is sealed.
pub const DEFAULT_SEGMENT_MAX_BYTES: u64 = 16 << 20;
/// Default limit of sealed-but-not-uploaded bytes kept in the spool.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
/// Default number of segments uploaded at once: one, so that the store
/// never holds a segment whose predecessor is missing (see
/// `--upload-concurrency` in docs/archiver.md for what more would risk).
pub const DEFAULT_UPLOAD_CONCURRENCY: u32 = 1;
/// Most segments uploaded at once (each holds one segment in memory).
const MAX_UPLOAD_CONCURRENCY: u32 = 64;
/// Default interval at which an idle cluster's progress is sealed.
pub const DEFAULT_IDLE_SEAL_INTERVAL: Duration = Duration::from_mins(1);
/// Default time allowed for a clean shutdown (seal + upload).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default key prefix of the archivers' election in the source cluster.
pub const DEFAULT_ELECTION_PREFIX: &str = "/etcd-pitr/election/";
/// Default lease TTL of the election: a dead writer is replaced within it.
pub const DEFAULT_ELECTION_TTL: Duration = Duration::from_secs(10);
/// Shortest election TTL accepted (etcd raises shorter leases anyway).
const MIN_ELECTION_TTL: Duration = Duration::from_secs(2);
/// Default lag beyond which `/readyz` answers 503.
pub const DEFAULT_READY_MAX_LAG: Duration = Duration::from_secs(30);
/// Default interval between the writer's heartbeat log lines.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_mins(1);

/// Flags shared by `run`, `snapshot` and `check`. Every setting is also an
/// environment variable `ETCD_ARCHIVER_<FLAG>` (clap reads it) and a key of
/// the `--config` file (its flag without the dashes); every field is
/// optional here so that the file can supply it, and [`Settings::resolve`]
/// applies the defaults, which `--help` shows from the same constants.
#[derive(Args, Debug, Clone, Default)]
pub struct Settings {
    /// TOML file with any of these settings (kebab-case keys: the flags
    /// without their dashes; unknown keys are an error).
    #[arg(long, env = "ETCD_ARCHIVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// `--endpoints` (URLs).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_ENDPOINTS",
        value_delimiter = ',',
        help = with_default("etcd endpoints, comma separated", DEFAULT_ENDPOINT)
    )]
    pub endpoints: Option<Vec<String>>,
    /// Archive URL: file:///abs/dir, s3://bucket/prefix, gs://…, az://… (required)
    #[arg(long, env = "ETCD_ARCHIVER_ARCHIVE")]
    pub archive: Option<String>,
    /// `--data-dir`.
    #[arg(
        long,
        env = "ETCD_ARCHIVER_DATA_DIR",
        help = with_default(
            "Local directory for the catalog, the upload spool and snapshot scratch files",
            DEFAULT_DATA_DIR
        )
    )]
    pub data_dir: Option<PathBuf>,
    /// `--snapshot-interval` (a duration).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_SNAPSHOT_INTERVAL",
        value_name = "DURATION",
        help = with_default(
            "Interval between full snapshots (e.g. 30m, 1h)",
            format_duration(DEFAULT_SNAPSHOT_INTERVAL)
        )
    )]
    pub snapshot_interval: Option<String>,
    /// `--segment-max-age` (a duration).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_SEGMENT_MAX_AGE",
        value_name = "DURATION",
        help = with_default(
            "Seal the open segment when its first record is this old (e.g. 500ms, 5s)",
            format_duration(DEFAULT_SEGMENT_MAX_AGE)
        )
    )]
    pub segment_max_age: Option<String>,
    /// `--segment-max-bytes` (a size).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_SEGMENT_MAX_BYTES",
        value_name = "SIZE",
        help = with_default(
            "Seal the open segment at this uncompressed size (e.g. 16MiB, 1.5GiB)",
            format_size(DEFAULT_SEGMENT_MAX_BYTES)
        )
    )]
    pub segment_max_bytes: Option<String>,
    /// `--spool-max-bytes` (a size).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_SPOOL_MAX_BYTES",
        value_name = "SIZE",
        help = with_default(
            "Stop reading the watch while this many sealed bytes wait for upload",
            format_size(DEFAULT_SPOOL_MAX_BYTES)
        )
    )]
    pub spool_max_bytes: Option<String>,
    /// `--upload-concurrency` (a count).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_UPLOAD_CONCURRENCY",
        value_name = "N",
        help = with_default(
            "Segments uploaded at once (they still count as archived strictly in order)",
            DEFAULT_UPLOAD_CONCURRENCY
        )
    )]
    pub upload_concurrency: Option<u32>,
    /// `--idle-interval` (a duration).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_IDLE_INTERVAL",
        value_name = "DURATION",
        help = with_default(
            "While the cluster is idle, record that it is still current this often",
            format_duration(DEFAULT_IDLE_SEAL_INTERVAL)
        )
    )]
    pub idle_interval: Option<String>,
    /// CA certificate (PEM) to verify etcd's server certificate.
    #[arg(long, env = "ETCD_ARCHIVER_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "ETCD_ARCHIVER_CERT")]
    pub cert: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, env = "ETCD_ARCHIVER_KEY")]
    pub key: Option<PathBuf>,
    /// etcd user name (password from ETCD_ARCHIVER_PASSWORD or --password-file).
    #[arg(long, env = "ETCD_ARCHIVER_USER")]
    pub user: Option<String>,
    /// File holding the etcd password.
    #[arg(long, env = "ETCD_ARCHIVER_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// `--shutdown-timeout` (a duration).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_SHUTDOWN_TIMEOUT",
        value_name = "DURATION",
        help = with_default(
            "Time allowed for sealing and uploading on SIGTERM/SIGINT",
            format_duration(DEFAULT_SHUTDOWN_TIMEOUT)
        )
    )]
    pub shutdown_timeout: Option<String>,
    /// `--election-prefix`.
    #[arg(
        long,
        env = "ETCD_ARCHIVER_ELECTION_PREFIX",
        help = with_default(
            "Key prefix in the source cluster under which archivers of the same archive \
             elect the one that writes",
            DEFAULT_ELECTION_PREFIX
        )
    )]
    pub election_prefix: Option<String>,
    /// `--election-ttl` (a duration).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_ELECTION_TTL",
        value_name = "DURATION",
        help = with_default(
            "Election lease TTL: how soon a standby replaces a dead writer (whole seconds)",
            format_duration(DEFAULT_ELECTION_TTL)
        )
    )]
    pub election_ttl: Option<String>,
    /// Write without an election (only safe when no other archiver ever
    /// writes this archive). In the config file: `election = false`.
    #[arg(
        long,
        env = "ETCD_ARCHIVER_NO_ELECTION",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub no_election: Option<bool>,
    /// Retention policy applied while this archiver writes (none: keep
    /// everything).
    #[command(flatten)]
    pub retention: PolicyArgs,
    /// `--prune-interval` (a duration).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_PRUNE_INTERVAL",
        value_name = "DURATION",
        help = with_default(
            "Interval between prunes under the retention policy (e.g. 1h)",
            format_duration(DEFAULT_PRUNE_INTERVAL)
        )
    )]
    pub prune_interval: Option<String>,
    /// Key file (32 random bytes, base64) to encrypt the archive with. The
    /// first one given seals new objects; repeat the flag (or separate with
    /// commas) to add the keys of earlier rotations, which still open the
    /// objects they sealed.
    #[arg(
        long = "encryption-key-file",
        env = "ETCD_ARCHIVER_ENCRYPTION_KEY_FILE",
        value_delimiter = ','
    )]
    pub encryption_key_file: Vec<PathBuf>,
    /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, on
    /// this address (e.g. 0.0.0.0:9090; default: not served).
    #[arg(long, env = "ETCD_ARCHIVER_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// `--ready-max-lag` (a duration).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_READY_MAX_LAG",
        value_name = "DURATION",
        help = with_default(
            "/readyz answers 503 once the archive lags the source by more than this",
            format_duration(DEFAULT_READY_MAX_LAG)
        )
    )]
    pub ready_max_lag: Option<String>,
    /// `--heartbeat-interval` (a duration).
    #[arg(
        long,
        env = "ETCD_ARCHIVER_HEARTBEAT_INTERVAL",
        value_name = "DURATION",
        help = with_default(
            "Interval between the writer's INFO heartbeat lines",
            format_duration(DEFAULT_HEARTBEAT_INTERVAL)
        )
    )]
    pub heartbeat_interval: Option<String>,
}

/// The TOML file's shape: one key per flag of [`Settings`] (`election`
/// stands for `--no-election`, inverted).
#[derive(Deserialize, Debug, Default)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
struct FileSettings {
    endpoints: Option<Vec<String>>,
    archive: Option<String>,
    data_dir: Option<PathBuf>,
    snapshot_interval: Option<String>,
    segment_max_age: Option<String>,
    segment_max_bytes: Option<String>,
    spool_max_bytes: Option<String>,
    upload_concurrency: Option<u32>,
    idle_interval: Option<String>,
    cacert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    shutdown_timeout: Option<String>,
    election_prefix: Option<String>,
    election_ttl: Option<String>,
    election: Option<bool>,
    keep_within: Option<String>,
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    keep_yearly: Option<u32>,
    prune_interval: Option<String>,
    encryption_key_file: Option<Vec<PathBuf>>,
    metrics_addr: Option<String>,
    ready_max_lag: Option<String>,
    heartbeat_interval: Option<String>,
}

impl FileSettings {
    /// Reads the `--config` file (none: every key unset).
    fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--config: cannot read {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("--config: invalid settings in {}", path.display()))
    }
}

/// Marks an error of [`Settings::resolve`]: the configuration is invalid
/// (the binary exits 2).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration")]
pub struct InvalidConfig;

/// Writes a new random key file at `path` (owner-only; refusing to
/// overwrite an existing file) and returns its key id.
///
/// # Errors
/// The file exists or cannot be written.
pub fn keygen(path: &Path) -> anyhow::Result<KeyId> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (key, text) = ArchiveKey::generate().context("generate a key")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(etcdpitr_common::store::PRIVATE_FILE_MODE)
        .open(path)
        .with_context(|| format!("--output: cannot create {}", path.display()))
        .context(InvalidConfig)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(key.id())
}

/// The validated configuration.
#[derive(Clone)]
pub struct Config {
    /// How to reach the source cluster.
    pub etcd: Connection,
    /// Archive URL.
    pub archive: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Interval between snapshots.
    pub snapshot_interval: Duration,
    /// Segment age limit.
    pub segment_max_age: Duration,
    /// Segment size limit (uncompressed).
    pub segment_max_bytes: u64,
    /// Spool limit.
    pub spool_max_bytes: u64,
    /// Segments uploaded at once.
    pub upload_concurrency: usize,
    /// Seal interval while the cluster is idle.
    pub idle_seal_interval: Duration,
    /// Shutdown budget.
    pub shutdown_timeout: Duration,
    /// The election among archivers of this archive (`None`: write alone).
    pub election: Option<ElectionConfig>,
    /// Retention policy applied every `prune_interval` while writing.
    pub retention: Policy,
    /// Interval between prunes.
    pub prune_interval: Duration,
    /// The archive's keys (empty: the archive is not encrypted).
    pub keys: Arc<Keyring>,
    /// Where to serve metrics, `/healthz` and `/readyz` (`None`: nowhere).
    pub metrics_addr: Option<SocketAddr>,
    /// `/readyz` answers 503 beyond this lag.
    pub ready_max_lag: Duration,
    /// Interval between heartbeat lines.
    pub heartbeat_interval: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field (the completeness test compares configurations by
        // this text); keys by id, the policy as its rules.
        f.debug_struct("Config")
            .field("etcd", &self.etcd)
            .field("archive", &self.archive)
            .field("data_dir", &self.data_dir)
            .field("snapshot_interval", &self.snapshot_interval)
            .field("segment_max_age", &self.segment_max_age)
            .field("segment_max_bytes", &self.segment_max_bytes)
            .field("spool_max_bytes", &self.spool_max_bytes)
            .field("upload_concurrency", &self.upload_concurrency)
            .field("idle_seal_interval", &self.idle_seal_interval)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("election", &self.election)
            .field("retention", &self.retention.to_string())
            .field("prune_interval", &self.prune_interval)
            .field("keys", &self.keys.ids())
            .field("metrics_addr", &self.metrics_addr)
            .field("ready_max_lag", &self.ready_max_lag)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .finish()
    }
}

/// The election name of an archive: archivers writing the same archive URL
/// (spelled the same, trailing slashes aside) compete in one election.
pub fn election_name(prefix: &str, archive: &str) -> String {
    let hash = blake3::hash(archive.trim_end_matches('/').as_bytes());
    format!("{prefix}{}", &hash.to_hex()[..16])
}

impl Settings {
    /// Merges flags, environment, file and defaults, and validates the result.
    ///
    /// # Errors
    /// A message naming the offending field.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let file = FileSettings::load(self.config.as_deref())?;
        let etcd = Connection::resolve(
            ConnectionFlags {
                endpoints: self
                    .endpoints
                    .or(file.endpoints)
                    .unwrap_or_else(|| vec![DEFAULT_ENDPOINT.to_owned()]),
                cacert: self.cacert.or(file.cacert),
                cert: self.cert.or(file.cert),
                key: self.key.or(file.key),
                user: self.user.or(file.user),
                password_file: self.password_file.or(file.password_file),
            },
            "ETCD_ARCHIVER_PASSWORD",
        )?;
        let archive = self.archive.or(file.archive).context(
            "--archive: required (e.g. file:///var/lib/etcd-archive or s3://bucket/prefix)",
        )?;
        let duration =
            |field: &str, cli: Option<String>, file: Option<String>, default: Duration| {
                cli.or(file)
                    .map_or(Ok(default), |s| parse_duration(field, &s))
                    .map_err(anyhow::Error::from)
            };
        let size = |field: &str, cli: Option<String>, file: Option<String>, default: u64| {
            cli.or(file)
                .map_or(Ok(default), |s| parse_size(field, &s))
                .map_err(anyhow::Error::from)
        };
        let election_on = self.no_election.map(|no| !no).or(file.election);
        let election = if election_on == Some(false) {
            None
        } else {
            let prefix = self
                .election_prefix
                .or(file.election_prefix)
                .unwrap_or_else(|| DEFAULT_ELECTION_PREFIX.to_owned());
            if prefix.is_empty() {
                bail!("--election-prefix: must not be empty");
            }
            let ttl = duration(
                "election-ttl",
                self.election_ttl,
                file.election_ttl,
                DEFAULT_ELECTION_TTL,
            )?;
            if ttl < MIN_ELECTION_TTL {
                bail!("--election-ttl: must be at least {MIN_ELECTION_TTL:?}");
            }
            if ttl.subsec_nanos() != 0 {
                // etcd leases count whole seconds; a fraction would be
                // believed alive longer than etcd keeps it.
                bail!("--election-ttl: must be whole seconds (etcd leases count seconds)");
            }
            Some(ElectionConfig {
                name: election_name(&prefix, &archive),
                ttl,
            })
        };
        let retention = self
            .retention
            .or(PolicyArgs {
                keep_within: file.keep_within,
                keep_last: file.keep_last,
                keep_hourly: file.keep_hourly,
                keep_daily: file.keep_daily,
                keep_weekly: file.keep_weekly,
                keep_monthly: file.keep_monthly,
                keep_yearly: file.keep_yearly,
            })
            .resolve()?;
        let key_files = if self.encryption_key_file.is_empty() {
            file.encryption_key_file.unwrap_or_default()
        } else {
            self.encryption_key_file
        };
        let keys = Arc::new(Keyring::load(&key_files)?);
        let upload_concurrency = self
            .upload_concurrency
            .or(file.upload_concurrency)
            .unwrap_or(DEFAULT_UPLOAD_CONCURRENCY);
        if !(1..=MAX_UPLOAD_CONCURRENCY).contains(&upload_concurrency) {
            bail!("--upload-concurrency: must be between 1 and {MAX_UPLOAD_CONCURRENCY}, not {upload_concurrency}");
        }
        let metrics_addr = match self.metrics_addr.or(file.metrics_addr) {
            Some(s) => Some(s.trim().parse::<SocketAddr>().with_context(|| {
                format!("--metrics-addr: {s:?} is not an address like 0.0.0.0:9090 or [::1]:9090")
            })?),
            None => None,
        };
        Ok(Config {
            keys,
            upload_concurrency: upload_concurrency as usize,
            metrics_addr,
            ready_max_lag: duration(
                "ready-max-lag",
                self.ready_max_lag,
                file.ready_max_lag,
                DEFAULT_READY_MAX_LAG,
            )?,
            heartbeat_interval: duration(
                "heartbeat-interval",
                self.heartbeat_interval,
                file.heartbeat_interval,
                DEFAULT_HEARTBEAT_INTERVAL,
            )?,
            retention,
            prune_interval: duration(
                "prune-interval",
                self.prune_interval,
                file.prune_interval,
                DEFAULT_PRUNE_INTERVAL,
            )?,
            election,
            etcd,
            archive,
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            snapshot_interval: duration(
                "snapshot-interval",
                self.snapshot_interval,
                file.snapshot_interval,
                DEFAULT_SNAPSHOT_INTERVAL,
            )?,
            segment_max_age: duration(
                "segment-max-age",
                self.segment_max_age,
                file.segment_max_age,
                DEFAULT_SEGMENT_MAX_AGE,
            )?,
            segment_max_bytes: size(
                "segment-max-bytes",
                self.segment_max_bytes,
                file.segment_max_bytes,
                DEFAULT_SEGMENT_MAX_BYTES,
            )?,
            spool_max_bytes: size(
                "spool-max-bytes",
                self.spool_max_bytes,
                file.spool_max_bytes,
                DEFAULT_SPOOL_MAX_BYTES,
            )?,
            idle_seal_interval: duration(
                "idle-interval",
                self.idle_interval,
                file.idle_interval,
                DEFAULT_IDLE_SEAL_INTERVAL,
            )?,
            shutdown_timeout: duration(
                "shutdown-timeout",
                self.shutdown_timeout,
                file.shutdown_timeout,
                DEFAULT_SHUTDOWN_TIMEOUT,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Settings {
        Settings {
            archive: Some("file:///tmp/x".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn defaults_apply() {
        let c = base().resolve().unwrap();
        assert_eq!(c.etcd.endpoints, vec![DEFAULT_ENDPOINT]);
        assert_eq!(c.segment_max_age, DEFAULT_SEGMENT_MAX_AGE);
        assert_eq!(c.segment_max_bytes, DEFAULT_SEGMENT_MAX_BYTES);
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.ready_max_lag, DEFAULT_READY_MAX_LAG);
        assert_eq!(c.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(c.upload_concurrency, DEFAULT_UPLOAD_CONCURRENCY as usize);
    }

    #[test]
    fn metrics_settings_from_flags_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "archive = \"file:///x\"\nmetrics-addr = \"127.0.0.1:9090\"\nready-max-lag = \"10s\"\nheartbeat-interval = \"5s\"\n",
        )
        .unwrap();
        let s = Settings {
            config: Some(path),
            ready_max_lag: Some("3s".into()),
            ..Settings::default()
        };
        let c = s.resolve().unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.ready_max_lag, Duration::from_secs(3), "the flag wins");
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        let mut s = base();
        s.metrics_addr = Some("localhost".into());
        assert!(format!("{:#}", s.resolve().unwrap_err()).contains("--metrics-addr"));
        let mut s = base();
        s.ready_max_lag = Some("soon".into());
        assert!(format!("{:#}", s.resolve().unwrap_err()).contains("--ready-max-lag"));
    }

    #[test]
    fn election_is_on_by_default_and_named_by_the_archive() {
        let c = base().resolve().unwrap();
        let e = c.election.unwrap();
        assert_eq!(e.ttl, DEFAULT_ELECTION_TTL);
        assert_eq!(
            e.name,
            election_name(DEFAULT_ELECTION_PREFIX, "file:///tmp/x/")
        );
        assert!(e.name.starts_with(DEFAULT_ELECTION_PREFIX));
        let mut s = base();
        s.no_election = Some(true);
        assert!(s.resolve().unwrap().election.is_none());
        let mut s = base();
        s.election_ttl = Some("1s".into());
        assert!(format!("{:#}", s.resolve().unwrap_err()).contains("--election-ttl"));
        let mut s = base();
        s.election_ttl = Some("2900ms".into());
        assert!(format!("{:#}", s.resolve().unwrap_err()).contains("whole seconds"));
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = base();
        s.endpoints = Some(vec!["127.0.0.1:2379".into()]);
        assert!(format!("{:#}", s.resolve().unwrap_err()).contains("--endpoints"));
        let mut s = base();
        s.cacert = Some("/nonexistent/ca.pem".into());
        assert!(format!("{:#}", s.resolve().unwrap_err()).contains("--cacert"));
        let mut s = base();
        s.archive = None;
        assert!(format!("{:#}", s.resolve().unwrap_err()).contains("--archive"));
        for n in [0, MAX_UPLOAD_CONCURRENCY + 1] {
            let mut s = base();
            s.upload_concurrency = Some(n);
            let err = format!("{:#}", s.resolve().unwrap_err());
            assert!(err.contains("--upload-concurrency"), "{err}");
        }
    }

    #[test]
    fn toml_file_and_flag_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "archive = \"file:///from/file\"\nsegment-max-age = \"2s\"\nendpoints = [\"http://127.0.0.2:2379\"]\n",
        )
        .unwrap();
        let s = Settings {
            config: Some(path.clone()),
            segment_max_age: Some("1s".into()),
            ..Settings::default()
        };
        let c = s.resolve().unwrap();
        assert_eq!(c.archive, "file:///from/file");
        assert_eq!(c.segment_max_age, Duration::from_secs(1));
        std::fs::write(&path, "archve = \"typo\"\n").unwrap();
        let s = Settings {
            config: Some(path),
            ..Settings::default()
        };
        assert!(format!("{:#}", s.resolve().unwrap_err()).contains("unknown field"));
    }

    #[test]
    fn encryption_keys_from_flags_or_file() {
        use etcdpitr_common::crypto::{ArchiveKey, KeyError};
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        let (ka, text) = ArchiveKey::generate().unwrap();
        std::fs::write(&a, text).unwrap();
        let (kb, text) = ArchiveKey::generate().unwrap();
        std::fs::write(&b, text).unwrap();
        assert!(base().resolve().unwrap().keys.is_empty());

        let mut s = base();
        s.encryption_key_file = vec![b.clone(), a.clone()];
        let c = s.resolve().unwrap();
        assert_eq!(c.keys.ids(), vec![kb.id(), ka.id()]);
        assert!(format!("{c:?}").contains(&kb.id().to_string()));

        let toml = dir.path().join("c.toml");
        std::fs::write(
            &toml,
            format!(
                "archive = \"file:///x\"\nencryption-key-file = [{:?}]\n",
                a.display().to_string()
            ),
        )
        .unwrap();
        let s = Settings {
            config: Some(toml),
            ..Settings::default()
        };
        assert_eq!(s.resolve().unwrap().keys.ids(), vec![ka.id()]);

        let mut s = base();
        s.encryption_key_file = vec![dir.path().join("missing.key")];
        let err = s.resolve().unwrap_err();
        assert!(
            err.chain().any(<dyn std::error::Error>::is::<KeyError>),
            "{err:#}"
        );
        assert!(
            format!("{err:#}").contains("--encryption-key-file"),
            "{err:#}"
        );
    }

    /// Every setting at a value other than its default, as a config file.
    /// `election` (`--no-election`) is checked on its own: turned off, it
    /// would hide `election-prefix` and `election-ttl`.
    fn every_setting(dir: &Path) -> String {
        use etcdpitr_common::crypto::ArchiveKey;
        let pem = "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n";
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let key_a = file("a.key", &ArchiveKey::generate().unwrap().1);
        let key_b = file("b.key", &ArchiveKey::generate().unwrap().1);
        format!(
            r#"endpoints = ["https://127.0.0.2:2379", "https://127.0.0.3:2379"]
archive = "file:///sample"
data-dir = "/var/lib/sample"
snapshot-interval = "2h"
segment-max-age = "750ms"
segment-max-bytes = "1.5MiB"
spool-max-bytes = "0.5GiB"
upload-concurrency = 7
idle-interval = "20s"
cacert = "{ca}"
cert = "{cert}"
key = "{key}"
user = "archiver"
password-file = "{password}"
shutdown-timeout = "45s"
election-prefix = "/sample/election/"
election-ttl = "7s"
keep-within = "3d"
keep-last = 4
keep-hourly = 5
keep-daily = 6
keep-weekly = 7
keep-monthly = 8
keep-yearly = 9
prune-interval = "2h"
encryption-key-file = ["{key_a}", "{key_b}"]
metrics-addr = "127.0.0.1:9191"
ready-max-lag = "12s"
heartbeat-interval = "2m"
"#,
            ca = file("ca.pem", pem),
            cert = file("cert.pem", pem),
            key = file("key.pem", pem),
            password = file("password", "secret\n"),
        )
    }

    /// The command line that says what `table` says.
    fn as_flags(table: &toml::Table) -> Vec<String> {
        let mut args = vec!["run".to_owned()];
        for (key, value) in table {
            let value = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(","),
                other => panic!("{key}: no flag form for {other}"),
            };
            args.extend([format!("--{key}"), value]);
        }
        args
    }

    fn parse(args: &[String]) -> Settings {
        use clap::{CommandFactory, FromArgMatches, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            settings: Settings,
        }
        Cli::from_arg_matches(&Cli::command().try_get_matches_from(args).unwrap())
            .unwrap()
            .settings
    }

    /// What a resolution came to, TLS files included.
    fn outcome(settings: Settings) -> String {
        match settings.resolve() {
            Ok(c) => format!(
                "{c:?} ca {:?} identity {:?}",
                c.etcd.tls.as_ref().map(|t| t.ca_pem.is_some()),
                c.etcd.tls.as_ref().map(|t| t.identity.is_some())
            ),
            Err(e) => format!("error: {e:#}"),
        }
    }

    fn from_file(dir: &Path, text: &str) -> Settings {
        let path = dir.join("settings.toml");
        std::fs::write(&path, text).unwrap();
        Settings {
            config: Some(path),
            ..Settings::default()
        }
    }

    #[test]
    fn every_setting_is_a_flag_an_env_var_and_a_file_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = every_setting(dir.path());
        let table: toml::Table = toml::from_str(&text).unwrap();
        let command = Settings::augment_args(clap::Command::new("run"));
        let mut flags: Vec<&str> = Vec::new();
        for arg in command.get_arguments() {
            let long = arg.get_long().expect("every setting is a long flag");
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let wanted = format!("ETCD_ARCHIVER_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(env.as_deref(), Some(wanted.as_str()), "--{long}");
            flags.push(long);
        }
        // Each flag is a key of the sample (and so of the file, which
        // refuses unknown keys), and the sample has nothing else.
        let mut keys: Vec<&str> = table.keys().map(String::as_str).collect();
        keys.extend(["config", "no-election"]);
        flags.sort_unstable();
        keys.sort_unstable();
        assert_eq!(flags, keys, "add the new setting to every_setting()");

        // The file says what the flags say...
        let all = outcome(from_file(dir.path(), &text));
        assert!(!all.starts_with("error"), "{all}");
        assert_eq!(outcome(parse(&as_flags(&table))), all);
        // ...and every key of it counts.
        for key in table.keys() {
            let mut fewer = table.clone();
            fewer.remove(key);
            let without = outcome(from_file(dir.path(), &toml::to_string(&fewer).unwrap()));
            assert_ne!(without, all, "the file's {key} had no effect");
        }
        // `election = false` is `--no-election`.
        let off = outcome(from_file(dir.path(), &format!("{text}election = false\n")));
        assert!(off.contains("election: None"), "{off}");
        let mut args = as_flags(&table);
        args.push("--no-election".into());
        assert_eq!(outcome(parse(&args)), off);
    }

    #[test]
    fn flag_beats_file_beats_default_for_each_kind() {
        let dir = tempfile::tempdir().unwrap();
        let file = "archive = \"file:///x\"\nsegment-max-age = \"2s\"\nspool-max-bytes = \"2.5MB\"\nendpoints = [\"http://127.0.0.2:2379\"]\nelection = false\n";
        let args = |extra: &[&str]| {
            let mut a = vec!["run".to_owned(), "--config".to_owned()];
            a.push(dir.path().join("settings.toml").display().to_string());
            a.extend(extra.iter().map(|s| (*s).to_owned()));
            parse(&a).resolve().unwrap()
        };
        std::fs::write(dir.path().join("settings.toml"), file).unwrap();
        // File over default.
        let c = args(&[]);
        assert_eq!(c.segment_max_age, Duration::from_secs(2));
        assert_eq!(c.spool_max_bytes, 2_500_000);
        assert_eq!(c.etcd.endpoints, ["http://127.0.0.2:2379"]);
        assert!(c.election.is_none());
        assert_eq!(c.segment_max_bytes, DEFAULT_SEGMENT_MAX_BYTES);
        assert_eq!(c.snapshot_interval, DEFAULT_SNAPSHOT_INTERVAL);
        // Flag over file, for a duration, a size, a list and a bool.
        let c = args(&[
            "--segment-max-age",
            "1s",
            "--spool-max-bytes",
            "1.5KiB",
            "--endpoints",
            "http://127.0.0.3:2379,http://127.0.0.4:2379",
            "--no-election=false",
        ]);
        assert_eq!(c.segment_max_age, Duration::from_secs(1));
        assert_eq!(c.spool_max_bytes, 1536);
        assert_eq!(
            c.etcd.endpoints,
            ["http://127.0.0.3:2379", "http://127.0.0.4:2379"]
        );
        assert!(c.election.is_some(), "--no-election=false beats the file");
        // A bad size names its flag, wherever it came from.
        std::fs::write(
            dir.path().join("settings.toml"),
            "archive = \"file:///x\"\nsegment-max-bytes = \"1.5\"\n",
        )
        .unwrap();
        let err = parse(&[
            "run".into(),
            "--config".into(),
            dir.path().join("settings.toml").display().to_string(),
        ])
        .resolve()
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("--segment-max-bytes"),
            "{err:#}"
        );
    }

    #[test]
    fn keygen_writes_an_owner_only_key_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let id = keygen(&path).unwrap();
        assert_eq!(ArchiveKey::load(&path).unwrap().id(), id);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = keygen(&path).unwrap_err();
        assert!(err.is::<InvalidConfig>(), "{err:#}");
        assert_eq!(ArchiveKey::load(&path).unwrap().id(), id, "unchanged");
    }
}
