//! Applying the bundled migrations, each once, recorded per table.

use super::render::{render_migration, statements};
use super::{Migration, MIGRATIONS, NO_TRANSACTION};
use crate::config::TableName;
use crate::store::StoreError;

/// Records which migrations `outbox-relay migrate` applied, per outbox table.
fn version_table(table: &TableName) -> String {
    format!("\"{}\".outbox_relay_migrations", table.schema)
}

/// Applies the missing migrations up to `to` (all by default), each in its own
/// transaction, or without one when its file says `-- outbox-relay:
/// no-transaction` (it builds an index CONCURRENTLY, which never blocks the
/// application's inserts). A statement that needs a table lock waits at most
/// 2 s for it, so a migration never queues the application's inserts behind a
/// long transaction for long; it is retried up to 30 times.
pub(crate) async fn migrate(
    client: &mut tokio_postgres::Client,
    table: &TableName,
    to: Option<i32>,
) -> Result<Vec<&'static str>, StoreError> {
    // An index build on a large table may take long: no relay time bounds here.
    client
        .batch_execute(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; SET lock_timeout = '2s'",
        )
        .await?;
    forget_a_dropped_table(client, table).await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| to.is_none_or(|t| m.version <= t)) {
        let mut attempt = 0;
        loop {
            let result = if m.sql.starts_with(NO_TRANSACTION) {
                apply_outside_transaction(client, table, m).await
            } else {
                apply_in_transaction(client, table, m).await
            };
            match result {
                Err(e) if e.code() == Some("55P03") && attempt < 30 => {
                    attempt += 1;
                    tracing::warn!(attempt, migration = m.name, "waited 2 s for a lock on {table}; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(200 + fastrand::u64(0..800))).await;
                }
                Err(e) if e.code() == Some("55P03") => return Err(e),
                Err(e) => {
                    return Err(StoreError::schema(format!("migration {} failed: {e}", m.name)));
                }
                Ok(true) => {
                    applied.push(m.name);
                    break;
                }
                Ok(false) => break,
            }
        }
    }
    Ok(applied)
}

/// The versions recorded for a table that no longer exists (dropped by hand,
/// to start over) are forgotten, so `migrate` creates it again rather than
/// call a missing table up to date.
async fn forget_a_dropped_table(client: &mut tokio_postgres::Client, table: &TableName) -> Result<(), StoreError> {
    lock_schema(client, table).await?;
    let result = async {
        prepare_version_table(&*client, table).await?;
        let forgotten = client
            .execute(
                &format!("DELETE FROM {} WHERE table_name = $1 AND to_regclass($2) IS NULL", version_table(table)),
                &[&table.table, &table.quoted()],
            )
            .await?;
        if forgotten > 0 {
            tracing::warn!(
                %table, versions = forgotten,
                "{table} does not exist but {forgotten} migrations were recorded for it (dropped by hand?): \
                 creating it again"
            );
        }
        Ok(())
    }
    .await;
    unlock_schema(client, table).await;
    result
}

/// One migrator at a time per schema: several pods may start together, and the
/// tables of one schema share its version table (two concurrent `CREATE … IF
/// NOT EXISTS` of one object can both try to create it).
fn lock_key(table: &TableName) -> String {
    format!("outbox-relay migrate {}", table.schema)
}

async fn prepare_version_table(
    client: &impl tokio_postgres::GenericClient,
    table: &TableName,
) -> Result<(), StoreError> {
    client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", table.schema)).await?;
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                table_name text NOT NULL,
                version integer NOT NULL,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (table_name, version))",
            version_table(table)
        ))
        .await?;
    Ok(())
}

async fn is_applied(
    client: &impl tokio_postgres::GenericClient,
    table: &TableName,
    m: &Migration,
) -> Result<bool, StoreError> {
    Ok(client
        .query_opt(
            &format!("SELECT 1 FROM {} WHERE table_name = $1 AND version = $2", version_table(table)),
            &[&table.table, &m.version],
        )
        .await?
        .is_some())
}

async fn record(
    client: &impl tokio_postgres::GenericClient,
    table: &TableName,
    m: &Migration,
) -> Result<(), StoreError> {
    client
        .execute(
            &format!("INSERT INTO {} (table_name, version, name) VALUES ($1, $2, $3)", version_table(table)),
            &[&table.table, &m.version, &m.name],
        )
        .await?;
    Ok(())
}

/// Takes the schema's migration lock without waiting inside a statement: a
/// session that waits in `pg_advisory_lock` has a snapshot, and CREATE INDEX
/// CONCURRENTLY in the session that holds the lock waits for every older
/// snapshot: a deadlock. So it polls `pg_try_advisory_lock`.
async fn lock_schema(client: &tokio_postgres::Client, table: &TableName) -> Result<(), StoreError> {
    loop {
        let got: bool =
            client.query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&lock_key(table)]).await?.get(0);
        if got {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 + fastrand::u64(0..150))).await;
    }
}

async fn unlock_schema(client: &tokio_postgres::Client, table: &TableName) {
    let _ = client.execute("SELECT pg_advisory_unlock(hashtext($1))", &[&lock_key(table)]).await;
}

/// Returns whether it applied `m` (false: already recorded).
async fn apply_in_transaction(
    client: &mut tokio_postgres::Client,
    table: &TableName,
    m: &Migration,
) -> Result<bool, StoreError> {
    lock_schema(client, table).await?;
    let result = async {
        let tx = client.transaction().await?;
        prepare_version_table(&tx, table).await?;
        if is_applied(&tx, table, m).await? {
            return Ok(false);
        }
        tx.batch_execute(&render_migration(m.sql, table)).await?;
        record(&tx, table, m).await?;
        tx.commit().await?;
        Ok(true)
    }
    .await;
    unlock_schema(client, table).await;
    result
}

/// Each statement on its own (CREATE INDEX CONCURRENTLY cannot run in a
/// transaction), under a session-level lock. Statements are idempotent, so an
/// interrupted run is simply run again; an index a failed concurrent build left
/// invalid is dropped first.
async fn apply_outside_transaction(
    client: &mut tokio_postgres::Client,
    table: &TableName,
    m: &Migration,
) -> Result<bool, StoreError> {
    client.execute("SELECT pg_advisory_lock(hashtext($1))", &[&lock_key(table)]).await?;
    let result = async {
        prepare_version_table(&*client, table).await?;
        if is_applied(&*client, table, m).await? {
            return Ok(false);
        }
        let invalid: Vec<String> = client
            .query(
                "SELECT i.indexrelid::regclass::text FROM pg_index i
                 WHERE i.indrelid = to_regclass($1) AND NOT i.indisvalid",
                &[&table.quoted()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for index in invalid {
            client.batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {index}")).await?;
        }
        // On a small table (a new one, or one in delete mode) the index builds in
        // milliseconds: build it plainly. On a large one, CONCURRENTLY: it never
        // blocks inserts, but waits for every transaction older than itself
        // (without the 2 s lock bound, which would only make it start over).
        let pages: i64 = client
            .query_one(
                "SELECT coalesce((SELECT relpages::int8 FROM pg_class WHERE oid = to_regclass($1)), 0)",
                &[&table.quoted()],
            )
            .await?
            .get(0);
        for statement in statements(&render_migration(m.sql, table)) {
            if !statement.contains(" CONCURRENTLY ") {
                client.batch_execute(&statement).await?;
            } else if pages < 10_000 {
                client.batch_execute(&statement.replace(" CONCURRENTLY ", " ")).await?;
            } else {
                tracing::info!(
                    migration = m.name,
                    pages,
                    "building an index CONCURRENTLY; it waits for older transactions"
                );
                client.batch_execute("SET lock_timeout = 0").await?;
                let built = client.batch_execute(&statement).await;
                client.batch_execute("SET lock_timeout = '2s'").await?;
                built?;
            }
        }
        record(&*client, table, m).await?;
        Ok(true)
    }
    .await;
    unlock_schema(client, table).await;
    result
}
