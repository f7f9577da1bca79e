//! SIGKILL the relay again and again while an application keeps writing: every
//! committed event must reach Kafka, in per-key order; duplicates are bounded
//! by the in-flight batches of the killed relays.

use std::time::Duration;

use outbox_relay_support::*;

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_load_loses_nothing_and_keeps_per_key_order() {
    sigkill_mid_load("crash", 2, 0).await;
}

/// Three batches in flight (`relay.pipeline_depth`), killed while it drains a
/// backlog (where the pipeline goes that deep) with the application writing.
#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_backlog_at_pipeline_depth_three_loses_nothing_and_keeps_per_key_order() {
    sigkill_mid_load("crash3", 3, 30_000).await;
}

async fn sigkill_mid_load(name: &str, depth: usize, backlog: i64) {
    const KILLS: usize = 6;
    const BATCH: usize = 100;
    let ob = Outbox::new(name).await;
    let topic = ob.topic("events", 4).await;
    ob.insert(&topic, backlog, 20).await;

    // The application: small transactions over 20 keys from one connection, so
    // seq order is commit order per key (the documented assumption).
    let writers = Writers::start(WriterSpec { rate: 3000, ..WriterSpec::small(&ob.qualified(), &topic) });

    let batch = BATCH.to_string();
    let depth_s = depth.to_string();
    let settings =
        [("OUTBOX_RELAY__RELAY__BATCH_SIZE", batch.as_str()), ("OUTBOX_RELAY__RELAY__PIPELINE_DEPTH", &depth_s)];
    for kill in 0..KILLS {
        let mut relay = ob.spawn_relay(&settings);
        // random moment: during start-up, mid-batch, between batches
        let ms = 300 + fastrand::u64(0..1500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        relay.assert_running();
        relay.kill9();
        eprintln!("kill {} after {ms} ms; written so far {}", kill + 1, writers.written());
    }
    let relay = ob.spawn_relay(&settings);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = writers.finish().await;
    ob.wait_drained(Duration::from_secs(120)).await;

    let d = delivery(&ob, std::slice::from_ref(&topic), Duration::from_secs(3)).await;
    assert_eq!(d.seq_of.len() as u64, written + backlog as u64, "every committed row is in the table");
    assert!(d.lost.is_empty(), "{} events lost, e.g. {:?}", d.lost.len(), &d.lost[..d.lost.len().min(5)]);
    assert_eq!(d.unknown, 0, "a message that was never written");
    assert_eq!(d.order_violations, 0, "per-key order");
    // at-least-once: `depth` batches are in flight at once (pipelining), so a
    // kill republishes at most all of them
    eprintln!("{} duplicates after {KILLS} kills", d.duplicates);
    assert!(
        d.duplicates <= KILLS * depth * BATCH,
        "{} duplicates for {KILLS} kills of batch {BATCH} at depth {depth}",
        d.duplicates
    );
    let (code, stderr) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}");
}
