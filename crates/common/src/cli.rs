//! What both binaries do around their commands: an owner-only umask,
//! logging to stderr, a multi-threaded runtime, and `error: …` plus an exit
//! code on failure.

use std::future::Future;
use std::process::ExitCode;

/// The umask of both binaries: everything they create (archive objects,
/// the data directory, spool, catalog, scratch and restored files) is
/// owner-only, as `etcdctl snapshot save` makes its files: etcd data holds
/// secrets. The library code also sets modes explicitly where it creates
/// files, for callers (tests, embedders) with another umask.
pub const UMASK: u32 = 0o077;

/// Sets the process umask to [`UMASK`], sets up logging (filter from
/// `log_env`, else `default_filter`), runs `command` on a multi-threaded
/// runtime and maps an error to `exit_code(&error)` after printing its whole
/// chain.
pub fn run_main<F>(
    log_env: &str,
    default_filter: &str,
    command: F,
    exit_code: impl Fn(&anyhow::Error) -> u8,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(UMASK));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(log_env)
                .unwrap_or_else(|_| default_filter.into()),
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
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
