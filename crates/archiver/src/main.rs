//! `etcd-archiver`: parse flags, set up logging, call the library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use etcd_archiver::config::{InvalidConfig, Settings};
use etcdpitr_common::cli::{DocsCommand, LogFormat, Logging};
use etcdpitr_common::crypto::{self, CryptoFault};
use etcdpitr_common::errors;
use tokio_util::sync::CancellationToken;

/// Continuously archives an etcd cluster into object storage for
/// point-in-time recovery.
#[derive(Parser)]
#[command(name = "etcd-archiver", version)]
struct Cli {
    /// Log line format on stderr: text, or one JSON object per line.
    #[arg(
        long,
        global = true,
        env = "ETCD_ARCHIVER_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Archive continuously: snapshots plus a watch of the whole keyspace.
    Run(Settings),
    /// Take one full snapshot into the archive now and exit.
    Snapshot(Settings),
    /// Write a canary key, wait until the archive holds it and print the
    /// measured recovery point; exit 0 only within --max-rpo (a restore
    /// drill for a CronJob).
    Check(etcd_archiver::check::CheckArgs),
    /// Delete what a retention policy no longer needs (a dry run without --confirm).
    Prune(etcd_archiver::prune::PruneArgs),
    /// Write a new random encryption key file and print its key id.
    Keygen {
        /// The key file to create (it must not exist yet).
        #[arg(long)]
        output: PathBuf,
    },
    #[command(flatten)]
    Docs(DocsCommand),
}

/// Exit code of a failure (the table in docs/exit-codes.md): 2 for an
/// invalid configuration (including encryption keys that are missing,
/// unreadable or do not suit the archive, a bad archive URL, unusable
/// credentials files, and the store settings a [`Hint`] names: plain HTTP
/// not allowed, a missing bucket, rejected credentials, a missing
/// permission), 3 for a `check` whose canary the archive did not hold
/// within the bound, 4 for a damaged archive, 1 for anything else.
fn exit_code(error: &anyhow::Error) -> u8 {
    let chain = || error.chain();
    // `downcast_ref` also finds a type attached with `.context(…)`, which
    // the chain's items do not show as such.
    if error.downcast_ref::<InvalidConfig>().is_some()
        || errors::is_store_setting(error)
        || chain().any(|c| crypto::fault_of(c) == Some(CryptoFault::WrongKeys))
    {
        2
    } else if error
        .downcast_ref::<etcd_archiver::check::RpoExceeded>()
        .is_some()
    {
        3
    } else if chain().any(|c| {
        c.is::<etcdpitr_common::chain::IntegrityError>()
            || crypto::fault_of(c) == Some(CryptoFault::Damaged)
            || matches!(
                c.downcast_ref::<etcdpitr_common::prune::PruneError>(),
                Some(etcdpitr_common::prune::PruneError::Integrity(_))
            )
    }) {
        4
    } else {
        1
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = Logging {
        env: "ETCD_ARCHIVER_LOG",
        default_filter: "info",
        format: cli.log_format,
    };
    let command = async {
        match cli.command {
            Command::Run(settings) => {
                let config = settings.resolve().map_err(|e| e.context(InvalidConfig))?;
                let shutdown = CancellationToken::new();
                tokio::spawn(wait_for_signal(shutdown.clone()));
                Box::pin(etcd_archiver::run(config, shutdown)).await
            }
            Command::Snapshot(settings) => {
                let config = settings.resolve().map_err(|e| e.context(InvalidConfig))?;
                let revision = etcd_archiver::snapshot_once(config).await?;
                writeln!(
                    etcdpitr_common::cli::stdout(),
                    "snapshot archived at revision {revision}"
                )?;
                Ok(())
            }
            Command::Check(args) => {
                let checked = etcd_archiver::check::command(args).await?;
                writeln!(etcdpitr_common::cli::stdout(), "{checked}")?;
                Ok(())
            }
            Command::Prune(args) => etcd_archiver::prune::command(args).await,
            Command::Keygen { output } => {
                let id = etcd_archiver::config::keygen(&output)?;
                writeln!(
                    etcdpitr_common::cli::stdout(),
                    "wrote key id {id} to {}",
                    output.display()
                )?;
                Ok(())
            }
            Command::Docs(docs) => docs.run(Cli::command(), &mut etcdpitr_common::cli::stdout()),
        }
    };
    etcdpitr_common::cli::run_main(logging, command, exit_code)
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn wait_for_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested: sealing and uploading the open segment");
    shutdown.cancel();
}
