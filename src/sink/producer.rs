//! The producer's properties: the relay's defaults, then the user's
//! `[kafka.properties]`, then the settings the guarantees depend on.

use std::collections::BTreeMap;

use crate::config::{Delivery, Settings};

/// The Kafka header naming the relay that published a message: operators
/// auditing a duplicate see which relay sent each copy (and the chaos run
/// attributes them exactly).
pub const RELAY_ID_HEADER: &str = "outbox_relay_id";

/// How long an event for a topic the cluster does not (yet) know waits before
/// it fails: 5 s, and well below `relay.publish_timeout`.
pub fn default_propagation_ms(publish_timeout: std::time::Duration) -> u128 {
    (publish_timeout.as_millis() / 2).min(5_000)
}

/// The producer properties the relay uses: its defaults, then the user's
/// `[kafka.properties]`, then the settings the guarantees depend on.
/// `transactional_id`: exactly-once mode's (see `store::TxnIds`).
pub fn producer_config(settings: &Settings, transactional_id: Option<&str>) -> BTreeMap<String, String> {
    let mut props = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        props.insert(k.to_string(), v.to_string());
    };
    set("client.id", &format!("outbox-relay-{}", settings.relay_id()));
    let exactly_once = settings.relay.delivery == Delivery::ExactlyOnce;
    if exactly_once {
        // A transaction's messages may not outlive it: librdkafka bounds
        // message.timeout.ms by transaction.timeout.ms. A timed-out batch is
        // aborted as a whole and retried, so order holds anyway. Short, because
        // the open transaction of a relay that died and does not come back holds
        // read_committed consumers (and recovery) back until it times out.
        set("transaction.timeout.ms", "15000");
    } else {
        // No message ever times out inside the producer: a timed-out event could
        // be overtaken by a later event of its key in the next batch. Transient
        // faults are retried for as long as the batch may wait
        // (relay.publish_timeout); then the relay abandons the producer as a
        // whole (every later batch's events with it) and gives the rows back.
        set("message.timeout.ms", "0");
    }
    // 0: the relay hands over whole batches, and while requests are in flight
    // the next ones fill up anyway, so nothing is gained by holding a batch back.
    // scripts/bench, 1k ev/s, alternating: commit→ack p50 7.2 / 7.1 ms with 0
    // vs 8.1 / 8.0 ms with 1 ms (librdkafka's default 5 ms was worse still);
    // drain rates equal within noise.
    set("linger.ms", "0");
    set("compression.type", "lz4");
    set("batch.num.messages", "10000");
    set("queue.buffering.max.messages", "200000");
    set("topic.metadata.refresh.interval.ms", "30000");
    set("reconnect.backoff.max.ms", "2000");
    set("socket.keepalive.enable", "true");
    // A missing topic is an error, not a new topic with the broker's defaults
    // (an empty decisions topic would hold no history). At-least-once tables
    // may opt in for their event topics; exactly-once refuses it (config).
    set("allow.auto.create.topics", "false");
    // librdkafka holds an event for a topic the cluster does not know for this
    // long (30 s by default) in case the topic was just created. Past
    // relay.publish_timeout (20 s) that made one event with a mistyped topic
    // look like a Kafka outage: its batch was given back, claiming stopped, and
    // the event was never parked. Now it fails as an unknown topic well before
    // (its attempt counts; `relay.retry_backoff` spaces the retries).
    set("topic.metadata.propagation.max.ms", &default_propagation_ms(settings.relay.publish_timeout).to_string());
    for (k, v) in &settings.kafka.properties {
        set(k, v);
    }
    set("bootstrap.servers", settings.kafka_brokers());
    set("enable.idempotence", "true");
    set("acks", "all");
    if let Some(id) = transactional_id {
        set("transactional.id", id);
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &[(&str, &str)]) -> Settings {
        let mut env = vec![
            ("OUTBOX_RELAY__POSTGRES__URL".to_string(), "postgres://u@h/db".to_string()),
            ("OUTBOX_RELAY__KAFKA__BROKERS".to_string(), "k:9092".to_string()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Settings::load_from(None, env).unwrap()
    }

    #[test]
    fn an_unknown_topic_fails_well_before_the_publish_timeout_by_default() {
        let key = "topic.metadata.propagation.max.ms";
        assert_eq!(producer_config(&settings(&[]), None)[key], "5000");
        let short = settings(&[("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", "3s")]);
        assert_eq!(producer_config(&short, None)[key], "1500");
        let own = settings(&[("OUTBOX_RELAY__KAFKA__PROPERTIES__topic.metadata.propagation.max.ms", "8000")]);
        assert_eq!(producer_config(&own, None)[key], "8000", "the user's value, when it is below the timeout");
    }
}
