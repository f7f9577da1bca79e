//! Kafka that requires security, on a real broker (`scripts/infra up --secure`):
//! the relay publishes through SASL_SSL (SCRAM-SHA-512) with its password from
//! a file or from an environment variable, and through TLS; `verify` reads the
//! events back through the same listener. A wrong password gives one clear
//! `check` line (exit 1), and a running relay says it once, keeps waiting
//! holding nothing, and publishes nothing.

use std::time::{Duration, Instant};

use outbox_relay_support::*;

/// The relay's Kafka settings for the secure broker: SASL_SSL or TLS only.
fn secure_env(sasl: bool) -> Vec<(String, String)> {
    let s = &infra().secure;
    let mut env = vec![
        ("OUTBOX_RELAY__KAFKA__BROKERS".to_string(), if sasl { s.sasl_ssl.clone() } else { s.tls.clone() }),
        ("OUTBOX_RELAY__KAFKA__PROPERTIES__SSL_CA_LOCATION".into(), infra().pg_ca.display().to_string()),
    ];
    if sasl {
        env.push(("OUTBOX_RELAY__KAFKA__PROPERTIES__SECURITY_PROTOCOL".into(), "SASL_SSL".into()));
        env.push(("OUTBOX_RELAY__KAFKA__PROPERTIES__SASL_MECHANISM".into(), "SCRAM-SHA-512".into()));
        env.push(("OUTBOX_RELAY__KAFKA__PROPERTIES__SASL_USERNAME".into(), s.user.clone()));
    } else {
        env.push(("OUTBOX_RELAY__KAFKA__PROPERTIES__SECURITY_PROTOCOL".into(), "SSL".into()));
    }
    env
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// An outbox with `n` events for a topic on the secure broker (created through
/// its plaintext admin listener: the broker does not auto-create topics).
async fn secure_outbox(name: &str, n: i64) -> (Outbox, String) {
    let s = &infra().secure;
    assert!(
        std::net::TcpStream::connect(&s.sasl_ssl).is_ok(),
        "the secure broker is not running on {}: run `scripts/infra up --secure` (scripts/test does)",
        s.sasl_ssl
    );
    let ob = Outbox::new(name).await;
    let topic = format!("{}.events", ob.table);
    create_topics_at(&s.plain_admin, std::slice::from_ref(&topic), &TopicSpec::new(2)).await;
    ob.insert(&topic, n, 5).await;
    (ob, topic)
}

/// Runs the relay until the outbox is drained, then `verify` through the same
/// listener: every published row is in Kafka once, in order.
async fn publish_and_verify(ob: &Outbox, env: &[(String, String)]) {
    let relay = ob.spawn_relay(&pairs(env));
    ob.wait_drained(Duration::from_secs(60)).await;
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    let out = relay_cmd(&ob.table, &pairs(env)).args(["verify", "--since", "1h", "--json"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((v["lost"].as_i64(), v["order_violations"].as_i64()), (Some(0), Some(0)), "{text}");
    assert_eq!(v["expected"].as_i64(), Some(ob.count("published_at IS NOT NULL").await), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_through_sasl_ssl_with_the_password_from_a_file() {
    let (ob, _) = secure_outbox("sec_sasl_file", 300).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kafka-password");
    std::fs::write(&file, format!("{}\n", infra().secure.password)).unwrap();
    let mut env = secure_env(true);
    env.push(("OUTBOX_RELAY__KAFKA__SASL_PASSWORD_FILE".into(), file.display().to_string()));
    publish_and_verify(&ob, &env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_through_sasl_ssl_with_the_password_from_the_environment() {
    let (ob, _) = secure_outbox("sec_sasl_env", 300).await;
    let mut env = secure_env(true);
    env.push(("OUTBOX_RELAY__KAFKA__SASL_PASSWORD".into(), infra().secure.password.clone()));
    publish_and_verify(&ob, &env).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_through_tls() {
    let (ob, _) = secure_outbox("sec_tls", 300).await;
    publish_and_verify(&ob, &secure_env(false)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_is_one_clear_line_and_the_relay_waits_holding_nothing() {
    let (ob, _) = secure_outbox("sec_wrong", 50).await;
    let mut env = secure_env(true);
    env.push(("OUTBOX_RELAY__KAFKA__SASL_PASSWORD".into(), "not-the-password".into()));

    let out = relay_cmd(&ob.table, &pairs(&env)).arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let problems: Vec<&str> = text.lines().filter(|l| l.starts_with("PROBLEM")).collect();
    assert_eq!(problems.len(), 1, "{text}");
    assert!(problems[0].contains("refused the relay's credentials"), "{text}");
    assert!(problems[0].contains("SASL authentication"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");

    // `run` starts (Kafka never stops it), says why it waits, and holds nothing.
    let started = Instant::now();
    let app = format!("{}-relay", ob.table);
    let url = format!("{}?application_name={app}", infra().pg_url);
    let relay = ob.spawn_relay(
        &[pairs(&env), vec![("OUTBOX_RELAY__LOG__LEVEL", "info"), ("OUTBOX_RELAY__POSTGRES__URL", url.as_str())]]
            .concat(),
    );
    relay.wait_log("refused the relay's credentials", Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(started.elapsed())).await;
    let held: i64 = pg()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND (backend_xid IS NOT NULL OR state LIKE 'idle in transaction%')",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ob.count("published_at IS NOT NULL").await, 0);
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("panicked") && !log.contains("not-the-password"), "{log}");
    let auth_lines = log.lines().filter(|l| l.contains("SASL authentication error")).count();
    assert!(auth_lines <= 3, "{auth_lines} lines of librdkafka authentication errors in 20 s:\n{log}");
    assert_eq!(held, 0, "the waiting relay holds a transaction on the database");
}
