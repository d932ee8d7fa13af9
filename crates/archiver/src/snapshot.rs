//! Full snapshots: streamed from etcd's Maintenance API (never whole in
//! memory) into two scratch files at once, the file itself and the
//! snapshot object it compresses into; the revision is read from the file
//! itself and written into the object's header, then the object is
//! uploaded.

use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::Client;
use etcdpitr_common::bbolt::{self, BoltReader};
use etcdpitr_common::catalog::Catalog;
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::manifest::LineageFingerprint;
use etcdpitr_common::progress::{Mode, Progress, Unit};
use etcdpitr_common::snapshot::{BodyWritten, ObjectWriter, SnapshotHeader};
use etcdpitr_common::store::{Archive, PRIVATE_FILE_MODE};
use etcdpitr_common::{now_ms, Revision};

use crate::observe::SnapshotDone;
use crate::tip::SharedTip;

/// An archived snapshot.
#[derive(Clone, Copy, Debug)]
pub struct Taken {
    /// Its lineage fingerprint, if one could be recorded.
    pub fingerprint: Option<LineageFingerprint>,
    /// Revision, time, duration and bytes uploaded.
    pub done: SnapshotDone,
}

/// Takes one snapshot into `generation`, refusing it if its revision is
/// below `min_revision` (the generation's start: such a file would belong
/// to an older history). Its header names `tip`'s newest archived segment
/// as its predecessor in the hash chain; once archived, it becomes `tip`'s
/// newest snapshot. Returns its revision, lineage fingerprint, duration
/// and the bytes uploaded.
///
/// The file is compressed into the snapshot object as it arrives from
/// etcd (on a blocking thread fed through a bounded queue, so memory stays
/// flat at any database size); its two long steps (receiving, uploading)
/// show their progress per `progress`.
///
/// Dropping it midway leaves at most scratch files, removed on the next run.
///
/// # Errors
/// etcd, local I/O or store failures.
#[allow(clippy::too_many_arguments)]
pub async fn take(
    client: &mut Client,
    archive: &Archive,
    catalog: &Arc<Mutex<Catalog>>,
    data_dir: &Path,
    generation: GenerationId,
    min_revision: Revision,
    tip: &SharedTip,
    progress: Mode,
) -> anyhow::Result<Taken> {
    let started = std::time::Instant::now();
    let taken_ms = now_ms();
    let db_path = data_dir.join("snapshot.db.tmp");
    let obj_path = data_dir.join("snapshot.snap.tmp");
    // Snapshots are hours apart: the auth token has usually expired since
    // this connection last used it.
    let mut stream = crate::etcd::with_fresh_token(client, || {
        let mut maintenance = client.maintenance_client();
        async move { maintenance.snapshot().await }
    })
    .await
    .context("start etcd snapshot")?;
    let (chunks, received) = tokio::sync::mpsc::channel(RECEIVE_QUEUE_CHUNKS);
    let (db_scratch, obj_scratch) = (db_path.clone(), obj_path.clone());
    let writing =
        tokio::task::spawn_blocking(move || write_scratch(&db_scratch, &obj_scratch, received));
    let receiving = Progress::new(progress, "receive etcd snapshot", Unit::Bytes, None);
    let mut db_bytes = 0u64;
    let streamed = async {
        while let Some(mut chunk) = stream.message().await.context("receive etcd snapshot")? {
            if db_bytes == 0 {
                // The first message says how much follows; etcd sends the
                // file's sha256 after it, in one more message.
                receiving.set_total(chunk.blob().len() as u64 + chunk.remaining_bytes() + 32);
            }
            let blob = std::mem::take(&mut chunk.0.blob);
            let n = blob.len() as u64;
            if chunks.send(blob).await.is_err() {
                // The writer stopped: its error says why.
                break;
            }
            db_bytes += n;
            receiving.inc(n);
        }
        anyhow::Ok(())
    }
    .await;
    drop(chunks);
    let body = writing
        .await
        .context("write the snapshot's scratch files")?;
    streamed?;
    let body = body?;
    receiving.finish();

    let header_db = db_path.clone();
    let newest = tip.get();
    if newest.generation != generation {
        bail!("generation {generation} is no longer being written");
    }
    let (prev_revision, prev_digest) = newest.segment;
    let header = tokio::task::spawn_blocking(move || -> anyhow::Result<SnapshotHeader> {
        let reader = BoltReader::open(&header_db).context("read the snapshot's revision")?;
        let revision = bbolt::etcd_revision(&reader).context("read the snapshot's revision")?;
        let header = SnapshotHeader {
            generation: generation.0,
            revision,
            taken_ms,
            db_bytes: body.db_bytes,
            db_blake3: body.db_blake3,
            prev_digest,
            prev_revision,
        };
        body.write_header(&header)
            .context("write the snapshot object's header")?;
        Ok(header)
    })
    .await??;
    // Dropping a file of the database's size takes a while: done while the
    // object uploads.
    let removing = async { tokio::fs::remove_file(&db_path).await.ok() };
    if header.revision < min_revision {
        bail!(
            "snapshot revision {} is below the generation's start {min_revision}",
            header.revision
        );
    }
    let key = layout::snapshot_key(generation, header.revision);
    let object_bytes = tokio::fs::metadata(&obj_path).await?.len();
    // A snapshot name carries its revision: an existing object at that name
    // is a complete snapshot of the same revision (multipart uploads appear
    // atomically), so it is kept rather than overwritten.
    let exists = archive
        .exists(&key)
        .await
        .with_context(|| format!("check snapshot {key}"))?;
    if exists {
        tracing::info!(snapshot = %key, "snapshot of this revision already archived");
    }
    let uploading = (!exists).then(|| {
        Progress::new(
            progress,
            format!("upload snapshot at revision {}", header.revision),
            Unit::Bytes,
            Some(object_bytes),
        )
    });
    let staging = async {
        match &uploading {
            Some(uploading) => archive
                .stage_file(&key, &obj_path, uploading)
                .await
                .map(Some),
            None => Ok(None),
        }
    };
    // The fingerprint goes first: without its snapshot it is still true,
    // while a snapshot without one could not prove its lineage later. So
    // the upload runs meanwhile, but completes only once it is recorded.
    let recording = crate::lineage::record(client, archive, generation, header.revision);
    let (fingerprint, staged, _) = tokio::join!(recording, staging, removing);
    let fingerprint = match fingerprint {
        Ok(f) => f,
        Err(e) => {
            if let Ok(Some(staged)) = staged {
                staged.abort().await.ok();
            }
            return Err(e.context("record the snapshot's lineage fingerprint"));
        }
    };
    let staged = staged.with_context(|| format!("upload snapshot {key}"))?;
    let mut uploaded_bytes = 0;
    if let Some(staged) = staged {
        staged
            .complete()
            .await
            .with_context(|| format!("upload snapshot {key}"))?;
        if let Some(uploading) = uploading {
            uploading.finish();
        }
        uploaded_bytes = object_bytes;
    }
    // Segments commit to what the store holds: another taker of the same
    // revision (the `snapshot` command, a second writer) may have won.
    let digest = etcdpitr_common::snapshot::read_header(archive, generation, header.revision)
        .await
        .with_context(|| format!("read the header of {key}"))?
        .digest();
    tip.snapshot_archived(generation, header.revision, digest);
    tokio::fs::remove_file(&obj_path).await.ok();
    remove_abandoned_uploads(archive, generation).await;
    catalog.lock().expect("catalog lock").put_snapshot(
        generation,
        header.revision,
        object_bytes,
        taken_ms,
    )?;
    let duration = started.elapsed();
    tracing::info!(
        snapshot = %key,
        revision = header.revision,
        db_bytes,
        object_bytes,
        seconds = duration.as_secs_f64(),
        "snapshot archived"
    );
    Ok(Taken {
        fingerprint,
        done: SnapshotDone {
            revision: header.revision,
            taken_ms,
            duration,
            uploaded_bytes,
        },
    })
}

/// How long nothing may have written to a staging file of a `file://`
/// upload before it counts as abandoned. An upload streams a local scratch
/// file into its staging file, so a live one never pauses this long.
pub const ABANDONED_UPLOAD_IDLE: Duration = Duration::from_hours(1);

/// Removes the staging files (`<object>#<n>`) that uploads into a `file://`
/// archive killed midway (`kill -9`, power loss) left in `generation`'s
/// snapshot and segment directories: those whose object exists, or that
/// nothing wrote to for [`ABANDONED_UPLOAD_IDLE`]
/// ([`Archive::remove_abandoned_uploads`] has the rule). Runs at start and
/// after each snapshot; only logs on failure. A no-op for cloud stores.
pub async fn remove_abandoned_uploads(archive: &Archive, generation: GenerationId) {
    for kind in ["snapshots", "segments"] {
        let dir = format!("{}/{kind}", generation.dir_name());
        match archive
            .remove_abandoned_uploads(&dir, ABANDONED_UPLOAD_IDLE)
            .await
        {
            Ok(removed) => {
                for key in removed {
                    tracing::info!(staging = %key, "removed the staging file of an interrupted upload");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, dir, "cannot clean staging files of interrupted uploads");
            }
        }
    }
}

/// etcd's snapshot messages (32 KiB each) queued between the gRPC stream and
/// the thread writing the scratch files: a few MiB, so that neither waits
/// on the other's hiccups while memory stays bounded.
const RECEIVE_QUEUE_CHUNKS: usize = 128;

/// Scratch-file write buffer.
const SCRATCH_BUFFER_BYTES: usize = 1 << 20;

/// Writes the etcd snapshot file as it arrives on `received` into two
/// scratch files at once: the file itself at `db_path` (only read for its
/// revision, so it is not fsynced), and the snapshot object at `obj_path`,
/// compressed and hashed on the way, its header left to fill in. Both are
/// new files.
fn write_scratch(
    db_path: &Path,
    obj_path: &Path,
    mut received: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> anyhow::Result<BodyWritten<BufWriter<std::fs::File>>> {
    let create = |path: &Path| {
        // A new file, never an old one truncated: a `file://` archive may
        // hold an earlier object file as a hard link to it.
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::Error::from(e).context(format!("remove {}", path.display())))
            }
            _ => {}
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .open(path)
            .map(|f| BufWriter::with_capacity(SCRATCH_BUFFER_BYTES, f))
            .with_context(|| format!("create {}", path.display()))
    };
    let mut db = create(db_path)?;
    let mut object = ObjectWriter::new(create(obj_path)?)
        .with_context(|| format!("write {}", obj_path.display()))?;
    while let Some(chunk) = received.blocking_recv() {
        db.write_all(&chunk)
            .with_context(|| format!("write {}", db_path.display()))?;
        object
            .write(&chunk)
            .with_context(|| format!("write {}", obj_path.display()))?;
    }
    db.flush()
        .with_context(|| format!("write {}", db_path.display()))?;
    object
        .finish_body()
        .with_context(|| format!("write {}", obj_path.display()))
}

/// Removes scratch files a killed run may have left.
pub fn clean_scratch(data_dir: &Path) {
    for name in ["snapshot.db.tmp", "snapshot.snap.tmp"] {
        match std::fs::remove_file(data_dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, file = name, "cannot remove scratch file"),
        }
    }
}
