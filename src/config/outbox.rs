//! `[outbox]`: which table the relay serves.

use serde::Deserialize;

use super::{ConfigError, TableName};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// The outbox table, optionally schema-qualified (`public.outbox`).
    #[serde(default = "default_table")]
    pub table: String,
}

fn default_table() -> String {
    "public.outbox".into()
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig { table: default_table() }
    }
}

impl OutboxConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        TableName::parse(&self.table).map_err(|e| ConfigError::key("outbox.table", e))?;
        Ok(())
    }

    /// The validated table name.
    pub fn table_name(&self) -> TableName {
        // validate() already checked it; parsing again keeps TableName out of serde.
        TableName::parse(&self.table).unwrap_or_else(|_| TableName { schema: "public".into(), table: "outbox".into() })
    }
}
