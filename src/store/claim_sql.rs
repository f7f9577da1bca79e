//! The claim's SQL, built once per table shape (shape.rs) from validated
//! identifiers. Lookups are written in the words of one index's condition,
//! which no other index's condition matches, so they can use only that index,
//! whatever the statistics say. (Stale ones, from when nothing was pending,
//! made the planner read the whole pending index for them, once per claim or
//! once per key.)

use super::shape::Shape;
use crate::config::{Ordering, TableName};

/// The claim statement and its probe for one table shape.
#[derive(Debug)]
pub(super) struct ClaimSql {
    pub(super) shape: Shape,
    /// The claim: its order check through the pending key index (migration
    /// 0004) when the table has it, else from the floor to the batch's end.
    pub(super) claim: String,
    pub(super) probe: String,
}

/// Pending, in the words of migration 0001's index (retries and delayed rows
/// included).
const PENDING: &str = "published_at IS NULL AND parked_at IS NULL";
// Waiting for a retry, in the words of the retry-due index (migration 0003):
const WAITING_O: &str = "coalesce(o.published_at, o.parked_at) IS NULL";
const WAITING_W: &str = "coalesce(w.published_at, w.parked_at) IS NULL";
// Pending and not waiting for a retry, in the words of the pending key index
// (0004; it holds delayed rows too, which hold back their key's later rows):
const PENDING_P: &str = "p.retry_at IS NULL AND coalesce(p.published_at, p.parked_at) IS NULL";

impl ClaimSql {
    /// `extra`: more columns of the row to read, as (alias, column), validated
    /// identifiers (the CloudEvents columns).
    pub(super) fn new(table: &TableName, ordering: Ordering, shape: Shape, extra: &[(&str, String)]) -> ClaimSql {
        let t = table.quoted();
        let fence = if shape.key_index { fence_by_key(&t) } else { fence_by_range(&t) };
        let ready = shape.ready("");
        ClaimSql {
            claim: claim_sql(&t, ordering, shape, &fence, extra),
            // Run right after the claim, in its transaction: the head (lowest
            // ready seq at or above the floor, held by anyone), when $3, who
            // holds the identity sequence's ($2) lock, where sequence values
            // come from (see floor.rs), and when keys were left out ($5), the
            // lowest such seq from the scan's start ($4) whose key was not
            // (skip.rs).
            probe: format!(
                "SELECT (SELECT seq FROM {t} WHERE {ready} AND seq >= $1 ORDER BY seq LIMIT 1)
                          AS head,
                        CASE WHEN cardinality($5::text[]) > 0 THEN (
                          SELECT seq FROM {t} WHERE {ready} AND seq >= $4
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
            shape,
        }
    }
}

/// The claim statement around one of the two fences below.
///
/// $1 floor, $2 limit, $3 ids this relay holds in its other open batch, $4 keys
/// to leave out (another relay holds their head), $5 where the main scan
/// starts (the floor, or the skip above it: skip.rs).
///
/// `due`: events whose retry time has come, wherever they are (the floor passes
/// events that wait), read through the retry-due index by `retry_at`: never the
/// pending index below the floor. `late` (with migration 0005): delayed events
/// whose `deliver_after` has come, through the delayed-due index. `main`: the
/// ready rows from $5, in seq order. `fence`: per-key order with several
/// relays, and behind events that wait for a retry or their time: for each key
/// of the batch, the earliest pending row not in this batch and not held by
/// this relay's other batch (another relay holds it, or it waits); our later
/// rows of that key are deferred.
///
/// `held`: this batch's rows and $3, which the fence passes over. Looked up
/// through a hash (`NOT IN` a subquery): a prepared statement's generic plan
/// checks `= ANY($3)` element by element, and with the previous batch in
/// flight the fence's range holds ~2 × the limit rows, 2000 × 1000
/// comparisons (8 of a claim's 23 ms on 2026-12-01).
///
/// The CTEs carry only what the fence needs; payloads (≈1 KB) are read once, at
/// the end, through the rows' ctids (locked: they cannot move).
///
/// `main_last`: the last `seq` the main scan took (where the next claim's may
/// start while this batch is in flight: `passed.rs`). No `ORDER BY`: sorting
/// here would carry every payload through a sort; the relay orders the batch.
///
/// The fence's and the delays' answers come back as rows of their own beside the
/// batch (`id` NULL; `key`, and its first foreign `seq` in `first_foreign`), and
/// the relay matches them to the batch by key. Joined here instead, a plan made
/// from one-row estimates rescanned the fence once per batch row: 500 × 490
/// comparisons, 25 of a claim's 35 ms with the batch's keys far above the floor.
fn claim_sql(t: &str, ordering: Ordering, shape: Shape, fence: &str, extra: &[(&str, String)]) -> String {
    // Strict order: an event whose key has an earlier parked event waits until
    // an operator replays (or deletes) the parked one.
    let strict = match ordering {
        Ordering::PerKey => String::new(),
        Ordering::Strict => format!(
            " AND NOT EXISTS (SELECT 1 FROM {t} p WHERE p.parked_at IS NOT NULL AND p.key = o.key AND p.seq < o.seq)"
        ),
    };
    let cols = "ctid, id, seq, key";
    let (late, late_rows, late_count) = match shape.delayed("o.") {
        Some(delayed) => (
            format!(
                "late AS MATERIALIZED (
                   SELECT {cols} FROM {t} o
                   WHERE o.deliver_after <= now() AND {delayed}{strict}
                   ORDER BY o.deliver_after, o.seq LIMIT (SELECT $2 - count(*) FROM due) FOR UPDATE SKIP LOCKED),"
            ),
            " UNION ALL SELECT * FROM late",
            " - (SELECT count(*) FROM late)",
        ),
        None => (String::new(), "", ""),
    };
    let ready = shape.ready("o.");
    let partition = shape.partition_column();
    let delays = delays(t, shape);
    let extra_nulls = " NULL,".repeat(extra.len());
    let extra: String = extra.iter().map(|(alias, column)| format!(" o.\"{column}\"::text AS {alias},")).collect();
    format!(
        "WITH due AS MATERIALIZED (
           SELECT {cols} FROM {t} o
           WHERE o.retry_at IS NOT NULL AND o.retry_at <= now() AND {WAITING_O}{strict}
           ORDER BY o.retry_at, o.seq LIMIT $2 FOR UPDATE SKIP LOCKED),
         {late}
         main AS MATERIALIZED (
           SELECT {cols} FROM {t} o
           WHERE {ready} AND o.seq >= $5
             AND (o.key IS NULL OR NOT (o.key = ANY($4))){strict}
           ORDER BY o.seq LIMIT (SELECT $2 - count(*) FROM due){late_count} FOR UPDATE SKIP LOCKED),
         claimed AS (SELECT * FROM due{late_rows} UNION ALL SELECT * FROM main),
         held AS MATERIALIZED (SELECT id FROM claimed UNION ALL SELECT unnest($3::uuid[])),
         {fence},
         {delays}
         SELECT c.ctid::text AS ctid, c.id, c.seq, o.topic, c.key, o.payload, o.headers, o.attempts,
                (extract(epoch FROM o.created_at) * 1000000)::int8 AS created_at_us,
                {partition}::int4 AS partition,{extra}
                (SELECT max(seq) FROM main) AS main_last,
                NULL::int8 AS first_foreign
         FROM claimed c JOIN {t} o ON o.ctid = c.ctid
         UNION ALL
         SELECT NULL, NULL, NULL, NULL, f.key, NULL, NULL, NULL, NULL, NULL,{extra_nulls} NULL, f.first
         FROM (SELECT key, first FROM fence UNION ALL SELECT key, first FROM delays) f
         WHERE f.first IS NOT NULL"
    )
}

/// The batch keys' delayed rows (migration 0005), wherever they are: a
/// delayed row holds back its key's later rows until it goes, however far
/// below the floor it sits. One lookup per key of the batch through the
/// delayed key index (`key = … ORDER BY seq LIMIT 1` only that index serves;
/// a join let stale statistics pick the delayed-due index and read every
/// delayed row), and none at all while no row is delayed. Empty without 0005.
fn delays(t: &str, shape: Shape) -> String {
    let Some(delayed) = shape.delayed("d.") else {
        return "delays AS (SELECT NULL::text AS key, NULL::int8 AS first WHERE false)".into();
    };
    let any = shape.delayed("x.").unwrap_or_default();
    format!(
        "delays AS MATERIALIZED (
           SELECT k.key, (SELECT d.seq FROM {t} d WHERE d.key = k.key AND {delayed}
                            AND d.id NOT IN (SELECT id FROM held)
                          ORDER BY d.seq LIMIT 1) AS first
           FROM (SELECT DISTINCT key FROM claimed WHERE key IS NOT NULL) k
           WHERE EXISTS (SELECT 1 FROM {t} x WHERE {any} ORDER BY x.deliver_after LIMIT 1))"
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
/// index. Materialized, so each lookup runs once per
/// key. Postgres runs only the branch whose one-time condition holds.
fn fence_by_key(t: &str) -> String {
    let near = "(SELECT max(seq) FROM claimed) - $1 <= 4 * $2";
    format!(
        "keys AS (SELECT key, max(seq) AS last FROM claimed WHERE key IS NOT NULL GROUP BY key),
         waits AS MATERIALIZED (
           SELECT w.key, min(w.seq) AS first FROM {t} w
           WHERE w.retry_at IS NOT NULL AND {WAITING_W} AND w.key IN (SELECT key FROM keys)
             AND w.id NOT IN (SELECT id FROM held)
           GROUP BY w.key),
         by_key AS MATERIALIZED (
           SELECT k.key, least(
               (SELECT p.seq FROM {t} p WHERE p.key = k.key AND {PENDING_P} AND p.seq >= $1 AND p.seq < k.last
                  AND p.id NOT IN (SELECT id FROM held)
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
/// batch's keys through the retry-due index. Its cost
/// grows with everything pending between the floor and the batch, a held hot
/// key's backlog included.
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
           WHERE p.key IN (SELECT key FROM claimed) AND p.id NOT IN (SELECT id FROM held)
           GROUP BY p.key)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(shape: Shape) -> ClaimSql {
        ClaimSql::new(&TableName::parse("public.outbox").unwrap(), Ordering::PerKey, shape, &[])
    }

    /// A generic plan checks `= ANY($3)` element by element, for every row
    /// the fence reads (2000 × 1000 comparisons with a batch in flight).
    #[test]
    fn the_fence_looks_up_rows_held_here_through_a_hash() {
        for (key_index, delay) in [(false, false), (true, false), (true, true)] {
            let s = sql(Shape { key_index, delay, partition: delay, ready_index: delay });
            assert!(!s.claim.contains("ANY($3)"), "{}", s.claim);
            assert!(s
                .claim
                .contains("held AS MATERIALIZED (SELECT id FROM claimed UNION ALL SELECT unnest($3::uuid[]))"));
            assert!(s.claim.contains("NOT IN (SELECT id FROM held)"), "{}", s.claim);
        }
    }

    /// Joined in SQL, a plan from one-row estimates rescanned the fence once
    /// per batch row (500 × 490 comparisons a claim).
    #[test]
    fn the_fence_comes_back_as_rows_of_its_own_not_joined_to_the_batch() {
        for (key_index, delay) in [(false, false), (true, false), (true, true)] {
            let s = sql(Shape { key_index, delay, partition: delay, ready_index: delay });
            assert!(!s.claim.contains("JOIN fence") && !s.claim.contains("JOIN delays"), "{}", s.claim);
            assert!(s.claim.contains("FROM (SELECT key, first FROM fence UNION ALL SELECT key, first FROM delays) f"));
        }
        let ce = ClaimSql::new(
            &TableName::parse("public.outbox").unwrap(),
            Ordering::PerKey,
            Shape::default(),
            &[("ce_source", "src".into()), ("ce_type", "typ".into())],
        );
        assert!(ce.claim.contains("NULL, NULL, NULL, NULL, NULL, f.first"), "one NULL per column: {}", ce.claim);
    }

    /// Sorting in the statement carried every row's payload through a sort;
    /// the relay orders the batch by `seq` itself (claim.rs, `read_all`).
    #[test]
    fn the_claim_does_not_sort_its_rows_and_names_its_main_scan_s_last_row() {
        for (key_index, delay) in [(false, false), (true, false), (true, true)] {
            let s = sql(Shape { key_index, delay, partition: delay, ready_index: delay });
            assert!(!s.claim.trim_end().ends_with("ORDER BY seq"), "{}", s.claim);
            assert!(s.claim.contains("(SELECT max(seq) FROM main) AS main_last"), "{}", s.claim);
        }
    }

    #[test]
    fn without_0005_the_claim_names_neither_new_column() {
        for key_index in [false, true] {
            let s = sql(Shape { key_index, ..Shape::default() });
            assert!(!s.claim.contains("deliver_after") && !s.claim.contains("\"partition\""), "{}", s.claim);
            assert!(!s.probe.contains("deliver_after"));
        }
    }

    #[test]
    fn with_0005_delayed_rows_are_claimed_by_time_and_fence_their_key() {
        for key_index in [false, true] {
            let s = sql(Shape { key_index, delay: true, partition: true, ready_index: true });
            assert!(s.claim.contains("late AS MATERIALIZED"), "{}", s.claim);
            assert!(s.claim.contains("d.key = k.key AND d.deliver_after IS NOT NULL"), "per key: {}", s.claim);
            assert!(s.claim.contains("o.\"partition\"::int4 AS partition"));
            assert!(s.probe.contains("deliver_after IS NULL"));
        }
    }
}
