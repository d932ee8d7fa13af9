//! A Prometheus endpoint: gauges and counters kept in atomics, served as
//! text exposition format on `/metrics` by a small HTTP/1.1 listener, with
//! `/healthz` and `/readyz` answered by checks the process registers.
//!
//! - `/metrics`: every registered metric, after the [`Registry::on_render`]
//!   hook refreshed the values that are computed at scrape time (a lag
//!   measured against "now").
//! - `/healthz`: `200 ok` unless the [`Registry::health_check`] reports a
//!   reason, which is answered as `503` with that reason as the body.
//! - `/readyz`: the same with [`Registry::readiness_check`]; `404` when the
//!   process registered none (it has no notion of readiness).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Gauge or counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A total that only grows.
    Counter,
}

/// One metric: a name, its help text and an `f64` value.
#[derive(Debug)]
pub struct Metric {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    bits: AtomicU64,
}

impl Metric {
    /// Sets the value.
    pub fn set(&self, v: f64) {
        self.bits.store(v.to_bits(), Ordering::Relaxed);
    }

    /// Adds to the value.
    pub fn add(&self, v: f64) {
        let _ = self
            .bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + v).to_bits())
            });
    }

    /// The value.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

/// A check answered by `/healthz` or `/readyz`: `Err(reason)` is a `503`
/// whose body is the reason (one line).
pub type Check = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The metrics a process exposes, and its health and readiness checks.
#[derive(Default)]
pub struct Registry {
    metrics: Vec<Arc<Metric>>,
    refresh: Option<Box<dyn Fn() + Send + Sync>>,
    health: Option<Check>,
    readiness: Option<Check>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("metrics", &self.metrics)
            .field("health_check", &self.health.is_some())
            .field("readiness_check", &self.readiness.is_some())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Registers a metric (value 0).
    pub fn register(&mut self, name: &'static str, help: &'static str, kind: Kind) -> Arc<Metric> {
        let m = Arc::new(Metric {
            name,
            help,
            kind,
            bits: AtomicU64::new(0f64.to_bits()),
        });
        self.metrics.push(m.clone());
        m
    }

    /// Runs `refresh` before every rendering, to set the values computed
    /// at scrape time.
    pub fn on_render(&mut self, refresh: impl Fn() + Send + Sync + 'static) {
        self.refresh = Some(Box::new(refresh));
    }

    /// Answers `/healthz` with `check` (without one: always `200 ok`).
    pub fn health_check(&mut self, check: impl Fn() -> Result<(), String> + Send + Sync + 'static) {
        self.health = Some(Box::new(check));
    }

    /// Answers `/readyz` with `check` (without one: `404`).
    pub fn readiness_check(
        &mut self,
        check: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.readiness = Some(Box::new(check));
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        if let Some(refresh) = &self.refresh {
            refresh();
        }
        let mut out = String::new();
        for m in &self.metrics {
            let kind = match m.kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
            };
            let _ = writeln!(out, "# HELP {} {}", m.name, m.help);
            let _ = writeln!(out, "# TYPE {} {kind}", m.name);
            let _ = writeln!(out, "{} {}", m.name, m.get());
        }
        out
    }
}

/// Listens on `addr` and serves `registry` until the process ends.
///
/// # Errors
/// The address cannot be bound (named in the message).
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr: cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), answer(conn, &registry)).await;
            });
        }
    });
    Ok(bound)
}

/// Answers one request and closes the connection.
async fn answer(mut conn: tokio::net::TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            registry.render(),
        ),
        (b"GET", b"/healthz") => checked(registry.health.as_ref()),
        (b"GET", b"/readyz") => match &registry.readiness {
            Some(check) => checked(Some(check)),
            None => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        },
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// The answer of a health or readiness check: `200 ok`, or `503` with the
/// reason on one line.
fn checked(check: Option<&Check>) -> (&'static str, &'static str, String) {
    match check.map_or(Ok(()), |c| c()) {
        Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
        Err(reason) => (
            "503 Service Unavailable",
            "text/plain",
            format!("{}\n", reason.replace(['\r', '\n'], " ")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole HTTP answer to `GET path`.
    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let mut registry = Registry::default();
        let applied = registry.register("test_applied_revision", "Applied.", Kind::Gauge);
        let total = registry.register("test_applied_total", "Total.", Kind::Counter);
        applied.set(42.0);
        total.add(3.0);
        total.add(2.0);
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(registry))
            .await
            .unwrap();
        let get = |path| get(addr, path);
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        assert!(metrics.contains("# TYPE test_applied_revision gauge\ntest_applied_revision 42\n"));
        assert!(metrics.contains("# TYPE test_applied_total counter\ntest_applied_total 5\n"));
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200 OK"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 404"), "no check");
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    }

    #[tokio::test]
    async fn checks_answer_health_and_readiness_and_refresh_runs_per_scrape() {
        use std::sync::atomic::AtomicBool;
        let mut registry = Registry::default();
        let scraped = registry.register("test_scrapes_total", "Scrapes.", Kind::Counter);
        let counted = scraped.clone();
        registry.on_render(move || counted.add(1.0));
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        registry.readiness_check(move || {
            if flag.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("etcd unreachable:\nconnection refused".into())
            }
        });
        registry.health_check(|| Err("stopping".into()));
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(registry))
            .await
            .unwrap();
        let get = |path| get(addr, path);
        let not_ready = get("/readyz").await;
        assert!(
            not_ready.starts_with("HTTP/1.1 503 Service Unavailable"),
            "{not_ready}"
        );
        assert!(
            not_ready.ends_with("\r\n\r\netcd unreachable: connection refused\n"),
            "one line: {not_ready}"
        );
        ready.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200 OK"));
        let health = get("/healthz").await;
        assert!(health.starts_with("HTTP/1.1 503"), "{health}");
        assert!(health.ends_with("stopping\n"), "{health}");
        assert!(get("/metrics").await.contains("test_scrapes_total 1\n"));
        assert!(get("/metrics").await.contains("test_scrapes_total 2\n"));
    }

    #[tokio::test]
    async fn a_taken_address_is_named() {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve(addr, Arc::new(Registry::default()))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains(&format!("--metrics-addr: cannot listen on {addr}")));
    }
}
