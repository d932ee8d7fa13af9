//! End-to-end tests of `etcd-restorer history` and `diff` against real etcd
//! 3.5.1: `history` equals etcd's own watch of the key or prefix, `diff`
//! equals the difference of etcd's `Range` at both points.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, KeyValue};
use integration::{
    archiver_args, base64, current_revision, mixed_workload, range_at, read_archive, run_restorer,
    wait_archived, watch_key_history, ArchiverProcess, EtcdVersion, Rng, TestBed,
};
use serde_json::{json, Value};

fn rfc3339_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%3NZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs the restorer, which must exit 0; its stdout as JSON values.
fn json_lines(args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let (code, out, err) = run_restorer(args, &[])?;
    anyhow::ensure!(code == 0, "{args:?} exited {code}: {err}");
    out.lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect::<anyhow::Result<_>>()
}

/// What `history --json --values` prints for one of etcd's watch events,
/// without the archive's observation fields.
fn history_line(kind: EventType, kv: &KeyValue) -> Value {
    let put = kind == EventType::Put;
    let mut line = json!({
        "revision": kv.mod_revision(),
        "key": base64(kv.key()),
        "type": if put { "put" } else { "delete" },
        "create_revision": kv.create_revision(),
        "version": kv.version(),
        "lease": kv.lease(),
        "value_size": kv.value().len(),
    });
    if put {
        line["value"] = json!(base64(kv.value()));
    }
    line
}

/// `history` of `key` (or `prefix`) after `from` through `to` equals etcd's
/// watch of it; `from`/`to` `None` leave the flag out (`expect_from` and
/// `expect_to` are then the range ends the restorer must default to).
async fn check_history(
    client: &mut etcd_client::Client,
    url: &str,
    key: &str,
    prefix: bool,
    (from, expect_from): (Option<&str>, i64),
    (to, expect_to): (Option<&str>, i64),
) -> anyhow::Result<usize> {
    let mut args = vec!["history", "--archive", url, "--key", key, "--json"];
    if prefix {
        args.push("--prefix");
    }
    if let Some(from) = from {
        args.extend(["--from", from]);
    }
    if let Some(to) = to {
        args.extend(["--to", to]);
    }
    let without_values = json_lines(&args)?;
    args.push("--values");
    let mut got = json_lines(&args)?;
    // Without --values, the same lines without the values.
    let mut sizes_only = got.clone();
    for line in &mut sizes_only {
        line.as_object_mut().expect("object").remove("value");
    }
    anyhow::ensure!(
        sizes_only == without_values,
        "history of {key:?} without --values:\n{sizes_only:?}\n{without_values:?}"
    );
    for line in &mut got {
        let o = line.as_object_mut().expect("an object per line");
        let observed = o.remove("observed").expect("observed");
        assert!(
            observed.as_str().is_some_and(|t| t.ends_with('Z')),
            "{observed}"
        );
        assert!(o.remove("catching_up").is_some_and(|c| c.is_boolean()));
    }
    let expected: Vec<Value> = watch_key_history(client, key.as_bytes(), prefix, expect_to)
        .await?
        .iter()
        .filter(|(_, kv)| kv.mod_revision() > expect_from)
        .map(|(kind, kv)| history_line(*kind, kv))
        .collect();
    anyhow::ensure!(
        got == expected,
        "history of {key:?} (prefix {prefix}) after {expect_from} through {expect_to}:\ngot      {got:?}\nexpected {expected:?}"
    );
    Ok(got.len())
}

fn state(kv: &KeyValue) -> Value {
    json!({
        "create_revision": kv.create_revision(),
        "mod_revision": kv.mod_revision(),
        "version": kv.version(),
        "lease": kv.lease(),
        "value_size": kv.value().len(),
        "value": base64(kv.value()),
    })
}

/// What `diff --json --values` must print from `from` to `to`: the
/// difference of etcd's own reads at both revisions.
async fn oracle_diff(
    client: &etcd_client::Client,
    from: i64,
    to: i64,
    prefix: &str,
) -> anyhow::Result<Vec<Value>> {
    let read = |kvs: Vec<KeyValue>| -> BTreeMap<Vec<u8>, KeyValue> {
        kvs.into_iter()
            .filter(|kv| kv.key().starts_with(prefix.as_bytes()))
            .map(|kv| (kv.key().to_vec(), kv))
            .collect()
    };
    let before = read(range_at(client, from).await?);
    let after = read(range_at(client, to).await?);
    let mut keys: Vec<&Vec<u8>> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter_map(|k| {
            let (b, a) = (before.get(k), after.get(k));
            let change = match (b, a) {
                (None, Some(_)) => "added",
                (Some(_), None) => "deleted",
                (Some(b), Some(a)) if b.mod_revision() != a.mod_revision() => "changed",
                _ => return None,
            };
            Some(json!({
                "key": base64(k),
                "change": change,
                "before": b.map(state),
                "after": a.map(state),
            }))
        })
        .collect())
}

/// `diff` between `from` and `to` (revision numbers or times) equals the
/// difference of etcd's reads at `from_rev` and `to_rev`.
async fn check_diff(
    client: &etcd_client::Client,
    url: &str,
    (from, from_rev): (&str, i64),
    (to, to_rev): (&str, i64),
    prefix: Option<&str>,
) -> anyhow::Result<usize> {
    let mut args = vec![
        "diff",
        "--archive",
        url,
        "--from",
        from,
        "--to",
        to,
        "--json",
    ];
    if let Some(p) = prefix {
        args.extend(["--prefix", p]);
    }
    let without_values = json_lines(&args)?;
    args.push("--values");
    let got = json_lines(&args)?;
    // Without --values, the same lines without the values.
    let mut sizes_only = got.clone();
    for line in &mut sizes_only {
        for side in ["before", "after"] {
            if let Some(state) = line[side].as_object_mut() {
                state.remove("value");
            }
        }
    }
    anyhow::ensure!(
        sizes_only == without_values,
        "diff {from_rev}..{to_rev} without --values differs"
    );
    let expected = oracle_diff(client, from_rev, to_rev, prefix.unwrap_or_default()).await?;
    anyhow::ensure!(
        got == expected,
        "diff {from_rev}..{to_rev} (prefix {prefix:?}):\ngot      {got:?}\nexpected {expected:?}"
    );
    Ok(got.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_diff_match_etcd() -> anyhow::Result<()> {
    let TestBed {
        cluster,
        mut client,
        tmp,
        url,
        log,
    } = TestBed::start(EtcdVersion::V35, 1).await?;
    let args = archiver_args(
        &cluster.endpoints(),
        &url,
        &tmp.path().join("data"),
        &[
            "--segment-max-age",
            "200ms",
            "--segment-max-bytes",
            "128KiB",
            "--snapshot-interval",
            "2s",
        ],
    );
    let mut rng = Rng::new(7);
    // Keys written before the archiver starts live only in its base snapshot.
    mixed_workload(&mut client, &mut rng, 80).await?;
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    let mut moments = Vec::new();
    while moments.len() < 4 {
        mixed_workload(&mut client, &mut rng, 60).await?;
        let revision = current_revision(&mut client).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let time = rfc3339_now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Expiring leases write on their own: keep the moment only if no
        // revision happened around it.
        if current_revision(&mut client).await? == revision {
            moments.push((time, revision));
        }
        // Snapshots every 2 s: several base snapshots in the range.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    mixed_workload(&mut client, &mut rng, 60).await?;
    let last = current_revision(&mut client).await?;
    wait_archived(&url, 1, last, Duration::from_secs(30)).await?;
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());
    let generation = &read_archive(&url).await?[0];
    let snapshots = generation.snapshots.clone();
    assert!(snapshots.len() >= 3, "snapshots: {snapshots:?}");
    let (first, last) = (snapshots[0], generation.revisions.last().unwrap().revision);
    let mid = i64::midpoint(first, last);

    // history: exact keys and prefixes, over the whole restorable range
    // (the defaults) and between points.
    let mut changes = 0;
    for (key, prefix) in [
        ("/w/k3", false),
        ("/w/k17", false),
        ("/w/t4a", false),
        ("/w/range/", true),
        ("/lease/", true),
        ("/bin/", true),
        ("/big/", true),
        ("/w/", true),
        ("", true),
    ] {
        changes +=
            check_history(&mut client, &url, key, prefix, (None, first), (None, last)).await?;
    }
    let mid_text = mid.to_string();
    // From the second base snapshot to halfway after it (the snapshots'
    // revisions depend on the machine's pace: it may lie after `mid`).
    let after_snap = i64::midpoint(snapshots[1], last);
    let (snap_text, after_snap_text) = (snapshots[1].to_string(), after_snap.to_string());
    check_history(
        &mut client,
        &url,
        "/w/",
        true,
        (Some(&snap_text), snapshots[1]),
        (Some(&after_snap_text), after_snap),
    )
    .await?;
    let (time, at) = &moments[1];
    check_history(
        &mut client,
        &url,
        "",
        true,
        (Some(&moments[0].0), moments[0].1),
        (Some(time), *at),
    )
    .await?;
    assert!(changes > 200, "only {changes} changes checked");

    // Text output: one line per change, keys escaped.
    let (code, text, err) = run_restorer(
        &["history", "--archive", &url, "--key", "/bin/", "--prefix"],
        &[],
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(
        text.lines().count() > 0 && text.lines().all(|l| l.contains("/bin/\\x00\\xff")),
        "{text}"
    );

    // diff: from the first restorable revision (states only the base
    // snapshot holds), between snapshots, to and from moments.
    let (first_text, last_text) = (first.to_string(), last.to_string());
    let n = check_diff(
        &client,
        &url,
        (&first_text, first),
        (&last_text, last),
        None,
    )
    .await?;
    assert!(n > 50, "only {n} keys differ");
    check_diff(
        &client,
        &url,
        (&first_text, first),
        (&mid_text, mid),
        Some("/w/"),
    )
    .await?;
    let around = (
        (snapshots[1] - 1).to_string(),
        (snapshots[2] + 1).min(last).to_string(),
    );
    check_diff(
        &client,
        &url,
        (&around.0, snapshots[1] - 1),
        (&around.1, (snapshots[2] + 1).min(last)),
        None,
    )
    .await?;
    check_diff(
        &client,
        &url,
        (&first_text, first),
        (time, *at),
        Some("/lease/"),
    )
    .await?;
    check_diff(
        &client,
        &url,
        (&moments[0].0, moments[0].1),
        (&last_text, last),
        None,
    )
    .await?;
    check_diff(&client, &url, (&mid_text, mid), (&mid_text, mid), None).await?;

    // Refusals: exit 3 naming the restorable ranges, exit 2 for bad flags.
    let before_first = (first - 1).to_string();
    for args in [
        vec![
            "history",
            "--archive",
            &url,
            "--key",
            "/w/",
            "--from",
            &before_first,
        ],
        vec![
            "diff",
            "--archive",
            &url,
            "--from",
            &before_first,
            "--to",
            &last_text,
        ],
    ] {
        let (code, _, err) = run_restorer(&args, &[])?;
        assert_eq!(code, 3, "{args:?}: {err}");
        assert!(
            err.contains("before the first restorable revision")
                && err.contains(&format!("generation 1: {first}..={last}")),
            "{err}"
        );
    }
    let beyond = (last + 10).to_string();
    let (code, _, err) = run_restorer(
        &[
            "diff",
            "--archive",
            &url,
            "--from",
            &first_text,
            "--to",
            &beyond,
        ],
        &[],
    )?;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("beyond the last archived revision"), "{err}");
    let (code, _, err) = run_restorer(
        &[
            "diff",
            "--archive",
            &url,
            "--from",
            &last_text,
            "--to",
            &first_text,
        ],
        &[],
    )?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--from (revision"), "{err}");
    let (code, _, err) = run_restorer(
        &["history", "--archive", &url, "--key", "k", "--to", "noon"],
        &[],
    )?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--to: \"noon\""), "{err}");

    // A compaction overtakes the stopped archiver: generation 2 after a gap.
    // A span across the boundary is refused; one inside generation 2 works.
    mixed_workload(&mut client, &mut rng, 20).await?;
    let compacted = current_revision(&mut client).await?;
    client.compact(compacted, None).await?;
    let mut archiver = ArchiverProcess::start(&args, &[], &log)?;
    archiver.wait_writing(Duration::from_secs(30)).await?;
    mixed_workload(&mut client, &mut rng, 30).await?;
    let reached = current_revision(&mut client).await?;
    wait_archived(&url, 2, reached, Duration::from_secs(30)).await?;
    // The new generation's base snapshot may still be uploading.
    let mut generations = read_archive(&url).await?;
    for _ in 0..300 {
        if generations.get(1).is_some_and(|g| !g.snapshots.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        generations = read_archive(&url).await?;
    }
    let (status, _) = archiver.terminate(Duration::from_secs(20))?;
    assert!(status.success());
    let generations = read_archive(&url).await?;
    let g2 = &generations[1];
    let (g2_first, g2_last) = (g2.snapshots[0], g2.revisions.last().unwrap().revision);
    let g2_last_text = g2_last.to_string();
    let (code, _, err) = run_restorer(
        &[
            "diff",
            "--archive",
            &url,
            "--from",
            &mid_text,
            "--to",
            &g2_last_text,
        ],
        &[],
    )?;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("do not lie in one restorable range")
            && err.contains(&format!("generation 2: {g2_first}..={g2_last}")),
        "{err}"
    );
    check_diff(
        &client,
        &url,
        (&g2_first.to_string(), g2_first),
        (&g2_last_text, g2_last),
        None,
    )
    .await?;
    Ok(())
}
