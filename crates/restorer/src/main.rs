//! `etcd-restorer`: parse flags, set up logging, call the library, map
//! errors to documented exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use etcd_restorer::commands::{self, Target};
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
    },
    /// Print the live keys at the target as JSON lines, sorted by key.
    Export {
        #[command(flatten)]
        target: TargetArgs,
        /// Only keys starting with this prefix.
        #[arg(long)]
        prefix: Option<String>,
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
            Command::Verify { archive, keys } => {
                commands::verify(&archive, &keys.files, &mut stdout).await
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
        }
    };
    etcdpitr_common::cli::run_main("ETCD_RESTORER_LOG", "warn", command, |e| {
        etcd_restorer::classify(e) as u8
    })
}
