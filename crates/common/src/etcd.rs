//! Connecting to etcd, as both binaries do: endpoints, TLS material and
//! credentials checked once, and the error classes their retries act on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// Largest gRPC message accepted from etcd. Fragmented watch responses stay
/// near etcd's request limit, but a single event (or a snapshot of a key
/// with a huge value) may exceed tonic's 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 512 << 20;

/// TLS material for etcd, loaded and checked.
#[derive(Clone)]
pub struct TlsFiles {
    /// CA certificate PEM.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A secret that never prints.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("******")
    }
}

/// The connection flags as given (flag, environment or file), unchecked.
#[derive(Clone, Debug, Default)]
pub struct ConnectionFlags {
    /// `--endpoints`.
    pub endpoints: Vec<String>,
    /// `--cacert`.
    pub cacert: Option<PathBuf>,
    /// `--cert`.
    pub cert: Option<PathBuf>,
    /// `--key`.
    pub key: Option<PathBuf>,
    /// `--user`.
    pub user: Option<String>,
    /// `--password-file`.
    pub password_file: Option<PathBuf>,
}

/// How to reach an etcd cluster: checked endpoints, TLS material, credentials.
#[derive(Clone)]
pub struct Connection {
    /// Endpoints (`http://` or `https://` URLs).
    pub endpoints: Vec<String>,
    /// TLS material, if any.
    pub tls: Option<TlsFiles>,
    /// User and password, if any.
    pub auth: Option<(String, Secret)>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.auth.as_ref().map(|a| (&a.0, &a.1)))
            .finish()
    }
}

impl Connection {
    /// Checks the flags and loads the files they name. The password comes
    /// from `--password-file`, else from the environment variable
    /// `password_env`.
    ///
    /// # Errors
    /// A message naming the offending flag.
    pub fn resolve(flags: ConnectionFlags, password_env: &str) -> anyhow::Result<Self> {
        let ConnectionFlags {
            endpoints,
            cacert,
            cert,
            key,
            user,
            password_file,
        } = flags;
        if endpoints.is_empty() {
            bail!("--endpoints: at least one endpoint is required");
        }
        for e in &endpoints {
            let url = url::Url::parse(e).with_context(|| {
                format!("--endpoints: {e:?} is not a URL like http://127.0.0.1:2379")
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                bail!("--endpoints: {e:?} must be http://host:port or https://host:port");
            }
        }
        let tls = if cacert.is_some() || cert.is_some() || key.is_some() {
            let ca_pem = match &cacert {
                Some(p) => Some(read_pem("cacert", p)?),
                None => None,
            };
            let identity = match (&cert, &key) {
                (Some(c), Some(k)) => Some((read_pem("cert", c)?, read_pem("key", k)?)),
                (None, None) => None,
                _ => bail!("--cert and --key: give both or neither"),
            };
            Some(TlsFiles { ca_pem, identity })
        } else {
            None
        };
        if tls.is_some() && endpoints.iter().any(|e| e.starts_with("http://")) {
            bail!("--endpoints: TLS options were given, so endpoints must use https://");
        }
        let auth = match user {
            Some(u) => {
                let password = match (&password_file, std::env::var(password_env)) {
                    (Some(p), _) => String::from_utf8(read_file("password-file", p)?)
                        .context("--password-file: not UTF-8")?
                        .trim_end_matches(['\n', '\r'])
                        .to_owned(),
                    (None, Ok(p)) => p,
                    (None, Err(_)) => {
                        bail!("--user: a password is required in {password_env} or --password-file")
                    }
                };
                Some((u, Secret(password)))
            }
            None => None,
        };
        Ok(Self {
            endpoints,
            tls,
            auth,
        })
    }

    /// Connects with the endpoints, TLS and credentials.
    ///
    /// # Errors
    /// Connection or authentication failures.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca_pem {
                t = t.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        if let Some((user, password)) = &self.auth {
            // etcd expires auth tokens (simple tokens after `--auth-token-ttl`
            // idle seconds, JWTs at their expiry). The client re-authenticates
            // and retries once on `Unauthenticated`; the snapshot RPC reports
            // an expired token differently, see `with_fresh_token`.
            opts = opts
                .with_user(user.clone(), password.0.clone())
                .with_auto_token_refresh(true);
        }
        Client::connect(&self.endpoints, Some(opts))
            .await
            .with_context(|| format!("connect to etcd at {}", self.endpoints.join(",")))
    }
}

fn read_file(field: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("--{field}: cannot read {}", path.display()))
}

fn read_pem(field: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = read_file(field, path)?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        bail!("--{field}: {} is not a PEM file", path.display());
    }
    Ok(bytes)
}

/// Whether an etcd error is final (bad credentials or permissions), as
/// opposed to a member or network failure worth retrying.
pub fn is_denied(error: &anyhow::Error) -> bool {
    error.chain().any(|c| {
        matches!(
            c.downcast_ref::<etcd_client::Error>(),
            Some(etcd_client::Error::GRpcStatus(s)) if matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) || s.message().contains("authentication failed")
        )
    })
}

/// Whether an etcd error says the auth token is invalid or expired. Most
/// RPCs answer `Unauthenticated`; etcd 3.5's Maintenance.Snapshot answers
/// `Unknown` with "auth: invalid auth token", which the client's own refresh
/// does not recognize.
pub fn is_invalid_token(error: &etcd_client::Error) -> bool {
    matches!(
        error,
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unauthenticated
            || s.message().contains("invalid auth token")
    )
}

/// Runs `call`, and once more after re-authenticating if etcd says the
/// token expired (a no-op refresh without credentials).
///
/// # Errors
/// The call's error, or the re-authentication's.
pub async fn with_fresh_token<T, F, Fut>(client: &Client, mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match call().await {
        Err(e) if is_invalid_token(&e) => {
            tracing::debug!("etcd auth token expired; re-authenticating");
            client
                .refresh_token()
                .await
                .context("re-authenticate with etcd")?;
            Ok(call().await?)
        }
        other => Ok(other?),
    }
}
