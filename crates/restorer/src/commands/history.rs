//! `etcd-restorer history`: every change to a key or under a prefix between
//! two points, read from the segments alone and streamed as it is read.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine;
use etcdpitr_common::segment::{Event, EventKind, RevisionRecord};
use etcdpitr_common::Revision;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{load, plan_span, ArchiveEvents, Span};
use crate::format_ms;
use crate::synth::EventSource;

/// What `history` prints.
#[derive(Clone, Debug, Default)]
pub struct HistoryOptions {
    /// `--key`: the key, or with `prefix` the prefix.
    pub key: String,
    /// `--prefix`: every key starting with `key`.
    pub prefix: bool,
    /// `--values`: print the values too.
    pub values: bool,
    /// `--json`: JSON lines.
    pub json: bool,
}

/// Revisions' worth of matching changes buffered between the reader and the
/// writer: bounds memory when the output is slower than the archive.
const BUFFERED_REVISIONS: usize = 256;

/// One change, as the reader hands it to the writer.
struct Change {
    revision: Revision,
    observed_ms: i64,
    catching_up: bool,
    /// The value's length (the value itself is dropped without `--values`).
    value_size: usize,
    event: Event,
}

/// One line of `history --json` (schema in docs/restorer.md).
#[derive(Serialize)]
struct HistoryLine {
    revision: Revision,
    observed: String,
    catching_up: bool,
    key: String,
    #[serde(rename = "type")]
    kind: &'static str,
    create_revision: Revision,
    version: i64,
    lease: i64,
    value_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

/// `etcd-restorer history`.
///
/// # Errors
/// A span that is not restorable ([`crate::plan::PlanError`]), bad flags
/// ([`crate::UsageError`]), integrity, store and output errors. Lines
/// already printed stay printed when reading a later segment fails.
pub async fn history(
    url: &str,
    key_files: &[PathBuf],
    span: &Span,
    options: &HistoryOptions,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (archive, listing) = load(url, key_files).await?;
    let plan = plan_span(&archive, &listing, span).await?;
    let mut events = ArchiveEvents::new(&archive, plan.changes.clone());
    let (tx, mut rx) = mpsc::channel::<Vec<Change>>(BUFFERED_REVISIONS);
    let (key, prefix, values) = (
        options.key.as_bytes().to_vec(),
        options.prefix,
        options.values,
    );
    let matches = move |k: &[u8]| {
        if prefix {
            k.starts_with(&key)
        } else {
            k == key.as_slice()
        }
    };
    let reader = tokio::task::spawn_blocking(move || {
        events.replay(
            &mut |r: &RevisionRecord| {
                let batch: Vec<Change> = r
                    .events
                    .iter()
                    .filter(|e| matches(&e.key))
                    .map(|e| Change {
                        revision: r.revision,
                        observed_ms: r.observed_ms,
                        catching_up: r.catching_up,
                        value_size: e.value.len(),
                        event: Event {
                            value: if values { e.value.clone() } else { Vec::new() },
                            ..e.clone()
                        },
                    })
                    .collect();
                if !batch.is_empty() {
                    tx.blocking_send(batch)
                        .context("the output stopped taking lines")?;
                }
                Ok(())
            },
            &mut |_| {},
        )
    });
    while let Some(batch) = rx.recv().await {
        for change in batch {
            write_change(out, &change, options)?;
        }
    }
    reader.await??;
    out.flush()?;
    Ok(())
}

fn write_change(out: &mut dyn Write, c: &Change, options: &HistoryOptions) -> anyhow::Result<()> {
    let (e, value_size) = (&c.event, c.value_size);
    let kind = match e.kind {
        EventKind::Put => "put",
        EventKind::Delete => "delete",
    };
    if options.json {
        let b64 = base64::engine::general_purpose::STANDARD;
        let line = HistoryLine {
            revision: c.revision,
            observed: format_ms(c.observed_ms),
            catching_up: c.catching_up,
            key: b64.encode(&e.key),
            kind,
            create_revision: e.create_revision,
            version: e.version,
            lease: e.lease,
            value_size,
            value: (options.values && e.kind == EventKind::Put).then(|| b64.encode(&e.value)),
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
        return Ok(());
    }
    write!(
        out,
        "{}  {}  {kind:<6}  {}",
        c.revision,
        format_ms(c.observed_ms),
        e.key.escape_ascii()
    )?;
    if e.kind == EventKind::Put {
        write!(
            out,
            "  create_revision={} version={} lease={} value_size={value_size}",
            e.create_revision, e.version, e.lease
        )?;
        if options.values {
            write!(out, " value=\"{}\"", e.value.escape_ascii())?;
        }
    }
    if c.catching_up {
        out.write_all(b"  (observed while catching up)")?;
    }
    out.write_all(b"\n")?;
    Ok(())
}
