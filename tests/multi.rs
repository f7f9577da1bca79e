//! Several relays against one outbox: SKIP LOCKED shares the work and per-key
//! order still holds, hot keys included.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_relay_support::*;

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

    let d = delivery(&ob, std::slice::from_ref(&topic), Duration::from_secs(2)).await;
    assert_eq!(d.seq_of.len() as u64, written.load(Ordering::Relaxed));
    assert!(d.lost.is_empty(), "{} lost", d.lost.len());
    assert_eq!(d.duplicates, 0, "no crash, no duplicate");
    assert_eq!(d.order_violations, 0, "per-key order across relays");
    for r in relays {
        let (code, err) = r.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{err}");
    }
}
