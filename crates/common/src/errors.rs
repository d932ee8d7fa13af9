//! How both binaries report an error: one line with each cause once, and a
//! hint for the common mistakes.
//!
//! anyhow's `{:#}` joins an error's causes with `": "`. `object_store`,
//! reqwest and hyper put the text of their source into their own, so one
//! store failure read as the same cause four or five times, with the
//! service's XML answer (and its newlines) in each. [`one_line`] keeps a
//! cause only when the cause before it does not already say it, puts every
//! cause on the line, and shortens an S3/Azure XML error document to its
//! code and message.
//!
//! [`hint`] recognizes the mistakes an operator makes most, by type where
//! a type exists: a store setting to fix ([`StoreMistake`]: plain HTTP not
//! allowed, a missing bucket, rejected credentials, a missing permission)
//! and an etcd endpoint where nothing listens. The binaries print it on a
//! second line, `hint: …`, after `error: …`; a log line carries it in a
//! `hint` field.

use std::error::Error;

use crate::store::{self, StoreMistake};

/// A common mistake that an error reveals, with what to do about it (its
/// `Display`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hint {
    /// A store setting the operator must fix (both binaries exit 2).
    Store(StoreMistake),
    /// Nothing accepts connections at an etcd endpoint (refused, or no
    /// route to the host).
    EtcdUnreachable,
}

impl Hint {
    /// Whether the mistake is a setting to fix, so that the binaries exit
    /// with their usage code (2).
    pub fn is_usage(self) -> bool {
        matches!(self, Self::Store(_))
    }
}

impl std::fmt::Display for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Store(m) => m.fmt(f),
            Self::EtcdUnreachable => f.write_str(
                "nothing accepts connections at the etcd endpoint: is etcd running there? \
                 check --endpoints (host, port, and http:// or https://)",
            ),
        }
    }
}

/// `error` as one line: its causes outermost first, joined by `": "`,
/// each left out when the cause before it already contains its text;
/// line breaks inside a cause become spaces, and an XML error document of
/// the store reads `Code: Message`.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let text = tidy(&cause.to_string());
        if text.is_empty() || previous.contains(&text) {
            previous = text;
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
        previous = text;
    }
    line
}

/// One cause's text on one line, its XML error documents shortened.
fn tidy(text: &str) -> String {
    let mut text = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let mut from = 0;
    while let Some((span, code, message)) = store::service_error(&text[from..]) {
        let short = if message.is_empty() {
            code.to_owned()
        } else {
            format!("{code}: {message}")
        };
        let span = from + span.start..from + span.end;
        from = span.start + short.len();
        text.replace_range(span, &short);
    }
    text
}

/// Whether `error` holds a store setting the operator must fix (a bad
/// archive URL, an unusable credentials file, or a [`StoreMistake`] in the
/// store's answer): not worth retrying, and both binaries exit 2.
pub fn is_store_setting(error: &anyhow::Error) -> bool {
    hint(error).is_some_and(Hint::is_usage)
        || error.chain().any(|c| {
            c.downcast_ref::<store::StoreError>()
                .is_some_and(store::StoreError::is_usage)
        })
}

/// The common mistake `error` reveals, if any (see [`Hint`]).
pub fn hint(error: &anyhow::Error) -> Option<Hint> {
    error.chain().find_map(|cause| {
        if let Some(e) = cause.downcast_ref::<object_store::Error>() {
            return store::mistake(e).map(Hint::Store);
        }
        etcd_unreachable(cause).then_some(Hint::EtcdUnreachable)
    })
}

/// Whether `cause` is an etcd client error whose transport could not
/// connect: refused, or no route to the host. The client's error has no
/// source; its gRPC status or transport error has.
fn etcd_unreachable(cause: &(dyn Error + 'static)) -> bool {
    let inner: &(dyn Error + 'static) = match cause.downcast_ref::<etcd_client::Error>() {
        Some(etcd_client::Error::GRpcStatus(s)) => s,
        Some(etcd_client::Error::TransportError(t)) => t,
        Some(etcd_client::Error::IoError(e)) => e,
        _ => return false,
    };
    store::error_chain(inner).any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStore;

    /// An error that repeats its source's text in its own, as
    /// `object_store`'s errors do.
    #[derive(Debug)]
    struct Repeats(String, Option<Box<Repeats>>);

    impl std::fmt::Display for Repeats {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)?;
            match &self.1 {
                Some(s) => write!(f, ": {s}"),
                None => Ok(()),
            }
        }
    }

    impl Error for Repeats {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|s| s as _)
        }
    }

    #[test]
    fn each_cause_once_on_one_line() {
        let inner = Repeats(
            "outer".into(),
            Some(Box::new(Repeats(
                "middle\n  line two".into(),
                Some(Box::new(Repeats("root cause".into(), None))),
            ))),
        );
        let e = anyhow::Error::new(inner).context("do the thing");
        assert_eq!(
            one_line(&e),
            "do the thing: outer: middle line two: root cause"
        );
        // Causes that do not repeat each other all stay, in order.
        let e = anyhow::anyhow!("root").context("middle").context("outer");
        assert_eq!(one_line(&e), "outer: middle: root");
    }

    #[test]
    fn xml_error_documents_shrink_to_code_and_message() {
        let body = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Error><Code>NoSuchBucket</Code>\
                    <Message>The specified bucket does not exist</Message><BucketName>b</BucketName>\
                    <RequestId>R</RequestId></Error>";
        let e = anyhow::anyhow!("404 Not Found: {body}").context("list");
        assert_eq!(
            one_line(&e),
            "list: 404 Not Found: NoSuchBucket: The specified bucket does not exist"
        );
        let e = anyhow::anyhow!(
            "a <Error><Code>X</Code></Error> b <Error><Code>Y</Code><Message>m</Message></Error>"
        );
        assert_eq!(one_line(&e), "a X b Y: m");
    }

    /// A real `object_store` failure: an S3 store at `endpoint` listing a
    /// bucket, its error wrapped as the binaries see it.
    async fn s3_list_error(endpoint: &str, allow_http: bool) -> anyhow::Error {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("bucket")
            .with_region("us-east-1")
            .with_endpoint(endpoint)
            .with_allow_http(allow_http)
            .with_access_key_id("key")
            .with_secret_access_key("secret")
            .with_retry(object_store::RetryConfig {
                max_retries: 1,
                retry_timeout: std::time::Duration::from_secs(1),
                ..Default::default()
            })
            .build()
            .unwrap();
        let err = futures::TryStreamExt::try_collect::<Vec<_>>(store.list(None))
            .await
            .unwrap_err();
        anyhow::Error::new(store::StoreError::Backend(err)).context("list archive s3://bucket")
    }

    /// A closed port on the loopback interface.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn nested_store_errors_read_once() {
        let e = s3_list_error(&format!("http://127.0.0.1:{}", closed_port()), true).await;
        let full = format!("{e:#}");
        let line = one_line(&e);
        assert!(!line.contains('\n'), "{line}");
        // anyhow's chain repeats the request line; ours says it once.
        assert!(full.matches("Error performing GET").count() > 1, "{full}");
        assert_eq!(line.matches("Error performing GET").count(), 1, "{line}");
        assert_eq!(line.matches("Connection refused").count(), 1, "{line}");
        assert!(
            line.starts_with("list archive s3://bucket: object store: "),
            "{line}"
        );
        // A store that cannot be reached is no mistake of the settings.
        assert_eq!(hint(&e), None);
    }

    #[tokio::test]
    async fn plain_http_without_allow_http_is_a_store_mistake() {
        // reqwest refuses before connecting: no server is needed.
        let e = s3_list_error(&format!("http://127.0.0.1:{}", closed_port()), false).await;
        assert_eq!(hint(&e), Some(Hint::Store(StoreMistake::PlainHttp)));
        assert!(hint(&e).unwrap().is_usage());
        assert!(hint(&e)
            .unwrap()
            .to_string()
            .contains("AWS_ALLOW_HTTP=true"));
        let line = one_line(&e);
        assert_eq!(
            line.matches("URL scheme is not allowed").count(),
            1,
            "{line}"
        );
    }

    #[test]
    fn service_codes_and_statuses_name_the_mistake() {
        let generic = |body: &str| object_store::Error::Generic {
            store: "S3",
            source: format!("Server returned non-2xx status code: 403 Forbidden: {body}").into(),
        };
        let xml = |code: &str| {
            format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>m</Message></Error>")
        };
        for (code, mistake) in [
            ("NoSuchBucket", StoreMistake::NoSuchBucket),
            ("InvalidAccessKeyId", StoreMistake::BadCredentials),
            ("SignatureDoesNotMatch", StoreMistake::BadCredentials),
            ("AccessDenied", StoreMistake::AccessDenied),
        ] {
            let e = anyhow::Error::new(store::StoreError::Backend(generic(&xml(code))));
            assert_eq!(hint(&e), Some(Hint::Store(mistake)), "{code}");
        }
        // A signature mismatch answered with 403 is a credential problem,
        // not a missing permission.
        let e = object_store::Error::PermissionDenied {
            path: "p".into(),
            source: xml("SignatureDoesNotMatch").into(),
        };
        assert_eq!(store::mistake(&e), Some(StoreMistake::BadCredentials));
        let e = object_store::Error::Unauthenticated {
            path: "p".into(),
            source: "no body".into(),
        };
        assert_eq!(store::mistake(&e), Some(StoreMistake::BadCredentials));
        // A missing object, or another service error, is no mistake.
        let e = object_store::Error::NotFound {
            path: "p".into(),
            source: xml("NoSuchKey").into(),
        };
        assert_eq!(store::mistake(&e), None);
        assert_eq!(store::mistake(&generic(&xml("SlowDown"))), None);
        let usage = store::StoreError::Backend(generic(&xml("NoSuchBucket")));
        assert!(usage.is_usage() && !usage.is_retryable());
        assert!(store::StoreError::Backend(generic("reset")).is_retryable());
    }

    #[tokio::test]
    async fn a_closed_etcd_port_is_unreachable() {
        let endpoint = format!("http://127.0.0.1:{}", closed_port());
        // The client connects lazily; the first request meets the port.
        let err = match etcd_client::Client::connect([endpoint.as_str()], None).await {
            Ok(mut client) => client.get("k", None).await.unwrap_err(),
            Err(e) => e,
        };
        let e = anyhow::Error::new(err).context("read cluster revision");
        assert_eq!(hint(&e), Some(Hint::EtcdUnreachable), "{e:#}");
        assert!(!hint(&e).unwrap().is_usage());
        let other = anyhow::Error::new(etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
            "etcdserver: no leader",
        )));
        assert_eq!(hint(&other), None);
    }
}
