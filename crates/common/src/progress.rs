//! Progress of long operations (downloads, uploads, synthesis, checks,
//! prunes): one [`Progress`] handle per step, shown one of two ways.
//!
//! - **A bar** (indicatif, on stderr) when stderr is a terminal and log
//!   lines are text: a bar with a rate and an ETA when the step's total is
//!   known, a spinner with the count and rate otherwise.
//! - **Plain lines** otherwise (stderr redirected or closed, `--log-format
//!   json`, a daemon): an INFO event of this module every
//!   [`LINE_INTERVAL`] (step, done, total, percent, rate over the interval)
//!   and one when the step finishes (total and average rate). They go
//!   through the log like every other line, so JSON logs get JSON objects
//!   and never a bar's escape codes or carriage returns. Their target is
//!   `etcdpitr_common::progress` (to filter them on their own).
//!
//! A step dropped without [`Progress::finish`] (it failed) stops its lines
//! and leaves its bar where it stopped. Drawing never fails a step:
//! indicatif ignores write errors and draws nothing when stderr is not a
//! terminal, and the log writes through [`crate::cli::stderr`].

use std::io::{self, IsTerminal, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::Dispatch;

/// How often plain lines report a running step.
pub const LINE_INTERVAL: Duration = Duration::from_secs(10);

/// How often a bar is redrawn while nothing advances (its spinner, ETA and
/// elapsed time stay live during a stall).
const BAR_TICK: Duration = Duration::from_millis(200);

/// `total` of a step whose total is not known.
const UNKNOWN: u64 = u64::MAX;

/// What a step counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Bytes, shown as KiB, MiB, GiB.
    Bytes,
    /// Things, named in the plural (`"revisions"`, `"objects"`).
    Items(&'static str),
}

/// Where a step's progress goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A bar when stderr is a terminal and log lines are text; plain lines
    /// otherwise. For commands a person runs.
    Auto,
    /// Plain lines only, whatever stderr is. For daemons, whose stderr is a
    /// log even when started on a terminal.
    Lines,
    /// Nothing (a step inside another that shows progress, or a command
    /// that must stay quiet).
    Hidden,
}

/// Progress of one step. Cheap to clone (clones share the count) and
/// usable from any thread.
#[derive(Clone)]
pub struct Progress(Option<Arc<Inner>>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(inner) => f
                .debug_struct("Progress")
                .field("step", &inner.shared.step)
                .field("done", &inner.shared.done.load(Ordering::Relaxed))
                .finish_non_exhaustive(),
            None => f.write_str("Progress(hidden)"),
        }
    }
}

/// What the plain-line ticker reads.
struct Shared {
    step: String,
    unit: Unit,
    done: AtomicU64,
    total: AtomicU64,
    started: Instant,
    /// The log the step was started under (the ticker thread logs to it).
    dispatch: Dispatch,
}

struct Inner {
    shared: Arc<Shared>,
    bar: Option<ProgressBar>,
    ticker: Mutex<Option<Ticker>>,
    finished: AtomicBool,
}

/// The thread writing plain lines; it stops when `stop` is dropped.
struct Ticker {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Ticker {
    fn stop(self) {
        drop(self.stop);
        // A panicking formatter is the only way it fails; the step goes on.
        let _ = self.thread.join();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(ticker) = self
            .ticker
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            ticker.stop();
        }
    }
}

impl Progress {
    /// Starts step `step` counting `unit`s, `total` of them if known.
    pub fn new(mode: Mode, step: impl Into<String>, unit: Unit, total: Option<u64>) -> Self {
        Self::with_interval(mode, step.into(), unit, total, LINE_INTERVAL)
    }

    /// A step that shows nothing.
    pub fn hidden() -> Self {
        Self(None)
    }

    fn with_interval(
        mode: Mode,
        step: String,
        unit: Unit,
        total: Option<u64>,
        interval: Duration,
    ) -> Self {
        let bar = match mode {
            Mode::Hidden => return Self::hidden(),
            Mode::Auto if draws_bars() => true,
            // Lines nobody would see are not worth a thread.
            Mode::Auto | Mode::Lines if !tracing::enabled!(tracing::Level::INFO) => {
                return Self::hidden()
            }
            Mode::Auto | Mode::Lines => false,
        };
        let shared = Arc::new(Shared {
            step,
            unit,
            done: AtomicU64::new(0),
            total: AtomicU64::new(total.unwrap_or(UNKNOWN)),
            started: Instant::now(),
            dispatch: tracing::dispatcher::get_default(Dispatch::clone),
        });
        let (bar, ticker) = if bar {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            bar.set_style(style(unit, total.is_some()));
            bar.set_prefix(shared.step.clone());
            bar.enable_steady_tick(BAR_TICK);
            (Some(bar), None)
        } else {
            (None, Some(start_ticker(shared.clone(), interval)))
        };
        Self(Some(Arc::new(Inner {
            shared,
            bar,
            ticker: Mutex::new(ticker),
            finished: AtomicBool::new(false),
        })))
    }

    /// Counts `n` more units done.
    pub fn inc(&self, n: u64) {
        if let Some(inner) = &self.0 {
            inner.shared.done.fetch_add(n, Ordering::Relaxed);
            if let Some(bar) = &inner.bar {
                bar.inc(n);
            }
        }
    }

    /// Sets the count of units done (for a step that learns its position,
    /// such as a file's length).
    pub fn set_done(&self, done: u64) {
        if let Some(inner) = &self.0 {
            inner.shared.done.store(done, Ordering::Relaxed);
            if let Some(bar) = &inner.bar {
                bar.set_position(done);
            }
        }
    }

    /// Sets the total, once learnt (a spinner becomes a bar).
    pub fn set_total(&self, total: u64) {
        if let Some(inner) = &self.0 {
            let before = inner.shared.total.swap(total, Ordering::Relaxed);
            if let Some(bar) = &inner.bar {
                if before == UNKNOWN {
                    bar.set_style(style(inner.shared.unit, true));
                }
                bar.set_length(total);
            }
        }
    }

    /// Wraps `inner` (a reader or writer, blocking or async) so that the
    /// bytes passing through count as done.
    pub fn counting<T>(&self, inner: T) -> Counting<T> {
        Counting {
            inner,
            progress: self.clone(),
        }
    }

    /// Ends the step: clears its bar, or stops its lines, and logs one line
    /// with what it did, how long it took and its average rate. Later calls
    /// (and those of its clones) do nothing.
    pub fn finish(&self) {
        let Some(inner) = &self.0 else { return };
        if inner.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(ticker) = inner
            .ticker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            ticker.stop();
        }
        if let Some(bar) = &inner.bar {
            bar.finish_and_clear();
        }
        inner.shared.log_finished();
    }
}

/// A reader or writer whose bytes count as a step's progress
/// ([`Progress::counting`]).
#[derive(Debug)]
pub struct Counting<T> {
    inner: T,
    progress: Progress,
}

impl<T> Counting<T> {
    /// The wrapped reader or writer.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.inc(n as u64);
        Ok(n)
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.inc(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counting<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.progress.inc(n as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether [`Mode::Auto`] draws a bar: stderr is a terminal and the log's
/// lines are text (a bar between JSON lines would break them).
fn draws_bars() -> bool {
    io::stderr().is_terminal() && !json_logs()
}

/// Whether the log in effect writes JSON lines (`--log-format json`): its
/// `fmt` layer formats fields with [`JsonFields`], which the subscriber
/// hands out on request.
///
/// [`JsonFields`]: tracing_subscriber::fmt::format::JsonFields
fn json_logs() -> bool {
    tracing::dispatcher::get_default(Dispatch::is::<tracing_subscriber::fmt::format::JsonFields>)
}

/// The bar (with a total) or spinner (without) for `unit`.
fn style(unit: Unit, has_total: bool) -> ProgressStyle {
    let template = match (unit, has_total) {
        (Unit::Bytes, true) => {
            "{prefix} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}".to_owned()
        }
        (Unit::Bytes, false) => "{spinner} {prefix} {bytes} {bytes_per_sec} {elapsed}".to_owned(),
        (Unit::Items(name), true) => {
            format!("{{prefix}} [{{wide_bar}}] {{human_pos}}/{{human_len}} {name} {{per_sec:0}} eta {{eta}}")
        }
        (Unit::Items(name), false) => {
            format!("{{spinner}} {{prefix}} {{human_pos}} {name} {{per_sec:0}} {{elapsed}}")
        }
    };
    ProgressStyle::with_template(&template)
        .expect("the templates are valid")
        .progress_chars("=> ")
}

/// Runs a thread that logs `shared`'s state every `interval` until its
/// sender is dropped.
fn start_ticker(shared: Arc<Shared>, interval: Duration) -> Ticker {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let (mut then, mut done_then) = (shared.started, 0);
        while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
            let now = Instant::now();
            let done = shared.done.load(Ordering::Relaxed);
            let per_sec = rate(done.saturating_sub(done_then), now - then);
            shared.log_running(done, per_sec);
            (then, done_then) = (now, done);
        }
    });
    Ticker { stop, thread }
}

impl Shared {
    fn total(&self) -> Option<u64> {
        Some(self.total.load(Ordering::Relaxed)).filter(|&t| t != UNKNOWN)
    }

    /// A line while the step runs: `per_sec` over the last interval.
    fn log_running(&self, done: u64, per_sec: f64) {
        let total = self.total();
        let line = running_line(&self.step, self.unit, done, total, per_sec);
        tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info!(
                step = %self.step,
                unit = unit_name(self.unit),
                done,
                total,
                percent = total.map(|t| percent(done, t)),
                per_sec = per_sec.round() as u64,
                "{line}"
            );
        });
    }

    /// The line of a finished step: its average rate.
    fn log_finished(&self) {
        let done = self.done.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        let per_sec = rate(done, elapsed);
        let line = finished_line(&self.step, self.unit, done, elapsed, per_sec);
        tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::info!(
                step = %self.step,
                unit = unit_name(self.unit),
                done,
                seconds = elapsed.as_secs_f64(),
                per_sec = per_sec.round() as u64,
                "{line}"
            );
        });
    }
}

fn unit_name(unit: Unit) -> &'static str {
    match unit {
        Unit::Bytes => "bytes",
        Unit::Items(name) => name,
    }
}

/// `n` per second over `elapsed` (0 for no time).
fn rate(n: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Whole percent of `total` done (100 for an empty total).
fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        100
    } else {
        (u128::from(done) * 100 / u128::from(total)) as u64
    }
}

/// `n` in `unit`: `1.50 MiB`, `1,200 revisions`.
fn amount(unit: Unit, n: u64) -> String {
    match unit {
        Unit::Bytes => HumanBytes(n).to_string(),
        Unit::Items(name) => format!("{} {name}", HumanCount(n)),
    }
}

/// A rate in `unit`: `12.00 MiB/s`, `3,000 revisions/s`.
fn per_second(unit: Unit, per_sec: f64) -> String {
    format!("{}/s", amount(unit, per_sec.round() as u64))
}

/// `step: 1.00 MiB of 4.00 MiB (25%), 512.00 KiB/s`, or without a total
/// `step: 1.00 MiB, 512.00 KiB/s`.
fn running_line(step: &str, unit: Unit, done: u64, total: Option<u64>, per_sec: f64) -> String {
    let rate = per_second(unit, per_sec);
    match total {
        Some(total) => {
            let total_text = match unit {
                Unit::Bytes => HumanBytes(total).to_string(),
                Unit::Items(_) => amount(unit, total),
            };
            let done_text = match unit {
                Unit::Bytes => HumanBytes(done).to_string(),
                Unit::Items(_) => HumanCount(done).to_string(),
            };
            format!(
                "{step}: {done_text} of {total_text} ({}%), {rate}",
                percent(done, total)
            )
        }
        None => format!("{step}: {}, {rate}", amount(unit, done)),
    }
}

/// `step: done, 4.00 MiB in 2.0 s (2.00 MiB/s)`.
fn finished_line(step: &str, unit: Unit, done: u64, elapsed: Duration, per_sec: f64) -> String {
    format!(
        "{step}: done, {} in {:.1} s ({})",
        amount(unit, done),
        elapsed.as_secs_f64(),
        per_second(unit, per_sec)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const REVISIONS: Unit = Unit::Items("revisions");

    #[test]
    fn lines_say_step_done_total_percent_and_rate() {
        assert_eq!(
            running_line("replay", REVISIONS, 1200, Some(5000), 299.6),
            "replay: 1,200 of 5,000 revisions (24%), 300 revisions/s"
        );
        assert_eq!(
            running_line("download x", Unit::Bytes, 1 << 20, Some(4 << 20), 524_288.0),
            "download x: 1.00 MiB of 4.00 MiB (25%), 512.00 KiB/s"
        );
        assert_eq!(
            running_line("download x", Unit::Bytes, 3 << 30, None, 0.0),
            "download x: 3.00 GiB, 0 B/s"
        );
        assert_eq!(
            finished_line(
                "verify",
                Unit::Items("objects"),
                42,
                Duration::from_millis(2_049),
                20.5
            ),
            "verify: done, 42 objects in 2.0 s (21 objects/s)"
        );
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(u64::MAX - 1, u64::MAX - 1), 100);
        assert!(rate(10, Duration::ZERO).abs() < f64::EPSILON);
    }

    /// A log writing into a buffer, as the binaries' (text or JSON).
    fn capture(json: bool) -> (Dispatch, Arc<Mutex<Vec<u8>>>) {
        #[derive(Clone)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Buffer(buffer.clone());
        let builder = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_writer(move || writer.clone())
            .with_ansi(false);
        let dispatch = if json {
            Dispatch::new(builder.json().finish())
        } else {
            Dispatch::new(builder.finish())
        };
        (dispatch, buffer)
    }

    fn text(buffer: &Mutex<Vec<u8>>) -> String {
        String::from_utf8(buffer.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn plain_lines_every_interval_and_one_at_the_end() {
        let (dispatch, buffer) = capture(false);
        tracing::dispatcher::with_default(&dispatch, || {
            assert!(!json_logs());
            let p = Progress::with_interval(
                Mode::Lines,
                "replay".into(),
                REVISIONS,
                Some(10),
                Duration::from_millis(100),
            );
            p.inc(3);
            std::thread::sleep(Duration::from_millis(250));
            p.inc(7);
            p.finish();
            p.finish();
        });
        let log = text(&buffer);
        let lines: Vec<&str> = log.lines().collect();
        assert!(lines.len() >= 3, "{log}");
        // About 30 revisions/s: 3 in the first interval.
        assert!(
            lines[0].contains("replay: 3 of 10 revisions (30%), "),
            "{log}"
        );
        let last = lines.last().unwrap();
        assert!(last.contains(" INFO "), "{log}");
        assert!(last.contains("replay: done, 10 revisions in 0."), "{log}");
        assert_eq!(log.matches(": done,").count(), 1, "{log}");
        assert!(!log.contains('\r') && !log.contains('\x1b'), "{log:?}");
        // After the end, no more lines.
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(text(&buffer), log);
    }

    #[test]
    fn json_logs_get_json_lines_with_fields_never_a_bar() {
        let (dispatch, buffer) = capture(true);
        tracing::dispatcher::with_default(&dispatch, || {
            assert!(json_logs());
            assert!(!draws_bars());
            // Auto under a JSON log: lines, even on a terminal.
            let p = Progress::with_interval(
                Mode::Auto,
                "upload x".into(),
                Unit::Bytes,
                None,
                Duration::from_millis(50),
            );
            assert!(p.0.as_ref().unwrap().bar.is_none());
            p.inc(2048);
            std::thread::sleep(Duration::from_millis(120));
            p.set_total(4096);
            p.inc(2048);
            p.finish();
        });
        let log = text(&buffer);
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(lines.len() >= 2, "{log}");
        let first = &lines[0]["fields"];
        assert_eq!(first["step"], "upload x");
        assert_eq!(first["unit"], "bytes");
        assert_eq!(first["done"], 2048);
        assert!(first.get("total").is_none(), "{log}");
        assert!(
            first["message"]
                .as_str()
                .unwrap()
                .starts_with("upload x: 2.00 KiB, "),
            "{log}"
        );
        let last = &lines.last().unwrap()["fields"];
        assert_eq!(last["done"], 4096);
        assert_eq!(lines.last().unwrap()["target"], "etcdpitr_common::progress");
        assert!(last["message"]
            .as_str()
            .unwrap()
            .starts_with("upload x: done, 4.00 KiB in "));
        assert!(!log.contains('\r') && !log.contains('\x1b'), "{log:?}");
    }

    #[test]
    fn a_failed_step_stops_without_an_end_line_and_hidden_says_nothing() {
        let (dispatch, buffer) = capture(false);
        tracing::dispatcher::with_default(&dispatch, || {
            let p = Progress::with_interval(
                Mode::Lines,
                "copy".into(),
                Unit::Bytes,
                None,
                Duration::from_millis(20),
            );
            let mut counted = p.counting(Vec::new());
            counted.write_all(b"12345").unwrap();
            assert_eq!(counted.into_inner(), b"12345");
            drop(p);
            let hidden = Progress::new(Mode::Hidden, "quiet", Unit::Bytes, None);
            hidden.inc(1);
            hidden.finish();
        });
        std::thread::sleep(Duration::from_millis(60));
        let log = text(&buffer);
        assert!(!log.contains("done"), "{log}");
        assert!(!log.contains("quiet"), "{log}");
    }

    #[test]
    fn lines_below_the_log_level_cost_nothing() {
        let dispatch = Dispatch::new(
            tracing_subscriber::fmt()
                .with_env_filter("warn")
                .with_writer(io::sink)
                .finish(),
        );
        tracing::dispatcher::with_default(&dispatch, || {
            let p = Progress::new(Mode::Lines, "x", Unit::Bytes, None);
            assert!(p.0.is_none());
        });
    }
}
