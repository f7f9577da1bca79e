//! The deployment files agree with the product: nothing shipped ties the
//! application's availability or start-up to Kafka or to the relay, manifests
//! parse with the expected kinds, and every metric a dashboard or alert uses is
//! one the relay exports (so a rename cannot silently blank a panel).

use std::collections::BTreeSet;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn exported_metrics() -> BTreeSet<String> {
    let src = read("src/telemetry/metrics.rs");
    src.split('"').filter(|s| s.starts_with("outbox_relay_") && !s.contains(' ')).map(str::to_string).collect()
}

fn used_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("outbox_relay_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn dashboards_and_alerts_use_only_exported_metrics() {
    let exported = exported_metrics();
    assert!(exported.len() >= 10, "{exported:?}");
    for file in ["deploy/grafana/outbox-relay.json", "deploy/prometheus/alerts.yaml"] {
        let used = used_metrics(&read(file));
        assert!(!used.is_empty(), "{file} uses no metric");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(unknown.is_empty(), "{file} uses metrics the relay does not export: {unknown:?}");
    }
    let _: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/outbox-relay.json")).expect("dashboard is JSON");
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/prometheus/alerts.yaml")).expect("alerts are YAML");
    let names: Vec<&str> =
        alerts["groups"][0]["rules"].as_sequence().expect("rules").iter().filter_map(|r| r["alert"].as_str()).collect();
    for want in [
        "OutboxOldestPendingTooOld",
        "OutboxParkedEvents",
        "OutboxNoProgress",
        "OutboxRelayNotReady",
        "OutboxRelayHoldsTransaction",
        "OutboxKafkaUnavailable",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
}

/// The containers of a pod spec: init containers (native sidecars among
/// them) and regular ones.
fn pod_containers(spec: &serde_yaml::Value) -> Vec<&serde_yaml::Value> {
    ["initContainers", "containers"].iter().filter_map(|k| spec[*k].as_sequence()).flatten().collect()
}

fn words(c: &serde_yaml::Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .filter_map(|k| c[*k].as_sequence())
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

fn is_relay(c: &serde_yaml::Value) -> bool {
    c["image"].as_str().is_some_and(|i| i.contains("outbox-relay"))
}

/// A probe that fails while Kafka is away: `/readyz`, or a full `check`.
fn probe_needs_kafka(probe: &serde_yaml::Value) -> bool {
    let path = probe["httpGet"]["path"].as_str().unwrap_or_default();
    let exec: Vec<&str> =
        probe["exec"]["command"].as_sequence().into_iter().flatten().filter_map(|a| a.as_str()).collect();
    path.starts_with("/readyz") || (exec.contains(&"check") && !exec.contains(&"--start-gate"))
}

/// What the issue asks of every pod the project ships next to an application:
/// nothing in it may take the application out of service, or keep it from
/// starting, because Kafka (or the relay) is away. Returns what is wrong.
fn pod_gates_the_application(name: &str, spec: &serde_yaml::Value) -> Vec<String> {
    let mut wrong = Vec::new();
    for c in pod_containers(spec) {
        let cname = c["name"].as_str().unwrap_or("?");
        for probe in ["readinessProbe", "startupProbe", "livenessProbe"] {
            if !c[probe].is_null() && probe_needs_kafka(&c[probe]) {
                wrong.push(format!("{name}: {cname}'s {probe} fails while Kafka is away"));
            }
        }
    }
    for c in spec["initContainers"].as_sequence().into_iter().flatten() {
        let cname = c["name"].as_str().unwrap_or("?");
        let sidecar = c["restartPolicy"].as_str() == Some("Always");
        let w = words(c);
        if !sidecar && is_relay(c) && !(w.contains(&"check".into()) && w.contains(&"--start-gate".into())) {
            wrong.push(format!("{name}: init container {cname} gates the pod's start on more than config and schema"));
        }
    }
    for c in pod_containers(spec).into_iter().filter(|c| is_relay(c) && words(c).contains(&"run".into())) {
        let cname = c["name"].as_str().unwrap_or("?");
        // A sidecar's readiness counts for the pod's; a plain container that
        // exits makes the pod unready: the relay must be a native sidecar
        // (restartable init container) without readiness or startup probe.
        if c["restartPolicy"].as_str() != Some("Always") {
            wrong
                .push(format!("{name}: relay {cname} is not a native sidecar (initContainers, restartPolicy: Always)"));
        }
        for probe in ["readinessProbe", "startupProbe"] {
            if !c[probe].is_null() {
                wrong.push(format!("{name}: relay {cname} has a {probe}: it counts for the application's pod"));
            }
        }
        if !c["livenessProbe"].is_null() && c["livenessProbe"]["httpGet"]["path"] != "/healthz" {
            wrong.push(format!("{name}: relay {cname}'s liveness must be /healthz (its own process)"));
        }
    }
    wrong
}

#[test]
fn nothing_shipped_takes_the_application_out_of_service_or_keeps_it_from_starting_when_kafka_is_down() {
    let text = read("deploy/kubernetes/sidecar.yaml");
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).expect("YAML")).collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "Secret", "Deployment"]);
    let spec = &docs[2]["spec"]["template"]["spec"];
    let wrong = pod_gates_the_application("deploy/kubernetes/sidecar.yaml", spec);
    assert!(wrong.is_empty(), "{wrong:#?}");
    // The relay itself never exits while Postgres is away at start-up (an
    // exited sidecar makes its pod unready), nor while Kafka is (it waits).
    let config = docs[0]["data"]["outbox-relay.toml"].as_str().unwrap();
    assert!(config.contains("startup_timeout = \"0s\""), "the sidecar waits for Postgres: {config}");
    // the grace period must cover relay.shutdown_timeout from the ConfigMap
    let shutdown: toml_shutdown::Secs = toml_shutdown::parse(config);
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > shutdown.0, "grace {grace}s must exceed shutdown_timeout {}s", shutdown.0);
    // systemd: a start gate never contacts Kafka.
    let unit = read("deploy/systemd/outbox-relay.service");
    for line in unit.lines().filter(|l| l.starts_with("ExecStartPre=") && l.contains(" check")) {
        assert!(line.contains("--start-gate"), "{line}");
    }
    // compose: the application (the writer) waits for neither Kafka nor the relay.
    let c: serde_yaml::Value = serde_yaml::from_str(&read("docker-compose.yml")).expect("YAML");
    let deps = &c["services"]["writer"]["depends_on"];
    assert!(deps["kafka"].is_null() && deps["relay"].is_null(), "{deps:?}");
}

/// The checker itself: the sidecar manifest of 0.2 (relay as a plain container
/// with readiness on /readyz, an init container running the full `check`)
/// gates the application, and it says so.
#[test]
fn the_pod_checker_catches_each_way_a_pod_can_be_gated() {
    let old: serde_yaml::Value = serde_yaml::from_str(
        r#"
initContainers:
  - name: outbox-relay-check
    image: ghcr.io/example/outbox-relay:0.2.0
    args: ["--config", "/etc/outbox-relay/outbox-relay.toml", "check"]
containers:
  - name: app
    image: ghcr.io/example/orders:1.0.0
  - name: outbox-relay
    image: ghcr.io/example/outbox-relay:0.2.0
    args: ["run"]
    livenessProbe: { httpGet: { path: /healthz, port: metrics } }
    readinessProbe: { httpGet: { path: /readyz, port: metrics } }
"#,
    )
    .unwrap();
    let wrong = pod_gates_the_application("0.2", &old);
    assert!(wrong.iter().any(|w| w.contains("readinessProbe fails while Kafka is away")), "{wrong:#?}");
    assert!(wrong.iter().any(|w| w.contains("init container outbox-relay-check gates")), "{wrong:#?}");
    assert!(wrong.iter().any(|w| w.contains("not a native sidecar")), "{wrong:#?}");
}

mod toml_shutdown {
    pub struct Secs(pub u64);
    pub fn parse(toml: &str) -> Secs {
        let line = toml.lines().find(|l| l.trim_start().starts_with("shutdown_timeout")).expect("shutdown_timeout set");
        let v = line.split('"').nth(1).expect("quoted duration");
        Secs(humantime::parse_duration(v).expect("duration").as_secs())
    }
}

#[test]
fn compose_file_has_the_services_in_order() {
    let c: serde_yaml::Value = serde_yaml::from_str(&read("docker-compose.yml")).expect("YAML");
    let s = &c["services"];
    for svc in ["postgres", "kafka", "migrate", "relay", "writer"] {
        assert!(!s[svc].is_null(), "service {svc}");
    }
    assert_eq!(s["relay"]["depends_on"]["migrate"]["condition"], "service_completed_successfully");
    assert_eq!(s["relay"]["depends_on"]["kafka"]["condition"], "service_healthy");
    assert_eq!(s["migrate"]["depends_on"]["postgres"]["condition"], "service_healthy");
    assert!(s["kafka"]["image"].as_str().unwrap().starts_with("apache/kafka:"), "official Apache Kafka image");
}

/// The real Compose v2 CLI (built by scripts/deps) accepts the file: schema,
/// interpolation, depends_on conditions, build contexts.
#[test]
fn docker_compose_config_accepts_the_compose_file() {
    let home = std::env::var("HOME").expect("HOME");
    let bin = std::path::Path::new(&home).join(".cache/outbox-relay/bin/docker-compose-v2.32.4");
    assert!(
        bin.exists(),
        "{} missing: run scripts/compose-cli (scripts/test builds docker compose once)",
        bin.display()
    );
    let out = std::process::Command::new(&bin)
        .args(["-f", "docker-compose.yml", "config", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run docker compose");
    assert!(out.status.success(), "docker compose config: {}", String::from_utf8_lossy(&out.stderr));
    // and it resolves what it should
    let out = std::process::Command::new(&bin)
        .args(["-f", "docker-compose.yml", "config", "--services"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run docker compose");
    let services = String::from_utf8_lossy(&out.stdout);
    for svc in ["postgres", "kafka", "migrate", "relay", "writer"] {
        assert!(services.lines().any(|l| l == svc), "service {svc} in {services}");
    }
}

#[test]
fn systemd_unit_runs_the_relay_hardened_with_a_stop_timeout() {
    let unit = read("deploy/systemd/outbox-relay.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/outbox-relay") && unit.contains(" run"));
    assert!(unit.contains("NoNewPrivileges=yes") && unit.contains("ProtectSystem=strict"));
    assert!(unit.contains("RestartPreventExitStatus=64 65"));
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.contains("USER 10001") && dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/outbox-relay\"]"));
}

/// Names with the metrics' prefix that are not metrics: the relay-id header and
/// the default decisions topic.
const NOT_METRICS: &[&str] = &["outbox_relay_id", "outbox_relay_commits"];

/// Metrics renamed in a release: the upgrade notes name the old name. Each must
/// no longer be exported.
const RENAMED: &[&str] = &["outbox_relay_commit_to_ack_seconds"];

/// The docs name only metrics the relay exports and alerts the rules define,
/// and docs/operations.md lists every exported metric: a rename in the code
/// fails here instead of leaving an operator with a query that returns nothing.
#[test]
fn docs_name_only_exported_metrics_and_defined_alerts_and_list_every_metric() {
    let exported = exported_metrics();
    let alerts = read("deploy/prometheus/alerts.yaml");
    let defined: BTreeSet<String> =
        alerts.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(|a| a.trim().to_string()).collect();
    assert!(defined.len() >= 10, "{defined:?}");
    let mut docs = vec!["README.md".to_string()];
    for e in std::fs::read_dir(format!("{ROOT}/docs")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") {
            docs.push(format!("docs/{name}"));
        }
    }
    for file in &docs {
        let text = read(file);
        let unknown: Vec<_> = used_metrics(&text)
            .into_iter()
            .filter(|m| !NOT_METRICS.contains(&m.as_str()) && !RENAMED.contains(&m.as_str()) && !exported.contains(m))
            .collect();
        assert!(unknown.is_empty(), "{file} names metrics the relay does not export: {unknown:?}");
        let named_alerts: BTreeSet<String> = text
            .split(|c: char| !(c.is_ascii_alphanumeric()))
            .filter(|w| w.starts_with("Outbox") && w.len() > 12 && w.chars().nth(6).is_some_and(|c| c.is_uppercase()))
            .map(str::to_string)
            .collect();
        let undefined: Vec<_> = named_alerts.difference(&defined).collect();
        assert!(
            undefined.is_empty(),
            "{file} names alerts deploy/prometheus/alerts.yaml does not define: {undefined:?}"
        );
    }
    for old in RENAMED {
        assert!(!exported.contains(*old), "{old} is exported again: take it out of RENAMED");
    }
    let ops = used_metrics(&read("docs/operations.md"));
    let undocumented: Vec<_> = exported.difference(&ops).collect();
    assert!(undocumented.is_empty(), "docs/operations.md does not list: {undocumented:?}");
    let runbook = read("docs/operations.md");
    let no_runbook: Vec<_> = defined.iter().filter(|a| !runbook.contains(&format!("### {a}"))).collect();
    assert!(no_runbook.is_empty(), "docs/operations.md has no runbook entry for: {no_runbook:?}");
}

/// Every secret the sidecar's configuration reads from a file is a key of the
/// Secret mounted there, and every key of that Secret is used: the Kafka SASL
/// password once sat in the Secret with nothing reading it.
#[test]
fn the_sidecar_reads_every_secret_it_ships_from_the_mounted_secret() {
    let text = read("deploy/kubernetes/sidecar.yaml");
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    let of_kind = |k: &str| docs.iter().find(|d| d["kind"].as_str() == Some(k)).unwrap_or_else(|| panic!("no {k}"));
    let toml_text = of_kind("ConfigMap")["data"]["outbox-relay.toml"].as_str().expect("config").to_string();
    let secret_keys: BTreeSet<String> = of_kind("Secret")["stringData"]
        .as_mapping()
        .expect("stringData")
        .keys()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    let files: BTreeSet<String> = toml_text
        .lines()
        .filter(|l| l.trim_start().split('=').next().is_some_and(|k| k.trim().ends_with("_file")))
        .filter_map(|l| l.split('"').nth(1))
        .map(|p| p.strip_prefix("/run/secrets/outbox-relay/").unwrap_or_else(|| panic!("{p} not in the secret mount")))
        .map(str::to_string)
        .collect();
    assert_eq!(files, secret_keys, "secret files the config reads vs keys of the Secret");
}
