//! `etcd-archiver`: parse flags, set up logging, call the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use etcd_archiver::config::Settings;
use tokio_util::sync::CancellationToken;

/// Continuously archives an etcd cluster into object storage for
/// point-in-time recovery.
#[derive(Parser)]
#[command(name = "etcd-archiver", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Archive continuously: snapshots plus a watch of the whole keyspace.
    Run(Settings),
    /// Take one full snapshot into the archive now and exit.
    Snapshot(Settings),
    /// Delete what a retention policy no longer needs (a dry run without --confirm).
    Prune(etcd_archiver::prune::PruneArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = async {
        match cli.command {
            Command::Run(settings) => {
                let config = settings.resolve()?;
                let shutdown = CancellationToken::new();
                tokio::spawn(wait_for_signal(shutdown.clone()));
                Box::pin(etcd_archiver::run(config, shutdown)).await
            }
            Command::Snapshot(settings) => {
                let config = settings.resolve()?;
                let revision = etcd_archiver::snapshot_once(config).await?;
                println!("snapshot archived at revision {revision}");
                Ok(())
            }
            Command::Prune(args) => etcd_archiver::prune::command(args).await,
        }
    };
    etcdpitr_common::cli::run_main("ETCD_ARCHIVER_LOG", "info", command, exit_code)
}

/// 4 for a damaged archive, 1 for anything else.
fn exit_code(error: &anyhow::Error) -> u8 {
    let damaged = error.chain().any(|c| {
        c.downcast_ref::<etcdpitr_common::chain::IntegrityError>()
            .is_some()
            || matches!(
                c.downcast_ref::<etcdpitr_common::prune::PruneError>(),
                Some(etcdpitr_common::prune::PruneError::Integrity(_))
            )
    });
    if damaged {
        4
    } else {
        1
    }
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
