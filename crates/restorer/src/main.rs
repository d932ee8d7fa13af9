//! `etcd-restorer`: parse flags, set up logging, call the library, map
//! errors to documented exit codes.
//!
//! Flags and environment only, no config file. A flag that is a setting
//! (where the archive is and its keys, how to reach and pace `follow`'s
//! destination, how times are read, the etcd release of the next steps)
//! is also `ETCD_RESTORER_<FLAG>`; what names one invocation's target or
//! output (`--revision`, `--time`, `--output`, `--key`, `--from`, `--json`,
//! `--force`, …) is a flag only, so a stray variable never changes what a
//! command restores or where it writes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use etcd_restorer::commands::{
    self, DiffOptions, EtcdRelease, FollowOptions, HistoryOptions, RestoreOptions, Span, Target,
    TimeFlags, Until,
};
use etcd_restorer::point::DEFAULT_MAX_STALENESS;
use etcd_restorer::synth::Bump;
use etcd_restorer::UsageError;
use etcdpitr_common::cli::{DocsCommand, LogFormat, Logging};
use etcdpitr_common::etcd::{Connection, ConnectionFlags};
use etcdpitr_common::settings::{self, format_duration, with_default};

/// Restores etcd to any archived revision or moment.
#[derive(Parser)]
#[command(name = "etcd-restorer", version)]
struct Cli {
    /// Log line format on stderr: text, or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "ETCD_RESTORER_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The keys of an encrypted archive.
#[derive(Args)]
struct KeyArgs {
    /// Key file of an encrypted archive (32 random bytes, base64). Repeat
    /// the flag (or separate with commas) to give every key the archive was
    /// sealed with across rotations; each object names the key it needs.
    #[arg(
        long = "encryption-key-file",
        env = "ETCD_RESTORER_ENCRYPTION_KEY_FILE",
        value_delimiter = ','
    )]
    files: Vec<PathBuf>,
}

/// The destination etcd cluster of `follow`.
#[derive(Args)]
struct DestinationArgs {
    /// Destination etcd endpoints, comma separated.
    #[arg(
        long,
        env = "ETCD_RESTORER_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    endpoints: Vec<String>,
    /// CA certificate (PEM) to verify the destination's server certificate.
    #[arg(long, env = "ETCD_RESTORER_CACERT")]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) for the destination.
    #[arg(long, env = "ETCD_RESTORER_CERT")]
    cert: Option<PathBuf>,
    /// Client key (PEM) for the destination.
    #[arg(long, env = "ETCD_RESTORER_KEY")]
    key: Option<PathBuf>,
    /// etcd user name (password from ETCD_RESTORER_PASSWORD or --password-file).
    #[arg(long, env = "ETCD_RESTORER_USER")]
    user: Option<String>,
    /// File holding the etcd password.
    #[arg(long, env = "ETCD_RESTORER_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
}

impl DestinationArgs {
    fn connection(self) -> anyhow::Result<Connection> {
        Connection::resolve(
            ConnectionFlags {
                endpoints: self.endpoints,
                cacert: self.cacert,
                cert: self.cert,
                key: self.key,
                user: self.user,
                password_file: self.password_file,
            },
            "ETCD_RESTORER_PASSWORD",
        )
        .map_err(|e| UsageError(format!("{e:#}")).into())
    }
}

/// Parses the duration `text` of `--flag`.
fn duration(flag: &str, text: &str) -> Result<std::time::Duration, UsageError> {
    settings::parse_duration(flag, text).map_err(|e| UsageError(e.to_string()))
}

/// How a command reads times.
#[derive(Args)]
struct TimeArgs {
    /// Read a time without a zone (2026-11-25T14:06:30) as UTC; without
    /// this flag such a time is refused (the restorer never guesses a zone).
    #[arg(long, env = "ETCD_RESTORER_UTC")]
    utc: bool,
    #[command(flatten)]
    staleness: StalenessArgs,
}

impl TimeArgs {
    fn flags(&self) -> Result<TimeFlags, UsageError> {
        Ok(TimeFlags {
            utc: self.utc,
            max_staleness: self.staleness.get()?,
        })
    }
}

/// `--max-staleness`.
#[derive(Args)]
struct StalenessArgs {
    /// `--max-staleness` (a duration; the default applies in the library).
    #[arg(
        long,
        env = "ETCD_RESTORER_MAX_STALENESS",
        value_name = "DURATION",
        help = with_default(
            "The archive is current while its newest vouched moment is at most this old; \
             a time after that moment then takes the newest revision",
            format_duration(DEFAULT_MAX_STALENESS)
        )
    )]
    max_staleness: Option<String>,
}

impl StalenessArgs {
    fn get(&self) -> Result<Option<std::time::Duration>, UsageError> {
        self.max_staleness
            .as_deref()
            .map(|t| duration("max-staleness", t))
            .transpose()
    }
}

#[derive(Args)]
struct TargetArgs {
    /// Archive URL: file:///abs/dir, s3://bucket/prefix, gs://…, az://…
    #[arg(long, env = "ETCD_RESTORER_ARCHIVE")]
    archive: String,
    #[command(flatten)]
    keys: KeyArgs,
    /// Target revision (neither this nor --time: the newest restorable
    /// revision).
    #[arg(long, conflicts_with = "time")]
    revision: Option<i64>,
    /// Target moment: the last revision observed at or before it. RFC 3339
    /// (2026-11-25T14:07:00Z), now, or now-DURATION (now-10m).
    #[arg(long)]
    time: Option<String>,
    /// Restore from this generation (default: the newest that holds the target).
    #[arg(long)]
    generation: Option<u64>,
    #[command(flatten)]
    times: TimeArgs,
}

impl TargetArgs {
    fn target(&self) -> Result<Target, UsageError> {
        Ok(Target {
            revision: self.revision,
            time: self.time.clone(),
            generation: self.generation,
            times: self.times.flags()?,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generations, base snapshots, restorable ranges and gaps.
    List {
        /// Archive URL.
        #[arg(long, env = "ETCD_RESTORER_ARCHIVE")]
        archive: String,
        #[command(flatten)]
        keys: KeyArgs,
        /// Machine-readable output (schema in docs/restorer.md).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        staleness: StalenessArgs,
    },
    /// Write an etcd snapshot file for the target.
    Restore {
        #[command(flatten)]
        target: TargetArgs,
        /// Output snapshot file.
        #[arg(long)]
        output: PathBuf,
        /// Print the plan without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// Skip this many revisions after the target (for clients that saw later ones).
        #[arg(long, default_value_t = 0)]
        bump_revision: i64,
        /// Mark the bumped revision as compacted (needs --bump-revision).
        #[arg(long)]
        mark_compacted: bool,
        /// For a `follow` seed: give leases granted for less this TTL (e.g.
        /// 10m), so the seeded member does not expire them before follow
        /// keeps them alive. Their keys then outlive a dead owner that long.
        #[arg(long, value_name = "DURATION")]
        min_lease_ttl: Option<String>,
        /// Overwrite an existing output file.
        #[arg(long)]
        force: bool,
        /// The etcd release to print the next commands for: 3.4 or 3.5
        /// (default: read from the restored file, else 3.5).
        #[arg(long, env = "ETCD_RESTORER_ETCD_VERSION", value_name = "VERSION")]
        etcd_version: Option<EtcdRelease>,
        /// Also run bbolt's whole consistency check on the restored file
        /// (reads every page of every bucket once more). Without it the file
        /// is read back once: every byte checked against the archived
        /// snapshot's hash or against what was written, and every leaf of
        /// the `key` bucket checked where its branch pages place it.
        #[arg(long, env = "ETCD_RESTORER_PARANOID")]
        paranoid: bool,
    },
    /// Read every object of the archive and check it; exit 4 on any problem.
    Verify {
        /// Archive URL.
        #[arg(long, env = "ETCD_RESTORER_ARCHIVE")]
        archive: String,
        #[command(flatten)]
        keys: KeyArgs,
        /// Print the report as one JSON document.
        #[arg(long)]
        json: bool,
        /// A head digest recorded earlier (as `verify` prints it): fail
        /// unless the archive still holds that object on its hash chain.
        #[arg(long, value_name = "HASH")]
        expect_head: Option<String>,
    },
    /// Print the live keys at the target as JSON lines, sorted by key.
    Export {
        #[command(flatten)]
        target: TargetArgs,
        /// Only keys starting with this prefix.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Every change to a key (or under a prefix) between two points, by revision.
    History {
        /// Archive URL.
        #[arg(long, env = "ETCD_RESTORER_ARCHIVE")]
        archive: String,
        #[command(flatten)]
        keys: KeyArgs,
        /// The key (with --prefix: the prefix).
        #[arg(long)]
        key: String,
        /// Every key starting with --key.
        #[arg(long)]
        prefix: bool,
        /// Changes after this point: a revision or a time (RFC 3339, now,
        /// now-10m; default: the first restorable revision of the range).
        #[arg(long)]
        from: Option<String>,
        /// Through this point: a revision or a time (default: the last
        /// restorable revision of the range).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        times: TimeArgs,
        /// Read this generation (default: the newest that holds the points).
        #[arg(long)]
        generation: Option<u64>,
        /// Print the values too.
        #[arg(long)]
        values: bool,
        /// JSON lines (schema in docs/restorer.md).
        #[arg(long)]
        json: bool,
    },
    /// Keep a destination etcd cluster identical to the archive's source,
    /// revision for revision (for migrations with a cutover of seconds).
    Follow {
        /// Archive URL.
        #[arg(long, env = "ETCD_RESTORER_ARCHIVE")]
        archive: String,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        destination: DestinationArgs,
        /// Stop once the destination holds this revision.
        #[arg(long, conflicts_with = "until_caught_up")]
        until_revision: Option<i64>,
        /// Stop once the destination holds the archive's last revision and
        /// the archive says the source is still there (it quiesced); print
        /// the cutover gap.
        #[arg(long)]
        until_caught_up: bool,
        /// Serve Prometheus metrics (and /healthz) on this address.
        #[arg(long, env = "ETCD_RESTORER_METRICS_ADDR", value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Revisions sent to the destination before the first is confirmed.
        /// More than 1 pipelines guarded transactions; etcd often proposes
        /// requests that arrive together in another order, and every one
        /// overtaken costs the window a resend (docs/benchmarks.md).
        #[arg(long, env = "ETCD_RESTORER_MAX_IN_FLIGHT", default_value_t = 1)]
        max_in_flight: usize,
        /// The destination's --max-txn-ops (a revision with more events is
        /// applied with range deletes, each checked to be exact).
        #[arg(long, env = "ETCD_RESTORER_MAX_TXN_OPS", default_value_t = 128)]
        max_txn_ops: usize,
        /// How often to look for new segments once caught up.
        #[arg(
            long,
            env = "ETCD_RESTORER_POLL_INTERVAL",
            value_name = "DURATION",
            default_value = "200ms"
        )]
        poll_interval: String,
        /// How often to log the applied revision and the lag.
        #[arg(
            long,
            env = "ETCD_RESTORER_LOG_INTERVAL",
            value_name = "DURATION",
            default_value = "10s"
        )]
        log_interval: String,
    },
    /// Keys added, changed and deleted between two points, by key.
    Diff {
        /// Archive URL.
        #[arg(long, env = "ETCD_RESTORER_ARCHIVE")]
        archive: String,
        #[command(flatten)]
        keys: KeyArgs,
        /// The earlier point: a revision or a time (RFC 3339, now, now-10m).
        #[arg(long)]
        from: String,
        /// The later point: a revision or a time.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        times: TimeArgs,
        /// Only keys starting with this prefix.
        #[arg(long)]
        prefix: Option<String>,
        /// Read this generation (default: the newest that holds the points).
        #[arg(long)]
        generation: Option<u64>,
        /// Print the values too.
        #[arg(long)]
        values: bool,
        /// JSON lines (schema in docs/restorer.md).
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Docs(DocsCommand),
}

/// Freed buffers go back to the system: peak memory stays what is live.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // follow is long-running: its progress lines are INFO. The other
    // commands log warnings, and the progress lines of their long steps
    // (shown when stderr is not a terminal; see `etcdpitr_common::progress`).
    let log_default = if matches!(cli.command, Command::Follow { .. }) {
        "info"
    } else {
        "warn,etcdpitr_common::progress=info"
    };
    let command = async {
        let mut stdout = etcdpitr_common::cli::stdout();
        match cli.command {
            Command::List {
                archive,
                keys,
                json,
                staleness,
            } => {
                let max_staleness = staleness.get()?;
                commands::list(&archive, &keys.files, json, max_staleness, &mut stdout).await
            }
            Command::Restore {
                target,
                output,
                dry_run,
                bump_revision,
                mark_compacted,
                min_lease_ttl,
                force,
                etcd_version,
                paranoid,
            } => {
                let min_lease_ttl_secs = match min_lease_ttl {
                    Some(text) => {
                        let d = duration("min-lease-ttl", &text)?;
                        i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)
                    }
                    None => 0,
                };
                let bump = Bump {
                    revisions: bump_revision,
                    mark_compacted,
                    min_lease_ttl_secs,
                };
                let options = RestoreOptions {
                    dry_run,
                    bump,
                    force,
                    etcd_version,
                    paranoid,
                };
                commands::restore(
                    &target.archive,
                    &target.keys.files,
                    &target.target()?,
                    &output,
                    &options,
                    &mut stdout,
                )
                .await
            }
            Command::Verify {
                archive,
                keys,
                json,
                expect_head,
            } => {
                commands::verify(
                    &archive,
                    &keys.files,
                    json,
                    expect_head.as_deref(),
                    &mut stdout,
                )
                .await
            }
            Command::Export { target, prefix } => {
                commands::export(
                    &target.archive,
                    &target.keys.files,
                    &target.target()?,
                    prefix.as_deref(),
                    &mut stdout,
                )
                .await
            }
            Command::History {
                archive,
                keys,
                key,
                prefix,
                from,
                to,
                times,
                generation,
                values,
                json,
            } => {
                let span = Span {
                    from,
                    to,
                    generation,
                    times: times.flags()?,
                };
                let options = HistoryOptions {
                    key,
                    prefix,
                    values,
                    json,
                };
                commands::history(&archive, &keys.files, &span, &options, &mut stdout).await
            }
            Command::Follow {
                archive,
                keys,
                destination,
                until_revision,
                until_caught_up,
                metrics_addr,
                max_in_flight,
                max_txn_ops,
                poll_interval,
                log_interval,
            } => {
                let until = match (until_revision, until_caught_up) {
                    (Some(r), _) => Until::Revision(r),
                    (None, true) => Until::CaughtUp,
                    (None, false) => Until::Forever,
                };
                let options = FollowOptions {
                    until,
                    max_in_flight,
                    max_txn_ops,
                    poll_interval: duration("poll-interval", &poll_interval)?,
                    log_interval: duration("log-interval", &log_interval)?,
                    metrics_addr,
                };
                let destination = destination.connection()?;
                commands::follow(&archive, &keys.files, &destination, &options, &mut stdout).await
            }
            Command::Diff {
                archive,
                keys,
                from,
                to,
                times,
                prefix,
                generation,
                values,
                json,
            } => {
                let span = Span {
                    from: Some(from),
                    to: Some(to),
                    generation,
                    times: times.flags()?,
                };
                let options = DiffOptions {
                    prefix,
                    values,
                    json,
                };
                commands::diff(&archive, &keys.files, &span, &options, &mut stdout).await
            }
            Command::Docs(docs) => docs.run(Cli::command(), &mut stdout),
        }
    };
    let logging = Logging {
        env: "ETCD_RESTORER_LOG",
        default_filter: log_default,
        format: cli.log_format,
    };
    etcdpitr_common::cli::run_main(logging, command, |e| etcd_restorer::classify(e) as u8)
}
