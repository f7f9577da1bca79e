//! Per-key order where the floor's assumptions bend: the outbox's sequence
//! going backwards (a failover to an asynchronous standby, a recovery, an
//! `ALTER … RESTART`, a lower `setval`).

use std::time::Duration;

use outbox_relay_support::*;

/// The events of key `K`, in the order a read_committed consumer saw them,
/// by their payload's `"n"`.
fn k_order(msgs: &[Received]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.key.as_deref() == Some("K"))
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload.as_deref().unwrap_or(b"null")).unwrap();
            v["n"].as_str().unwrap_or("?").to_string()
        })
        .collect()
}

/// 0.2: `visible` and `max_seen` only rose, so new rows below the old floor
/// waited for the sweep while later events of their key went out first.
#[tokio::test(flavor = "multi_thread")]
async fn events_after_a_sequence_restart_below_the_floor_keep_their_key_order_without_the_sweep() {
    let ob = Outbox::new("seqreset").await;
    let topic = ob.topic("events", 1).await;
    let t = ob.qualified();
    // One relay throughout; the sweep would only come after 10 minutes.
    let relay = ob.spawn_relay(&[("OUTBOX_RELAY__RELAY__SWEEP_INTERVAL", "10m")]);
    ob.insert(&topic, 1200, 50).await;
    ob.wait_drained(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the floor settles above the 1200
    let db = pg().await;
    let max: i64 = db.query_one(&format!("SELECT max(seq) FROM {t}"), &[]).await.unwrap().get(0);
    db.batch_execute(&format!("ALTER TABLE {t} ALTER COLUMN seq RESTART WITH {}", max - 250)).await.unwrap();
    let one = |key: &str, n: &str| {
        format!("INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', '{key}', jsonb_build_object('n', '{n}'));")
    };
    db.batch_execute(&one("K", "a")).await.unwrap();
    for i in 0..60 {
        db.batch_execute(&one(&format!("other-{i}"), "x")).await.unwrap();
    }
    db.batch_execute(&one("K", "b")).await.unwrap();
    let msgs = consume(std::slice::from_ref(&topic), 1262, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(k_order(&msgs), ["a", "b"], "K's events in commit order, well before the sweep");

    // A lower setval() the same way (the sequence keeps its storage).
    let max: i64 = db.query_one(&format!("SELECT max(seq) FROM {t}"), &[]).await.unwrap().get(0);
    ob.wait_drained(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.batch_execute(&format!("SELECT setval(pg_get_serial_sequence('{t}', 'seq'), {})", max - 100)).await.unwrap();
    db.batch_execute(&one("K", "c")).await.unwrap();
    db.batch_execute(&one("K", "d")).await.unwrap();
    let msgs = consume(std::slice::from_ref(&topic), 1264, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(k_order(&msgs), ["a", "b", "c", "d"], "after a lower setval too");
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("sequence went backwards"), "the reset is logged: {log}");
}
