//! A read-only S3 endpoint serving a local directory at disk speed, so that
//! a benchmark of restores from S3 measures the client and the latency (a
//! [`crate::DelayProxy`] in front), not the server (moto serves ranged reads
//! at tens of MB/s here).
//!
//! One bucket; its objects are the regular files under the directory, keyed
//! by their path relative to it (`/`-separated). It answers what
//! `object_store`'s `AmazonS3` client asks of a reader (path-style
//! requests, signatures not checked):
//! - `GET`/`HEAD` of an object, with `Range: bytes=A-B`, `bytes=A-` or
//!   `bytes=-N` (206 with `Content-Range`, 416 `InvalidRange` when it starts
//!   past the end), `If-Match` and `If-None-Match`; `ETag` from size and
//!   mtime, `Last-Modified` from the mtime;
//! - `GET` of the bucket with `list-type=2` (ListObjectsV2: `prefix`,
//!   `delimiter`, `start-after`, `continuation-token`, `max-keys` up to
//!   1000) and `HEAD` of the bucket;
//! - 404 `NoSuchKey`/`NoSuchBucket` with S3's XML error body.
//!
//! Writes (any other method) get 405 `MethodNotAllowed`, other requests
//! (sub-resources, ListObjects v1, date conditions) 501 `NotImplemented`;
//! both are kept for [`FileS3Server::refused`]. Like `object_store`'s local
//! store, it hides symbolic links and its in-progress uploads (`NAME#N`);
//! keys with empty, `.` or `..` segments are refused, so nothing outside
//! the directory can be read.

use std::fmt::Write as _;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Bytes read from a file at a time while sending a body (the next chunk
/// is read while the current one is written).
const CHUNK_BYTES: u64 = 1 << 20;
/// Largest request head (request line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// Most entries in one ListObjectsV2 page, as in S3.
const MAX_LIST_KEYS: usize = 1000;
/// Largest request body read (and discarded) before refusing a write while
/// keeping the connection; a longer one is refused and the connection
/// closed.
const MAX_DRAINED_BODY: u64 = 64 << 20;

/// A read-only S3 endpoint on 127.0.0.1 serving the files under a
/// directory as the objects of one bucket; it stops when dropped.
pub struct FileS3Server {
    /// Port it listens on.
    pub port: u16,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    /// The served directory, canonical.
    root: PathBuf,
    bucket: String,
    refused: Mutex<Vec<String>>,
}

impl FileS3Server {
    /// Serves the files under `dir` as the objects of `bucket`. Point a
    /// client at it with [`crate::S3Server::env`]`(port)`.
    ///
    /// # Errors
    /// If `dir` is not a directory or the port cannot be bound.
    pub async fn start(dir: &Path, bucket: &str) -> anyhow::Result<Self> {
        let root = std::fs::canonicalize(dir)
            .with_context(|| format!("serve {} over S3", dir.display()))?;
        anyhow::ensure!(
            root.is_dir(),
            "serve {} over S3: not a directory",
            dir.display()
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            root,
            bucket: bucket.to_owned(),
            refused: Mutex::default(),
        });
        let serving = shared.clone();
        let accept = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) ends every
            // connection.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { return };
                        connections.spawn(serve_connection(serving.clone(), stream));
                    }
                    Some(_) = connections.join_next() => {}
                }
            }
        });
        Ok(Self {
            port,
            shared,
            accept,
        })
    }

    /// The requests refused so far, as `METHOD TARGET`: writes and requests
    /// this endpoint does not implement. A read-only client sends none.
    pub fn refused(&self) -> Vec<String> {
        self.shared
            .refused
            .lock()
            .expect("no panic while holding the lock")
            .clone()
    }
}

impl Drop for FileS3Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// One parsed request head.
struct Request {
    method: String,
    /// The request target as sent (path and query).
    target: String,
    /// Path, still percent-encoded.
    path: String,
    /// Query string, still encoded.
    query: String,
    /// Header names in lower case.
    headers: Vec<(String, String)>,
    /// HTTP/1.0, or `Connection: close`.
    close: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A response without a file body.
struct Response {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl Response {
    fn xml(status: u16, body: String) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", "application/xml".to_owned())],
            body: body.into_bytes(),
        }
    }

    /// S3's XML error document.
    fn error(status: u16, code: &str, message: &str, resource: &str) -> Self {
        Self::xml(
            status,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}</Message><Resource>{}</Resource></Error>",
                xml_escape(message),
                xml_escape(resource)
            ),
        )
    }
}

/// What a request gets: a plain response, or (part of) a file.
enum Answer {
    Plain(Response),
    File {
        file: std::fs::File,
        meta: FileMeta,
        /// `Some` for a 206 answer.
        partial: Option<Range<u64>>,
    },
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    stream.set_nodelay(true).ok();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::with_capacity(16 << 10, read);
    // Any I/O error ends the connection; a client sees a truncated answer.
    while let Ok(Some(request)) = read_request(&mut read).await {
        let Ok(keep_alive) = answer(&shared, &request, &mut read, &mut write).await else {
            return;
        };
        if !keep_alive {
            write.shutdown().await.ok();
            return;
        }
    }
}

/// Reads a request head; `None` at a clean end of the connection.
async fn read_request(read: &mut BufReader<OwnedReadHalf>) -> std::io::Result<Option<Request>> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = read.read_until(b'\n', &mut line).await?;
        if n == 0 {
            return if total == 0 {
                Ok(None)
            } else {
                Err(invalid("connection closed inside a request head"))
            };
        }
        total += n;
        if total > MAX_HEAD_BYTES {
            return Err(invalid("request head too large"));
        }
        let line = String::from_utf8(line).map_err(|_| invalid("request head is not UTF-8"))?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if lines.is_empty() {
                continue; // Tolerated before a request line (RFC 9112 2.2).
            }
            break;
        }
        lines.push(line.to_owned());
    }
    let mut words = lines[0].split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(invalid("malformed request line"));
    };
    let headers: Vec<(String, String)> = lines[1..]
        .iter()
        .map(|l| {
            let (name, value) = l
                .split_once(':')
                .ok_or_else(|| invalid("malformed header"))?;
            Ok((name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        })
        .collect::<std::io::Result<_>>()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let connection = headers
        .iter()
        .filter(|(n, _)| n == "connection")
        .any(|(_, v)| v.to_ascii_lowercase().contains("close"));
    Ok(Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        close: connection || version != "HTTP/1.1",
        headers,
    }))
}

/// Reads the request's body (discarding it) and answers; returns whether
/// the connection can carry another request.
async fn answer(
    shared: &Shared,
    request: &Request,
    read: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
) -> std::io::Result<bool> {
    let mut keep_alive = !request.close;
    let length = match request.header("content-length") {
        Some(v) => v.parse::<u64>().map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "bad Content-Length")
        })?,
        None => 0,
    };
    // A body that is chunked, awaits `100 Continue` or is large is not
    // read: answer, then close.
    if request.header("transfer-encoding").is_some()
        || request.header("expect").is_some()
        || length > MAX_DRAINED_BODY
    {
        keep_alive = false;
    } else if length > 0 {
        tokio::io::copy(&mut read.take(length), &mut tokio::io::sink()).await?;
    }
    let answer = route(shared, request).await;
    let head_only = request.method == "HEAD";
    match answer {
        Answer::Plain(response) => {
            let mut head = status_line(response.status);
            for (name, value) in &response.headers {
                let _ = write!(head, "{name}: {value}\r\n");
            }
            finish_head(&mut head, response.body.len() as u64, keep_alive);
            write.write_all(head.as_bytes()).await?;
            if !head_only {
                write.write_all(&response.body).await?;
            }
        }
        Answer::File {
            file,
            meta,
            partial,
        } => {
            let mut head = status_line(if partial.is_some() { 206 } else { 200 });
            let range = match partial {
                Some(range) => {
                    let _ = write!(
                        head,
                        "Content-Range: bytes {}-{}/{}\r\n",
                        range.start,
                        range.end - 1,
                        meta.size
                    );
                    range
                }
                None => 0..meta.size,
            };
            let _ = write!(
                head,
                "ETag: {}\r\nLast-Modified: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n",
                meta.etag(),
                http_date(meta.mtime_secs)
            );
            finish_head(&mut head, range.end - range.start, keep_alive);
            write.write_all(head.as_bytes()).await?;
            if !head_only {
                send_file(file, range, write).await?;
            }
        }
    }
    Ok(keep_alive)
}

fn status_line(status: u16) -> String {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        412 => "Precondition Failed",
        416 => "Range Not Satisfiable",
        501 => "Not Implemented",
        _ => "Internal Server Error",
    };
    format!("HTTP/1.1 {status} {reason}\r\n")
}

fn finish_head(head: &mut String, content_length: u64, keep_alive: bool) {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let _ = write!(
        head,
        "Content-Length: {content_length}\r\nConnection: {connection}\r\n\r\n"
    );
}

/// Sends `range` of `file`, reading the next chunk while writing one.
async fn send_file(
    file: std::fs::File,
    range: Range<u64>,
    write: &mut OwnedWriteHalf,
) -> std::io::Result<()> {
    let file = Arc::new(file);
    let read_chunk = |offset: u64| {
        let file = file.clone();
        let len = CHUNK_BYTES.min(range.end - offset);
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; usize::try_from(len).expect("a chunk fits in memory")];
            // A file that shrank meanwhile fails here: the connection is
            // closed and the client sees a short body.
            file.read_exact_at(&mut buf, offset)?;
            Ok::<_, std::io::Error>(buf)
        })
    };
    let mut offset = range.start;
    let mut next = (offset < range.end).then(|| read_chunk(offset));
    while let Some(reading) = next {
        let chunk = reading.await??;
        offset += chunk.len() as u64;
        next = (offset < range.end).then(|| read_chunk(offset));
        write.write_all(&chunk).await?;
    }
    Ok(())
}

async fn route(shared: &Shared, request: &Request) -> Answer {
    let target = request.target.as_str();
    let refuse = |status: u16, code: &str, message: &str| {
        shared
            .refused
            .lock()
            .expect("no panic while holding the lock")
            .push(format!("{} {target}", request.method));
        Answer::Plain(Response::error(status, code, message, target))
    };
    let bad =
        |message: &str| Answer::Plain(Response::error(400, "InvalidArgument", message, target));
    let Some(path) = request.path.strip_prefix('/') else {
        return bad("the request target must be an absolute path");
    };
    let (bucket, key) = match path.split_once('/') {
        Some((bucket, key)) => (bucket, key),
        None => (path, ""),
    };
    let (Some(bucket), Some(key)) = (percent_decode(bucket, false), percent_decode(key, false))
    else {
        return bad("the path is not percent-encoded UTF-8");
    };
    if !matches!(request.method.as_str(), "GET" | "HEAD") {
        let mut refusal = refuse(405, "MethodNotAllowed", "this S3 endpoint is read-only");
        if let Answer::Plain(response) = &mut refusal {
            response.headers.push(("Allow", "GET, HEAD".to_owned()));
        }
        return refusal;
    }
    if bucket != shared.bucket {
        return Answer::Plain(Response::error(
            404,
            "NoSuchBucket",
            "The specified bucket does not exist",
            target,
        ));
    }
    let Some(query) = parse_query(&request.query) else {
        return bad("the query is not percent-encoded UTF-8");
    };
    if key.is_empty() {
        if request.method == "HEAD" && query.is_empty() {
            return Answer::Plain(Response {
                status: 200,
                headers: Vec::new(),
                body: Vec::new(),
            });
        }
        if request.method == "GET" && query.iter().any(|(k, v)| k == "list-type" && v == "2") {
            return match ListRequest::parse(&query) {
                Ok(list) => list_objects(shared, &list).await,
                Err(ListError::Unsupported(name)) => refuse(
                    501,
                    "NotImplemented",
                    &format!("ListObjectsV2 parameter {name:?} is not implemented"),
                ),
                Err(ListError::Invalid(message)) => bad(&message),
            };
        }
        return refuse(
            501,
            "NotImplemented",
            "only ListObjectsV2 (list-type=2) is implemented on the bucket",
        );
    }
    if !query.is_empty() {
        return refuse(
            501,
            "NotImplemented",
            "object sub-resources and versions are not implemented",
        );
    }
    if request.header("if-modified-since").is_some()
        || request.header("if-unmodified-since").is_some()
    {
        return refuse(501, "NotImplemented", "date conditions are not implemented");
    }
    get_object(shared, request, &key).await
}

async fn get_object(shared: &Shared, request: &Request, key: &str) -> Answer {
    let target = request.target.as_str();
    let Some(path) = object_path(&shared.root, key) else {
        return Answer::Plain(Response::error(
            400,
            "InvalidArgument",
            "the key has an empty, \".\" or \"..\" segment",
            target,
        ));
    };
    let no_such_key = || {
        Answer::Plain(Response::error(
            404,
            "NoSuchKey",
            "The specified key does not exist.",
            target,
        ))
    };
    let root = shared.root.clone();
    let opened = tokio::task::spawn_blocking(move || open_object(&root, &path)).await;
    let Ok(Some((file, meta))) = opened else {
        return no_such_key();
    };
    let etag = meta.etag();
    let answer = |status: u16, code: &str, message: &str| {
        let mut response = Response::error(status, code, message, target);
        response.headers.push(("ETag", etag.clone()));
        Answer::Plain(response)
    };
    if let Some(wanted) = request.header("if-match") {
        if !etag_matches(wanted, &etag) {
            return answer(
                412,
                "PreconditionFailed",
                "If-Match does not match the ETag",
            );
        }
    }
    if let Some(unwanted) = request.header("if-none-match") {
        if etag_matches(unwanted, &etag) {
            let mut not_modified = answer(304, "NotModified", "");
            if let Answer::Plain(response) = &mut not_modified {
                response.body.clear();
            }
            return not_modified;
        }
    }
    let partial = match request.header("range").map(|r| parse_range(r, meta.size)) {
        None | Some(RangeAnswer::Ignored) => None,
        Some(RangeAnswer::Bytes(range)) => Some(range),
        Some(RangeAnswer::Unsatisfiable) => {
            let mut refusal = answer(
                416,
                "InvalidRange",
                "The requested range is not satisfiable",
            );
            if let Answer::Plain(response) = &mut refusal {
                response
                    .headers
                    .push(("Content-Range", format!("bytes */{}", meta.size)));
            }
            return refusal;
        }
    };
    Answer::File {
        file,
        meta,
        partial,
    }
}

fn etag_matches(condition: &str, etag: &str) -> bool {
    condition
        .split(',')
        .map(|c| c.trim().trim_start_matches("W/"))
        .any(|c| c == "*" || c == etag)
}

/// The file a key names under `root`, if the key has only plain segments
/// (no empty, `.` or `..` one, no NUL): such a path cannot leave `root`
/// except through a symbolic link, which [`open_object`] refuses.
fn object_path(root: &Path, key: &str) -> Option<PathBuf> {
    let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('\0');
    key.split('/').all(plain).then(|| root.join(key))
}

/// Opens the regular file at `path` (under the canonical `root`) if it is
/// an object: no symbolic link anywhere on its way (its canonical path is
/// itself) and not an in-progress upload.
fn open_object(root: &Path, path: &Path) -> Option<(std::fs::File, FileMeta)> {
    if std::fs::canonicalize(path).ok()? != path || !path.starts_with(root) {
        return None;
    }
    if is_upload_in_progress(path.file_name()?.to_str()?) {
        return None;
    }
    let file = std::fs::File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    meta.is_file().then(|| (file, FileMeta::of(&meta)))
}

/// `object_store`'s local store writes an object as `NAME#N` first and
/// hides such files; so does this endpoint.
fn is_upload_in_progress(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What an object's headers and listing entry say about its file.
#[derive(Clone, Copy)]
struct FileMeta {
    size: u64,
    mtime_secs: i64,
    mtime_nanos: u32,
}

impl FileMeta {
    fn of(meta: &std::fs::Metadata) -> Self {
        let (mtime_secs, mtime_nanos) = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| {
                (
                    i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    d.subsec_nanos(),
                )
            });
        Self {
            size: meta.len(),
            mtime_secs,
            mtime_nanos,
        }
    }

    /// Changes with the size or the modification time (not a content
    /// hash: objects are gigabytes).
    fn etag(self) -> String {
        format!(
            "\"{:x}-{:x}-{:x}\"",
            self.size, self.mtime_secs, self.mtime_nanos
        )
    }
}

enum RangeAnswer {
    /// Not a single byte range: the whole object is sent (RFC 9110 14.2).
    Ignored,
    Bytes(Range<u64>),
    Unsatisfiable,
}

/// A `Range` header against an object of `size` bytes.
fn parse_range(header: &str, size: u64) -> RangeAnswer {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Ignored;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return RangeAnswer::Ignored;
    };
    let number = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim().is_empty(), number(first), number(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Bytes(size.saturating_sub(n)..size)
            }
        }
        (false, Some(start), end) if last.trim().is_empty() || end.is_some() => {
            if end.is_some_and(|e| e < start) {
                RangeAnswer::Ignored
            } else if start >= size {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Bytes(start..end.map_or(size, |e| size.min(e + 1)))
            }
        }
        _ => RangeAnswer::Ignored,
    }
}

/// A ListObjectsV2 request.
struct ListRequest {
    prefix: String,
    delimiter: Option<String>,
    start_after: Option<String>,
    /// The last entry (key or common prefix) of the previous page.
    after_entry: Option<String>,
    max_keys: usize,
}

enum ListError {
    Unsupported(String),
    Invalid(String),
}

impl ListRequest {
    fn parse(query: &[(String, String)]) -> Result<Self, ListError> {
        let mut list = Self {
            prefix: String::new(),
            delimiter: None,
            start_after: None,
            after_entry: None,
            max_keys: MAX_LIST_KEYS,
        };
        for (name, value) in query {
            match name.as_str() {
                "list-type" | "fetch-owner" => {}
                "prefix" => list.prefix.clone_from(value),
                "delimiter" => list.delimiter = (!value.is_empty()).then(|| value.clone()),
                "start-after" => list.start_after = Some(value.clone()),
                "continuation-token" => {
                    list.after_entry = Some(decode_token(value).ok_or_else(|| {
                        ListError::Invalid(
                            "The continuation token provided is incorrect".to_owned(),
                        )
                    })?);
                }
                "max-keys" => {
                    let n: usize = value.parse().map_err(|_| {
                        ListError::Invalid(format!("max-keys {value:?} is not a whole number"))
                    })?;
                    list.max_keys = n.min(MAX_LIST_KEYS);
                }
                other => return Err(ListError::Unsupported(other.to_owned())),
            }
        }
        Ok(list)
    }
}

/// An entry of a listing page.
enum Entry {
    Object(String, FileMeta),
    CommonPrefix(String),
}

impl Entry {
    fn name(&self) -> &str {
        match self {
            Self::Object(key, _) | Self::CommonPrefix(key) => key,
        }
    }
}

async fn list_objects(shared: &Shared, list: &ListRequest) -> Answer {
    let root = shared.root.clone();
    let Ok(Ok(objects)) = tokio::task::spawn_blocking(move || walk(&root)).await else {
        return Answer::Plain(Response::error(
            500,
            "InternalError",
            "cannot list the served directory",
            &shared.bucket,
        ));
    };
    Answer::Plain(Response::xml(200, list_page(&shared.bucket, objects, list)))
}

/// The ListObjectsV2 answer for `list` over `objects` (sorted by key).
fn list_page(bucket: &str, objects: Vec<(String, FileMeta)>, list: &ListRequest) -> String {
    let mut entries: Vec<Entry> = Vec::new();
    for (key, meta) in objects {
        let Some(rest) = key.strip_prefix(list.prefix.as_str()) else {
            continue;
        };
        if list.start_after.as_ref().is_some_and(|s| key <= *s) {
            continue;
        }
        let common = list.delimiter.as_ref().and_then(|d| {
            rest.find(d.as_str())
                .map(|i| key[..list.prefix.len() + i + d.len()].to_owned())
        });
        match common {
            // Keys sharing a prefix are adjacent in key order.
            Some(p) if entries.last().is_some_and(|e| e.name() == p) => {}
            Some(p) => entries.push(Entry::CommonPrefix(p)),
            None => entries.push(Entry::Object(key, meta)),
        }
    }
    if let Some(after) = &list.after_entry {
        entries.retain(|e| e.name() > after.as_str());
    }
    let truncated = entries.len() > list.max_keys && list.max_keys > 0;
    entries.truncate(list.max_keys);

    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    let _ = write!(
        xml,
        "<Name>{}</Name><Prefix>{}</Prefix><KeyCount>{}</KeyCount><MaxKeys>{}</MaxKeys><IsTruncated>{truncated}</IsTruncated>",
        xml_escape(bucket),
        xml_escape(&list.prefix),
        entries.len(),
        list.max_keys
    );
    if let Some(d) = &list.delimiter {
        let _ = write!(xml, "<Delimiter>{}</Delimiter>", xml_escape(d));
    }
    if let Some(s) = &list.start_after {
        let _ = write!(xml, "<StartAfter>{}</StartAfter>", xml_escape(s));
    }
    // All Contents, then all CommonPrefixes, as S3 does (object_store's
    // XML reader wants each list in one run).
    for entry in &entries {
        if let Entry::Object(key, meta) = entry {
            let _ = write!(
                xml,
                "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>{}</ETag><Size>{}</Size><StorageClass>STANDARD</StorageClass></Contents>",
                xml_escape(key),
                rfc3339(meta.mtime_secs, meta.mtime_nanos),
                xml_escape(&meta.etag()),
                meta.size
            );
        }
    }
    for entry in &entries {
        if let Entry::CommonPrefix(p) = entry {
            let _ = write!(
                xml,
                "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
                xml_escape(p)
            );
        }
    }
    if truncated {
        let last = entries.last().expect("a truncated page has entries").name();
        let _ = write!(
            xml,
            "<NextContinuationToken>{}</NextContinuationToken>",
            encode_token(last)
        );
    }
    xml.push_str("</ListBucketResult>");
    xml
}

/// Every object under `root` (regular files, not through symbolic links,
/// UTF-8 names, no in-progress uploads), sorted by key.
fn walk(root: &Path) -> std::io::Result<Vec<(String, FileMeta)>> {
    fn visit(dir: &Path, prefix: &str, out: &mut Vec<(String, FileMeta)>) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            // Removed while listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !prefix.is_empty() => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let key = format!("{prefix}{name}");
            let kind = entry.file_type()?;
            if kind.is_dir() {
                visit(&entry.path(), &format!("{key}/"), out)?;
            } else if kind.is_file() && !is_upload_in_progress(&name) {
                match entry.metadata() {
                    Ok(meta) => out.push((key, FileMeta::of(&meta))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    visit(root, "", &mut out)?;
    // Byte order of UTF-8 keys, as S3 lists.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Continuation tokens are the hex of the last entry listed (opaque to
/// clients, and free of characters that need escaping).
fn encode_token(last: &str) -> String {
    last.bytes().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn decode_token(token: &str) -> Option<String> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// Decodes `%XX` escapes (and `+` as a space in a query); `None` for a bad
/// escape or a result that is not UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The query's name-value pairs, decoded; `None` if one does not decode.
fn parse_query(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(name, true)?, percent_decode(value, true)?))
        })
        .collect()
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Calendar date and time of a Unix time: (year, month, day, hour,
/// minute, second, weekday with 0 = Sunday). Howard Hinnant's
/// `civil_from_days`.
fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32, usize) {
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let small = |v: i64| u32::try_from(v).expect("a calendar field is small and positive");
    (
        year,
        small(month),
        small(day),
        small(of_day / 3600),
        small(of_day % 3600 / 60),
        small(of_day % 60),
        usize::try_from((days + 4).rem_euclid(7)).expect("a weekday"),
    )
}

/// RFC 1123 date, as in `Last-Modified`: `Thu, 01 Jan 1970 00:00:00 GMT`.
fn http_date(secs: i64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (year, month, day, hour, minute, second, weekday) = civil(secs);
    format!(
        "{}, {day:02} {} {year:04} {hour:02}:{minute:02}:{second:02} GMT",
        DAYS[weekday],
        MONTHS[month as usize - 1]
    )
}

/// RFC 3339 time in UTC with milliseconds, as in S3 listings.
fn rfc3339(secs: i64, nanos: u32) -> String {
    let (year, month, day, hour, minute, second, _) = civil(secs);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        nanos / 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use object_store::aws::{AmazonS3, AmazonS3Builder};
    use object_store::list::{PaginatedListOptions, PaginatedListStore};
    use object_store::path::Path as ObjectPath;
    use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
    use std::time::Duration;

    const BUCKET: &str = "files";

    /// A server on `tmp/served`, filled by `fill`; `tmp/secret` lies
    /// outside it.
    struct Served {
        tmp: tempfile::TempDir,
        server: FileS3Server,
        store: AmazonS3,
    }

    impl Served {
        async fn start(fill: impl FnOnce(&Path) -> std::io::Result<()>) -> anyhow::Result<Self> {
            let tmp = tempfile::tempdir()?;
            let root = tmp.path().join("served");
            std::fs::create_dir(&root)?;
            std::fs::write(tmp.path().join("secret"), b"outside")?;
            fill(&root)?;
            let server = FileS3Server::start(&root, BUCKET).await?;
            let store = client(server.port, BUCKET)?;
            Ok(Self { tmp, server, store })
        }

        fn root(&self) -> PathBuf {
            self.tmp.path().join("served")
        }
    }

    fn client(port: u16, bucket: &str) -> anyhow::Result<AmazonS3> {
        Ok(AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .with_region("us-east-1")
            .build()?)
    }

    /// 2.5 MiB and 3 bytes of a pattern that does not repeat every chunk.
    fn big() -> Vec<u8> {
        (0u32..(5 << 19) + 3)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
            .collect()
    }

    /// A small tree: objects at two depths, an empty one, a key with a
    /// space and a plus, and what must stay hidden (an in-progress upload,
    /// symbolic links to a file and a directory outside).
    fn small_tree(root: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(root.join("dir/sub"))?;
        std::fs::create_dir(root.join("dir2"))?;
        std::fs::write(root.join("a.txt"), b"alpha")?;
        std::fs::write(root.join("dir/big.bin"), big())?;
        std::fs::write(root.join("dir/sub/c"), b"")?;
        std::fs::write(root.join("dir2/d e+f"), b"spaces")?;
        std::fs::write(root.join("dir/upload#7"), b"in progress")?;
        let outside = root.parent().expect("root has a parent");
        std::os::unix::fs::symlink(outside.join("secret"), root.join("link"))?;
        std::os::unix::fs::symlink(outside, root.join("dirlink"))
    }

    fn keys(metas: &[object_store::ObjectMeta]) -> Vec<String> {
        metas.iter().map(|m| m.location.to_string()).collect()
    }

    fn strings(paths: &[ObjectPath]) -> Vec<String> {
        paths.iter().map(ToString::to_string).collect()
    }

    #[tokio::test]
    async fn lists_with_prefix_delimiter_and_offset() -> anyhow::Result<()> {
        let s = Served::start(small_tree).await?;
        let all: Vec<_> = s.store.list(None).try_collect().await?;
        assert_eq!(
            keys(&all),
            ["a.txt", "dir/big.bin", "dir/sub/c", "dir2/d e+f"]
        );
        for meta in &all {
            let file = std::fs::metadata(s.root().join(meta.location.as_ref()))?;
            assert_eq!(meta.size, file.len(), "{}", meta.location);
            let mtime = chrono::DateTime::<chrono::Utc>::from(file.modified()?);
            assert_eq!(
                meta.last_modified.timestamp_millis(),
                mtime.timestamp_millis(),
                "{}",
                meta.location
            );
            let head = s.store.head(&meta.location).await?;
            assert_eq!(head.e_tag, meta.e_tag, "{}", meta.location);
            assert_eq!(head.last_modified.timestamp(), mtime.timestamp());
        }

        let top = s.store.list_with_delimiter(None).await?;
        assert_eq!(keys(&top.objects), ["a.txt"]);
        assert_eq!(strings(&top.common_prefixes), ["dir", "dir2"]);
        let dir = s.store.list_with_delimiter(Some(&"dir".into())).await?;
        assert_eq!(keys(&dir.objects), ["dir/big.bin"]);
        assert_eq!(strings(&dir.common_prefixes), ["dir/sub"]);

        let under: Vec<_> = s.store.list(Some(&"dir".into())).try_collect().await?;
        assert_eq!(keys(&under), ["dir/big.bin", "dir/sub/c"]);
        let after: Vec<_> = s
            .store
            .list_with_offset(None, &"dir/big.bin".into())
            .try_collect()
            .await?;
        assert_eq!(keys(&after), ["dir/sub/c", "dir2/d e+f"]);
        assert_eq!(s.server.refused(), Vec::<String>::new());
        Ok(())
    }

    #[tokio::test]
    async fn paginates_listings() -> anyhow::Result<()> {
        const MANY: usize = 1005;
        let s = Served::start(|root| {
            std::fs::create_dir(root.join("many"))?;
            for i in 0..MANY {
                std::fs::write(root.join(format!("many/k{i:04}")), i.to_string())?;
            }
            for i in 0..5 {
                std::fs::create_dir(root.join(format!("p{i}")))?;
                std::fs::write(root.join(format!("p{i}/x")), b"x")?;
                std::fs::write(root.join(format!("p{i}/y")), b"y")?;
            }
            Ok(())
        })
        .await?;
        let expected: Vec<String> = (0..MANY).map(|i| format!("many/k{i:04}")).collect();

        // More keys than S3's page of 1000: object_store follows the token.
        let all: Vec<_> = s.store.list(Some(&"many".into())).try_collect().await?;
        assert_eq!(keys(&all), expected);

        // Pages of a chosen size, with and without a delimiter.
        let pages = |prefix: &'static str, delimiter: bool, max_keys: usize| {
            let store = &s.store;
            async move {
                let mut pages = Vec::new();
                let mut token = None;
                loop {
                    let page = store
                        .list_paginated(
                            Some(prefix),
                            PaginatedListOptions {
                                delimiter: delimiter.then(|| "/".into()),
                                max_keys: Some(max_keys),
                                page_token: token,
                                ..PaginatedListOptions::default()
                            },
                        )
                        .await?;
                    pages.push(page.result);
                    token = page.page_token;
                    if token.is_none() || pages.len() > 100 {
                        return anyhow::Ok(pages);
                    }
                }
            }
        };
        let flat = pages("many/k", false, 400).await?;
        assert_eq!(
            flat.iter().map(|p| p.objects.len()).collect::<Vec<_>>(),
            [400, 400, 205]
        );
        let flat: Vec<String> = flat.iter().flat_map(|p| keys(&p.objects)).collect();
        assert_eq!(flat, expected);

        let grouped = pages("p", true, 2).await?;
        assert_eq!(grouped.len(), 3);
        assert!(grouped.iter().all(|p| p.objects.is_empty()));
        let prefixes: Vec<String> = grouped
            .iter()
            .flat_map(|p| strings(&p.common_prefixes))
            .collect();
        assert_eq!(prefixes, ["p0", "p1", "p2", "p3", "p4"]);
        Ok(())
    }

    #[tokio::test]
    async fn serves_ranges_whole_objects_and_conditions() -> anyhow::Result<()> {
        let s = Served::start(small_tree).await?;
        let big = big();
        let len = big.len() as u64;
        let path: ObjectPath = "dir/big.bin".into();

        assert_eq!(s.store.get(&path).await?.bytes().await?, big);
        // Across the 1 MiB chunk boundary.
        let part = s.store.get_range(&path, 1_000_000..2_200_000).await?;
        assert_eq!(part, big[1_000_000..2_200_000]);
        let ranged = |range: GetRange| {
            let (store, path) = (&s.store, &path);
            async move {
                let options = GetOptions::new().with_range(Some(range));
                let got = store.get_opts(path, options).await?;
                assert_eq!(got.meta.size, len);
                anyhow::Ok((got.range.clone(), got.bytes().await?))
            }
        };
        let usize_of = |n: u64| usize::try_from(n).expect("small");
        assert_eq!(
            ranged(GetRange::Suffix(10)).await?,
            (len - 10..len, big[usize_of(len - 10)..].to_vec().into())
        );
        assert_eq!(
            ranged(GetRange::Offset(len - 5)).await?,
            (len - 5..len, big[usize_of(len - 5)..].to_vec().into())
        );
        // A range past the end is cut at the end, as S3 does.
        assert_eq!(
            ranged(GetRange::Bounded(len - 3..len + 100)).await?,
            (len - 3..len, big[usize_of(len - 3)..].to_vec().into())
        );
        let beyond = s.store.get_range(&path, len + 1..len + 5).await;
        assert!(
            beyond
                .as_ref()
                .is_err_and(|e| e.to_string().contains("InvalidRange")),
            "{beyond:?}"
        );

        let head = s.store.head(&path).await?;
        assert_eq!(head.size, len);
        assert_eq!(s.store.get(&"dir/sub/c".into()).await?.bytes().await?, "");
        assert_eq!(
            s.store.get(&"dir2/d e+f".into()).await?.bytes().await?,
            "spaces"
        );

        let etag = head.e_tag.clone().expect("an ETag");
        let matching = GetOptions {
            if_match: Some(etag.clone()),
            ..GetOptions::default()
        };
        assert_eq!(s.store.get_opts(&path, matching).await?.meta.size, len);
        let stale = GetOptions {
            if_match: Some("\"other\"".into()),
            ..GetOptions::default()
        };
        let refused = s.store.get_opts(&path, stale).await;
        assert!(
            matches!(refused, Err(object_store::Error::Precondition { .. })),
            "{refused:?}"
        );
        let unchanged = GetOptions {
            if_none_match: Some(etag.clone()),
            ..GetOptions::default()
        };
        let refused = s.store.get_opts(&path, unchanged).await;
        assert!(
            matches!(refused, Err(object_store::Error::NotModified { .. })),
            "{refused:?}"
        );

        // Another modification time is another ETag.
        let file = std::fs::File::options()
            .write(true)
            .open(s.root().join("dir/big.bin"))?;
        file.set_modified(std::time::SystemTime::now() + Duration::from_mins(1))?;
        let changed = s.store.head(&path).await?;
        assert_eq!(changed.size, len);
        assert_ne!(changed.e_tag, head.e_tag);
        assert_eq!(s.server.refused(), Vec::<String>::new());
        Ok(())
    }

    #[tokio::test]
    async fn missing_and_hidden_keys_are_not_found() -> anyhow::Result<()> {
        let s = Served::start(small_tree).await?;
        for key in [
            "nope",
            "dir/nope",
            "dir",
            "dir/upload#7",
            "link",
            "dirlink/secret",
        ] {
            let head = s.store.head(&key.into()).await;
            assert!(
                matches!(head, Err(object_store::Error::NotFound { .. })),
                "head {key}: {head:?}"
            );
            let get = s.store.get(&key.into()).await.map(drop);
            let Err(object_store::Error::NotFound { source, .. }) = get else {
                panic!("get {key}: {get:?}");
            };
            assert!(source.to_string().contains("NoSuchKey"), "{source}");
        }
        let other = client(s.server.port, "other")?;
        let listed: Result<Vec<_>, _> = other.list(None).try_collect().await;
        assert!(
            listed
                .as_ref()
                .is_err_and(|e| e.to_string().contains("NoSuchBucket")),
            "{listed:?}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn refuses_writes_at_once() -> anyhow::Result<()> {
        let s = Served::start(small_tree).await?;
        let started = std::time::Instant::now();
        let put = s.store.put(&"new".into(), "data".into()).await;
        assert!(
            put.as_ref()
                .is_err_and(|e| e.to_string().contains("MethodNotAllowed")),
            "{put:?}"
        );
        // object_store deletes through a bulk delete (`POST ?delete`).
        let delete = s.store.delete(&"a.txt".into()).await;
        assert!(delete.is_err(), "{delete:?}");
        // 405 is not retried (a 5xx would be, for minutes).
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!s.root().join("new").exists());
        assert_eq!(std::fs::read(s.root().join("a.txt"))?, b"alpha");
        assert_eq!(s.server.refused(), ["PUT /files/new", "POST /files?delete"]);
        Ok(())
    }

    /// Sends `requests` as they are on one connection and reads until the
    /// server closes it.
    async fn raw(port: u16, requests: &str) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(requests.as_bytes()).await?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await??;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn get(target: &str) -> String {
        format!("GET {target} HTTP/1.1\r\nHost: s3\r\nConnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn keys_cannot_leave_the_directory() -> anyhow::Result<()> {
        let s = Served::start(small_tree).await?;
        for (target, status) in [
            ("/files/..%2Fsecret", 400),
            ("/files/%2E%2E/secret", 400),
            ("/files/dir/../../secret", 400),
            ("/files/./a.txt", 400),
            ("/files//secret", 400),
            ("/files/a.txt%00", 400),
            ("/files/%ZZ", 400),
            ("/files/link", 404),
            ("/files/dirlink/secret", 404),
            ("/files/dirlink/served/a.txt", 404),
        ] {
            let answer = raw(s.server.port, &get(target)).await?;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{target}: {answer}"
            );
            assert!(!answer.contains("outside"), "{target}: {answer}");
        }
        assert!(raw(s.server.port, &get("/files/a.txt"))
            .await?
            .ends_with("\r\n\r\nalpha"));
        Ok(())
    }

    #[tokio::test]
    async fn speaks_http_as_s3_clients_expect() -> anyhow::Result<()> {
        let s = Served::start(small_tree).await?;
        // Keep-alive: a HEAD (no body) then a GET on one connection.
        let both = raw(
            s.server.port,
            &format!(
                "HEAD /files/a.txt HTTP/1.1\r\nHost: s3\r\n\r\n{}",
                get("/files/a.txt")
            ),
        )
        .await?;
        assert_eq!(both.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{both}");
        assert_eq!(both.matches("Content-Length: 5\r\n").count(), 2, "{both}");
        assert!(both.ends_with("\r\n\r\nalpha"), "{both}");

        let unsatisfiable = raw(
            s.server.port,
            "GET /files/a.txt HTTP/1.1\r\nRange: bytes=5-\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert!(
            unsatisfiable.starts_with("HTTP/1.1 416 "),
            "{unsatisfiable}"
        );
        assert!(
            unsatisfiable.contains("Content-Range: bytes */5\r\n"),
            "{unsatisfiable}"
        );
        let bad_token = raw(
            s.server.port,
            &get("/files?list-type=2&continuation-token=zz"),
        )
        .await?;
        assert!(bad_token.starts_with("HTTP/1.1 400 "), "{bad_token}");
        // A body the server must skip to find the next request.
        let drained = raw(
            s.server.port,
            &format!(
                "PUT /files/x HTTP/1.1\r\nContent-Length: 4\r\n\r\nGET {}",
                get("/files/a.txt")
            ),
        )
        .await?;
        assert!(drained.starts_with("HTTP/1.1 405 "), "{drained}");
        assert!(drained.ends_with("\r\n\r\nalpha"), "{drained}");
        // ListObjects v1 and sub-resources are not implemented.
        for target in ["/files", "/files?versioning", "/files/a.txt?tagging"] {
            let answer = raw(s.server.port, &get(target)).await?;
            assert!(answer.starts_with("HTTP/1.1 501 "), "{target}: {answer}");
            assert!(answer.contains("<Code>NotImplemented</Code>"), "{answer}");
        }
        assert_eq!(
            s.server.refused(),
            [
                "PUT /files/x",
                "GET /files",
                "GET /files?versioning",
                "GET /files/a.txt?tagging"
            ]
        );
        Ok(())
    }

    #[test]
    fn ranges_follow_s3() {
        let bytes = |header: &str, size: u64| match parse_range(header, size) {
            RangeAnswer::Bytes(range) => Some(Some(range)),
            RangeAnswer::Unsatisfiable => Some(None),
            RangeAnswer::Ignored => None,
        };
        assert_eq!(bytes("bytes=0-0", 10), Some(Some(0..1)));
        assert_eq!(bytes("bytes=2-5", 10), Some(Some(2..6)));
        assert_eq!(bytes("bytes=2-50", 10), Some(Some(2..10)));
        assert_eq!(bytes("bytes=7-", 10), Some(Some(7..10)));
        assert_eq!(bytes("bytes=-3", 10), Some(Some(7..10)));
        assert_eq!(bytes("bytes=-30", 10), Some(Some(0..10)));
        assert_eq!(bytes("bytes=10-", 10), Some(None));
        assert_eq!(bytes("bytes=10-12", 10), Some(None));
        assert_eq!(bytes("bytes=-0", 10), Some(None));
        assert_eq!(bytes("bytes=0-", 0), Some(None));
        assert_eq!(bytes("bytes=5-2", 10), None);
        assert_eq!(bytes("bytes=1-2,4-5", 10), None);
        assert_eq!(bytes("items=1-2", 10), None);
        assert_eq!(bytes("bytes=x-", 10), None);
    }

    #[test]
    fn dates_match_chrono() {
        let now = chrono::Utc::now().timestamp();
        for secs in [
            0,
            951_782_400,
            951_868_799,
            1_709_251_199,
            4_102_444_800,
            now,
        ] {
            let nanos = 123_456_789;
            let time = chrono::DateTime::from_timestamp(secs, nanos).expect("in range");
            assert_eq!(
                http_date(secs),
                time.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
            );
            assert_eq!(
                rfc3339(secs, nanos),
                time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            );
        }
    }

    #[test]
    fn tokens_and_escapes_round_trip() {
        for key in ["", "gen-1/segments/00ab-00cd.seg", "a b&<é>"] {
            assert_eq!(decode_token(&encode_token(key)).as_deref(), Some(key));
        }
        assert_eq!(decode_token("zz"), None);
        assert_eq!(decode_token("abc"), None);
        assert_eq!(percent_decode("a%20b+c", true).as_deref(), Some("a b c"));
        assert_eq!(percent_decode("a%20b+c", false).as_deref(), Some("a b+c"));
        assert_eq!(percent_decode("%C3%A9", false).as_deref(), Some("é"));
        assert_eq!(percent_decode("%C3", false), None);
        assert_eq!(percent_decode("%4", false), None);
    }
}
