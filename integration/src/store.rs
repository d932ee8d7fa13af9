//! The S3 side: a moto server (optionally with an S3 Object Lock bucket) and
//! a TCP proxy that can cut it off.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::free_port;

/// moto's server behind a WSGI shim that makes it accept uploads into a
/// bucket with a default retention as S3 does. S3 takes `Content-MD5` or any
/// `x-amz-checksum-*` header (object_store sends `x-amz-checksum-sha256`);
/// moto 5 only `Content-MD5` or `x-amz-sdk-checksum-algorithm`, which the
/// shim derives from the checksum header. An upload without a checksum is
/// still refused. Argument: the port.
const MOTO_WITH_S3_CHECKSUMS: &str = r#"
import os, sys
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

os.environ.setdefault("MOTO_PORT", sys.argv[1])
moto = DomainDispatcherApplication(create_backend_app)

def app(environ, start_response):
    for key in list(environ):
        algorithm = key.removeprefix("HTTP_X_AMZ_CHECKSUM_")
        if algorithm != key and algorithm not in ("ALGORITHM", "TYPE"):
            environ.setdefault("HTTP_X_AMZ_SDK_CHECKSUM_ALGORITHM", algorithm)
    return moto(environ, start_response)

run_simple("127.0.0.1", int(sys.argv[1]), app, threaded=True)
"#;

/// Object Lock calls through boto3. Arguments: endpoint, operation, bucket,
/// then `create MODE DAYS` (a bucket with Object Lock and a default
/// retention) or `retain MODE UNTIL KEY…` (a retention on each key, a
/// GOVERNANCE one bypassed) or `noncurrent` (prints the keys that have
/// noncurrent versions, one a line).
const BOTO3_OBJECT_LOCK: &str = r#"
import datetime, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="testing",
                  aws_secret_access_key="testing", region_name="us-east-1")
op, bucket = sys.argv[2], sys.argv[3]
if op == "create":
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3.put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": sys.argv[4], "Days": int(sys.argv[5])}}})
elif op == "retain":
    until = datetime.datetime.fromisoformat(sys.argv[5])
    for key in sys.argv[6:]:
        s3.put_object_retention(Bucket=bucket, Key=key, BypassGovernanceRetention=True,
                                Retention={"Mode": sys.argv[4], "RetainUntilDate": until})
elif op == "noncurrent":
    pages = s3.get_paginator("list_object_versions").paginate(Bucket=bucket)
    keys = {v["Key"] for p in pages for v in p.get("Versions", []) if not v["IsLatest"]}
    print("\n".join(sorted(keys)))
else:
    sys.exit(f"unknown operation {op}")
"#;

/// A moto S3 server with one bucket.
pub struct S3Server {
    child: Child,
    /// Port it listens on.
    pub port: u16,
}

impl S3Server {
    /// Starts moto and creates `bucket`.
    ///
    /// # Errors
    /// If moto is missing or does not start.
    pub async fn start(bucket: &str) -> anyhow::Result<Self> {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start moto_server (pip install 'moto[server]')")?;
        let server = Self::ready(child, port).await?;
        let status = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "PUT",
                &format!("http://127.0.0.1:{port}/{bucket}"),
            ])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "create bucket {bucket}: curl {status}");
        Ok(server)
    }

    /// Starts moto (accepting checksums as S3 does, see
    /// [`MOTO_WITH_S3_CHECKSUMS`]) with `bucket` under S3 Object Lock:
    /// versioned, with a default retention of `days` days in `mode`
    /// (`GOVERNANCE` or `COMPLIANCE`).
    ///
    /// # Errors
    /// If moto or boto3 is missing or moto does not start.
    pub async fn start_object_lock(bucket: &str, mode: &str, days: u32) -> anyhow::Result<Self> {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-c", MOTO_WITH_S3_CHECKSUMS, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start moto (pip install 'moto[server]')")?;
        let server = Self::ready(child, port).await?;
        server.object_lock(&["create", bucket, mode, &days.to_string()])?;
        Ok(server)
    }

    /// Waits until the server answers.
    async fn ready(child: Child, port: u16) -> anyhow::Result<Self> {
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = Command::new("curl")
                .args(["-sf", &format!("http://127.0.0.1:{port}/")])
                .stdout(Stdio::null())
                .status()?;
            if status.success() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("moto_server did not start");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sets a retention in `mode` until `until` (RFC 3339) on each of
    /// `keys` (full keys in `bucket`), bypassing a GOVERNANCE retention.
    ///
    /// # Errors
    /// If boto3 fails.
    pub fn retain(
        &self,
        bucket: &str,
        mode: &str,
        until: &str,
        keys: &[String],
    ) -> anyhow::Result<()> {
        let mut args = vec!["retain", bucket, mode, until];
        args.extend(keys.iter().map(String::as_str));
        self.object_lock(&args).map(drop)
    }

    /// The keys of `bucket` that have noncurrent versions.
    ///
    /// # Errors
    /// If boto3 fails.
    pub fn noncurrent_keys(&self, bucket: &str) -> anyhow::Result<Vec<String>> {
        let out = self.object_lock(&["noncurrent", bucket])?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    fn object_lock(&self, args: &[&str]) -> anyhow::Result<String> {
        let endpoint = format!("http://127.0.0.1:{}", self.port);
        let out = Command::new("python3")
            .args(["-c", BOTO3_OBJECT_LOCK, &endpoint])
            .args(args)
            .output()
            .context("run python3 with boto3")?;
        anyhow::ensure!(
            out.status.success(),
            "boto3 {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Environment for object_store pointing at `endpoint_port`.
    pub fn env(endpoint_port: u16) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{endpoint_port}")),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// Held while a test points this process's `AWS_*` variables at its own S3
/// server (in-process archive reads take the endpoint from there).
static PROCESS_S3_ENV: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Points this process's `AWS_*` variables at `endpoint_port` for as long
/// as the returned guard lives: tests of one binary that do so run one at a
/// time, so none reads another's server. Child processes get their
/// environment explicitly and need no guard.
pub async fn use_s3_in_process(endpoint_port: u16) -> tokio::sync::MutexGuard<'static, ()> {
    let guard = PROCESS_S3_ENV.lock().await;
    for (k, v) in S3Server::env(endpoint_port) {
        std::env::set_var(k, v);
    }
    guard
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A TCP proxy on 127.0.0.1 that can be switched off to simulate an outage
/// (connections are refused while off, and open ones are cut).
pub struct Proxy {
    /// Port clients connect to.
    pub port: u16,
    up: Arc<AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    /// Starts a proxy to `127.0.0.1:target`.
    ///
    /// # Errors
    /// If it cannot bind.
    pub async fn start(target: u16) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (up2, gen2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (up3, gen3) = (up2.clone(), gen2.clone());
                let my_gen = gen3.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let watch = async {
                        while up3.load(Ordering::SeqCst) && gen3.load(Ordering::SeqCst) == my_gen {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    tokio::select! { _ = copy => {}, () = watch => {} }
                });
            }
        });
        Ok(Self {
            port,
            up,
            generation,
        })
    }

    /// Cuts the store off (or restores it).
    pub fn set_up(&self, up: bool) {
        if !up {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.up.store(up, Ordering::SeqCst);
    }
}

/// A TCP proxy on 127.0.0.1 that delays every byte by a fixed time in each
/// direction: a delay line, not a throttle. Each chunk read from one side is
/// written to the other `delay` after it arrived, in order, while later
/// chunks keep arriving, so a request-response exchange takes `delay` longer
/// each way but streaming throughput is unchanged (latency, not bandwidth
/// loss). Models an object store far away.
pub struct DelayProxy {
    /// Port clients connect to.
    pub port: u16,
    accept: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Starts a proxy to `127.0.0.1:target` adding `delay` per direction.
    ///
    /// # Errors
    /// If it cannot bind.
    pub async fn start(target: u16, delay: Duration) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    inbound.set_nodelay(true).ok();
                    outbound.set_nodelay(true).ok();
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::join!(
                        delay_line(in_read, out_write, delay),
                        delay_line(out_read, in_write, delay)
                    );
                });
            }
        });
        Ok(Self { port, accept })
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, each chunk `delay` after it was read; the end of
/// the stream is passed on the same way.
async fn delay_line(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            // An empty chunk stands for the end of the stream.
            if tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
                || n == 0
            {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if chunk.is_empty() || to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        to.shutdown().await.ok();
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The delay line adds its delay to each direction of an exchange but
    /// keeps streaming throughput: a large transfer takes about one delay
    /// more, not one delay per chunk.
    #[tokio::test]
    async fn delay_proxy_adds_latency_not_bandwidth_loss() -> anyhow::Result<()> {
        const DELAY: Duration = Duration::from_millis(100);
        const STREAM_BYTES: usize = 32 << 20;
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let echo_port = echo.local_addr()?.port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    tokio::io::copy(&mut r, &mut w).await.ok();
                });
            }
        });
        let proxy = DelayProxy::start(echo_port, DELAY).await?;
        let mut client = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port)).await?;

        let started = Instant::now();
        client.write_all(b"ping").await?;
        let mut answer = [0u8; 4];
        client.read_exact(&mut answer).await?;
        let round_trip = started.elapsed();
        assert_eq!(&answer, b"ping");
        assert!(round_trip >= 2 * DELAY, "round trip {round_trip:?}");

        let (mut reader, mut writer) = client.into_split();
        let started = Instant::now();
        let send = tokio::spawn(async move {
            let chunk = vec![7u8; 64 << 10];
            for _ in 0..STREAM_BYTES / chunk.len() {
                writer.write_all(&chunk).await?;
            }
            anyhow::Ok(())
        });
        let mut received = vec![0u8; STREAM_BYTES];
        reader.read_exact(&mut received).await?;
        send.await??;
        let streamed = started.elapsed();
        assert!(received.iter().all(|&b| b == 7));
        // 512 chunks at one delay each would take 51 s.
        assert!(
            streamed < 2 * DELAY + Duration::from_secs(3),
            "{STREAM_BYTES} bytes took {streamed:?}"
        );
        Ok(())
    }
}
