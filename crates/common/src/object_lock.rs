//! S3 Object Lock: opening `s3://` archives so that buckets with a default
//! retention accept their uploads, and reading an object's lock so that a
//! prune leaves locked objects alone and says until when they stay.
//!
//! Facts this rests on (S3 API reference):
//! - A bucket with a default retention refuses a PUT, and a multipart part,
//!   that carries neither `Content-MD5` nor an `x-amz-checksum-*` header.
//!   `s3://` archives therefore send `x-amz-checksum-sha256` with every
//!   upload (`object_store`'s [`Checksum::SHA256`]; the digest is the one
//!   SigV4 computes for the payload anyway). `AWS_CHECKSUM_ALGORITHM=crc64nvme`
//!   picks the other algorithm `object_store` offers.
//! - Object Lock exists only in buckets created with it, and such buckets
//!   are versioned. There, a DELETE without a version id only adds a delete
//!   marker, which S3 allows even under a COMPLIANCE retention or a legal
//!   hold: the object leaves listings while its data stays. So a prune asks
//!   before it deletes.
//! - `GetObjectLockConfiguration` (`GET /?object-lock`) says whether the
//!   bucket has Object Lock at all (404 when it has not). `HeadObject`
//!   answers with `x-amz-object-lock-mode`, `x-amz-object-lock-retain-until-date`
//!   and `x-amz-object-lock-legal-hold`, to callers allowed
//!   `s3:GetObjectRetention` and `s3:GetObjectLegalHold`.
//!
//! `object_store` exposes neither answer, so both requests go as plain HTTP
//! to URLs that `object_store`'s [`Signer`] presigns (its credentials,
//! region, endpoint and SigV4 code).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::BoxFuture;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, Checksum};
use object_store::path::Path;
use object_store::signer::{Method, SignedUrlOptions, Signer};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;

use crate::store::StoreError;

/// How long a presigned URL stays valid (it is used at once).
const PRESIGNED_FOR: Duration = Duration::from_mins(5);
/// Time limit of one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const MODE: &str = "x-amz-object-lock-mode";
const RETAIN_UNTIL: &str = "x-amz-object-lock-retain-until-date";
const LEGAL_HOLD: &str = "x-amz-object-lock-legal-hold";

/// An Object Lock retention mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetentionMode {
    /// Users with `s3:BypassGovernanceRetention` may still delete.
    Governance,
    /// Nobody can delete the object's data before the date.
    Compliance,
}

impl fmt::Display for RetentionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Governance => "GOVERNANCE",
            Self::Compliance => "COMPLIANCE",
        })
    }
}

/// The Object Lock on one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Its retention period: mode and retain-until date.
    pub period: Option<(RetentionMode, DateTime<Utc>)>,
    /// Whether a legal hold is on (it has no date: it lasts until removed).
    pub legal_hold: bool,
}

impl Retention {
    /// Whether the store keeps the object's data at `now_ms` whatever a
    /// deletion says: its retain-until date is later, or a legal hold is on.
    pub fn holds_at(&self, now_ms: i64) -> bool {
        self.legal_hold
            || self
                .period
                .is_some_and(|(_, until)| until.timestamp_millis() > now_ms)
    }

    /// The retain-until date in RFC 3339 (UTC), if there is a period.
    pub fn retain_until_rfc3339(&self) -> Option<String> {
        self.period
            .map(|(_, until)| until.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.period, self.retain_until_rfc3339()) {
            (Some((mode, _)), Some(until)) => {
                write!(f, "{mode} retention until {until}")?;
                if self.legal_hold {
                    f.write_str(" and a legal hold")?;
                }
                Ok(())
            }
            _ => f.write_str("a legal hold (no date: until someone removes it)"),
        }
    }
}

/// Where an archive learns about Object Lock: S3 for `s3://` archives; a
/// test store plants its own ([`crate::store::Archive::with_object_lock`]).
pub trait ObjectLockSource: fmt::Debug + Send + Sync {
    /// Whether the bucket has Object Lock, i.e. whether any of its objects
    /// can be locked at all. A store that may not say answers `true`.
    fn bucket_lock_enabled(&self) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// The lock on the object at `path`; `None` when it has none or is gone.
    fn retention<'a>(
        &'a self,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<Option<Retention>, StoreError>>;
}

/// An `s3://` archive's bucket, opened.
pub(crate) struct S3Bucket {
    /// The store, uploading with checksums.
    pub store: Arc<AmazonS3>,
    /// The archive's prefix in the bucket.
    pub prefix: Path,
    /// Object Lock lookups on the same bucket.
    pub lock: Arc<S3ObjectLock>,
}

/// Opens the bucket of an `s3://` URL as `object_store::parse_url_opts`
/// does, with `options` (`AWS_*` environment variables, any case) applied
/// over a checksum on every upload.
///
/// # Errors
/// Why the URL or the options cannot be used.
pub(crate) fn open_s3(
    url: &url::Url,
    options: impl IntoIterator<Item = (String, String)>,
) -> Result<S3Bucket, String> {
    let builder = options.into_iter().fold(
        AmazonS3Builder::new()
            .with_url(url.as_str())
            .with_checksum_algorithm(Checksum::SHA256),
        |builder, (key, value)| match key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            Ok(key) => builder.with_config(key, value),
            Err(_) => builder,
        },
    );
    let store = Arc::new(builder.build().map_err(|e| e.to_string())?);
    let prefix = Path::parse(url.path()).map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot set up an HTTP client: {e}"))?;
    Ok(S3Bucket {
        lock: Arc::new(S3ObjectLock {
            s3: store.clone(),
            http,
        }),
        store,
        prefix,
    })
}

/// Object Lock lookups on one S3 bucket.
#[derive(Debug)]
pub(crate) struct S3ObjectLock {
    s3: Arc<AmazonS3>,
    http: reqwest::Client,
}

impl S3ObjectLock {
    /// Sends `method` on `path` (the bucket itself when empty) to a
    /// presigned URL.
    async fn send(
        &self,
        method: Method,
        path: &Path,
        options: &SignedUrlOptions,
    ) -> Result<reqwest::Response, StoreError> {
        let url = self
            .s3
            .signed_url_opts(method.clone(), path, PRESIGNED_FOR, options)
            .await?;
        self.http
            .request(method.clone(), url)
            .send()
            .await
            .map_err(|e| failure(path, &method, &e.to_string(), None))
    }
}

impl ObjectLockSource for S3ObjectLock {
    fn bucket_lock_enabled(&self) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            let bucket = Path::default();
            let options = SignedUrlOptions::default().with_query([("object-lock", "")]);
            let response = self.send(Method::GET, &bucket, &options).await?;
            match response.status() {
                StatusCode::OK => {
                    let body = response
                        .text()
                        .await
                        .map_err(|e| failure(&bucket, &Method::GET, &e.to_string(), None))?;
                    Ok(lock_enabled_in(&body))
                }
                // ObjectLockConfigurationNotFoundError: no Object Lock.
                StatusCode::NOT_FOUND => Ok(false),
                // Not allowed to ask: every object will be asked instead.
                StatusCode::FORBIDDEN => Ok(true),
                status => {
                    let body = response.text().await.unwrap_or_default();
                    Err(failure(&bucket, &Method::GET, &body, Some(status)))
                }
            }
        })
    }

    fn retention<'a>(
        &'a self,
        path: &'a Path,
    ) -> BoxFuture<'a, Result<Option<Retention>, StoreError>> {
        Box::pin(async move {
            let response = self
                .send(Method::HEAD, path, &SignedUrlOptions::default())
                .await?;
            match response.status() {
                StatusCode::OK => parse_retention(response.headers()).map_err(|reason| {
                    StoreError::Backend(object_store::Error::Generic {
                        store: "S3",
                        source: format!("HEAD {path}: unreadable Object Lock: {reason}").into(),
                    })
                }),
                StatusCode::NOT_FOUND => Ok(None),
                status => Err(failure(path, &Method::HEAD, "", Some(status))),
            }
        })
    }
}

/// A failed request as the store error `object_store` would have returned,
/// so that callers classify it the same way (refused, retryable, …).
fn failure(path: &Path, method: &Method, detail: &str, status: Option<StatusCode>) -> StoreError {
    let source = match status {
        Some(s) => format!("{method} for Object Lock: HTTP {s} {detail}"),
        None => format!("{method} for Object Lock: {detail}"),
    }
    .trim_end()
    .to_owned()
    .into();
    let path = path.to_string();
    StoreError::Backend(match status {
        Some(StatusCode::FORBIDDEN) => object_store::Error::PermissionDenied { path, source },
        Some(StatusCode::UNAUTHORIZED) => object_store::Error::Unauthenticated { path, source },
        _ => object_store::Error::Generic {
            store: "S3",
            source,
        },
    })
}

/// Whether a `GetObjectLockConfiguration` answer says `Enabled`.
fn lock_enabled_in(xml: &str) -> bool {
    const OPEN: &str = "<ObjectLockEnabled>";
    xml.split_once(OPEN)
        .and_then(|(_, rest)| rest.split_once("</ObjectLockEnabled>"))
        .is_some_and(|(value, _)| value.trim() == "Enabled")
}

/// The Object Lock a `HeadObject` answer reports; `None` without one.
///
/// # Errors
/// A header that is not what S3 documents: a mode without a date (or the
/// reverse), an unknown mode or legal-hold status, a date that is not
/// RFC 3339.
fn parse_retention(headers: &HeaderMap) -> Result<Option<Retention>, String> {
    let text = |name: &str| -> Result<Option<&str>, String> {
        headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| format!("{name}: not text")))
            .transpose()
    };
    let mode = match text(MODE)? {
        None => None,
        Some("GOVERNANCE") => Some(RetentionMode::Governance),
        Some("COMPLIANCE") => Some(RetentionMode::Compliance),
        Some(other) => return Err(format!("{MODE}: unknown mode {other:?}")),
    };
    let until = text(RETAIN_UNTIL)?
        .map(|s| {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| format!("{RETAIN_UNTIL}: {s:?} is not an RFC 3339 date: {e}"))
        })
        .transpose()?;
    let period = match (mode, until) {
        (Some(mode), Some(until)) => Some((mode, until)),
        (None, None) => None,
        _ => return Err(format!("{MODE} and {RETAIN_UNTIL} come together, got one")),
    };
    let legal_hold = match text(LEGAL_HOLD)? {
        None | Some("OFF") => false,
        Some("ON") => true,
        Some(other) => return Err(format!("{LEGAL_HOLD}: unknown status {other:?}")),
    };
    Ok((period.is_some() || legal_hold).then_some(Retention { period, legal_hold }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn reads_the_lock_headers_s3_and_moto_send() {
        assert_eq!(parse_retention(&headers(&[])), Ok(None));
        assert_eq!(parse_retention(&headers(&[(LEGAL_HOLD, "OFF")])), Ok(None));
        // S3 writes milliseconds, moto whole or micro seconds.
        for (date, ms) in [
            ("2026-11-27T03:16:31.000Z", 1_795_749_391_000),
            ("2026-11-27T03:16:31Z", 1_795_749_391_000),
            ("2026-11-27T03:16:31.938154Z", 1_795_749_391_938),
        ] {
            let r = parse_retention(&headers(&[(MODE, "COMPLIANCE"), (RETAIN_UNTIL, date)]))
                .unwrap()
                .unwrap();
            let (mode, until) = r.period.unwrap();
            assert_eq!(
                (mode, until.timestamp_millis()),
                (RetentionMode::Compliance, ms)
            );
            assert!(!r.legal_hold);
            assert!(r.holds_at(ms - 1) && !r.holds_at(ms), "{date}");
        }
        let r = parse_retention(&headers(&[
            (MODE, "GOVERNANCE"),
            (RETAIN_UNTIL, "2026-11-27T03:16:31.000Z"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(r.retain_until_rfc3339().unwrap(), "2026-11-27T03:16:31Z");
        assert_eq!(
            r.to_string(),
            "GOVERNANCE retention until 2026-11-27T03:16:31Z"
        );

        let hold = parse_retention(&headers(&[(LEGAL_HOLD, "ON")]))
            .unwrap()
            .unwrap();
        assert_eq!(hold.period, None);
        assert!(hold.holds_at(i64::MAX));
        assert!(hold.to_string().contains("legal hold"), "{hold}");
    }

    #[test]
    fn rejects_lock_headers_it_cannot_trust() {
        for (pairs, needle) in [
            (vec![(MODE, "GOVERNANCE")], "come together"),
            (
                vec![(RETAIN_UNTIL, "2026-11-27T03:16:31Z")],
                "come together",
            ),
            (
                vec![(MODE, "governance"), (RETAIN_UNTIL, "2026-11-27T03:16:31Z")],
                "unknown mode",
            ),
            (
                vec![(MODE, "COMPLIANCE"), (RETAIN_UNTIL, "27 Nov 2026")],
                "not an RFC 3339 date",
            ),
            (vec![(LEGAL_HOLD, "YES")], "unknown status"),
        ] {
            let err = parse_retention(&headers(&pairs)).unwrap_err();
            assert!(err.contains(needle), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn reads_whether_the_bucket_has_object_lock() {
        let enabled = r#"<?xml version="1.0" encoding="UTF-8"?>
<ObjectLockConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention><Mode>GOVERNANCE</Mode><Days>1</Days></DefaultRetention></Rule></ObjectLockConfiguration>"#;
        assert!(lock_enabled_in(enabled));
        assert!(!lock_enabled_in(
            "<ObjectLockConfiguration><ObjectLockEnabled>Disabled</ObjectLockEnabled></ObjectLockConfiguration>"
        ));
        assert!(!lock_enabled_in("<ObjectLockConfiguration/>"));
    }

    #[test]
    fn s3_archives_upload_with_checksums_unless_told_otherwise() {
        let url = url::Url::parse("s3://bucket/some/prefix").unwrap();
        let bucket = open_s3(&url, [("AWS_REGION".into(), "us-east-1".into())]).unwrap();
        assert_eq!(bucket.prefix.as_ref(), "some/prefix");
        let checksum = |b: &S3Bucket| format!("{:?}", b.store);
        assert!(
            checksum(&bucket).contains("checksum: Some(SHA256)"),
            "{}",
            checksum(&bucket)
        );
        let crc = open_s3(
            &url,
            [("AWS_CHECKSUM_ALGORITHM".into(), "crc64nvme".into())],
        )
        .unwrap();
        assert!(
            checksum(&crc).contains("checksum: Some(CRC64NVME)"),
            "{}",
            checksum(&crc)
        );
        let err = open_s3(&url, [("AWS_CHECKSUM_ALGORITHM".into(), "md5".into())])
            .map(|_| ())
            .unwrap_err();
        assert!(err.contains("md5"), "{err}");
    }
}
