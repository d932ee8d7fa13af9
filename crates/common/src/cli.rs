//! What both binaries do around their commands: an owner-only umask,
//! logging to stderr, a multi-threaded runtime, `error: …` plus an exit code
//! on failure, and the commands that describe a binary (shell completions,
//! man pages).
//!
//! Output streams: a reader that went away (`etcd-restorer list | head -1`,
//! a log collector that died) or a stream closed at start (`2>&-`) must
//! never stop the process; the archiver in particular keeps archiving.
//! `println!`/`eprintln!` panic when a write fails, so everything here
//! writes through [`stdout`] and [`stderr`], which count a closed or broken
//! stream (EPIPE, EBADF) as written and report every other error.

use std::ffi::OsStr;
use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tracing::level_filters::LevelFilter;

/// The umask of both binaries: everything they create (archive objects,
/// the data directory, spool, catalog, scratch and restored files) is
/// owner-only, as `etcdctl snapshot save` makes its files: etcd data holds
/// secrets. The library code also sets modes explicitly where it creates
/// files, for callers (tests, embedders) with another umask.
pub const UMASK: u32 = 0o077;

/// How log lines on stderr look (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal and
    /// `NO_COLOR` is unset or empty.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields`
    /// (with `message`), and the enclosing `span` and `spans`.
    Json,
}

/// Dependencies whose debug and trace events are transport chatter
/// (HTTP/2 frames, connection pools, gRPC channels, TLS set-up): with a bare
/// `debug` or `trace` filter they are held at `info` unless the filter
/// names them. These are the crates that logged below `info` in 6 s of
/// `etcd-archiver run` under writes, archiving to S3 (`trace`: 5,084 of
/// 5,125 lines; `debug`: 411 of 450).
pub const QUIET_DEPENDENCIES: &[&str] = &[
    "h2",
    "hyper_util",
    "tonic",
    "tower",
    "reqwest",
    "rustls",
    "rustls_platform_verifier",
];

/// The filter directives for `spec` (the log variable's value, or the
/// binary's default): `spec` itself, plus `{dependency}=info` for every
/// [`QUIET_DEPENDENCIES`] entry that `spec` does not name, when `spec`'s
/// bare level is `debug` or `trace`. A filter that names a dependency
/// (`debug,h2=trace`) keeps its own level for it; a bare level of `info` or
/// less needs no cap.
pub fn log_filter(spec: &str) -> String {
    let mut verbose = false;
    let mut named = Vec::new();
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if let Ok(level) = directive.parse::<LevelFilter>() {
            verbose = level > LevelFilter::INFO;
        } else if let Some(target) = directive.split(['[', '=']).next() {
            named.push(target.trim());
        }
    }
    let mut filter = spec.to_owned();
    if verbose {
        for dependency in QUIET_DEPENDENCIES {
            if !named.contains(dependency) {
                filter.push_str(&format!(",{dependency}=info"));
            }
        }
    }
    filter
}

/// Whether log lines get ANSI colours: only on a terminal, and not when
/// `NO_COLOR` is set to a non-empty value (<https://no-color.org>).
pub fn colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Whether `error` means the stream is gone: its reader closed it (EPIPE)
/// or it was never open (EBADF).
fn stream_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
        || rustix::io::Errno::from_io_error(error) == Some(rustix::io::Errno::BADF)
}

/// A standard stream whose writes count as done when the stream is closed
/// or broken (see [`stdout`], [`stderr`]); every other error (a full disk
/// behind a redirect) is returned.
#[derive(Debug)]
pub struct Quiet<W>(W);

impl<W: Write> Write for Quiet<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if stream_gone(&e) => Ok(buf.len()),
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.0.flush() {
            Err(e) if stream_gone(&e) => Ok(()),
            other => other,
        }
    }
}

/// Standard output (locked) for command results; a reader that went away
/// is not an error.
pub fn stdout() -> Quiet<io::StdoutLock<'static>> {
    Quiet(io::stdout().lock())
}

/// Standard error (the log's writer too); a closed or broken stderr is not
/// an error.
pub fn stderr() -> Quiet<io::Stderr> {
    Quiet(io::stderr())
}

/// Writes `line` to [`stderr`]: `eprintln!` without its panic. A note that
/// cannot be written is dropped; the command goes on.
pub fn note(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(stderr(), "{line}");
}

/// The logging set-up of a binary: the environment variable holding the
/// filter, the filter without it, and the line format.
#[derive(Clone, Copy, Debug)]
pub struct Logging<'a> {
    /// Variable holding an `EnvFilter` spec (`ETCD_ARCHIVER_LOG`).
    pub env: &'a str,
    /// Filter when the variable is unset (`info`).
    pub default_filter: &'a str,
    /// `--log-format`.
    pub format: LogFormat,
}

impl Logging<'_> {
    /// Installs the global subscriber: filter from [`log_filter`], lines
    /// in `format` to [`stderr`], colours per [`colour`]. An invalid
    /// filter in the variable is reported and replaced by the default.
    fn init(self) {
        let spec = match std::env::var(self.env) {
            Ok(spec) if tracing_subscriber::EnvFilter::try_new(&spec).is_ok() => spec,
            Ok(spec) => {
                let _ = writeln!(
                    stderr(),
                    "warning: {}={spec:?} is not a valid log filter; using {:?}",
                    self.env,
                    self.default_filter
                );
                self.default_filter.to_owned()
            }
            Err(std::env::VarError::NotPresent) => self.default_filter.to_owned(),
            Err(std::env::VarError::NotUnicode(_)) => {
                let _ = writeln!(
                    stderr(),
                    "warning: {} is not UTF-8; using {:?}",
                    self.env,
                    self.default_filter
                );
                self.default_filter.to_owned()
            }
        };
        let filter = tracing_subscriber::EnvFilter::try_new(log_filter(&spec))
            .expect("a valid spec plus target=info directives is valid");
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(stderr)
            // Its own report of a failed write would go to stderr too.
            .log_internal_errors(false);
        match self.format {
            LogFormat::Text => builder
                .with_ansi(colour(
                    io::stderr().is_terminal(),
                    std::env::var_os("NO_COLOR").as_deref(),
                ))
                .init(),
            LogFormat::Json => builder.json().with_ansi(false).init(),
        }
    }
}

/// Sets the process umask to [`UMASK`], sets up `logging`, runs `command`
/// on a multi-threaded runtime and maps an error to `exit_code(&error)`
/// after printing it to [`stderr`]: `error: ` and the error on one line
/// ([`crate::errors::one_line`]), then `hint: …` on a second line when the
/// error shows a common mistake ([`crate::errors::hint`]).
pub fn run_main<F>(
    logging: Logging<'_>,
    command: F,
    exit_code: impl Fn(&anyhow::Error) -> u8,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(UMASK));
    logging.init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            note(format_args!("error: start runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            note(format_args!("error: {}", crate::errors::one_line(&e)));
            if let Some(hint) = crate::errors::hint(&e) {
                note(format_args!("hint: {hint}"));
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The commands that describe a binary instead of running it; each binary
/// flattens these into its own subcommands.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum DocsCommand {
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// Write man pages: one for the binary and one per subcommand
    /// (`NAME.1`, `NAME-SUBCOMMAND.1`).
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out_dir: PathBuf,
    },
}

impl DocsCommand {
    /// Carries the command out for the binary that `cli` describes (its
    /// `CommandFactory::command()`), writing the script, or the paths of
    /// the pages written, to `out`.
    ///
    /// # Errors
    /// A page that cannot be written, or a failed write to `out` other
    /// than a closed stream.
    pub fn run(self, cli: clap::Command, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Self::Completions { shell } => {
                let mut cli = cli;
                let name = cli.get_name().to_owned();
                cli.set_bin_name(name);
                cli.build();
                clap_complete::Generator::try_generate(&shell, &cli, out)
                    .context("write the completion script")
            }
            Self::Man { out_dir } => {
                std::fs::create_dir_all(&out_dir)
                    .with_context(|| format!("create {}", out_dir.display()))?;
                for page in man_pages(cli, &out_dir)? {
                    writeln!(out, "wrote {}", page.display())?;
                }
                Ok(())
            }
        }
    }
}

/// Writes the man page of `cli` and of each of its visible subcommands
/// (recursively) into `dir`, world-readable (they are documentation, not
/// archive data: the owner-only [`UMASK`] does not suit them). Returns the
/// paths written.
fn man_pages(cli: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn write(
        cli: clap::Command,
        source: &str,
        dir: &Path,
        written: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), source, dir, written)?;
        }
        let man = clap_mangen::Man::new(cli).source(source);
        let path = dir.join(man.get_filename());
        let mut page = Vec::new();
        man.render(&mut page)?;
        std::fs::write(&path, page).with_context(|| format!("write {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("make {} readable", path.display()))?;
        written.push(path);
        Ok(())
    }
    // `help` is clap's own; its page would only repeat the others.
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    // Every page names the binary's release (a subcommand has no version).
    let source = format!(
        "{} {}",
        cli.get_name(),
        cli.get_version().unwrap_or_default()
    );
    let mut written = Vec::new();
    write(cli, &source, dir, &mut written)?;
    written.reverse();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_verbose_levels_quiet_every_dependency() {
        for spec in ["debug", "trace", "TRACE", " debug "] {
            let filter = log_filter(spec);
            for dependency in QUIET_DEPENDENCIES {
                assert!(
                    filter.contains(&format!(",{dependency}=info")),
                    "{spec}: {filter}"
                );
            }
            assert!(tracing_subscriber::EnvFilter::try_new(&filter).is_ok());
        }
    }

    #[test]
    fn quiet_levels_are_left_alone() {
        // Adding `h2=info` to `warn` would make h2 louder, not quieter.
        for spec in [
            "info",
            "warn",
            "error",
            "off",
            "info,etcd_archiver=debug",
            "etcd_archiver=trace",
        ] {
            assert_eq!(log_filter(spec), spec);
        }
    }

    #[test]
    fn a_named_dependency_keeps_its_level() {
        let filter = log_filter("debug,h2=trace,tonic[{x}]=debug");
        assert!(!filter.contains("h2=info"), "{filter}");
        assert!(!filter.contains("tonic=info"), "{filter}");
        assert!(filter.starts_with("debug,h2=trace,tonic[{x}]=debug,"));
        assert!(filter.contains(",hyper_util=info"), "{filter}");
        // A more specific directive wins inside EnvFilter by itself.
        assert!(log_filter("debug,h2::codec=trace").contains(",h2=info"));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }

    /// A writer failing with a chosen error.
    struct Failing(fn() -> io::Error);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err((self.0)())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err((self.0)())
        }
    }

    #[test]
    fn closed_streams_count_as_written_other_errors_do_not() {
        for gone in [
            (|| io::Error::from(io::ErrorKind::BrokenPipe)) as fn() -> io::Error,
            || rustix::io::Errno::PIPE.into(),
            || rustix::io::Errno::BADF.into(),
        ] {
            let mut w = Quiet(Failing(gone));
            assert!(writeln!(w, "lost").is_ok());
            assert!(w.flush().is_ok());
        }
        let mut w = Quiet(Failing(|| rustix::io::Errno::NOSPC.into()));
        assert!(writeln!(w, "kept").is_err());
        assert!(w.flush().is_err());
    }

    #[derive(clap::Parser)]
    #[command(name = "demo")]
    struct Demo {
        #[command(subcommand)]
        command: DemoCommand,
    }

    #[derive(clap::Subcommand)]
    enum DemoCommand {
        /// Do a thing.
        Thing,
        #[command(flatten)]
        Docs(DocsCommand),
    }

    #[test]
    fn man_pages_for_the_binary_and_each_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let out_dir = dir.path().join("man");
        let mut out = Vec::new();
        DocsCommand::Man {
            out_dir: out_dir.clone(),
        }
        .run(<Demo as clap::CommandFactory>::command(), &mut out)
        .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["demo-completions.1", "demo-man.1", "demo-thing.1", "demo.1"]
        );
        let listed = String::from_utf8(out).unwrap();
        assert!(listed.starts_with(&format!("wrote {}", out_dir.join("demo.1").display())));
        let thing = std::fs::read_to_string(out_dir.join("demo-thing.1")).unwrap();
        // After roff's two-line apostrophe preamble (`.ie`/`.el`), the title.
        let title = thing
            .lines()
            .find(|l| !l.starts_with(".ie") && !l.starts_with(".el"));
        assert!(title.unwrap().starts_with(".TH demo-thing 1"), "{thing}");
        let mode = std::fs::metadata(out_dir.join("demo.1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn completions_name_every_subcommand() {
        let mut out = Vec::new();
        DocsCommand::Completions {
            shell: clap_complete::Shell::Bash,
        }
        .run(<Demo as clap::CommandFactory>::command(), &mut out)
        .unwrap();
        let script = String::from_utf8(out).unwrap();
        for sub in ["thing", "completions", "man"] {
            assert!(script.contains(sub), "{script}");
        }
    }
}
