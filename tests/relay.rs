//! The relay against the real PostgreSQL and Kafka: delivery, atomicity, order,
//! tombstones, idle wake-up without NOTIFY, delete mode, graceful shutdown,
//! poison rows.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox_relay_support::*;

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_delivers_each_event_exactly_once_with_key_value_and_headers() {
    let ob = Outbox::new("happy").await;
    let topics = [ob.topic("orders", 3).await, ob.topic("payments", 2).await, ob.topic("stock", 1).await];
    let db = pg().await;
    let mut expected: HashMap<String, (String, Option<String>, String, String)> = HashMap::new();
    for i in 0..60 {
        let topic = &topics[i % 3];
        let key = if i % 10 == 9 { None } else { Some(format!("k{}", i % 7)) };
        let payload = format!(r#"{{"amount": {i}, "currency": "EUR", "note": "é ✓"}}"#);
        let trace = format!("00-{:032x}-{:016x}-01", i, i);
        let row = db
            .query_one(
                &format!(
                    "INSERT INTO {} (topic, key, payload, headers) VALUES ($1, $2, $3::text::jsonb, jsonb_build_object('traceparent', $4::text)) RETURNING id::text, payload::text",
                    ob.qualified()
                ),
                &[topic, &key, &payload, &trace],
            )
            .await
            .unwrap();
        expected.insert(row.get(0), (topic.clone(), key, row.get(1), trace));
    }
    let relay = ob.spawn_relay(&[]);
    let msgs = consume(&topics, 60, Duration::from_secs(60), Duration::from_secs(2));
    assert_eq!(msgs.len(), 60, "no crash, so no duplicate");
    let mut seen = HashSet::new();
    for m in &msgs {
        let id = m.event_id();
        assert!(seen.insert(id.clone()), "duplicate {id}");
        let (topic, key, payload, trace) = expected.get(&id).unwrap_or_else(|| panic!("unexpected event {id}"));
        assert_eq!(&m.topic, topic);
        assert_eq!(&m.key, key);
        assert_eq!(m.payload.as_deref(), Some(payload.as_bytes()), "value is the payload as stored");
        assert_eq!(m.headers.get("traceparent"), Some(&Some(trace.clone())));
        assert_eq!(m.headers.get("outbox_relay_id"), Some(&Some(ob.table.clone())), "the relay that sent it");
        assert_eq!(m.headers.len(), 3, "event_id, outbox_relay_id and the row's headers: {:?}", m.headers);
    }
    ob.wait_drained(Duration::from_secs(10)).await;
    assert_eq!(ob.count("published_at IS NOT NULL").await, 60, "mark mode keeps rows, marked");
    let (code, stderr) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "SIGTERM exits 0: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rolled_back_transaction_emits_nothing() {
    let ob = Outbox::new("rollback").await;
    let topic = ob.topic("orders", 1).await;
    let mut db = pg().await;
    db.batch_execute("CREATE TABLE IF NOT EXISTS test_orders (id bigserial primary key, total int)").await.unwrap();
    let relay = ob.spawn_relay(&[]);
    {
        let tx = db.transaction().await.unwrap();
        tx.execute("INSERT INTO test_orders (total) VALUES (100)", &[]).await.unwrap();
        tx.execute(
            &format!(
                "INSERT INTO {} (topic, key, payload) VALUES ($1, 'order-1', '{{\"rolled\":\"back\"}}')",
                ob.qualified()
            ),
            &[&topic],
        )
        .await
        .unwrap();
        tx.rollback().await.unwrap();
    }
    // A committed marker afterwards: once it arrives, the relay has looked past
    // where the rolled-back row would have been.
    let tx = db.transaction().await.unwrap();
    tx.execute(
        &format!(
            "INSERT INTO {} (topic, key, payload) VALUES ($1, 'order-2', '{{\"committed\":true}}')",
            ob.qualified()
        ),
        &[&topic],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let msgs = consume(std::slice::from_ref(&topic), 1, Duration::from_secs(60), Duration::from_secs(3));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].key.as_deref(), Some("order-2"));
    assert_eq!(ob.count("true").await, 1, "the rolled-back row never existed");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn per_key_order_holds_for_5k_events_over_50_keys() {
    let ob = Outbox::new("order").await;
    let topic = ob.topic("events", 4).await;
    let db = pg().await;
    // Several transactions, interleaving keys, as an application would.
    for chunk in 0..10 {
        db.execute(
            &format!(
                "INSERT INTO {} (topic, key, payload)
                 SELECT $1, 'key-' || (i % 50), jsonb_build_object('i', i)
                 FROM generate_series($2::int, $2::int + 499) AS i",
                ob.qualified()
            ),
            &[&topic, &(chunk * 500)],
        )
        .await
        .unwrap();
    }
    let relay = ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__BATCH_SIZE", "200")]);
    let msgs = consume(std::slice::from_ref(&topic), 5000, Duration::from_secs(120), Duration::from_secs(2));
    assert_eq!(msgs.len(), 5000);
    let seq_of: HashMap<String, i64> = db
        .query(&format!("SELECT id::text, seq FROM {}", ob.qualified()), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(order_violations(&msgs, &seq_of), 0);
    // and the check itself can fail: reversing one key's messages is caught
    let mut shuffled = msgs.clone();
    let idx: Vec<usize> = (0..shuffled.len()).filter(|&i| shuffled[i].key.as_deref() == Some("key-7")).collect();
    let (a, b) = (idx[0], idx[idx.len() - 1]);
    let (oa, ob_) = (shuffled[a].offset, shuffled[b].offset);
    shuffled[a].offset = ob_;
    shuffled[b].offset = oa;
    assert!(order_violations(&shuffled, &seq_of) > 0, "order check must detect a swap");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn null_payload_arrives_as_tombstone() {
    let ob = Outbox::new("tomb").await;
    let topic = ob.topic("compacted", 1).await;
    let db = pg().await;
    db.execute(
        &format!(
            "INSERT INTO {} (topic, key, payload) VALUES ($1, 'user-1', '{{\"v\":1}}'), ($1, 'user-1', NULL)",
            ob.qualified()
        ),
        &[&topic],
    )
    .await
    .unwrap();
    let relay = ob.spawn_relay(&[]);
    let msgs = consume(std::slice::from_ref(&topic), 2, Duration::from_secs(60), Duration::from_secs(1));
    assert_eq!(msgs.len(), 2);
    let mut msgs = msgs;
    msgs.sort_by_key(|m| m.offset);
    assert_eq!(msgs[0].payload.as_deref(), Some(&br#"{"v": 1}"#[..]));
    assert_eq!(msgs[1].payload, None, "NULL payload is a null-value message");
    assert_eq!(msgs[1].key.as_deref(), Some("user-1"));
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_relay_finds_a_new_event_long_before_the_poll_interval_without_notify() {
    let ob = Outbox::new("wake").await;
    let topic = ob.topic("t", 1).await;
    let mut relay = ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__POLL_INTERVAL", "10s")]);
    // Let it start and find nothing for a while: its wait grows with the idle
    // time (an eighth of it), so after 3 s it looks about every 0.4 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.assert_running();
    let db = pg().await;
    let inserted = Instant::now();
    db.execute(&format!("INSERT INTO {} (topic, payload) VALUES ($1, '{{}}')", ob.qualified()), &[&topic])
        .await
        .unwrap();
    let msgs = consume(std::slice::from_ref(&topic), 1, Duration::from_secs(30), Duration::ZERO);
    let took = inserted.elapsed();
    assert_eq!(msgs.len(), 1);
    // Polling every poll_interval would take up to 10 s; nothing notifies.
    assert!(took < Duration::from_secs(4), "event took {took:?}: the idle wait did not adapt");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_mode_removes_published_rows() {
    let ob = Outbox::new("delete").await;
    let topic = ob.topic("t", 2).await;
    let db = pg().await;
    db.execute(
        &format!(
            "INSERT INTO {} (topic, key, payload) SELECT $1, 'k' || i % 5, '{{}}' FROM generate_series(1, 300) i",
            ob.qualified()
        ),
        &[&topic],
    )
    .await
    .unwrap();
    let relay = ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__ON_PUBLISH", "delete")]);
    let msgs = consume(std::slice::from_ref(&topic), 300, Duration::from_secs(60), Duration::from_secs(1));
    assert_eq!(msgs.len(), 300);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ob.count("true").await > 0 {
        assert!(Instant::now() < deadline, "rows not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_rows_are_parked_with_reason_and_the_rest_flows() {
    let ob = Outbox::new("poison").await;
    let topic = ob.topic("t", 1).await;
    let db = pg().await;
    let t = ob.qualified();
    // malformed headers (parked at once), a payload over message.max.bytes
    // (parked after max_attempts), and good events around them
    db.batch_execute(&format!(
        "INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', 'a', '{{\"n\":1}}');
         INSERT INTO {t} (topic, key, payload, headers) VALUES ('{topic}', 'b', '{{}}', '{{\"x\": 1}}');
         INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', 'c', jsonb_build_object('big', repeat('x', 2000000)));
         INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', 'd', '{{\"n\":2}}');"
    ))
    .await
    .unwrap();
    let relay =
        ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "3"), ("OUTBOX_RELAY__RELAY__RETRY_BACKOFF", "100ms")]);
    let msgs = consume(std::slice::from_ref(&topic), 2, Duration::from_secs(60), Duration::from_secs(2));
    let keys: HashSet<_> = msgs.iter().filter_map(|m| m.key.clone()).collect();
    assert_eq!(keys, HashSet::from(["a".to_string(), "d".to_string()]));
    ob.wait_drained(Duration::from_secs(30)).await;
    let parked = db
        .query(&format!("SELECT key, attempts, last_error FROM {t} WHERE parked_at IS NOT NULL ORDER BY key"), &[])
        .await
        .unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    let (k0, a0, e0): (String, i32, String) = (parked[0].get(0), parked[0].get(1), parked[0].get(2));
    assert_eq!(k0, "b");
    assert_eq!(a0, 1, "malformed rows are parked at once");
    assert!(e0.contains("malformed headers"), "{e0}");
    let (k1, a1, e1): (String, i32, String) = (parked[1].get(0), parked[1].get(1), parked[1].get(2));
    assert_eq!(k1, "c");
    assert_eq!(a1, 3, "parked after relay.max_attempts");
    assert!(e1.to_lowercase().contains("size") || e1.to_lowercase().contains("large"), "{e1}");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_topic_without_auto_creation_and_invalid_topic_names_are_parked() {
    let ob = Outbox::new("badtopic").await;
    let good = ob.topic("good", 1).await;
    let t = ob.qualified();
    let missing = format!("{}.never-created", ob.table);
    pg().await
        .execute(
            &format!(
                "INSERT INTO {t} (topic, key, payload) VALUES
                   ($1, 'a', '{{}}'), ('bad topic name!', 'b', '{{}}'), ($2, 'c', '{{}}'), ($1, 'd', '{{}}')"
            ),
            &[&good, &missing],
        )
        .await
        .unwrap();
    let toml = "[kafka.properties]\n\"allow.auto.create.topics\" = \"false\"\n\"topic.metadata.propagation.max.ms\" = \"2000\"\n";
    let relay = ob.spawn_relay_with(
        &[("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "2"), ("OUTBOX_RELAY__RELAY__RETRY_BACKOFF", "200ms")],
        Some(toml),
    );
    let msgs = consume(std::slice::from_ref(&good), 2, Duration::from_secs(60), Duration::from_secs(1));
    assert_eq!(msgs.len(), 2, "good events flow past the bad ones");
    ob.wait_drained(Duration::from_secs(60)).await;
    let parked = pg()
        .await
        .query(&format!("SELECT key, attempts, last_error FROM {t} WHERE parked_at IS NOT NULL ORDER BY key"), &[])
        .await
        .unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    for r in &parked {
        let (key, attempts, err): (String, i32, String) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(attempts, 2, "{key}: parked after max_attempts");
        assert!(err.contains("Unknown topic") || err.contains("Invalid topic"), "{key}: {err}");
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retrying_event_holds_back_its_key_but_not_other_keys() {
    let ob = Outbox::new("retrykey").await;
    let topic = ob.topic("t", 1).await;
    let t = ob.qualified();
    // K: poison first, then a good event; L: good events.
    pg().await
        .batch_execute(&format!(
            "INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', 'K', jsonb_build_object('big', repeat('x', 2000000)));
             INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', 'K', '{{\"after\":true}}');
             INSERT INTO {t} (topic, key, payload) SELECT '{topic}', 'L', jsonb_build_object('i', i) FROM generate_series(1, 5) i;"
        ))
        .await
        .unwrap();
    let relay =
        ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "4"), ("OUTBOX_RELAY__RELAY__RETRY_BACKOFF", "500ms")]);
    // L flows at once while K's head is being retried (0.5 + 1 + 2 s of back-off)
    let first = consume(std::slice::from_ref(&topic), 5, Duration::from_secs(30), Duration::ZERO);
    assert!(first.iter().take(5).all(|m| m.key.as_deref() == Some("L")), "L is not held back: {first:?}");
    ob.wait_drained(Duration::from_secs(60)).await;
    let row = pg()
        .await
        .query_one(
            &format!(
                "SELECT (SELECT parked_at FROM {t} WHERE key = 'K' AND parked_at IS NOT NULL)
                      < (SELECT published_at FROM {t} WHERE key = 'K' AND published_at IS NOT NULL),
                        (SELECT attempts FROM {t} WHERE key = 'K' AND parked_at IS NOT NULL)"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<bool>>(0), Some(true), "K's second event waited until its head was parked");
    assert_eq!(row.get::<_, i32>(1), 4);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn relay_recovers_when_claims_fail_for_a_while() {
    let ob = Outbox::new("recover").await;
    let topic = ob.topic("t", 1).await;
    let t = ob.qualified();
    let mut relay = ob
        .spawn_relay(&[("OUTBOX_RELAY__RELAY__MAX_BACKOFF", "500ms"), ("OUTBOX_RELAY__RELAY__POLL_INTERVAL", "100ms")]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let db = pg().await;
    // An operator renames a column by mistake: every claim fails inside its transaction…
    db.batch_execute(&format!("ALTER TABLE {t} RENAME COLUMN retry_at TO retry_at_oops")).await.unwrap();
    db.execute(&format!("INSERT INTO {t} (topic, payload) VALUES ($1, '{{}}')"), &[&topic]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.assert_running();
    // …and fixes it. The relay must not be stuck on a poisoned pooled connection.
    db.batch_execute(&format!("ALTER TABLE {t} RENAME COLUMN retry_at_oops TO retry_at")).await.unwrap();
    let msgs = consume(std::slice::from_ref(&topic), 1, Duration::from_secs(30), Duration::ZERO);
    assert_eq!(msgs.len(), 1);
    drop(relay);
}

/// 0.2 handed the keys held by the batch before on to every next batch (the
/// set only ever grew while the pipeline stayed busy): an event rejected at
/// send whose key was still "held" was skipped instead of retried when its
/// retry came, so it never reached `max_attempts`, while the back-off climbed.
#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_event_is_parked_after_its_attempts_and_its_key_flows_on_under_a_steady_backlog() {
    let ob = Outbox::new("heldkey").await;
    let topic = ob.topic("events", 1).await;
    let t = ob.qualified();
    pg().await
        .batch_execute(&format!(
            "INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', 'K', jsonb_build_object('big', repeat('x', 2000000)));
             INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', 'K', jsonb_build_object('n', 'next'));"
        ))
        .await
        .unwrap();
    let relay = ob.spawn_relay(&[
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "20"),
        ("OUTBOX_RELAY__RELAY__RETRY_BACKOFF", "200ms"),
        ("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "3"),
    ]);
    // 5,000 rows of other keys arriving steadily keep the pipeline busy.
    let writers = Writers::start(WriterSpec { rate: 500, keys: 50, ..WriterSpec::small(&t, &topic) });
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(30);
    loop {
        let parked = ob.count("key = 'K' AND parked_at IS NOT NULL").await;
        let next = ob.count("key = 'K' AND payload->>'n' = 'next' AND published_at IS NOT NULL").await;
        if parked == 1 && next == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "after 30 s: big parked {parked}, next published {next}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("big parked and next published after {:.1} s", started.elapsed().as_secs_f64());
    assert!(writers.finish().await > 0, "other keys kept arriving meanwhile");
    let attempts: i32 = pg()
        .await
        .query_one(&format!("SELECT attempts FROM {t} WHERE parked_at IS NOT NULL"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 3);
    drop(relay);
}

/// A relay keeping up with a steady trickle (one event per transaction every
/// 5 ms) claims at most once per `relay.linger` while its batches are not
/// full, in both delivery modes: fewer, fuller batches, so less database work
/// per event. (Without it, it claimed again as soon as a batch was sent: a
/// claim, a mark and a commit for every event or two.)
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_keeping_up_with_a_trickle_claims_at_most_once_per_linger() {
    for delivery in ["at-least-once", "exactly-once"] {
        let ob = Outbox::new("linger").await;
        let topic = ob.topic("t", 2).await;
        let db = pg().await;
        let relay = ob.spawn_relay(&[
            ("OUTBOX_RELAY__RELAY__LINGER", "100ms"),
            ("OUTBOX_RELAY__RELAY__DELIVERY", delivery),
            ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "500"),
        ]);
        ob.wait_drained(Duration::from_secs(30)).await;
        let before = claim_stats(&db, &ob.table).await.1;
        let insert = format!("INSERT INTO {} (topic, key, payload) VALUES ($1, $2, '{{}}')", ob.qualified());
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < Duration::from_secs(4) {
            db.execute(&insert, &[&topic, &format!("k{}", n % 7)]).await.unwrap();
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let msgs = consume(std::slice::from_ref(&topic), n, Duration::from_secs(60), Duration::from_secs(1));
        let calls = claim_stats(&db, &ob.table).await.1 - before;
        let (code, log) = relay.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{log}");
        assert_eq!(msgs.len(), n, "{delivery}: every event once");
        eprintln!("{delivery}: {n} events over 4 s, {calls} claims");
        // 4 s at one claim per 100 ms is 40, plus the idle looks' claims at the end.
        assert!(calls <= 60, "{delivery}: {calls} claims for {n} events in 4 s: the relay did not linger");
    }
}
