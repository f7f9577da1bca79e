//! Secrets never reach logs or errors; a least-privilege role is enough to run
//! the relay, and `check` names a missing grant.

use std::time::Duration;

use outbox_relay_support::*;

const SECRET: &str = "Zq9-unusual-Pa55phrase-77";

/// A login role with a distinctive password and exactly the relay's grants.
async fn relay_role(ob: &Outbox, name: &str) -> String {
    let db = pg().await;
    db.batch_execute(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
             CREATE ROLE {name} LOGIN PASSWORD '{SECRET}';
           END IF;
         END $$;
         GRANT USAGE ON SCHEMA public TO {name};
         GRANT SELECT, UPDATE, DELETE ON {t} TO {name};",
        t = ob.qualified()
    ))
    .await
    .unwrap();
    let base = url_parts();
    format!("postgres://{name}:{SECRET}@{}/{}", base.0, base.1)
}

/// (host:port, dbname) of the test database.
fn url_parts() -> (String, String) {
    let url = pg_url();
    let after_at = url.rsplit_once('@').map(|(_, r)| r.to_string()).unwrap_or_default();
    let (hostport, db) = after_at.split_once('/').unwrap_or((&after_at, "postgres"));
    (hostport.to_string(), db.split('?').next().unwrap_or(db).to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_appear_in_logs_or_errors() {
    let ob = Outbox::new("secret").await;
    let topic = ob.topic("t", 1).await;
    let url = relay_role(&ob, "relay_secret_test").await;
    let toml = format!("[kafka.properties]\n\"sasl.username\" = \"u\"\n\"sasl.password\" = \"{SECRET}\"\n");
    let mut outputs = Vec::new();

    // A working relay, at trace level, text and JSON, publishing an event.
    for format in ["text", "json"] {
        pg().await
            .execute(&format!("INSERT INTO {} (topic, payload) VALUES ($1, '{{}}')", ob.qualified()), &[&topic])
            .await
            .unwrap();
        let relay = ob.spawn_relay_with(
            &[
                ("OUTBOX_RELAY__POSTGRES__URL", url.as_str()),
                ("OUTBOX_RELAY__LOG__FORMAT", format),
                ("RUST_LOG", "trace"),
            ],
            Some(&toml),
        );
        ob.wait_drained(Duration::from_secs(30)).await;
        let (code, err) = relay.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("outbox-relay started"), "logs were captured: {err}");
        outputs.push(err);
    }
    // check, and failures: wrong port, wrong password, bad config value.
    let bad_port = url.replace(&url_parts().0, "127.0.0.1:1");
    let wrong_pw = url.replace(SECRET, &format!("{SECRET}-wrong"));
    for (u, args) in [
        (url.as_str(), vec!["check"]),
        (bad_port.as_str(), vec!["run"]),
        (wrong_pw.as_str(), vec!["run"]),
        (url.as_str(), vec!["status"]),
    ] {
        let o = relay_cmd(
            &ob.table,
            &[
                ("OUTBOX_RELAY__POSTGRES__URL", u),
                ("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT", "1s"),
                ("RUST_LOG", "trace"),
            ],
        )
        .args(&args)
        .output()
        .unwrap();
        outputs.push(format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)));
    }
    let o = relay_cmd(
        &ob.table,
        &[("OUTBOX_RELAY__POSTGRES__URL", url.as_str()), ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "-1")],
    )
    .arg("run")
    .output()
    .unwrap();
    outputs.push(String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(outputs[3].contains("127.0.0.1:1"), "the failure is reported: {}", outputs[3]);
    assert!(outputs[4].contains("password authentication failed"), "{}", outputs[4]);
    for out in &outputs {
        assert!(!out.contains(SECRET) && !out.contains("Pa55phrase"), "a secret leaked:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn least_privilege_role_runs_the_relay_and_check_names_a_missing_grant() {
    let ob = Outbox::new("leastpriv").await;
    let topic = ob.topic("t", 1).await;
    let url = relay_role(&ob, "relay_least_priv").await;
    let o = relay_cmd(&ob.table, &[("OUTBOX_RELAY__POSTGRES__URL", url.as_str())]).arg("check").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
    pg().await
        .execute(&format!("INSERT INTO {} (topic, payload) VALUES ($1, '{{}}')", ob.qualified()), &[&topic])
        .await
        .unwrap();
    let relay = ob.spawn_relay(&[("OUTBOX_RELAY__POSTGRES__URL", url.as_str())]);
    let msgs = consume(std::slice::from_ref(&topic), 1, Duration::from_secs(30), Duration::ZERO);
    assert_eq!(msgs.len(), 1);
    ob.wait_drained(Duration::from_secs(10)).await;
    drop(relay);

    pg().await.batch_execute(&format!("REVOKE DELETE ON {} FROM relay_least_priv", ob.qualified())).await.unwrap();
    let o = relay_cmd(&ob.table, &[("OUTBOX_RELAY__POSTGRES__URL", url.as_str())]).arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("lacks DELETE") && out.contains("GRANT SELECT, UPDATE, DELETE"), "{out}");
}
