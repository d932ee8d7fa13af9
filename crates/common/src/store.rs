//! Where an archive lives: URL parsing, object access and write-once puts.
//!
//! `file:///abs/dir` is the default kind; `s3://`, `gs://` and `az://` take
//! credentials and endpoints from the environment variables `object_store`
//! reads (`AWS_*`, `GOOGLE_*`, `AZURE_*`).

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use thiserror::Error;

/// Errors of archive storage.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The archive URL cannot be used.
    #[error("invalid archive URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why.
        reason: String,
    },
    /// The object does not exist.
    #[error("object {0} not found")]
    NotFound(String),
    /// A write-once object already exists with other content.
    #[error("object {0} already exists with different content")]
    Conflict(String),
    /// Any other storage failure (network, permissions, …).
    #[error("object store: {0}")]
    Backend(#[from] object_store::Error),
    /// Local I/O failure.
    #[error("local file: {0}")]
    Io(#[from] std::io::Error),
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend(e) => !matches!(
                e,
                object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::UnknownConfigurationKey { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            Self::Io(_) => true,
            Self::InvalidUrl { .. } | Self::NotFound(_) | Self::Conflict(_) => false,
        }
    }
}

/// An archive: a store plus the prefix all its objects live under.
#[derive(Clone, Debug)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
}

/// Environment variable prefixes handed to the cloud store builders.
const ENV_PREFIXES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];

impl Archive {
    /// Opens the archive at `url` (no I/O happens yet).
    ///
    /// # Errors
    /// [`StoreError::InvalidUrl`] naming the problem.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        match parsed.scheme() {
            "file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(invalid(
                        "file URLs take an absolute path: file:///dir".into(),
                    ));
                }
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| invalid("not an absolute path".into()))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| invalid(e.to_string()))?
                    .with_automatic_cleanup(true);
                Ok(Self {
                    store: Arc::new(store),
                    prefix: Path::default(),
                    url: url.to_owned(),
                })
            }
            "s3" | "gs" | "az" | "abfs" | "abfss" | "azure" => {
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(invalid("missing bucket or container name".into()));
                }
                let env =
                    std::env::vars().filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)));
                let (store, prefix) = object_store::parse_url_opts(&parsed, env)
                    .map_err(|e| invalid(e.to_string()))?;
                Ok(Self {
                    store: Arc::from(store),
                    prefix,
                    url: url.to_owned(),
                })
            }
            other => Err(invalid(format!(
                "unsupported scheme {other:?} (use file://, s3://, gs:// or az://)"
            ))),
        }
    }

    /// The URL this archive was opened from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Full store path of an archive-relative key.
    pub fn path(&self, relative: &str) -> Path {
        let mut parts: Vec<_> = self.prefix.parts().collect();
        parts.extend(
            Path::from(relative)
                .parts()
                .map(|p| p.as_ref().to_owned().into()),
        );
        Path::from_iter(parts)
    }

    /// Archive-relative key of a full store path.
    pub fn relative(&self, path: &Path) -> Option<String> {
        let rest: Vec<_> = path.prefix_match(&self.prefix)?.collect();
        Some(
            rest.iter()
                .map(AsRef::as_ref)
                .collect::<Vec<&str>>()
                .join("/"),
        )
    }

    /// Reads a whole object.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] or a backend error.
    pub async fn get(&self, relative: &str) -> Result<Bytes, StoreError> {
        match self.store.get(&self.path(relative)).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound(relative.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads an object if it exists.
    ///
    /// # Errors
    /// A backend error.
    pub async fn get_opt(&self, relative: &str) -> Result<Option<Bytes>, StoreError> {
        match self.get(relative).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether an object exists.
    ///
    /// # Errors
    /// A backend error.
    pub async fn exists(&self, relative: &str) -> Result<bool, StoreError> {
        match self.store.head(&self.path(relative)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes an object once. If it already exists with the same content the
    /// call succeeds (it was an earlier attempt of this same write).
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if it exists with other content.
    pub async fn put_once(&self, relative: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.path(relative);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from_bytes(bytes.clone()), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.get(relative).await?;
                if blake3::hash(&existing) == blake3::hash(&bytes) {
                    Ok(())
                } else {
                    Err(StoreError::Conflict(relative.into()))
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Uploads a local file as an object (multipart, streaming; the file is
    /// never held in memory whole). Used for snapshots, whose name carries
    /// their revision so a second upload of the same name holds equal data.
    ///
    /// # Errors
    /// Local I/O or backend errors.
    pub async fn upload_file(
        &self,
        relative: &str,
        file: &std::path::Path,
    ) -> Result<(), StoreError> {
        use tokio::io::AsyncReadExt;
        const PART_BYTES: usize = 8 << 20;
        let path = self.path(relative);
        let mut f = tokio::fs::File::open(file).await?;
        let upload = self.store.put_multipart(&path).await?;
        let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(2).await?;
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        Ok(())
    }

    /// Streams an object into a local writer, returning the byte count.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], local I/O or backend errors.
    pub async fn download<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        relative: &str,
        out: &mut W,
    ) -> Result<u64, StoreError> {
        use tokio::io::AsyncWriteExt;
        let result = match self.store.get(&self.path(relative)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound(relative.into()))
            }
            Err(e) => return Err(e.into()),
        };
        let mut stream = result.into_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.try_next().await? {
            out.write_all(&chunk).await?;
            total += chunk.len() as u64;
        }
        out.flush().await?;
        Ok(total)
    }

    /// Lists archive-relative keys under `relative_dir`, in name order,
    /// optionally only those after `offset` (an archive-relative key).
    ///
    /// # Errors
    /// A backend error.
    pub async fn list(
        &self,
        relative_dir: &str,
        offset: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let dir = self.path(relative_dir);
        let stream = match offset {
            Some(o) => self.store.list_with_offset(Some(&dir), &self.path(o)),
            None => self.store.list(Some(&dir)),
        };
        let metas: Vec<_> = stream.try_collect().await?;
        let mut keys: Vec<String> = metas
            .iter()
            .filter_map(|m| self.relative(&m.location))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Names of the directories directly under the archive root.
    ///
    /// # Errors
    /// A backend error.
    pub async fn list_root_dirs(&self) -> Result<Vec<String>, StoreError> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let result = self.store.list_with_delimiter(prefix).await?;
        let mut dirs: Vec<String> = result
            .common_prefixes
            .iter()
            .filter_map(|p| self.relative(p))
            .collect();
        dirs.sort();
        Ok(dirs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_urls_with_reasons() {
        for (url, needle) in [
            ("not a url", "relative URL"),
            ("ftp://x/y", "unsupported scheme"),
            ("file://host/dir", "absolute path"),
            ("s3:///prefix", "missing bucket"),
        ] {
            let err = Archive::open(url).unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }

    #[tokio::test]
    async fn put_once_is_idempotent_and_detects_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let a = Archive::open(&url).unwrap();
        a.put_once("g/x", Bytes::from_static(b"one")).await.unwrap();
        a.put_once("g/x", Bytes::from_static(b"one")).await.unwrap();
        let err = a
            .put_once("g/x", Bytes::from_static(b"two"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)));
        assert_eq!(a.get("g/x").await.unwrap().as_ref(), b"one");
        assert_eq!(a.list("g", None).await.unwrap(), vec!["g/x".to_string()]);
        assert_eq!(a.list_root_dirs().await.unwrap(), vec!["g".to_string()]);
        assert!(matches!(a.get("g/y").await, Err(StoreError::NotFound(_))));
    }
}
