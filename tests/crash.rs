//! SIGKILL the relay again and again while an application keeps writing: every
//! committed event must reach Kafka, in per-key order; duplicates are bounded
//! by the in-flight batches of the killed relays.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_load_loses_nothing_and_keeps_per_key_order() {
    const KILLS: usize = 6;
    const BATCH: usize = 100;
    let ob = Outbox::new("crash").await;
    let topic = ob.topic("events", 4).await;

    // The application: small transactions over 20 keys from one connection, so
    // seq order is commit order per key (the documented assumption).
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, table, topic) = (stop.clone(), written.clone(), ob.qualified(), topic.clone());
        tokio::spawn(async move {
            let mut db = pg().await;
            let mut n: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let tx = db.transaction().await.unwrap();
                tx.execute(
                    &format!(
                        "INSERT INTO {table} (topic, key, payload)
                         SELECT $1, 'key-' || ((($2::bigint + i) * 7) % 20), jsonb_build_object('n', $2::bigint + i)
                         FROM generate_series(0, 9) i"
                    ),
                    &[&topic, &n],
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
                n += 10;
                written.fetch_add(10, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };

    let batch = BATCH.to_string();
    let settings = [("OUTBOX_RELAY__RELAY__BATCH_SIZE", batch.as_str())];
    for kill in 0..KILLS {
        let mut relay = ob.spawn_relay(&settings);
        // random moment: during start-up, mid-batch, between batches
        let ms = 300 + fastrand::u64(0..1500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        relay.assert_running();
        relay.kill9();
        eprintln!("kill {} after {ms} ms; written so far {}", kill + 1, written.load(Ordering::Relaxed));
    }
    let relay = ob.spawn_relay(&settings);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    ob.wait_drained(Duration::from_secs(120)).await;

    let db = pg().await;
    let rows = db.query(&format!("SELECT id::text, seq FROM {}", ob.qualified()), &[]).await.unwrap();
    let seq_of: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(seq_of.len() as u64, written.load(Ordering::Relaxed), "every committed row is in the table");
    let msgs = consume(std::slice::from_ref(&topic), seq_of.len(), Duration::from_secs(120), Duration::from_secs(3));
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &msgs {
        *count.entry(m.event_id()).or_default() += 1;
    }
    let lost: Vec<&String> = seq_of.keys().filter(|id| !count.contains_key(*id)).collect();
    let duplicates: usize = count.values().map(|c| c - 1).sum();
    let violations = order_violations(&msgs, &seq_of);
    eprintln!(
        "written {} delivered {} lost {} duplicates {} order violations {} ({} kills)",
        seq_of.len(),
        msgs.len(),
        lost.len(),
        duplicates,
        violations,
        KILLS
    );
    assert!(lost.is_empty(), "{} events lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    assert!(count.keys().all(|id| seq_of.contains_key(id)), "a message that was never written");
    assert_eq!(violations, 0, "per-key order");
    // at-least-once: a kill can republish at most the batch in flight
    // Two batches are in flight at once (pipelining): a kill republishes at most both.
    assert!(duplicates <= KILLS * 2 * BATCH, "{duplicates} duplicates for {KILLS} kills of batch {BATCH}");
    let (code, stderr) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
}
