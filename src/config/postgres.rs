//! `[postgres]`: where the outbox lives and how the relay's sessions behave.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, redact_url, split_url, ConfigError, TlsMode};

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
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Give up a connection attempt after this long.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// `statement_timeout` of the relay's own sessions: no query of the relay
    /// runs longer on the server (the relay logs it and carries on).
    #[serde(default = "default_statement_timeout", with = "duration")]
    pub statement_timeout: Duration,
    /// `idle_in_transaction_session_timeout` of the relay's own sessions. A
    /// frozen or cut-off relay's batch is ended by Postgres after this long and
    /// its rows go to other relays (a live relay keeps an open batch alive with a
    /// heartbeat every third of this, for at most `relay.publish_timeout`). `0s`
    /// disables both.
    #[serde(default = "default_idle_in_transaction_timeout", with = "duration")]
    pub idle_in_transaction_timeout: Duration,
}

pub(super) fn default_pool_size() -> usize {
    4
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_statement_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_idle_in_transaction_timeout() -> Duration {
    Duration::from_secs(30)
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

impl PostgresConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match self.url.as_deref().map(str::trim) {
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
        if let Some(m) = &self.tls_mode {
            if TlsMode::parse(m).is_none() {
                return Err(ConfigError::key(
                    "postgres.tls_mode",
                    format!("= {m:?} is not a TLS mode; allowed: \"disable\", \"prefer\", \"require\", \"verify-ca\", \"verify-full\""),
                ));
            }
        }
        for (key, path) in
            [("postgres.tls_ca_file", &self.tls_ca_file), ("postgres.password_file", &self.password_file)]
        {
            if let Some(p) = path.as_ref().filter(|p| !p.is_file()) {
                return Err(ConfigError::key(key, format!("{} is not a readable file", p.display())));
            }
        }
        if !(1..=256).contains(&self.pool_size) {
            return Err(ConfigError::key("postgres.pool_size", "must be between 1 and 256"));
        }
        if self.statement_timeout < Duration::from_secs(1) {
            return Err(ConfigError::key("postgres.statement_timeout", "must be at least 1s"));
        }
        let idle = self.idle_in_transaction_timeout;
        if !idle.is_zero() && idle < Duration::from_secs(3) {
            return Err(ConfigError::key(
                "postgres.idle_in_transaction_timeout",
                "must be at least 3s, or 0s to disable",
            ));
        }
        Ok(())
    }
}
