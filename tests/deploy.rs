//! The deployment files agree with the product: manifests parse with the expected
//! kinds and probes, and every metric a dashboard or alert uses is one the relay
//! exports (so a rename cannot silently blank a panel).

use std::collections::BTreeSet;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn exported_metrics() -> BTreeSet<String> {
    let src = read("src/metrics.rs");
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
    for want in ["OutboxOldestPendingTooOld", "OutboxParkedEvents", "OutboxNoProgress", "OutboxRelayNotReady"] {
        assert!(names.contains(&want), "{names:?}");
    }
}

#[test]
fn kubernetes_sidecar_has_probes_init_check_and_grace_period() {
    let text = read("deploy/kubernetes/sidecar.yaml");
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).expect("YAML")).collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["ConfigMap", "Secret", "Deployment"]);
    for d in &docs {
        assert!(d["apiVersion"].as_str().is_some() && d["metadata"]["name"].as_str().is_some());
    }
    let spec = &docs[2]["spec"]["template"]["spec"];
    let init = &spec["initContainers"][0];
    assert!(init["args"].as_sequence().unwrap().iter().any(|a| a.as_str() == Some("check")));
    let relay = spec["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "outbox-relay")
        .expect("relay container");
    assert_eq!(relay["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(relay["readinessProbe"]["httpGet"]["path"], "/readyz");
    // the grace period must cover relay.shutdown_timeout from the ConfigMap
    let config = docs[0]["data"]["outbox-relay.toml"].as_str().unwrap();
    let shutdown: toml_shutdown::Secs = toml_shutdown::parse(config);
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > shutdown.0, "grace {grace}s must exceed shutdown_timeout {}s", shutdown.0);
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
