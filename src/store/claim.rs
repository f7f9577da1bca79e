//! Claiming a batch: pending rows from the floor, in `seq` order, locked with
//! `FOR UPDATE SKIP LOCKED` in a transaction that stays open while the batch is
//! published (see `finish.rs` for how it ends), with the per-key fence that
//! keeps order across relays. The SQL sits beside the code that reads its
//! columns, by name.

use std::collections::HashMap;
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use super::claim_sql::ClaimSql;
use super::connection::{Conn, TxnKind};
use super::finish::{Claimed, RawBytes};
use super::passed::{Link, Passed};
use super::skip::{ScanContext, Skip};
use super::{Store, StoreError};
use crate::event::OutboxEvent;
use crate::telemetry::events::{ClaimRan, StatementTimedOut};
use crate::telemetry::Emit;

/// Where the CloudEvents columns sit in the claim's rows (present only when
/// `[cloudevents]` names such columns): looked up once per claim, not per row.
#[derive(Clone, Copy, Default)]
struct CeColumns {
    source: Option<usize>,
    r#type: Option<usize>,
}

impl CeColumns {
    fn of(row: Option<&tokio_postgres::Row>) -> CeColumns {
        let at = |name: &str| row.and_then(|r| r.columns().iter().position(|c| c.name() == name));
        CeColumns { source: at("ce_source"), r#type: at("ce_type") }
    }
}

/// Where a claim's main scan started, the last row it took, and the floor's
/// generation then (see `passed.rs`).
pub(super) struct MainScan {
    from: i64,
    last: Option<i64>,
    generation: u64,
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
    /// `claimed`: when the claim was sent, on the wall clock.
    /// `ce`: the positions of the CloudEvents columns, when the claim reads them.
    fn read(row: &tokio_postgres::Row, claimed: std::time::SystemTime, ce: CeColumns) -> Result<Row, StoreError> {
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
                partition: row.try_get("partition")?,
                ce_source: ce.source.map(|i| row.try_get(i)).transpose()?.flatten(),
                ce_type: ce.r#type.map(|i| row.try_get(i)).transpose()?.flatten(),
                claimed,
            },
            first_foreign: None,
        })
    }

    /// Reads the claim's rows: the batch, then the fence's answers (rows with
    /// no `id`: a key and the earliest pending `seq` of it held elsewhere, or
    /// delayed), which go to the batch's rows of that key.
    fn read_all(rows: &[tokio_postgres::Row], claimed: std::time::SystemTime) -> Result<Vec<Row>, StoreError> {
        let ce = CeColumns::of(rows.first());
        let mut fence: HashMap<String, i64> = HashMap::new();
        let mut batch: Vec<Row> = Vec::with_capacity(rows.len());
        for r in rows {
            if r.try_get::<_, Option<uuid::Uuid>>("id")?.is_some() {
                batch.push(Row::read(r, claimed, ce)?);
                continue;
            }
            let (key, first): (String, i64) = (r.try_get("key")?, r.try_get("first_foreign")?);
            let earliest = fence.entry(key).or_insert(first);
            *earliest = (*earliest).min(first);
        }
        for row in &mut batch {
            row.first_foreign = row.event.key.as_ref().and_then(|k| fence.get(k).copied());
        }
        // In seq order here rather than in the statement, which would sort
        // every row with its payload.
        batch.sort_unstable_by_key(|r| r.event.seq);
        Ok(batch)
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
            let Some((mut claimed, rows, scan)) = self.claim_once(limit, own).await? else { break };
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
            let first = claimed.events.first().map(|e| e.id);
            self.passed().record(Link::new(scan.from, scan.last, scan.generation, first, claimed.events.len()));
            claimed.start_heartbeat(self.shared.keepalive);
            return Ok(Some(claimed));
        }
        // Nothing claimable. When keys are left out (another relay holds
        // their heads), say so, holding nothing: the caller waits a moment
        // rather than looking again at once (the held keys' rows are pending).
        let waiting_on_others = deferred_before > 0 || !self.blocked_keys().is_empty();
        Ok(waiting_on_others.then(|| Claimed::nothing(self.finish_sql.clone(), deferred_before)))
    }

    async fn claim_once(
        &self,
        limit: usize,
        own: &[uuid::Uuid],
    ) -> Result<Option<(Claimed, Vec<Row>, MainScan)>, StoreError> {
        let started = Instant::now();
        let client = self.client().await?;
        let seq_oid = self.sequence_oid(&client).await;
        let open = self.shared.clock.begin(TxnKind::Batch);
        let conn = Arc::new(Conn::new(client, self.tls.clone(), open));
        let (cx, start, lockers_wanted, generation) = self.scan_context();
        // The main scan may start past this relay's own batches in flight; the
        // probe (where the skip comes from) still looks from `start`.
        let main_start = self.passed().start(start, generation, own);
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
        let shaped = self.shaped(client).await?;
        let sql: &ClaimSql = &shaped.claim;
        let claim_stmt = client.prepare_cached(&sql.claim).await.map_err(timed)?;
        let probe_stmt = client.prepare_cached(&sql.probe).await.map_err(timed)?;
        let limit = limit as i64;
        let claim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&floor, &limit, &own, blocked, &main_start];
        let probe_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&floor, &oid, &lockers_wanted, &start, blocked];
        // One round trip: the three requests are pipelined on the connection.
        let sent = Instant::now();
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
        let round_trip = sent.elapsed();
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
        let wall = std::time::SystemTime::now() - started.elapsed();
        let parsed = Row::read_all(&rows, wall)?;
        let main_last: Option<i64> = match rows.first() {
            Some(r) => r.try_get("main_last")?,
            None => None,
        };
        let claimed_max = parsed.iter().map(|r| r.event.seq).max();
        let next: Option<i64> = probe.try_get("next")?;
        {
            let mut skip = self.skip();
            *skip = Skip::after_claim(skip.take(), &cx, next);
        }
        tracing::trace!(
            floor,
            start,
            main_start,
            rows = parsed.len(),
            last = claimed_max,
            key_index = sql.shape.key_index,
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
        let scan = MainScan { from: main_start, last: main_last, generation };
        Ok(Some((Claimed::open(conn, self.finish_sql.clone(), claimed_at, round_trip), parsed, scan)))
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

    /// Leaves these keys out of this relay's claims for a while.
    fn block_keys(&self, keys: Vec<String>) {
        if !keys.is_empty() {
            self.shared.blocked.lock().unwrap_or_else(|p| p.into_inner()).add(keys, Instant::now());
        }
    }

    fn passed(&self) -> MutexGuard<'_, Passed> {
        self.shared.passed.lock().unwrap_or_else(|p| p.into_inner())
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
