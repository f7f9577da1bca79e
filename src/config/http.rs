//! `[http]`: the metrics and health endpoints.

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address for `/metrics`, `/healthz`, `/readyz`. Empty string disables it.
    #[serde(default = "default_listen")]
    pub listen: String,
}

fn default_listen() -> String {
    "0.0.0.0:9187".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: default_listen() }
    }
}

impl HttpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::key(
                "http.listen",
                format!("= {:?} is not an address; use ip:port like \"0.0.0.0:9187\", or \"\" to disable", self.listen),
            ));
        }
        Ok(())
    }
}
