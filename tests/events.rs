//! What a row may ask of its message (migration 0005): an explicit partition,
//! a delivery time; and the message timestamp, from the row's `created_at`.
//! Against the real Postgres and Kafka of `scripts/infra`.

use std::time::{Duration, Instant};

use outbox_relay_support::*;

/// A row's `"n"` payload field.
fn n_of(m: &Received) -> String {
    let v: serde_json::Value = serde_json::from_slice(m.payload.as_deref().unwrap_or(b"null")).unwrap();
    v["n"].as_str().map(str::to_string).unwrap_or_else(|| v["n"].to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rows_partition_decides_where_its_event_goes_and_keeps_its_keys_order() {
    let ob = Outbox::new("partition").await;
    let topic = ob.topic("events", 3).await;
    let t = ob.qualified();
    let db = pg().await;
    // Key K names partition 2 for all its 400 events; keys o-* let the key decide.
    db.batch_execute(&format!(
        "INSERT INTO {t} (topic, key, payload, \"partition\")
           SELECT '{topic}', CASE WHEN i % 2 = 0 THEN 'K' ELSE 'o-' || (i % 7) END, jsonb_build_object('n', i),
                  CASE WHEN i % 2 = 0 THEN 2 END
           FROM generate_series(1, 800) i"
    ))
    .await
    .unwrap();
    // Two relays, small batches: K's events are spread over many batches.
    let relays = [
        ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__BATCH_SIZE", "20"), ("OUTBOX_RELAY__RELAY__ID", "a")]),
        ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__BATCH_SIZE", "20"), ("OUTBOX_RELAY__RELAY__ID", "b")]),
    ];
    ob.wait_drained(Duration::from_secs(60)).await;
    let d = delivery(&ob, std::slice::from_ref(&topic), Duration::from_secs(1)).await;
    assert!(d.lost.is_empty(), "lost {:?}", d.lost.len());
    assert_eq!(d.order_violations, 0);
    let k: Vec<&Received> = d.received.iter().filter(|m| m.key.as_deref() == Some("K")).collect();
    assert!(k.len() >= 400);
    assert!(k.iter().all(|m| m.partition == 2), "every K event on partition 2");
    let mut seqs: Vec<i64> = k.iter().map(|m| d.seq_of[&m.event_id()]).collect();
    seqs.dedup();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "K's events in seq order on partition 2");
    // The others went where their key hashes (several partitions).
    let others: std::collections::HashSet<i32> =
        d.received.iter().filter(|m| m.key.as_deref() != Some("K")).map(|m| m.partition).collect();
    assert!(others.len() > 1, "keys without a partition spread: {others:?}");
    for r in relays {
        assert!(r.stop(Duration::from_secs(30)));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_the_topic_lacks_parks_its_event_with_the_reason_and_others_flow() {
    let ob = Outbox::new("badpartition").await;
    let topic = ob.topic("events", 2).await;
    let t = ob.qualified();
    let db = pg().await;
    db.batch_execute(&format!(
        "INSERT INTO {t} (topic, key, payload, \"partition\") VALUES
           ('{topic}', 'x', '{{\"n\": \"nine\"}}', 9),
           ('{topic}', 'y', '{{\"n\": \"negative\"}}', -3);
         INSERT INTO {t} (topic, key, payload) SELECT '{topic}', 'k' || i, jsonb_build_object('n', i)
           FROM generate_series(1, 50) i"
    ))
    .await
    .unwrap();
    let relay =
        ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "2"), ("OUTBOX_RELAY__RELAY__RETRY_BACKOFF", "100ms")]);
    ob.wait_drained(Duration::from_secs(60)).await;
    let errors: Vec<(String, String)> = db
        .query(&format!("SELECT payload->>'n', last_error FROM {t} WHERE parked_at IS NOT NULL ORDER BY seq"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
        .collect();
    assert_eq!(errors.len(), 2, "both bad rows parked: {errors:?}");
    assert_eq!(errors[0].0, "nine");
    assert!(errors[0].1.to_lowercase().contains("partition"), "the broker's reason: {}", errors[0].1);
    assert_eq!(errors[1].0, "negative");
    assert!(errors[1].1.contains("partition: -3 is negative"), "{}", errors[1].1);
    let msgs = consume(std::slice::from_ref(&topic), 50, Duration::from_secs(30), Duration::from_millis(500));
    assert_eq!(msgs.len(), 50, "the other events all went out once");
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_messages_timestamp_is_its_rows_created_at_unless_configured_to_send_time() {
    let ob = Outbox::new("timestamp").await;
    let topic = ob.topic("events", 1).await;
    let t = ob.qualified();
    let db = pg().await;
    let insert = |n: &str| {
        format!(
            "INSERT INTO {t} (topic, key, payload, created_at)
             VALUES ('{topic}', 'k', '{{\"n\": \"{n}\"}}', '2026-06-01 12:00:00.123+00')"
        )
    };
    db.batch_execute(&insert("row-time")).await.unwrap();
    let relay = ob.spawn_relay(&[]);
    ob.wait_drained(Duration::from_secs(30)).await;
    assert!(relay.stop(Duration::from_secs(30)));
    let before_send = chrono_ms_now();
    db.batch_execute(&insert("send-time")).await.unwrap();
    let relay = ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__MESSAGE_TIMESTAMP", "send_time")]);
    ob.wait_drained(Duration::from_secs(30)).await;
    assert!(relay.stop(Duration::from_secs(30)));
    let msgs = consume(std::slice::from_ref(&topic), 2, Duration::from_secs(30), Duration::from_millis(300));
    let ts = |n: &str| msgs.iter().find(|m| n_of(m) == n).and_then(|m| m.timestamp_ms).expect(n);
    assert_eq!(ts("row-time"), 1_780_315_200_123, "created_at, to the millisecond");
    assert!(ts("send-time") >= before_send - 1000, "send_time: the producer's clock");
}

fn chrono_ms_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// K's first event waits 4 s; K's second, written after it without a delay,
/// waits behind it; other keys go at once. Two relays.
#[tokio::test(flavor = "multi_thread")]
async fn a_delayed_event_waits_for_its_time_and_holds_back_its_keys_later_events() {
    let ob = Outbox::new("delay").await;
    let topic = ob.topic("events", 2).await;
    let t = ob.qualified();
    let db = pg().await;
    let relays =
        [ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__ID", "a")]), ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__ID", "b")])];
    // Let both relays start and claim once (the first claim reads the schema).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = Instant::now();
    db.batch_execute(&format!(
        "INSERT INTO {t} (topic, key, payload, deliver_after)
           VALUES ('{topic}', 'K', '{{\"n\": \"a\"}}', now() + interval '4 s');
         INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', 'K', '{{\"n\": \"b\"}}');
         INSERT INTO {t} (topic, key, payload) SELECT '{topic}', 'o' || i, jsonb_build_object('n', i)
           FROM generate_series(1, 100) i;
         INSERT INTO {t} (topic, key, payload, deliver_after)
           VALUES ('{topic}', 'L', '{{\"n\": \"late-past\"}}', now() - interval '1 h')"
    ))
    .await
    .unwrap();
    // Within 3 s: the 100 others and L (its time is past), nothing of K.
    let early = consume(std::slice::from_ref(&topic), 101, Duration::from_secs(3), Duration::from_millis(200));
    assert!(written.elapsed() < Duration::from_secs(4), "the early read ended before K's time");
    assert!(early.iter().all(|m| m.key.as_deref() != Some("K")), "nothing of K before its first event's time");
    assert!(early.iter().any(|m| n_of(m) == "late-past"), "a delivery time in the past goes at once");
    let out = relay_cmd(&ob.table, &[]).args(["status", "--json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    if written.elapsed() < Duration::from_secs(4) {
        assert_eq!(status["scheduled"], 1, "K's first event is scheduled, not pending: {status}");
    }
    ob.wait_drained(Duration::from_secs(30)).await;
    let d = delivery(&ob, std::slice::from_ref(&topic), Duration::from_millis(500)).await;
    assert!(d.lost.is_empty() && d.order_violations == 0, "lost {} violations {}", d.lost.len(), d.order_violations);
    let k: Vec<String> = d.received.iter().filter(|m| m.key.as_deref() == Some("K")).map(n_of).collect();
    assert_eq!(k, ["a", "b"], "K's later event waited behind the delayed one");
    for r in relays {
        assert!(r.stop(Duration::from_secs(30)));
    }
}

/// Per kind of relay statement that reads `table` (claim with its probe, the
/// sweep below the floor, the idle look, the backlog gauges): shared buffers
/// and calls so far (pg_stat_statements).
async fn relay_reads(db: &tokio_postgres::Client, table: &str) -> std::collections::HashMap<String, (i64, i64)> {
    db.query(
        "SELECT CASE WHEN query LIKE 'WITH due AS%' OR query LIKE 'SELECT (SELECT seq FROM%AS head%' THEN 'claim'
                     WHEN query LIKE 'SELECT (SELECT seq FROM%seq < $1%' THEN 'sweep'
                     WHEN query LIKE 'SELECT EXISTS%' THEN 'idle look'
                     WHEN query LIKE 'SELECT%count(*)%' THEN 'backlog' END AS kind,
                coalesce(sum(shared_blks_hit + shared_blks_read), 0)::int8,
                coalesce(sum(calls) FILTER (WHERE query NOT LIKE 'SELECT (SELECT seq FROM%AS head%'), 0)::int8
         FROM pg_stat_statements WHERE query LIKE '%\"public\".\"' || $1 || '\"%'
         GROUP BY 1",
        &[&table],
    )
    .await
    .unwrap_or_else(|e| panic!("pg_stat_statements is needed (scripts/infra up loads it): {e}"))
    .iter()
    .filter_map(|r| Some((r.get::<_, Option<String>>(0)?, (r.get(1), r.get(2)))))
    .collect()
}

/// 200k events wait a day ahead, spread through the table; other events
/// flow. The relay's reads per claim (claims, probes, the idle look, the
/// sweep below the floor every second, the backlog gauges) must not grow
/// with them: measured in shared buffers (pg_stat_statements), not time.
#[tokio::test(flavor = "multi_thread")]
async fn events_waiting_for_their_time_cost_the_claims_of_others_nothing() {
    const FUTURE: i64 = 200_000;
    let ob = Outbox::new("delaycost").await;
    let topic = ob.topic("events", 3).await;
    let db = pg().await;
    let t = ob.qualified();
    // Interleaved with ready events (one in 100), as an application writes them.
    db.execute(
        &format!(
            "INSERT INTO {t} (topic, key, payload, deliver_after)
             SELECT $1, 'later-' || (i % 5000), jsonb_build_object('i', i, 'pad', repeat('x', 100)),
                    CASE WHEN i % 100 <> 0 THEN now() + interval '1 day' END
             FROM generate_series(1, {FUTURE}) i"
        ),
        &[&topic],
    )
    .await
    .unwrap();
    let relay = ob.spawn_relay(&[
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100"),
        ("OUTBOX_RELAY__RELAY__SWEEP_INTERVAL", "1s"),
        // Its gauges read the backlog every few seconds: measured too.
        ("OUTBOX_RELAY__HTTP__LISTEN", &format!("127.0.0.1:{}", free_port())),
    ]);
    let ready = FUTURE / 100;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ob.count("published_at IS NOT NULL").await < ready {
        assert!(Instant::now() < deadline, "the ready events did not go out: {}", relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Measured: other keys' events written in small transactions for 5 s.
    let before = relay_reads(&db, &ob.table).await;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        db.execute(
            &format!(
                "INSERT INTO {t} (topic, key, payload)
                 SELECT $1, 'now-' || (i % 50), jsonb_build_object('i', i) FROM generate_series(1, 20) i"
            ),
            &[&topic],
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = relay_reads(&db, &ob.table).await;
    let pages: i64 = db.query_one("SELECT pg_relation_size($1::text::regclass) / 8192", &[&t]).await.unwrap().get(0);
    // The sweep runs every second, the gauges every 5 s. One row in 100 is a
    // ready one: the sweep and the gauges may pass the dead index entries of
    // those published (nothing is vacuumed), never the delayed rows, which
    // fill most pages: they must read less than a tenth of the table.
    for (kind, least, share) in [("claim", 20, 50.0), ("sweep", 3, 10.0), ("backlog", 1, 10.0)] {
        let (b0, c0) = before.get(kind).copied().unwrap_or_default();
        let (b1, c1) = after.get(kind).copied().unwrap_or_default();
        let calls = c1 - c0;
        assert!(calls >= least, "the relay ran its {kind} only {calls} times in 5 s: {}", relay.log());
        let per_call = (b1 - b0) as f64 / calls as f64;
        eprintln!("{kind}: {per_call:.0} shared buffers per call ({calls} calls in 5 s); the table has {pages} pages");
        assert!(
            per_call < pages as f64 / share,
            "each {kind} read {per_call:.0} shared buffers ({calls} calls) with {FUTURE} events waiting ({pages} \
             pages): delayed events sit in its path"
        );
    }
    assert_eq!(ob.count("deliver_after IS NOT NULL AND published_at IS NOT NULL").await, 0, "none went early");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ob.count("deliver_after IS NULL AND published_at IS NULL").await > 0 {
        assert!(Instant::now() < deadline, "the other events did not all go out: {}", relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, err) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
}
