//! Reading an archive for a restore: verified snapshots, verified segment
//! records, and placing a wall-clock time on a revision.

use std::path::Path;

use anyhow::Context;
use bytes::Bytes;
use etcdpitr_common::chain::{self, Observed, TimeDoubt, Timeline};
use etcdpitr_common::layout::{self, GenerationId, SegmentName};
use etcdpitr_common::listing::{ArchiveListing, GenerationListing};
use etcdpitr_common::manifest::ClockStep;
use etcdpitr_common::progress::{Mode, Progress, Unit};
use etcdpitr_common::relay;
use etcdpitr_common::segment::{self, Record, RecordReader, SegmentHeader};
use etcdpitr_common::snapshot::{self, BodyHash, SnapshotHeader};
use etcdpitr_common::store::{Archive, StoreError};
use etcdpitr_common::Revision;
use tokio::sync::mpsc;
use tokio_util::io::SyncIoBridge;

use crate::plan::{self, PlanError};
use crate::point::{AfterNewest, Currency, TimeRules};

/// The reading end of [`read_downloaded`]'s pipe.
type Piped = std::io::BufReader<SyncIoBridge<tokio::io::DuplexStream>>;

/// Downloads object `key` into one end of a pipe while `read` consumes the
/// other on a blocking thread (the ranges in flight are the read-ahead; the
/// pipe only decouples). When both fail, the cause is named: `read`'s error
/// if it stopped first (a damaged object closes the pipe under the
/// download), else the download's (a failed download cuts the object
/// short).
async fn read_downloaded<T: Send + 'static>(
    archive: &Archive,
    key: &str,
    read: impl FnOnce(&mut Piped) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (mut sending, receiving) = tokio::io::duplex(2 * relay::CHUNK_BYTES);
    let reading = tokio::task::spawn_blocking(move || {
        read(&mut std::io::BufReader::new(SyncIoBridge::new(receiving)))
    });
    let download = async {
        let result = archive.download(key, &mut sending).await;
        // The end of the pipe: the reader sees the end of the object.
        drop(sending);
        result
    };
    let (downloaded, read) = tokio::join!(download, reading);
    match (downloaded, read?) {
        (Ok(_), read) => read,
        (Err(StoreError::Io(e)), Err(cause)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            Err(cause)
        }
        (Err(e), _) => Err(anyhow::Error::from(e).context(format!("download {key}"))),
    }
}

/// Fetches snapshot object `(generation, revision)` and writes the etcd
/// snapshot file it holds to `db_path` as it arrives (parallel ranged
/// reads feeding the decompression; nothing is staged), checking it:
/// length (and blake3 per `hash`) against its header, header against its
/// name, and the revision of the bbolt content against the header. Shows
/// the bytes written per `progress`. A restore defers the hash
/// ([`BodyHash::Deferred`]) to its read-back ([`crate::synth::seal`]
/// compares the base's bytes with the header's `db_blake3`), which reads
/// every byte anyway, so that gigabytes are hashed once; when it fails,
/// [`check_snapshot_object`] tells a damaged archive from a local fault.
///
/// # Errors
/// Store failures or an integrity error naming the object.
pub async fn fetch_snapshot(
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
    db_path: &Path,
    progress: Mode,
    hash: BodyHash,
) -> anyhow::Result<SnapshotHeader> {
    let key = layout::snapshot_key(generation, revision);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(db_path)
        .with_context(|| format!("create {}", db_path.display()))?;
    let fetching = Progress::new(
        progress,
        format!("fetch snapshot at revision {revision}"),
        Unit::Bytes,
        None,
    );
    let (object, fetch_progress) = (key.clone(), fetching.clone());
    let header = read_downloaded(archive, &key, move |input| {
        // The header (read ahead here) gives the file's length.
        if let Ok(h) = SnapshotHeader::decode(&object, std::io::BufRead::fill_buf(input)?) {
            fetch_progress.set_total(h.db_bytes);
        }
        let mut out = std::io::BufWriter::with_capacity(1 << 20, fetch_progress.counting(out));
        let header = snapshot::read_object(&object, input, &mut out, hash)?;
        std::io::Write::flush(&mut out).map_err(|source| snapshot::SnapshotError::Io {
            object: object.clone(),
            source,
        })?;
        anyhow::Ok(header)
    })
    .await?;
    fetching.finish();
    if header.revision != revision || header.generation != generation.0 {
        return Err(chain::IntegrityError::new(
            key,
            format!(
                "header says generation {} revision {}, its name says generation {generation} revision {revision}",
                header.generation, header.revision
            ),
        )
        .into());
    }
    let db = db_path.to_owned();
    tokio::task::spawn_blocking(move || snapshot::check_content_revision(&key, &header, &db))
        .await??;
    Ok(header)
}

/// Downloads snapshot object `(generation, revision)` and checks its
/// content against its header (length and blake3) without keeping it.
///
/// # Errors
/// Store failures or an integrity error naming the object.
pub async fn check_snapshot_object(
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
) -> anyhow::Result<()> {
    let key = layout::snapshot_key(generation, revision);
    let object = key.clone();
    read_downloaded(archive, &key, move |input| {
        snapshot::read_object(&object, input, &mut std::io::sink(), BodyHash::Check)?;
        Ok(())
    })
    .await
}

/// Downloads a snapshot object and checks its content against its header
/// (length, blake3 and the revision of the bbolt content), holding the
/// file at `scratch` (in a private directory) only while it is checked.
///
/// # Errors
/// Store failures or an integrity error naming the object.
pub async fn verify_snapshot(
    archive: &Archive,
    generation: GenerationId,
    revision: Revision,
    scratch: &Path,
) -> anyhow::Result<SnapshotHeader> {
    // Shown as one object of `verify`'s own progress.
    let checked = fetch_snapshot(
        archive,
        generation,
        revision,
        scratch,
        Mode::Hidden,
        BodyHash::Check,
    )
    .await;
    tokio::fs::remove_file(scratch).await.ok();
    checked
}

/// Segments fetched at once ahead of the one being replayed: a store's
/// latency per request is paid about once per this many segments...
const PREFETCH: usize = 6;
/// ...as long as that many of the largest segment seen so far fit in this
/// many bytes: segments of incompressible values (Secrets encrypted at
/// rest) reach the archiver's 16 MiB, and memory must not grow with them.
const PREFETCH_BYTES: usize = 24 << 20;

/// Fetches `segments` in a background task, [`PREFETCH`] requests in
/// flight (fewer for large segments, see [`PREFETCH_BYTES`]), delivered in
/// order. Each item is the object key and its bytes (not yet checked).
pub fn prefetch_segments(
    archive: Archive,
    generation: GenerationId,
    segments: Vec<SegmentName>,
) -> mpsc::Receiver<anyhow::Result<(String, Bytes)>> {
    use futures::StreamExt;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let archive = &archive;
        let fetch = |name: SegmentName| async move {
            let key = layout::segment_key(generation, &name);
            archive
                .get(&key)
                .await
                .with_context(|| format!("download {key}"))
                .map(|b| (key, b))
        };
        let mut names = segments.into_iter();
        let mut in_flight = futures::stream::FuturesOrdered::new();
        // The largest segment seen; sizes are known once segments arrive:
        // two at first.
        let mut largest: Option<usize> = None;
        loop {
            let allowed = largest.map_or(2, |l| (PREFETCH_BYTES / l.max(1)).clamp(1, PREFETCH));
            while in_flight.len() < allowed {
                let Some(name) = names.next() else { break };
                in_flight.push_back(fetch(name));
            }
            let Some(result) = in_flight.next().await else {
                return;
            };
            if let Ok((_, bytes)) = &result {
                largest = largest.max(Some(bytes.len()));
            }
            let failed = result.is_err();
            if tx.send(result).await.is_err() || failed {
                return;
            }
        }
    });
    rx
}

/// Checks a segment and passes each of its records to `f`.
///
/// # Errors
/// An integrity error naming the object, or what `f` returns.
pub fn for_each_record(
    key: &str,
    bytes: &[u8],
    generation: GenerationId,
    expected: &SegmentName,
    f: &mut dyn FnMut(Record) -> anyhow::Result<()>,
) -> anyhow::Result<SegmentHeader> {
    let (header, body) = segment::open(key, bytes)?;
    chain::check_segment_header(key, generation, expected, &header)?;
    let mut reader = RecordReader::new(key, &header, body)?;
    while let Some(record) = reader.next_record()? {
        f(record)?;
    }
    Ok(header)
}

/// The revision chosen for a `--time` target.
#[derive(Clone, Debug)]
pub struct TimeChoice {
    /// The time placed (Unix ms).
    pub time_ms: i64,
    /// Generation the time was placed in.
    pub generation: GenerationId,
    /// The last revision observed at or before the time.
    pub revision: Revision,
    /// When that revision was observed (Unix ms), if it was observed here.
    pub observed_ms: Option<i64>,
    /// Set when the next revision was observed during a catch-up: it may
    /// have been committed before the requested time (earliest possible
    /// commit time, Unix ms).
    pub uncertain_after_ms: Option<i64>,
    /// Set when the time is after the archive's newest vouched moment and
    /// the archive is current: the newest revision was taken
    /// ([`TimeRules::after_newest`]).
    pub newest: Option<Currency>,
}

/// Reads the clock steps recorded in generation `g` (few: one per wall
/// clock step the archiver saw) into its [`Timeline`].
///
/// # Errors
/// Store failures; a malformed step object names itself.
pub async fn load_timeline(archive: &Archive, g: &GenerationListing) -> anyhow::Result<Timeline> {
    let mut steps = Vec::with_capacity(g.clock_steps.len());
    for name in &g.clock_steps {
        let key = layout::clock_step_key(g.generation(), name);
        let bytes = archive
            .get(&key)
            .await
            .with_context(|| format!("download {key}"))?;
        steps.push(ClockStep::parse_named(&key, &bytes, name)?);
    }
    Ok(Timeline::new(&g.clock_epochs, &steps))
}

/// The observed time of `revision` in link `name` of generation `g`.
pub(crate) async fn observed_in(
    archive: &Archive,
    g: GenerationId,
    name: &SegmentName,
    revision: Revision,
) -> anyhow::Result<Option<i64>> {
    let key = layout::segment_key(g, name);
    let bytes = archive
        .get(&key)
        .await
        .with_context(|| format!("download {key}"))?;
    let mut found = None;
    for_each_record(&key, &bytes, g, name, &mut |record| {
        if let Record::Revision(r) = record {
            if r.revision == revision {
                found = Some(r.observed_ms);
            }
        }
        Ok(())
    })?;
    Ok(found)
}

/// The observed time of `last`, the chain's last revision, read from the
/// last link that holds it (`None` when no segment holds it: the base
/// snapshot is the newest revision).
async fn observed_last(
    archive: &Archive,
    g: GenerationId,
    links: &[SegmentName],
    last: Revision,
) -> anyhow::Result<Option<i64>> {
    match links
        .iter()
        .rev()
        .find(|s| !s.is_empty() && s.first <= last && last <= s.last)
    {
        Some(link) => observed_in(archive, g, link, last).await,
        None => Ok(None),
    }
}

/// A signed duration in seconds with milliseconds, e.g. `+60.000 s`.
fn format_offset(ms: i64) -> String {
    let sign = if ms < 0 { '-' } else { '+' };
    let abs = ms.unsigned_abs();
    format!("{sign}{}.{:03} s", abs / 1000, abs % 1000)
}

/// The step's description: where it was recorded, its size and times.
fn describe_step(generation: GenerationId, step: &ClockStep) -> String {
    format!(
        "in generation {generation} (clock epoch from revision {}), after revision {} the wall clock read {} while the archiver's anchored clock read {} (a step of {})",
        step.epoch_first,
        step.at_revision,
        crate::format_ms(step.wall_ms),
        crate::format_ms(step.anchored_ms),
        format_offset(step.offset_ms)
    )
}

/// Explains a doubt: the step, and the revisions around the time.
fn describe_doubt(
    generation: GenerationId,
    doubt: &TimeDoubt,
    chosen: Option<Observed>,
    next: Option<Observed>,
    timeline: &Timeline,
) -> String {
    let step = match doubt {
        TimeDoubt::ChosenMayBeLater { step, .. } | TimeDoubt::NextMayBeEarlier { step, .. } => step,
    };
    let around: Vec<String> = [chosen, next]
        .into_iter()
        .flatten()
        .map(|r| {
            let u = timeline.uncertainty(r.revision);
            format!(
                "revision {} was observed at {} and committed between {} and {}",
                r.revision,
                crate::format_ms(r.observed_ms),
                crate::format_ms(r.observed_ms - u.back_ms),
                crate::format_ms(r.observed_ms + u.fwd_ms)
            )
        })
        .collect();
    format!("{}; {}", describe_step(generation, step), around.join("; "))
}

/// Places `time_ms` on a revision: the last one observed at or before it,
/// unless a recorded clock step makes that ambiguous (see
/// [`chain::check_time_choice`]). A time after the newest moment the
/// archive's newest generation vouches for takes its newest revision when
/// `rules` find the archive current and the time not in the future
/// ([`TimeRules::after_newest`]).
///
/// # Errors
/// [`PlanError::TimeNotCovered`] when the time is outside every generation,
/// in a gap, in the future, or after the newest vouched moment of an
/// archive that is not current; [`PlanError::ClockStep`] when a clock step
/// makes the answer ambiguous; store or integrity errors.
pub async fn resolve_time(
    archive: &Archive,
    listing: &ArchiveListing,
    time_ms: i64,
    time_text: &str,
    only: Option<GenerationId>,
    rules: &TimeRules,
) -> anyhow::Result<TimeChoice> {
    let not_covered = |why: String| PlanError::TimeNotCovered {
        time: crate::point::label_time(time_text, time_ms),
        why,
        ranges: plan::ranges(listing),
    };
    let generations: Vec<_> = listing
        .generations
        .iter()
        .rev()
        .filter(|g| only.is_none_or(|id| g.id == Some(id)))
        .collect();
    for (newest, g) in generations.iter().enumerate().map(|(i, g)| (i == 0, g)) {
        let started_ms = g.manifest.as_ref().map_or(i64::MIN, |m| m.started_ms);
        if time_ms < started_ms {
            continue;
        }
        let chain = g.chain();
        let links = &chain.links;
        let timeline = load_timeline(archive, g).await?;
        let Some(i) = links.iter().position(|s| s.end_ms >= time_ms) else {
            let latest = links.iter().map(|s| s.end_ms).max().unwrap_or(started_ms);
            let last = chain.last_revision();
            let archive_newest = listing.generations.last().and_then(|n| n.id) == g.id;
            // A clock step may put the archived moments later than observed.
            let step = timeline
                .widest_step(last, false)
                .filter(|step| latest.saturating_add(step.offset_ms) >= time_ms);
            let mut why = if !newest {
                format!(
                    "falls in the gap after generation {} (archived until {})",
                    g.generation(),
                    crate::format_ms(latest)
                )
            } else if !archive_newest || links.is_empty() || step.is_some() {
                format!(
                    "is after the last archived moment ({})",
                    crate::format_ms(latest)
                )
            } else {
                match rules.after_newest(time_ms, latest) {
                    AfterNewest::Newest(currency) => {
                        return Ok(TimeChoice {
                            time_ms,
                            generation: g.generation(),
                            revision: last,
                            observed_ms: observed_last(archive, g.generation(), links, last)
                                .await?,
                            uncertain_after_ms: None,
                            newest: Some(currency),
                        });
                    }
                    AfterNewest::Future => format!(
                        "is in the future (now is {}); the archive's newest revision {last} was current at {}",
                        crate::format_ms(rules.now_ms),
                        crate::format_ms(latest)
                    ),
                    AfterNewest::Stale(currency) => format!(
                        "is after the last archived moment ({}): the archive vouches that the source was at revision {last} then, but it is not current (older than {}: the archiver may be stopped or behind), so what happened after it is unknown; restore --revision {last} to take the newest archived revision anyway, check the archiver, or raise --max-staleness",
                        currency.describe_vouched(),
                        currency.describe_bound()
                    ),
                }
            };
            if let Some(step) = step {
                why += &format!(
                    " as the archiver observed it, but its wall clock stepped: {}, so that moment may truly be as late as {}; restore a revision you choose with --revision",
                    describe_step(g.generation(), step),
                    crate::format_ms(latest.saturating_add(step.offset_ms))
                );
            }
            return Err(not_covered(why).into());
        };
        let name = links[i];
        let key = layout::segment_key(g.generation(), &name);
        let bytes = archive
            .get(&key)
            .await
            .with_context(|| format!("download {key}"))?;
        // Links may overlap: revisions an earlier link holds are replayed
        // from it (and were observed before `time_ms`, as its `end_ms` is),
        // so this link's own copies of them do not count.
        let earlier = links[..i].iter().rev().find(|s| !s.is_empty()).copied();
        let floor = earlier.map_or(name.prev(), |e| e.last.max(name.prev()));
        let mut choice = TimeChoice {
            time_ms,
            generation: g.generation(),
            revision: floor,
            observed_ms: None,
            uncertain_after_ms: None,
            newest: None,
        };
        let mut before_ms: Option<i64> = None;
        let mut seen: Vec<Observed> = Vec::new();
        for_each_record(&key, &bytes, g.generation(), &name, &mut |record| {
            if let Record::Revision(r) = record {
                if r.revision <= floor {
                    return Ok(());
                }
                seen.push(Observed {
                    revision: r.revision,
                    observed_ms: r.observed_ms,
                });
                if r.observed_ms <= time_ms {
                    choice.revision = r.revision;
                    choice.observed_ms = Some(r.observed_ms);
                    if !r.catching_up {
                        before_ms = Some(r.observed_ms);
                    }
                } else if choice.uncertain_after_ms.is_none()
                    && r.catching_up
                    && r.revision == choice.revision + 1
                {
                    choice.uncertain_after_ms = Some(before_ms.unwrap_or(started_ms));
                }
            }
            Ok(())
        })?;
        if choice.observed_ms.is_none() {
            // The chosen revision ends an earlier segment: read its time there.
            if let Some(earlier) = earlier {
                choice.observed_ms =
                    observed_in(archive, g.generation(), &earlier, choice.revision).await?;
            }
        }
        let chosen = choice.observed_ms.map(|observed_ms| Observed {
            revision: choice.revision,
            observed_ms,
        });
        let following = choice.revision + 1;
        let mut next = seen.iter().copied().find(|o| o.revision == following);
        if next.is_none() && timeline.uncertainty(following).back_ms > 0 {
            // The next revision opens a later link: read its time there.
            if let Some(later) = links[i + 1..]
                .iter()
                .find(|s| s.first <= following && following <= s.last)
            {
                next = observed_in(archive, g.generation(), later, following)
                    .await?
                    .map(|observed_ms| Observed {
                        revision: following,
                        observed_ms,
                    });
            }
        }
        if let Err(doubt) = chain::check_time_choice(&timeline, time_ms, chosen, next) {
            return Err(PlanError::ClockStep {
                time: time_text.to_owned(),
                detail: describe_doubt(g.generation(), &doubt, chosen, next, &timeline),
            }
            .into());
        }
        return Ok(choice);
    }
    Err(not_covered("is before the first archived moment".into()).into())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use etcdpitr_common::crypto::Keyring;
    use etcdpitr_common::manifest::{ArchiveManifest, ClockEpoch, GenerationManifest, StartReason};
    use etcdpitr_common::segment::{Event, EventKind, RevisionRecord, SegmentBuilder};

    use super::*;

    async fn put(archive: &Archive, key: &str, json: Vec<u8>) {
        archive.put_once(key, Bytes::from(json)).await.unwrap();
    }

    /// Generation 1 from revision 10: revisions 11..=13 observed at 1, 2
    /// and 3 s, 14..=16 at 4, 5 and 6 s (then progress to 6.5 s), all in a
    /// clock epoch from revision 11, with `steps`, and `epochs` more.
    async fn archive(
        steps: &[(Revision, i64)],
        epochs: &[Revision],
    ) -> (tempfile::TempDir, Archive) {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open(&format!("file://{}", dir.path().display())).unwrap();
        put(
            &archive,
            layout::MANIFEST_NAME,
            serde_json::to_vec(&ArchiveManifest::new(0, &Keyring::default())).unwrap(),
        )
        .await;
        let g = GenerationId(1);
        let manifest = GenerationManifest {
            generation: g,
            cluster_id: 1,
            start_revision: 10,
            started_ms: 500,
            reason: StartReason::NewArchive,
            previous: None,
            detail: String::new(),
            term: 0,
            previous_digest: None,
        };
        put(
            &archive,
            &layout::generation_manifest_key(g),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .await;
        for (prev, revisions, progress) in [(10, 11..=13, None), (13, 14..=16, Some(6_500))] {
            let mut b = SegmentBuilder::new(1, prev, [0; 32]).unwrap();
            for revision in revisions {
                b.push_revision(&RevisionRecord {
                    revision,
                    observed_ms: (revision - 10) * 1_000,
                    catching_up: false,
                    events: vec![Event {
                        kind: EventKind::Put,
                        key: b"k".to_vec(),
                        value: revision.to_string().into_bytes(),
                        create_revision: 11,
                        mod_revision: revision,
                        version: revision - 10,
                        lease: 0,
                    }],
                })
                .unwrap();
            }
            if let Some(ms) = progress {
                b.push(&Record::Progress {
                    revision: 16,
                    observed_ms: ms,
                })
                .unwrap();
            }
            let (name, bytes) = b.finish().unwrap();
            put(&archive, &layout::segment_key(g, &name), bytes).await;
        }
        for &first in std::iter::once(&11).chain(epochs) {
            let epoch = ClockEpoch {
                epoch_first: first,
                anchor_ms: 0,
                began_ms: 0,
                floor_ms: 0,
                holder: "test/1".into(),
            };
            put(
                &archive,
                &layout::clock_epoch_key(g, first),
                serde_json::to_vec(&epoch).unwrap(),
            )
            .await;
        }
        for &(at, offset_ms) in steps {
            let anchored_ms = (at - 10) * 1_000 + 100;
            let step = ClockStep {
                epoch_first: 11,
                at_revision: at,
                anchored_ms,
                wall_ms: anchored_ms + offset_ms,
                offset_ms,
            };
            put(
                &archive,
                &layout::clock_step_key(g, &step.name()),
                serde_json::to_vec(&step).unwrap(),
            )
            .await;
        }
        (dir, archive)
    }

    /// Times are placed at a "now" long after the archive (1970): a time
    /// after its newest moment is refused as stale.
    async fn resolve(archive: &Archive, time_ms: i64) -> anyhow::Result<TimeChoice> {
        resolve_at(archive, time_ms, TimeRules::now(false, None)).await
    }

    async fn resolve_at(
        archive: &Archive,
        time_ms: i64,
        rules: TimeRules,
    ) -> anyhow::Result<TimeChoice> {
        let listing = ArchiveListing::load(archive).await.unwrap();
        resolve_time(archive, &listing, time_ms, "T", None, &rules).await
    }

    #[tokio::test]
    async fn a_time_after_the_newest_moment_of_a_current_archive_takes_the_newest_revision() {
        // The archive vouches for revision 16 until 6.5 s.
        let (_dir, a) = archive(&[], &[]).await;
        let at = |now_ms| TimeRules {
            now_ms,
            utc: false,
            max_staleness_ms: 120_000,
        };
        let c = resolve_at(&a, 9_000, at(10_000)).await.unwrap();
        assert_eq!((c.revision, c.observed_ms), (16, Some(6_000)));
        let currency = c.newest.expect("taken as the newest");
        assert_eq!((currency.vouched_ms, currency.age_ms), (6_500, 3_500));
        let text = crate::point::describe_time_choice("now", &c);
        assert!(
            text.starts_with("time now (1970-01-01T00:00:09.000Z) -> revision 16 (generation 1, observed 1970-01-01T00:00:06.000Z); the archive's newest revision: the time is after its newest vouched moment 1970-01-01T00:00:06.500Z (3.500 s ago), and the archive is current (within --max-staleness 2m)"),
            "{text}"
        );
        // Inside the archive nothing changes.
        let c = resolve_at(&a, 5_500, at(10_000)).await.unwrap();
        assert_eq!((c.revision, c.newest), (15, None));
        // In the future: refused.
        let e = resolve_at(&a, 11_000, at(10_000)).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("is in the future (now is 1970-01-01T00:00:10.000Z)"),
            "{e}"
        );
        assert_eq!(crate::classify(&e), crate::ExitKind::NotRestorable);
        // Stale: refused, naming the moment, the bound and the way on.
        let e = resolve_at(&a, 9_000, at(300_000)).await.unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(
                "is after the last archived moment (1970-01-01T00:00:06.500Z (293.500 s ago))"
            ),
            "{text}"
        );
        assert!(text.contains("older than --max-staleness 2m"), "{text}");
        assert!(text.contains("--revision 16"), "{text}");
        assert_eq!(crate::classify(&e), crate::ExitKind::NotRestorable);
    }

    #[tokio::test]
    async fn without_steps_the_last_revision_observed_is_chosen() {
        let (_dir, a) = archive(&[], &[]).await;
        let c = resolve(&a, 3_500).await.unwrap();
        assert_eq!((c.revision, c.observed_ms), (13, Some(3_000)));
        let c = resolve(&a, 900).await.unwrap();
        assert_eq!((c.revision, c.observed_ms), (10, None));
    }

    #[tokio::test]
    async fn a_step_back_refuses_times_the_next_revision_may_precede() {
        // The wall clock was 2.5 s behind the anchored clock after revision
        // 12: revision 14 (observed 4 s, opening the next segment) may have
        // been committed at 1.5 s.
        let (_dir, a) = archive(&[(12, -2_500)], &[]).await;
        let e = resolve(&a, 3_500).await.unwrap_err();
        let Some(PlanError::ClockStep { detail, .. }) = e.downcast_ref::<PlanError>() else {
            panic!("{e:#}");
        };
        assert!(
            detail.contains("generation 1 (clock epoch from revision 11), after revision 12"),
            "{detail}"
        );
        assert!(detail.contains("a step of -2.500 s"), "{detail}");
        assert!(
            detail.contains("revision 13 was observed at 1970-01-01T00:00:03.000Z"),
            "{detail}"
        );
        assert!(detail.contains("revision 14 was observed at 1970-01-01T00:00:04.000Z and committed between 1970-01-01T00:00:01.500Z"), "{detail}");
        assert!(e.to_string().contains("--revision"), "{e}");
        assert_eq!(crate::classify(&e), crate::ExitKind::NotRestorable);
        // Far from every observation, the answer stands.
        assert_eq!(resolve(&a, 6_200).await.unwrap().revision, 16);
        // A new epoch from revision 14 without steps: 14's time is trusted.
        let (_dir, a) = archive(&[(12, -2_500)], &[14]).await;
        assert_eq!(resolve(&a, 3_500).await.unwrap().revision, 13);
    }

    #[tokio::test]
    async fn a_step_forward_refuses_times_the_chosen_revision_may_follow() {
        let (_dir, a) = archive(&[(15, 1_800)], &[]).await;
        let e = resolve(&a, 5_500).await.unwrap_err();
        assert!(e.to_string().contains("revision 15 was observed at 1970-01-01T00:00:05.000Z and committed between 1970-01-01T00:00:05.000Z and 1970-01-01T00:00:06.800Z"), "{e}");
        // After the last archived moment as observed, but maybe not truly.
        let e = resolve(&a, 7_000).await.unwrap_err();
        assert!(matches!(
            e.downcast_ref::<PlanError>(),
            Some(PlanError::TimeNotCovered { .. })
        ));
        assert!(e.to_string().contains("wall clock stepped"), "{e}");
        let e = resolve(&a, 9_000).await.unwrap_err();
        assert!(!e.to_string().contains("wall clock stepped"), "{e}");
    }

    /// A real etcd 3.5.1 snapshot at revision 31.
    const ETCD_SNAPSHOT: &[u8] = include_bytes!("../../common/testdata/etcd-3.5.1-rev31.db");

    /// Segments arrive in order, with up to six fetched at once while they
    /// are small and fewer once they are large, so that memory stays
    /// bounded by [`PREFETCH_BYTES`], not by the archiver's segment size.
    #[tokio::test]
    async fn prefetch_keeps_order_and_bounds_bytes_in_flight() {
        use etcdpitr_common::testing::{Fault, Faulty};
        for (size, most) in [(1 << 10, PREFETCH), (10 << 20, 2)] {
            let store = std::sync::Arc::new(Faulty::new(Fault::SlowReads(
                std::time::Duration::from_millis(20),
            )));
            let archive = Archive::from_store(store.clone(), "", "memory:///");
            let names: Vec<SegmentName> = (0..12)
                .map(|i| SegmentName {
                    first: i * 10 + 1,
                    last: i * 10 + 10,
                    end_ms: i,
                })
                .collect();
            for (i, name) in names.iter().enumerate() {
                let bytes = vec![u8::try_from(i).unwrap(); size];
                let key = layout::segment_key(GenerationId(1), name);
                archive.put_once(&key, bytes.into()).await.unwrap();
            }
            let mut rx = prefetch_segments(archive, GenerationId(1), names.clone());
            for (i, name) in names.iter().enumerate() {
                let (key, bytes) = rx.recv().await.unwrap().unwrap();
                assert_eq!(key, layout::segment_key(GenerationId(1), name));
                assert!(bytes.iter().all(|&b| usize::from(b) == i));
            }
            assert!(rx.recv().await.is_none());
            assert_eq!(
                store.most_reads_in_flight(),
                most,
                "segments of {size} bytes"
            );
        }
    }

    /// Stores the snapshot as object `(generation 2, claimed)`, as if
    /// re-headed and renamed to claim that revision.
    async fn store_snapshot(archive: &Archive, claimed: Revision) {
        let header = SnapshotHeader {
            generation: 2,
            revision: claimed,
            taken_ms: 0,
            db_bytes: ETCD_SNAPSHOT.len() as u64,
            db_blake3: *blake3::hash(ETCD_SNAPSHOT).as_bytes(),
            prev_digest: [0; 32],
            prev_revision: 0,
        };
        let mut obj = Vec::new();
        snapshot::write_object(&header, &mut &ETCD_SNAPSHOT[..], &mut obj).unwrap();
        let key = layout::snapshot_key(GenerationId(2), claimed);
        archive.put_once(&key, obj.into()).await.unwrap();
    }

    /// Issue 6.5 (5): restore and verify both refuse a snapshot whose
    /// content is at another revision than its header and name claim.
    #[tokio::test]
    async fn content_revision_is_checked_by_fetch_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("archive").display());
        let archive = Archive::open(&url).unwrap();
        store_snapshot(&archive, 31).await;
        store_snapshot(&archive, 41).await;
        let scratch = dir.path().join("scratch");
        let dest = dir.path().join("out.db");

        let g = GenerationId(2);
        assert_eq!(
            verify_snapshot(&archive, g, 31, &scratch)
                .await
                .unwrap()
                .db_bytes,
            ETCD_SNAPSHOT.len() as u64
        );
        fetch_snapshot(&archive, g, 31, &dest, Mode::Hidden, BodyHash::Check)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), ETCD_SNAPSHOT);

        let key = layout::snapshot_key(g, 41);
        for err in [
            verify_snapshot(&archive, g, 41, &scratch)
                .await
                .unwrap_err(),
            fetch_snapshot(&archive, g, 41, &dest, Mode::Hidden, BodyHash::Check)
                .await
                .unwrap_err(),
        ] {
            let text = format!("{err:#}");
            assert!(
                text.contains(&key) && text.contains("revision 31"),
                "{text}"
            );
            assert_eq!(crate::classify(&err), crate::ExitKind::Integrity);
        }
        assert!(!scratch.exists());
    }
}
