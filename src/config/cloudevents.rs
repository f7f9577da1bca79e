//! `[cloudevents]`: an opt-in CloudEvents 1.0 mapping in Kafka's binary
//! content mode: the event's attributes as `ce_*` headers, its data as the
//! message value, unchanged.

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudEventsConfig {
    /// Add the CloudEvents headers to every message.
    #[serde(default)]
    pub enabled: bool,
    /// `ce_source` of every event (a URI-reference, e.g. `/orders-service`),
    /// unless `source_column` names a column that holds it.
    #[serde(default)]
    pub source: Option<String>,
    /// A column of the outbox table holding each event's `ce_source` (text);
    /// where it is NULL, `source` applies.
    #[serde(default)]
    pub source_column: Option<String>,
    /// `ce_type` of every event (e.g. `com.example.order.created`); by default
    /// the event's topic. `type_column` overrides it per row.
    #[serde(default)]
    pub r#type: Option<String>,
    /// A column of the outbox table holding each event's `ce_type` (text);
    /// where it is NULL, `type` applies.
    #[serde(default)]
    pub type_column: Option<String>,
    /// The `content-type` header (`datacontenttype`), unless the row's headers
    /// carry their own.
    #[serde(default = "default_content_type")]
    pub content_type: String,
}

fn default_content_type() -> String {
    "application/json".into()
}

impl Default for CloudEventsConfig {
    fn default() -> Self {
        CloudEventsConfig {
            enabled: false,
            source: None,
            source_column: None,
            r#type: None,
            type_column: None,
            content_type: default_content_type(),
        }
    }
}

impl CloudEventsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, column) in
            [("cloudevents.source_column", &self.source_column), ("cloudevents.type_column", &self.type_column)]
        {
            if let Some(c) = column {
                if !super::table::is_identifier(c) {
                    return Err(ConfigError::key(
                        key,
                        format!("= {c:?} is not a plain column name (letters, digits, _)"),
                    ));
                }
            }
        }
        if !self.enabled {
            return Ok(());
        }
        if self.source.as_deref().is_none_or(str::is_empty) && self.source_column.is_none() {
            return Err(ConfigError::key(
                "cloudevents.source",
                "is required when cloudevents.enabled = true (ce_source, e.g. \"/orders-service\"), unless \
                 cloudevents.source_column names a column that holds it",
            ));
        }
        if self.content_type.is_empty() {
            return Err(ConfigError::key("cloudevents.content_type", "must not be empty"));
        }
        Ok(())
    }

    /// The columns the claim must read for it: (alias, column).
    pub fn columns(&self) -> Vec<(&'static str, String)> {
        if !self.enabled {
            return Vec::new();
        }
        let mut out = Vec::new();
        out.extend(self.source_column.clone().map(|c| ("ce_source", c)));
        out.extend(self.type_column.clone().map(|c| ("ce_type", c)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_without_a_source_or_with_a_bad_column_name_is_refused() {
        let on = CloudEventsConfig { enabled: true, ..CloudEventsConfig::default() };
        assert!(on.validate().unwrap_err().to_string().contains("cloudevents.source` is required"));
        let column = CloudEventsConfig { source_column: Some("src".into()), ..on.clone() };
        assert!(column.validate().is_ok());
        assert_eq!(column.columns(), vec![("ce_source", "src".to_string())]);
        let bad = CloudEventsConfig { type_column: Some("a; DROP".into()), ..column };
        assert!(bad.validate().unwrap_err().to_string().contains("not a plain column name"));
        assert!(CloudEventsConfig::default().columns().is_empty(), "off: no columns read");
    }
}
