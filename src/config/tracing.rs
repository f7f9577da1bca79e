//! `[tracing]`: continuing the application's traces. When a row carries a W3C
//! `traceparent` header, the relay records a producer span from claim to
//! broker ack in that trace and exports it over OTLP.

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Where to export spans: an OTLP/HTTP traces endpoint, e.g.
    /// `http://127.0.0.1:4318/v1/traces`. Unset: no spans, and the row's
    /// `traceparent` passes through unchanged.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the relay's spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    "outbox-relay".into()
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig { otlp_endpoint: None, service_name: default_service_name() }
    }
}

impl TracingConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(e) = self.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::key(
                    "tracing.otlp_endpoint",
                    format!(
                        "= {e:?} must be an http:// or https:// URL (OTLP/HTTP, e.g. http://127.0.0.1:4318/v1/traces)"
                    ),
                ));
            }
        }
        if self.service_name.is_empty() {
            return Err(ConfigError::key("tracing.service_name", "must not be empty"));
        }
        Ok(())
    }

    /// The endpoint, when tracing is on.
    pub fn endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref().filter(|e| !e.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_must_be_an_http_url_and_empty_means_off() {
        let off = TracingConfig { otlp_endpoint: Some(String::new()), ..TracingConfig::default() };
        assert!(off.validate().is_ok() && off.endpoint().is_none());
        let bad = TracingConfig { otlp_endpoint: Some("collector:4317".into()), ..TracingConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("must be an http:// or https:// URL"));
        let on =
            TracingConfig { otlp_endpoint: Some("http://127.0.0.1:4318/v1/traces".into()), ..TracingConfig::default() };
        assert_eq!(on.endpoint(), Some("http://127.0.0.1:4318/v1/traces"));
    }
}
