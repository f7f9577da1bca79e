CREATE TEMP TABLE b AS SELECT id, seq, key FROM prof_churn WHERE published_at IS NULL AND parked_at IS NULL ORDER BY seq LIMIT 500;
select max(seq) as mx, array_agg(distinct key)::text as ks, array_agg(id)::text as ids from b \gset
PREPARE f(bigint, text[], uuid[]) AS SELECT key, min(seq) FROM prof_churn
                 WHERE published_at IS NULL AND parked_at IS NULL
                   AND seq < $1 AND key = ANY($2) AND NOT (id = ANY($3))
                 GROUP BY key;
EXPLAIN (ANALYZE, BUFFERS) EXECUTE f(:mx, :'ks', :'ids');
SET plan_cache_mode = force_generic_plan;
EXPLAIN (ANALYZE, BUFFERS) EXECUTE f(:mx, :'ks', :'ids');
