//! `[kafka]`: the brokers and the producer properties, with the ones the
//! guarantees depend on guarded.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use super::{ConfigError, Delivery};

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`host:9092,host2:9092`). Required.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Any librdkafka producer property (`compression.type`, `linger.ms`,
    /// `security.protocol`, `sasl.*`, `ssl.*`, …). Those the guarantees depend on
    /// cannot be weakened: `enable.idempotence`, `acks` and `max.in.flight` (no
    /// loss, order), and `message.timeout.ms`, `delivery.timeout.ms`, `retries`
    /// and `delivery.report.only.error`, which the relay manages (a message that
    /// times out in the producer can be overtaken by a later event of its key;
    /// `relay.publish_timeout` bounds how long a batch waits for Kafka instead).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) { "<redacted>" } else { v.as_str() };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig").field("brokers", &self.brokers).field("properties", &props).finish()
    }
}

/// librdkafka properties whose values are secrets and must never be logged.
pub fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password") || n.contains("secret") || n.ends_with(".key.pem") || n.contains("sasl.oauthbearer.config")
}

/// The longest `transaction.timeout.ms` an exactly-once relay accepts: it bounds
/// how long a batch's Postgres transaction may wait for Kafka in that mode.
pub const MAX_TRANSACTION_TIMEOUT_MS: u64 = 60_000;

impl KafkaConfig {
    pub(super) fn validate(&self, delivery: Delivery) -> Result<(), ConfigError> {
        match self.brokers.as_deref().map(str::trim) {
            None | Some("") => return Err(ConfigError::key(
                "kafka.brokers",
                "is required: set it in the config file or OUTBOX_RELAY__KAFKA__BROKERS (e.g. kafka1:9092,kafka2:9092)",
            )),
            Some(b) => {
                for broker in b.split(',') {
                    let broker = broker.trim();
                    let ok = broker.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                    if !ok {
                        return Err(ConfigError::key(
                            "kafka.brokers",
                            format!("has {broker:?}; each broker must be host:port"),
                        ));
                    }
                }
            }
        }
        for (name, value) in &self.properties {
            check_property(name, value, delivery)?;
        }
        Ok(())
    }
}

/// Properties the guarantees depend on may be restated, never weakened.
fn check_property(name: &str, value: &str, delivery: Delivery) -> Result<(), ConfigError> {
    let key = format!("kafka.properties.\"{name}\"");
    let v = value.trim().to_ascii_lowercase();
    match name {
        "enable.idempotence" if v != "true" => Err(ConfigError::key(
            &key,
            "cannot be turned off: without the idempotent producer a retry can reorder or duplicate events",
        )),
        "acks" | "request.required.acks" if v != "all" && v != "-1" => Err(ConfigError::key(
            &key,
            "must be \"all\": with fewer acks a broker failure can lose events the relay already marked published",
        )),
        "bootstrap.servers" | "metadata.broker.list" => {
            Err(ConfigError::key(&key, "is set by `kafka.brokers`; remove it from kafka.properties"))
        }
        "transactional.id" => Err(ConfigError::key(&key, "is managed by the relay (relay.delivery); remove it")),
        "max.in.flight.requests.per.connection" | "max.in.flight" => match v.parse::<u32>() {
            Ok(1..=5) => Ok(()),
            _ => Err(ConfigError::key(
                &key,
                "must be between 1 and 5 (the idempotent producer keeps order only up to 5)",
            )),
        },
        "message.timeout.ms" | "delivery.timeout.ms" => Err(ConfigError::key(
            &key,
            "is managed by the relay: a queued event that times out in the producer can be overtaken by a later \
             event of its key in the next batch; relay.publish_timeout bounds how long a batch waits for Kafka \
             instead (the relay then gives the whole batch back, in order); remove it",
        )),
        "retries" | "message.send.max.retries" => Err(ConfigError::key(
            &key,
            "is managed by the relay: a message that runs out of retries can be overtaken by a later event of its \
             key; transient failures are retried until relay.publish_timeout; remove it",
        )),
        "allow.auto.create.topics" if v != "false" && delivery == Delivery::ExactlyOnce => Err(ConfigError::key(
            &key,
            "must stay false in exactly-once mode: the producer writes the decisions topic, and one deleted by \
             mistake would come back empty, with the broker's defaults; create topics yourself",
        )),
        "delivery.report.only.error" if v != "false" => {
            Err(ConfigError::key(&key, "must be false: the relay marks an event published only on its delivery report"))
        }
        "transaction.timeout.ms" => match v.parse::<u64>() {
            Ok(ms) if (1_000..=MAX_TRANSACTION_TIMEOUT_MS).contains(&ms) => Ok(()),
            _ if delivery == Delivery::AtLeastOnce => Ok(()),
            _ => Err(ConfigError::key(
                &key,
                format!(
                    "must be between 1000 and {MAX_TRANSACTION_TIMEOUT_MS}: in exactly-once mode it bounds how long \
                     a batch's Postgres transaction may wait for Kafka"
                ),
            )),
        },
        _ if name.trim().is_empty() => Err(ConfigError::key("kafka.properties", "has an empty property name")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALO: Delivery = Delivery::AtLeastOnce;

    #[test]
    fn guarantee_properties_cannot_be_weakened() {
        assert!(check_property("enable.idempotence", "false", ALO).is_err());
        assert!(check_property("acks", "1", ALO).is_err());
        assert!(check_property("acks", "all", ALO).is_ok());
        assert!(check_property("max.in.flight.requests.per.connection", "10", ALO).is_err());
        assert!(check_property("transactional.id", "x", ALO).is_err());
        assert!(check_property("compression.type", "zstd", ALO).is_ok());
        assert!(check_property("allow.auto.create.topics", "true", ALO).is_ok());
        assert!(check_property("allow.auto.create.topics", "true", Delivery::ExactlyOnce).is_err());
    }

    #[test]
    fn producer_timeouts_that_could_reorder_a_key_are_refused_by_name() {
        for (name, value) in [
            ("message.timeout.ms", "30000"),
            ("delivery.timeout.ms", "5000"),
            ("retries", "3"),
            ("message.send.max.retries", "10"),
            ("delivery.report.only.error", "true"),
        ] {
            let err = check_property(name, value, ALO).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
        assert!(check_property("delivery.report.only.error", "false", ALO).is_ok());
        assert!(check_property("request.timeout.ms", "10000", ALO).is_ok(), "retried: harmless");
    }

    #[test]
    fn the_transaction_timeout_is_bounded_in_exactly_once_mode() {
        let eos = Delivery::ExactlyOnce;
        assert!(check_property("transaction.timeout.ms", "30000", eos).is_ok());
        let err = check_property("transaction.timeout.ms", "900000", eos).unwrap_err().to_string();
        assert!(err.contains("transaction.timeout.ms") && err.contains("60000"), "{err}");
        assert!(check_property("transaction.timeout.ms", "900000", ALO).is_ok(), "unused at least once");
    }
}
