//! An event for a topic that does not exist, with the relay's default producer
//! settings: it fails, is retried and parked, and the events around it flow.
//! It is not a Kafka outage: the relay never gives a batch back for it, nor
//! stops claiming.

use std::time::Duration;

use outbox_relay_support::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_event_for_a_missing_topic_is_parked_without_holding_up_the_outbox() {
    missing_topic("notopic", "at-least-once").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_for_a_missing_topic_is_parked_without_holding_up_the_outbox_exactly_once() {
    missing_topic("notopiceo", "exactly-once").await;
}

async fn missing_topic(name: &str, delivery: &str) {
    let ob = Outbox::new(name).await;
    let good = ob.topic("good", 2).await;
    let missing = format!("{}.never-created", ob.table);
    let t = ob.qualified();
    // One batch: good events of several keys around the bad one.
    pg().await
        .execute(
            &format!(
                "INSERT INTO {t} (topic, key, payload)
                 SELECT CASE WHEN i = 20 THEN $2 ELSE $1 END, 'k-' || (i % 7), jsonb_build_object('i', i)
                 FROM generate_series(1, 40) i"
            ),
            &[&good, &missing],
        )
        .await
        .unwrap();
    let relay = ob.spawn_relay(&[
        ("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "2"),
        ("OUTBOX_RELAY__RELAY__RETRY_BACKOFF", "200ms"),
        ("OUTBOX_RELAY__RELAY__DELIVERY", delivery),
    ]);
    // relay.publish_timeout is 20 s (exactly-once: transaction.timeout.ms 15 s):
    // both attempts and the parking fit in 40 s only if no attempt waits for it.
    ob.wait_drained(Duration::from_secs(40)).await;
    let parked = pg()
        .await
        .query(&format!("SELECT topic, attempts, last_error FROM {t} WHERE parked_at IS NOT NULL"), &[])
        .await
        .unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    let (topic, attempts, err): (String, i32, String) = (parked[0].get(0), parked[0].get(1), parked[0].get(2));
    assert_eq!((topic.as_str(), attempts), (missing.as_str(), 2));
    assert!(err.contains("Unknown topic"), "{err}");

    // Events after it flow too.
    ob.insert(&good, 30, 7).await;
    ob.wait_drained(Duration::from_secs(30)).await;
    let msgs = consume(std::slice::from_ref(&good), 69, Duration::from_secs(30), Duration::from_secs(1));
    assert_eq!(msgs.len(), 69, "every good event, once");
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert!(!log.contains("publish_timeout"), "a missing topic is not an outage: {log}");
    assert_eq!(code, Some(0), "{log}");
}
