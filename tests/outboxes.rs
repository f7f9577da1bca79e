//! Several outboxes in one process (`[[outboxes]]`): tables in two schemas of
//! one database and one in a second database, each with its own settings, and
//! a fault in one that never stalls the others. Against the real Postgres and
//! Kafka of `scripts/infra`.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use outbox_relay_support::*;

/// The second database (created once; its tables are unique per test).
async fn second_database() -> String {
    let db = pg().await;
    let exists: bool = db
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'outbox_second')", &[])
        .await
        .unwrap()
        .get(0);
    if !exists {
        // Two tests may race to create it: one wins, the other's error is fine.
        let _ = db.batch_execute("CREATE DATABASE outbox_second").await;
    }
    let url = pg_url();
    let (base, _) = url.rsplit_once('/').expect("a database in the URL");
    format!("{base}/outbox_second")
}

/// `outbox-relay` with `toml` as its config and no `outbox.table` of its own.
fn relay_with(toml: &str, extra: &[(&str, &str)]) -> Command {
    let path = std::env::temp_dir().join(format!("outboxes-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, toml).expect("write config");
    let mut cmd = relay_cmd("unused", extra);
    cmd.env_remove("OUTBOX_RELAY__OUTBOX__TABLE").arg("--config").arg(path);
    cmd
}

fn must(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run outbox-relay");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Writes `n` events over 10 keys (`<tag>-0`…) into `table` at `url`;
/// returns id → (key, n).
async fn write(url: &str, table: &str, topic: &str, n: i64, tag: &str) -> HashMap<String, (String, i64)> {
    pg_at(url)
        .await
        .query(
            &format!(
                "INSERT INTO {table} (topic, key, payload)
                 SELECT $1, $3 || '-' || (i % 10), jsonb_build_object('n', i) FROM generate_series(1, $2::int8) i
                 RETURNING id::text, key, (payload->>'n')::int8"
            ),
            &[&topic, &n, &tag],
        )
        .await
        .unwrap_or_else(|e| panic!("insert into {table}: {e}"))
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Every written event arrived at least once, and each key's in order.
fn assert_delivered(topic: &str, written: &HashMap<String, (String, i64)>) {
    let msgs = consume(&[topic.to_string()], written.len(), Duration::from_secs(60), Duration::from_millis(500));
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for m in &msgs {
        let id = m.event_id();
        let (key, n) = written.get(&id).unwrap_or_else(|| panic!("{topic}: unknown event {id}"));
        if seen.insert(id.clone()) {
            let prev = last.insert(key.clone(), *n).unwrap_or(0);
            assert!(*n > prev, "{topic}: key {key} out of order ({n} after {prev})");
        }
    }
    assert_eq!(seen.len(), written.len(), "{topic}: every event arrived");
}

async fn count(url: &str, table: &str, filter: &str) -> i64 {
    pg_at(url).await.query_one(&format!("SELECT count(*) FROM {table} WHERE {filter}"), &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn outboxes_in_two_schemas_and_a_second_database_relay_from_one_process_with_their_own_settings() {
    let ob = Outbox::new("multiob").await; // the infra locks, a topic namespace
    let db = pg().await;
    let (s1, s2) = (format!("{}_billing", ob.table), format!("{}_shipping", ob.table));
    // Its sessions carry their own application_name, to be counted.
    let app = format!("multi-{}", ob.table);
    let other_url = format!("{}?application_name={app}", second_database().await);
    let other_table = format!("public.{}_other", ob.table);
    let (t1, t2) = (format!("{s1}.outbox"), format!("{s2}.outbox"));
    let topics = [ob.topic("billing", 3).await, ob.topic("shipping", 3).await, ob.topic("other", 3).await];
    let port = free_port();
    let toml = format!(
        "[[outboxes]]\ntable = \"{t1}\"\non_publish = \"delete\"\n
         [[outboxes]]\ntable = \"{t2}\"\non_publish = \"mark\"\nbatch_size = 7\n
         [[outboxes]]\ntable = \"{other_table}\"\npostgres_url = \"{other_url}\"\n"
    );
    // `migrate` creates every configured table (and the schemas).
    let migrated = must(relay_with(&toml, &[]).arg("migrate"));
    assert!(migrated.contains(&t1) && migrated.contains(&t2) && migrated.contains(&other_table), "{migrated}");
    let main = pg_url();
    let written = [
        write(&main, &t1, &topics[0], 300, "b").await,
        write(&main, &t2, &topics[1], 300, "s").await,
        write(&other_url, &other_table, &topics[2], 300, "o").await,
    ];
    let listen = format!("127.0.0.1:{port}");
    let main_url = format!("{}?application_name={app}", pg_url());
    let mut cmd =
        relay_with(&toml, &[("OUTBOX_RELAY__HTTP__LISTEN", &listen), ("OUTBOX_RELAY__POSTGRES__URL", &main_url)]);
    cmd.arg("run");
    let relay = RelayProcess::spawn(cmd, Stderr::Keep);
    for (topic, w) in topics.iter().zip(&written) {
        assert_delivered(topic, w);
    }
    // Each outbox's own settings: deleted in billing, marked in shipping.
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&main, &t1, "true").await > 0 || count(&main, &t2, "published_at IS NULL").await > 0 {
        assert!(Instant::now() < deadline, "not finished: {}", relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&main, &t2, "published_at IS NOT NULL").await, 300, "shipping keeps its rows (mark)");
    assert_eq!(count(&other_url, &other_table, "published_at IS NOT NULL").await, 300);
    // Metrics carry the outbox; /readyz speaks for all of them.
    let (_, page) = http_get(port, "/metrics").expect("metrics");
    for t in [&t1, &t2, &other_table] {
        let series = format!("outbox_relay_events_published_total{{outbox=\"{t}\"");
        assert!(page.contains(&series), "no {series} in:\n{page}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(port, "/readyz").map(|(c, _)| c) != Some(200) {
        assert!(Instant::now() < deadline, "not ready: {:?}", http_get(port, "/readyz"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Postgres connections of the process: per outbox, the pool (at most
    // postgres.pool_size, 4), one LISTEN session and one for the sweep.
    let sessions = |filter: &'static str| {
        let (db, app) = (&db, &app);
        async move {
            let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1{filter}");
            db.query_one(&sql, &[app]).await.unwrap().get::<_, i64>(0)
        }
    };
    let relay_sessions = sessions("").await;
    let other_sessions = sessions(" AND datname = 'outbox_second'").await;
    eprintln!("relay sessions: {relay_sessions} on the server, {other_sessions} in the second database");
    assert!(relay_sessions <= 3 * 6, "at most 3 × (pool 4 + LISTEN + sweep) sessions: {relay_sessions}");
    // status and check speak for every outbox; --outbox picks one.
    let out = relay_with(&toml, &[]).args(["status", "--json"]).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    let all: Vec<serde_json::Value> = serde_json::from_str(&status).expect("a JSON array");
    assert_eq!(all.len(), 3, "{status}");
    let checked = must(relay_with(&toml, &[]).arg("check"));
    assert_eq!(checked.matches("== outbox").count(), 3, "{checked}");
    let one = must(relay_with(&toml, &[]).args(["status", "--outbox", &t2]));
    assert!(one.contains(&t2) && !one.contains(&t1), "{one}");
    let out = relay_with(&toml, &[]).args(["replay", "--parked"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pick one with --outbox"), "{err}");
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    for s in [&s1, &s2] {
        db.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE")).await.ok();
    }
}

/// One outbox's table is missing, then another's is locked: the other outbox
/// relays all along, and the missing one starts once its table exists.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_or_locked_outbox_never_stalls_the_others() {
    let healthy = Outbox::new("multiok").await;
    let missing = format!("public.{}_later", healthy.table);
    let topic = healthy.topic("events", 3).await;
    let toml = format!("[[outboxes]]\ntable = \"{}\"\n[[outboxes]]\ntable = \"{missing}\"\n", healthy.qualified());
    let mut cmd = relay_with(&toml, &[]);
    cmd.arg("run");
    let relay = RelayProcess::spawn(cmd, Stderr::Keep);
    let main = pg_url();
    let first = write(&main, &healthy.qualified(), &topic, 200, "first").await;
    assert_delivered(&topic, &first);
    assert!(relay.log().contains("cannot start"), "the missing outbox is reported: {}", relay.log());
    // The missing table appears: its relay starts by itself (back-off ≤ 60 s).
    must(relay_cmd(&missing, &[]).arg("migrate"));
    let later = write(&main, &missing, &topic, 100, "later").await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while count(&main, &missing, "published_at IS NULL").await > 0 {
        assert!(Instant::now() < deadline, "the late outbox never started: {}", relay.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A lock held on the late outbox's table: the healthy one goes on.
    let holder = pg().await;
    holder.batch_execute(&format!("BEGIN; LOCK TABLE {missing} IN ACCESS EXCLUSIVE MODE")).await.unwrap();
    let started = Instant::now();
    let more = write(&main, &healthy.qualified(), &topic, 100, "more").await;
    let mut all = first.clone();
    all.extend(later);
    all.extend(more);
    let deadline = Instant::now() + Duration::from_secs(10);
    while healthy.count("published_at IS NULL").await > 0 {
        assert!(Instant::now() < deadline, "the healthy outbox stalled behind the other's lock: {}", relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("healthy outbox drained in {:?} while the other's table was locked", started.elapsed());
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert_delivered(&topic, &all);
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

/// librdkafka logs from its own threads, where no span is current: with
/// several outboxes, its lines must still say whose client wrote them (they
/// carried no outbox before).
#[tokio::test(flavor = "multi_thread")]
async fn librdkafka_log_lines_name_their_outbox() {
    let ob = Outbox::new("kafkalog").await;
    let (t1, t2) = (format!("public.{}_a", ob.table), format!("public.{}_b", ob.table));
    let toml = format!("[[outboxes]]\ntable = \"{t1}\"\n[[outboxes]]\ntable = \"{t2}\"\n");
    must(relay_with(&toml, &[]).arg("migrate"));
    // Nothing listens there: librdkafka reports every failed connect.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let mut cmd =
        relay_with(&toml, &[("OUTBOX_RELAY__KAFKA__BROKERS", &nowhere), ("OUTBOX_RELAY__LOG__FORMAT", "json")]);
    cmd.arg("run");
    let relay = RelayProcess::spawn(cmd, Stderr::Keep);
    let kafka_lines = |log: &str| -> Vec<serde_json::Value> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "librdkafka")
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while kafka_lines(&relay.log()).is_empty() {
        assert!(Instant::now() < deadline, "librdkafka never logged a failed connect: {}", relay.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, log) = relay.terminate(Duration::from_secs(30));
    for line in kafka_lines(&log) {
        let outbox = line["spans"]
            .as_array()
            .and_then(|spans| spans.iter().find(|s| s["name"] == "outbox"))
            .and_then(|s| s["table"].as_str())
            .map(str::to_string);
        assert!(
            outbox.as_deref() == Some(t1.as_str()) || outbox.as_deref() == Some(t2.as_str()),
            "a librdkafka line without its outbox: {line}"
        );
    }
}
