//! Before the first write: proving that the destination holds the
//! archive's history at its current revision, by comparing every live key
//! (value, create and mod revision, version, lease) there with the
//! archive's state at that revision.

use std::collections::BTreeMap;

use anyhow::Context;
use etcd_client::{Client, GetOptions};
use etcdpitr_common::bbolt::BoltReader;
use etcdpitr_common::etcd::MAX_MESSAGE_BYTES;
use etcdpitr_common::segment::{Event, EventKind, RevisionRecord};
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;

use super::leases::LeaseBook;
use super::Diverged;
use crate::commands::{ArchiveEvents, Scratch};
use crate::plan::RestorePlan;
use crate::source;
use crate::synth::{self, EventSource};

/// Keys read from the destination per request (values may be large).
const PAGE: i64 = 256;

/// A live key as the comparison needs it: the value only by its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    create_revision: Revision,
    mod_revision: Revision,
    version: i64,
    lease: i64,
    value: blake3::Hash,
}

impl Fingerprint {
    fn of(e: &Event) -> Self {
        Self {
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            version: e.version,
            lease: e.lease,
            value: blake3::hash(&e.value),
        }
    }
}

/// What the proof leaves for the applier.
pub struct Proven {
    /// The leases of the live keys, and every lease TTL the archive knows.
    pub book: LeaseBook,
    /// The archived record of the destination's revision, unless that is
    /// the base snapshot's own revision.
    pub last: Option<RevisionRecord>,
}

/// The archive's live keys at `plan.target`, with the lease book.
async fn archive_state(
    archive: &Archive,
    plan: &RestorePlan,
) -> anyhow::Result<(
    BTreeMap<Vec<u8>, Fingerprint>,
    LeaseBook,
    Option<RevisionRecord>,
)> {
    // The base snapshot is the cluster's data in plaintext: a private
    // scratch directory, removed on every exit path.
    let scratch_dir = Scratch::new_in(&std::env::temp_dir())?;
    let scratch = scratch_dir.file("base.db");
    source::fetch_snapshot(
        archive,
        plan.generation,
        plan.snapshot_revision,
        &scratch,
        etcdpitr_common::progress::Mode::Hidden,
        etcdpitr_common::snapshot::BodyHash::Check,
    )
    .await
    .with_context(|| format!("fetch the base snapshot into {}", scratch.display()))?;
    let mut events = ArchiveEvents::new(archive, plan.replay());
    let state = tokio::task::spawn_blocking(move || {
        let base = BoltReader::open(&scratch)?;
        let mut live: BTreeMap<Vec<u8>, Fingerprint> = BTreeMap::new();
        let mut book = LeaseBook::default();
        base.for_each(b"lease", &mut |_, v| {
            if let Some((id, ttl)) = synth::decode_lease(v) {
                book.granted(id, ttl);
            }
            Ok(())
        })
        .context("read the base snapshot's leases")?;
        let mut apply = |event: Event| match event.kind {
            EventKind::Put => {
                live.insert(event.key.clone(), Fingerprint::of(&event));
            }
            EventKind::Delete => {
                live.remove(&event.key);
            }
        };
        synth::for_each_key_entry(&base, &mut apply).context("read the base snapshot")?;
        let mut last = None;
        let mut leases = Vec::new();
        events.replay(
            &mut |r| {
                for e in &r.events {
                    apply(e.clone());
                }
                last = Some(r.clone());
                Ok(())
            },
            &mut |l| leases.push(l),
        )?;
        for l in leases {
            book.granted(l.id, l.ttl_secs);
        }
        for (key, fp) in &live {
            if fp.lease != 0 {
                book.attach(key.clone(), fp.lease);
            }
        }
        anyhow::Ok((live, book, last))
    })
    .await??;
    Ok(state)
}

/// Proves that the destination at revision `plan.target` holds exactly the
/// archive's keys at that revision.
///
/// # Errors
/// [`Diverged`] naming the first difference; archive or etcd failures.
pub async fn prove(
    archive: &Archive,
    plan: &RestorePlan,
    client: &mut Client,
) -> anyhow::Result<Proven> {
    let revision = plan.target;
    let (state, book, last) = archive_state(archive, plan).await?;
    let mut expected = state.into_iter();
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut from = vec![0u8];
    let mut compared = 0u64;
    loop {
        let resp = kv
            .get(
                from.clone(),
                Some(
                    GetOptions::new()
                        .with_from_key()
                        .with_revision(revision)
                        .with_limit(PAGE),
                ),
            )
            .await
            .with_context(|| format!("read the destination at revision {revision}"))?;
        for kv in resp.kvs() {
            let theirs = Fingerprint {
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
                version: kv.version(),
                lease: kv.lease(),
                value: blake3::hash(kv.value()),
            };
            match expected.next() {
                Some((key, ours)) if key == kv.key() && ours == theirs => compared += 1,
                Some((key, ours)) if key == kv.key() => {
                    return Err(differs(revision, &key, &format!(
                        "the destination has create/mod revision {}/{}, version {}, lease {:x}; the archive {}/{}, {}, {:x}{}",
                        theirs.create_revision, theirs.mod_revision, theirs.version, theirs.lease,
                        ours.create_revision, ours.mod_revision, ours.version, ours.lease,
                        if ours.value == theirs.value { "" } else { ", and the values differ" }
                    )));
                }
                Some((key, _)) if key.as_slice() < kv.key() => {
                    return Err(differs(
                        revision,
                        &key,
                        "the archive has it, the destination does not",
                    ));
                }
                _ => {
                    return Err(differs(
                        revision,
                        kv.key(),
                        "the destination has it, the archive does not",
                    ));
                }
            }
        }
        match resp.kvs().last() {
            Some(kv) if resp.more() => {
                from = kv.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    if let Some((key, _)) = expected.next() {
        return Err(differs(
            revision,
            &key,
            "the archive has it, the destination does not",
        ));
    }
    tracing::info!(
        revision,
        keys = compared,
        "the destination holds the archive's keys at its revision"
    );
    Ok(Proven { book, last })
}

fn differs(revision: Revision, key: &[u8], what: &str) -> anyhow::Error {
    Diverged(format!(
        "the destination is not the archive's history at its revision {revision}: key {} differs ({what}); it was seeded from another cluster or written to; nothing was written",
        key.escape_ascii()
    ))
    .into()
}
