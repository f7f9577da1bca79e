//! Verifying the live schema: what the relay needs that the table lacks, each
//! check in a function of its own, with the fix. A fatal problem stops the
//! checks that depend on it (a missing column makes the index checks moot).

use deadpool_postgres::Object;

use super::SchemaProblem;
use crate::config::TableName;
use crate::store::shape::Shape;
use crate::store::StoreError;

/// Columns the relay reads or writes, the types it accepts, and the migration
/// that introduced each.
/// (`deliver_after` and `partition`, from 0005, are optional: see `shape`.)
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

/// Optional columns (0005): when present, of these types.
const OPTIONAL: &[(&str, &[&str])] =
    &[("deliver_after", &["timestamp with time zone"]), ("partition", &["integer", "smallint"])];

const FIX: &str =
    "run `outbox-relay migrate`, or apply it with your migration tool (`outbox-relay migrate --print` shows the SQL)";

fn fatal(message: String) -> SchemaProblem {
    SchemaProblem { message, fatal: true }
}

fn warning(message: String) -> SchemaProblem {
    SchemaProblem { message, fatal: false }
}

/// `extra`: columns the configuration names (the CloudEvents columns).
pub(crate) async fn verify(
    client: &Object,
    table: &TableName,
    extra: &[&str],
) -> Result<Vec<SchemaProblem>, StoreError> {
    let problems = columns(client, table, extra).await?;
    if !problems.is_empty() {
        return Ok(problems);
    }
    let problems = privileges(client, table).await?;
    if !problems.is_empty() {
        return Ok(problems);
    }
    let mut problems = indexes(client, table).await?;
    problems.extend(notify_trigger(client, table).await?);
    problems.extend(sequence(client, table).await?);
    Ok(problems)
}

/// The table exists, this role can see it, and it has every column with a type
/// the relay accepts.
async fn columns(client: &Object, table: &TableName, extra: &[&str]) -> Result<Vec<SchemaProblem>, StoreError> {
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
            format!("table {table} does not exist: migration 0001_create_outbox.sql is not applied; {FIX}")
        };
        return Ok(vec![fatal(message)]);
    }
    let mut problems = Vec::new();
    for (name, types, migration) in COLUMNS {
        match cols.iter().find(|r| r.get::<_, String>(0) == *name) {
            None => problems.push(fatal(format!(
                "table {table} has no column `{name}`: migration {migration} is not applied; {FIX}"
            ))),
            Some(r) => problems.extend(wrong_type(table, name, types, r.get(1))),
        }
    }
    for name in extra {
        if !cols.iter().any(|r| r.get::<_, String>(0) == *name) {
            problems.push(fatal(format!(
                "table {table} has no column `{name}`, which [cloudevents] names (source_column / type_column): \
                 add it, or change the setting"
            )));
        }
    }
    for (name, types) in OPTIONAL {
        if let Some(r) = cols.iter().find(|r| r.get::<_, String>(0) == *name) {
            problems.extend(wrong_type(table, name, types, r.get(1)));
        }
    }
    Ok(problems)
}

fn wrong_type(table: &TableName, name: &str, types: &[&str], ty: String) -> Option<SchemaProblem> {
    (!types.contains(&ty.as_str()))
        .then(|| fatal(format!("column {table}.{name} has type {ty}; the relay needs one of: {}", types.join(", "))))
}

/// What the relay does to the table: read, mark, delete, park.
async fn privileges(client: &Object, table: &TableName) -> Result<Vec<SchemaProblem>, StoreError> {
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
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let user: String = client.query_one("SELECT current_user::text", &[]).await?.get(0);
    Ok(vec![fatal(format!(
        "role {user} lacks {} on {table}: GRANT SELECT, UPDATE, DELETE ON {} TO {user} (see deploy/postgres/least-privilege.sql)",
        missing.join(", "),
        table.quoted()
    ))])
}

/// One of the table's indexes: its name, its definition as `pg_get_indexdef`
/// prints it, and whether it is valid (an interrupted concurrent build leaves
/// it invalid, and the planner never uses it).
struct IndexDef {
    name: String,
    def: String,
    valid: bool,
}

async fn index_defs(client: &Object, table: &TableName) -> Result<Vec<IndexDef>, StoreError> {
    Ok(client
        .query(
            "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid), indisvalid
             FROM pg_index WHERE indrelid = $1::text::regclass",
            &[&table.quoted()],
        )
        .await?
        .iter()
        .map(|r| IndexDef { name: r.get(0), def: r.get(1), valid: r.get(2) })
        .collect())
}

/// Migration 0004's index, as `pg_get_indexdef` prints it.
fn is_pending_key_index(def: &str) -> bool {
    def.contains("(key, seq)")
        && def.contains("(retry_at IS NULL)")
        && def.contains("(COALESCE(published_at, parked_at) IS NULL)")
}

/// Migration 0005's ready index.
fn is_ready_index(def: &str) -> bool {
    def.contains("(seq)")
        && def.contains("(deliver_after IS NULL)")
        && def.contains("(retry_at IS NULL)")
        && def.contains("(COALESCE(published_at, parked_at) IS NULL)")
}

/// Migration 0005's two indexes over delayed rows.
fn is_delayed_index(def: &str, columns: &str) -> bool {
    def.contains(columns)
        && def.contains("(deliver_after IS NOT NULL)")
        && def.contains("(retry_at IS NULL)")
        && def.contains("(COALESCE(published_at, parked_at) IS NULL)")
}

/// What the table offers beyond 0003 (its valid indexes only: the planner
/// ignores an invalid one).
pub(crate) async fn shape(client: &Object, table: &TableName) -> Result<Shape, StoreError> {
    let defs = index_defs(client, table).await?;
    let valid = |f: &dyn Fn(&str) -> bool| defs.iter().any(|i| i.valid && f(&i.def));
    let cols: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = $2 AND column_name IN ('deliver_after', 'partition')",
            &[&table.schema, &table.table],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Shape {
        key_index: valid(&is_pending_key_index),
        delay: cols.iter().any(|c| c == "deliver_after"),
        partition: cols.iter().any(|c| c == "partition"),
        ready_index: valid(&is_ready_index),
    })
}

/// The pending-rows partial index keeps claims fast however large the table;
/// the retry-due index keeps retries off the pending index; the pending key
/// index keeps a held hot key's backlog out of other relays' claims; no index
/// is left invalid by an interrupted concurrent build.
async fn indexes(client: &Object, table: &TableName) -> Result<Vec<SchemaProblem>, StoreError> {
    let all = index_defs(client, table).await?;
    let defs: Vec<&str> = all.iter().map(|i| i.def.as_str()).collect();
    let mut problems = Vec::new();
    let has_pending = defs
        .iter()
        .any(|d| d.contains("(seq)") && d.contains("published_at IS NULL") && d.contains("parked_at IS NULL"));
    if !has_pending {
        problems.push(warning(format!(
            "table {table} lacks the partial index over pending rows (…_pending_idx ON (seq) WHERE published_at IS NULL AND parked_at IS NULL): claims will scan the table; {FIX}"
        )));
    }
    let has_due =
        defs.iter().any(|d| d.contains("(retry_at)") && d.contains("COALESCE(published_at, parked_at) IS NULL"));
    if !has_due {
        problems.push(warning(format!(
            "table {table} lacks the retry-due index (…_retry_due_idx ON (retry_at)): claims may read the pending \
             index to find events due for a retry; migration 0003_no_notify_on_commit.sql adds it; {FIX}"
        )));
    }
    if !defs.iter().any(|d| is_pending_key_index(d)) {
        problems.push(warning(format!(
            "table {table} lacks the pending key index (…_pending_key_idx ON (key, seq)): with several relays, each \
             claim's order check reads the pending index from the floor to its batch, a hot key's whole backlog \
             included; migration 0004_pending_key_index.sql adds it; {FIX}"
        )));
    }
    let has_delay_indexes = defs.iter().any(|d| is_ready_index(d))
        && defs.iter().any(|d| is_delayed_index(d, "(key, seq)"))
        && defs.iter().any(|d| is_delayed_index(d, "(deliver_after)"));
    if !has_delay_indexes {
        problems.push(warning(format!(
            "table {table} lacks the ready and delayed indexes of migration 0005_partition_and_delay.sql (and \
             perhaps its deliver_after and partition columns): without them events waiting for deliver_after \
             sit in the path of every claim; {FIX}"
        )));
    }
    let invalid: Vec<&str> = all.iter().filter(|i| !i.valid).map(|i| i.name.as_str()).collect();
    if !invalid.is_empty() {
        problems.push(warning(format!(
            "index(es) {} of {table} are invalid (an interrupted CREATE INDEX CONCURRENTLY): DROP INDEX \
             CONCURRENTLY them, then run `outbox-relay migrate` again",
            invalid.join(", ")
        )));
    }
    Ok(problems)
}

/// Migration 0001's NOTIFY trigger serialises the application's commits.
async fn notify_trigger(client: &Object, table: &TableName) -> Result<Option<SchemaProblem>, StoreError> {
    let has_trigger: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND NOT tgisinternal
                 AND tgname = $2)",
            &[&table.quoted(), &format!("{}_notify", table.table)],
        )
        .await?
        .get(0);
    Ok(has_trigger.then(|| {
        warning(format!(
            "table {table} still has the NOTIFY trigger {}_notify from migration 0001: it serialises the \
             application's commits (measured: ~4x fewer commits/s at 16 clients) and this relay does not need \
             it; migration 0003_no_notify_on_commit.sql removes it; {FIX}",
            table.table
        ))
    }))
}

/// The floor's guarantee (no straggler is ever passed) and per-key order both
/// need sequence values handed out in commit-compatible order: CACHE 1.
async fn sequence(client: &Object, table: &TableName) -> Result<Option<SchemaProblem>, StoreError> {
    let seq = client
        .query_opt(
            "SELECT s.seqrelid::regclass::text, s.seqcache FROM pg_sequence s
             WHERE s.seqrelid = pg_get_serial_sequence($1, 'seq')::regclass",
            &[&table.quoted()],
        )
        .await?;
    Ok(match seq {
        Some(r) if r.get::<_, i64>(1) > 1 => Some(fatal(format!(
            "sequence {} of {table}.seq has CACHE {}: sessions then hand out values out of order, which breaks \
             per-key order and lets a claim pass an uncommitted row; run ALTER SEQUENCE {} CACHE 1",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, String>(0)
        ))),
        Some(_) => None,
        None => Some(warning(format!(
            "{table}.seq has no owned sequence (identity or serial): the relay cannot tell when uncommitted rows \
             may still appear, so every claim scans the pending index from its start (slow with many dead rows)"
        ))),
    })
}
