//! Exactly-once mode on the real broker: a crash at every step of the batch
//! protocol, and zombie relays, must leave a read_committed consumer with every
//! committed event exactly once, in per-key order.

use std::time::Duration;

use outbox_relay_support::*;

const EOS: (&str, &str) = ("OUTBOX_RELAY__RELAY__DELIVERY", "exactly-once");
const BATCH: (&str, &str) = ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "50");

async fn insert(ob: &Outbox, topic: &str, n: i64, from: i64) {
    pg().await
        .execute(
            &format!(
                "INSERT INTO {} (topic, key, payload)
                 SELECT $1, 'key-' || (i % 10), jsonb_build_object('n', i) FROM generate_series($2::int8, $3::int8) i",
                ob.qualified()
            ),
            &[&topic, &from, &(from + n - 1)],
        )
        .await
        .unwrap();
}

/// Prepared transactions this test's relays left in Postgres (gids are
/// `outbox-relay/<database id>/<schema.table>/<relay.id>/<batch>`).
async fn prepared(ob: &Outbox) -> Vec<String> {
    pg().await
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'outbox-relay/%/' || $1 || '/%' OR gid LIKE 'outbox-relay/' || $1 || '/%'",
            &[&ob.qualified()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every row of the table reached `topic` exactly once, in per-key order.
async fn assert_exactly_once(ob: &Outbox, topic: &str) {
    ob.wait_drained(Duration::from_secs(60)).await;
    assert!(prepared(ob).await.is_empty(), "no batch may stay prepared");
    let d = delivery(ob, &[topic.to_string()], Duration::from_secs(3)).await;
    assert_eq!(
        (d.lost.len(), d.duplicates, d.order_violations, d.unknown),
        (0, 0, 0, 0),
        "lost, duplicates, order violations, unknown messages"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_every_failpoint_loses_and_duplicates_nothing() {
    let ob = Outbox::new("eos_fail").await;
    let topic = ob.topic("events", 3).await;
    // (failpoint, batches left prepared by the crash)
    let points = [
        ("after-claim", 0),
        ("after-kafka-send", 0),
        ("after-prepare", 1),
        ("after-kafka-commit", 1),
        ("after-commit-prepared", 0),
    ];
    let mut from = 0;
    for (point, left_prepared) in points {
        insert(&ob, &topic, 200, from).await;
        from += 200;
        // The second batch crashes: the first one of this run commits normally.
        let spec = format!("{point}=crash@2");
        let mut relay = ob.spawn_relay(&[EOS, BATCH, ("OUTBOX_RELAY_FAILPOINTS", &spec)]);
        let status = relay.wait_exit(Duration::from_secs(60));
        assert!(!status.success(), "{point}: the failpoint must kill the relay: {}", relay.log());
        assert!(relay.log().contains(&format!("failpoint {point}")), "{point} not reached: {}", relay.log());
        let left = prepared(&ob).await;
        assert_eq!(left.len(), left_prepared, "{point}: prepared batches left behind: {left:?}\n{}", relay.log());
        eprintln!("{point}: crashed, {} prepared batch(es) left", left.len());
    }
    // A clean start resolves the last crash's batch, then drains the rest.
    let relay = ob.spawn_relay(&[EOS, BATCH]);
    assert_exactly_once(&ob, &topic).await;
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

/// A relay stops (SIGSTOP) at `point` holding a prepared batch; another relay
/// takes the batch over after `recovery_timeout` and fences it; the first one
/// then resumes and must not publish anything twice.
async fn zombie(point: &str, expect_committed: bool) {
    let ob = Outbox::new("eos_zombie").await;
    let topic = ob.topic("events", 3).await;
    insert(&ob, &topic, 300, 0).await;
    let recovery = ("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT", "2s");
    let spec = format!("{point}=pause@2");
    let id_a = format!("{}-a", ob.table);
    let mut a =
        ob.spawn_relay(&[EOS, BATCH, recovery, ("OUTBOX_RELAY__RELAY__ID", &id_a), ("OUTBOX_RELAY_FAILPOINTS", &spec)]);
    a.wait_stopped(Duration::from_secs(60));
    let held = prepared(&ob).await;
    assert_eq!(held.len(), 1, "the zombie holds one prepared batch: {held:?}\n{}", a.log());

    let id_b = format!("{}-b", ob.table);
    let b = ob.spawn_relay(&[EOS, BATCH, recovery, ("OUTBOX_RELAY__RELAY__ID", &id_b)]);
    ob.wait_drained(Duration::from_secs(60)).await;
    let log_b = b.log();
    assert!(log_b.contains("resolving a stale prepared batch"), "B must take over A's batch: {log_b}");
    assert!(
        log_b.contains(&format!("committed={expect_committed}")),
        "B must decide committed={expect_committed}: {log_b}"
    );

    // The zombie wakes up in the middle of its batch.
    a.signal(libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.assert_running();
    insert(&ob, &topic, 200, 300).await;
    assert_exactly_once(&ob, &topic).await;
    let log_a = a.log();
    eprintln!("zombie log:\n{log_a}");
    let (code, _) = a.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0));
    let (code, _) = b.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_paused_before_its_kafka_commit_is_fenced() {
    zombie("after-prepare", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_paused_after_its_kafka_commit_is_finished_by_another_relay() {
    zombie("after-kafka-commit", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_relays_with_random_sigkills_publish_each_event_once() {
    let ob = Outbox::new("eos_multi").await;
    let topic = ob.topic("events", 4).await;
    let ids: Vec<String> = (0..3).map(|i| format!("{}-{i}", ob.table)).collect();
    let recovery = ("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT", "3s");
    let spawn = |i: usize| ob.spawn_relay(&[EOS, BATCH, recovery, ("OUTBOX_RELAY__RELAY__ID", ids[i].as_str())]);
    let mut relays: Vec<_> = (0..3).map(spawn).collect();
    let mut from = 0;
    for kill in 0..6 {
        insert(&ob, &topic, 300, from).await;
        from += 300;
        tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(0..800))).await;
        let i = kill % 3;
        relays.remove(i).kill9();
        relays.insert(i, spawn(i));
    }
    assert_exactly_once(&ob, &topic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_the_exactly_once_prerequisites() {
    let ob = Outbox::new("eos_check").await;
    let out = relay_cmd(&ob.table, &[EOS]).arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("two-phase commit enabled (max_prepared_transactions = "), "{text}");
    assert!(text.contains("kafka transactions available"), "{text}");
    // The local broker is a single one, which can lose a committed transaction
    // when it stops (docs/exactly-once.md, "Assumptions"): a warning, not a problem.
    assert!(text.contains("warning exactly-once on a cluster of 1 broker(s)"), "{text}");
    // Item 8: the slots for the relays it sees, the standby, the ids a clone shares.
    assert!(text.contains("relays seen: "), "{text}");
    assert!(text.contains("ok      no standby streams from this server"), "{text}");
    assert!(text.contains("exactly-once ids outbox-relay/") && text.contains("physical clone"), "{text}");

    // An event topic with unclean leader election can drop a committed
    // transaction's events: a problem in exactly-once.
    let unclean = format!("{}.unclean", ob.table);
    create_topics_at(
        &brokers(),
        std::slice::from_ref(&unclean),
        &TopicSpec::new(1).with("unclean.leader.election.enable", "true"),
    )
    .await;
    insert(&ob, &unclean, 1, 0).await;
    let out = relay_cmd(&ob.table, &[EOS]).arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&format!("PROBLEM topic {unclean} has unclean.leader.election.enable=true")), "{text}");

    // A decisions topic with more than one partition cannot order the
    // decisions, and one with cleanup.policy=delete expires them: check names
    // both, and the relay refuses to start at once (exit 64) on either; so is
    // one whose out-of-sync replicas may become leader.
    let unclean_decisions = format!("{}.decisions_unclean", ob.table);
    let spec = TopicSpec::new(1).with("cleanup.policy", "compact").with("unclean.leader.election.enable", "true");
    create_topics_at(&brokers(), std::slice::from_ref(&unclean_decisions), &spec).await;
    for (bad, partitions, why) in [
        (ob.topic("decisions2", 2).await, 2, "2 partitions (must be 1)"),
        (ob.topic("decisions_delete", 1).await, 1, "cleanup.policy=delete"),
        (unclean_decisions, 1, "unclean.leader.election.enable=true"),
    ] {
        let topic = ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", bad.as_str());
        let out = relay_cmd(&ob.table, &[EOS, topic]).arg("check").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{partitions}: {text}");
        assert!(text.contains(&format!("PROBLEM the decisions topic {bad} cannot be trusted")), "{text}");
        assert!(text.contains(why), "{text}");
        let started = std::time::Instant::now();
        let out = relay_cmd(&ob.table, &[EOS, topic]).arg("run").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(err.contains("cannot be trusted") && err.contains(why), "{err}");
        assert!(started.elapsed() < Duration::from_secs(15), "refused at once, no retry loop: {err}");
    }
}

/// The decisions topic disappears while a batch is prepared (deleted by
/// mistake, or relay.commits_topic changed). Its record is gone, and a missing
/// record is no evidence that the batch did not commit: the relay recreates the
/// topic, decides from the event the batch's gid names (not in its topic: the
/// batch crashed before its Kafka commit), and publishes it once.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_decisions_topic_is_recreated_and_the_prepared_batch_decided_from_its_events() {
    let ob = Outbox::new("eos_decisions").await;
    let topic = ob.topic("events", 2).await;
    let decisions = format!("{}.commits", ob.table);
    let d = ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", decisions.as_str());
    insert(&ob, &topic, 20, 0).await;
    // A relay creates the topic itself: 1 partition, compacted, min.insync.replicas set.
    let mut relay = ob.spawn_relay(&[EOS, BATCH, d, ("OUTBOX_RELAY_FAILPOINTS", "after-prepare=crash@1")]);
    relay.wait_exit(Duration::from_secs(60));
    let cfg = kafka_topic_config(&decisions).await;
    assert_eq!(cfg.get("cleanup.policy").map(String::as_str), Some("compact"), "{cfg:?}");
    assert!(cfg.contains_key("min.insync.replicas"), "{cfg:?}");
    assert_eq!(prepared(&ob).await.len(), 1, "the crash left one batch prepared");
    delete_topic(&decisions).await;
    let relay = ob.spawn_relay(&[EOS, BATCH, d]);
    assert_exactly_once(&ob, &topic).await;
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("looking for the batch's event in its topic"), "{log}");
    assert!(log.contains("committed=false"), "decided from the event topic: {log}");
    let cfg = kafka_topic_config(&decisions).await;
    assert_eq!(cfg.get("cleanup.policy").map(String::as_str), Some("compact"), "recreated right: {cfg:?}");
}

/// #21 item 3: one relay runs while the decisions topic is deleted, and another
/// relay's batch, committed in Kafka, is still prepared. The topic must not
/// come back empty through broker auto-create, and the batch must end
/// committed (its events are in their topic), never rolled back and published
/// twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_decisions_topic_deleted_under_a_committed_prepared_batch_never_turns_it_into_a_rollback() {
    let ob = Outbox::new("eos_decgone").await;
    let topic = ob.topic("events", 2).await;
    let decisions = format!("{}.commits", ob.table);
    let d = ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", decisions.as_str());
    let recovery = ("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT", "10s");
    insert(&ob, &topic, 100, 0).await;
    let (id_a, id_b) = (format!("{}-a", ob.table), format!("{}-b", ob.table));
    let mut a = ob.spawn_relay(&[
        EOS,
        BATCH,
        d,
        ("OUTBOX_RELAY__RELAY__ID", &id_a),
        ("OUTBOX_RELAY_FAILPOINTS", "after-kafka-commit=crash@1"),
    ]);
    a.wait_exit(Duration::from_secs(60));
    assert_eq!(prepared(&ob).await.len(), 1, "A's committed batch is left prepared:\n{}", a.log());
    let b = ob.spawn_relay(&[EOS, BATCH, d, recovery, ("OUTBOX_RELAY__RELAY__ID", &id_b)]);
    b.wait_log("exactly-once ready", Duration::from_secs(60));
    delete_topic(&decisions).await;
    insert(&ob, &topic, 100, 100).await;
    assert_exactly_once(&ob, &topic).await;
    let (code, log) = b.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("resolving a stale prepared batch") && log.contains("committed=true"), "{log}");
    let cfg = kafka_topic_config(&decisions).await;
    assert_eq!(cfg.get("cleanup.policy").map(String::as_str), Some("compact"), "recreated by the relay: {cfg:?}");
}

/// The database id part of this test database's transactional ids.
async fn database_id() -> String {
    let row = pg()
        .await
        .query_one("SELECT system_identifier::int8, current_database()::text FROM pg_control_system()", &[])
        .await
        .unwrap();
    outbox_relay::store::database_id(row.get(0), row.get::<_, &str>(1))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_another_role_prepared_is_reported_with_its_fix_and_the_others_are_still_resolved() {
    let ob = Outbox::new("eos_role").await;
    let topic = ob.topic("events", 1).await;
    let decisions = ob.topic("commits", 1).await;
    let (t, relay_role, other_role) = (ob.qualified(), format!("{}_relay", ob.table), format!("{}_other", ob.table));
    let db = pg().await;
    db.batch_execute(&format!(
        "CREATE ROLE {relay_role} LOGIN PASSWORD 'pw'; CREATE ROLE {other_role};
         GRANT USAGE ON SCHEMA public TO {relay_role}, {other_role};
         GRANT SELECT, UPDATE, DELETE ON {t} TO {relay_role};
         GRANT SELECT, UPDATE ON {t} TO {other_role};
         INSERT INTO {t} (topic, key, payload) SELECT '{topic}', 'k' || i, '{{}}' FROM generate_series(1, 50) i"
    ))
    .await
    .unwrap();
    let owner = format!("outbox-relay/{}/{t}/gone-relay", database_id().await);
    let gid_other = format!("{owner}/{:032x}", 1);
    let gid_own = format!("{owner}/{:032x}", 2);
    // The gone relay's history in the decisions topic (it wrote its start
    // marker, and no decision of these batches): evidence they did not commit.
    produce(&decisions, &owner, &format!("{}gone", outbox_relay::sink::START_MARKER)).await;
    // Batches of a relay that is gone: one prepared under another role (before a
    // password rotation, say), one under the relay's own role.
    let as_other = pg().await;
    as_other
        .batch_execute(&format!(
            "SET ROLE {other_role}; BEGIN; UPDATE {t} SET attempts = attempts WHERE key = 'k1';
             PREPARE TRANSACTION '{gid_other}'; RESET ROLE"
        ))
        .await
        .unwrap();
    let relay_url = pg_url().replace("outbox:outbox@", &format!("{relay_role}:pw@"));
    let (as_relay, conn) = tokio_postgres::connect(&relay_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    as_relay
        .batch_execute(&format!(
            "BEGIN; UPDATE {t} SET attempts = attempts WHERE key = 'k2'; PREPARE TRANSACTION '{gid_own}'"
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let settings = [
        ("OUTBOX_RELAY__POSTGRES__URL", relay_url.as_str()),
        ("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT", "1s"),
        ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", decisions.as_str()),
    ];
    let relay = ob.spawn_relay(&settings);
    // Everything but the row the foreign batch locks is published.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ob.count("published_at IS NULL").await > 1 || prepared(&ob).await.contains(&gid_own) {
        assert!(std::time::Instant::now() < deadline, "not resolved/published: {}", relay.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = prepared(&ob).await;
    assert_eq!(left, vec![gid_other.clone()], "the relay's own-role batch was resolved despite the failing one");
    let log = relay.log();
    assert!(
        log.contains(&gid_other) && log.contains(&other_role) && log.contains("ROLLBACK PREPARED"),
        "the failing batch is logged with its gid, its owner and the statement to run: {log}"
    );
    let out = relay_cmd(&ob.table, &settings).arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("PROBLEM") && text.contains(&other_role), "check names the role: {text}");
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "the relay kept running: {log}");
    db.batch_execute(&format!("ROLLBACK PREPARED '{gid_other}'")).await.unwrap();
    db.batch_execute(&format!(
        "REVOKE ALL ON {t} FROM {relay_role}, {other_role};
         REVOKE ALL ON SCHEMA public FROM {relay_role}, {other_role}; DROP ROLE {relay_role}; DROP ROLE {other_role}"
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_switched_to_at_least_once_resolves_the_batch_an_exactly_once_relay_left() {
    let ob = Outbox::new("eos_switch").await;
    let topic = ob.topic("events", 3).await;
    insert(&ob, &topic, 200, 0).await;
    // The exactly-once relay commits a batch in Kafka and dies before Postgres follows.
    let mut eos = ob.spawn_relay(&[EOS, BATCH, ("OUTBOX_RELAY_FAILPOINTS", "after-kafka-commit=crash@2")]);
    eos.wait_exit(Duration::from_secs(60));
    assert_eq!(prepared(&ob).await.len(), 1, "{}", eos.log());
    // The table now runs at-least-once: that relay must finish the batch the
    // way Kafka decided (commit: its events are in Kafka), not leave it holding
    // rows and the xmin horizon forever, nor publish it again.
    let alo = ob.spawn_relay(&[BATCH, ("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT", "2s")]);
    ob.wait_drained(Duration::from_secs(60)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !prepared(&ob).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "still prepared: {}", alo.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = alo.log();
    assert!(log.contains("committed=true"), "resolved as committed: {log}");
    assert_exactly_once(&ob, &topic).await;
    let (code, log) = alo.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn relays_of_two_databases_with_the_same_relay_id_do_not_fence_each_other() {
    let ob = Outbox::new("eos_twodb").await;
    // The same table name and relay.id in a second database, as two services
    // with their own databases (and StatefulSets named alike) on one Kafka.
    let db = pg().await;
    let exists: bool = db
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'outbox_second')", &[])
        .await
        .unwrap()
        .get(0);
    if !exists {
        let _ = db.batch_execute("CREATE DATABASE outbox_second").await; // a parallel run may create it too
    }
    let url = pg_url();
    let url2 = format!("{}/outbox_second", url.rsplit_once('/').expect("database in the URL").0);
    let url2_env = ("OUTBOX_RELAY__POSTGRES__URL", url2.as_str());
    let out = relay_cmd(&ob.table, &[url2_env]).arg("migrate").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (topic1, topic2) = (ob.topic("db1", 2).await, ob.topic("db2", 2).await);
    insert(&ob, &topic1, 300, 0).await;
    let (db2, conn) = tokio_postgres::connect(&url2, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    db2.execute(
        &format!(
            "INSERT INTO {} (topic, key, payload) SELECT $1, 'key-' || (i % 10), jsonb_build_object('n', i) FROM generate_series(0, 299) i",
            ob.qualified()
        ),
        &[&topic2],
    )
    .await
    .unwrap();
    let id = ("OUTBOX_RELAY__RELAY__ID", "outbox-relay-0");
    let r1 = ob.spawn_relay(&[EOS, BATCH, id]);
    let r2 = ob.spawn_relay(&[EOS, BATCH, id, url2_env]);
    ob.wait_drained(Duration::from_secs(60)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = db2
            .query_one(&format!("SELECT count(*) FROM {} WHERE published_at IS NULL", ob.qualified()), &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "db2: {left} pending: {}", r2.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let msgs = consume(std::slice::from_ref(&topic2), 300, Duration::from_secs(60), Duration::from_secs(2));
    assert_eq!(msgs.len(), 300, "db2's events exactly once");
    assert_exactly_once(&ob, &topic1).await;
    let (c1, log1) = r1.terminate(Duration::from_secs(30));
    let (c2, log2) = r2.terminate(Duration::from_secs(30));
    let txn_id = |log: &str| {
        log.lines()
            .find(|l| l.contains("exactly-once ready"))
            .and_then(|l| l.split("transactional_id=").nth(1))
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
    };
    let (id1, id2) = (txn_id(&log1), txn_id(&log2));
    assert!(id1.is_some() && id1 != id2, "transactional ids differ by database: {id1:?} {id2:?}");
    for log in [&log1, &log2] {
        assert!(!log.to_lowercase().contains("fenced"), "no relay was fenced: {log}");
    }
    assert_eq!((c1, c2), (Some(0), Some(0)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_longer_than_the_transaction_timeout_is_split_until_it_fits() {
    let ob = Outbox::new("eos_slow").await;
    let topic = ob.topic("events", 2).await;
    insert(&ob, &topic, 200, 0).await;
    // 60 ms per event after the acks: a batch of 50 takes 3 s, the transaction
    // may take 2 s; the coordinator aborts it. The relay must make progress.
    let relay = ob.spawn_relay_with(
        &[EOS, BATCH, ("OUTBOX_RELAY_FAILPOINTS", "after-kafka-send=delay-per-event:60")],
        Some("[kafka.properties]\n\"transaction.timeout.ms\" = \"2000\"\n"),
    );
    assert_exactly_once(&ob, &topic).await;
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert!(log.contains("claiming smaller batches"), "{log}");
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_exactly_once_relay_with_the_same_relay_id_is_refused() {
    let ob = Outbox::new("eos_twin").await;
    let topic = ob.topic("events", 1).await;
    insert(&ob, &topic, 20, 0).await;
    let id = ("OUTBOX_RELAY__RELAY__ID", "twin");
    let a = ob.spawn_relay(&[EOS, BATCH, id]);
    ob.wait_drained(Duration::from_secs(60)).await;
    // Two relays with one transactional id would fence each other's producers
    // and finish each other's prepared batches.
    let out =
        relay_cmd(&ob.table, &[EOS, id, ("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT", "3s")]).arg("run").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("another live relay") && err.contains("relay.id"), "{err}");
    let (code, log) = a.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "the first relay was not disturbed: {log}");
    assert!(!log.to_lowercase().contains("fenced"), "{log}");
    // Once it stopped, the id is free again.
    let b = ob.spawn_relay(&[EOS, BATCH, id]);
    insert(&ob, &topic, 10, 20).await;
    assert_exactly_once(&ob, &topic).await;
    let (code, log) = b.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

/// 0.2: a relay whose own batch could not be resolved (its role changed) went
/// on claiming and writing decisions under the same key; a fast-compacting
/// decisions topic then kept only the newest, and when the batch was finally
/// resolved as its own role, its decision read "not committed": it was rolled
/// back and published twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_with_an_unresolvable_batch_of_its_own_claims_nothing_until_it_is_resolved() {
    let ob = Outbox::new("eos_ownstuck").await;
    let topic = ob.topic("events", 1).await;
    let decisions = format!("{}.commits", ob.table);
    let spec = TopicSpec::new(1)
        .with("cleanup.policy", "compact")
        .with("segment.ms", "1000")
        .with("min.cleanable.dirty.ratio", "0.01");
    create_topics_at(&brokers(), std::slice::from_ref(&decisions), &spec).await;
    let t = ob.qualified();
    let (r1, r2) = (format!("{}_r1", ob.table), format!("{}_r2", ob.table));
    pg().await
        .batch_execute(&format!(
            "CREATE ROLE {r1} LOGIN PASSWORD 'pw'; CREATE ROLE {r2} LOGIN PASSWORD 'pw';
             GRANT USAGE ON SCHEMA public TO {r1}, {r2};
             GRANT SELECT, UPDATE, DELETE ON {t} TO {r1}, {r2};"
        ))
        .await
        .unwrap();
    let url = |role: &str| pg_url().replace("outbox:outbox@", &format!("{role}:pw@"));
    let (url1, url2) = (url(&r1), url(&r2));
    let id = ("OUTBOX_RELAY__RELAY__ID", "stuck");
    let commits = ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", decisions.as_str());
    insert(&ob, &topic, 20, 0).await;
    // As r1: the batch commits in Kafka, then the relay dies before COMMIT PREPARED.
    let mut first = ob.spawn_relay(&[
        EOS,
        BATCH,
        id,
        commits,
        ("OUTBOX_RELAY__POSTGRES__URL", url1.as_str()),
        ("OUTBOX_RELAY_FAILPOINTS", "after-kafka-commit=crash@1"),
    ]);
    first.wait_exit(Duration::from_secs(60));
    let stuck = prepared(&ob).await;
    assert_eq!(stuck.len(), 1, "the crash left the committed batch prepared");
    // The same relay.id as r2 (a role change): it cannot finish r1's batch.
    let second = ob.spawn_relay(&[EOS, BATCH, id, commits, ("OUTBOX_RELAY__POSTGRES__URL", url2.as_str())]);
    for i in 1..=12 {
        insert(&ob, &topic, 10, 1000 + i * 10).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let (code, log) = second.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains(&stuck[0]) && log.contains("claiming nothing until it is"),
        "the relay says which batch stops it and the fix: {log}"
    );
    assert_eq!(ob.count("published_at IS NOT NULL").await, 0, "nothing new was claimed meanwhile");
    // r1 again: the batch is resolved from its decision record, committed.
    let third = ob.spawn_relay(&[EOS, BATCH, id, commits, ("OUTBOX_RELAY__POSTGRES__URL", url1.as_str())]);
    assert_exactly_once(&ob, &topic).await;
    assert!(prepared(&ob).await.is_empty());
    let (code, log) = third.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}
