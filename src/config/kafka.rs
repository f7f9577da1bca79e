//! `[kafka]`: the brokers and the producer properties, with the ones the
//! guarantees depend on guarded.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

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
    /// The SASL password (librdkafka's `sasl.password`), e.g. from
    /// `OUTBOX_RELAY__KAFKA__SASL_PASSWORD`. Never logged.
    #[serde(default)]
    pub sasl_password: Option<String>,
    /// A file holding the SASL password (a mounted Secret); one trailing
    /// newline is ignored.
    #[serde(default)]
    pub sasl_password_file: Option<PathBuf>,
    /// A file holding the password of the client's TLS key (`ssl.key.password`).
    #[serde(default)]
    pub ssl_key_password_file: Option<PathBuf>,
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
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &props)
            .field("sasl_password", &self.sasl_password.as_ref().map(|_| "<redacted>"))
            .field("sasl_password_file", &self.sasl_password_file)
            .field("ssl_key_password_file", &self.ssl_key_password_file)
            .finish()
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
    pub(super) fn validate(&self, delivery: Delivery, brokers_required: bool) -> Result<(), ConfigError> {
        match self.brokers.as_deref().map(str::trim) {
            None | Some("") if !brokers_required => {}
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

    /// Properties bounded by `[relay]` settings.
    pub(super) fn validate_against(&self, relay: &super::RelayConfig) -> Result<(), ConfigError> {
        let key = "topic.metadata.propagation.max.ms";
        let Some(v) = self.properties.get(key) else { return Ok(()) };
        let limit = relay.publish_timeout.as_millis();
        match v.trim().parse::<u128>() {
            Ok(ms) if ms < limit => Ok(()),
            _ => Err(ConfigError::key(
                &format!("kafka.properties.{key}"),
                format!(
                    "must be a number of milliseconds below relay.publish_timeout ({limit}): an event for a topic \
                     the cluster does not know waits this long, and a batch that waits past relay.publish_timeout \
                     is given back as if Kafka were down, with the event never parked"
                ),
            )),
        }
    }

    /// Moves the secrets given by key or file into `properties`, where every
    /// Kafka client of the relay takes them from. One source per secret.
    pub(super) fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        let sasl_sources = [
            self.properties.contains_key("sasl.password"),
            self.sasl_password.is_some(),
            self.sasl_password_file.is_some(),
        ];
        if sasl_sources.iter().filter(|s| **s).count() > 1 {
            return Err(ConfigError::key(
                "kafka.sasl_password",
                "is given more than once (kafka.sasl_password, kafka.sasl_password_file, kafka.properties.\"sasl.password\"): keep one",
            ));
        }
        if let Some(p) = self.sasl_password.take() {
            self.properties.insert("sasl.password".into(), p);
        }
        if let Some(path) = &self.sasl_password_file {
            let p = read_secret("kafka.sasl_password_file", path)?;
            self.properties.insert("sasl.password".into(), p);
        }
        if let Some(path) = &self.ssl_key_password_file {
            if self.properties.contains_key("ssl.key.password") {
                return Err(ConfigError::key(
                    "kafka.ssl_key_password_file",
                    "and kafka.properties.\"ssl.key.password\" are both set: keep one",
                ));
            }
            let p = read_secret("kafka.ssl_key_password_file", path)?;
            self.properties.insert("ssl.key.password".into(), p);
        }
        Ok(())
    }
}

/// A secret from a file: its contents without one trailing newline.
fn read_secret(key: &str, path: &std::path::Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::key(key, format!("cannot be read ({}): {e}", path.display())))?;
    let secret = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if secret.is_empty() {
        return Err(ConfigError::key(key, format!("names an empty file ({})", path.display())));
    }
    Ok(secret.to_string())
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
    fn kafka_secrets_come_from_a_file_or_an_env_var_once_and_are_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let sasl = dir.path().join("sasl");
        std::fs::write(&sasl, "s3cr3t-sasl\n").unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "s3cr3t-key").unwrap();
        let sasl_s = sasl.to_str().unwrap();
        let s = crate::config::tests::load_env(&[
            ("OUTBOX_RELAY__KAFKA__SASL_PASSWORD_FILE", sasl_s),
            ("OUTBOX_RELAY__KAFKA__SSL_KEY_PASSWORD_FILE", key.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(s.kafka.properties["sasl.password"], "s3cr3t-sasl", "one trailing newline dropped");
        assert_eq!(s.kafka.properties["ssl.key.password"], "s3cr3t-key");
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");

        let s = crate::config::tests::load_env(&[("OUTBOX_RELAY__KAFKA__SASL_PASSWORD", "s3cr3t-env")]).unwrap();
        assert_eq!(s.kafka.properties["sasl.password"], "s3cr3t-env");
        assert!(!format!("{s:?}").contains("s3cr3t"));

        let both = crate::config::tests::load_env(&[
            ("OUTBOX_RELAY__KAFKA__SASL_PASSWORD", "a"),
            ("OUTBOX_RELAY__KAFKA__SASL_PASSWORD_FILE", sasl_s),
        ])
        .unwrap_err()
        .to_string();
        assert!(both.contains("more than once") && !both.contains("s3cr3t"), "{both}");
        let missing = dir.path().join("nope");
        let err =
            crate::config::tests::load_env(&[("OUTBOX_RELAY__KAFKA__SASL_PASSWORD_FILE", missing.to_str().unwrap())])
                .unwrap_err()
                .to_string();
        assert!(err.contains("kafka.sasl_password_file") && err.contains("cannot be read"), "{err}");
    }

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
