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

/// #21 item 6: one relay works through a hot key's backlog (slowly: a delay
/// per event). A second relay's claims start with that key's rows, all
/// deferred behind the first relay's head. Without leaving the key out and
/// claiming again, the second relay publishes nothing until the hot backlog is
/// nearly gone; with it, other keys' events go out while the hot key still has
/// thousands pending.
#[tokio::test(flavor = "multi_thread")]
async fn a_hot_key_another_relay_holds_does_not_defer_a_relays_whole_claim() {
    let ob = Outbox::new("hotdefer").await;
    let topic = ob.topic("events", 3).await;
    let db = pg().await;
    let t = ob.qualified();
    db.execute(
        &format!(
            "INSERT INTO {t} (topic, key, payload)
             SELECT $1, 'hot', jsonb_build_object('i', i) FROM generate_series(1, 3000) i"
        ),
        &[&topic],
    )
    .await
    .unwrap();
    let batch = ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100");
    // 3 ms per event: 3,000 hot events take the holder at least 9 s.
    let holder = ob.spawn_relay(&[
        batch,
        ("OUTBOX_RELAY__RELAY__ID", "holder"),
        ("OUTBOX_RELAY_FAILPOINTS", "after-send=delay-per-event:3"),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ob.count("published_at IS NOT NULL").await == 0 {
        assert!(std::time::Instant::now() < deadline, "the holder published nothing: {}", holder.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other = ob.spawn_relay(&[batch, ("OUTBOX_RELAY__RELAY__ID", "other")]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    db.execute(
        &format!(
            "INSERT INTO {t} (topic, key, payload)
             SELECT $1, 'key-' || (i % 20), jsonb_build_object('i', i) FROM generate_series(1, 200) i"
        ),
        &[&topic],
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ob.count("key <> 'hot' AND published_at IS NULL").await > 0 {
        assert!(std::time::Instant::now() < deadline, "other keys not published: {}", other.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hot_left = ob.count("key = 'hot' AND published_at IS NULL").await;
    assert!(
        hot_left >= 1000,
        "the other keys went out only once the hot backlog was down to {hot_left}: the second relay's claims were \
         deferred whole behind the hot key"
    );
    ob.wait_drained(Duration::from_secs(120)).await;
    let d = delivery(&ob, std::slice::from_ref(&topic), Duration::from_secs(2)).await;
    assert_eq!((d.lost.len(), d.duplicates, d.order_violations), (0, 0, 0));
    for r in [holder, other] {
        let (code, err) = r.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{err}");
    }
}
