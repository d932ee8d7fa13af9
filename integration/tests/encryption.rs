//! End-to-end tests of encryption at rest: the real archiver writes an
//! encrypted archive (local files and a moto S3 server) from real etcd
//! 3.5.1; no written key or value appears in any stored byte; restores with
//! the keys are exact (etcd's `HashKV` and reads); missing, wrong and
//! rotated keys fail with the documented exit codes, naming the key id.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use etcdpitr_common::crypto::{self, KeyId, Keyring};
use etcdpitr_common::layout::{self, GenerationId};
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::manifest::ArchiveManifest;
use etcdpitr_common::snapshot;
use etcdpitr_common::store::Archive;
use futures::TryStreamExt;
use integration::{
    archiver_args, binary, check_export, current_revision, mixed_workload, oracle_export,
    read_archive_in, run_restorer, verify_generation, wait_archived_in, ArchiverProcess,
    EtcdVersion, RestoredEtcd, Rng, S3Server, TestBed,
};
use object_store::ObjectStore;

/// Distinctive keys and values: written to etcd, searched for in the store.
struct Needles {
    /// Written before the archiver starts: lands in the base snapshot.
    snapshot: (Vec<u8>, Vec<u8>),
    /// Written while it runs: lands in segments.
    segment: (Vec<u8>, Vec<u8>),
}

impl Needles {
    fn new(rng: &mut Rng) -> Self {
        Self {
            snapshot: (
                b"/pitr-secret/needle-in-the-snapshot-5c1e".to_vec(),
                rng.bytes(48),
            ),
            segment: (
                b"/pitr-secret/needle-in-a-segment-9b2d".to_vec(),
                rng.bytes(48),
            ),
        }
    }

    fn all(&self) -> [&[u8]; 4] {
        [
            &self.snapshot.0,
            &self.snapshot.1,
            &self.segment.0,
            &self.segment.1,
        ]
    }

    /// Panics naming `what` if any needle (or its first 16 bytes) is in `bytes`.
    fn assert_absent(&self, what: &str, bytes: &[u8]) {
        for needle in self.all() {
            for probe in [needle, &needle[..16]] {
                assert!(
                    !bytes.windows(probe.len()).any(|w| w == probe),
                    "{what} holds {:?} in plaintext",
                    String::from_utf8_lossy(probe)
                );
            }
        }
    }
}

/// Creates a key file with `etcd-archiver keygen` and returns its id.
fn keygen(path: &Path) -> anyhow::Result<KeyId> {
    let out = Command::new(binary("etcd-archiver"))
        .args(["keygen", "--output", &path.display().to_string()])
        .output()?;
    anyhow::ensure!(out.status.success(), "keygen failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout
        .split_whitespace()
        .find_map(KeyId::parse)
        .with_context(|| format!("no key id in {stdout:?}"))?;
    Ok(id)
}

/// An archive handle with the key files' keys.
fn keyed(url: &str, keys: &[&Path]) -> anyhow::Result<Archive> {
    let files: Vec<PathBuf> = keys.iter().map(|p| p.to_path_buf()).collect();
    Ok(Archive::open(url)?.with_keys(Arc::new(Keyring::load(&files)?)))
}

/// The restorer's environment naming key files.
fn key_env(keys: &[&Path]) -> Vec<(String, String)> {
    let list: Vec<String> = keys.iter().map(|p| p.display().to_string()).collect();
    vec![(
        "ETCD_RESTORER_ENCRYPTION_KEY_FILE".to_owned(),
        list.join(","),
    )]
}

/// Runs `etcd-archiver run` that is expected to exit by itself; returns its
/// exit code and stderr.
fn archiver_exits(args: &[String], env: &[(String, String)]) -> anyhow::Result<(i32, String)> {
    let mut cmd = Command::new(binary("etcd-archiver"));
    cmd.arg("run")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            let out = child.wait_with_output()?;
            return Ok((
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        if started.elapsed() > Duration::from_mins(1) {
            child.kill().ok();
            anyhow::bail!("etcd-archiver did not exit by itself");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every file under `dir`, with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            let bytes = std::fs::read(&path).expect("read file");
            out.push((path, bytes));
        }
    }
    out
}

/// Checks that what the archive holds, opened with its keys, does contain
/// the needles (so finding none in the stored bytes means something).
async fn assert_archive_holds(archive: &Archive, needles: &Needles) -> anyhow::Result<()> {
    let generation = &read_archive_in(archive).await?[0];
    let (key, value) = &needles.segment;
    assert!(
        generation
            .revisions
            .iter()
            .any(|r| r.events.iter().any(|e| e.key == *key && e.value == *value)),
        "the segments hold the needle written while archiving"
    );
    let object = layout::snapshot_key(GenerationId(1), generation.snapshots[0]);
    let mut stored = Vec::new();
    archive.download(&object, &mut stored).await?;
    let mut db = Vec::new();
    snapshot::read_object(
        &object,
        &mut &stored[..],
        &mut db,
        snapshot::BodyHash::Check,
    )?;
    for needle in [&needles.snapshot.0, &needles.snapshot.1] {
        assert!(
            db.windows(needle.len()).any(|w| w == &needle[..]),
            "the base snapshot holds the needle written before archiving"
        );
    }
    Ok(())
}

/// Restores `target` with `keys` into a file, starts etcd on it and
/// compares `HashKV` and a full read with the source at `target`.
async fn restore_matches_source(
    url: &str,
    keys: &[&Path],
    dir: &Path,
    source: &etcd_client::Client,
    target: i64,
) -> anyhow::Result<()> {
    let file = dir.join(format!("restore-{target}.db"));
    let mut args = vec![
        "restore".to_owned(),
        "--archive".to_owned(),
        url.to_owned(),
        "--revision".to_owned(),
        target.to_string(),
        "--output".to_owned(),
        file.display().to_string(),
    ];
    for k in keys {
        args.extend(["--encryption-key-file".to_owned(), k.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run_restorer(&args, &[])?;
    anyhow::ensure!(code == 0, "restore {target} exited {code}: {err}");
    let restored = RestoredEtcd::start(EtcdVersion::V35, &file).await?;
    let mut restored_client = restored.client().await?;
    let mut source = source.clone();
    assert_eq!(
        restored_client.hash_kv(target).await?.hash(),
        source.hash_kv(target).await?.hash(),
        "HashKV of the member restored at {target}"
    );
    assert_eq!(
        oracle_export(&restored_client, target).await?,
        oracle_export(&source, target).await?
    );
    Ok(())
}

/// Asserts that each restorer command fails with exit 2 and names `id`.
fn assert_commands_name_key(url: &str, env: &[(String, String)], target: i64, id: KeyId) {
    let target = target.to_string();
    let out = format!("{}/never.db", std::env::temp_dir().display());
    for args in [
        vec!["list", "--archive", url],
        vec!["verify", "--archive", url],
        vec!["export", "--archive", url, "--revision", &target],
        vec![
            "restore",
            "--archive",
            url,
            "--revision",
            &target,
            "--output",
            &out,
        ],
    ] {
        let (code, _, err) = run_restorer(&args, env).expect("run etcd-restorer");
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(&id.to_string()), "{args:?}: {err}");
    }
    assert!(!Path::new(&out).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_file_archive_holds_no_plaintext_and_restores_exactly() -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let (key_a, key_b) = (tmp.path().join("a.key"), tmp.path().join("b.key"));
    let (id_a, id_b) = (keygen(&key_a)?, keygen(&key_b)?);
    let mut rng = Rng::new(7);
    let needles = Needles::new(&mut rng);
    client
        .put(needles.snapshot.0.clone(), needles.snapshot.1.clone(), None)
        .await?;
    mixed_workload(&mut client, &mut rng, 40).await?;

    let data_dir = tmp.path().join("data");
    let plain_args = archiver_args(
        &cluster.endpoints(),
        &url,
        &data_dir,
        &["--segment-max-age", "200ms", "--snapshot-interval", "2s"],
    );
    let mut args = plain_args.clone();
    args.extend(["--encryption-key-file".into(), key_a.display().to_string()]);
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    client
        .put(needles.segment.0.clone(), needles.segment.1.clone(), None)
        .await?;
    mixed_workload(&mut client, &mut rng, 80).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    mixed_workload(&mut client, &mut rng, 40).await?;
    let last = current_revision(&mut client).await?;
    let archive = keyed(&url, &[&key_a])?;
    wait_archived_in(&archive, 1, last, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());

    // Every stored byte: only the manifest is clear; nothing written to
    // etcd appears anywhere, in the archive or the archiver's data dir.
    let root = tmp.path().join("archive");
    let stored = files_under(&root);
    assert!(stored.len() > 10, "{} objects", stored.len());
    for (path, bytes) in &stored {
        needles.assert_absent(&path.display().to_string(), bytes);
        if path.ends_with(layout::MANIFEST_NAME) {
            let m = ArchiveManifest::parse("manifest", bytes)?;
            assert_eq!(m.encryption.unwrap().key_id, id_a.to_string());
        } else {
            assert_eq!(
                crypto::sealed_key_id(bytes),
                Some(id_a),
                "{}",
                path.display()
            );
        }
    }
    for (path, bytes) in files_under(&data_dir) {
        needles.assert_absent(&path.display().to_string(), &bytes);
    }
    assert_archive_holds(&archive, &needles).await?;
    let generation = &read_archive_in(&archive).await?[0];
    verify_generation(&mut client, generation, last).await?;

    // With the key, restores are exact.
    let first = generation.snapshots[0];
    let env = key_env(&[&key_a]);
    for target in [first, i64::midpoint(first, last), last] {
        check_export(&url, &env, &client, target).await?;
    }
    Box::pin(restore_matches_source(
        &url,
        &[&key_a],
        tmp.path(),
        &client,
        last,
    ))
    .await?;
    let (code, out, err) = run_restorer(&["verify", "--archive", &url], &env)?;
    assert_eq!(code, 0, "{out}{err}");

    // A prune reads snapshot headers and the segments it cuts at through
    // the key; without it, it refuses before deleting anything.
    let prune = [
        "prune",
        "--archive",
        &url,
        "--keep-last",
        "1",
        "--keep-daily",
        "1",
    ];
    let (code, _, err) = integration::run_archiver(&prune, &[])?;
    assert_eq!(code, 2, "prune without the key: {err}");
    assert!(err.contains(&id_a.to_string()), "{err}");
    let archiver_key = [(
        "ETCD_ARCHIVER_ENCRYPTION_KEY_FILE".to_owned(),
        key_a.display().to_string(),
    )];
    let confirmed: Vec<&str> = prune.iter().copied().chain(["--confirm"]).collect();
    let (code, out, err) = integration::run_archiver(&confirmed, &archiver_key)?;
    assert_eq!(code, 0, "prune with the key: {out}{err}");
    let (code, out, err) = run_restorer(&["verify", "--archive", &url], &env)?;
    assert_eq!(code, 0, "verify after a prune: {out}{err}");
    check_export(&url, &env, &client, last).await?;

    // Without the key, and with the wrong one: exit 2 naming the key id.
    assert_commands_name_key(&url, &[], last, id_a);
    assert_commands_name_key(&url, &key_env(&[&key_b]), last, id_a);
    let (code, _, err) = run_restorer(&["list", "--archive", &url], &key_env(&[&key_b]))?;
    assert!(
        err.contains(&id_b.to_string()),
        "names the keys given: {err}"
    );
    assert_eq!(code, 2);
    let missing = tmp.path().join("no-such.key");
    let (code, _, err) = run_restorer(&["list", "--archive", &url], &key_env(&[&missing]))?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no-such.key"), "{err}");

    // An archiver never mixes: without a key on this archive it refuses.
    let (code, err) = archiver_exits(&plain_args, &[])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("encrypted") && err.contains(&id_a.to_string()),
        "{err}"
    );
    // With a key on a plaintext archive it refuses too.
    let plain_url = format!("file://{}/plain-archive", tmp.path().display());
    let manifest = ArchiveManifest::new(1, &Keyring::default());
    Archive::open(&plain_url)?
        .put_once(
            layout::MANIFEST_NAME,
            Bytes::from(serde_json::to_vec(&manifest)?),
        )
        .await?;
    let mut keyed_plain = archiver_args(
        &cluster.endpoints(),
        &plain_url,
        &tmp.path().join("data2"),
        &[],
    );
    keyed_plain.extend(["--encryption-key-file".into(), key_a.display().to_string()]);
    let (code, err) = archiver_exits(&keyed_plain, &[])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not encrypted"), "{err}");

    // A damaged sealed object fails authentication: exit 4. (The last
    // segment: the prune above deleted the oldest ones; it may have left
    // none when a base snapshot was taken at the last revision, and then
    // the last snapshot.)
    let sealed = |ext: &str| {
        files_under(&root)
            .into_iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == ext))
            .max_by(|a, b| a.0.cmp(&b.0))
    };
    let (segment, mut bytes) = sealed("seg")
        .or_else(|| sealed("snap"))
        .context("a segment or a snapshot")?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&segment, &bytes)?;
    let (code, out, _) = run_restorer(&["verify", "--archive", &url], &env)?;
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("fails authentication"), "{out}");
    Ok(())
}

/// Reads every object of an S3 prefix as stored (no keys).
async fn raw_s3_objects(bucket: &str, prefix: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let store = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()?;
    let prefix = object_store::path::Path::from(prefix);
    let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
    let mut out = Vec::new();
    for m in metas {
        let bytes = object_store::ObjectStoreExt::get(&store, &m.location)
            .await?
            .bytes()
            .await?;
        out.push((m.location.to_string(), bytes.to_vec()));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_on_s3_restores_across_keys() -> anyhow::Result<()> {
    let s3 = S3Server::start("encrypted").await?;
    let env = S3Server::env(s3.port);
    for (k, v) in &env {
        std::env::set_var(k, v);
    }
    let TestBed {
        cluster,
        mut client,
        tmp,
        log,
        ..
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let url = "s3://encrypted/clusters/a";
    let (key_a, key_b) = (tmp.path().join("a.key"), tmp.path().join("b.key"));
    let (id_a, id_b) = (keygen(&key_a)?, keygen(&key_b)?);
    let mut rng = Rng::new(11);
    let needles = Needles::new(&mut rng);
    client
        .put(needles.snapshot.0.clone(), needles.snapshot.1.clone(), None)
        .await?;
    mixed_workload(&mut client, &mut rng, 40).await?;

    // Key A.
    let data_dir = tmp.path().join("data");
    let base = |interval: &str, keys: &[&Path]| {
        let mut args = archiver_args(
            &cluster.endpoints(),
            url,
            &data_dir,
            &[
                "--segment-max-age",
                "200ms",
                "--snapshot-interval",
                interval,
            ],
        );
        for k in keys {
            args.extend(["--encryption-key-file".into(), k.display().to_string()]);
        }
        args
    };
    let mut archiver = ArchiverProcess::start(&base("1h", &[&key_a]), &env, &log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    client
        .put(needles.segment.0.clone(), needles.segment.1.clone(), None)
        .await?;
    mixed_workload(&mut client, &mut rng, 60).await?;
    let rotated_at = current_revision(&mut client).await?;
    let both = keyed(url, &[&key_b, &key_a])?;
    wait_archived_in(&both, 1, rotated_at, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());

    // Key B alone cannot continue the chain A sealed: exit 2 naming A.
    let (code, err) = archiver_exits(&base("1h", &[&key_b]), &env)?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&id_a.to_string()), "{err}");

    // B seals new objects, A still opens the old ones.
    let mut archiver = ArchiverProcess::start(&base("3s", &[&key_b, &key_a]), &env, &log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    mixed_workload(&mut client, &mut rng, 40).await?;
    let crossing = current_revision(&mut client).await?;
    // The first snapshot sealed with B (the one sealed with A is older).
    let started = Instant::now();
    while ArchiveListing::load(&both).await?.generations[0]
        .snapshots
        .len()
        < 2
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "no snapshot after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mixed_workload(&mut client, &mut rng, 40).await?;
    let last = current_revision(&mut client).await?;
    wait_archived_in(&both, 1, last, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());

    // Every stored object: sealed (but the manifest), with A before the
    // rotation and B after, and no needle anywhere.
    let objects = raw_s3_objects("encrypted", "clusters/a").await?;
    let mut snapshots_by_key = Vec::new();
    for (name, bytes) in &objects {
        needles.assert_absent(name, bytes);
        if name.ends_with(layout::MANIFEST_NAME) {
            continue;
        }
        let id = crypto::sealed_key_id(bytes).with_context(|| format!("{name} is not sealed"))?;
        assert!(id == id_a || id == id_b, "{name}: {id}");
        if let Some(rev) = name
            .rsplit('/')
            .next()
            .and_then(|f| f.strip_suffix(".snap"))
            .filter(|_| name.contains("/snapshots/"))
        {
            snapshots_by_key.push((i64::from_str_radix(rev, 16)?, id));
        }
    }
    let count = |id| {
        objects
            .iter()
            .filter(|(_, b)| crypto::sealed_key_id(b) == Some(id))
            .count()
    };
    assert!(
        count(id_a) > 3 && count(id_b) > 3,
        "A {} B {}",
        count(id_a),
        count(id_b)
    );
    snapshots_by_key.sort();
    assert_eq!(snapshots_by_key[0].1, id_a, "{snapshots_by_key:?}");
    let first_b = snapshots_by_key
        .iter()
        .find(|(_, id)| *id == id_b)
        .map(|(rev, _)| *rev)
        .context("a snapshot sealed with B")?;
    // `crossing` is planned from A's snapshot and segments of both keys.
    assert!(crossing < first_b, "{crossing} < {first_b}");
    assert_archive_holds(&both, &needles).await?;
    let generations = read_archive_in(&both).await?;
    assert_eq!(
        generations.len(),
        1,
        "the rotation continued the generation"
    );
    verify_generation(&mut client, &generations[0], last).await?;

    // Both keys: exact restores across the rotation.
    let both_env: Vec<(String, String)> = env
        .iter()
        .cloned()
        .chain(key_env(&[&key_a, &key_b]))
        .collect();
    for target in [rotated_at, crossing, first_b, last] {
        check_export(url, &both_env, &client, target).await?;
    }
    Box::pin(restore_matches_source(
        url,
        &[&key_a, &key_b],
        tmp.path(),
        &client,
        crossing,
    ))
    .await?;
    let (code, out, err) = run_restorer(&["verify", "--archive", url], &both_env)?;
    assert_eq!(code, 0, "{out}{err}");

    // B alone: objects sealed with A fail clearly, naming A.
    let b_env: Vec<(String, String)> = env.iter().cloned().chain(key_env(&[&key_b])).collect();
    assert_commands_name_key(url, &b_env, crossing, id_a);
    Ok(())
}
