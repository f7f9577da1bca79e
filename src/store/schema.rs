//! Bundled migrations (the files in `migrations/`), rendering them for a
//! configured table, applying them, and verifying the live schema.

use crate::config::TableName;

use super::StoreError;

/// One numbered migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. The files are written for `public.outbox`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_create_outbox.sql",
        sql: include_str!("../../migrations/0001_create_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "0002_retry_backoff.sql",
        sql: include_str!("../../migrations/0002_retry_backoff.sql"),
    },
    Migration {
        version: 3,
        name: "0003_no_notify_on_commit.sql",
        sql: include_str!("../../migrations/0003_no_notify_on_commit.sql"),
    },
];

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
pub(super) async fn migrate(
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

/// First line of a migration that must run outside a transaction.
const NO_TRANSACTION: &str = "-- outbox-relay: no-transaction";

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

/// The statements of a migration file without `$$` bodies: split at `;` at the
/// end of a line, comments dropped.
fn statements(sql: &str) -> Vec<String> {
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

/// Something the relay needs that the live schema lacks, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    pub message: String,
    /// Without it the relay cannot run (vs. works, but worse).
    pub fatal: bool,
}

impl std::fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Columns the relay reads or writes, the types it accepts, and the migration
/// that introduced each.
const COLUMNS: &[(&str, &[&str], &str)] = &[
    ("id", &["uuid"], "0001_create_outbox.sql"),
    ("seq", &["bigint"], "0001_create_outbox.sql"),
    ("topic", &["text", "character varying"], "0001_create_outbox.sql"),
    ("key", &["text", "character varying"], "0001_create_outbox.sql"),
    ("payload", &["jsonb", "json", "bytea", "text"], "0001_create_outbox.sql"),
    ("headers", &["jsonb", "json"], "0001_create_outbox.sql"),
    ("created_at", &["timestamp with time zone"], "0001_create_outbox.sql"),
    ("attempts", &["integer", "bigint", "smallint"], "0001_create_outbox.sql"),
    ("last_error", &["text", "character varying"], "0001_create_outbox.sql"),
    ("published_at", &["timestamp with time zone"], "0001_create_outbox.sql"),
    ("parked_at", &["timestamp with time zone"], "0001_create_outbox.sql"),
    ("retry_at", &["timestamp with time zone"], "0002_retry_backoff.sql"),
];

pub(super) async fn verify(
    client: &deadpool_postgres::Object,
    table: &TableName,
) -> Result<Vec<SchemaProblem>, StoreError> {
    let fix = "run `outbox-relay migrate`, or apply it with your migration tool (`outbox-relay migrate --print` shows the SQL)";
    let cols = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = $2",
            &[&table.schema, &table.table],
        )
        .await?;
    if cols.is_empty() {
        let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()]).await?.get(0);
        let message = if exists {
            format!("table {table} exists but this role cannot see its columns: grant SELECT, UPDATE, DELETE on it")
        } else {
            format!("table {table} does not exist: migration 0001_create_outbox.sql is not applied; {fix}")
        };
        return Ok(vec![SchemaProblem { message, fatal: true }]);
    }
    let mut problems = Vec::new();
    for (name, types, migration) in COLUMNS {
        match cols.iter().find(|r| r.get::<_, String>(0) == *name) {
            None => problems.push(SchemaProblem {
                message: format!("table {table} has no column `{name}`: migration {migration} is not applied; {fix}"),
                fatal: true,
            }),
            Some(r) => {
                let ty: String = r.get(1);
                if !types.contains(&ty.as_str()) {
                    problems.push(SchemaProblem {
                        message: format!(
                            "column {table}.{name} has type {ty}; the relay needs one of: {}",
                            types.join(", ")
                        ),
                        fatal: true,
                    });
                }
            }
        }
    }
    if !problems.is_empty() {
        return Ok(problems);
    }
    // What the relay does to the table: read, mark, delete, park.
    let missing: Vec<String> = client
        .query(
            "SELECT p FROM unnest(ARRAY['SELECT', 'UPDATE', 'DELETE']) p
             WHERE NOT has_table_privilege(current_user, $1::text::regclass, p)",
            &[&table.quoted()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !missing.is_empty() {
        let user: String = client.query_one("SELECT current_user::text", &[]).await?.get(0);
        problems.push(SchemaProblem {
            message: format!(
                "role {user} lacks {} on {table}: GRANT SELECT, UPDATE, DELETE ON {} TO {user} (see deploy/postgres/least-privilege.sql)",
                missing.join(", "),
                table.quoted()
            ),
            fatal: true,
        });
        return Ok(problems);
    }
    // The pending-rows partial index keeps claims fast however large the table.
    let indexes = client
        .query(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indrelid = $1::text::regclass",
            &[&table.quoted()],
        )
        .await?;
    let has_pending = indexes.iter().any(|r| {
        let def: String = r.get(0);
        def.contains("(seq)") && def.contains("published_at IS NULL") && def.contains("parked_at IS NULL")
    });
    if !has_pending {
        problems.push(SchemaProblem {
            message: format!(
                "table {table} lacks the partial index over pending rows (…_pending_idx ON (seq) WHERE published_at IS NULL AND parked_at IS NULL): claims will scan the table; {fix}"
            ),
            fatal: false,
        });
    }
    let has_due = indexes.iter().any(|r| {
        let def: String = r.get(0);
        def.contains("(retry_at)") && def.contains("COALESCE(published_at, parked_at) IS NULL")
    });
    if !has_due {
        problems.push(SchemaProblem {
            message: format!(
                "table {table} lacks the retry-due index (…_retry_due_idx ON (retry_at)): claims may read the pending \
                 index to find events due for a retry; migration 0003_no_notify_on_commit.sql adds it; {fix}"
            ),
            fatal: false,
        });
    }
    let invalid: Vec<String> = client
        .query(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = $1::text::regclass AND NOT indisvalid",
            &[&table.quoted()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !invalid.is_empty() {
        problems.push(SchemaProblem {
            message: format!(
                "index(es) {} of {table} are invalid (an interrupted CREATE INDEX CONCURRENTLY): DROP INDEX \
                 CONCURRENTLY them, then run `outbox-relay migrate` again",
                invalid.join(", ")
            ),
            fatal: false,
        });
    }
    // Migration 0001's NOTIFY trigger serialises the application's commits.
    let has_trigger: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND NOT tgisinternal
                 AND tgname = $2)",
            &[&table.quoted(), &format!("{}_notify", table.table)],
        )
        .await?
        .get(0);
    if has_trigger {
        problems.push(SchemaProblem {
            message: format!(
                "table {table} still has the NOTIFY trigger {}_notify from migration 0001: it serialises the \
                 application's commits (measured: ~4x fewer commits/s at 16 clients) and this relay does not need \
                 it; migration 0003_no_notify_on_commit.sql removes it; {fix}",
                table.table
            ),
            fatal: false,
        });
    }
    // The floor's guarantee (no straggler is ever passed) and per-key order both
    // need sequence values handed out in commit-compatible order: CACHE 1.
    let seq = client
        .query_opt(
            "SELECT s.seqrelid::regclass::text, s.seqcache FROM pg_sequence s
             WHERE s.seqrelid = pg_get_serial_sequence($1, 'seq')::regclass",
            &[&table.quoted()],
        )
        .await?;
    match seq {
        Some(r) if r.get::<_, i64>(1) > 1 => problems.push(SchemaProblem {
            message: format!(
                "sequence {} of {table}.seq has CACHE {}: sessions then hand out values out of order, which breaks \
                 per-key order and lets a claim pass an uncommitted row; run ALTER SEQUENCE {} CACHE 1",
                r.get::<_, String>(0),
                r.get::<_, i64>(1),
                r.get::<_, String>(0)
            ),
            fatal: true,
        }),
        Some(_) => {}
        None => problems.push(SchemaProblem {
            message: format!(
                "{table}.seq has no owned sequence (identity or serial): the relay cannot tell when uncommitted rows \
                 may still appear, so every claim scans the pending index from its start (slow with many dead rows)"
            ),
            fatal: false,
        }),
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_no_transaction_migration_splits_into_its_statements() {
        let t = TableName::parse("billing.events").unwrap();
        let sql = render_migration(MIGRATIONS[2].sql, &t);
        assert!(MIGRATIONS[2].sql.starts_with(NO_TRANSACTION));
        let st = statements(&sql);
        assert_eq!(st.len(), 3, "{st:?}");
        assert!(st[2].contains("CREATE INDEX CONCURRENTLY IF NOT EXISTS \"events_retry_due_idx\""), "{st:?}");
    }

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
