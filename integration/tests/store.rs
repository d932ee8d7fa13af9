//! One storage suite, run against every kind of store the archive lives in:
//! object_store's in-memory store, local files (`file://`) and a real
//! S3-compatible server (moto). The archiver and restorer rely on exactly
//! these behaviours.

use std::sync::Arc;

use bytes::Bytes;
use etcdpitr_common::crypto::{ArchiveKey, Keyring, KEY_BYTES};
use etcdpitr_common::store::{Archive, StoreError};
use integration::S3Server;

/// Write-once puts, reads, listings and streamed uploads, under a prefix.
async fn suite(archive: &Archive) -> anyhow::Result<()> {
    // Write-once: the same bytes again succeed (a retry), others conflict.
    archive
        .put_once("gen-1/x.json", Bytes::from_static(b"one"))
        .await?;
    archive
        .put_once("gen-1/x.json", Bytes::from_static(b"one"))
        .await?;
    let err = archive
        .put_once("gen-1/x.json", Bytes::from_static(b"two"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref k) if k == "gen-1/x.json"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(archive.get("gen-1/x.json").await?.as_ref(), b"one");

    // Missing objects are a typed NotFound, not a backend error.
    assert!(matches!(
        archive.get("gen-1/missing").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(archive.get_opt("gen-1/missing").await?, None);
    assert!(!archive.exists("gen-1/missing").await?);
    assert!(archive.exists("gen-1/x.json").await?);

    // Listings are archive-relative, in name order, optionally after an offset.
    for name in ["c", "a", "b"] {
        archive
            .put_once(&format!("gen-1/segments/{name}"), Bytes::from(name))
            .await?;
    }
    archive
        .put_once("gen-2/segments/a", Bytes::from_static(b"a"))
        .await?;
    assert_eq!(
        archive.list("gen-1/segments", None).await?,
        vec!["gen-1/segments/a", "gen-1/segments/b", "gen-1/segments/c"]
    );
    assert_eq!(
        archive
            .list("gen-1/segments", Some("gen-1/segments/a"))
            .await?,
        vec!["gen-1/segments/b", "gen-1/segments/c"]
    );
    assert_eq!(archive.list("gen-9", None).await?, Vec::<String>::new());
    assert_eq!(archive.list_root_dirs().await?, vec!["gen-1", "gen-2"]);

    // Large objects stream up in parts and down again unchanged.
    let big: Vec<u8> = (0..(20u32 << 20) / 4).flat_map(u32::to_le_bytes).collect();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("big");
    std::fs::write(&file, &big)?;
    archive
        .upload_file(
            "gen-1/snapshots/big",
            &file,
            &etcdpitr_common::progress::Progress::hidden(),
        )
        .await?;
    let mut back = Vec::new();
    let n = archive.download("gen-1/snapshots/big", &mut back).await?;
    assert_eq!(n, big.len() as u64);
    assert!(back == big, "the downloaded object differs");

    // Ranged reads fetch only the bytes asked for.
    let head = archive.get_prefix("gen-1/snapshots/big", 12).await?;
    assert_eq!(head.as_ref(), &big[..12]);
    let small = archive.get_prefix("gen-1/x.json", 100).await?;
    assert_eq!(small.as_ref(), b"one");

    // Deletion; an object already gone counts as deleted.
    archive.delete("gen-1/segments/b").await?;
    archive.delete("gen-1/segments/b").await?;
    assert_eq!(
        archive.list("gen-1/segments", None).await?,
        vec!["gen-1/segments/a", "gen-1/segments/c"]
    );
    Ok(())
}

/// The suite again on a handle with keys (every object sealed on the way
/// in, opened on the way out), and the stored bytes are not the plaintext.
async fn sealed_suite(archive: Archive) -> anyhow::Result<()> {
    let key = ArchiveKey::from_bytes(&[9; KEY_BYTES]);
    let archive = archive.with_keys(Arc::new(Keyring::new(vec![key])));
    suite(&archive).await?;
    // The same store read without keys: the object is sealed.
    let err = archive
        .clone()
        .with_keys(Arc::default())
        .get("gen-1/x.json")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Crypto(ref e) if e.is_key_problem()),
        "{err}"
    );
    let err = archive
        .with_keys(Arc::default())
        .get_prefix("gen-1/snapshots/big", 12)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Crypto(ref e) if e.is_key_problem()),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn in_memory() -> anyhow::Result<()> {
    let store = Arc::new(object_store::memory::InMemory::new());
    suite(&Archive::from_store(
        store.clone(),
        "clusters/a",
        "memory:///clusters/a",
    ))
    .await?;
    sealed_suite(Archive::from_store(
        store,
        "clusters/b",
        "memory:///clusters/b",
    ))
    .await
}

#[tokio::test]
async fn local_files() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("file://{}/archive", dir.path().display());
    suite(&Archive::open(&url)?).await?;
    let sealed = format!("file://{}/sealed", dir.path().display());
    sealed_suite(Archive::open(&sealed)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3() -> anyhow::Result<()> {
    let s3 = S3Server::start("store-suite").await?;
    let _env = integration::use_s3_in_process(s3.port).await;
    suite(&Archive::open("s3://store-suite/clusters/a")?).await?;
    sealed_suite(Archive::open("s3://store-suite/clusters/b")?).await
}
