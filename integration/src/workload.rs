//! Deterministic workloads written to etcd.

use anyhow::Context;

use crate::EtcdCluster;

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
