//! Migrations rendered for a configured table: `public.outbox` becomes the
//! table, and every `outbox_*` object is renamed with it.

use crate::config::TableName;

/// Renders a migration for `table`: `public.outbox` becomes the configured table,
/// and every `outbox_*` object (indexes, trigger, function) is renamed with it.
pub fn render_migration(sql: &str, table: &TableName) -> String {
    if table.schema == "public" && table.table == "outbox" {
        return sql.to_string();
    }
    // The NOTIFY channel is a string literal, not an identifier.
    let sql = sql.replace("'public.outbox'", &format!("'{}'", table.channel()));
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 64);
    let mut i = 0;
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    while i < sql.len() {
        let at_word_start = i == 0 || !is_word(bytes[i - 1]);
        if at_word_start && sql[i..].starts_with("public.outbox") {
            let mut j = i + "public.outbox".len();
            while j < sql.len() && is_word(bytes[j]) {
                j += 1;
            }
            let suffix = &sql[i + "public.outbox".len()..j];
            out.push_str(&format!("\"{}\".\"{}{}\"", table.schema, table.table, suffix));
            i = j;
            continue;
        }
        if at_word_start && sql[i..].starts_with("outbox_") {
            let mut j = i + "outbox_".len();
            while j < sql.len() && is_word(bytes[j]) {
                j += 1;
            }
            if j > i + "outbox_".len() {
                out.push_str(&format!("\"{}{}\"", table.table, &sql[i + "outbox".len()..j]));
                i = j;
                continue;
            }
        }
        let ch = sql[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The statements of a migration file without `$$` bodies: split at `;` at the
/// end of a line, comments dropped.
pub(super) fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let code = line.split("--").next().unwrap_or("");
        if code.trim().is_empty() {
            continue;
        }
        current.push_str(code);
        current.push('\n');
        if code.trim_end().ends_with(';') {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.trim().is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::MIGRATIONS;

    #[test]
    fn default_table_renders_the_file_unchanged() {
        let t = TableName::parse("public.outbox").unwrap();
        assert_eq!(render_migration(MIGRATIONS[0].sql, &t), MIGRATIONS[0].sql);
    }

    #[test]
    fn custom_table_renames_every_derived_object() {
        let t = TableName::parse("billing.events").unwrap();
        let sql = render_migration(MIGRATIONS[0].sql, &t);
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS \"billing\".\"events\" ("), "{sql}");
        assert!(sql.contains("\"events_pending_idx\""));
        assert!(sql.contains("ON \"billing\".\"events\" (seq)"));
        assert!(sql.contains("FUNCTION \"billing\".\"events_notify\"()"));
        assert!(sql.contains("pg_notify('billing.events', '')"));
        assert!(sql.contains("CREATE TRIGGER \"events_notify\""));
        let drop = render_migration(MIGRATIONS[2].sql, &t);
        assert!(drop.contains("DROP TRIGGER IF EXISTS \"events_notify\" ON \"billing\".\"events\""), "{drop}");
        assert!(drop.contains("DROP FUNCTION IF EXISTS \"billing\".\"events_notify\"()"), "{drop}");
        // nothing of the default table is left in executable lines
        for line in sql.lines().filter(|l| !l.trim_start().starts_with("--")) {
            assert!(!line.contains("public.outbox") && !line.contains(" outbox_"), "{line}");
        }
    }
}
