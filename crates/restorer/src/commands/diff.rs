//! `etcd-restorer diff`: the keys added, changed and deleted between two
//! points, from the segments between them plus the state at `--from` of
//! only the keys they touched (see [`crate::diff`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use etcdpitr_common::bbolt::BoltReader;
use etcdpitr_common::layout;
use etcdpitr_common::Revision;
use serde::Serialize;

use super::{load, plan_span, ArchiveEvents, Scratch, Span};
use crate::diff::{DiffBuilder, KeyDiff, KeyState};
use crate::plan::Replay;
use crate::source;
use crate::synth::{self, EventSource};

/// What `diff` compares and prints.
#[derive(Clone, Debug, Default)]
pub struct DiffOptions {
    /// `--prefix`: only keys starting with it.
    pub prefix: Option<String>,
    /// `--values`: print the values too.
    pub values: bool,
    /// `--json`: JSON lines.
    pub json: bool,
}

/// A key's state in `diff --json` (schema in docs/restorer.md).
#[derive(Serialize)]
struct StateJson {
    create_revision: Revision,
    mod_revision: Revision,
    version: i64,
    lease: i64,
    value_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

/// One line of `diff --json`.
#[derive(Serialize)]
struct DiffLine {
    key: String,
    change: &'static str,
    before: Option<StateJson>,
    after: Option<StateJson>,
}

/// `etcd-restorer diff`.
///
/// # Errors
/// A span that is not restorable ([`crate::plan::PlanError`]), bad flags
/// ([`crate::UsageError`]), integrity (including an archive that
/// contradicts itself, [`crate::diff::MissingBefore`]), store and output
/// errors.
pub async fn diff(
    url: &str,
    key_files: &[PathBuf],
    span: &Span,
    options: &DiffOptions,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (archive, listing) = load(url, key_files).await?;
    let plan = plan_span(&archive, &listing, span).await?;
    let prefix = options.prefix.clone().unwrap_or_default();
    let builder = DiffBuilder::new(plan.from_revision(), prefix.as_bytes(), options.values);
    // The changes: every touched key's state at `to`.
    let mut builder = replay(&archive, plan.changes.clone(), builder, DiffBuilder::change)
        .await
        .context("read the changes")?;
    // The state at `from` of the touched keys that existed then: the
    // segments after the base snapshot first, the snapshot only for keys
    // still not found.
    if builder.pending() > 0 && !plan.from.segments.is_empty() {
        builder.next_stage();
        builder = replay(&archive, plan.from.replay(), builder, DiffBuilder::earlier)
            .await
            .context("read the segments before --from")?;
    }
    if builder.pending() > 0 {
        builder.next_stage();
        let (generation, base) = (plan.from.generation, plan.from.snapshot_revision);
        etcdpitr_common::cli::note(format_args!(
            "reading the base snapshot at revision {base} for {} keys",
            builder.pending()
        ));
        // The base snapshot is the cluster's data in plaintext: private
        // scratch, removed on every exit path.
        let scratch_dir = Scratch::new_in(&std::env::temp_dir())?;
        let scratch = scratch_dir.file("base.db");
        source::fetch_snapshot(
            &archive,
            generation,
            base,
            &scratch,
            etcdpitr_common::progress::Mode::Auto,
            etcdpitr_common::snapshot::BodyHash::Check,
        )
        .await
        .with_context(|| format!("fetch the base snapshot into {}", scratch.display()))?;
        builder = tokio::task::spawn_blocking(move || -> anyhow::Result<DiffBuilder> {
            let db = BoltReader::open(&scratch)?;
            synth::for_each_key_entry(&db, &mut |e| builder.earlier(&e))
                .with_context(|| format!("read {}", layout::snapshot_key(generation, base)))?;
            Ok(builder)
        })
        .await??;
    }
    for d in builder.finish()? {
        write_diff(out, &d, options)?;
    }
    out.flush()?;
    Ok(())
}

/// Feeds every event of `replay` to `f` on a blocking thread, returning the
/// builder.
async fn replay(
    archive: &etcdpitr_common::store::Archive,
    replay: Replay,
    mut builder: DiffBuilder,
    f: fn(&mut DiffBuilder, &etcdpitr_common::segment::Event),
) -> anyhow::Result<DiffBuilder> {
    let mut events = ArchiveEvents::new(archive, replay);
    tokio::task::spawn_blocking(move || -> anyhow::Result<DiffBuilder> {
        events.replay(
            &mut |r| {
                for e in &r.events {
                    f(&mut builder, e);
                }
                Ok(())
            },
            &mut |_| {},
        )?;
        Ok(builder)
    })
    .await?
}

fn state_json(s: &KeyState) -> StateJson {
    StateJson {
        create_revision: s.create_revision,
        mod_revision: s.mod_revision,
        version: s.version,
        lease: s.lease,
        value_size: s.value_size,
        value: s
            .value
            .as_ref()
            .map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
    }
}

fn write_diff(out: &mut dyn Write, d: &KeyDiff, options: &DiffOptions) -> anyhow::Result<()> {
    if options.json {
        let line = DiffLine {
            key: base64::engine::general_purpose::STANDARD.encode(&d.key),
            change: d.change.as_str(),
            before: d.before.as_ref().map(state_json),
            after: d.after.as_ref().map(state_json),
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
        return Ok(());
    }
    write!(out, "{:<7}  {}  ", d.change.as_str(), d.key.escape_ascii())?;
    let text = |s: &KeyState| {
        let value = s
            .value
            .as_ref()
            .map(|v| format!(" value=\"{}\"", v.escape_ascii()))
            .unwrap_or_default();
        format!(
            "mod_revision={} version={} value_size={}{value}",
            s.mod_revision, s.version, s.value_size
        )
    };
    match (&d.before, &d.after) {
        (Some(b), Some(a)) => write!(out, "{} -> {}", text(b), text(a))?,
        (Some(s), None) | (None, Some(s)) => write!(out, "{}", text(s))?,
        (None, None) => {}
    }
    out.write_all(b"\n")?;
    Ok(())
}
