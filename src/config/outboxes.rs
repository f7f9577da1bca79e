//! `[[outboxes]]`: several outbox tables in one process, each with its own
//! claim loop, floor, fence, sweep and producer, and overrides of `[relay]`.
//! Instead of `[outbox]`; TOML only (a list has no environment form).

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Delivery, MessageTimestamp, OnPublish, Ordering, OutboxConfig, Settings, TableName};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxEntry {
    /// The outbox table, optionally schema-qualified.
    pub table: String,
    /// Its database, when not `postgres.url`'s (same settings otherwise).
    #[serde(default)]
    pub postgres_url: Option<String>,
    /// Overrides `relay.on_publish` for this table.
    #[serde(default)]
    pub on_publish: Option<OnPublish>,
    /// Overrides `relay.delivery` for this table.
    #[serde(default)]
    pub delivery: Option<Delivery>,
    /// Overrides `relay.batch_size` for this table.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Overrides `relay.retention` for this table.
    #[serde(default, deserialize_with = "optional_duration")]
    pub retention: Option<Duration>,
    /// Overrides `relay.ordering` for this table.
    #[serde(default)]
    pub ordering: Option<Ordering>,
    /// Overrides `relay.max_attempts` for this table.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Overrides `relay.message_timestamp` for this table.
    #[serde(default)]
    pub message_timestamp: Option<MessageTimestamp>,
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    super::duration::deserialize(d).map(Some)
}

impl Settings {
    /// `[[outboxes]]`: each entry valid, none twice (same table, same
    /// database), not beside an explicit `[outbox]` table; and each outbox's
    /// own settings valid.
    pub(super) fn validate_outboxes(&self) -> Result<(), ConfigError> {
        if self.outboxes.is_empty() {
            return Ok(());
        }
        if self.outbox.table != OutboxConfig::default().table {
            return Err(ConfigError::key(
                "outboxes",
                "and `outbox.table` are both set: list every table under [[outboxes]] (or use [outbox] for one)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, e) in self.outboxes.iter().enumerate() {
            e.validate(i)?;
            let db = e.postgres_url.as_deref().unwrap_or(self.postgres_url());
            if !seen.insert((TableName::parse(&e.table).map(|t| t.to_string()).unwrap_or_default(), db.to_string())) {
                return Err(ConfigError::key(
                    &format!("outboxes[{i}].table"),
                    format!("= {:?} is listed twice", e.table),
                ));
            }
        }
        Ok(())
    }

    /// The settings of each outbox this process serves: this one for
    /// `[outbox]`, or one per `[[outboxes]]` entry with its overrides applied.
    pub fn outbox_settings(&self) -> Vec<Settings> {
        if self.outboxes.is_empty() {
            return vec![self.clone()];
        }
        self.outboxes
            .iter()
            .map(|e| {
                let mut s = self.clone();
                s.outboxes.clear();
                s.outbox.table = e.table.clone();
                if let Some(url) = &e.postgres_url {
                    s.postgres.url = Some(url.clone());
                }
                let r = &mut s.relay;
                r.on_publish = e.on_publish.unwrap_or(r.on_publish);
                r.delivery = e.delivery.unwrap_or(r.delivery);
                r.batch_size = e.batch_size.unwrap_or(r.batch_size);
                r.retention = e.retention.unwrap_or(r.retention);
                r.ordering = e.ordering.unwrap_or(r.ordering);
                r.max_attempts = e.max_attempts.unwrap_or(r.max_attempts);
                r.message_timestamp = e.message_timestamp.unwrap_or(r.message_timestamp);
                s
            })
            .collect()
    }
}

impl OutboxEntry {
    pub(super) fn validate(&self, i: usize) -> Result<(), ConfigError> {
        TableName::parse(&self.table).map_err(|e| ConfigError::key(&format!("outboxes[{i}].table"), e))?;
        if let Some(url) = &self.postgres_url {
            if url.is_empty() {
                return Err(ConfigError::key(&format!("outboxes[{i}].postgres_url"), "must not be empty"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{OnPublish, Settings};

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Settings, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let mut e: Vec<(String, String)> = vec![
            ("OUTBOX_RELAY__POSTGRES__URL".into(), "postgres://a@h/db".into()),
            ("OUTBOX_RELAY__KAFKA__BROKERS".into(), "k:9092".into()),
        ];
        e.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Settings::load_from(Some(&path), e).map_err(|e| e.to_string())
    }

    #[test]
    fn each_outbox_gets_the_relay_settings_with_its_overrides() {
        let s = load(
            "[relay]\nbatch_size = 300\n[[outboxes]]\ntable = \"a.outbox\"\non_publish = \"delete\"\n\
             [[outboxes]]\ntable = \"b.outbox\"\npostgres_url = \"postgres://a@other/db2\"\nbatch_size = 7\n",
            &[],
        )
        .unwrap();
        let each = s.outbox_settings();
        assert_eq!(each.len(), 2);
        assert_eq!(
            (each[0].table().to_string(), each[0].relay.on_publish, each[0].relay.batch_size),
            ("a.outbox".into(), OnPublish::Delete, 300)
        );
        assert_eq!((each[1].relay.on_publish, each[1].relay.batch_size), (OnPublish::Mark, 7));
        assert_eq!(each[1].postgres_url(), "postgres://a@other/db2");
        assert!(each.iter().all(|o| o.outboxes.is_empty()));
    }

    #[test]
    fn a_table_twice_or_beside_outbox_table_or_a_bad_override_is_one_clear_error() {
        let twice = load("[[outboxes]]\ntable = \"a.outbox\"\n[[outboxes]]\ntable = \"a.outbox\"\n", &[]).unwrap_err();
        assert!(twice.contains("listed twice"), "{twice}");
        let both = load("[[outboxes]]\ntable = \"a.outbox\"\n", &[("OUTBOX_RELAY__OUTBOX__TABLE", "x.y")]).unwrap_err();
        assert!(both.contains("outbox.table` are both set"), "{both}");
        let bad = load("[[outboxes]]\ntable = \"a.outbox\"\nbatch_size = 0\n", &[]).unwrap_err();
        assert!(bad.contains("batch_size"), "{bad}");
        let unknown = load("[[outboxes]]\ntable = \"a.outbox\"\nbatchsize = 5\n", &[]).unwrap_err();
        assert!(unknown.contains("batchsize"), "{unknown}");
    }
}
