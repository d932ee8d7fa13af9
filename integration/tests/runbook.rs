//! The restore runbook (docs/restore-runbook.md) against real etcd 3.5: a
//! restore prints the exact `etcdutl snapshot restore` commands, the test
//! runs the three-member ones as printed (placeholders filled in) from one
//! output file, starts the three members, and checks that they form one
//! cluster holding exactly the source's state at the restored revision.
//! Also: `--time now` on a current archive and on a stale one, and `list`
//! saying how current the archive is.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use integration::{
    archiver_args, current_revision, free_port, mixed_workload, range_at, run_restorer,
    wait_archived, ArchiverProcess, EtcdVersion, Rng, TestBed,
};

/// Segments sealed every second, an idle source's progress every 500 ms.
const ARCHIVER_FLAGS: &[&str] = &[
    "--no-election",
    "--segment-max-age",
    "1s",
    "--idle-interval",
    "500ms",
];

/// An etcd member started from a restored data directory, killed on drop.
struct Member {
    child: Child,
    client_url: String,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The three-member commands from the restorer's stdout: the lines under
/// "three members" that run the release's restore tool.
fn three_member_commands(stdout: &str) -> Vec<String> {
    stdout
        .split("\nthree members")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("  etcdutl snapshot restore "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// Runs one printed command with its placeholders filled in.
fn run_printed(command: &str, fill: &[(&str, String)]) -> anyhow::Result<()> {
    let mut line = command.to_owned();
    for (placeholder, value) in fill {
        line = line.replace(placeholder, value);
    }
    ensure!(!line.contains('<'), "a placeholder is left in {line}");
    let words: Vec<&str> = line.split_whitespace().collect();
    ensure!(words[0] == "etcdutl", "{line}");
    let out = Command::new(EtcdVersion::V35.bin_dir().join("etcdutl"))
        .args(&words[1..])
        .output()?;
    if !out.status.success() {
        bail!("{line}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Starts a member on a restored data directory with only its own flags:
/// the membership comes from the data directory.
fn start_member(dir: &Path, name: &str, peer_url: &str) -> anyhow::Result<Member> {
    let client_url = format!("http://127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(EtcdVersion::V35.bin_dir().join("etcd"))
        .args(["--name", name, "--data-dir"])
        .arg(dir.join(name))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", peer_url])
        .args(["--initial-advertise-peer-urls", peer_url])
        .env("ETCD_UNSUPPORTED_ARCH", "")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start etcd")?;
    Ok(Member { child, client_url })
}

async fn connect(url: &str) -> anyhow::Result<etcd_client::Client> {
    let opts = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(5));
    Ok(etcd_client::Client::connect([url], Some(opts)).await?)
}

/// Waits until all three members serve reads and the cluster has a leader.
async fn wait_cluster(members: &[Member]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_mins(1);
    'again: loop {
        ensure!(
            Instant::now() < deadline,
            "the restored members did not form a cluster"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        for m in members {
            let Ok(mut c) = connect(&m.client_url).await else {
                continue 'again;
            };
            if c.get("x", None).await.is_err() {
                continue 'again;
            }
        }
        return Ok(());
    }
}

fn restore_args<'a>(url: &'a str, output: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["restore", "--archive", url, "--output", output];
    args.extend_from_slice(extra);
    args
}

#[tokio::test(flavor = "multi_thread")]
async fn three_members_restored_from_the_printed_commands() -> anyhow::Result<()> {
    let mut bed = TestBed::start(EtcdVersion::V35, 1).await?;
    let dir = bed.tmp.path().to_owned();
    let data = dir.join("archiver-data");
    let args = archiver_args(&bed.cluster.endpoints(), &bed.url, &data, ARCHIVER_FLAGS);
    let mut archiver = ArchiverProcess::start(&args, &[], &bed.log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    let mut rng = Rng::new(31);
    mixed_workload(&mut bed.client, &mut rng, 200).await?;
    let target = current_revision(&mut bed.client).await?;
    let source_hash = bed
        .client
        .maintenance_client()
        .hash_kv(target)
        .await?
        .hash();
    let source_keys = range_at(&bed.client, target).await?;
    mixed_workload(&mut bed.client, &mut rng, 100).await?;
    // Short leases of the workload expire on their own: let them.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let last = current_revision(&mut bed.client).await?;
    wait_archived(&bed.url, 1, last, Duration::from_secs(30)).await?;

    // The restore prints the commands; run the three-member ones as printed.
    let output = dir.join("restored.db");
    let output_text = output.display().to_string();
    let target_text = target.to_string();
    let (code, stdout, stderr) = run_restorer(
        &restore_args(&bed.url, &output_text, &["--revision", &target_text]),
        &[],
    )?;
    ensure!(code == 0, "restore exited {code}: {stdout}{stderr}");
    eprintln!("restore printed:\n{stdout}");
    assert!(
        stdout.contains("next steps for etcd 3.5 (the file's meta bucket holds the raft term"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "\n  etcdutl snapshot restore {output_text} --name <member-name> "
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("--bump-revision 1000000000 --mark-compacted")
            && stdout.contains("must not go backwards"),
        "{stdout}"
    );
    let commands = three_member_commands(&stdout);
    ensure!(commands.len() == 3, "three commands expected:\n{stdout}");
    let peers: Vec<String> = (0..3)
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let mut fill: Vec<(String, String)> =
        vec![("<new-cluster-token>".into(), "restored-runbook-test".into())];
    for (i, peer) in peers.iter().enumerate() {
        fill.push((format!("<member-{}>", i + 1), format!("r{}", i + 1)));
        fill.push((format!("<peer-url-{}>", i + 1), peer.clone()));
    }
    for (i, command) in commands.iter().enumerate() {
        assert!(command.contains(&output_text), "{command}");
        let mut fill: Vec<(&str, String)> =
            fill.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        fill.push((
            "<new-data-dir>",
            dir.join(format!("r{}", i + 1)).display().to_string(),
        ));
        run_printed(command, &fill)?;
    }
    let members = (0..3)
        .map(|i| start_member(&dir, &format!("r{}", i + 1), &peers[i]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_cluster(&members).await?;

    // One cluster of three, at the restored revision, equal to the source.
    let mut first = connect(&members[0].client_url).await?;
    let list = first.member_list().await?;
    let mut names: Vec<&str> = list
        .members()
        .iter()
        .map(etcd_client::Member::name)
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["r1", "r2", "r3"]);
    let restored_at = first
        .get("x", None)
        .await?
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    assert_eq!(restored_at, target, "the restored cluster's revision");
    let restored_hash = first.maintenance_client().hash_kv(target).await?.hash();
    assert_eq!(restored_hash, source_hash, "HashKV at {target}");
    let restored_keys = range_at(&first, target).await?;
    assert_eq!(restored_keys.len(), source_keys.len());
    for (r, s) in restored_keys.iter().zip(&source_keys) {
        assert_eq!(
            (
                r.key(),
                r.value(),
                r.create_revision(),
                r.mod_revision(),
                r.version(),
                r.lease()
            ),
            (
                s.key(),
                s.value(),
                s.create_revision(),
                s.mod_revision(),
                s.version(),
                s.lease()
            )
        );
    }
    // A write through one member is read from another.
    first.put("/runbook/written", "through r1", None).await?;
    let mut third = connect(&members[2].client_url).await?;
    let read = third.get("/runbook/written", None).await?;
    assert_eq!(
        read.kvs().first().map(etcd_client::KeyValue::value),
        Some(&b"through r1"[..])
    );
    drop(members);

    // `--time now` on a current archive takes the newest revision, saying why.
    let newest_file = dir.join("now.db").display().to_string();
    let (code, stdout, stderr) = run_restorer(
        &restore_args(&bed.url, &newest_file, &["--time", "now", "--dry-run"]),
        &[],
    )?;
    ensure!(
        code == 0,
        "restore --time now exited {code}: {stdout}{stderr}"
    );
    eprintln!("restore --time now printed:\n{stdout}");
    let chosen: i64 = stdout
        .split(" -> revision ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no chosen revision in {stdout}"))?;
    assert!(chosen >= last, "{stdout}");
    assert!(
        stdout.contains("the archive's newest revision")
            && stdout.contains("the archive is current (within --max-staleness 2m)"),
        "{stdout}"
    );
    let (code, listed, _) = run_restorer(&["list", "--archive", &bed.url], &[])?;
    assert_eq!(code, 0);
    eprintln!("list printed:\n{listed}");
    assert!(
        listed.contains("current (within --max-staleness 2m)"),
        "{listed}"
    );
    let (code, json, _) = run_restorer(&["list", "--archive", &bed.url, "--json"], &[])?;
    assert_eq!(code, 0);
    let view: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(view["current"]["current"], true, "{json}");
    assert!(
        view["current"]["newest_revision"].as_i64() >= Some(last),
        "{json}"
    );
    assert!(
        view["current"]["newest_revision_time"].is_string(),
        "{json}"
    );
    let generation = &view["generations"][0];
    let snapshot = &generation["base_snapshots"][0];
    assert!(
        snapshot["bytes"].as_u64() > Some(0) && snapshot["time"].is_string(),
        "{json}"
    );
    assert_eq!(
        generation["restorable"][0]["first_time"], snapshot["time"],
        "{json}"
    );

    // A zone-less time needs --utc.
    let (code, _, stderr) = run_restorer(
        &restore_args(
            &bed.url,
            &newest_file,
            &["--time", "2026-11-25T14:06:30", "--dry-run"],
        ),
        &[],
    )?;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--utc"), "{stderr}");

    // Once the archiver stops, the archive goes stale: "now" is refused.
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (code, stdout, stderr) = run_restorer(
        &restore_args(
            &bed.url,
            &newest_file,
            &["--time", "now", "--max-staleness", "1s", "--dry-run"],
        ),
        &[],
    )?;
    assert_eq!(code, 3, "{stdout}{stderr}");
    assert!(
        stderr.contains("is not current (older than --max-staleness 1s")
            && stderr.contains("restore --revision"),
        "{stderr}"
    );
    Ok(())
}
