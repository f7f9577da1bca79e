//! Claiming a batch of pending rows and recording what happened to each.
//!
//! A claim is one open transaction holding row locks (`FOR UPDATE SKIP LOCKED`)
//! while the batch is published; its outcome is written and committed only after
//! Kafka answered for every row. If the relay dies meanwhile, Postgres rolls the
//! transaction back and the rows are pending again: nothing is ever marked
//! published before Kafka acknowledged it.
//!
//! Every per-batch statement starts at the floor (see `floor.rs`), so its cost
//! follows the live pending rows, not the dead entries vacuum has not removed yet.

use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_postgres::types::{FromSql, Type};

use super::prepared::quote_literal;
use super::{Store, StoreError};
use crate::config::{OnPublish, Ordering, TableName};
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

/// How long a key whose earlier event another relay holds is left out of this
/// relay's claims: the other relay publishes it (and, pipelining, what follows).
const BLOCKED_KEY_TTL: Duration = Duration::from_millis(500);
/// At most this many keys are left out at once.
const BLOCKED_KEYS_MAX: usize = 10_000;

/// SQL for one table, built once from validated identifiers.
#[derive(Debug, Clone)]
pub(super) struct Statements {
    pub(super) claim: String,
    pub(super) probe: String,
    pending: String,
    below_floor: String,
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
        let pending = "published_at IS NULL AND parked_at IS NULL";
        // The same condition in the words of the retry-due index (migration
        // 0003), which the pending index's condition does not match: lookups of
        // events waiting for a retry can only use the small retry-due index,
        // whatever the statistics say (stale ones, from when nothing was
        // pending, made the planner read the whole pending index for them).
        let waiting = "coalesce(published_at, parked_at) IS NULL";
        let waiting_o = "coalesce(o.published_at, o.parked_at) IS NULL";
        // Strict order: an event whose key has an earlier parked event waits until
        // an operator replays (or deletes) the parked one.
        let strict = match ordering {
            Ordering::PerKey => String::new(),
            Ordering::Strict => format!(
                " AND NOT EXISTS (SELECT 1 FROM {t} p WHERE p.parked_at IS NOT NULL AND p.key = o.key AND p.seq < o.seq)"
            ),
        };
        // The CTEs carry only what the fence needs; payloads (≈1 KB) are read once,
        // at the end, through the rows' ctids (locked: they cannot move).
        let cols = "ctid, id, seq, key";
        Statements {
            // $1 floor, $2 limit, $3 ids this relay holds in its other open batch,
            // $4 keys to leave out (another relay holds their head).
            //
            // `due`: events whose retry time has come, wherever they are (the
            // floor passes events that wait), read through the retry-due index
            // by `retry_at`: never the pending index below the floor.
            // `main`: the pending index from the floor, in seq order.
            // `fence`: per-key order with several relays, and behind events that
            // wait for a retry. For each key of the batch, the earliest pending
            // row this relay does NOT hold (another relay has it, gave it back,
            // or it waits for its retry); our later rows of that key are
            // deferred. It reads the pending index from the floor to the batch's
            // last seq, and the waiting events of the batch's keys through the
            // retry index (by key).
            //
            // No statement here lets the planner choose the pending index for a
            // lookup that is not a range from the floor: with real statistics
            // (retry_at almost always NULL) it otherwise did, once per row; with
            // stale ones it read all of it for the waiting events (`waiting`).
            claim: format!(
                "WITH due AS MATERIALIZED (
                   SELECT {cols} FROM {t} o
                   WHERE o.retry_at IS NOT NULL AND o.retry_at <= now() AND {waiting_o}{strict}
                   ORDER BY o.retry_at, o.seq LIMIT $2 FOR UPDATE SKIP LOCKED),
                 main AS MATERIALIZED (
                   SELECT {cols} FROM {t} o
                   WHERE o.{pending} AND o.seq >= $1 AND o.retry_at IS NULL
                     AND (o.key IS NULL OR NOT (o.key = ANY($4))){strict}
                   ORDER BY o.seq LIMIT (SELECT $2 - count(*) FROM due) FOR UPDATE SKIP LOCKED),
                 claimed AS (SELECT * FROM due UNION ALL SELECT * FROM main),
                 fence AS (
                   SELECT p.key, min(p.seq) AS first FROM (
                       SELECT key, seq, id FROM {t} WHERE {pending}
                         AND seq >= $1 AND seq < (SELECT max(seq) FROM claimed)
                       UNION ALL
                       SELECT key, seq, id FROM {t} WHERE retry_at IS NOT NULL AND {waiting}
                         AND key IN (SELECT key FROM claimed)
                   ) p
                   WHERE p.key IN (SELECT key FROM claimed) AND NOT (p.id = ANY($3))
                     AND p.id NOT IN (SELECT id FROM claimed)
                   GROUP BY p.key)
                 SELECT c.ctid::text, c.id, c.seq, o.topic, c.key, o.payload, o.headers, o.attempts,
                        (extract(epoch FROM o.created_at) * 1000000)::int8, f.first
                 FROM claimed c JOIN {t} o ON o.ctid = c.ctid LEFT JOIN fence f ON f.key = c.key
                 ORDER BY c.seq"
            ),
            // The sweep (`sweep_if_due`): the lowest pending row below the floor.
            below_floor: format!(
                "SELECT (SELECT seq FROM {t} WHERE {pending} AND retry_at IS NULL AND seq < $1 ORDER BY seq LIMIT 1)"
            ),
            // An idle relay's look at the outbox between claims: one statement, no
            // transaction, two index probes (from the floor; the retry index).
            pending: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE {pending} AND retry_at IS NULL AND seq >= $1)
                     OR EXISTS (SELECT 1 FROM {t} WHERE retry_at IS NOT NULL AND retry_at <= now() AND {waiting})"
            ),
            // Run right after the claim, in its transaction: the head (lowest
            // pending seq at or above the floor, held by anyone, not waiting for a
            // retry) and, when $2 is not 0, who holds the identity sequence's lock
            // (see floor.rs).
            probe: format!(
                "SELECT (SELECT seq FROM {t} WHERE {pending} AND retry_at IS NULL AND seq >= $1 ORDER BY seq LIMIT 1),
                        CASE WHEN $2::oid <> 0 THEN ARRAY(
                          SELECT virtualtransaction FROM pg_locks
                          WHERE locktype = 'relation' AND relation = $2::oid
                            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) END"
            ),
            // The rows are locked by this transaction, so their ctid cannot
            // change: a TID scan, no index lookups. The id check is a guard.
            mark: format!(
                "UPDATE {t} SET published_at = now() WHERE ctid = ANY($1::text[]::tid[]) AND id = ANY($2::uuid[])"
            ),
            delete: format!("DELETE FROM {t} WHERE ctid = ANY($1::text[]::tid[]) AND id = ANY($2::uuid[])"),
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

/// A pooled connection that holds an open transaction. Dropped without being
/// marked clean, it is detached from the pool and closed (Postgres rolls back),
/// and any statement still running on it is cancelled: a connection holding
/// locks is never lent out again.
pub(super) struct Conn {
    obj: Option<deadpool_postgres::Object>,
    clean: AtomicBool,
    tls: postgres_native_tls::MakeTlsConnector,
}

impl Conn {
    fn client(&self) -> &deadpool_postgres::Object {
        // Invariant: `obj` is Some from construction until `Drop::drop`, the only
        // place that takes it; no method can run after that.
        self.obj.as_ref().expect("connection present until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(obj) = self.obj.take() else { return };
        if self.clean.load(AtomicOrdering::Acquire) {
            return; // back to the pool
        }
        let token = obj.cancel_token();
        drop(deadpool_postgres::Object::take(obj));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let tls = self.tls.clone();
            rt.spawn(async move {
                let _ = token.cancel_query(tls).await;
            });
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
/// a hung host) keeps its rows, while a live relay waiting for Kafka keeps them.
pub struct Claimed {
    conn: Option<Arc<Conn>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    sql: Statements,
    ctids: Vec<String>,
    /// The events to publish, in seq order.
    pub events: Vec<OutboxEvent>,
    /// Rows held but not to be published now: an earlier event of their key is
    /// held by another relay. They stay pending, untouched, when the batch ends.
    pub deferred: usize,
    /// When the rows were locked.
    pub claimed_at: Instant,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
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

/// One claimed row with the fence's answer for its key.
struct Row {
    ctid: String,
    event: OutboxEvent,
    first_foreign: Option<i64>,
}

impl Store {
    /// Claims up to `limit` pending rows in `seq` order, skipping rows another
    /// relay holds. Returns `None` when nothing could be claimed (the transaction
    /// is already closed then).
    ///
    /// `own` are rows this relay holds in another, still open batch (pipelining):
    /// they precede this batch on the same producer, so they do not defer it.
    ///
    /// When every row claimed belongs to keys another relay holds, their keys are
    /// left out for a moment and the claim is tried once more at once, so a hot
    /// key's backlog held elsewhere does not stall this relay.
    pub async fn claim(&self, limit: usize, own: &[uuid::Uuid]) -> Result<Option<Claimed>, StoreError> {
        let mut deferred_before = 0;
        for attempt in 0..2 {
            let (claimed, rows) = self.claim_once(limit, own).await?;
            let Some(mut claimed) = claimed else { break };
            let mut blocked = Vec::new();
            for r in rows {
                match r.first_foreign {
                    Some(first) if r.event.seq > first => {
                        claimed.deferred += 1;
                        blocked.extend(r.event.key.clone());
                    }
                    _ => {
                        claimed.ctids.push(r.ctid);
                        claimed.events.push(r.event);
                    }
                }
            }
            self.block_keys(blocked);
            if claimed.events.is_empty() && attempt == 0 {
                deferred_before = claimed.deferred;
                claimed.release().await?;
                continue;
            }
            claimed.deferred += deferred_before;
            claimed.start_heartbeat(self.shared.keepalive);
            return Ok(Some(claimed));
        }
        // Nothing claimable; report what was deferred, holding nothing.
        Ok((deferred_before > 0).then(|| Claimed {
            conn: None,
            heartbeat: None,
            sql: self.sql.clone(),
            ctids: Vec::new(),
            events: Vec::new(),
            deferred: deferred_before,
            claimed_at: Instant::now(),
        }))
    }

    async fn claim_once(&self, limit: usize, own: &[uuid::Uuid]) -> Result<(Option<Claimed>, Vec<Row>), StoreError> {
        let started = Instant::now();
        let client = self.client().await?;
        let seq_oid = self.sequence_oid(&client).await;
        let conn = Arc::new(Conn { obj: Some(client), clean: AtomicBool::new(false), tls: self.tls.clone() });
        let mut claimed = Claimed {
            conn: Some(conn.clone()),
            heartbeat: None,
            sql: self.sql.clone(),
            ctids: Vec::new(),
            events: Vec::new(),
            deferred: 0,
            claimed_at: started,
        };
        let (floor, lockers_wanted) = {
            let f = self.floor();
            (f.get(), f.wants_lockers())
        };
        let oid: u32 = if lockers_wanted { seq_oid.unwrap_or(0) } else { 0 };
        let blocked = self.blocked_keys();
        let client = conn.client();
        let claim_stmt = client.prepare_cached(&self.sql.claim).await?;
        let probe_stmt = client.prepare_cached(&self.sql.probe).await?;
        let limit = limit as i64;
        let claim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&floor, &limit, &own, &blocked];
        let probe_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&floor, &oid];
        // One round trip: the three requests are pipelined on the connection.
        let (begin, rows, probe) = tokio::join!(
            client.batch_execute("BEGIN"),
            client.query(&claim_stmt, &claim_params),
            client.query_one(&probe_stmt, &probe_params),
        );
        begin?;
        let (rows, probe) = match (rows, probe) {
            (Ok(r), Ok(p)) => (r, p),
            (Err(e), _) | (_, Err(e)) => {
                let e = StoreError::from(e);
                if e.is_statement_timeout() {
                    tracing::warn!(
                        statement = "claim",
                        took_ms = started.elapsed().as_millis() as u64,
                        "a relay query ran into postgres.statement_timeout and was cancelled; retrying"
                    );
                }
                return Err(e);
            }
        };
        crate::metrics::claim_duration(started.elapsed());
        claimed.claimed_at = Instant::now();
        let head: Option<i64> = probe.try_get(0)?;
        let lockers: Option<Vec<String>> = probe.try_get(1)?;
        let mut parsed = Vec::with_capacity(rows.len());
        for row in &rows {
            let payload: Option<RawBytes> = row.try_get(5)?;
            let headers: RawBytes = row.try_get(6)?;
            parsed.push(Row {
                ctid: row.try_get(0)?,
                event: OutboxEvent {
                    id: row.try_get(1)?,
                    seq: row.try_get(2)?,
                    topic: row.try_get(3)?,
                    key: row.try_get(4)?,
                    payload: payload.map(|p| p.0),
                    headers: headers.0,
                    attempts: row.try_get(7)?,
                    created_at_us: row.try_get(8)?,
                },
                first_foreign: row.try_get(9)?,
            });
        }
        let claimed_max = parsed.iter().map(|r| r.event.seq).max();
        self.observe_floor(floor, claimed_max, head, lockers);
        if parsed.is_empty() {
            client.batch_execute("COMMIT").await?;
            conn.clean.store(true, AtomicOrdering::Release);
            return Ok((None, parsed));
        }
        drop(conn);
        Ok((Some(claimed), parsed))
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
    fn conn(&self) -> Result<&Conn, StoreError> {
        self.conn.as_deref().ok_or_else(|| StoreError::config("batch already finished"))
    }

    fn start_heartbeat(&mut self, every: Option<Duration>) {
        let (Some(every), Some(conn)) = (every, self.conn.as_ref()) else { return };
        let weak: Weak<Conn> = Arc::downgrade(conn);
        self.heartbeat = Some(tokio::spawn(async move {
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

    /// Confirms the rows are still held, with one trivial statement in the
    /// batch's transaction. For a batch that waited between its claim and its
    /// send (the process was paused: SIGSTOP, a VM or cgroup stall): Postgres
    /// may have ended the transaction meanwhile (`idle_in_transaction_timeout`)
    /// and another relay may be publishing the rows. An error means: do not send.
    pub async fn confirm_held(&self) -> Result<(), StoreError> {
        self.conn()?.client().simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Stops the heartbeat without waiting for it: if it is in the middle of its
    /// `SELECT 1`, that runs before (or harmlessly after) what we send next, and
    /// it only holds a weak reference to the connection.
    fn stop_heartbeat(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
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
        self.stop_heartbeat();
        let conn = self.conn()?;
        let client = conn.client();
        let mut done = Finished::default();
        let (mut d_ctids, mut d_ids) = (Vec::with_capacity(self.events.len()), Vec::with_capacity(self.events.len()));
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
        done.retry += self.events.len().saturating_sub(outcomes.len());
        if !d_ids.is_empty() {
            let sql = match self.sql.on_publish {
                OnPublish::Mark => &self.sql.mark,
                OnPublish::Delete => &self.sql.delete,
            };
            let stmt = client.prepare_cached(sql).await?;
            done.published = client.execute(&stmt, &[&d_ctids, &d_ids]).await? as usize;
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
        conn.clean.store(true, AtomicOrdering::Release);
        self.conn.take();
        Ok((done, std::mem::take(&mut self.events)))
    }

    /// Keeps the transaction from being ended as idle (see the type's docs) when
    /// the caller waits without the heartbeat.
    pub async fn keepalive(&self) -> Result<(), StoreError> {
        self.conn()?.client().simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Gives every row back (pending, untouched) and returns the connection.
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.stop_heartbeat();
        if let Some(conn) = self.conn.take() {
            conn.client().batch_execute("ROLLBACK").await?;
            conn.clean.store(true, AtomicOrdering::Release);
        }
        Ok(())
    }
}

impl Store {
    /// Is anything claimable, perhaps? (Pending rows from the floor on, or a
    /// retry that is due; some may be held by other relays.) What an idle relay
    /// asks between claims: much cheaper than a claim that finds nothing.
    pub async fn anything_pending(&self) -> Result<bool, StoreError> {
        let floor = self.floor().get();
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.pending).await?;
        Ok(client.query_one(&stmt, &[&floor]).await?.get(0))
    }

    /// The safety net for a replay whose notification was lost (or any row
    /// made pending again below the floor by hand), off the claim path: when
    /// `every` has passed, one statement on its own connection, in a task of its
    /// own, looks for the lowest pending row below the floor, and the floor is
    /// lowered to it. That statement walks the pending index from its start,
    /// dead entries included; under a held horizon with 580k dead rows it took
    /// 1-2 s, and when it was the claim itself that swept from the start, every
    /// batch behind it waited that long once a minute. Returns at once.
    pub fn sweep_if_due(&self, every: std::time::Duration) {
        if self.shared.sweeping.load(AtomicOrdering::Acquire) || !self.floor().sweep_due(every) {
            return;
        }
        let below = self.floor().get();
        // Claimed, not just checked: every clone of the store shares the flag and may call this.
        if below <= 0
            || self
                .shared
                .sweeping
                .compare_exchange(false, true, AtomicOrdering::AcqRel, AtomicOrdering::Acquire)
                .is_err()
        {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            let found = store.lowest_pending_below(below).await;
            store.shared.sweeping.store(false, AtomicOrdering::Release);
            match found {
                Ok(Some(seq)) => {
                    tracing::info!(seq, floor = below, "a pending event below the floor (a replay whose notification was lost?): claims look there next");
                    store.floor().lower(seq);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "looking for pending events below the floor failed; trying again after relay.sweep_interval"
                ),
            }
        });
    }

    async fn lowest_pending_below(&self, below: i64) -> Result<Option<i64>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(&self.sql.below_floor).await?;
        Ok(client.query_one(&stmt, &[&below]).await?.get(0))
    }

    /// Leaves these keys out of this relay's claims for a moment.
    fn block_keys(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let until = Instant::now() + BLOCKED_KEY_TTL;
        let mut b = self.shared.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.retain(|_, t| *t > now);
        for k in keys {
            if b.len() >= BLOCKED_KEYS_MAX {
                break;
            }
            b.insert(k, until);
        }
    }

    fn blocked_keys(&self) -> Vec<String> {
        let mut b = self.shared.blocked.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.retain(|_, t| *t > now);
        b.keys().cloned().collect()
    }
}
