//! Claiming a batch: pending rows from the floor, in `seq` order, locked with
//! `FOR UPDATE SKIP LOCKED` in a transaction that stays open while the batch is
//! published (see `finish.rs` for how it ends), with the per-key fence that
//! keeps order across relays. The SQL sits beside the code that reads its
//! columns, by name.

use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use super::connection::{Conn, TxnKind};
use super::finish::{Claimed, RawBytes};
use super::skip::{ScanContext, Skip};
use super::{Store, StoreError};
use crate::config::{Ordering, TableName};
use crate::event::OutboxEvent;
use crate::telemetry::events::{ClaimRan, StatementTimedOut};
use crate::telemetry::Emit;

/// The claim's SQL for one table, built once from validated identifiers.
#[derive(Debug)]
pub(super) struct ClaimSql {
    /// The order check through the pending key index (migration 0004).
    by_key: String,
    /// The same without that index: it reads the pending index from the floor
    /// to the batch's end.
    by_range: String,
    probe: String,
    pub(super) ordering: Ordering,
}

const PENDING: &str = "published_at IS NULL AND parked_at IS NULL";
// Lookups in the words of one index's condition, which no other index's
// condition matches, can use only that index, whatever the statistics say.
// (Stale ones, from when nothing was pending, made the planner read the whole
// pending index for them, once per claim or once per key.) Waiting for a retry,
// in the words of the retry-due index (migration 0003):
const WAITING_O: &str = "coalesce(o.published_at, o.parked_at) IS NULL";
const WAITING_W: &str = "coalesce(w.published_at, w.parked_at) IS NULL";
// Pending and not waiting, in the words of the pending key index (0004):
const PENDING_P: &str = "p.retry_at IS NULL AND coalesce(p.published_at, p.parked_at) IS NULL";

impl ClaimSql {
    pub(super) fn new(table: &TableName, ordering: Ordering) -> ClaimSql {
        let t = table.quoted();
        ClaimSql {
            by_key: claim_sql(&t, ordering, &fence_by_key(&t)),
            by_range: claim_sql(&t, ordering, &fence_by_range(&t)),
            // Run right after the claim, in its transaction: the head (lowest
            // pending seq at or above the floor, held by anyone, not waiting for a
            // retry), when $3, who holds the identity sequence's ($2) lock,
            // where sequence values come from (see floor.rs), and when keys were
            // left out ($5), the lowest such seq from the scan's start ($4)
            // whose key was not (skip.rs).
            probe: format!(
                "SELECT (SELECT seq FROM {t} WHERE {PENDING} AND retry_at IS NULL AND seq >= $1 ORDER BY seq LIMIT 1)
                          AS head,
                        CASE WHEN cardinality($5::text[]) > 0 THEN (
                          SELECT seq FROM {t} WHERE {PENDING} AND retry_at IS NULL AND seq >= $4
                            AND (key IS NULL OR NOT (key = ANY($5))) ORDER BY seq LIMIT 1) END
                          AS next,
                        CASE WHEN $3 AND $2::oid <> 0 THEN ARRAY(
                          SELECT virtualtransaction FROM pg_locks
                          WHERE locktype = 'relation' AND relation = $2::oid
                            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) END
                          AS lockers,
                        {source}",
                source = super::floor::SOURCE_COLUMNS
            ),
            ordering,
        }
    }

    pub(super) fn claim(&self, key_index: bool) -> &str {
        if key_index {
            &self.by_key
        } else {
            &self.by_range
        }
    }
}

/// The claim statement around one of the two `fence`s below.
///
/// $1 floor, $2 limit, $3 ids this relay holds in its other open batch, $4 keys
/// to leave out (another relay holds their head), $5 where the main scan
/// starts (the floor, or the skip above it: skip.rs).
///
/// `due`: events whose retry time has come, wherever they are (the floor passes
/// events that wait), read through the retry-due index by `retry_at`: never the
/// pending index below the floor. `main`: the pending index from $5, in seq
/// order. `fence`: per-key order with several relays, and behind events that
/// wait for a retry: for each key of the batch, the earliest pending row not in
/// this batch and not held by this relay's other batch (another relay holds
/// it, or it waits for its retry); our later rows of that key are deferred.
///
/// The CTEs carry only what the fence needs; payloads (≈1 KB) are read once, at
/// the end, through the rows' ctids (locked: they cannot move).
fn claim_sql(t: &str, ordering: Ordering, fence: &str) -> String {
    // Strict order: an event whose key has an earlier parked event waits until
    // an operator replays (or deletes) the parked one.
    let strict = match ordering {
        Ordering::PerKey => String::new(),
        Ordering::Strict => format!(
            " AND NOT EXISTS (SELECT 1 FROM {t} p WHERE p.parked_at IS NOT NULL AND p.key = o.key AND p.seq < o.seq)"
        ),
    };
    let cols = "ctid, id, seq, key";
    format!(
        "WITH due AS MATERIALIZED (
           SELECT {cols} FROM {t} o
           WHERE o.retry_at IS NOT NULL AND o.retry_at <= now() AND {WAITING_O}{strict}
           ORDER BY o.retry_at, o.seq LIMIT $2 FOR UPDATE SKIP LOCKED),
         main AS MATERIALIZED (
           SELECT {cols} FROM {t} o
           WHERE o.{PENDING} AND o.seq >= $5 AND o.retry_at IS NULL
             AND (o.key IS NULL OR NOT (o.key = ANY($4))){strict}
           ORDER BY o.seq LIMIT (SELECT $2 - count(*) FROM due) FOR UPDATE SKIP LOCKED),
         claimed AS (SELECT * FROM due UNION ALL SELECT * FROM main),
         {fence}
         SELECT c.ctid::text AS ctid, c.id, c.seq, o.topic, c.key, o.payload, o.headers, o.attempts,
                (extract(epoch FROM o.created_at) * 1000000)::int8 AS created_at_us,
                f.first AS first_foreign
         FROM claimed c JOIN {t} o ON o.ctid = c.ctid LEFT JOIN fence f ON f.key = c.key
         ORDER BY c.seq"
    )
}

/// With the pending key index: when the batch lies close to the floor (its
/// last `seq` within 4 × the limit of it, as when the relay keeps up), the
/// range below ([`fence_by_range`]), which is cheapest then. Otherwise (a held
/// hot key's backlog keeps the floor far below the batch) one short range per
/// key of the batch, through the pending key index: the key's rows from the
/// floor to its last row in the batch (a hot key's backlog is read only when
/// the batch has that key, and then only up to the batch's rows); and
/// (`waits`) the batch keys' rows waiting for a retry, through the retry-due
/// index. Materialized, so each lookup runs once per key. Postgres runs only
/// the branch whose one-time condition holds.
fn fence_by_key(t: &str) -> String {
    let near = "(SELECT max(seq) FROM claimed) - $1 <= 4 * $2";
    format!(
        "keys AS (SELECT key, max(seq) AS last FROM claimed WHERE key IS NOT NULL GROUP BY key),
         waits AS MATERIALIZED (
           SELECT w.key, min(w.seq) AS first FROM {t} w
           WHERE w.retry_at IS NOT NULL AND {WAITING_W} AND w.key IN (SELECT key FROM keys)
             AND NOT (w.id = ANY($3)) AND w.id NOT IN (SELECT id FROM claimed)
           GROUP BY w.key),
         by_key AS MATERIALIZED (
           SELECT k.key, least(
               (SELECT p.seq FROM {t} p WHERE p.key = k.key AND {PENDING_P} AND p.seq >= $1 AND p.seq < k.last
                  AND NOT (p.id = ANY($3)) AND p.id NOT IN (SELECT id FROM claimed)
                ORDER BY p.seq LIMIT 1),
               (SELECT first FROM waits WHERE waits.key = k.key)) AS first
           FROM keys k WHERE NOT ({near})),
         {range},
         fence AS (SELECT * FROM by_key UNION ALL SELECT * FROM by_range WHERE {near})",
        range = fence_by_range(t).replacen("fence AS (", "by_range AS (", 1),
    )
}

/// Without the pending key index (a schema before migration 0004): the pending
/// index from the floor to the batch's last seq, and the waiting events of the
/// batch's keys through the retry-due index. Its cost grows with everything
/// pending between the floor and the batch, a held hot key's backlog included.
fn fence_by_range(t: &str) -> String {
    format!(
        "fence AS (
           SELECT p.key, min(p.seq) AS first FROM (
               SELECT key, seq, id FROM {t} WHERE {PENDING}
                 AND seq >= $1 AND seq < (SELECT max(seq) FROM claimed)
               UNION ALL
               SELECT key, seq, id FROM {t} WHERE retry_at IS NOT NULL AND coalesce(published_at, parked_at) IS NULL
                 AND key IN (SELECT key FROM claimed)
           ) p
           WHERE p.key IN (SELECT key FROM claimed) AND NOT (p.id = ANY($3))
             AND p.id NOT IN (SELECT id FROM claimed)
           GROUP BY p.key)"
    )
}

/// One claimed row with the fence's answer for its key.
pub(super) struct Row {
    pub(super) ctid: String,
    pub(super) event: OutboxEvent,
    /// The earliest pending `seq` of this key that another relay holds (or that
    /// waits for its retry), if any.
    first_foreign: Option<i64>,
}

impl Row {
    /// Reads one row of the claim statement, by column name.
    fn read(row: &tokio_postgres::Row) -> Result<Row, StoreError> {
        let payload: Option<RawBytes> = row.try_get("payload")?;
        let headers: RawBytes = row.try_get("headers")?;
        Ok(Row {
            ctid: row.try_get("ctid")?,
            event: OutboxEvent {
                id: row.try_get("id")?,
                seq: row.try_get("seq")?,
                topic: row.try_get("topic")?,
                key: row.try_get("key")?,
                payload: payload.map(|p| p.0),
                headers: headers.0,
                attempts: row.try_get("attempts")?,
                created_at_us: row.try_get("created_at_us")?,
            },
            first_foreign: row.try_get("first_foreign")?,
        })
    }
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
            let Some((mut claimed, rows)) = self.claim_once(limit, own).await? else { break };
            let mut blocked = Vec::new();
            for r in rows {
                match r.first_foreign {
                    Some(first) if r.event.seq > first => {
                        claimed.deferred += 1;
                        blocked.extend(r.event.key.clone());
                    }
                    _ => claimed.push(r.ctid, r.event),
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
        // Nothing claimable. When keys are left out (another relay holds
        // their heads), say so, holding nothing: the caller waits a moment
        // rather than looking again at once (the held keys' rows are pending).
        let waiting_on_others = deferred_before > 0 || !self.blocked_keys().is_empty();
        Ok(waiting_on_others.then(|| Claimed::nothing(self.finish_sql.clone(), deferred_before)))
    }

    async fn claim_once(&self, limit: usize, own: &[uuid::Uuid]) -> Result<Option<(Claimed, Vec<Row>)>, StoreError> {
        let started = Instant::now();
        let client = self.client().await?;
        let seq_oid = self.sequence_oid(&client).await;
        let open = self.shared.clock.begin(TxnKind::Batch);
        let conn = Arc::new(Conn::new(client, self.tls.clone(), open));
        let (cx, start, lockers_wanted, generation) = self.scan_context();
        let (floor, blocked) = (cx.floor, &cx.blocked);
        let oid: u32 = seq_oid.unwrap_or(0);
        let client = conn.client();
        // Preparing reads the table's definition, so a lock on the table
        // blocks it too: time it like the claim.
        let timed = |e: tokio_postgres::Error| {
            let e = StoreError::from(e);
            if e.is_statement_timeout() {
                StatementTimedOut { statement: "claim", took: started.elapsed() }.emit();
            }
            e
        };
        let key_index = self.pending_key_index(client).await;
        let claim_stmt = client.prepare_cached(self.claim_sql.claim(key_index)).await.map_err(timed)?;
        let probe_stmt = client.prepare_cached(&self.claim_sql.probe).await.map_err(timed)?;
        let limit = limit as i64;
        let claim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [&floor, &limit, &own, blocked, &start];
        let probe_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&floor, &oid, &lockers_wanted, &start, blocked];
        // One round trip: the three requests are pipelined on the connection.
        let (begin, rows, probe) = tokio::join!(
            client.batch_execute("BEGIN"),
            client.query(&claim_stmt, &claim_params),
            client.query_one(&probe_stmt, &probe_params),
        );
        begin?;
        let (rows, probe) = match (rows, probe) {
            (Ok(r), Ok(p)) => (r, p),
            (Err(e), _) | (_, Err(e)) => return Err(timed(e)),
        };
        ClaimRan { took: started.elapsed() }.emit();
        crate::failpoint::hit("after-claim-response");
        // When the rows were locked, as far as this process can tell: before
        // the claim was sent. (After the response was read would miss a freeze
        // while the rows sat in the socket: Postgres counts the transaction's
        // idle time from when it sent them.)
        let claimed_at = started;
        let head: Option<i64> = probe.try_get("head")?;
        let lockers: Option<Vec<String>> = probe.try_get("lockers")?;
        let source = super::floor::read_source(&probe)?;
        let parsed = rows.iter().map(Row::read).collect::<Result<Vec<_>, _>>()?;
        let claimed_max = parsed.iter().map(|r| r.event.seq).max();
        let next: Option<i64> = probe.try_get("next")?;
        {
            let mut skip = self.skip();
            *skip = Skip::after_claim(skip.take(), &cx, next);
        }
        tracing::trace!(
            floor,
            start,
            rows = rows.len(),
            last = claimed_max,
            key_index,
            took_us = started.elapsed().as_micros() as u64,
            "claim"
        );
        {
            let mut f = self.floor();
            // Values went backwards: what this look saw from the old floor says
            // nothing about the new values; the next claim starts from 0.
            if !f.check_source(source) {
                f.observe_since(generation, floor, claimed_max, head, lockers);
            } else {
                tracing::warn!(table = %self.table, "the outbox's sequence went backwards (a failover, a recovery, \
                    a restarted sequence or a lower setval): claims start from the beginning again");
            }
        }
        if parsed.is_empty() {
            client.batch_execute("COMMIT").await?;
            conn.ended();
            return Ok(None);
        }
        Ok(Some((Claimed::open(conn, self.finish_sql.clone(), claimed_at), parsed)))
    }

    /// What the next claim starts from: its [`ScanContext`], where its main
    /// scan starts (the floor, or the skip), whether its probe needs the
    /// sequence's lockers, and the floor's generation.
    fn scan_context(&self) -> (ScanContext, i64, bool, u64) {
        let f = self.floor();
        let cx = ScanContext {
            floor: f.get(),
            visible: f.visible(),
            blocked: self.blocked_keys(),
            lowerings: f.lowerings(),
        };
        let start = Skip::start(self.skip().as_ref(), &cx);
        (cx, start, f.wants_lockers(), f.generation())
    }

    /// The outbox's identity sequence, looked up once. `None` when the table has
    /// none: then the floor cannot rule out stragglers and stays at the start.
    pub(super) async fn sequence_oid(&self, client: &deadpool_postgres::Object) -> Option<u32> {
        if let Some(known) = *self.shared.seq_oid.lock().unwrap_or_else(|p| p.into_inner()) {
            return known;
        }
        let row = client
            .query_one("SELECT pg_get_serial_sequence($1, 'seq')::regclass::oid", &[&self.table.quoted()])
            .await
            .ok()?;
        let oid: Option<u32> = row.get(0);
        if oid.is_none() {
            tracing::warn!(
                table = %self.table,
                "the seq column has no owned sequence: claims cannot skip dead rows safely and scan from the start"
            );
        }
        *self.shared.seq_oid.lock().unwrap_or_else(|p| p.into_inner()) = Some(oid);
        oid
    }

    /// Whether the claim may use migration 0004's pending key index, looked up
    /// once (and again by every schema check). When the lookup fails, the
    /// statement that works without it.
    async fn pending_key_index(&self, client: &deadpool_postgres::Object) -> bool {
        if let Some(known) = *self.shared.key_index.lock().unwrap_or_else(|p| p.into_inner()) {
            return known;
        }
        let Ok(found) = super::schema::has_pending_key_index(client, &self.table).await else { return false };
        if !found {
            tracing::warn!(
                table = %self.table,
                "the table lacks the pending key index of migration 0004: with several relays, a claim's order \
                 check reads every pending event between the floor and its batch; run `outbox-relay migrate`"
            );
        }
        *self.shared.key_index.lock().unwrap_or_else(|p| p.into_inner()) = Some(found);
        found
    }

    /// Leaves these keys out of this relay's claims for a while.
    fn block_keys(&self, keys: Vec<String>) {
        if !keys.is_empty() {
            self.shared.blocked.lock().unwrap_or_else(|p| p.into_inner()).add(keys, Instant::now());
        }
    }

    fn skip(&self) -> MutexGuard<'_, Option<Skip>> {
        self.shared.skip.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets every left-out key back in: this relay just resolved another
    /// relay's prepared batch, which may have held them.
    pub fn let_keys_back_in(&self) {
        self.shared.blocked.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn blocked_keys(&self) -> Vec<String> {
        self.shared.blocked.lock().unwrap_or_else(|p| p.into_inner()).current(Instant::now())
    }
}
