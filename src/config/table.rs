//! A validated, schema-qualified table name, quoted once for SQL.

use std::fmt;

/// A validated, schema-qualified table name. Both parts are plain SQL identifiers
/// (`[A-Za-z_][A-Za-z0-9_]*`), so quoting them once is enough for safe SQL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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

    /// The LISTEN/NOTIFY channel `replay` signals.
    pub fn channel(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

pub(super) fn is_identifier(s: &str) -> bool {
    // 50 leaves room for the suffixes of derived objects within Postgres' 63 bytes.
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 50
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated_identifiers() {
        assert_eq!(TableName::parse("outbox").unwrap().quoted(), "\"public\".\"outbox\"");
        assert!(TableName::parse("a.b.c").is_err());
        assert!(TableName::parse("1abc").is_err());
        assert!(TableName::parse("ab\"c").is_err());
        assert!(TableName::parse("").is_err());
    }
}
