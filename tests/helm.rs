//! The Helm chart (`deploy/helm/outbox-relay`), rendered by the real `helm`
//! binary (`scripts/helm-cli` builds it once): `helm lint` passes in both modes,
//! and the rendered objects keep the product's rules: a sidecar never has a
//! probe that ties the application to Kafka, exactly-once relays have stable
//! ids, the grace period outlasts the shutdown timeout, secrets are files from
//! the Secret, and the alerts and dashboard are the shipped ones.

use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = "deploy/helm/outbox-relay";

fn helm() -> String {
    let out = Command::new(format!("{ROOT}/scripts/helm-cli")).output().expect("scripts/helm-cli");
    assert!(out.status.success(), "scripts/helm-cli: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn run(args: &[&str]) -> String {
    let out = Command::new(helm()).args(args).current_dir(ROOT).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "helm {args:?}:\n{text}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn render(sets: &[&str]) -> Vec<serde_yaml::Value> {
    let mut args = vec!["template", "orders", CHART];
    for s in sets {
        args.extend(["--set", s]);
    }
    let text = run(&args);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

fn kinds(objs: &[serde_yaml::Value]) -> Vec<String> {
    objs.iter().map(|o| o["kind"].as_str().unwrap_or("?").to_string()).collect()
}

fn find<'a>(objs: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    objs.iter().find(|o| o["kind"].as_str() == Some(kind)).unwrap_or_else(|| panic!("no {kind}: {:?}", kinds(objs)))
}

fn config_of(objs: &[serde_yaml::Value]) -> String {
    objs.iter().find_map(|o| o["data"]["outbox-relay.toml"].as_str()).expect("the relay's configuration").to_string()
}

/// The rendered configuration is one the relay accepts.
fn assert_valid_config(toml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox-relay.toml");
    // The password files exist only in a pod; the rest must load as it is.
    let without_files: String = toml
        .lines()
        .filter(|l| !l.trim_start().starts_with("password_file") && !l.contains("_password_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, without_files).unwrap();
    let loaded = outbox_relay::config::Settings::load_from(Some(&path), Vec::<(String, String)>::new());
    assert!(loaded.is_ok(), "{:?}\n{toml}", loaded.err());
}

#[test]
fn the_chart_lints_in_both_modes() {
    run(&["lint", CHART]);
    run(&["lint", CHART, "--set", "mode=sidecar"]);
    run(&["lint", CHART, "--set", "delivery=exactly-once"]);
}

#[test]
fn standalone_at_least_once_is_a_deployment_with_a_pdb_and_the_shipped_monitoring() {
    let objs = render(&["replicas=3", "secret.kafkaSaslPasswordKey=kafka-sasl-password"]);
    let k = kinds(&objs);
    for want in ["Deployment", "PodDisruptionBudget", "Service", "ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(k.iter().any(|x| x == want), "{want} missing: {k:?}");
    }
    assert!(!k.iter().any(|x| x == "StatefulSet"), "{k:?}");
    let dep = find(&objs, "Deployment");
    assert_eq!(dep["spec"]["replicas"].as_i64(), Some(3));
    let pod = &dep["spec"]["template"]["spec"];
    assert!(pod["initContainers"].is_null(), "no start gate: {pod:?}");
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    // Grace period above relay.shutdown_timeout (25 s by default).
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() > 25, "{pod:?}");
    let toml = config_of(&objs);
    assert!(toml.contains("password_file = \"/run/secrets/outbox-relay/postgres-password\""), "{toml}");
    assert!(toml.contains("sasl_password_file = \"/run/secrets/outbox-relay/kafka-sasl-password\""), "{toml}");
    assert_valid_config(&toml);
    // The alert rules are the shipped file's, not a drifting copy.
    let shipped: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/alerts.yaml")).unwrap())
            .unwrap();
    assert_eq!(find(&objs, "PrometheusRule")["spec"]["groups"], shipped["groups"]);
    let dash = objs.iter().find_map(|o| o["data"]["outbox-relay.json"].as_str()).expect("dashboard ConfigMap");
    assert_eq!(dash, std::fs::read_to_string(format!("{ROOT}/deploy/grafana/outbox-relay.json")).unwrap());
}

#[test]
fn exactly_once_relays_are_a_statefulset_with_stable_ids() {
    let objs = render(&["delivery=exactly-once", "replicas=3"]);
    assert!(!kinds(&objs).iter().any(|x| x == "Deployment"), "{:?}", kinds(&objs));
    let sts = find(&objs, "StatefulSet");
    assert_eq!(sts["spec"]["podManagementPolicy"].as_str(), Some("Parallel"));
    let env = &sts["spec"]["template"]["spec"]["containers"][0]["env"];
    let id = env.as_sequence().unwrap().iter().find(|e| e["name"].as_str() == Some("OUTBOX_RELAY__RELAY__ID")).unwrap();
    assert_eq!(id["valueFrom"]["fieldRef"]["fieldPath"].as_str(), Some("metadata.name"));
    let toml = config_of(&objs);
    assert!(toml.contains("delivery = \"exactly-once\""), "{toml}");
    assert_valid_config(&toml);
}

#[test]
fn the_sidecar_has_no_probe_or_gate_that_ties_the_application_to_kafka() {
    let objs = render(&["mode=sidecar"]);
    let k = kinds(&objs);
    for workload in ["Deployment", "StatefulSet", "PodDisruptionBudget", "ServiceMonitor"] {
        assert!(!k.iter().any(|x| x == workload), "{workload} rendered in sidecar mode: {k:?}");
    }
    let snippet = objs.iter().find_map(|o| o["data"]["initContainer.yaml"].as_str()).expect("the sidecar snippet");
    let c: serde_yaml::Value = serde_yaml::from_str(snippet).unwrap();
    assert_eq!(c["restartPolicy"].as_str(), Some("Always"), "a native sidecar: {snippet}");
    assert!(c["readinessProbe"].is_null() && c["startupProbe"].is_null(), "{snippet}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    assert!(!snippet.contains("check"), "no start gate: {snippet}");
    let toml = config_of(&objs);
    assert!(toml.contains("startup_timeout = \"0s\""), "{toml}");
    assert_valid_config(&toml);
}

#[test]
fn a_wrong_mode_is_one_clear_error() {
    let out = Command::new(helm())
        .args(["template", "x", CHART, "--set", "mode=daemonset"])
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mode must be standalone or sidecar"));
}
