//! `[log]`: format and filter of the relay's own log.

use serde::Deserialize;

use super::{string_enum, ConfigError};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable (colours on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

string_enum!(LogFormat { "text" => Text, "json" => Json });

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default = "default_format")]
    pub format: LogFormat,
    /// tracing filter, e.g. `info` or `outbox_relay=debug,rdkafka=warn`.
    #[serde(default = "default_level")]
    pub level: String,
}

fn default_format() -> LogFormat {
    LogFormat::Text
}
fn default_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: default_format(), level: default_level() }
    }
}

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map_err(|e| ConfigError::key("log.level", format!("= {:?} is not a valid filter ({e})", self.level)))?;
        Ok(())
    }
}
