//! docs/configuration.md against the code: every key, every default.

use std::time::Duration;

use super::tests::load_env;
use super::Settings;

/// A default as the reference states it and as the code has it.
#[derive(Debug, PartialEq)]
enum Shown {
    Dur(Duration),
    Text(String),
    None,
}

fn code_default(s: &Settings, key: &str) -> Option<Shown> {
    let d = Shown::Dur;
    let t = |v: &dyn std::fmt::Display| Shown::Text(v.to_string());
    let opt = |present: bool| if present { Shown::Text("set".into()) } else { Shown::None };
    Some(match key {
        "postgres.url" | "kafka.brokers" => Shown::Text("required".into()),
        "postgres.password_file" => opt(s.postgres.password_file.is_some()),
        "postgres.tls_mode" => opt(s.postgres.tls_mode.is_some()),
        "postgres.tls_ca_file" => opt(s.postgres.tls_ca_file.is_some()),
        "postgres.pool_size" => t(&s.postgres.pool_size),
        "postgres.connect_timeout" => d(s.postgres.connect_timeout),
        "postgres.statement_timeout" => d(s.postgres.statement_timeout),
        "postgres.idle_in_transaction_timeout" => d(s.postgres.idle_in_transaction_timeout),
        "kafka.properties" => t(&if s.kafka.properties.is_empty() { "{}" } else { "set" }),
        "kafka.sasl_password" => opt(s.kafka.sasl_password.is_some()),
        "kafka.sasl_password_file" => opt(s.kafka.sasl_password_file.is_some()),
        "kafka.ssl_key_password_file" => opt(s.kafka.ssl_key_password_file.is_some()),
        "outbox.table" => t(&s.outbox.table),
        "relay.id" => Shown::Text("host name".into()),
        "outboxes.table" => opt(!s.outboxes.is_empty()),
        "outboxes.postgres_url" => Shown::Text("postgres.url".into()),
        "outboxes.on_publish"
        | "outboxes.delivery"
        | "outboxes.batch_size"
        | "outboxes.retention"
        | "outboxes.ordering"
        | "outboxes.max_attempts"
        | "outboxes.message_timestamp" => Shown::Text("the [relay] value".into()),
        "tracing.otlp_endpoint" => opt(s.tracing.otlp_endpoint.is_some()),
        "tracing.service_name" => t(&s.tracing.service_name),
        "cloudevents.enabled" => t(&s.cloudevents.enabled),
        "cloudevents.source" => opt(s.cloudevents.source.is_some()),
        "cloudevents.source_column" => opt(s.cloudevents.source_column.is_some()),
        "cloudevents.type" => Shown::Text(if s.cloudevents.r#type.is_none() { "the topic" } else { "set" }.into()),
        "cloudevents.type_column" => opt(s.cloudevents.type_column.is_some()),
        "cloudevents.content_type" => t(&s.cloudevents.content_type),
        "relay.batch_size" => t(&s.relay.batch_size),
        "relay.pipeline_depth" => t(&s.relay.pipeline_depth),
        "relay.poll_interval" => d(s.relay.poll_interval),
        "relay.linger" => d(s.relay.linger),
        "relay.max_linger" => d(s.relay.max_linger),
        "relay.sweep_interval" => d(s.relay.sweep_interval),
        "relay.publish_timeout" => d(s.relay.publish_timeout),
        "relay.on_publish" => t(&s.relay.on_publish.as_str()),
        "relay.retention" => d(s.relay.retention),
        "relay.max_attempts" => t(&s.relay.max_attempts),
        "relay.retry_backoff" => d(s.relay.retry_backoff),
        "relay.message_timestamp" => t(&s.relay.message_timestamp.as_str()),
        "relay.ordering" => t(&s.relay.ordering.as_str()),
        "relay.delivery" => t(&s.relay.delivery.as_str()),
        "relay.recovery_timeout" => d(s.relay.recovery_timeout),
        "relay.commits_topic" => t(&s.relay.commits_topic),
        "relay.shutdown_timeout" => d(s.relay.shutdown_timeout),
        "relay.startup_timeout" => d(s.relay.startup_timeout),
        "relay.max_backoff" => d(s.relay.max_backoff),
        "http.listen" => t(&s.http.listen),
        "log.format" => t(&s.log.format.as_str()),
        "log.level" => t(&s.log.level),
        _ => return None,
    })
}

/// The keys the code accepts: the `pub` fields of each section's struct.
fn code_keys() -> Vec<String> {
    let mut keys = Vec::new();
    for section in ["postgres", "kafka", "outbox", "outboxes", "relay", "cloudevents", "tracing", "http", "log"] {
        let src = std::fs::read_to_string(format!("{}/src/config/{section}.rs", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let body = src.split("#[serde(deny_unknown_fields)]").nth(1).expect("a deny_unknown_fields struct");
        let body = &body[..body.find("\n}").unwrap()];
        for line in body.lines() {
            if let Some(rest) = line.trim().strip_prefix("pub ") {
                if let Some((name, _)) = rest.split_once(':') {
                    keys.push(format!("{section}.{}", name.trim_start_matches("r#")));
                }
            }
        }
    }
    keys
}

#[test]
fn the_reference_lists_every_key_with_its_default() {
    let doc = std::fs::read_to_string(format!("{}/docs/configuration.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let rows: Vec<(String, String)> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].trim_matches('`').to_string())
        })
        .collect();
    let documented: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
    let code = code_keys();
    assert!(code.len() >= 30, "{code:?}");
    let missing: Vec<_> = code.iter().filter(|k| !documented.contains(&k.as_str())).collect();
    assert!(missing.is_empty(), "docs/configuration.md does not list {missing:?}");
    let unknown: Vec<_> = documented.iter().filter(|k| !code.iter().any(|c| c == *k)).collect();
    assert!(unknown.is_empty(), "docs/configuration.md lists keys the code does not accept: {unknown:?}");
    let s = load_env(&[]).unwrap();
    for (key, stated) in &rows {
        let actual = code_default(&s, key).unwrap_or_else(|| panic!("no default check for {key}"));
        let stated = match stated.as_str() {
            "none" => Shown::None,
            other => match humantime::parse_duration(other) {
                Ok(d) if other.chars().last().is_some_and(|c| c.is_ascii_alphabetic()) => Shown::Dur(d),
                _ => Shown::Text(other.to_string()),
            },
        };
        assert_eq!(stated, actual, "the default of {key} in docs/configuration.md");
    }
    // The environment variable of a key is its path: one of each works.
    let s = load_env(&[("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "7s"), ("OUTBOX_RELAY__HTTP__LISTEN", "")]).unwrap();
    assert_eq!(s.relay.publish_timeout, Duration::from_secs(7));
    assert_eq!(s.http.listen, "");
}
