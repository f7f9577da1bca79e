//! `relay.pipeline_depth`: how many batches one relay holds in flight while it
//! drains a backlog, seen from the database (each batch is an open transaction
//! holding its rows' locks, so it has a transaction id), and what still holds:
//! nothing lost, per-key order, no duplicate without a crash.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_relay_support::*;

/// Drains a 20k backlog at `depth` and returns the most batch transactions the
/// relay had open at once (sampled every few milliseconds).
async fn most_open_batches_while_draining(depth: &str) -> i64 {
    let ob = Outbox::new(&format!("depth{depth}")).await;
    let topic = ob.topic("events", 4).await;
    ob.insert(&topic, 20_000, 50).await;
    let url = ob.tagged_url();
    let relay = ob.spawn_relay(&[
        ("OUTBOX_RELAY__POSTGRES__URL", &url),
        ("OUTBOX_RELAY__RELAY__PIPELINE_DEPTH", depth),
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100"),
    ]);
    let (stop, most) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicI64::new(0)));
    let sampler = {
        let (stop, most, app) = (stop.clone(), most.clone(), ob.table.clone());
        tokio::spawn(async move {
            let db = pg().await;
            let sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND backend_xid IS NOT NULL";
            while !stop.load(Ordering::Relaxed) {
                let open: i64 = db.query_one(sql, &[&app]).await.expect("pg_stat_activity").get(0);
                most.fetch_max(open, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    ob.wait_drained(Duration::from_secs(120)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");

    let d = delivery(&ob, std::slice::from_ref(&topic), Duration::from_secs(2)).await;
    assert_eq!(d.seq_of.len(), 20_000);
    assert!(d.lost.is_empty(), "depth {depth}: {} lost", d.lost.len());
    assert_eq!(d.duplicates, 0, "depth {depth}: no crash, no duplicate");
    assert_eq!(d.order_violations, 0, "depth {depth}: per-key order");
    let (code, err) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    most.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread")]
async fn at_depth_three_a_backlog_drains_with_three_batches_in_flight() {
    assert_eq!(most_open_batches_while_draining("3").await, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn at_depth_one_a_relay_never_holds_two_batches() {
    assert_eq!(most_open_batches_while_draining("1").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_two_batches_are_in_flight() {
    assert_eq!(most_open_batches_while_draining("2").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_producer_failing_fatally_with_two_batches_in_flight_keeps_key_order() {
    producer_failing_fatally_in_a_pipeline("rebuild", "2").await;
}

/// The same with three batches in flight (`relay.pipeline_depth`): the batch
/// before the failed one may still be unrecorded when the next is claimed.
#[tokio::test(flavor = "multi_thread")]
async fn a_producer_failing_fatally_with_three_batches_in_flight_keeps_key_order() {
    producer_failing_fatally_in_a_pipeline("rebuild3", "3").await;
}

async fn producer_failing_fatally_in_a_pipeline(name: &str, depth: &str) {
    let ob = Outbox::new(name).await;
    let topic = ob.topic("events", 2).await;
    ob.insert(&topic, 3000, 5).await;
    // Right after the 3rd batch is handed to the producer, the producer fails
    // fatally (librdkafka's test hook): the 3rd batch's queued events fail,
    // while the pipeline already claims the 4th, with later events of the same
    // keys. The 4th must not go out on a new producer ahead of the 3rd's retry.
    let relay = ob.spawn_relay(&[
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100"),
        ("OUTBOX_RELAY__RELAY__PIPELINE_DEPTH", depth),
        ("OUTBOX_RELAY_FAILPOINTS", "after-send=fatal@3"),
    ]);
    ob.wait_drained(Duration::from_secs(60)).await;
    let d = delivery(&ob, std::slice::from_ref(&topic), Duration::from_secs(2)).await;
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert!(log.contains("failpoint after-send: Fatal"), "the failpoint fired: {log}");
    assert!(log.contains("rebuilding it"), "the producer was replaced: {log}");
    assert!(d.lost.is_empty(), "lost {}", d.lost.len());
    assert_eq!(d.order_violations, 0, "per-key order across the producer rebuild");
    assert_eq!(code, Some(0), "{log}");
}

/// A pool with no connection beside the batches in flight is allowed (a small
/// pool is a valid choice), but the relay says so at start-up: each batch in
/// flight holds a pooled connection, so the depth would silently be less.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_too_small_for_the_depth_is_named_at_start_up() {
    const WARNING: &str = "postgres.pool_size leaves no connection beside relay.pipeline_depth";
    let ob = Outbox::new("small_pool").await;
    let topic = ob.topic("events", 1).await;
    for (pool, warned) in [("3", true), ("4", false)] {
        ob.insert(&topic, 10, 2).await;
        let relay = ob
            .spawn_relay(&[("OUTBOX_RELAY__RELAY__PIPELINE_DEPTH", "3"), ("OUTBOX_RELAY__POSTGRES__POOL_SIZE", pool)]);
        ob.wait_drained(Duration::from_secs(30)).await;
        let (code, log) = relay.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{log}");
        assert_eq!(log.contains(WARNING), warned, "pool {pool}, depth 3: {log}");
        if warned {
            assert!(log.contains("pool_size=3") && log.contains("pipeline_depth=3"), "{log}");
        }
    }
}
