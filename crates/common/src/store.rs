//! Where an archive lives: URL parsing, object access and write-once puts.
//!
//! `file:///abs/dir` is the default kind; `s3://`, `gs://` and `az://` take
//! credentials and endpoints from the environment variables `object_store`
//! reads (`AWS_*`, `GOOGLE_*`, `AZURE_*`), and static S3 credentials also
//! from files named by `AWS_ACCESS_KEY_ID_FILE`, `AWS_SECRET_ACCESS_KEY_FILE`
//! and `AWS_SESSION_TOKEN_FILE` (a Kubernetes Secret or a systemd credential
//! mounted as files; see [`SECRET_FILE_VARS`]). `s3://` archives upload with
//! checksums and can tell an object's S3 Object Lock
//! ([`crate::object_lock`]).
//!
//! A `file://` archive is as durable as a cloud store: a write returns only
//! after the file and every directory entry leading to it are fsynced (the
//! archiver deletes its own copy once a write returned). Its files are
//! owner-only (0600, directories 0700) whatever the process umask.
//!
//! An archive handle given keys ([`Archive::with_keys`]) seals every object
//! it writes and opens every object it reads ([`crate::crypto`]), except
//! the archive manifest, which stays clear so that a reader learns whether
//! the archive is encrypted. Callers read and write plaintext either way.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use thiserror::Error;

use crate::crypto::{self, CryptoError, Keyring};
use crate::layout;
use crate::object_lock::{self, ObjectLockSource, Retention};

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
    /// A store credential named by an environment variable cannot be used.
    #[error("{variable}: {reason}")]
    Credentials {
        /// The environment variable, e.g. `AWS_SECRET_ACCESS_KEY_FILE`.
        variable: String,
        /// Why.
        reason: String,
    },
    /// The object does not exist.
    #[error("object {0} not found")]
    NotFound(String),
    /// The store cannot create an object only if it does not exist yet
    /// (`PutMode::Create`); archives need such write-once puts.
    #[error("{object}: the object store does not support write-once puts (create-if-absent), which etcd-pitr archives need: {source}")]
    NoWriteOnce {
        /// The object being written.
        object: String,
        /// The store's answer.
        source: object_store::Error,
    },
    /// A write-once object already exists with other content.
    #[error("object {0} already exists with different content")]
    Conflict(String),
    /// Any other storage failure (network, permissions, no such bucket, …).
    #[error("object store: {0}")]
    Backend(#[from] object_store::Error),
    /// Local I/O failure.
    #[error("local file: {0}")]
    Io(#[from] std::io::Error),
    /// An object cannot be opened with the keys given, or fails
    /// authentication.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl StoreError {
    /// Whether retrying the same call later may succeed. Permanent failures
    /// (no such bucket, access denied, bad credentials, a failed write
    /// precondition, a write-once conflict) are not: callers should stop and
    /// say so instead of retrying forever.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend(e) if mistake(e).is_some() => false,
            Self::Backend(e) => match e {
                // `Archive::get`/`exists` turn a missing object into
                // `NotFound`/`false`; a backend `NotFound` that reaches a
                // caller came from a put or a listing: the bucket (or
                // container) does not exist.
                object_store::Error::NotFound { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented { .. }
                | object_store::Error::InvalidPath { .. }
                | object_store::Error::UnknownConfigurationKey { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => false,
                // A `file://` archive reports EACCES/EROFS as a generic error.
                other => !source_chain_has_permanent_io(other),
            },
            Self::Io(e) => !is_permanent_io(e),
            Self::InvalidUrl { .. }
            | Self::Credentials { .. }
            | Self::NotFound(_)
            | Self::Conflict(_)
            | Self::NoWriteOnce { .. }
            | Self::Crypto(_) => false,
        }
    }
}

impl StoreError {
    /// Whether the error is the caller's setting (a bad archive URL, an
    /// unusable credentials file, or a [`StoreMistake`] the store's answer
    /// reveals): both binaries exit with their usage code.
    pub fn is_usage(&self) -> bool {
        match self {
            Self::InvalidUrl { .. } | Self::Credentials { .. } => true,
            Self::Backend(e) => mistake(e).is_some(),
            _ => false,
        }
    }
}

/// A store setting the operator must fix, recognized in the store's answer:
/// retrying does not help, and both binaries exit with their usage code.
/// Its `Display` is the hint printed after the error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreMistake {
    /// An `http://` endpoint while plain HTTP is not allowed: the HTTP
    /// client refuses the request before sending it.
    PlainHttp,
    /// The bucket (or Azure container) does not exist.
    NoSuchBucket,
    /// The store does not accept the credentials: an unknown key id, a
    /// wrong secret (the signature does not match), an invalid or expired
    /// session token.
    BadCredentials,
    /// The credentials are valid but not allowed to do this.
    AccessDenied,
}

impl std::fmt::Display for StoreMistake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PlainHttp => {
                "the store endpoint is http://; set AWS_ALLOW_HTTP=true to allow plain HTTP \
                 (or use https://)"
            }
            Self::NoSuchBucket => {
                "the bucket does not exist: check the bucket name in --archive, and the \
                 endpoint and region (AWS_ENDPOINT, AWS_REGION), or create the bucket"
            }
            Self::BadCredentials => {
                "the store rejected the credentials: check AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY (or their _FILE variants) and AWS_SESSION_TOKEN"
            }
            Self::AccessDenied => {
                "the credentials are not allowed to do this: grant them list, get, put \
                 and delete on the archive's bucket and prefix"
            }
        })
    }
}

/// The error codes of S3 (and the S3-style XML of Azure) that name a
/// [`StoreMistake`]. Service error codes are part of the services' APIs.
const MISTAKE_CODES: [(&str, StoreMistake); 10] = [
    ("NoSuchBucket", StoreMistake::NoSuchBucket),
    ("ContainerNotFound", StoreMistake::NoSuchBucket),
    ("InvalidAccessKeyId", StoreMistake::BadCredentials),
    ("SignatureDoesNotMatch", StoreMistake::BadCredentials),
    ("InvalidToken", StoreMistake::BadCredentials),
    ("ExpiredToken", StoreMistake::BadCredentials),
    ("InvalidClientTokenId", StoreMistake::BadCredentials),
    ("AuthenticationFailed", StoreMistake::BadCredentials),
    ("AccessDenied", StoreMistake::AccessDenied),
    ("AuthorizationFailure", StoreMistake::AccessDenied),
];

/// What reqwest (the HTTP client of `object_store`) says when it refuses a
/// URL scheme: `https_only` is set unless `AWS_ALLOW_HTTP` is true. Its
/// error type is private, so its wording is matched, here only.
const REQWEST_SCHEME_REFUSED: &str = "URL scheme is not allowed";

/// The [`StoreMistake`] that `error` reveals, if any: a request the HTTP
/// client refused to build for its URL scheme; else the service's error
/// code in the answer's body ([`service_error`]) when there is one, which
/// tells a missing bucket from a missing object and a bad signature from a
/// missing permission, is the only witness for listings (which
/// `object_store` reports as generic errors whatever the status), and
/// keeps a 403 for another reason (a skewed clock) from reading as a
/// missing permission; else an `Unauthenticated` (401) or
/// `PermissionDenied` (403) answer.
pub fn mistake(error: &object_store::Error) -> Option<StoreMistake> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(c) = cause {
        if c.downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_builder)
            && error_chain(c).any(|e| e.to_string() == REQWEST_SCHEME_REFUSED)
        {
            return Some(StoreMistake::PlainHttp);
        }
        cause = c.source();
    }
    let text = error.to_string();
    if let Some((_, code, _)) = service_error(&text) {
        // Another code (a clock skew, throttling…) is no setting to fix,
        // whatever the HTTP status.
        return MISTAKE_CODES
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, m)| *m);
    }
    match error {
        object_store::Error::Unauthenticated { .. } => Some(StoreMistake::BadCredentials),
        object_store::Error::PermissionDenied { .. } => Some(StoreMistake::AccessDenied),
        _ => None,
    }
}

/// `error` and its sources.
pub(crate) fn error_chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// The first XML error document in `text` (an S3 or Azure answer's body,
/// which `object_store` quotes in its errors): its byte range (from its
/// `<?xml` declaration, if any, through `</Error>`), its `Code` and its
/// `Message`.
pub(crate) fn service_error(text: &str) -> Option<(std::ops::Range<usize>, &str, &str)> {
    let open = text.find("<Error>")?;
    let close = open + text[open..].find("</Error>")? + "</Error>".len();
    let doc = &text[open..close];
    let element = |name: &str| {
        let start = doc.find(&format!("<{name}>"))? + name.len() + 2;
        let len = doc[start..].find(&format!("</{name}>"))?;
        Some(doc[start..start + len].trim())
    };
    let code = element("Code")?;
    let message = element("Message").unwrap_or("");
    // Its declaration, when only whitespace separates the two.
    let start = text[..open]
        .rfind("<?xml")
        .filter(|&d| {
            let declaration = text[d..open].trim_end();
            declaration.ends_with("?>") && !declaration[1..].contains('<')
        })
        .unwrap_or(open);
    Some((start..close, code, message))
}

/// Local I/O failures that waiting does not fix.
fn is_permanent_io(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
    )
}

fn source_chain_has_permanent_io(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = e.source();
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(is_permanent_io)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Mode of every file a `file://` archive (and the binaries) create.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every directory a `file://` archive (and the binaries) create.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents as owner-only directories (0700);
/// existing directories are left as they are. Returns the directories it
/// created, deepest first.
///
/// # Errors
/// I/O errors.
pub fn create_private_dir_all(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    let mut created = Vec::new();
    let mut d = dir;
    while !d.exists() {
        created.push(d.to_owned());
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p,
            _ => break,
        }
    }
    if !created.is_empty() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(dir)?;
        // The umask may have cleared bits of 0700, never added any; make
        // sure the owner can use the directory.
        for c in &created {
            std::fs::set_permissions(c, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))?;
        }
    }
    Ok(created)
}

/// fsyncs a directory, so the entries created in it are durable.
///
/// # Errors
/// I/O errors.
pub fn fsync_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A staging file of `object_store`'s local store: `<object>#<digits>`.
fn staging_base(name: &str) -> Option<&str> {
    let (base, n) = name.rsplit_once('#')?;
    (!base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(base)
}

/// An archive: a store plus the prefix all its objects live under.
#[derive(Clone, Debug)]
pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    /// The local store of a `file://` archive, whose writes get fsynced
    /// parents and owner-only modes here.
    local: Option<Arc<object_store::local::LocalFileSystem>>,
    /// Where Object Lock retentions are read (`s3://` archives).
    object_lock: Option<Arc<dyn ObjectLockSource>>,
    /// Keys of an encrypted archive (empty: not encrypted).
    keys: Arc<Keyring>,
}

/// An upload of [`Archive::stage_file`] waiting to be completed. Dropping
/// it abandons the upload (a cloud store keeps the parts until a lifecycle
/// rule or [`StagedUpload::abort`] removes them; a `file://` archive's
/// staging file is removed with the upload, or by
/// [`Archive::remove_abandoned_uploads`]).
#[derive(Debug)]
pub struct StagedUpload<'a> {
    archive: &'a Archive,
    relative: String,
    how: Staged,
}

/// How an upload was staged.
#[derive(Debug)]
enum Staged {
    /// A multipart upload, all but its last part uploaded.
    Multipart(object_store::WriteMultipart),
    /// A `file://` archive's staging file (`<object>#<n>`): a hard link to
    /// the caller's file.
    Linked { staging: PathBuf, object: PathBuf },
}

impl StagedUpload<'_> {
    /// Uploads the last part and completes the upload: the object exists
    /// (durably, for a `file://` archive).
    ///
    /// # Errors
    /// Backend errors.
    pub async fn complete(self) -> Result<(), StoreError> {
        match self.how {
            Staged::Multipart(writer) => {
                writer.finish().await?;
            }
            Staged::Linked { staging, object } => {
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    std::fs::File::open(&staging)?.sync_all()?;
                    // Write-once: an object already there (another taker of
                    // the same name won) is kept, never replaced.
                    match std::fs::hard_link(&staging, &object) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(e),
                    }
                    std::fs::remove_file(&staging)?;
                    match object.parent() {
                        Some(parent) => fsync_dir(parent),
                        None => Ok(()),
                    }
                })
                .await
                .map_err(std::io::Error::other)??;
            }
        }
        self.archive.finish_local(&self.relative, false).await
    }

    /// Abandons the upload and asks the store to drop its parts.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn abort(self) -> Result<(), StoreError> {
        match self.how {
            Staged::Multipart(writer) => Ok(writer.abort().await?),
            Staged::Linked { staging, .. } => Ok(tokio::fs::remove_file(staging).await?),
        }
    }
}

/// Whether an object is sealed in an encrypted archive: all but the archive
/// manifest, which says whether the archive is encrypted.
fn is_sealed_object(relative: &str) -> bool {
    relative != layout::MANIFEST_NAME
}

/// The bytes of one ranged read of [`Archive::download`].
enum RangeBytes {
    /// As the store returned them (a local file's range).
    Read(Bytes),
    /// Copied from a response into a buffer of the download's pool.
    Pooled(Vec<u8>),
}

impl std::ops::Deref for RangeBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Read(b) => b,
            Self::Pooled(v) => v,
        }
    }
}

/// Bytes of each ranged read of [`Archive::download`]. The reads in flight
/// (and one being written) are held whole, so this and [`READS_IN_FLIGHT`]
/// bound a download's memory (14 MiB). With 50 ms per request they still
/// arrive faster than a snapshot decompresses (`docs/benchmarks.md`).
pub const READ_RANGE_BYTES: u64 = 2 << 20;
/// Ranged reads [`Archive::download`] keeps in flight at once.
pub const READS_IN_FLIGHT: usize = 6;

/// Plaintext bytes read from a local file per upload step.
const UPLOAD_READ_BYTES: usize = 1 << 20;

/// Size of the parts of a multipart upload ([`Archive::upload_file`]).
pub const UPLOAD_PART_BYTES: usize = 8 << 20;

/// Parts of one multipart upload in flight at once: they upload in
/// parallel (a store's latency, not its bandwidth, bounds one request at a
/// time) and each holds its bytes in memory until the store has them.
const UPLOAD_PARTS_IN_FLIGHT: usize = 4;

/// Environment variable prefixes handed to the cloud store builders.
const ENV_PREFIXES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];

/// Secret settings that may also be given as a file: `{NAME}_FILE` names a
/// file whose content (one trailing newline dropped) is the value of `NAME`.
/// `object_store` reads only the variables themselves, which a Kubernetes
/// Secret mounted as files or a systemd `LoadCredential=` cannot set.
pub const SECRET_FILE_VARS: [&str; 3] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// The cloud store options among `vars` (the process environment): every
/// `AWS_*`, `GOOGLE_*` and `AZURE_*` variable, with each `{NAME}_FILE` of
/// [`SECRET_FILE_VARS`] replaced by `NAME` holding the file's content.
///
/// # Errors
/// [`StoreError::Credentials`] when such a file cannot be read, is empty or
/// not UTF-8, or when both `NAME` and `{NAME}_FILE` are set.
fn cloud_options(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut options: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect();
    for name in SECRET_FILE_VARS {
        let variable = format!("{name}_FILE");
        let Some(i) = options.iter().position(|(k, _)| *k == variable) else {
            continue;
        };
        let (_, path) = options.remove(i);
        let fail = |reason: String| StoreError::Credentials {
            variable: variable.clone(),
            reason,
        };
        if options.iter().any(|(k, _)| k == name) {
            return Err(fail(format!("{name} is set too; give one of them")));
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| fail(format!("cannot read {path}: {e}")))?;
        let value = text.strip_suffix('\n').unwrap_or(&text);
        let value = value.strip_suffix('\r').unwrap_or(value);
        if value.is_empty() {
            return Err(fail(format!("{path} is empty")));
        }
        options.push((name.to_owned(), value.to_owned()));
    }
    Ok(options)
}

impl Archive {
    /// Opens the archive at `url` (no I/O happens yet).
    ///
    /// # Errors
    /// [`StoreError::InvalidUrl`] naming the problem;
    /// [`StoreError::Credentials`] for an unusable credentials file.
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
                let created = create_private_dir_all(&dir)
                    .map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
                if let Some(parent) = created.last().and_then(|d| d.parent()) {
                    for d in created.iter().skip(1).map(PathBuf::as_path).chain([parent]) {
                        fsync_dir(d)
                            .map_err(|e| invalid(format!("cannot sync {}: {e}", d.display())))?;
                    }
                }
                // `with_fsync`: a put returns once the file and its parent
                // directory are on stable storage, as with a cloud store.
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| invalid(e.to_string()))?
                    .with_automatic_cleanup(true)
                    .with_fsync(true);
                let store = Arc::new(store);
                Ok(Self {
                    store: store.clone(),
                    prefix: Path::default(),
                    url: url.to_owned(),
                    local: Some(store),
                    object_lock: None,
                    keys: Arc::default(),
                })
            }
            "s3" | "gs" | "az" | "abfs" | "abfss" | "azure" => {
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err(invalid("missing bucket or container name".into()));
                }
                let env = cloud_options(std::env::vars())?;
                if parsed.scheme() == "s3" {
                    let bucket = object_lock::open_s3(&parsed, env).map_err(invalid)?;
                    return Ok(Self {
                        store: bucket.store,
                        prefix: bucket.prefix,
                        url: url.to_owned(),
                        local: None,
                        object_lock: Some(bucket.lock),
                        keys: Arc::default(),
                    });
                }
                let (store, prefix) = object_store::parse_url_opts(&parsed, env)
                    .map_err(|e| invalid(e.to_string()))?;
                Ok(Self {
                    store: Arc::from(store),
                    prefix,
                    url: url.to_owned(),
                    local: None,
                    object_lock: None,
                    keys: Arc::default(),
                })
            }
            other => Err(invalid(format!(
                "unsupported scheme {other:?} (use file://, s3://, gs:// or az://)"
            ))),
        }
    }

    /// An archive on any object store, its objects under `prefix`; `url` is
    /// only used in messages. For tests (e.g. an in-memory store wrapped to
    /// inject failures) and for embedding. Writes get no local durability or
    /// mode handling: that is done only for archives opened from `file://`.
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> Self {
        Self {
            store,
            prefix: Path::from(prefix),
            url: url.to_owned(),
            local: None,
            object_lock: None,
            keys: Arc::default(),
        }
    }

    /// The archive with Object Lock retentions read from `source` (e.g. a
    /// test store that locks objects).
    #[must_use]
    pub fn with_object_lock(mut self, source: Arc<dyn ObjectLockSource>) -> Self {
        self.object_lock = Some(source);
        self
    }

    /// Whether objects of this archive can be under an S3 Object Lock: the
    /// bucket has Object Lock, or does not let us ask. Stores without
    /// Object Lock answer `false` without a request.
    ///
    /// # Errors
    /// A backend error.
    pub async fn object_lock_enabled(&self) -> Result<bool, StoreError> {
        match &self.object_lock {
            Some(source) => source.bucket_lock_enabled().await,
            None => Ok(false),
        }
    }

    /// The S3 Object Lock on an object (retention mode and retain-until
    /// date, legal hold); `None` when it has none, is gone, or the store has
    /// no Object Lock (then without a request).
    ///
    /// # Errors
    /// A backend error (`PermissionDenied` when we may not read it), or an
    /// answer that is not what S3 documents.
    pub async fn retention(&self, relative: &str) -> Result<Option<Retention>, StoreError> {
        match &self.object_lock {
            Some(source) => source.retention(&self.path(relative)).await,
            None => Ok(None),
        }
    }

    /// The same archive, read and written with `keys` (the first seals new
    /// objects; see [`crate::crypto`]). Empty keys: an unencrypted archive.
    #[must_use]
    pub fn with_keys(mut self, keys: Arc<Keyring>) -> Self {
        self.keys = keys;
        self
    }

    /// The keys this handle reads and writes with.
    pub fn keys(&self) -> &Keyring {
        &self.keys
    }

    /// What is stored for an object's plaintext.
    fn seal(&self, relative: &str, plaintext: Bytes) -> Result<Bytes, StoreError> {
        match self.keys.sealing() {
            Some(key) if is_sealed_object(relative) => {
                Ok(crypto::seal(key, relative, &plaintext)?.into())
            }
            _ => Ok(plaintext),
        }
    }

    /// An object's plaintext from what is stored.
    fn open_object(&self, relative: &str, stored: Bytes) -> Result<Bytes, StoreError> {
        if is_sealed_object(relative) {
            Ok(crypto::open(&self.keys, relative, &stored)?.into())
        } else {
            Ok(stored)
        }
    }

    /// The local file of an archive-relative key, for a `file://` archive.
    fn local_file(&self, relative: &str) -> Result<Option<PathBuf>, StoreError> {
        match &self.local {
            Some(fs) => Ok(Some(fs.path_to_filesystem(&self.path(relative))?)),
            None => Ok(None),
        }
    }

    /// Before a local write: creates the missing parent directories of the
    /// file owner-only, and makes their entries durable.
    async fn prepare_local(&self, relative: &str) -> Result<(), StoreError> {
        let Some(file) = self.local_file(relative)? else {
            return Ok(());
        };
        let Some(parent) = file.parent().map(std::path::Path::to_owned) else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let created = create_private_dir_all(&parent)?;
            // Each new directory holds the next one's entry; the deepest
            // existing ancestor holds the first new one's.
            if let Some(top) = created.last().and_then(|d| d.parent()) {
                for d in created.iter().skip(1).map(PathBuf::as_path).chain([top]) {
                    fsync_dir(d)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(())
    }

    /// After a local write: the file becomes owner-only; with `sync` (an
    /// object found already written, perhaps by a run that died before its
    /// fsync) the file and its parent directory are fsynced here, otherwise
    /// the store already did.
    async fn finish_local(&self, relative: &str, sync: bool) -> Result<(), StoreError> {
        let Some(file) = self.local_file(relative)? else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
            if sync {
                std::fs::File::open(&file)?.sync_all()?;
                if let Some(parent) = file.parent() {
                    fsync_dir(parent)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(())
    }

    /// Removes the staging files (`<object>#<n>`) that `object_store`'s
    /// local store leaves under `relative_dir` when a process dies during an
    /// upload; they are invisible to listings and would stay forever. A
    /// no-op for cloud stores (abort incomplete multipart uploads with a
    /// bucket lifecycle rule instead). Returns the removed keys.
    ///
    /// Rule: a staging file is abandoned when nothing wrote to it for
    /// `idle` (a live upload streams a local file into it, so it never
    /// pauses long), or when its object already exists (a later attempt
    /// completed) and it was not written for a minute.
    ///
    /// # Errors
    /// Local I/O errors other than a missing directory.
    pub async fn remove_abandoned_uploads(
        &self,
        relative_dir: &str,
        idle: Duration,
    ) -> Result<Vec<String>, StoreError> {
        const IDLE_WHEN_DONE: Duration = Duration::from_mins(1);
        let Some(dir) = self.local_file(relative_dir)? else {
            return Ok(Vec::new());
        };
        let relative_dir = relative_dir.trim_end_matches('/').to_owned();
        let removed = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<String>> {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut removed = Vec::new();
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(base) = staging_base(&name) else {
                    continue;
                };
                let quiet = entry
                    .metadata()?
                    .modified()?
                    .elapsed()
                    .unwrap_or(Duration::ZERO);
                let done = dir.join(base).is_file();
                if quiet >= idle || (done && quiet >= IDLE_WHEN_DONE) {
                    match std::fs::remove_file(entry.path()) {
                        Ok(()) => removed.push(format!("{relative_dir}/{name}")),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(removed)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(removed)
    }

    /// Whether this is a `file://` archive.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
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

    /// Reads a whole object (opened, for an encrypted archive).
    ///
    /// # Errors
    /// [`StoreError::NotFound`], [`StoreError::Crypto`] or a backend error.
    pub async fn get(&self, relative: &str) -> Result<Bytes, StoreError> {
        match self.store.get(&self.path(relative)).await {
            Ok(r) => self.open_object(relative, r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound(relative.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the first `n` bytes of an object's plaintext (the whole
    /// object if shorter) with a ranged read: only those bytes travel, and
    /// for a sealed object the chunks holding them.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], [`StoreError::Crypto`] or a backend error.
    pub async fn get_prefix(&self, relative: &str, n: u64) -> Result<Bytes, StoreError> {
        let sealed = is_sealed_object(relative);
        let want = if sealed {
            crypto::stored_prefix_len(n, &self.keys)
        } else {
            n
        };
        let stored = match self.store.get_range(&self.path(relative), 0..want).await {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound(relative.into()))
            }
            Err(e) => return Err(e.into()),
        };
        let mut plain = if sealed {
            let whole = (stored.len() as u64) < want;
            Bytes::from(crypto::open_prefix(&self.keys, relative, &stored, whole)?)
        } else {
            stored
        };
        plain.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        Ok(plain)
    }

    /// Deletes an object; one already gone counts as deleted.
    ///
    /// # Errors
    /// A backend error (e.g. the store refuses: retention lock, permissions).
    pub async fn delete(&self, relative: &str) -> Result<(), StoreError> {
        match self.store.delete(&self.path(relative)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
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

    /// Writes an object once (sealed, for an encrypted archive). If it
    /// already exists with the same content the call succeeds (it was an
    /// earlier attempt of this same write; sealed objects compare by
    /// plaintext).
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if it exists with other content.
    pub async fn put_once(&self, relative: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = self.path(relative);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let stored = self.seal(relative, bytes.clone())?;
        self.prepare_local(relative).await?;
        match self
            .store
            .put_opts(&path, PutPayload::from_bytes(stored), opts)
            .await
        {
            Ok(_) => self.finish_local(relative, false).await,
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.get(relative).await?;
                if blake3::hash(&existing) == blake3::hash(&bytes) {
                    self.finish_local(relative, true).await
                } else {
                    Err(StoreError::Conflict(relative.into()))
                }
            }
            Err(
                e @ (object_store::Error::NotImplemented { .. }
                | object_store::Error::NotSupported { .. }),
            ) => Err(StoreError::NoWriteOnce {
                object: relative.into(),
                source: e,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Uploads a local file as an object (multipart, streaming, sealed on
    /// the way for an encrypted archive; the file is never held in memory
    /// whole). Used for snapshots, whose name carries their revision so a
    /// second upload of the same name holds equal data. The file's bytes
    /// count as `progress` as they are handed to the upload.
    ///
    /// # Errors
    /// Local I/O or backend errors.
    pub async fn upload_file(
        &self,
        relative: &str,
        file: &std::path::Path,
        progress: &crate::progress::Progress,
    ) -> Result<(), StoreError> {
        self.stage_file(relative, file, progress)
            .await?
            .complete()
            .await
    }

    /// [`Archive::upload_file`] but for its last step: every byte is
    /// uploaded but the last part (at most [`UPLOAD_PART_BYTES`]), and the
    /// object does not exist until [`StagedUpload::complete`]. So a caller
    /// can upload while it does what must come before the object exists.
    ///
    /// A plaintext object of a `file://` archive on the file system of
    /// `file` becomes a hard link to it: the caller must never write to
    /// `file` again (remove it, and create a new file under its name).
    ///
    /// # Errors
    /// Local I/O or backend errors.
    pub async fn stage_file(
        &self,
        relative: &str,
        file: &std::path::Path,
        progress: &crate::progress::Progress,
    ) -> Result<StagedUpload<'_>, StoreError> {
        use tokio::io::AsyncReadExt;
        if let Some(staged) = self.link_local(relative, file, progress).await? {
            return Ok(staged);
        }
        let path = self.path(relative);
        let mut f = tokio::fs::File::open(file).await?;
        let mut sealer = match self.keys.sealing() {
            Some(key) if is_sealed_object(relative) => Some(crypto::Sealer::new(key, relative)?),
            _ => None,
        };
        self.prepare_local(relative).await?;
        let upload = self.store.put_multipart(&path).await?;
        let mut writer =
            object_store::WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART_BYTES);
        let mut buf = vec![0u8; UPLOAD_READ_BYTES];
        let mut sealed = Vec::new();
        let written = async {
            loop {
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                writer.wait_for_capacity(UPLOAD_PARTS_IN_FLIGHT).await?;
                match &mut sealer {
                    Some(s) => {
                        sealed.clear();
                        s.update(&buf[..n], &mut sealed);
                        writer.write(&sealed);
                    }
                    None => writer.write(&buf[..n]),
                }
                progress.inc(n as u64);
            }
            if let Some(s) = sealer {
                sealed.clear();
                s.finish(&mut sealed);
                writer.write(&sealed);
            }
            writer.wait_for_capacity(0).await?;
            Ok::<_, StoreError>(())
        }
        .await;
        if let Err(e) = written {
            // Best effort: the store would keep an incomplete multipart
            // upload's parts (a `file://` archive's staging file goes with
            // the upload).
            writer.abort().await.ok();
            return Err(e);
        }
        Ok(StagedUpload {
            archive: self,
            relative: relative.to_owned(),
            how: Staged::Multipart(writer),
        })
    }

    /// Stages a plaintext object of a `file://` archive by hard-linking
    /// `file` as its staging file, when both are on one file system: the
    /// bytes are neither copied nor written again, and the file's pages
    /// that the kernel already wrote back need no fsync. `None` when the
    /// object is sealed, the archive is not local, or the link fails (another
    /// file system, or one without hard links).
    async fn link_local(
        &self,
        relative: &str,
        file: &std::path::Path,
        progress: &crate::progress::Progress,
    ) -> Result<Option<StagedUpload<'_>>, StoreError> {
        let sealed = self.keys.sealing().is_some() && is_sealed_object(relative);
        let Some(object) = self.local_file(relative)?.filter(|_| !sealed) else {
            return Ok(None);
        };
        self.prepare_local(relative).await?;
        let source = file.to_owned();
        let linked = tokio::task::spawn_blocking(move || -> std::io::Result<Option<PathBuf>> {
            let mut n = 1u64;
            loop {
                let staging = PathBuf::from(format!("{}#{n}", object.display()));
                match std::fs::hard_link(&source, &staging) {
                    Ok(()) => return Ok(Some(staging)),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                    // Another file system, or one without hard links
                    // (vfat, some FUSE and NFS setups): copy instead.
                    Err(_) => return Ok(None),
                }
            }
        })
        .await
        .map_err(std::io::Error::other)??;
        let Some(staging) = linked else {
            return Ok(None);
        };
        progress.inc(tokio::fs::metadata(&staging).await?.len());
        Ok(Some(StagedUpload {
            archive: self,
            relative: relative.to_owned(),
            how: Staged::Linked {
                staging,
                object: self.local_file(relative)?.expect("a local archive"),
            },
        }))
    }
    /// Streams an object into a local writer (opened on the way, for an
    /// encrypted archive), returning the count of bytes written. The object
    /// is fetched with up to [`READS_IN_FLIGHT`] ranged reads of
    /// [`READ_RANGE_BYTES`] at once, written in order: a store's latency
    /// per request is paid about once per [`READS_IN_FLIGHT`] ranges, and
    /// memory stays bounded by them.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], [`StoreError::Crypto`], local I/O or
    /// backend errors. On error, `out` may hold a prefix of the plaintext
    /// that was authenticated so far.
    pub async fn download<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        relative: &str,
        out: &mut W,
    ) -> Result<u64, StoreError> {
        use futures::StreamExt;
        use tokio::io::AsyncWriteExt;
        let path = self.path(relative);
        let (size, e_tag) = match self.store.head(&path).await {
            Ok(meta) => (meta.size, meta.e_tag),
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::NotFound(relative.into()))
            }
            Err(e) => return Err(e.into()),
        };
        let (store, path, e_tag) = (&self.store, &path, &e_tag);
        // Buffers of the ranges read from a remote store, reused: filled
        // from the response as it streams in, so that memory is the reads
        // in flight (and one being written), with no churn of large
        // allocations (an allocator keeps freed ones a while).
        let pool = std::sync::Mutex::new(Vec::<Vec<u8>>::new());
        let pool = &pool;
        let remote = self.local.is_none();
        let mut ranges = futures::stream::iter(
            (0..size)
                .step_by(READ_RANGE_BYTES as usize)
                .map(|start| start..size.min(start + READ_RANGE_BYTES)),
        )
        .map(|range| async move {
            let want = range.end - range.start;
            let bytes = if remote {
                let mut buf = pool
                    .lock()
                    .expect("the pool is never poisoned")
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(READ_RANGE_BYTES as usize));
                buf.clear();
                // Every range from the version of the object measured.
                let options = object_store::GetOptions {
                    range: Some(range.into()),
                    if_match: e_tag.clone(),
                    ..object_store::GetOptions::default()
                };
                let mut body = store.get_opts(path, options).await?.into_stream();
                while let Some(chunk) = body.try_next().await? {
                    if (buf.len() + chunk.len()) as u64 > want {
                        return Err(StoreError::Io(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("a ranged read of {want} bytes returned more"),
                        )));
                    }
                    buf.extend_from_slice(&chunk);
                }
                RangeBytes::Pooled(buf)
            } else {
                RangeBytes::Read(store.get_range(path, range).await?)
            };
            // An object replaced meanwhile (or a store that ignores
            // ranges) must not splice into another's bytes.
            if bytes.len() as u64 != want {
                return Err(StoreError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("a ranged read of {want} bytes returned {}", bytes.len()),
                )));
            }
            Ok(bytes)
        })
        .buffered(READS_IN_FLIGHT);
        let mut total = 0u64;
        let mut opener =
            is_sealed_object(relative).then(|| crypto::Opener::new(&self.keys, relative));
        let mut plain = Vec::new();
        while let Some(chunk) = ranges.next().await.transpose()? {
            let bytes = match &mut opener {
                Some(o) => {
                    plain.clear();
                    o.update(&chunk, &mut plain)?;
                    &plain[..]
                }
                None => &chunk[..],
            };
            out.write_all(bytes).await?;
            total += bytes.len() as u64;
            if let RangeBytes::Pooled(buf) = chunk {
                pool.lock().expect("the pool is never poisoned").push(buf);
            }
        }
        if let Some(o) = opener {
            plain.clear();
            o.finish(&mut plain)?;
            out.write_all(&plain).await?;
            total += plain.len() as u64;
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
    use crate::progress::Progress;

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
    async fn secret_settings_can_come_from_files() {
        use object_store::signer::{Method, Signer};
        let dir = tempfile::tempdir().unwrap();
        let (id, secret) = (dir.path().join("id"), dir.path().join("secret"));
        std::fs::write(&id, "AKIDEXAMPLE\n").unwrap();
        std::fs::write(&secret, "s3cr3t").unwrap();
        let var = |k: &str, v: &std::path::Path| (k.to_owned(), v.display().to_string());
        let mut options = cloud_options([
            var("AWS_ACCESS_KEY_ID_FILE", &id),
            var("AWS_SECRET_ACCESS_KEY_FILE", &secret),
            ("AWS_REGION".into(), "eu-west-1".into()),
            ("HOME".into(), "/root".into()),
        ])
        .unwrap();
        options.sort();
        let expected = [
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t"),
        ];
        assert_eq!(
            options,
            expected.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec()
        );
        // The credentials reach the store: a presigned URL names the key id.
        let bucket =
            crate::object_lock::open_s3(&url::Url::parse("s3://b/p").unwrap(), options).unwrap();
        let signed = bucket
            .store
            .signed_url(Method::GET, &Path::from("x"), Duration::from_mins(1))
            .await
            .unwrap();
        assert!(signed.as_str().contains("AKIDEXAMPLE"), "{signed}");

        let err = |vars: Vec<(String, String)>| cloud_options(vars).unwrap_err().to_string();
        let missing = dir.path().join("missing");
        let e = err(vec![var("AWS_SECRET_ACCESS_KEY_FILE", &missing)]);
        assert!(
            e.starts_with("AWS_SECRET_ACCESS_KEY_FILE: cannot read") && e.contains("missing"),
            "{e}"
        );
        let e = err(vec![
            var("AWS_ACCESS_KEY_ID_FILE", &id),
            ("AWS_ACCESS_KEY_ID".into(), "AKID2".into()),
        ]);
        assert!(e.contains("AWS_ACCESS_KEY_ID is set too"), "{e}");
        std::fs::write(&secret, "\n").unwrap();
        let e = err(vec![var("AWS_SESSION_TOKEN_FILE", &secret)]);
        assert!(
            e.starts_with("AWS_SESSION_TOKEN_FILE: ") && e.ends_with("is empty"),
            "{e}"
        );
        // Other variables ending in _FILE are object_store's own (a path it reads).
        let token = var("AWS_WEB_IDENTITY_TOKEN_FILE", &missing);
        assert_eq!(cloud_options([token.clone()]).unwrap(), vec![token]);
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

    /// Every file under `dir`, with its bytes.
    fn stored_files(dir: &std::path::Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(stored_files(&path));
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
        out
    }

    /// A download from a remote store (here in memory) reuses its range
    /// buffers over many more ranges than are in flight, and delivers the
    /// object whole and in order, sealed or not, with an odd tail.
    #[tokio::test]
    async fn downloads_from_remote_stores_reuse_their_buffers() {
        use crate::crypto::{ArchiveKey, KEY_BYTES};
        let big: Vec<u8> = (0..(READ_RANGE_BYTES as usize) * (READS_IN_FLIGHT + 4) + 12_345)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let local = tempfile::tempdir().unwrap();
        let src = local.path().join("big");
        std::fs::write(&src, &big).unwrap();
        let keys = Arc::new(Keyring::new(vec![ArchiveKey::from_bytes(&[5; KEY_BYTES])]));
        for sealed in [false, true] {
            let store = Arc::new(object_store::memory::InMemory::new());
            let mut a = Archive::from_store(store, "", "memory:///");
            if sealed {
                a = a.with_keys(keys.clone());
            }
            a.upload_file("g/snapshots/big", &src, &Progress::hidden())
                .await
                .unwrap();
            let mut back = Vec::new();
            let n = a.download("g/snapshots/big", &mut back).await.unwrap();
            assert_eq!(n, big.len() as u64, "sealed: {sealed}");
            assert!(back == big, "sealed: {sealed}");
        }
    }

    #[tokio::test]
    async fn encrypted_archives_store_only_sealed_bytes() {
        use crate::crypto::{ArchiveKey, KEY_BYTES};
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let keys = Arc::new(Keyring::new(vec![ArchiveKey::from_bytes(&[3; KEY_BYTES])]));
        let a = Archive::open(&url).unwrap().with_keys(keys.clone());
        let secret = b"a value nobody may read in the store".repeat(3);
        a.put_once(layout::MANIFEST_NAME, Bytes::from_static(b"{\"clear\":1}"))
            .await
            .unwrap();
        a.put_once("g/x", Bytes::from(secret.clone()))
            .await
            .unwrap();
        // A retry seals again (another nonce) and still succeeds; other
        // content conflicts.
        a.put_once("g/x", Bytes::from(secret.clone()))
            .await
            .unwrap();
        let err = a.put_once("g/x", Bytes::from_static(b"two")).await;
        assert!(matches!(err, Err(StoreError::Conflict(_))), "{err:?}");
        let big: Vec<u8> = secret.iter().copied().cycle().take(300_000).collect();
        let local = tempfile::tempdir().unwrap();
        let src = local.path().join("big");
        std::fs::write(&src, &big).unwrap();
        a.upload_file("g/snapshots/big", &src, &Progress::hidden())
            .await
            .unwrap();

        assert_eq!(a.get("g/x").await.unwrap().as_ref(), &secret[..]);
        let mut back = Vec::new();
        assert_eq!(
            a.download("g/snapshots/big", &mut back).await.unwrap(),
            big.len() as u64
        );
        assert!(back == big);
        for (path, bytes) in stored_files(dir.path()) {
            let clear = path.ends_with(layout::MANIFEST_NAME);
            assert_eq!(
                bytes.starts_with(crypto::MAGIC),
                !clear,
                "{}",
                path.display()
            );
            assert!(
                !bytes.windows(16).any(|w| w == &secret[..16]),
                "{} holds plaintext",
                path.display()
            );
        }

        // Without keys, or with other keys, reads name the key id needed.
        let id = keys.ids()[0].to_string();
        let plain = Archive::open(&url).unwrap();
        let other = plain
            .clone()
            .with_keys(Arc::new(Keyring::new(vec![ArchiveKey::from_bytes(
                &[4; KEY_BYTES],
            )])));
        for reader in [&plain, &other] {
            let err = reader.get("g/x").await.unwrap_err();
            assert!(
                matches!(&err, StoreError::Crypto(e) if e.is_key_problem()),
                "{err}"
            );
            assert!(err.to_string().contains(&id), "{err}");
            let err = reader
                .download("g/snapshots/big", &mut Vec::new())
                .await
                .unwrap_err();
            assert!(err.to_string().contains(&id), "{err}");
            assert!(!err.is_retryable());
        }
        assert_eq!(
            plain.get(layout::MANIFEST_NAME).await.unwrap().as_ref(),
            b"{\"clear\":1}"
        );
        // A plaintext object in an encrypted archive is refused.
        plain
            .put_once("g/planted", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let err = a.get("g/planted").await.unwrap_err();
        assert!(
            matches!(err, StoreError::Crypto(CryptoError::NotSealed { .. })),
            "{err}"
        );
    }

    /// Asserts every directory under `dir` is 0700 and every file 0600.
    pub(crate) fn assert_private_tree(dir: &std::path::Path) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if meta.is_dir() {
                assert_eq!(mode, 0o700, "{}", entry.path().display());
                assert_private_tree(&entry.path());
            } else {
                assert_eq!(mode, 0o600, "{}", entry.path().display());
            }
        }
    }

    #[tokio::test]
    async fn file_archive_objects_and_directories_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("archive/nested");
        let a = Archive::open(&format!("file://{}", root.display())).unwrap();
        a.put_once("gen-1/segments/x", Bytes::from_static(b"one"))
            .await
            .unwrap();
        // An object already written (the fsync-again path).
        a.put_once("gen-1/segments/x", Bytes::from_static(b"one"))
            .await
            .unwrap();
        let src = dir.path().join("local-file");
        std::fs::write(&src, vec![7u8; 3 << 20]).unwrap();
        a.upload_file("gen-1/snapshots/y", &src, &Progress::hidden())
            .await
            .unwrap();
        assert_eq!(a.get("gen-1/snapshots/y").await.unwrap().len(), 3 << 20);
        assert_private_tree(&dir.path().join("archive"));
        let mode = std::fs::metadata(dir.path().join("archive"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    /// A staged upload's object exists only once it is completed; an
    /// aborted one leaves nothing. Plain objects of a `file://` archive are
    /// staged as links to the local file, sealed ones as multipart uploads.
    #[tokio::test]
    async fn staged_uploads_appear_on_completion() {
        use crate::crypto::{ArchiveKey, KEY_BYTES};
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("local-file");
        let data: Vec<u8> = (0..(UPLOAD_PART_BYTES as u32 + 1000))
            .map(|i| i as u8)
            .collect();
        std::fs::write(&src, &data).unwrap();
        let keys = Arc::new(Keyring::new(vec![ArchiveKey::from_bytes(&[3; KEY_BYTES])]));
        for (name, keys) in [("plain", Arc::default()), ("sealed", keys)] {
            let root = dir.path().join(name);
            let a = Archive::open(&format!("file://{}", root.display()))
                .unwrap()
                .with_keys(keys);
            let staged = a
                .stage_file("g/snapshots/s", &src, &Progress::hidden())
                .await
                .unwrap();
            assert_eq!(matches!(staged.how, Staged::Linked { .. }), name == "plain");
            assert!(!a.exists("g/snapshots/s").await.unwrap());
            staged.complete().await.unwrap();
            assert!(a.get("g/snapshots/s").await.unwrap() == data, "{name}");

            let staged = a
                .stage_file("g/snapshots/t", &src, &Progress::hidden())
                .await
                .unwrap();
            staged.abort().await.unwrap();
            assert!(!a.exists("g/snapshots/t").await.unwrap());
            let left: Vec<_> = std::fs::read_dir(root.join("g/snapshots"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left, ["s"], "{name}: no staging file is left");
            assert_private_tree(&root);
        }
        assert!(
            std::fs::read(&src).unwrap() == data,
            "the local file is kept"
        );
    }

    #[tokio::test]
    async fn abandoned_local_uploads_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(&format!("file://{}", dir.path().display())).unwrap();
        a.put_once("g/snapshots/done", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let snaps = dir.path().join("g/snapshots");
        let touch = |name: &str, age_secs: u64| {
            let f = std::fs::File::create(snaps.join(name)).unwrap();
            f.set_modified(std::time::SystemTime::now() - Duration::from_secs(age_secs))
                .unwrap();
        };
        touch("done#1", 120); // its object exists, quiet for 2 minutes
        touch("done#2", 0); // its object exists, but just written
        touch("live#1", 0); // an upload in progress
        touch("dead#3", 7200); // quiet for two hours
        touch("name#with-text", 7200); // not a staging file
        let removed = a
            .remove_abandoned_uploads("g/snapshots", Duration::from_hours(1))
            .await
            .unwrap();
        let mut removed = removed;
        removed.sort();
        assert_eq!(removed, vec!["g/snapshots/dead#3", "g/snapshots/done#1"]);
        for kept in ["done", "done#2", "live#1", "name#with-text"] {
            assert!(snaps.join(kept).exists(), "{kept}");
        }
        assert!(a
            .remove_abandoned_uploads("missing/dir", Duration::ZERO)
            .await
            .unwrap()
            .is_empty());
    }

    #[test]
    fn permanent_store_errors_are_not_retryable() {
        let permanent = [
            object_store::Error::NotFound {
                path: "b".into(),
                source: "NoSuchBucket".into(),
            },
            object_store::Error::PermissionDenied {
                path: "b".into(),
                source: "AccessDenied".into(),
            },
            object_store::Error::Unauthenticated {
                path: "b".into(),
                source: "bad key".into(),
            },
            object_store::Error::Precondition {
                path: "b".into(),
                source: "etag".into(),
            },
            object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
            },
        ];
        for e in permanent {
            let text = e.to_string();
            assert!(!StoreError::Backend(e).is_retryable(), "{text}");
        }
        assert!(!StoreError::Conflict("x".into()).is_retryable());
        let transient = object_store::Error::Generic {
            store: "S3",
            source: "connection reset".into(),
        };
        assert!(StoreError::Backend(transient).is_retryable());
        assert!(
            StoreError::Io(std::io::Error::from(std::io::ErrorKind::StorageFull)).is_retryable()
        );
    }
}
