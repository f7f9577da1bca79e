//! Exactly-once mode on the real broker: a crash at every step of the batch
//! protocol, and zombie relays, must leave a read_committed consumer with every
//! committed event exactly once, in per-key order.

mod common;

use std::time::Duration;

use common::*;

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
    a.signal("-CONT");
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

    // A decisions topic with more than one partition cannot order the
    // decisions, and one with cleanup.policy=delete expires them: check names
    // both, and the relay refuses to start at once (exit 64) on either.
    for (bad, partitions, why) in [
        (ob.topic("decisions2", 2).await, 2, "2 partitions (must be 1)"),
        (ob.topic("decisions_delete", 1).await, 1, "cleanup.policy=delete"),
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

#[tokio::test(flavor = "multi_thread")]
async fn the_decisions_topic_is_created_compacted_and_is_never_recreated_under_prepared_batches() {
    let ob = Outbox::new("eos_decisions").await;
    let topic = ob.topic("events", 1).await;
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
    // The decisions topic disappears while a batch is prepared (deleted by
    // mistake, or relay.commits_topic changed): its decision may be lost, so the
    // relay must not start over with a new, empty topic.
    delete_topic(&decisions).await;
    let out = relay_cmd(&ob.table, &[EOS, BATCH, d]).arg("run").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("does not exist, but prepared exactly-once batches of this table do"), "{err}");
    assert_eq!(prepared(&ob).await.len(), 1, "nothing was resolved without its decision");
    // Clean up: the batch never committed in Kafka (it crashed before).
    for gid in prepared(&ob).await {
        pg().await.batch_execute(&format!("ROLLBACK PREPARED '{gid}'")).await.unwrap();
    }
}
