//! The S3 side: a moto server and a TCP proxy that can cut it off.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::free_port;

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
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = Command::new("curl")
                .args([
                    "-sf",
                    "-X",
                    "PUT",
                    &format!("http://127.0.0.1:{port}/{bucket}"),
                ])
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
