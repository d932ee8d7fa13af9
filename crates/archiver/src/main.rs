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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ETCD_ARCHIVER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(settings) => {
                let config = settings.resolve()?;
                let shutdown = CancellationToken::new();
                tokio::spawn(wait_for_signal(shutdown.clone()));
                etcd_archiver::run(config, shutdown).await
            }
            Command::Snapshot(settings) => {
                let config = settings.resolve()?;
                let revision = etcd_archiver::snapshot_once(config).await?;
                println!("snapshot archived at revision {revision}");
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
