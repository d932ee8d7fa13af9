//! `etcd-restorer export`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use etcdpitr_common::bbolt::BoltReader;
use etcdpitr_common::progress::{Mode, Progress, Unit};
use etcdpitr_common::segment::{Event, EventKind};
use serde::Serialize;

use super::{describe_time_choice, load, plan_target, ArchiveEvents, Scratch, Target};
use crate::source;
use crate::synth::{self, EventSource};

/// One line of `export`: the fields etcdctl's JSON output uses.
#[derive(Serialize)]
struct ExportedKey {
    key: String,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    value: String,
    lease: i64,
}

/// `etcd-restorer export`: the live keys at the target as JSON lines,
/// sorted by key.
///
/// # Errors
/// As for `restore`.
pub async fn export(
    url: &str,
    key_files: &[PathBuf],
    target: &Target,
    prefix: Option<&str>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (archive, listing) = load(url, key_files).await?;
    let (plan, choice) = plan_target(&archive, &listing, target).await?;
    if let Some(choice) = &choice {
        etcdpitr_common::cli::note(format_args!("{}", describe_time_choice(target, choice)));
    }
    // The base snapshot is the cluster's data in plaintext: it goes into a
    // private scratch directory of the system temp dir, removed on every
    // exit path.
    let scratch_dir = Scratch::new_in(&std::env::temp_dir())?;
    let scratch = scratch_dir.file("base.db");
    source::fetch_snapshot(
        &archive,
        plan.generation,
        plan.snapshot_revision,
        &scratch,
        Mode::Auto,
        etcdpitr_common::snapshot::BodyHash::Check,
    )
    .await
    .with_context(|| format!("fetch the base snapshot into {}", scratch.display()))?;
    let mut events = ArchiveEvents::new(&archive, plan.replay());
    let prefix = prefix.unwrap_or_default().as_bytes().to_vec();
    let revisions = (plan.target - plan.snapshot_revision) as u64;
    let live = tokio::task::spawn_blocking(move || -> anyhow::Result<BTreeMap<Vec<u8>, Event>> {
        let base = BoltReader::open(&scratch)?;
        let mut live: BTreeMap<Vec<u8>, Event> = BTreeMap::new();
        let mut apply = |event: Event| {
            if !event.key.starts_with(&prefix) {
                return;
            }
            match event.kind {
                EventKind::Put => {
                    live.insert(event.key.clone(), event);
                }
                EventKind::Delete => {
                    live.remove(&event.key);
                }
            }
        };
        let reading = Progress::new(
            Mode::Auto,
            "read base snapshot",
            Unit::Items("key entries"),
            None,
        );
        synth::for_each_key_entry(&base, &mut |event| {
            apply(event);
            reading.inc(1);
        })
        .context("read the base snapshot")?;
        reading.finish();
        let replaying = Progress::new(
            Mode::Auto,
            "replay",
            Unit::Items("revisions"),
            Some(revisions),
        );
        events.replay(
            &mut |r| {
                for e in &r.events {
                    apply(e.clone());
                }
                replaying.inc(1);
                Ok(())
            },
            &mut |_| {},
        )?;
        replaying.finish();
        Ok(live)
    })
    .await??;
    let b64 = base64::engine::general_purpose::STANDARD;
    for e in live.values() {
        let line = ExportedKey {
            key: b64.encode(&e.key),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            version: e.version,
            value: b64.encode(&e.value),
            lease: e.lease,
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
