//! The end of a claimed batch: record what happened to each event (mark or
//! delete the delivered ones, count an attempt against the rejected ones and
//! park them when the database says so), then commit — or prepare (exactly
//! once), or give every row back untouched (release).
//!
//! Nothing is marked published before Kafka acknowledged it: the outcome is
//! written and committed only after the caller has every delivery report. If
//! the relay dies meanwhile, Postgres rolls the transaction back and the rows
//! are pending again.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_postgres::types::{FromSql, Type};

use super::connection::Conn;
use super::prepared::quote_literal;
use super::StoreError;
use crate::config::{OnPublish, TableName};
use crate::event::OutboxEvent;

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

/// A rejected event as the database recorded it (the `fail` statement's
/// `RETURNING`): the only word on whether it was parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub id: uuid::Uuid,
    pub topic: String,
    /// The attempt this was (1 = first).
    pub attempt: i32,
    pub parked: bool,
}

/// What [`Claimed::finish`] wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Finished {
    pub published: usize,
    pub failed: usize,
    pub retry: usize,
    /// Every rejected event with the database's decision.
    pub rejected: Vec<Parked>,
}

impl Finished {
    pub fn parked(&self) -> usize {
        self.rejected.iter().filter(|r| r.parked).count()
    }
}

/// The delivered rows of a batch, as (ctid, id) pairs.
const DONE: &str = "unnest($1::text[]::tid[], $2::uuid[]) AS d(ctid, id)";
/// Each row of the table matched to one of [`DONE`]: by its ctid, guarded by its id.
const GUARD: &str = "o.ctid = d.ctid AND o.id IS NOT DISTINCT FROM d.id";

/// The finishing statements for one table, built once.
#[derive(Debug)]
pub(super) struct FinishSql {
    mark: String,
    delete: String,
    fail: String,
    pub(super) on_publish: OnPublish,
    retry_backoff_s: f64,
}

impl FinishSql {
    pub(super) fn new(table: &TableName, on_publish: OnPublish, retry_backoff: Duration) -> FinishSql {
        let t = table.quoted();
        FinishSql {
            // The rows are locked by this transaction, so their ctid cannot
            // change: a TID lookup per row, no index. The id check is a guard.
            // A join, not `id = ANY($2)`: a prepared statement's generic
            // plan checks an array parameter element by element, 1000 × 1000
            // comparisons for a full batch (2 ms of its 4 on 2026-12-01).
            // `IS NOT DISTINCT FROM`, not `=`: an equality on the primary key
            // let the planner hash the batch against a full scan of the
            // primary key index, which a generic plan made while the table
            // was small chose and kept: every row of a 30k backlog read per
            // batch. This one no join can use, so only the TID lookup is left.
            mark: format!("UPDATE {t} o SET published_at = now() FROM {DONE} WHERE {GUARD}"),
            delete: format!("DELETE FROM {t} o USING {DONE} WHERE {GUARD}"),
            // The one place that decides what "parked" means: after
            // relay.max_attempts permanent failures, or at once for a malformed
            // row. RETURNING tells the caller what it decided.
            fail: format!(
                "UPDATE {t} AS o
                 SET attempts = o.attempts + 1,
                     last_error = f.error,
                     parked_at = CASE WHEN f.park_now OR o.attempts + 1 >= $4 THEN now() END,
                     retry_at = CASE WHEN f.park_now OR o.attempts + 1 >= $4 THEN NULL
                                ELSE now() + least($5 * power(2, o.attempts), 300) * interval '1 second' END
                 FROM unnest($1::uuid[], $2::text[], $3::bool[]) AS f(id, error, park_now)
                 WHERE o.id = f.id
                 RETURNING o.id, o.topic, o.attempts, o.parked_at IS NOT NULL AS parked"
            ),
            on_publish,
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
///
/// While it is open, a heartbeat runs a trivial statement on its connection every
/// `postgres.idle_in_transaction_timeout / 3`: Postgres ends a transaction that
/// stays idle longer than that, which bounds how long a frozen relay (SIGSTOP,
/// a hung host) keeps its rows, while a live relay waiting for Kafka keeps them
/// (for at most `relay.publish_timeout`: the relay's loop gives the batch back then).
pub struct Claimed {
    conn: Option<Arc<Conn>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    sql: Arc<FinishSql>,
    ctids: Vec<String>,
    /// The events to publish, in seq order.
    pub events: Vec<OutboxEvent>,
    /// Rows held but not to be published now: an earlier event of their key is
    /// held by another relay. They stay pending, untouched, when the batch ends.
    pub deferred: usize,
    /// When the rows were locked.
    pub claimed_at: Instant,
    /// The claim's round trip (statement and probe, sent to read), which grows
    /// when the database is busy (see `relay::Linger`).
    pub round_trip: Duration,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

impl Claimed {
    pub(super) fn open(conn: Arc<Conn>, sql: Arc<FinishSql>, claimed_at: Instant, round_trip: Duration) -> Claimed {
        Claimed {
            conn: Some(conn),
            heartbeat: None,
            sql,
            ctids: Vec::new(),
            events: Vec::new(),
            deferred: 0,
            claimed_at,
            round_trip,
        }
    }

    /// A batch that holds nothing (every claimable row was deferred).
    pub(super) fn nothing(sql: Arc<FinishSql>, deferred: usize) -> Claimed {
        Claimed {
            conn: None,
            heartbeat: None,
            sql,
            ctids: Vec::new(),
            events: Vec::new(),
            deferred,
            claimed_at: Instant::now(),
            round_trip: Duration::ZERO,
        }
    }

    pub(super) fn push(&mut self, ctid: String, event: OutboxEvent) {
        self.ctids.push(ctid);
        self.events.push(event);
    }

    fn conn(&self) -> Result<&Conn, StoreError> {
        self.conn.as_deref().ok_or_else(|| StoreError::config("batch already finished"))
    }

    pub(super) fn start_heartbeat(&mut self, every: Option<Duration>) {
        let (Some(every), Some(conn)) = (every, self.conn.as_ref()) else { return };
        let weak: Weak<Conn> = Arc::downgrade(conn);
        self.heartbeat = Some(crate::telemetry::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(conn) = weak.upgrade() else { return };
                if let Err(e) = conn.client().simple_query("SELECT 1").await {
                    tracing::warn!(error = %StoreError::from(e), "lost the connection of an open batch");
                    return;
                }
            }
        }));
    }

    /// Stops the heartbeat without waiting for it: if it is in the middle of its
    /// `SELECT 1`, that runs before (or harmlessly after) what we send next, and
    /// it only holds a weak reference to the connection.
    fn stop_heartbeat(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }

    /// Confirms the rows are still held, with one trivial statement in the
    /// batch's transaction. For a batch that waited between its claim and its
    /// send (the process was paused: SIGSTOP, a VM or cgroup stall): Postgres
    /// may have ended the transaction meanwhile (`idle_in_transaction_timeout`)
    /// and another relay may be publishing the rows. An error means: do not send.
    pub async fn confirm_held(&self) -> Result<(), StoreError> {
        self.conn()?.client().simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Keeps the transaction from being ended as idle when the caller waits
    /// without the heartbeat.
    pub async fn keepalive(&self) -> Result<(), StoreError> {
        self.conn()?.client().simple_query("SELECT 1").await?;
        Ok(())
    }

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
    /// `ROLLBACK PREPARED` — see `Store::commit_prepared`.
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
        self.stop_heartbeat();
        let conn = self.conn()?;
        let client = conn.client();
        let mut done = Finished::default();
        let n = self.events.len();
        let (mut d_ctids, mut d_ids) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut f_ids, mut f_errors, mut f_park) = (Vec::new(), Vec::new(), Vec::new());
        for ((event, ctid), outcome) in self.events.iter().zip(&self.ctids).zip(outcomes) {
            match outcome {
                Outcome::Delivered => {
                    d_ctids.push(ctid.as_str());
                    d_ids.push(event.id);
                }
                Outcome::Failed(f) => {
                    f_ids.push(event.id);
                    f_errors.push(f.error.as_str());
                    f_park.push(f.park_now);
                }
                Outcome::Retry => done.retry += 1,
            }
        }
        // Events without an outcome (a short slice) stay pending.
        done.retry += n.saturating_sub(outcomes.len());
        let sql = match self.sql.on_publish {
            OnPublish::Mark => &self.sql.mark,
            OnPublish::Delete => &self.sql.delete,
        };
        let publish_stmt = if d_ids.is_empty() { None } else { Some(client.prepare_cached(sql).await?) };
        let fail_stmt = if f_ids.is_empty() { None } else { Some(client.prepare_cached(&self.sql.fail).await?) };
        let max_attempts = max_attempts as i32;
        // One round trip: the statements and the end of the transaction are
        // pipelined, in this order. If a statement fails, Postgres ends the
        // transaction with a rollback whatever the end says, and its error is
        // what this returns.
        let (published, rejected, ended) = tokio::join!(
            async {
                match &publish_stmt {
                    Some(stmt) => client.execute(stmt, &[&d_ctids, &d_ids]).await.map(|n| n as usize),
                    None => Ok(0),
                }
            },
            async {
                match &fail_stmt {
                    Some(stmt) => {
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                            [&f_ids, &f_errors, &f_park, &max_attempts, &self.sql.retry_backoff_s];
                        client.query(stmt, &params).await
                    }
                    None => Ok(Vec::new()),
                }
            },
            client.batch_execute(&end),
        );
        done.published = published?;
        done.rejected = rejected?
            .iter()
            .map(|r| {
                Ok(Parked {
                    id: r.try_get("id")?,
                    topic: r.try_get("topic")?,
                    attempt: r.try_get("attempts")?,
                    parked: r.try_get("parked")?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        done.failed = done.rejected.len();
        ended?;
        // Committed (or prepared, which detaches the transaction from the
        // session): the connection is clean and can go back to the pool.
        conn.ended();
        self.conn.take();
        Ok((done, std::mem::take(&mut self.events)))
    }

    /// Gives every row back (pending, untouched) and returns the connection.
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.stop_heartbeat();
        if let Some(conn) = self.conn.take() {
            conn.client().batch_execute("ROLLBACK").await?;
            conn.ended();
        }
        Ok(())
    }
}

/// Accepts the value of a jsonb, json, text or bytea column as raw bytes, so the
/// payload is sent exactly as stored, without decoding and re-encoding JSON.
pub(super) struct RawBytes(pub(super) Vec<u8>);

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The delivered rows are matched by a join on (ctid, id): `id = ANY($2)`
    /// in a generic plan compares every row with every id of the batch.
    #[test]
    fn mark_and_delete_match_the_batch_by_a_join() {
        let sql = FinishSql::new(&TableName::parse("public.outbox").unwrap(), OnPublish::Mark, Duration::from_secs(1));
        for s in [&sql.mark, &sql.delete] {
            assert!(!s.contains("ANY("), "{s}");
            assert!(s.contains("unnest($1::text[]::tid[], $2::uuid[]) AS d(ctid, id)"), "{s}");
            assert!(s.contains("o.ctid = d.ctid AND o.id IS NOT DISTINCT FROM d.id"), "{s}");
        }
    }
}
