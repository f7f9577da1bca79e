\set floor 600001
\set lim 500
PREPARE c(bigint, int, uuid[]) AS
WITH due AS MATERIALIZED (
  SELECT ctid, id, seq, topic, key, payload, headers, attempts, created_at FROM prof_churn o
  WHERE retry_at IS NOT NULL AND retry_at <= now() AND published_at IS NULL AND parked_at IS NULL AND seq < $1
    AND NOT EXISTS (SELECT 1 FROM prof_churn w WHERE w.key = o.key AND w.seq < o.seq AND w.retry_at > now() AND w.published_at IS NULL AND w.parked_at IS NULL)
  ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED
), main AS MATERIALIZED (
  SELECT ctid, id, seq, topic, key, payload, headers, attempts, created_at FROM prof_churn o
  WHERE published_at IS NULL AND parked_at IS NULL AND seq >= $1
    AND (retry_at IS NULL OR retry_at <= now())
    AND (key IS NULL OR NOT EXISTS (SELECT 1 FROM prof_churn w WHERE w.key = o.key AND w.seq < o.seq AND w.retry_at > now() AND w.published_at IS NULL AND w.parked_at IS NULL))
  ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED
), claimed AS (SELECT * FROM due UNION ALL SELECT * FROM main),
fence AS (
  SELECT p.key, min(p.seq) AS first FROM prof_churn p
  WHERE p.published_at IS NULL AND p.parked_at IS NULL
    AND p.seq >= $1 AND p.seq < (SELECT max(seq) FROM claimed)
    AND p.key IN (SELECT key FROM claimed) AND NOT (p.id = ANY($3))
    AND NOT EXISTS (SELECT 1 FROM claimed c WHERE c.id = p.id)
  GROUP BY p.key
)
SELECT c.ctid::text, c.id, c.seq, c.topic, c.key, c.payload, c.headers, c.attempts, c.created_at, f.first
FROM claimed c LEFT JOIN fence f ON f.key = c.key ORDER BY c.seq;
SET plan_cache_mode = force_generic_plan;
SET max_parallel_workers_per_gather = 0;
SET jit = off;
BEGIN;
EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE c(:floor, :lim, '{}');
ROLLBACK;
BEGIN;
\timing on
EXECUTE c(:floor, :lim, '{}') \g /dev/null
EXECUTE c(:floor, :lim, '{}') \g /dev/null
\timing off
ROLLBACK;
