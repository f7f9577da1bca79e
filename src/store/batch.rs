//! Claiming a batch of pending rows and recording what happened to each.
//!
//! A claim is one open transaction holding row locks (`FOR UPDATE SKIP LOCKED`)
//! while the batch is published; its outcome is written and committed only after
//! Kafka answered for every row. If the relay dies meanwhile, Postgres rolls the
//! transaction back and the rows are pending again: nothing is ever marked
//! published before Kafka acknowledged it.

use tokio_postgres::types::{FromSql, Type};

use crate::config::{OnPublish, Ordering, TableName};
use crate::event::OutboxEvent;

use super::{Store, StoreError};

/// What happened to one claimed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Kafka acknowledged it: mark published (or delete).
    Delivered,
    /// Kafka (or the row itself) rejected it for good: count the attempt, park it
    /// after `relay.max_attempts` (at once when `park_now`).
    Failed(EventFailure),
    /// Not delivered for a passing reason: leave it pending, untouched.
    Retry,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFailure {
    pub error: String,
    pub park_now: bool,
}

/// SQL for one table, built once from validated identifiers.
#[derive(Debug, Clone)]
pub(super) struct Statements {
    claim: String,
    fence: String,
    mark: String,
    delete: String,
    fail: String,
    pub(super) on_publish: OnPublish,
    pub(super) ordering: Ordering,
    retry_backoff_s: f64,
}

impl Statements {
    pub(super) fn new(
        table: &TableName,
        on_publish: OnPublish,
        ordering: Ordering,
        retry_backoff: std::time::Duration,
    ) -> Statements {
        let t = table.quoted();
        // Strict order: an event whose key has an earlier parked event waits until
        // an operator replays (or deletes) the parked one.
        let strict = match ordering {
            Ordering::PerKey => String::new(),
            Ordering::Strict => format!(
                " AND NOT EXISTS (SELECT 1 FROM {t} p WHERE p.parked_at IS NOT NULL AND p.key = o.key AND p.seq < o.seq)"
            ),
        };
        Statements {
            // A key waits while an earlier event of it waits for its retry_at.
            claim: format!(
                "SELECT id, seq, topic, key, payload, headers, attempts,
                        (extract(epoch FROM created_at) * 1000000)::int8
                 FROM {t} o
                 WHERE published_at IS NULL AND parked_at IS NULL
                   AND (retry_at IS NULL OR retry_at <= now())
                   AND (key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM {t} w
                        WHERE w.key = o.key AND w.seq < o.seq AND w.retry_at > now()
                          AND w.published_at IS NULL AND w.parked_at IS NULL)){strict}
                 ORDER BY seq
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED"
            ),
            // Per-key order with several relays: the earliest pending row of each of
            // our keys that we do NOT hold (another relay has it, or released it
            // since). Only the pending rows below our highest seq are scanned.
            fence: format!(
                "SELECT key, min(seq) FROM {t}
                 WHERE published_at IS NULL AND parked_at IS NULL
                   AND seq < $1 AND key = ANY($2) AND NOT (id = ANY($3))
                 GROUP BY key"
            ),
            mark: format!("UPDATE {t} SET published_at = now() WHERE id = ANY($1)"),
            delete: format!("DELETE FROM {t} WHERE id = ANY($1)"),
            fail: format!(
                "UPDATE {t} AS o
                 SET attempts = o.attempts + 1,
                     last_error = f.error,
                     parked_at = CASE WHEN f.park_now OR o.attempts + 1 >= $4 THEN now() END,
                     retry_at = CASE WHEN f.park_now OR o.attempts + 1 >= $4 THEN NULL
                                ELSE now() + least($5 * power(2, o.attempts), 300) * interval '1 second' END
                 FROM unnest($1::uuid[], $2::text[], $3::bool[]) AS f(id, error, park_now)
                 WHERE o.id = f.id"
            ),
            on_publish,
            ordering,
            retry_backoff_s: retry_backoff.as_secs_f64(),
        }
    }
}

/// A claimed batch: an open transaction holding the rows' locks.
///
/// Finish it with [`Claimed::finish`] or give the rows back with
/// [`Claimed::release`]. Dropped without either (a cancelled task), the
/// connection is closed instead of returned to the pool, so Postgres rolls the
/// transaction back and never lends out a connection that holds locks.
pub struct Claimed {
    client: Option<deadpool_postgres::Object>,
    sql: Statements,
    /// The events to publish, in seq order.
    pub events: Vec<OutboxEvent>,
    /// Rows held but not to be published now: an earlier event of their key is
    /// held by another relay. They stay pending, untouched, when the batch ends.
    pub deferred: usize,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Accepts the value of a jsonb, json, text or bytea column as raw bytes, so the
/// payload is sent exactly as stored, without decoding and re-encoding JSON.
struct RawBytes(Vec<u8>);

impl<'a> FromSql<'a> for RawBytes {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == Type::JSONB {
            // binary jsonb is a version byte (1) followed by the JSON text
            match raw.split_first() {
                Some((1, text)) => Ok(RawBytes(text.to_vec())),
                _ => Err("unsupported jsonb binary format version".into()),
            }
        } else {
            Ok(RawBytes(raw.to_vec()))
        }
    }

    fn accepts(ty: &Type) -> bool {
        [Type::JSONB, Type::JSON, Type::TEXT, Type::VARCHAR, Type::BYTEA, Type::BPCHAR].contains(ty)
    }
}

impl Store {
    /// Claims up to `limit` pending rows in `seq` order, skipping rows another
    /// relay holds. Returns `None` when nothing is pending (the transaction is
    /// already closed then).
    ///
    /// `own` are rows this relay holds in another, still open batch (pipelining):
    /// they precede this batch on the same producer, so they do not defer it.
    pub async fn claim(&self, limit: usize, own: &[uuid::Uuid]) -> Result<Option<Claimed>, StoreError> {
        let client = self.client().await?;
        // From BEGIN on, the guard owns the connection: if any step fails, it is
        // closed (Postgres rolls back) instead of going back to the pool inside an
        // aborted transaction.
        let mut claimed = Claimed { client: Some(client), sql: self.sql.clone(), events: Vec::new(), deferred: 0 };
        let client = claimed.client.as_ref().ok_or_else(|| StoreError::config("no connection"))?;
        client.batch_execute("BEGIN").await?;
        let stmt = client.prepare_cached(&self.sql.claim).await?;
        let rows = client.query(&stmt, &[&(limit as i64)]).await?;
        if rows.is_empty() {
            client.batch_execute("COMMIT").await?;
            claimed.client.take(); // clean: back to the pool
            return Ok(None);
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let payload: Option<RawBytes> = row.try_get(4)?;
            let headers: RawBytes = row.try_get(5)?;
            events.push(OutboxEvent {
                id: row.try_get(0)?,
                seq: row.try_get(1)?,
                topic: row.try_get(2)?,
                key: row.try_get(3)?,
                payload: payload.map(|p| p.0),
                headers: headers.0,
                attempts: row.try_get(6)?,
                created_at_us: row.try_get(7)?,
            });
        }
        claimed.deferred = self.fence(client, &mut events, own).await?;
        claimed.events = events;
        Ok(Some(claimed))
    }

    /// Drops from `events` every event that another relay's earlier event of the
    /// same key must precede, and returns how many it dropped. Every relay runs
    /// this after its claim, so for each key only the holder of its earliest
    /// pending row publishes: per-key order holds across instances.
    async fn fence(
        &self,
        client: &deadpool_postgres::Object,
        events: &mut Vec<OutboxEvent>,
        own: &[uuid::Uuid],
    ) -> Result<usize, StoreError> {
        let mut keys: Vec<&str> = events.iter().filter_map(|e| e.key.as_deref()).collect();
        if keys.is_empty() {
            return Ok(0);
        }
        keys.sort_unstable();
        keys.dedup();
        let max_seq = events.iter().map(|e| e.seq).max().unwrap_or(i64::MAX);
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id).chain(own.iter().copied()).collect();
        let stmt = client.prepare_cached(&self.sql.fence).await?;
        let rows = client.query(&stmt, &[&max_seq, &keys, &ids]).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let foreign: std::collections::HashMap<String, i64> =
            rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1))).collect();
        let before = events.len();
        events.retain(|e| match e.key.as_deref().and_then(|k| foreign.get(k)) {
            Some(&first_foreign) => e.seq < first_foreign,
            None => true,
        });
        Ok(before - events.len())
    }
}

/// Counts of what [`Claimed::finish`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub published: usize,
    pub failed: usize,
    pub retry: usize,
}

impl Claimed {
    /// Records every outcome (`outcomes[i]` belongs to `events[i]`), commits, and
    /// hands the events back.
    pub async fn finish(
        self,
        outcomes: &[Outcome],
        max_attempts: u32,
    ) -> Result<(Finished, Vec<OutboxEvent>), StoreError> {
        self.end(outcomes, max_attempts, "COMMIT".into()).await
    }

    /// Exactly-once: records every outcome like [`Claimed::finish`], then
    /// `PREPARE TRANSACTION gid` instead of committing. The rows stay locked
    /// (across crashes and restarts of Postgres) until `COMMIT PREPARED` or
    /// `ROLLBACK PREPARED` — see [`Store::commit_prepared`].
    pub async fn prepare(
        self,
        outcomes: &[Outcome],
        max_attempts: u32,
        gid: &str,
    ) -> Result<(Finished, Vec<OutboxEvent>), StoreError> {
        self.end(outcomes, max_attempts, format!("PREPARE TRANSACTION {}", quote_literal(gid))).await
    }

    async fn end(
        mut self,
        outcomes: &[Outcome],
        max_attempts: u32,
        end: String,
    ) -> Result<(Finished, Vec<OutboxEvent>), StoreError> {
        let client = self.client.as_ref().ok_or_else(|| StoreError::config("batch already finished"))?;
        let mut done = Finished::default();
        let mut delivered = Vec::with_capacity(self.events.len());
        let (mut f_ids, mut f_errors, mut f_park) = (Vec::new(), Vec::new(), Vec::new());
        for (event, outcome) in self.events.iter().zip(outcomes) {
            match outcome {
                Outcome::Delivered => delivered.push(event.id),
                Outcome::Failed(f) => {
                    f_ids.push(event.id);
                    f_errors.push(f.error.as_str());
                    f_park.push(f.park_now);
                }
                Outcome::Retry => done.retry += 1,
            }
        }
        // Events without an outcome (a short slice) stay pending.
        done.retry += self.events.len().saturating_sub(outcomes.len());
        if !delivered.is_empty() {
            let sql = match self.sql.on_publish {
                OnPublish::Mark => &self.sql.mark,
                OnPublish::Delete => &self.sql.delete,
            };
            let stmt = client.prepare_cached(sql).await?;
            done.published = client.execute(&stmt, &[&delivered]).await? as usize;
        }
        if !f_ids.is_empty() {
            let stmt = client.prepare_cached(&self.sql.fail).await?;
            done.failed = client
                .execute(&stmt, &[&f_ids, &f_errors, &f_park, &(max_attempts as i32), &self.sql.retry_backoff_s])
                .await? as usize;
        }
        client.batch_execute(&end).await?;
        // Committed (or prepared, which detaches the transaction from the
        // session): the connection is clean and can go back to the pool.
        self.client.take();
        Ok((done, std::mem::take(&mut self.events)))
    }

    /// Gives every row back (pending, untouched) and returns the connection.
    pub async fn release(mut self) -> Result<(), StoreError> {
        if let Some(client) = self.client.as_ref() {
            client.batch_execute("ROLLBACK").await?;
            self.client.take();
        }
        Ok(())
    }
}

/// A SQL string literal (PREPARE TRANSACTION takes no parameters).
pub(super) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A transaction prepared by a relay in exactly-once mode, still unresolved.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub gid: String,
    /// Seconds since `PREPARE TRANSACTION`.
    pub age_s: f64,
}

impl Store {
    /// Prepared transactions in this database whose id starts with `prefix`.
    pub async fn prepared(&self, prefix: &str) -> Result<Vec<Prepared>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts
                 WHERE database = current_database() AND left(gid, length($1)) = $1 ORDER BY prepared",
                &[&prefix],
            )
            .await?;
        Ok(rows.iter().map(|r| Prepared { gid: r.get(0), age_s: r.get(1) }).collect())
    }

    /// `COMMIT PREPARED gid`; `Ok(false)` when no such transaction exists (any
    /// more: someone resolved it).
    pub async fn commit_prepared(&self, gid: &str) -> Result<bool, StoreError> {
        self.end_prepared("COMMIT PREPARED", gid).await
    }

    /// `ROLLBACK PREPARED gid`; `Ok(false)` when no such transaction exists.
    pub async fn rollback_prepared(&self, gid: &str) -> Result<bool, StoreError> {
        self.end_prepared("ROLLBACK PREPARED", gid).await
    }

    async fn end_prepared(&self, verb: &str, gid: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        match client.batch_execute(&format!("{verb} {}", quote_literal(gid))).await {
            Ok(()) => Ok(true),
            Err(e) if e.code().map(|c| c.code()) == Some("42704") => Ok(false), // undefined_object
            Err(e) => Err(e.into()),
        }
    }

    /// Postgres's `max_prepared_transactions` (0 disables two-phase commit).
    pub async fn max_prepared_transactions(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client.query_one("SELECT current_setting('max_prepared_transactions')::int8", &[]).await?;
        Ok(row.get(0))
    }
}
