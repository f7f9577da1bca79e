//! The command line: bad input gets one clear line and a distinct exit code,
//! never a panic; secrets never appear in output.

use std::process::Output;

use outbox_relay_support::*;

fn run(args: &[&str], env: &[(&str, &str)], clear_infra: bool) -> Output {
    let mut cmd = relay_cmd("outbox", env);
    if clear_infra {
        cmd.env_remove("OUTBOX_RELAY__POSTGRES__URL").env_remove("OUTBOX_RELAY__KAFKA__BROKERS");
    }
    cmd.args(args).output().expect("run outbox-relay")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_one_clean_line(o: &Output) {
    let err = stderr(o);
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("outbox-relay: error: "), "{err}");
}

#[test]
fn invalid_setting_exits_64_naming_the_key() {
    let o = run(&["check"], &[("OUTBOX_RELAY__RELAY__ON_PUBLISH", "archive")], false);
    assert_eq!(o.status.code(), Some(64));
    assert_one_clean_line(&o);
    let err = stderr(&o);
    assert!(err.contains("on_publish") && err.contains("mark") && err.contains("delete"), "{err}");
}

#[test]
fn a_misspelled_failpoint_is_an_error_not_a_crash_point_that_never_fires() {
    let o = run(&["run"], &[("OUTBOX_RELAY_FAILPOINTS", "after-clam=crash")], false);
    assert_eq!(o.status.code(), Some(64));
    assert_one_clean_line(&o);
    let err = stderr(&o);
    assert!(err.contains("OUTBOX_RELAY_FAILPOINTS") && err.contains("after-claim"), "{err}");
}

#[test]
fn unknown_key_is_an_error_not_ignored() {
    let o = run(&["run"], &[("OUTBOX_RELAY__RELAY__BATCHSIZE", "10")], false);
    assert_eq!(o.status.code(), Some(64));
    assert_one_clean_line(&o);
    assert!(stderr(&o).contains("batchsize"), "{}", stderr(&o));
}

#[test]
fn missing_postgres_url_says_how_to_set_it() {
    let o = run(&["run"], &[], true);
    assert_eq!(o.status.code(), Some(64));
    assert_one_clean_line(&o);
    assert!(stderr(&o).contains("OUTBOX_RELAY__POSTGRES__URL"), "{}", stderr(&o));
}

#[test]
fn missing_config_file_is_reported() {
    let o = run(&["--config", "/nonexistent/relay.toml", "run"], &[], false);
    assert_eq!(o.status.code(), Some(64));
    assert_one_clean_line(&o);
    assert!(stderr(&o).contains("/nonexistent/relay.toml"));
}

#[test]
fn bad_arguments_exit_64() {
    let o = run(&["frobnicate"], &[], false);
    assert_eq!(o.status.code(), Some(64));
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn unreachable_postgres_exits_69_without_leaking_the_password() {
    let o = run(
        &["run"],
        &[
            ("OUTBOX_RELAY__POSTGRES__URL", "postgres://relay:hunter2-very-secret@127.0.0.1:1/app"),
            ("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT", "1s"),
            ("OUTBOX_RELAY__POSTGRES__CONNECT_TIMEOUT", "1s"),
        ],
        false,
    );
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    let all = format!("{}{}", stderr(&o), String::from_utf8_lossy(&o.stdout));
    assert!(!all.contains("hunter2"), "password leaked: {all}");
    assert!(all.contains("127.0.0.1:1"), "{all}");
    assert!(!all.contains("panicked"), "{all}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_schema_exits_65_naming_the_migration() {
    let _ = pg().await; // fail loudly if Postgres is not there
    let o = run(&["run"], &[("OUTBOX_RELAY__OUTBOX__TABLE", "no_such_outbox")], false);
    assert_eq!(o.status.code(), Some(65), "{}", stderr(&o));
    assert_one_clean_line(&o);
    let err = stderr(&o);
    assert!(err.contains("0001_create_outbox.sql") && err.contains("outbox-relay migrate"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_on_a_migrated_table_and_lists_problems_otherwise() {
    let ob = Outbox::new("check").await;
    let o = relay_cmd(&ob.table, &[]).arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("postgres reachable") && out.contains("kafka reachable") && out.contains("complete"), "{out}");

    // An interrupted concurrent build leaves an invalid index: named, with the fix.
    let db = pg().await;
    db.batch_execute(&format!("INSERT INTO {t} (topic) VALUES ('same'), ('same')", t = ob.qualified())).await.unwrap();
    let unique = format!("CREATE UNIQUE INDEX CONCURRENTLY {}_bad ON {} (topic)", ob.table, ob.qualified());
    assert!(db.batch_execute(&unique).await.is_err(), "duplicate topics: the build fails");
    let o = relay_cmd(&ob.table, &[]).arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("{}_bad", ob.table)) && out.contains("are invalid"), "{out}");
    assert!(!out.contains("pending key index"), "0004's index is there and valid: {out}");

    pg().await.batch_execute(&format!("ALTER TABLE {} DROP COLUMN parked_at", ob.qualified())).await.unwrap();
    let o = relay_cmd(&ob.table, &[]).arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("PROBLEM") && out.contains("parked_at") && out.contains("0001_create_outbox.sql"), "{out}");

    // a missing table is one problem, not three: nothing else reads it
    pg().await.batch_execute(&format!("DROP TABLE {}", ob.qualified())).await.unwrap();
    let o = relay_cmd(&ob.table, &[]).arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_eq!(out.matches("PROBLEM").count(), 1, "{out}");
    assert!(out.contains("does not exist") && !out.contains("warning"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_is_idempotent_and_records_the_version() {
    let ob = Outbox::new("migrate").await; // applied once here
    let o = relay_cmd(&ob.table, &[]).arg("migrate").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("up to date"));
    let n: i64 = pg()
        .await
        .query_one("SELECT count(*) FROM public.outbox_relay_migrations WHERE table_name = $1", &[&ob.table])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, outbox_relay::store::MIGRATIONS.len() as i64, "every bundled migration recorded once");
}

/// An outbox dropped by hand (to start over) is created again by `migrate`,
/// not called up to date from the versions recorded for the old one.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_creates_a_dropped_table_again() {
    let ob = Outbox::new("dropped").await;
    pg().await.batch_execute(&format!("DROP TABLE {}", ob.qualified())).await.unwrap();
    let o = relay_cmd(&ob.table, &[]).arg("migrate").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("up to date"), "the table is gone");
    let exists: bool =
        pg().await.query_one("SELECT to_regclass($1) IS NOT NULL", &[&ob.qualified()]).await.unwrap().get(0);
    assert!(exists, "migrate did not create the dropped table again");
    let o = relay_cmd(&ob.table, &[]).arg("check").output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
}

/// Pods of several services start together on a fresh database: their
/// migrations must not trip over the schema and version table they share.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_migrations_into_a_fresh_schema_all_succeed() {
    let schema = format!("fresh_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let children: Vec<_> = (0..6)
        .map(|i| {
            relay_cmd(&format!("{schema}.outbox_{i}"), &[])
                .arg("migrate")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let n: i64 = pg()
        .await
        .query_one(&format!("SELECT count(DISTINCT table_name) FROM {schema}.outbox_relay_migrations"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 6, "every table's migrations recorded");
    pg().await.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

#[test]
fn migrate_print_renders_the_configured_table_without_a_database() {
    let o = run(&["migrate", "--print"], &[("OUTBOX_RELAY__OUTBOX__TABLE", "billing.events")], true);
    assert!(o.status.success(), "{}", stderr(&o));
    let sql = String::from_utf8_lossy(&o.stdout);
    assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"billing\".\"events\""), "{sql}");
    assert!(sql.contains("pg_notify('billing.events'"));
}

#[test]
fn every_command_has_help_with_examples() {
    for cmd in [&["--help"][..], &["run", "--help"], &["migrate", "--help"], &["check", "--help"]] {
        let o = run(cmd, &[], true);
        assert!(o.status.success(), "{cmd:?}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("Examples:"), "{cmd:?}: {out}");
    }
}

/// A migration role's environment has the database and nothing of Kafka:
/// `migrate` and `status` need only Postgres, `run` still names the missing key.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_only_commands_run_without_kafka_settings() {
    let _ = pg().await;
    let table = format!("pg_only_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let env = [("OUTBOX_RELAY__OUTBOX__TABLE", table.as_str())];
    let mut cmd = relay_cmd(&table, &env);
    let o = cmd.env_remove("OUTBOX_RELAY__KAFKA__BROKERS").arg("migrate").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut cmd = relay_cmd(&table, &env);
    let o = cmd.env_remove("OUTBOX_RELAY__KAFKA__BROKERS").arg("status").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut cmd = relay_cmd(&table, &env);
    let o = cmd.env_remove("OUTBOX_RELAY__KAFKA__BROKERS").arg("run").output().unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert_one_clean_line(&o);
    assert!(stderr(&o).contains("kafka.brokers"), "{}", stderr(&o));
    pg().await.batch_execute(&format!("DROP TABLE public.{table}")).await.unwrap();
}
