//! Several relays against one outbox: SKIP LOCKED shares the work and per-key
//! order still holds, hot keys included.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn three_relays_keep_per_key_order_with_a_hot_key() {
    let ob = Outbox::new("multi").await;
    let topic = ob.topic("events", 6).await;
    // A backlog first, so all three relays start with work at once…
    let db = pg().await;
    db.execute(
        &format!(
            "INSERT INTO {} (topic, key, payload)
             SELECT $1, CASE WHEN i % 10 < 3 THEN 'hot' ELSE 'key-' || (i % 97) END, jsonb_build_object('i', i)
             FROM generate_series(1, 6000) i",
            ob.qualified()
        ),
        &[&topic],
    )
    .await
    .unwrap();
    let settings = [("OUTBOX_RELAY__RELAY__BATCH_SIZE", "50")];
    let relays: Vec<_> = (0..3).map(|_| ob.spawn_relay(&settings)).collect();

    // …and an application that keeps writing while they run (one connection, so
    // seq order is commit order per key).
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(6000));
    let writer = {
        let (stop, written, table, topic) = (stop.clone(), written.clone(), ob.qualified(), topic.clone());
        tokio::spawn(async move {
            let db = pg().await;
            let mut n: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                db.execute(
                    &format!(
                        "INSERT INTO {table} (topic, key, payload)
                         SELECT $1, CASE WHEN ($2::bigint + i) % 10 < 3 THEN 'hot' ELSE 'key-' || (($2::bigint + i) % 97) END,
                                jsonb_build_object('i', $2::bigint + i)
                         FROM generate_series(0, 19) i"
                    ),
                    &[&topic, &n],
                )
                .await
                .unwrap();
                n += 20;
                written.fetch_add(20, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    ob.wait_drained(Duration::from_secs(120)).await;

    let rows = db.query(&format!("SELECT id::text, seq FROM {}", ob.qualified()), &[]).await.unwrap();
    let seq_of: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(seq_of.len() as u64, written.load(Ordering::Relaxed));
    let msgs = consume(std::slice::from_ref(&topic), seq_of.len(), Duration::from_secs(120), Duration::from_secs(2));
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &msgs {
        *count.entry(m.event_id()).or_default() += 1;
    }
    let lost = seq_of.keys().filter(|id| !count.contains_key(*id)).count();
    let duplicates: usize = count.values().map(|c| c - 1).sum();
    let violations = order_violations(&msgs, &seq_of);
    eprintln!(
        "written {} delivered {} lost {lost} duplicates {duplicates} order violations {violations}",
        seq_of.len(),
        msgs.len()
    );
    assert_eq!(lost, 0);
    assert_eq!(duplicates, 0, "no crash, no duplicate");
    assert_eq!(violations, 0, "per-key order across relays");
    for r in relays {
        let (code, err) = r.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{err}");
    }
}
