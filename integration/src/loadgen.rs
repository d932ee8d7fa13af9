//! A Kubernetes-like workload for GB-scale benchmarks and tests.
//!
//! The workload is split in two so that it can be used without etcd (e.g.
//! to compute archive sizes offline):
//! - [`Workload`]: a pure, deterministic generator of operations for one
//!   writer (`seed`, `writer`) → the same sequence of [`Op`]s every time.
//! - [`run_load`]: applies the operations of many writers to etcd until its
//!   database reaches a size or a duration ends.
//!
//! What it writes, modelled on what kube-apiserver stores:
//! - objects under `/registry/pods/<ns>/<name>` and
//!   `/registry/configmaps/<ns>/<name>`, values of 0.5–8 KiB (log-uniform),
//!   created with "create if absent" transactions (as the apiserver does),
//!   mostly updated afterwards (the whole object rewritten with its status
//!   changed), sometimes deleted;
//! - node heartbeats under `/registry/leases/kube-node-lease/<node>`
//!   (0.5 KiB, updated in place);
//! - events under `/registry/events/<ns>/<name>.<hex>` (0.5–1.5 KiB),
//!   attached to etcd leases of [`EVENT_LEASE_TTL_SECS`] (the apiserver's
//!   `--event-ttl`); each writer rotates to a new lease every
//!   [`EVENTS_PER_LEASE`] events and revokes its oldest once it holds
//!   [`LEASES_KEPT`], which deletes that lease's events in one revision;
//! - occasionally a transaction updating several objects at once.
//!
//! Values are protobuf-like (the apiserver's `k8s\0` envelope, then
//! length-delimited fields) with the repetitive structure of real objects:
//! names, labels, images and managed-fields JSON from a small vocabulary,
//! plus a minority of random bytes (uids, container ids, certificates), so
//! they compress like real objects, neither like random data nor like zeros.
//!
//! The load never compacts etcd: every revision stays in the database (and
//! counts towards its size), as between two compactions of a real cluster.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};

use crate::Rng;

/// TTL of the etcd leases that events are attached to (kube-apiserver's
/// default `--event-ttl` of one hour).
pub const EVENT_LEASE_TTL_SECS: i64 = 3600;
/// Events a writer attaches to one lease before it grants the next.
pub const EVENTS_PER_LEASE: u64 = 500;
/// Leases a writer holds at most; granting one more revokes the oldest.
pub const LEASES_KEPT: usize = 4;
/// Objects (pods and configmaps) a writer creates before anything else.
pub const INITIAL_OBJECTS: usize = 100;
/// Node heartbeat objects per writer.
const NODES_PER_WRITER: u64 = 2;
/// Default number of concurrent writers.
pub const DEFAULT_WRITERS: u64 = 64;
/// Default seed.
pub const DEFAULT_SEED: u64 = 1;

/// Starts an etcd 3.5 member to fill with `size_bytes` of load: its backend
/// quota is twice that (at least 8 GiB), so the load never reaches it.
///
/// # Errors
/// If etcd does not start.
pub async fn start_source(size_bytes: u64) -> anyhow::Result<crate::EtcdCluster> {
    let quota = (size_bytes * 2).max(8 << 30).to_string();
    crate::EtcdCluster::start_with_flags(
        crate::EtcdVersion::V35,
        1,
        false,
        &["--quota-backend-bytes", &quota],
    )
    .await
}

const WORDS: &[&str] = &[
    "api",
    "auth",
    "backend",
    "billing",
    "cache",
    "cart",
    "checkout",
    "coredns",
    "controller",
    "frontend",
    "gateway",
    "grafana",
    "ingress",
    "istio",
    "kafka",
    "loki",
    "metrics",
    "nginx",
    "operator",
    "payments",
    "postgres",
    "prometheus",
    "proxy",
    "queue",
    "redis",
    "scheduler",
    "search",
    "sidecar",
    "storage",
    "web",
    "worker",
    "zookeeper",
];
const NAMESPACES: &[&str] = &[
    "default",
    "kube-system",
    "monitoring",
    "ingress-nginx",
    "payments",
    "checkout",
    "search",
    "data",
    "platform",
    "team-a",
    "team-b",
    "team-c",
];
const REASONS: &[&str] = &[
    "Scheduled",
    "Pulling",
    "Pulled",
    "Created",
    "Started",
    "Killing",
    "BackOff",
    "Unhealthy",
    "SuccessfulCreate",
    "ScalingReplicaSet",
];

/// The kinds of objects the workload keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/registry/pods/…`: 0.5–8 KiB.
    Pod,
    /// `/registry/configmaps/…`: 0.5–8 KiB, mostly text data.
    ConfigMap,
    /// `/registry/leases/kube-node-lease/…`: 0.5 KiB heartbeats.
    NodeLease,
    /// `/registry/events/…`: 0.5–1.5 KiB, attached to an etcd lease.
    Event,
}

/// One operation of the workload. Lease slots are numbers local to the
/// writer; the executor maps them to the lease IDs etcd grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create `key` if absent (a transaction comparing its create revision
    /// with 0, as the apiserver creates).
    Create {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Put a new value of an existing `key` (a transaction that requires it
    /// to exist).
    Update {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Delete `key`.
    Delete {
        /// Key.
        key: String,
    },
    /// Grant the lease of `slot` ([`EVENT_LEASE_TTL_SECS`]).
    GrantLease {
        /// Writer-local lease number.
        slot: u64,
    },
    /// Revoke the lease of `slot`, deleting the events attached to it.
    RevokeLease {
        /// Writer-local lease number.
        slot: u64,
    },
    /// Put an event attached to the lease of `slot`.
    Event {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Writer-local lease number.
        slot: u64,
    },
    /// Update several existing objects in one transaction (one revision).
    Txn {
        /// Keys and their new values.
        puts: Vec<(String, Vec<u8>)>,
    },
}

/// A live object of a writer.
struct Object {
    kind: Kind,
    namespace: &'static str,
    name: String,
    /// Seed of the object's stable content (names, labels, env).
    seed: u64,
    /// Target value length in bytes.
    len: usize,
    /// Updates so far.
    generation: u64,
}

impl Object {
    fn key(&self) -> String {
        let resource = match self.kind {
            Kind::Pod => "pods",
            Kind::ConfigMap => "configmaps",
            Kind::NodeLease => "leases",
            Kind::Event => "events",
        };
        format!("/registry/{resource}/{}/{}", self.namespace, self.name)
    }
}

/// The deterministic operation sequence of one writer.
pub struct Workload {
    rng: Rng,
    writer: u64,
    objects: Vec<Object>,
    nodes: Vec<Object>,
    /// Lease slots held, oldest first.
    leases: VecDeque<u64>,
    next_slot: u64,
    events_in_lease: u64,
    events: u64,
    /// Operations decided but not handed out yet.
    queued: VecDeque<Op>,
}

impl Workload {
    /// The workload of writer `writer` under `seed`.
    pub fn new(seed: u64, writer: u64) -> Self {
        let mut rng = Rng::new(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (writer + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93),
        );
        let nodes = (0..NODES_PER_WRITER)
            .map(|i| Object {
                kind: Kind::NodeLease,
                namespace: "kube-node-lease",
                name: format!("node-{writer:03}-{i}-{}", hex(rng.next_u64(), 5)),
                seed: rng.next_u64(),
                len: 512 + rng.below(128) as usize,
                generation: 0,
            })
            .collect();
        Self {
            rng,
            writer,
            objects: Vec::new(),
            nodes,
            leases: VecDeque::new(),
            next_slot: 0,
            events_in_lease: EVENTS_PER_LEASE,
            events: 0,
            queued: VecDeque::new(),
        }
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        if let Some(op) = self.queued.pop_front() {
            return op;
        }
        if self.objects.len() < INITIAL_OBJECTS {
            return self.create();
        }
        match self.rng.below(100) {
            0..=49 => self.update(),
            50..=74 => self.event(),
            75..=81 => self.create(),
            82..=87 => self.delete(),
            88..=96 => {
                let i = self.rng.below(NODES_PER_WRITER) as usize;
                let node = &mut self.nodes[i];
                node.generation += 1;
                let value = object_value(node, &mut self.rng);
                Op::Update {
                    key: self.nodes[i].key(),
                    value,
                }
            }
            _ => {
                let n = 2 + self.rng.below(3) as usize;
                let puts = (0..n)
                    .map(|_| {
                        let i = self.rng.below(self.objects.len() as u64) as usize;
                        self.objects[i].generation += 1;
                        (
                            self.objects[i].key(),
                            object_value(&self.objects[i], &mut self.rng),
                        )
                    })
                    .collect::<HashMap<_, _>>();
                let mut puts: Vec<_> = puts.into_iter().collect();
                puts.sort();
                Op::Txn { puts }
            }
        }
    }

    fn create(&mut self) -> Op {
        let kind = if self.rng.below(3) == 0 {
            Kind::ConfigMap
        } else {
            Kind::Pod
        };
        let object = Object {
            kind,
            namespace: NAMESPACES[self.rng.below(NAMESPACES.len() as u64) as usize],
            name: format!(
                "{}-{}-{}",
                WORDS[self.rng.below(WORDS.len() as u64) as usize],
                hex(self.rng.next_u64(), 10),
                hex(self.rng.next_u64(), 5)
            ),
            seed: self.rng.next_u64(),
            len: log_uniform(&mut self.rng, 512, 8192),
            generation: 0,
        };
        let op = Op::Create {
            key: object.key(),
            value: object_value(&object, &mut self.rng),
        };
        self.objects.push(object);
        op
    }

    fn update(&mut self) -> Op {
        let i = self.rng.below(self.objects.len() as u64) as usize;
        self.objects[i].generation += 1;
        Op::Update {
            key: self.objects[i].key(),
            value: object_value(&self.objects[i], &mut self.rng),
        }
    }

    fn delete(&mut self) -> Op {
        let i = self.rng.below(self.objects.len() as u64) as usize;
        let object = self.objects.swap_remove(i);
        Op::Delete { key: object.key() }
    }

    fn event(&mut self) -> Op {
        if self.events_in_lease >= EVENTS_PER_LEASE {
            // Rotate: a new lease for the next events, and the oldest one
            // revoked once too many are held (as if it had expired).
            self.events_in_lease = 0;
            let slot = self.next_slot;
            self.next_slot += 1;
            self.leases.push_back(slot);
            self.queued.push_back(Op::GrantLease { slot });
            if self.leases.len() > LEASES_KEPT {
                let oldest = self.leases.pop_front().expect("more than LEASES_KEPT held");
                self.queued.push_back(Op::RevokeLease { slot: oldest });
            }
        }
        self.events_in_lease += 1;
        self.events += 1;
        let slot = *self.leases.back().expect("a lease was granted above");
        let involved = &self.objects[self.rng.below(self.objects.len() as u64) as usize];
        let event = Object {
            kind: Kind::Event,
            namespace: involved.namespace,
            name: format!("{}.{:x}{:08x}", involved.name, self.writer, self.events),
            seed: involved.seed,
            len: log_uniform(&mut self.rng, 512, 1536),
            generation: self.events,
        };
        let op = Op::Event {
            key: event.key(),
            value: object_value(&event, &mut self.rng),
            slot,
        };
        self.queued.push_back(op);
        self.queued.pop_front().expect("just queued")
    }
}

/// `digits` lowercase hex digits of `n`.
fn hex(n: u64, digits: usize) -> String {
    let s = format!("{n:016x}");
    s[16 - digits.min(16)..].to_owned()
}

/// A length between `lo` and `hi`, uniform in its logarithm (small values
/// common, large ones rare, as object sizes in a cluster).
fn log_uniform(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    let unit = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let (lo_ln, hi_ln) = ((lo as f64).ln(), (hi as f64).ln());
    (lo_ln + unit * (hi_ln - lo_ln)).exp() as usize
}

/// A protobuf-like encoder: length-delimited fields with varint lengths.
struct Proto(Vec<u8>);

impl Proto {
    fn bytes(&mut self, field: u8, value: &[u8]) {
        self.0.push(field << 3 | 2);
        let mut n = value.len();
        while n >= 0x80 {
            self.0.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
        self.0.extend_from_slice(value);
    }

    fn str(&mut self, field: u8, value: &str) {
        self.bytes(field, value.as_bytes());
    }

    fn message(&mut self, field: u8, build: impl FnOnce(&mut Proto)) {
        let mut inner = Proto(Vec::new());
        build(&mut inner);
        self.bytes(field, &inner.0);
    }
}

/// The value of `object` at its generation: the stable part from the
/// object's own seed, the changing part (status, times, ids) from `rng`.
fn object_value(object: &Object, rng: &mut Rng) -> Vec<u8> {
    let mut stable = Rng::new(object.seed);
    let word = |r: &mut Rng| WORDS[r.below(WORDS.len() as u64) as usize];
    let app = word(&mut stable);
    let (api_version, kind) = match object.kind {
        Kind::Pod => ("v1", "Pod"),
        Kind::ConfigMap => ("v1", "ConfigMap"),
        Kind::NodeLease => ("coordination.k8s.io/v1", "Lease"),
        Kind::Event => ("v1", "Event"),
    };
    let second = 1_764_158_400 + object.generation * 7 + rng.below(5);
    let timestamp = format!(
        "2026-11-26T{:02}:{:02}:{:02}Z",
        second / 3600 % 24,
        second / 60 % 60,
        second % 60
    );
    let mut out = Proto(b"k8s\0".to_vec());
    out.message(1, |t| {
        t.str(1, api_version);
        t.str(2, kind);
    });
    let mut raw = Proto(Vec::new());
    raw.message(1, |m| {
        m.str(1, &object.name);
        m.str(3, object.namespace);
        m.str(
            5,
            &format!(
                "{}-{}-{}-{}",
                hex(object.seed, 8),
                hex(object.seed >> 8, 4),
                hex(object.seed >> 16, 4),
                hex(object.seed >> 24, 12)
            ),
        );
        m.str(6, &(1_000_000 + object.generation * 64).to_string());
        m.str(8, "2026-11-26T08:00:00Z");
        for (k, v) in [
            ("app.kubernetes.io/name", app),
            ("app.kubernetes.io/part-of", word(&mut stable)),
            ("pod-template-hash", &hex(object.seed >> 3, 10)),
        ] {
            m.message(11, |l| {
                l.str(1, k);
                l.str(2, v);
            });
        }
        m.message(17, |f| {
            f.str(1, "kube-controller-manager");
            f.str(2, "Update");
            f.str(3, api_version);
            f.str(
                7,
                &format!(
                    r#"{{"f:metadata":{{"f:labels":{{".":{{}},"f:app.kubernetes.io/name":{{}},"f:pod-template-hash":{{}}}},"f:ownerReferences":{{".":{{}},"k:{{\"uid\":\"{}\"}}":{{}}}}}},"f:spec":{{"f:containers":{{"k:{{\"name\":\"{app}\"}}":{{".":{{}},"f:image":{{}},"f:imagePullPolicy":{{}},"f:name":{{}},"f:resources":{{}}}}}}}}}}"#,
                    hex(object.seed >> 5, 12)
                ),
            );
        });
    });
    match object.kind {
        Kind::Event => {
            raw.message(2, |e| {
                e.str(1, "Pod");
                e.str(2, object.namespace);
                e.str(3, &object.name);
                e.str(4, REASONS[rng.below(REASONS.len() as u64) as usize]);
                e.str(
                    5,
                    &format!(
                        "Successfully pulled image \"registry.k8s.io/{app}:v1.{}.{}\" in {}.{:03}s (including waiting)",
                        stable.below(30),
                        stable.below(10),
                        rng.below(10),
                        rng.below(1000)
                    ),
                );
                e.str(6, "kubelet");
                e.str(7, &timestamp);
            });
        }
        Kind::NodeLease => {
            raw.message(2, |s| {
                s.str(1, &object.name);
                s.str(2, "40");
                s.str(3, &timestamp);
            });
        }
        Kind::Pod | Kind::ConfigMap => {}
    }
    // Spec/data entries until the object reaches its size: mostly text from
    // the vocabulary, one in five random (certificates, tokens, hashes).
    let mut i = 0u64;
    while raw.0.len() + 64 < object.len {
        let name = format!("{}_{}_{i}", word(&mut stable), word(&mut stable)).to_uppercase();
        let value = if stable.below(5) == 0 {
            let random = rng.bytes(48);
            base64_like(&random)
        } else {
            format!(
                "{}.{}.svc.cluster.local:{}",
                word(&mut stable),
                object.namespace,
                8000 + stable.below(100)
            )
        };
        let field = if object.kind == Kind::ConfigMap { 3 } else { 4 };
        raw.message(field, |env| {
            env.str(1, &name);
            env.str(2, &value);
        });
        i += 1;
    }
    if object.kind == Kind::Pod {
        raw.message(5, |s| {
            s.str(1, "Running");
            s.str(2, &timestamp);
            s.str(
                3,
                &format!(
                    "10.{}.{}.{}",
                    rng.below(256),
                    rng.below(256),
                    rng.below(256)
                ),
            );
            s.str(
                4,
                &format!(
                    "containerd://{}{}{}{}",
                    hex(rng.next_u64(), 16),
                    hex(rng.next_u64(), 16),
                    hex(rng.next_u64(), 16),
                    hex(rng.next_u64(), 16)
                ),
            );
        });
    }
    out.bytes(2, &raw.0);
    out.0
}

/// Printable text of `bytes` (base64's alphabet, no padding).
fn base64_like(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 63)] as char)
        .collect()
}

/// Settings of [`run_load`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Seed of every writer's [`Workload`]; runs that must not reuse object
    /// names (e.g. two phases against one etcd) take different seeds.
    pub seed: u64,
    /// Concurrent writers, each with its own connection.
    pub writers: u64,
    /// Print progress to stderr every 5 s.
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            seed: DEFAULT_SEED,
            writers: DEFAULT_WRITERS,
            progress: true,
        }
    }
}

/// When [`run_load`] stops.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// etcd's database (Status `dbSize`) reached this many bytes.
    DbBytes(u64),
    /// This long has passed.
    Elapsed(Duration),
}

/// What [`run_load`] did.
#[derive(Clone, Copy, Debug)]
pub struct LoadSummary {
    /// Operations applied (a transaction counts once).
    pub ops: u64,
    /// Value bytes written.
    pub value_bytes: u64,
    /// The highest revision a write of this run returned.
    pub last_revision: i64,
    /// etcd's database size at the end (Status `dbSize`).
    pub db_size_bytes: i64,
    /// How long the writes took.
    pub elapsed: Duration,
}

/// Applies `options.writers` [`Workload`]s concurrently to the etcd at
/// `endpoints` until `until`.
///
/// # Errors
/// etcd failures (e.g. `NOSPACE` when the quota is below the target).
pub async fn run_load(
    endpoints: &[String],
    options: &LoadOptions,
    until: Until,
) -> anyhow::Result<LoadSummary> {
    let connect = || async {
        let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(30));
        etcd_client::Client::connect(endpoints, Some(opts))
            .await
            .context("connect to etcd")
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let value_bytes = Arc::new(AtomicU64::new(0));
    let last_revision = Arc::new(AtomicI64::new(0));
    let started = Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..options.writers {
        let client = connect().await?;
        let mut workload = Workload::new(options.seed, w);
        let (stop, ops, value_bytes, last_revision) = (
            stop.clone(),
            ops.clone(),
            value_bytes.clone(),
            last_revision.clone(),
        );
        writers.spawn(async move {
            let mut executor = Executor {
                client,
                leases: HashMap::new(),
            };
            while !stop.load(Ordering::Relaxed) {
                let op = workload.next_op();
                let (revision, bytes) = executor.apply(op).await?;
                ops.fetch_add(1, Ordering::Relaxed);
                value_bytes.fetch_add(bytes, Ordering::Relaxed);
                last_revision.fetch_max(revision, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    let mut monitor = connect().await?;
    let mut last_report = Instant::now();
    let db_size = loop {
        tokio::select! {
            Some(done) = writers.join_next() => {
                stop.store(true, Ordering::Relaxed);
                done.context("writer panicked")?.context("write")?;
                anyhow::bail!("a writer stopped early");
            }
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let db_size = monitor.status().await.context("etcd status")?.db_size();
        if options.progress && last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "loadgen: {secs:.0} s, {} ops ({:.0}/s), revision {}, db {:.2} GB",
                ops.load(Ordering::Relaxed),
                ops.load(Ordering::Relaxed) as f64 / secs,
                last_revision.load(Ordering::Relaxed),
                db_size as f64 / 1e9
            );
        }
        let done = match until {
            Until::DbBytes(target) => u64::try_from(db_size).unwrap_or(0) >= target,
            Until::Elapsed(limit) => started.elapsed() >= limit,
        };
        if done {
            break db_size;
        }
    };
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    while let Some(done) = writers.join_next().await {
        done.context("writer panicked")?.context("write")?;
    }
    Ok(LoadSummary {
        ops: ops.load(Ordering::Relaxed),
        value_bytes: value_bytes.load(Ordering::Relaxed),
        last_revision: last_revision.load(Ordering::Relaxed),
        db_size_bytes: db_size,
        elapsed,
    })
}

/// Applies [`Op`]s of one writer through its own client.
struct Executor {
    client: etcd_client::Client,
    /// Lease slot → the ID etcd granted.
    leases: HashMap<u64, i64>,
}

impl Executor {
    /// Applies `op`; returns the revision of etcd's answer and the value
    /// bytes written.
    async fn apply(&mut self, op: Op) -> anyhow::Result<(i64, u64)> {
        let revision = |h: Option<&etcd_client::ResponseHeader>| {
            h.map_or(0, etcd_client::ResponseHeader::revision)
        };
        Ok(match op {
            Op::Create { key, value } => {
                let len = value.len() as u64;
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), value, None)])
                    .or_else([TxnOp::get(key, None)]);
                let resp = self.client.txn(txn).await.context("create")?;
                (revision(resp.header()), len)
            }
            Op::Update { key, value } => {
                let len = value.len() as u64;
                let resp = self.client.put(key, value, None).await.context("update")?;
                (revision(resp.header()), len)
            }
            Op::Delete { key } => {
                let resp = self.client.delete(key, None).await.context("delete")?;
                (revision(resp.header()), 0)
            }
            Op::GrantLease { slot } => {
                let resp = self
                    .client
                    .lease_grant(EVENT_LEASE_TTL_SECS, None)
                    .await
                    .context("grant lease")?;
                self.leases.insert(slot, resp.id());
                (revision(resp.header()), 0)
            }
            Op::RevokeLease { slot } => {
                let id = self
                    .leases
                    .remove(&slot)
                    .context("revoke an unknown lease slot")?;
                let resp = self.client.lease_revoke(id).await.context("revoke lease")?;
                (revision(resp.header()), 0)
            }
            Op::Event { key, value, slot } => {
                let id = *self
                    .leases
                    .get(&slot)
                    .context("event on an unknown lease slot")?;
                let len = value.len() as u64;
                let resp = self
                    .client
                    .put(key, value, Some(PutOptions::new().with_lease(id)))
                    .await
                    .context("put event")?;
                (revision(resp.header()), len)
            }
            Op::Txn { puts } => {
                let len = puts.iter().map(|(_, v)| v.len() as u64).sum();
                let compares: Vec<Compare> = puts
                    .iter()
                    .map(|(k, _)| Compare::version(k.clone(), CompareOp::Greater, 0))
                    .collect();
                let ops: Vec<TxnOp> = puts
                    .into_iter()
                    .map(|(k, v)| TxnOp::put(k, v, None))
                    .collect();
                let resp = self
                    .client
                    .txn(Txn::new().when(compares).and_then(ops))
                    .await
                    .context("transaction")?;
                (revision(resp.header()), len)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_repeats_its_operations_and_values_stay_in_range() {
        let take = |seed, writer| {
            let mut w = Workload::new(seed, writer);
            (0..20_000).map(|_| w.next_op()).collect::<Vec<_>>()
        };
        let ops = take(7, 3);
        assert_eq!(ops, take(7, 3));
        assert_ne!(ops, take(8, 3));
        let mut kinds = HashMap::new();
        for op in &ops {
            let (name, value) = match op {
                Op::Create { value, .. } => ("create", Some(value)),
                Op::Update { value, .. } => ("update", Some(value)),
                Op::Event { value, .. } => ("event", Some(value)),
                Op::Delete { .. } => ("delete", None),
                Op::GrantLease { .. } => ("grant", None),
                Op::RevokeLease { .. } => ("revoke", None),
                Op::Txn { .. } => ("txn", None),
            };
            *kinds.entry(name).or_insert(0) += 1;
            if let Some(v) = value {
                assert!((512..=8192 + 256).contains(&v.len()), "{} bytes", v.len());
                assert!(v.starts_with(b"k8s\0"));
            }
        }
        for kind in [
            "create", "update", "event", "delete", "grant", "revoke", "txn",
        ] {
            assert!(
                kinds.get(kind).copied().unwrap_or(0) > 0,
                "no {kind} in {kinds:?}"
            );
        }
        assert!(kinds["update"] > kinds["create"] + kinds["delete"]);
    }

    #[test]
    fn values_compress_like_objects_not_like_noise_or_zeros() {
        let mut w = Workload::new(1, 0);
        let mut bytes = Vec::new();
        while bytes.len() < 4 << 20 {
            match w.next_op() {
                Op::Create { value, .. } | Op::Update { value, .. } | Op::Event { value, .. } => {
                    bytes.extend(value);
                }
                _ => {}
            }
        }
        let compressed = zstd::encode_all(&bytes[..], 3).expect("compress");
        let ratio = bytes.len() as f64 / compressed.len() as f64;
        assert!((2.0..12.0).contains(&ratio), "zstd -3 ratio {ratio:.2}");
    }
}
