//! Configuration: an optional TOML file layered under `OUTBOX_RELAY__SECTION__KEY`
//! environment variables, validated once into [`Settings`].
//!
//! One file per section (`postgres.rs`, `kafka.rs`, `outbox.rs`, `relay.rs`,
//! `http.rs`, `log.rs`), each struct with its defaults and its own `validate()`.
//! Every field's `///` comment is the user's documentation of that setting
//! (docs/configuration.md mirrors it). Unknown keys are rejected so a typo never
//! silently falls back to a default. Config is the bottom layer: it depends on
//! nothing else in the crate.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

mod cloudevents;
mod duration;
mod http;
mod kafka;
mod log;
mod outbox;
mod outboxes;
mod pg_url;
mod postgres;
mod relay;
mod table;
// `[tracing]`; named apart from the `tracing` crate this module logs with.
#[path = "tracing.rs"]
mod tracing_section;

pub use cloudevents::CloudEventsConfig;
pub use http::HttpConfig;
pub use kafka::{is_secret_property, KafkaConfig};
pub use log::{LogConfig, LogFormat};
pub use outbox::OutboxConfig;
pub use outboxes::OutboxEntry;
pub use pg_url::{redact_url, split_url, TlsMode};
pub use postgres::PostgresConfig;
pub use relay::{Delivery, MessageTimestamp, OnPublish, Ordering, RelayConfig};
pub use table::TableName;
pub use tracing_section::TracingConfig;

/// Name of the file read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG_FILE: &str = "outbox-relay.toml";
/// Prefix of the environment variables (`OUTBOX_RELAY__POSTGRES__URL`, …).
pub const ENV_PREFIX: &str = "OUTBOX_RELAY";

/// A configuration problem, reported as one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn key(key: &str, msg: impl fmt::Display) -> Self {
        ConfigError(format!("config: `{key}` {msg}"))
    }
}

/// The whole, validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// PostgreSQL connection.
    pub postgres: PostgresConfig,
    /// Kafka producer.
    pub kafka: KafkaConfig,
    /// The outbox table.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// Several outbox tables in one process (instead of `[outbox]`).
    #[serde(default)]
    pub outboxes: Vec<OutboxEntry>,
    /// The relay loop.
    #[serde(default)]
    pub relay: RelayConfig,
    /// The opt-in CloudEvents mapping.
    #[serde(default)]
    pub cloudevents: CloudEventsConfig,
    /// Spans over OTLP for rows that carry a `traceparent`.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// Metrics and health endpoints.
    #[serde(default)]
    pub http: HttpConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

/// Settings with a fixed set of values: deserialized from a string, and an
/// unknown value is reported with the list of allowed ones.
macro_rules! string_enum {
    ($ty:ident { $($text:literal => $variant:ident),+ $(,)? }) => {
        impl $ty {
            pub const VALUES: &'static [&'static str] = &[$($text),+];
            pub fn as_str(&self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                match s.trim() {
                    $($text => Ok($ty::$variant),)+
                    other => Err(serde::de::Error::custom(format!(
                        "invalid value {other:?}; allowed: {}",
                        Self::VALUES.iter().map(|v| format!("\"{v}\"")).collect::<Vec<_>>().join(", ")
                    ))),
                }
            }
        }
    };
}
pub(crate) use string_enum;

/// The environment variables that set one librdkafka property each.
const KAFKA_PROPERTY_ENV: &str = "OUTBOX_RELAY__KAFKA__PROPERTIES__";

impl Settings {
    /// Loads and validates the configuration: `file` (or `outbox-relay.toml` when it
    /// exists), then `OUTBOX_RELAY__…` environment variables on top.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`], for the commands that use only Postgres
    /// (`migrate`, `status`, `replay`, `cleanup`): `kafka.brokers` may be
    /// missing (a migration role's environment has no Kafka settings).
    pub fn load_postgres_only(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_inner(file, std::env::vars(), false)
    }

    /// Like [`Settings::load`] with an explicit environment (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        Self::load_inner(file, env, true)
    }

    fn load_inner(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        kafka_needed: bool,
    ) -> Result<Settings, ConfigError> {
        // librdkafka's property names have dots, which the layered source would
        // read as nesting: `OUTBOX_RELAY__KAFKA__PROPERTIES__SSL_CA_LOCATION`
        // is `kafka.properties."ssl.ca.location"` (lower case, `_` → `.`).
        let (props, env): (Vec<_>, Vec<_>) =
            env.into_iter().partition(|(k, _)| k.starts_with(KAFKA_PROPERTY_ENV) && k.len() > KAFKA_PROPERTY_ENV.len());
        let raw = layered(file, env)?;
        let mut settings: Settings = raw.try_deserialize().map_err(|e| ConfigError(format!("config: {e}")))?;
        for (k, v) in props {
            let name = k[KAFKA_PROPERTY_ENV.len()..].to_ascii_lowercase().replace('_', ".");
            settings.kafka.properties.insert(name, v);
        }
        settings.kafka.resolve_secrets()?;
        settings.validate(kafka_needed)?;
        Ok(settings)
    }

    /// Each section checks its own keys; what spans sections is checked here.
    /// Without `kafka_needed` (a command that never contacts Kafka),
    /// `kafka.brokers` may be missing.
    fn validate(&self, kafka_needed: bool) -> Result<(), ConfigError> {
        self.postgres.validate()?;
        self.outbox.validate()?;
        self.cloudevents.validate()?;
        self.tracing.validate()?;
        self.http.validate()?;
        self.log.validate()?;
        self.validate_outboxes()?;
        for s in self.outbox_settings() {
            s.validate_one(kafka_needed)?;
        }
        Ok(())
    }

    /// What depends on one outbox's relay settings (its overrides applied).
    fn validate_one(&self, kafka_needed: bool) -> Result<(), ConfigError> {
        self.kafka.validate(self.relay.delivery, kafka_needed)?;
        self.relay.validate()?;
        self.kafka.validate_against(&self.relay)?;
        // outbox-relay/<12 hex>/<schema.table>/<relay.id>/<32 hex> must fit Postgres's 200-byte gid.
        let gid_len = "outbox-relay/".len() + 13 + self.table().to_string().len() + 1 + self.relay_id().len() + 33;
        if self.relay.delivery == Delivery::ExactlyOnce && gid_len > 199 {
            return Err(ConfigError::key(
                "relay.id",
                "is too long for exactly-once mode: with the table name it must fit a 200-byte Postgres transaction id",
            ));
        }
        Ok(())
    }

    /// The validated outbox table.
    pub fn table(&self) -> TableName {
        self.outbox.table_name()
    }

    /// This instance's name: `relay.id` or the host name.
    pub fn relay_id(&self) -> String {
        self.relay.id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "outbox-relay".into())
        })
    }

    /// The Postgres URL (validated as present).
    pub fn postgres_url(&self) -> &str {
        self.postgres.url.as_deref().unwrap_or_default()
    }

    /// The Kafka bootstrap servers (validated as present).
    pub fn kafka_brokers(&self) -> &str {
        self.kafka.brokers.as_deref().unwrap_or_default()
    }
}

/// The file (if any) under the `OUTBOX_RELAY__…` variables of `env`, not yet
/// deserialized: `migrate --print` reads single keys from it.
pub fn layered(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<config::Config, ConfigError> {
    let mut builder = config::Config::builder();
    match file {
        Some(path) => {
            if !path.exists() {
                return Err(ConfigError(format!("config: file {} does not exist", path.display())));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        None => {
            let default = Path::new(DEFAULT_CONFIG_FILE);
            if default.exists() {
                builder = builder.add_source(config::File::from(default).format(config::FileFormat::Toml));
            }
        }
    }
    let env: config::Map<String, String> =
        env.into_iter().filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__"))).collect();
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(false)
            .source(Some(env)),
    );
    // Sections must exist for their required keys to be reported by name.
    builder = builder
        .set_default("postgres.pool_size", postgres::default_pool_size() as i64)
        .and_then(|b| b.set_default("kafka.properties", config::Map::<String, String>::new()))
        .map_err(|e| ConfigError(format!("config: {e}")))?;
    builder.build().map_err(|e| ConfigError(format!("config: {e}")))
}

#[cfg(test)]
mod reference_tests;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn base() -> Vec<(String, String)> {
        env(&[
            ("OUTBOX_RELAY__POSTGRES__URL", "postgres://u:s3cret@localhost:5432/db"),
            ("OUTBOX_RELAY__KAFKA__BROKERS", "localhost:9092"),
        ])
    }

    pub(super) fn load_env(extra: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut e = base();
        e.extend(env(extra));
        Settings::load_from(None, e)
    }

    #[test]
    fn postgres_only_commands_need_no_kafka_settings() {
        let e = env(&[("OUTBOX_RELAY__POSTGRES__URL", "postgres://a@h/db")]);
        let err = Settings::load_from(None, e.clone()).unwrap_err().to_string();
        assert!(err.contains("kafka.brokers"), "{err}");
        // The same environment through the Postgres-only loader.
        let s = Settings::load_inner(None, e, false).unwrap();
        assert_eq!(s.table().to_string(), "public.outbox");
    }

    #[test]
    fn kafka_properties_come_from_the_environment_with_underscores_for_dots() {
        let s = load_env(&[
            ("OUTBOX_RELAY__KAFKA__PROPERTIES__SSL_CA_LOCATION", "/ca.pem"),
            ("OUTBOX_RELAY__KAFKA__PROPERTIES__security.protocol", "SSL"),
        ])
        .unwrap();
        assert_eq!(s.kafka.properties["ssl.ca.location"], "/ca.pem");
        assert_eq!(s.kafka.properties["security.protocol"], "SSL");
        // Still guarded like the file's.
        let err = load_env(&[("OUTBOX_RELAY__KAFKA__PROPERTIES__ACKS", "1")]).unwrap_err().to_string();
        assert!(err.contains("acks"), "{err}");
    }

    #[test]
    fn env_only_config_gets_defaults() {
        let s = load_env(&[]).unwrap();
        assert_eq!(s.relay.batch_size, 500);
        assert_eq!(s.relay.on_publish, OnPublish::Mark);
        assert_eq!(s.relay.poll_interval, Duration::from_millis(100));
        assert_eq!(s.postgres.idle_in_transaction_timeout, Duration::from_secs(30));
        assert_eq!(s.table(), TableName { schema: "public".into(), table: "outbox".into() });
        assert_eq!(s.kafka_brokers(), "localhost:9092");
    }

    #[test]
    fn env_values_are_parsed_into_typed_fields() {
        let s = load_env(&[
            ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "42"),
            ("OUTBOX_RELAY__RELAY__POLL_INTERVAL", "250ms"),
            ("OUTBOX_RELAY__RELAY__ON_PUBLISH", "delete"),
            ("OUTBOX_RELAY__OUTBOX__TABLE", "billing.events_outbox"),
            ("OUTBOX_RELAY__LOG__FORMAT", "json"),
        ])
        .unwrap();
        assert_eq!(s.relay.batch_size, 42);
        assert_eq!(s.relay.poll_interval, Duration::from_millis(250));
        assert_eq!(s.relay.on_publish, OnPublish::Delete);
        assert_eq!(s.table().quoted(), "\"billing\".\"events_outbox\"");
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn toml_file_is_layered_under_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "[postgres]\nurl = \"postgres://a@h/db\"\n[kafka]\nbrokers = \"k:1\"\n[kafka.properties]\n\"linger.ms\" = \"20\"\n[relay]\nbatch_size = 7\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&path), env(&[("OUTBOX_RELAY__RELAY__BATCH_SIZE", "9")])).unwrap();
        assert_eq!(s.relay.batch_size, 9);
        assert_eq!(s.kafka.properties.get("linger.ms").map(String::as_str), Some("20"));
        assert_eq!(s.postgres_url(), "postgres://a@h/db");
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = load_env(&[("OUTBOX_RELAY__RELAY__BATCH_SIZES", "5")]).unwrap_err().to_string();
        assert!(err.contains("batch_sizes"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "[postgres]\nurl = \"postgres://a@h/db\"\nurll = \"x\"\n[kafka]\nbrokers = \"k:1\"\n")
            .unwrap();
        let err = Settings::load_from(Some(&path), Vec::new()).unwrap_err().to_string();
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn missing_required_settings_name_the_key_and_env_var() {
        let err = Settings::load_from(None, Vec::new()).unwrap_err().to_string();
        assert!(err.contains("postgres.url") && err.contains("OUTBOX_RELAY__POSTGRES__URL"), "{err}");
        let err = Settings::load_from(None, env(&[("OUTBOX_RELAY__POSTGRES__URL", "postgres://a@h/db")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.brokers"), "{err}");
    }

    #[test]
    fn bad_values_get_one_line_naming_key_and_allowed_values() {
        for (k, v, want) in [
            ("OUTBOX_RELAY__RELAY__ON_PUBLISH", "archive", "on_publish"),
            ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "0", "relay.batch_size"),
            ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "lots", "batch_size"),
            ("OUTBOX_RELAY__RELAY__PIPELINE_DEPTH", "0", "relay.pipeline_depth"),
            ("OUTBOX_RELAY__RELAY__PIPELINE_DEPTH", "4", "relay.pipeline_depth"),
            ("OUTBOX_RELAY__RELAY__POLL_INTERVAL", "soon", "poll_interval"),
            ("OUTBOX_RELAY__OUTBOX__TABLE", "x; drop table y", "outbox.table"),
            ("OUTBOX_RELAY__HTTP__LISTEN", "everywhere", "http.listen"),
            ("OUTBOX_RELAY__KAFKA__BROKERS", "nohostport", "kafka.brokers"),
            ("OUTBOX_RELAY__RELAY__DELIVERY", "exactly_once", "relay.delivery"),
            ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", "bad/topic", "relay.commits_topic"),
            ("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT", "10ms", "relay.recovery_timeout"),
            ("OUTBOX_RELAY__RELAY__LINGER", "5s", "relay.linger"),
            ("OUTBOX_RELAY__RELAY__LINGER", "-1ms", "linger"),
            ("OUTBOX_RELAY__RELAY__MAX_LINGER", "2s", "relay.max_linger"),
            ("OUTBOX_RELAY__RELAY__MAX_LINGER", "often", "max_linger"),
        ] {
            let err = load_env(&[(k, v)]).unwrap_err().to_string();
            assert!(err.contains(want), "{k}={v}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let err = load_env(&[("OUTBOX_RELAY__RELAY__ON_PUBLISH", "archive")]).unwrap_err().to_string();
        assert!(err.contains("mark") && err.contains("delete"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://u:s3cret@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("host=h password=s3cret user=u"), "host=h password=*** user=u");
        let s = load_env(&[]).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
    }
}
