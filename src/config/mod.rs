//! Configuration: an optional TOML file layered under `OUTBOX_RELAY__SECTION__KEY`
//! environment variables, validated once into [`Settings`].
//!
//! Every field's `///` comment is the user's documentation of that setting (the
//! README's configuration reference mirrors it). Unknown keys are rejected so a
//! typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod pg_url;
pub use pg_url::{redact_url, split_url, TlsMode};

/// Name of the file read when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG_FILE: &str = "outbox-relay.toml";
/// Prefix of the environment variables (`OUTBOX_RELAY__POSTGRES__URL`, …).
pub const ENV_PREFIX: &str = "OUTBOX_RELAY";

/// A configuration problem, reported as one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn key(key: &str, msg: impl fmt::Display) -> Self {
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
    /// The relay loop.
    #[serde(default)]
    pub relay: RelayConfig,
    /// Metrics and health endpoints.
    #[serde(default)]
    pub http: HttpConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, e.g. `postgres://relay:secret@db:5432/app?sslmode=disable`.
    /// Required. The password is never logged.
    #[serde(default)]
    pub url: Option<String>,
    /// TLS: `disable`, `prefer` (default), `require` (encrypt, no verification, as
    /// libpq), `verify-ca` or `verify-full` (also checks the host name). Overrides
    /// `sslmode` in the URL.
    #[serde(default)]
    pub tls_mode: Option<String>,
    /// CA bundle (PEM) to verify the server with; the system store otherwise.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Read the password from this file (e.g. a mounted Kubernetes secret) instead
    /// of putting it in the URL.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connections in the pool used for claiming and marking batches.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    /// Give up a connection attempt after this long.
    #[serde(default = "defaults::connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// `statement_timeout` of the relay's own sessions: no query of the relay
    /// runs longer on the server (the relay logs it and carries on).
    #[serde(default = "defaults::statement_timeout", with = "duration")]
    pub statement_timeout: Duration,
    /// `idle_in_transaction_session_timeout` of the relay's own sessions. A live
    /// relay keeps an open batch alive while it waits for Kafka (a heartbeat every
    /// third of this); a frozen or cut-off relay's batch is ended by Postgres after
    /// this long and its rows go to other relays. `0s` disables both.
    #[serde(default = "defaults::idle_in_transaction_timeout", with = "duration")]
    pub idle_in_transaction_timeout: Duration,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("password_file", &self.password_file)
            .field("tls_mode", &self.tls_mode)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("idle_in_transaction_timeout", &self.idle_in_transaction_timeout)
            .finish()
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`host:9092,host2:9092`). Required.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Any librdkafka producer property (`compression.type`, `linger.ms`,
    /// `security.protocol`, `sasl.*`, `ssl.*`, …). `enable.idempotence` and `acks`
    /// cannot be weakened: the no-loss guarantee depends on them.
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// The outbox table, optionally schema-qualified (`public.outbox`).
    #[serde(default = "defaults::table")]
    pub table: String,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig { table: defaults::table() }
    }
}

/// What happens to a row once Kafka acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPublish {
    /// Set `published_at`; the row is kept for `relay.retention` (replay, audit).
    Mark,
    /// Delete the row at once (fastest).
    Delete,
}

/// Ordering policy for events that are parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Per-key order; a parked event is skipped so its key keeps flowing.
    PerKey,
    /// Per-key order; a parked event blocks later events of its key until replayed.
    Strict,
}

/// Delivery semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every event at least once; a crash may republish the in-flight batch.
    AtLeastOnce,
    /// Kafka transactions; read_committed consumers see each event once.
    ExactlyOnce,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Name of this relay instance (logs, metrics; in exactly-once mode part of the Kafka
    /// transactional id, so unique per running relay and stable across its restarts).
    /// Defaults to the host name.
    #[serde(default)]
    pub id: Option<String>,
    /// Rows claimed per batch.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Longest wait between two looks at the outbox while it is empty. The wait
    /// starts at 1 ms when the outbox runs dry and grows with the idle time (an
    /// eighth of it) up to this; a busy relay never waits.
    #[serde(default = "defaults::poll_interval", with = "duration")]
    pub poll_interval: Duration,
    /// How often the relay looks for pending rows below its floor (one statement
    /// on its own connection, off the claim path): the safety net for replayed
    /// events whose notification was lost. Under a held xmin horizon that look
    /// passes every dead entry once; no claim waits for it.
    #[serde(default = "defaults::sweep_interval", with = "duration")]
    pub sweep_interval: Duration,
    /// `mark` (keep published rows for `retention`) or `delete`.
    #[serde(default = "defaults::on_publish")]
    pub on_publish: OnPublish,
    /// How long published rows are kept with `on_publish = "mark"`.
    #[serde(default = "defaults::retention", with = "duration")]
    pub retention: Duration,
    /// Permanent failures of one event before it is parked.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// First delay before a rejected event is tried again; doubles per attempt, at
    /// most 5 minutes. Later events of its key wait meanwhile; other keys flow.
    #[serde(default = "defaults::retry_backoff", with = "duration")]
    pub retry_backoff: Duration,
    /// `per-key` or `strict` (a parked event blocks its own key).
    #[serde(default = "defaults::ordering")]
    pub ordering: Ordering,
    /// `at-least-once` or `exactly-once`.
    #[serde(default = "defaults::delivery")]
    pub delivery: Delivery,
    /// Exactly-once: a relay resolves another relay's prepared batch (fencing
    /// that relay's Kafka transactional id) once it is older than this.
    #[serde(default = "defaults::recovery_timeout", with = "duration")]
    pub recovery_timeout: Duration,
    /// Exactly-once: the compacted, single-partition topic that records each
    /// batch's commit decision inside its Kafka transaction.
    #[serde(default = "defaults::commits_topic")]
    pub commits_topic: String,
    /// On SIGTERM/SIGINT: time to finish (or release) the in-flight batch and flush.
    #[serde(default = "defaults::shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// At start-up, keep retrying unreachable Postgres/Kafka this long before exiting.
    #[serde(default = "defaults::startup_timeout", with = "duration")]
    pub startup_timeout: Duration,
    /// Upper bound of the exponential back-off after transient failures.
    #[serde(default = "defaults::max_backoff", with = "duration")]
    pub max_backoff: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            id: None,
            batch_size: defaults::batch_size(),
            poll_interval: defaults::poll_interval(),
            sweep_interval: defaults::sweep_interval(),
            on_publish: defaults::on_publish(),
            retention: defaults::retention(),
            max_attempts: defaults::max_attempts(),
            retry_backoff: defaults::retry_backoff(),
            ordering: defaults::ordering(),
            delivery: defaults::delivery(),
            recovery_timeout: defaults::recovery_timeout(),
            commits_topic: defaults::commits_topic(),
            shutdown_timeout: defaults::shutdown_timeout(),
            startup_timeout: defaults::startup_timeout(),
            max_backoff: defaults::max_backoff(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address for `/metrics`, `/healthz`, `/readyz`. Empty string disables it.
    #[serde(default = "defaults::http_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: defaults::http_listen() }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable (colours on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default = "defaults::log_format")]
    pub format: LogFormat,
    /// tracing filter, e.g. `info` or `outbox_relay=debug,rdkafka=warn`.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: defaults::log_format(), level: defaults::log_level() }
    }
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
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
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

string_enum!(OnPublish { "mark" => Mark, "delete" => Delete });
string_enum!(Ordering { "per-key" => PerKey, "strict" => Strict });
string_enum!(Delivery { "at-least-once" => AtLeastOnce, "exactly-once" => ExactlyOnce });
string_enum!(LogFormat { "text" => Text, "json" => Json });

mod defaults {
    use super::*;
    pub fn pool_size() -> usize {
        4
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn table() -> String {
        "public.outbox".into()
    }
    pub fn batch_size() -> usize {
        500
    }
    pub fn poll_interval() -> Duration {
        Duration::from_millis(100)
    }
    pub fn sweep_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn statement_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn idle_in_transaction_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn on_publish() -> OnPublish {
        OnPublish::Mark
    }
    pub fn retention() -> Duration {
        Duration::from_secs(7 * 24 * 3600)
    }
    pub fn max_attempts() -> u32 {
        10
    }
    pub fn retry_backoff() -> Duration {
        Duration::from_secs(1)
    }
    pub fn ordering() -> Ordering {
        Ordering::PerKey
    }
    pub fn delivery() -> Delivery {
        Delivery::AtLeastOnce
    }
    pub fn recovery_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn commits_topic() -> String {
        "__outbox_relay_commits".into()
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn startup_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_backoff() -> Duration {
        Duration::from_secs(30)
    }
    pub fn http_listen() -> String {
        "0.0.0.0:9187".into()
    }
    pub fn log_format() -> LogFormat {
        LogFormat::Text
    }
    pub fn log_level() -> String {
        "info".into()
    }
}

/// Durations as human strings: `500ms`, `10s`, `5m`, `7d`.
mod duration {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); use e.g. \"500ms\", \"10s\", \"5m\", \"7d\""
            ))
        })
    }
}

/// A validated, schema-qualified table name. Both parts are plain SQL identifiers
/// (`[A-Za-z_][A-Za-z0-9_]*`), so quoting them once is enough for safe SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

impl TableName {
    pub fn parse(s: &str) -> Result<TableName, String> {
        let parts: Vec<&str> = s.split('.').collect();
        let (schema, table) = match parts.as_slice() {
            [t] => ("public", *t),
            [s, t] => (*s, *t),
            _ => return Err(format!("{s:?} is not a table name; use `table` or `schema.table`")),
        };
        for part in [schema, table] {
            if !is_identifier(part) {
                return Err(format!(
                    "{part:?} is not a valid identifier; use letters, digits and _ (max 50 chars), starting with a letter or _"
                ));
            }
        }
        Ok(TableName { schema: schema.to_string(), table: table.to_string() })
    }

    /// Exactly-once: the prefix of transactional ids (and prepared-transaction
    /// ids) that relays before 0.2 used for this table (see `store::TxnIds`).
    pub fn legacy_transactional_prefix(&self) -> String {
        format!("outbox-relay/{}.{}/", self.schema, self.table)
    }

    /// `"schema"."table"`, ready to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema, self.table)
    }

    /// A sibling object in the same schema (`"schema"."table_suffix"`).
    pub fn sibling(&self, suffix: &str) -> String {
        format!("\"{}\".\"{}_{}\"", self.schema, self.table, suffix)
    }

    /// The LISTEN/NOTIFY channel the migration's trigger signals.
    pub fn channel(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

fn is_identifier(s: &str) -> bool {
    // 50 leaves room for the suffixes of derived objects within Postgres' 63 bytes.
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 50
}

impl Settings {
    /// Loads and validates the configuration: `file` (or `outbox-relay.toml` when it
    /// exists), then `OUTBOX_RELAY__…` environment variables on top.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`] with an explicit environment (tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
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
            .set_default("postgres.pool_size", defaults::pool_size() as i64)
            .and_then(|b| b.set_default("kafka.properties", config::Map::<String, String>::new()))
            .map_err(|e| ConfigError(format!("config: {e}")))?;
        let raw = builder.build().map_err(|e| ConfigError(format!("config: {e}")))?;
        let settings: Settings = raw.try_deserialize().map_err(|e| ConfigError(format!("config: {e}")))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match self.postgres.url.as_deref().map(str::trim) {
            None | Some("") => {
                return Err(ConfigError::key(
                    "postgres.url",
                    "is required: set it in the config file or OUTBOX_RELAY__POSTGRES__URL (e.g. postgres://user:pass@host:5432/db)",
                ))
            }
            Some(url) => {
                let (url, _, _) = split_url(url);
                url.parse::<tokio_postgres::Config>().map_err(|e| {
                    ConfigError::key("postgres.url", format!("is not a valid connection string ({e}): {}", redact_url(&url)))
                })?;
            }
        }
        if let Some(m) = &self.postgres.tls_mode {
            if TlsMode::parse(m).is_none() {
                return Err(ConfigError::key(
                    "postgres.tls_mode",
                    format!("= {m:?} is not a TLS mode; allowed: \"disable\", \"prefer\", \"require\", \"verify-ca\", \"verify-full\""),
                ));
            }
        }
        if let Some(p) = &self.postgres.tls_ca_file {
            if !p.is_file() {
                return Err(ConfigError::key(
                    "postgres.tls_ca_file",
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        if let Some(p) = &self.postgres.password_file {
            if !p.is_file() {
                return Err(ConfigError::key(
                    "postgres.password_file",
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
        if !(1..=256).contains(&self.postgres.pool_size) {
            return Err(ConfigError::key("postgres.pool_size", "must be between 1 and 256"));
        }
        match self.kafka.brokers.as_deref().map(str::trim) {
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
        for (name, value) in &self.kafka.properties {
            check_kafka_property(name, value)?;
        }
        TableName::parse(&self.outbox.table).map_err(|e| ConfigError::key("outbox.table", e))?;
        if let Some(id) = &self.relay.id {
            let ok =
                !id.is_empty() && id.len() <= 100 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(ConfigError::key(
                    "relay.id",
                    "must be 1-100 characters of letters, digits, '-', '_' or '.'",
                ));
            }
        }
        if !(1..=50_000).contains(&self.relay.batch_size) {
            return Err(ConfigError::key("relay.batch_size", "must be between 1 and 50000"));
        }
        if self.relay.poll_interval < Duration::from_millis(10) {
            return Err(ConfigError::key("relay.poll_interval", "must be at least 10ms"));
        }
        if self.relay.sweep_interval < Duration::from_secs(1) {
            return Err(ConfigError::key("relay.sweep_interval", "must be at least 1s"));
        }
        if self.postgres.statement_timeout < Duration::from_secs(1) {
            return Err(ConfigError::key("postgres.statement_timeout", "must be at least 1s"));
        }
        let idle = self.postgres.idle_in_transaction_timeout;
        if !idle.is_zero() && idle < Duration::from_secs(3) {
            return Err(ConfigError::key(
                "postgres.idle_in_transaction_timeout",
                "must be at least 3s, or 0s to disable",
            ));
        }
        if self.relay.max_attempts == 0 {
            return Err(ConfigError::key("relay.max_attempts", "must be at least 1"));
        }
        if self.relay.recovery_timeout < Duration::from_secs(1) {
            return Err(ConfigError::key("relay.recovery_timeout", "must be at least 1s"));
        }
        let topic = &self.relay.commits_topic;
        if topic.is_empty()
            || topic.len() > 249
            || !topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            || topic == "."
            || topic == ".."
        {
            return Err(ConfigError::key(
                "relay.commits_topic",
                "must be a Kafka topic name: 1-249 characters of letters, digits, '.', '_' or '-'",
            ));
        }
        // outbox-relay/<12 hex>/<schema.table>/<relay.id>/<32 hex> must fit Postgres's 200-byte gid.
        let gid_len = "outbox-relay/".len() + 13 + self.table().to_string().len() + 1 + self.relay_id().len() + 33;
        if self.relay.delivery == Delivery::ExactlyOnce && gid_len > 199 {
            return Err(ConfigError::key(
                "relay.id",
                "is too long for exactly-once mode: with the table name it must fit a 200-byte Postgres transaction id",
            ));
        }
        if self.relay.max_backoff < Duration::from_millis(100) {
            return Err(ConfigError::key("relay.max_backoff", "must be at least 100ms"));
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::key(
                "http.listen",
                format!(
                    "= {:?} is not an address; use ip:port like \"0.0.0.0:9187\", or \"\" to disable",
                    self.http.listen
                ),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError::key("log.level", format!("= {:?} is not a valid filter ({e})", self.log.level))
        })?;
        Ok(())
    }

    /// The validated outbox table.
    pub fn table(&self) -> TableName {
        // validate() already checked it; parsing again keeps TableName out of serde.
        TableName::parse(&self.outbox.table)
            .unwrap_or_else(|_| TableName { schema: "public".into(), table: "outbox".into() })
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

/// Properties the guarantees depend on may be restated, never weakened.
fn check_kafka_property(name: &str, value: &str) -> Result<(), ConfigError> {
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
        _ if name.trim().is_empty() => Err(ConfigError::key("kafka.properties", "has an empty property name")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
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

    fn load_env(extra: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut e = base();
        e.extend(env(extra));
        Settings::load_from(None, e)
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
            ("OUTBOX_RELAY__RELAY__POLL_INTERVAL", "soon", "poll_interval"),
            ("OUTBOX_RELAY__OUTBOX__TABLE", "x; drop table y", "outbox.table"),
            ("OUTBOX_RELAY__HTTP__LISTEN", "everywhere", "http.listen"),
            ("OUTBOX_RELAY__KAFKA__BROKERS", "nohostport", "kafka.brokers"),
            ("OUTBOX_RELAY__RELAY__DELIVERY", "exactly_once", "relay.delivery"),
            ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", "bad/topic", "relay.commits_topic"),
            ("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT", "10ms", "relay.recovery_timeout"),
        ] {
            let err = load_env(&[(k, v)]).unwrap_err().to_string();
            assert!(err.contains(want), "{k}={v}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let err = load_env(&[("OUTBOX_RELAY__RELAY__ON_PUBLISH", "archive")]).unwrap_err().to_string();
        assert!(err.contains("mark") && err.contains("delete"), "{err}");
    }

    #[test]
    fn guarantee_properties_cannot_be_weakened() {
        assert!(check_kafka_property("enable.idempotence", "false").is_err());
        assert!(check_kafka_property("acks", "1").is_err());
        assert!(check_kafka_property("acks", "all").is_ok());
        assert!(check_kafka_property("max.in.flight.requests.per.connection", "10").is_err());
        assert!(check_kafka_property("transactional.id", "x").is_err());
        assert!(check_kafka_property("compression.type", "zstd").is_ok());
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

    #[test]
    fn table_names_are_validated_identifiers() {
        assert_eq!(TableName::parse("outbox").unwrap().quoted(), "\"public\".\"outbox\"");
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("1abc").is_err());
        assert!(TableName::parse("ab\"c").is_err());
        assert!(TableName::parse("").is_err());
    }
}
