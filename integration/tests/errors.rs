//! How the binaries report the common mistakes (docs/exit-codes.md): one
//! `error:` line with each cause once, then a `hint:` line, and exit 2 for
//! a store setting to fix: an `http://` endpoint without `AWS_ALLOW_HTTP`,
//! a missing bucket, a wrong secret key, credentials without permissions
//! (moto S3, with authentication on for the last two). An etcd endpoint
//! where nothing listens fails `snapshot` and `check` with a hint, and the
//! daemon's retry lines carry it.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use integration::{binary, free_port, run_archiver, run_restorer, S3Server};

/// The `error:` line and the `hint:` line after it in a binary's stderr
/// (log lines may come before). Fails unless there is exactly one error
/// line, it says no cause twice, and a hint follows it.
fn error_and_hint(stderr: &str) -> anyhow::Result<(String, String)> {
    let lines: Vec<&str> = stderr.lines().collect();
    let errors: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("error: "))
        .collect();
    ensure!(errors.len() == 1, "one error line expected:\n{stderr}");
    let error = lines[errors[0]];
    let hint = lines
        .get(errors[0] + 1)
        .filter(|l| l.starts_with("hint: "))
        .with_context(|| format!("no hint after the error:\n{stderr}"))?;
    ensure!(
        errors[0] + 2 == lines.len(),
        "output after the hint:\n{stderr}"
    );
    said_once(error)?;
    Ok((error.to_owned(), (*hint).to_owned()))
}

/// Fails when `error` says one of its causes twice: no ": "-separated part
/// of it (longer than a word) appears again, and no request line repeats.
fn said_once(error: &str) -> anyhow::Result<()> {
    ensure!(
        error.matches("Error performing ").count() <= 2 && error.matches(" - ").count() <= 1,
        "a request repeated: {error}"
    );
    let parts: Vec<&str> = error.split(": ").filter(|p| p.len() > 12).collect();
    for (i, p) in parts.iter().enumerate() {
        ensure!(
            !parts[i + 1..].contains(p),
            "{p:?} appears twice in: {error}"
        );
    }
    Ok(())
}

/// Runs `etcd-restorer list` and `etcd-archiver snapshot` (with an etcd
/// endpoint where nothing listens: the archive is opened first) on
/// `archive` with `env`; both must exit 2 with a hint containing
/// `hint_says` and an error containing `error_says`.
fn both_refuse(
    archive: &str,
    env: &[(String, String)],
    error_says: &str,
    hint_says: &str,
) -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let etcd = format!("http://127.0.0.1:{}", free_port());
    let data_dir = data.path().display().to_string();
    let runs = [
        (
            "etcd-restorer list",
            run_restorer(&["list", "--archive", archive], env)?,
        ),
        (
            "etcd-archiver snapshot",
            run_archiver(
                &[
                    "snapshot",
                    "--endpoints",
                    &etcd,
                    "--archive",
                    archive,
                    "--data-dir",
                    &data_dir,
                ],
                env,
            )?,
        ),
    ];
    for (what, (code, _, stderr)) in runs {
        ensure!(code == 2, "{what}: exit {code}, expected 2:\n{stderr}");
        let (error, hint) = error_and_hint(&stderr).with_context(|| what.to_owned())?;
        ensure!(error.contains(error_says), "{what}: {error}");
        ensure!(hint.contains(hint_says), "{what}: {hint}");
    }
    Ok(())
}

/// The settings of `S3Server::env` without `AWS_ALLOW_HTTP`.
fn env_without_allow_http(port: u16) -> Vec<(String, String)> {
    S3Server::env(port)
        .into_iter()
        .filter(|(k, _)| k != "AWS_ALLOW_HTTP")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_settings_to_fix_exit_2_with_a_hint() -> anyhow::Result<()> {
    let s3 = S3Server::start("pitr").await?;
    // An http:// endpoint without AWS_ALLOW_HTTP: refused before sending.
    both_refuse(
        "s3://pitr/etcd",
        &env_without_allow_http(s3.port),
        "URL scheme is not allowed",
        "AWS_ALLOW_HTTP=true",
    )?;
    // A bucket that does not exist.
    both_refuse(
        "s3://no-such-bucket/etcd",
        &S3Server::env(s3.port),
        "NoSuchBucket: The specified bucket does not exist",
        "the bucket does not exist",
    )?;
    // The same server with the setting right: the restorer says the
    // archive is empty, and nothing hints.
    let (code, _, stderr) = run_restorer(
        &["list", "--archive", "s3://pitr/etcd"],
        &S3Server::env(s3.port),
    )?;
    ensure!(code == 2, "list of an empty prefix: exit {code}:\n{stderr}");
    ensure!(!stderr.contains("hint:"), "{stderr}");
    Ok(())
}

/// moto with authentication on: only the first `free` requests go without
/// valid credentials. Killed on drop.
struct AuthS3 {
    child: Child,
    port: u16,
}

impl AuthS3 {
    /// Starts moto with authentication after 3 free requests, which create
    /// `bucket`, a user and an access key. Returns the server and the key
    /// (id, secret). The user has no policy: its requests are denied.
    async fn start(bucket: &str) -> anyhow::Result<(Self, String, String)> {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start moto_server (pip install 'moto[server]')")?;
        let server = Self { child, port };
        // Wait with bare connections: an HTTP request would use up one of
        // the free requests.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let out = Command::new("python3")
            .args([
                "-c",
                CREATE_BUCKET_AND_KEY,
                &format!("http://127.0.0.1:{port}"),
                bucket,
            ])
            .output()
            .context("run python3 with boto3")?;
        ensure!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout)?;
        let Some((id, secret)) = text.trim().split_once(' ') else {
            bail!("boto3 printed {text:?}");
        };
        Ok((server, id.to_owned(), secret.to_owned()))
    }

    /// The environment for the key (`id`, `secret`).
    fn env(&self, id: &str, secret: &str) -> Vec<(String, String)> {
        let mut env = S3Server::env(self.port);
        for (k, v) in &mut env {
            match k.as_str() {
                "AWS_ACCESS_KEY_ID" => id.clone_into(v),
                "AWS_SECRET_ACCESS_KEY" => secret.clone_into(v),
                _ => {}
            }
        }
        env
    }
}

impl Drop for AuthS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three requests: create the bucket, a user, and an access key for it
/// (printed as `ID SECRET`). Arguments: endpoint, bucket.
const CREATE_BUCKET_AND_KEY: &str = r#"
import sys, boto3
kw = dict(endpoint_url=sys.argv[1], aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1")
boto3.client("s3", **kw).create_bucket(Bucket=sys.argv[2])
iam = boto3.client("iam", **kw)
iam.create_user(UserName="archiver")
key = iam.create_access_key(UserName="archiver")["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credentials_exit_2_with_a_hint() -> anyhow::Result<()> {
    let (s3, id, secret) = AuthS3::start("pitr").await?;
    // A wrong secret for a key that exists: the signature does not match.
    both_refuse(
        "s3://pitr/etcd",
        &s3.env(&id, "not-the-secret"),
        "SignatureDoesNotMatch",
        "AWS_SECRET_ACCESS_KEY",
    )?;
    // A key id the store does not know.
    both_refuse(
        "s3://pitr/etcd",
        &s3.env("AKIAUNKNOWNKEY000000", &secret),
        "InvalidAccessKeyId",
        "AWS_ACCESS_KEY_ID",
    )?;
    // The right key, without a policy: denied.
    both_refuse(
        "s3://pitr/etcd",
        &s3.env(&id, &secret),
        "AccessDenied",
        "not allowed",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_where_nothing_listens_hints_at_the_endpoints() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let etcd = format!("http://127.0.0.1:{}", free_port());
    let archive = format!("file://{}", dir.path().join("archive").display());
    let data_dir = dir.path().join("data").display().to_string();
    let common = [
        "--endpoints",
        &etcd,
        "--archive",
        &archive,
        "--data-dir",
        &data_dir,
    ];
    for command in ["snapshot", "check"] {
        let mut args = vec![command];
        args.extend(common);
        let (code, _, stderr) = run_archiver(&args, &[])?;
        ensure!(code == 1, "{command}: exit {code}:\n{stderr}");
        let (error, hint) = error_and_hint(&stderr).with_context(|| command.to_owned())?;
        ensure!(error.contains("Connection refused"), "{command}: {error}");
        ensure!(hint.contains("check --endpoints"), "{command}: {hint}");
    }
    // The daemon retries; its retry line carries the hint.
    let mut run = Command::new(binary("etcd-archiver"))
        .arg("run")
        .args(common)
        .env("ETCD_ARCHIVER_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn etcd-archiver run")?;
    let stderr = run.stderr.take().context("stderr")?;
    let found = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stderr).lines() {
            let line = line.ok()?;
            let json: serde_json::Value = serde_json::from_str(&line).ok()?;
            let fields = &json["fields"];
            if json["level"] == "WARN" && fields["message"].as_str()?.ends_with("retrying") {
                return Some(fields.clone());
            }
        }
        None
    });
    let fields = tokio::time::timeout(Duration::from_secs(30), found).await;
    let _ = run.kill();
    let _ = run.wait();
    let fields = fields
        .context("no retry line within 30 s")??
        .context("etcd-archiver run ended without a retry line")?;
    let hint = fields["hint"].as_str().unwrap_or_default();
    ensure!(hint.contains("check --endpoints"), "{fields}");
    said_once(fields["error"].as_str().unwrap_or_default())?;
    Ok(())
}
