//! Several relays against one outbox: SKIP LOCKED shares the work and per-key
//! order still holds, hot keys included.

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
    let writers = Writers::start(WriterSpec {
        per_tx: 20,
        rate: 4000,
        keys: 97,
        hot_key_share: 0.3,
        ..WriterSpec::small(&ob.qualified(), &topic)
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let written = 6000 + writers.finish().await;
    ob.wait_drained(Duration::from_secs(120)).await;

    let d = delivery(&ob, std::slice::from_ref(&topic), Duration::from_secs(2)).await;
    assert_eq!(d.seq_of.len() as u64, written);
    assert!(d.lost.is_empty(), "{} lost", d.lost.len());
    assert_eq!(d.duplicates, 0, "no crash, no duplicate");
    assert_eq!(d.order_violations, 0, "per-key order across relays");
    for r in relays {
        let (code, err) = r.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{err}");
    }
}
