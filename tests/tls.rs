//! TLS to the local Postgres, which `scripts/infra` sets up with a self-signed
//! CA (OUTBOX_RELAY_TEST_PG_CA) and a certificate for localhost / 127.0.0.1.

use std::process::Command;
use std::time::{Duration, Instant};

use outbox_relay_support::*;

fn ca() -> String {
    let path = infra().pg_ca.display().to_string();
    assert!(
        std::path::Path::new(&path).is_file(),
        "no test CA at {path}: run scripts/infra up (it enables TLS on the local Postgres)"
    );
    path
}

/// The test URL with `host` in place of 127.0.0.1 and extra query options.
fn url_with(host: &str, query: &str) -> String {
    let url = pg_url().replace("127.0.0.1", host);
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_with_the_ca_connects_encrypted_and_relays() {
    let ob = Outbox::new("tls").await;
    let topic = ob.topic("t", 1).await;
    let app = format!("tls-{}", &ob.table);
    let url = url_with("localhost", &format!("application_name={app}"));
    let ca = ca();
    let env = [
        ("OUTBOX_RELAY__POSTGRES__URL", url.as_str()),
        ("OUTBOX_RELAY__POSTGRES__TLS_MODE", "verify-full"),
        ("OUTBOX_RELAY__POSTGRES__TLS_CA_FILE", ca.as_str()),
    ];
    let o = relay_cmd(&ob.table, &env).arg("check").output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let relay = ob.spawn_relay(&env);
    pg().await
        .execute(&format!("INSERT INTO {} (topic, payload) VALUES ($1, '{{}}')", ob.qualified()), &[&topic])
        .await
        .unwrap();
    assert_eq!(consume(std::slice::from_ref(&topic), 1, Duration::from_secs(30), Duration::ZERO).len(), 1);
    // every connection the relay holds is encrypted
    let db = pg().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (total, encrypted) = loop {
        let r = db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.application_name = $1",
                &[&app],
            )
            .await
            .unwrap();
        let (t, e): (i64, i64) = (r.get(0), r.get(1));
        if t >= 2 || Instant::now() > deadline {
            break (t, e);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(total >= 2, "pool + LISTEN connections expected, saw {total}");
    assert_eq!(encrypted, total, "all relay connections use TLS");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn libpq_style_url_options_work_too() {
    let ob = Outbox::new("tlsurl").await;
    let url = url_with("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={}", ca()));
    let o = relay_cmd(&ob.table, &[("OUTBOX_RELAY__POSTGRES__URL", url.as_str())]).arg("check").output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_certificate_from_another_ca_is_refused() {
    let ob = Outbox::new("tlsbad").await;
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-ca.crt");
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=someone else"])
        .arg("-keyout")
        .arg(dir.path().join("k.pem"))
        .arg("-out")
        .arg(&other)
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "openssl could not make a CA");
    let url = url_with("localhost", "");
    let o = relay_cmd(
        &ob.table,
        &[
            ("OUTBOX_RELAY__POSTGRES__URL", url.as_str()),
            ("OUTBOX_RELAY__POSTGRES__TLS_MODE", "verify-full"),
            ("OUTBOX_RELAY__POSTGRES__TLS_CA_FILE", other.to_str().unwrap()),
        ],
    )
    .arg("check")
    .output()
    .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("PROBLEM postgres unreachable") && out.to_lowercase().contains("certificate"), "{out}");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

#[test]
fn an_unknown_tls_mode_is_a_config_error() {
    let o = relay_cmd("outbox", &[("OUTBOX_RELAY__POSTGRES__TLS_MODE", "verify-everything")])
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("postgres.tls_mode") && err.contains("verify-full"), "{err}");
}
