//! `outbox-relay migrate [--print]`.

use std::path::Path;

use super::{exit, CliError};
use crate::config::{Settings, TableName};
use crate::store::{render_migration, Store, MIGRATIONS};

/// Prints every migration rendered for the configured table (each table of
/// `[[outboxes]]`, or the one `--outbox` names). Needs only the table names,
/// so it works without database or broker settings.
pub fn print(config: Option<&Path>, to: Option<i32>, outbox: Option<&str>) -> Result<(), CliError> {
    let tables = match Settings::load_postgres_only(config) {
        Ok(s) => s.outbox_settings().iter().map(Settings::table).collect(),
        Err(_) => vec![table_only(config)?],
    };
    let tables: Vec<TableName> = match outbox {
        Some(o) => {
            let wanted = TableName::parse(o).map_err(|e| CliError::new(exit::USAGE, format!("--outbox {o:?}: {e}")))?;
            vec![wanted]
        }
        None => tables,
    };
    for table in &tables {
        if tables.len() > 1 {
            println!("-- ===== outbox {table} =====");
        }
        for m in MIGRATIONS.iter().filter(|m| to.is_none_or(|t| m.version <= t)) {
            println!("-- {} (outbox-relay migration {})", m.name, m.version);
            println!("{}", render_migration(m.sql, table).trim_end());
            println!();
        }
    }
    Ok(())
}

/// Reads just `outbox.table` (env or file) when the rest of the config is absent.
fn table_only(config: Option<&Path>) -> Result<TableName, CliError> {
    let mut builder = config::Config::builder();
    if let Some(p) = config {
        builder = builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
    } else if Path::new(crate::config::DEFAULT_CONFIG_FILE).exists() {
        builder = builder
            .add_source(config::File::with_name(crate::config::DEFAULT_CONFIG_FILE).format(config::FileFormat::Toml));
    }
    let raw = builder
        .add_source(config::Environment::with_prefix("OUTBOX_RELAY").prefix_separator("__").separator("__"))
        .build()
        .map_err(|e| CliError::new(exit::USAGE, format!("config: {e}")))?;
    let name = raw.get_string("outbox.table").unwrap_or_else(|_| "public.outbox".into());
    TableName::parse(&name).map_err(|e| CliError::new(exit::USAGE, format!("config: `outbox.table` {e}")))
}

pub async fn apply(settings: Settings, to: Option<i32>) -> Result<(), CliError> {
    if let Some(t) = to.filter(|t| !MIGRATIONS.iter().any(|m| m.version == *t)) {
        return Err(CliError::new(
            exit::USAGE,
            format!("--to {t}: no such migration; known versions 1..={}", MIGRATIONS.len()),
        ));
    }
    let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let applied = store.migrate(to).await.map_err(|e| super::store_error(&store, e))?;
    if applied.is_empty() {
        println!("{}: schema is up to date ({} migrations)", store.table(), MIGRATIONS.len());
    } else {
        for name in applied {
            println!("{}: applied {name}", store.table());
        }
    }
    Ok(())
}
