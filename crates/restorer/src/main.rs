//! `etcd-restorer`: parse flags, set up logging, call the library, map
//! errors to documented exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use etcd_restorer::commands::{self, DiffOptions, HistoryOptions, Span, Target};
use etcd_restorer::synth::Bump;

/// Restores etcd to any archived revision or moment.
#[derive(Parser)]
#[command(name = "etcd-restorer", version)]
struct Cli {
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

#[derive(Args)]
struct TargetArgs {
    /// Archive URL: file:///abs/dir, s3://bucket/prefix, gs://…, az://…
    #[arg(long, env = "ETCD_RESTORER_ARCHIVE")]
    archive: String,
    #[command(flatten)]
    keys: KeyArgs,
    /// Target revision.
    #[arg(long, conflicts_with = "time", required_unless_present = "time")]
    revision: Option<i64>,
    /// Target moment (RFC 3339): the last revision observed at or before it.
    #[arg(long)]
    time: Option<String>,
    /// Restore from this generation (default: the newest that holds the target).
    #[arg(long)]
    generation: Option<u64>,
}

impl TargetArgs {
    fn target(&self) -> Target {
        Target {
            revision: self.revision,
            time: self.time.clone(),
            generation: self.generation,
        }
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
        /// Overwrite an existing output file.
        #[arg(long)]
        force: bool,
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
        /// Changes after this point: a revision or an RFC 3339 time
        /// (default: the first restorable revision of the range).
        #[arg(long)]
        from: Option<String>,
        /// Through this point: a revision or an RFC 3339 time (default: the
        /// last restorable revision of the range).
        #[arg(long)]
        to: Option<String>,
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
    /// Keys added, changed and deleted between two points, by key.
    Diff {
        /// Archive URL.
        #[arg(long, env = "ETCD_RESTORER_ARCHIVE")]
        archive: String,
        #[command(flatten)]
        keys: KeyArgs,
        /// The earlier point: a revision or an RFC 3339 time.
        #[arg(long)]
        from: String,
        /// The later point: a revision or an RFC 3339 time.
        #[arg(long)]
        to: String,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = async {
        let mut stdout = std::io::stdout().lock();
        match cli.command {
            Command::List {
                archive,
                keys,
                json,
            } => commands::list(&archive, &keys.files, json, &mut stdout).await,
            Command::Restore {
                target,
                output,
                dry_run,
                bump_revision,
                mark_compacted,
                force,
            } => {
                let bump = Bump {
                    revisions: bump_revision,
                    mark_compacted,
                };
                commands::restore(
                    &target.archive,
                    &target.keys.files,
                    &target.target(),
                    &output,
                    dry_run,
                    bump,
                    force,
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
                    &target.target(),
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
                generation,
                values,
                json,
            } => {
                let span = Span {
                    from,
                    to,
                    generation,
                };
                let options = HistoryOptions {
                    key,
                    prefix,
                    values,
                    json,
                };
                commands::history(&archive, &keys.files, &span, &options, &mut stdout).await
            }
            Command::Diff {
                archive,
                keys,
                from,
                to,
                prefix,
                generation,
                values,
                json,
            } => {
                let span = Span {
                    from: Some(from),
                    to: Some(to),
                    generation,
                };
                let options = DiffOptions {
                    prefix,
                    values,
                    json,
                };
                commands::diff(&archive, &keys.files, &span, &options, &mut stdout).await
            }
        }
    };
    etcdpitr_common::cli::run_main("ETCD_RESTORER_LOG", "warn", command, |e| {
        etcd_restorer::classify(e) as u8
    })
}
