//! Checks of `deploy/`: the systemd unit passes `systemd-analyze verify`
//! and keeps its hardening score; the Kubernetes manifests validate against
//! the Kubernetes OpenAPI schema (`kubernetes-validate`, offline) and agree
//! with each other and the ConfigMap's settings; every flag and variable
//! they use is one the binary accepts; every metric the alert rules and the
//! dashboard query is one a running archiver serves, and every one it serves
//! is on the dashboard. Needs `systemd-analyze`, and python3 with PyYAML,
//! `kubernetes-validate` and `promql-parser` (scripts/setup.sh).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use integration::{binary, free_port};
use serde_json::Value;

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/setup.sh installs it)"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Python helpers: `yaml FILE` prints the file's documents as a JSON list,
/// `toml FILE` the file as a JSON object;
/// `promql EXPR…` prints, per expression, the metric names it selects and
/// those it takes a `rate`/`increase` of (a parse error fails).
const PY: &str = r#"
import json, sys
if sys.argv[1] == "yaml":
    import yaml
    print(json.dumps(list(yaml.safe_load_all(open(sys.argv[2])))))
    sys.exit(0)
if sys.argv[1] == "toml":
    import tomllib
    print(json.dumps(tomllib.load(open(sys.argv[2], "rb"))))
    sys.exit(0)
import promql_parser as p
def walk(node, names, rated, in_rate):
    kind = type(node).__name__
    if kind == "VectorSelector":
        names.add(node.name)
        if in_rate:
            rated.add(node.name)
        return
    if kind == "Call":
        in_rate = in_rate or node.func.name in ("rate", "increase", "irate")
        for arg in node.args:
            walk(arg, names, rated, in_rate)
        return
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            walk(child, names, rated, in_rate)
out = []
for expr in sys.argv[2:]:
    names, rated = set(), set()
    walk(p.parse(expr), names, rated, False)
    out.append({"names": sorted(names), "rated": sorted(rated)})
print(json.dumps(out))
"#;

fn python(args: &[&str]) -> Value {
    let out = run(Command::new("python3").arg("-c").arg(PY).args(args));
    assert!(out.status.success(), "python3 {args:?}: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn yaml_docs(relative: &str) -> Vec<Value> {
    let docs = python(&["yaml", &repo(relative).display().to_string()]);
    docs.as_array().expect("a list").clone()
}

fn toml_file(relative: &str) -> Value {
    python(&["toml", &repo(relative).display().to_string()])
}

/// `etcd-archiver <subcommand> --help`.
fn help(subcommand: &str) -> String {
    let out = run(Command::new(binary("etcd-archiver")).args([subcommand, "--help"]));
    assert!(out.status.success(), "{subcommand} --help: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts that every `--flag` in `args` is one `subcommand` accepts.
fn assert_flags_accepted(subcommand: &str, args: &[String], context: &str) {
    let help = help(subcommand);
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{context}: `etcd-archiver {subcommand}` has no flag {flag}"
        );
    }
}

/// Asserts that every environment variable in `names` is one the binary
/// reads: an `ETCD_ARCHIVER_*` of `subcommand --help`, an `AWS_*_FILE` of
/// the store, or another store variable.
fn assert_env_known(subcommand: &str, names: &[String], context: &str) {
    let help = help(subcommand);
    for name in names {
        if let Some(base) = name.strip_suffix("_FILE") {
            if etcdpitr_common::store::SECRET_FILE_VARS.contains(&base) {
                continue;
            }
        }
        if name.starts_with("ETCD_ARCHIVER_") {
            assert!(
                help.contains(&format!("[env: {name}=")) || name == "ETCD_ARCHIVER_LOG",
                "{context}: `etcd-archiver {subcommand}` reads no {name}"
            );
        } else {
            assert!(
                ["AWS_REGION", "AWS_ENDPOINT"].contains(&name.as_str()),
                "{context}: unexpected variable {name}"
            );
        }
    }
}

// ---------------------------------------------------------------- systemd

const UNIT: &str = "deploy/systemd/etcd-archiver.service";
const INSTALLED_BINARY: &str = "/usr/local/bin/etcd-archiver";

/// The unit with its `ExecStart=` binary pointed at the built one (verify
/// checks that it exists), written into a fresh directory.
fn unit_copy(dir: &Path, unit: &str) -> PathBuf {
    assert!(unit.contains(&format!("ExecStart={INSTALLED_BINARY} ")));
    let path = dir.join("etcd-archiver.service");
    let built = binary("etcd-archiver").display().to_string();
    std::fs::write(&path, unit.replace(INSTALLED_BINARY, &built)).unwrap();
    path
}

/// `systemd-analyze verify` output (it prints nothing for a sound unit,
/// and exits 0 for some problems it reports, such as unknown settings).
fn verify(unit: &Path) -> (bool, String) {
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(unit));
    (out.status.success(), text(&out))
}

fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn systemd_unit_verifies_and_stays_hardened() {
    let unit = read(UNIT);
    let dir = tempfile::tempdir().unwrap();
    let path = unit_copy(dir.path(), &unit);
    let (ok, output) = verify(&path);
    assert!(
        ok && output.trim().is_empty(),
        "systemd-analyze verify:\n{output}"
    );

    // The check sees breakage: an unknown setting, a missing binary.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let path = unit_copy(
        &broken,
        &unit.replace("ProtectHome=yes", "ProtectHomes=yes"),
    );
    let (_, output) = verify(&path);
    assert!(output.contains("ProtectHomes"), "{output}");
    std::fs::write(&path, &unit).unwrap();
    let (ok, output) = verify(&path);
    assert!(!ok && output.contains(INSTALLED_BINARY), "{output}");

    // Exposure 1.2 of 10 when written (systemd 252 scores 0–100 here).
    let path = unit_copy(dir.path(), &unit);
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=15"])
        .arg(&path));
    assert!(out.status.success(), "hardening regressed:\n{}", text(&out));

    // Its command line, variables and credentials match the binary and config.
    let exec = unit_values(&unit, "ExecStart")[0];
    let args: Vec<String> = exec.split_whitespace().skip(2).map(String::from).collect();
    assert_eq!(exec.split_whitespace().nth(1), Some("run"));
    assert_flags_accepted("run", &args, UNIT);
    let env: Vec<String> = unit_values(&unit, "Environment")
        .iter()
        .map(|kv| kv.split('=').next().unwrap().to_owned())
        .collect();
    assert_env_known("run", &env, UNIT);
    let config = read("deploy/etcd-archiver.toml");
    let config_path = args.iter().skip_while(|a| *a != "--config").nth(1).unwrap();
    assert_eq!(config_path, "/etc/etcd-archiver/etcd-archiver.toml");
    let credentials: BTreeSet<&str> = unit_values(&unit, "LoadCredential")
        .iter()
        .map(|c| c.split(':').next().unwrap())
        .collect();
    let dir_prefix = "/run/credentials/etcd-archiver.service/";
    let mut used: BTreeSet<&str> = config
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(dir_prefix))
        .map(|(_, rest)| rest.split('"').next().unwrap())
        .collect();
    used.extend(
        unit_values(&unit, "Environment")
            .iter()
            .filter_map(|kv| kv.split_once("=%d/"))
            .map(|(_, name)| name),
    );
    assert_eq!(credentials, used, "LoadCredential= against the files used");
    let data_dir = config
        .lines()
        .find_map(|l| l.strip_prefix("data-dir = "))
        .expect("data-dir");
    let state = unit_values(&unit, "StateDirectory")[0];
    assert_eq!(data_dir, format!("\"/var/lib/{state}\""));
}

// ------------------------------------------------------------- kubernetes

const KUBE: &str = "deploy/kubernetes";

#[test]
fn kubernetes_manifests_validate_against_the_schema() {
    let kustomization = &yaml_docs(&format!("{KUBE}/kustomization.yaml"))[0];
    let resources: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let mut on_disk: Vec<String> = std::fs::read_dir(repo(KUBE))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            Path::new(n).extension().is_some_and(|e| e == "yaml") && n != "kustomization.yaml"
        })
        .collect();
    on_disk.sort();
    let mut listed = resources.clone();
    listed.sort();
    assert_eq!(listed, on_disk, "kustomization.yaml lists every manifest");
    for file in &resources {
        let path = repo(&format!("{KUBE}/{file}"));
        let out = run(Command::new("kubernetes-validate")
            .args(["--strict", "--quiet"])
            .arg(&path));
        assert!(out.status.success(), "{file}:\n{}", text(&out));
    }
    // The validator refuses a field the schema does not have.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("deployment.yaml");
    let deployment = read(&format!("{KUBE}/deployment.yaml"));
    std::fs::write(
        &broken,
        deployment.replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:"),
    )
    .unwrap();
    let out = run(Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&broken));
    assert!(!out.status.success(), "{}", text(&out));
}

fn string_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// The value after `flag` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} in {args:?}"));
    &args[i + 1]
}

/// Asserts a pod runs on control-plane nodes with kubeadm's client
/// certificate files, read-only, at the paths `config` names.
fn assert_etcd_certificates(pod: &Value, container: &Value, config: &Value) {
    assert_eq!(
        pod["nodeSelector"]["node-role.kubernetes.io/control-plane"],
        ""
    );
    assert!(pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["key"] == "node-role.kubernetes.io/control-plane"));
    for key in ["cacert", "cert", "key"] {
        let path = config[key].as_str().unwrap();
        assert!(path.starts_with("/etc/kubernetes/pki/etcd/"), "{path}");
        let mount = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        assert_eq!(mount["readOnly"], true, "{path}");
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert_eq!(volume["hostPath"]["path"], path);
    }
}

/// Asserts the container reads S3 credentials from files of a mounted Secret.
fn assert_credentials_from_secret(pod: &Value, container: &Value) {
    let env = container["env"].as_array().unwrap();
    let mut files = 0;
    for var in env {
        let name = var["name"].as_str().unwrap();
        if name.ends_with("_FILE") {
            files += 1;
            let path = var["value"].as_str().unwrap();
            let mount = container["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
                .unwrap_or_else(|| panic!("{path} is not mounted"));
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap();
            assert!(volume["secret"]["secretName"].is_string(), "{name}");
        }
        assert!(
            var.get("valueFrom").is_none(),
            "{name}: secrets come as files"
        );
    }
    assert_eq!(files, 2, "access key id and secret as files");
}

#[test]
fn kubernetes_manifests_agree_with_the_binary_and_each_other() {
    let kustomization = &yaml_docs(&format!("{KUBE}/kustomization.yaml"))[0];
    let generator = &kustomization["configMapGenerator"][0];
    let config_file = string_list(&generator["files"]).remove(0);
    let config = toml_file(&format!("{KUBE}/{config_file}"));
    let metrics_port: u64 = config["metrics-addr"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();

    let deployment = &yaml_docs(&format!("{KUBE}/deployment.yaml"))[0];
    assert_eq!(deployment["kind"], "Deployment");
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let labels = &deployment["spec"]["selector"]["matchLabels"];
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        &deployment["spec"]["template"]["metadata"]["labels"],
        labels
    );
    let anti =
        &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(&anti["labelSelector"]["matchLabels"], labels);
    let container = &pod["containers"][0];
    let args = string_list(&container["args"]);
    assert_eq!(args[0], "run");
    assert_flags_accepted("run", &args[1..], "deployment.yaml");
    let env: Vec<String> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_env_known("run", &env, "deployment.yaml");
    // --config names the generated ConfigMap's file where it is mounted.
    let config_path = flag_value(&args, "--config");
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "config")
        .unwrap();
    assert_eq!(
        config_path,
        format!("{}/{config_file}", mount["mountPath"].as_str().unwrap())
    );
    let config_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "config")
        .unwrap();
    assert_eq!(config_volume["configMap"]["name"], generator["name"]);
    // Probes on the metrics port; a data directory of the pod's own.
    let port = &container["ports"][0];
    assert_eq!(port["containerPort"].as_u64(), Some(metrics_port));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path);
        assert_eq!(container[probe]["httpGet"]["port"], port["name"]);
    }
    let data_dir = config["data-dir"].as_str().unwrap();
    let data_mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == data_dir)
        .expect("data-dir is a volume");
    let data_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == data_mount["name"])
        .unwrap();
    assert!(data_volume["emptyDir"].is_object());
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let shutdown = etcd_archiver::config::parse_duration(
        "shutdown-timeout",
        config["shutdown-timeout"].as_str().unwrap(),
    )
    .unwrap();
    assert!(
        grace > shutdown.as_secs(),
        "the grace period outlasts shutdown-timeout"
    );
    assert!(container["resources"]["limits"]["memory"].is_string());
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_etcd_certificates(pod, container, &config);
    assert_credentials_from_secret(pod, container);

    let service = &yaml_docs(&format!("{KUBE}/service.yaml"))[0];
    assert_eq!(&service["spec"]["selector"], labels);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port["name"]);
    let pdb = &yaml_docs(&format!("{KUBE}/poddisruptionbudget.yaml"))[0];
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);

    // The restore drill: the issue's command, with the ConfigMap's cluster.
    let cron = &yaml_docs(&format!("{KUBE}/check-cronjob.yaml"))[0];
    let job_pod = &cron["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let check = &job_pod["containers"][0];
    let args = string_list(&check["args"]);
    assert_eq!(args[0], "check");
    assert_flags_accepted("check", &args[1..], "check-cronjob.yaml");
    assert_eq!(
        flag_value(&args, "--endpoints"),
        string_list(&config["endpoints"]).join(",")
    );
    assert_eq!(
        flag_value(&args, "--archive"),
        config["archive"].as_str().unwrap()
    );
    assert_eq!(flag_value(&args, "--max-rpo"), "5m");
    for key in ["cacert", "cert", "key"] {
        assert_eq!(
            flag_value(&args, &format!("--{key}")),
            config[key].as_str().unwrap()
        );
    }
    assert_etcd_certificates(job_pod, check, &config);
    assert_credentials_from_secret(job_pod, check);
}

// ------------------------------------------------ alerts and dashboard

/// Metrics that come from Prometheus itself or kube-state-metrics.
const OTHER_METRICS: [&str; 3] = ["up", "kube_pod_status_ready", "kube_job_status_failed"];

/// A child process killed when the test ends, failed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Name → type (`gauge`/`counter`) of every metric a running archiver serves.
async fn served_metrics() -> std::collections::BTreeMap<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Metrics are served from the start, before etcd answers.
    let child = Command::new(binary("etcd-archiver"))
        .args([
            "run",
            "--endpoints",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .arg("--archive")
        .arg(format!("file://{}/archive", dir.path().display()))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let started = Instant::now();
    let body = loop {
        if let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut body = String::new();
            c.read_to_string(&mut body).await.unwrap();
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no metrics");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    child.0.kill().ok();
    child.0.wait().ok();
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_owned(), kind.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn alerts_and_dashboard_query_the_archivers_metrics() {
    let served = served_metrics().await;
    assert!(served.contains_key("etcd_pitr_leader"), "{served:?}");
    // The metric names `exprs` query, each checked against those served.
    let check = |context: &str, exprs: &[String]| {
        let mut queried = BTreeSet::new();
        let args: Vec<&str> = std::iter::once("promql")
            .chain(exprs.iter().map(String::as_str))
            .collect();
        for (expr, parsed) in exprs.iter().zip(python(&args).as_array().unwrap()) {
            for name in string_list(&parsed["names"]) {
                assert!(
                    served.contains_key(&name) || OTHER_METRICS.contains(&name.as_str()),
                    "{context}: {name} is not a metric the archiver serves: {expr}"
                );
                queried.insert(name);
            }
            for name in string_list(&parsed["rated"]) {
                let kind = served.get(&name).map_or("counter", String::as_str);
                assert_eq!(
                    kind, "counter",
                    "{context}: rate/increase of gauge {name}: {expr}"
                );
            }
        }
        queried
    };

    let rules = &yaml_docs("deploy/prometheus/etcd-pitr-alerts.yaml")[0];
    let mut alerts = BTreeSet::new();
    let mut exprs = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().expect("alerting rules only");
            assert!(alerts.insert(name.to_owned()), "{name} twice");
            assert!(
                ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap()),
                "{name}"
            );
            assert!(rule["annotations"]["summary"].is_string(), "{name}");
            assert!(rule["annotations"]["description"].is_string(), "{name}");
            exprs.push(rule["expr"].as_str().unwrap().to_owned());
        }
    }
    let queried = check("etcd-pitr-alerts.yaml", &exprs);
    for needed in [
        "up",
        "etcd_pitr_leader",
        "etcd_pitr_archive_lag_seconds",
        "etcd_pitr_last_snapshot_timestamp_seconds",
        "etcd_pitr_upload_errors_total",
        "etcd_pitr_generation",
        "kube_pod_status_ready",
    ] {
        assert!(queried.contains(needed), "no alert on {needed}");
    }

    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/etcd-pitr-dashboard.json")).unwrap();
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        let grid = &panel["gridPos"];
        assert!(grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24);
        assert_eq!(panel["datasource"]["uid"], "${datasource}");
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    let queried = check("etcd-pitr-dashboard.json", &exprs);
    for name in served.keys() {
        assert!(queried.contains(name), "the dashboard shows no {name}");
    }
}
