//! `hotkey`: 3 relays, one key with a large backlog, other keys at 1k ev/s.

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct HotKey {
    pub(crate) relays: usize,
    pub(crate) backlog: i64,
    pub(crate) other_rate: u64,
    pub(crate) other_keys_commit_to_ack_ms: Quantiles,
    pub(crate) hot_key_drained_s: f64,
}

pub(crate) async fn hotkey(env: &Env, args: &Args) -> HotKey {
    let backlog = 10_000;
    let table = env.new_table("hot");
    let topics = env.topics(&table, &TOPICS, 6, true).await;
    let db = env.db().await;
    db.execute(
        &format!(
            "INSERT INTO public.{table} (topic, key, payload)
             SELECT $1, 'hot-key', jsonb_build_object('ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::int8, 'pad', repeat('x', {PAD}))
             FROM generate_series(1, $2::int)"
        ),
        &[&topics[0], &(backlog as i32)],
    )
    .await
    .expect("hot backlog");
    let consumer = LatencyConsumer::start(&env.brokers, &topics, 6);
    let writers = env.writers(&table, topics, 4, 1000);
    let t0 = Instant::now();
    let relays: Vec<RelayProcess> = (0..3)
        .map(|i| {
            let mut s = args.relay_settings("mark", "at-least-once", &table);
            s.push(("OUTBOX_RELAY__RELAY__ID".into(), format!("{table}-{i}")));
            s.push(("OUTBOX_RELAY__RELAY__BATCH_SIZE".into(), "500".into()));
            spawn_relay(env, &table, &s)
        })
        .collect();
    let mut hot_done = None;
    while t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if hot_done.is_none() {
            let left: i64 = db
                .query_one(
                    &format!("SELECT count(*) FROM public.{table} WHERE key = 'hot-key' AND published_at IS NULL"),
                    &[],
                )
                .await
                .expect("hot left")
                .get(0);
            if left == 0 {
                hot_done = Some(t0.elapsed().as_secs_f64());
            }
        }
    }
    let written = writers.finish().await;
    consumer.wait_for(written as usize + backlog as usize, Duration::from_secs(30));
    let seen = consumer.finish();
    for r in relays {
        r.stop(Duration::from_secs(30));
    }
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    let others: Vec<Timed> = seen.into_iter().filter(|s| !s.hot).collect();
    HotKey {
        relays: 3,
        backlog,
        other_rate: 1000,
        other_keys_commit_to_ack_ms: quantiles(insert_to_ack_ms(&others)),
        hot_key_drained_s: hot_done.unwrap_or(f64::NAN),
    }
}

/// One row of `hotkey`'s claim cost (#21 item 5): a relay's claims while
/// another relay holds the head of a hot key with `backlog` events behind it.
#[derive(Debug, Serialize, Clone)]
pub(crate) struct ClaimCost {
    pub(crate) backlog: i64,
    pub(crate) claims: i64,
    pub(crate) buffers_per_claim: f64,
    pub(crate) ms_per_claim: f64,
    /// Postgres time in claims per second of the run (ms/s): what the relay's
    /// claiming costs the database, however often it claims.
    pub(crate) claim_ms_per_s: f64,
    pub(crate) other_keys_commit_to_ack_ms: Quantiles,
}

/// The claim cost of one relay with no hot key, then with a `backlog`-event
/// hot key whose first 500 events another session holds locked (as another
/// relay's batch would: its claims see the key held, the whole time). Other
/// keys are written at 1k ev/s for 20 s each time. From pg_stat_statements:
/// the claim statement's calls, and the shared buffers and execution time of
/// the claim and its probe on that table.
pub(crate) async fn hotkey_claim_cost(env: &Env, args: &Args, backlog: i64) -> ClaimCost {
    let table = env.new_table("hotcost");
    let topics = env.topics(&table, &TOPICS, 6, true).await;
    let db = env.db().await;
    let holder = env.db().await;
    if backlog > 0 {
        db.execute(
            &format!(
                "INSERT INTO public.{table} (topic, key, payload)
                 SELECT $1, 'hot-key', jsonb_build_object('pad', repeat('x', {PAD})) FROM generate_series(1, $2::int)"
            ),
            &[&topics[0], &(backlog as i32)],
        )
        .await
        .expect("hot backlog");
        holder.batch_execute("BEGIN").await.expect("begin");
        holder
            .execute(
                &format!("SELECT 1 FROM public.{table} WHERE key = 'hot-key' ORDER BY seq LIMIT 500 FOR UPDATE"),
                &[],
            )
            .await
            .expect("hold the hot key's head");
    }
    let consumer = LatencyConsumer::start(&env.brokers, &topics, 6);
    let mut s = args.relay_settings("mark", "at-least-once", &table);
    s.push(("OUTBOX_RELAY__RELAY__BATCH_SIZE".into(), "500".into()));
    let relay = spawn_relay(env, &table, &s);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = claim_stats(&db, &table).await;
    let writers = env.writers(&table, topics, 4, 1000);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let written = writers.finish().await;
    let after = claim_stats(&db, &table).await;
    consumer.wait_for(written as usize, Duration::from_secs(30));
    let seen = consumer.finish();
    relay.stop(Duration::from_secs(30));
    holder.batch_execute("ROLLBACK").await.ok();
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    let claims = (after.0 - before.0).max(1);
    let others: Vec<Timed> = seen.into_iter().filter(|s| !s.hot).collect();
    ClaimCost {
        backlog,
        claims,
        buffers_per_claim: (after.1 - before.1) as f64 / claims as f64,
        ms_per_claim: (after.2 - before.2) / claims as f64,
        claim_ms_per_s: (after.2 - before.2) / 20.0,
        other_keys_commit_to_ack_ms: quantiles(insert_to_ack_ms(&others)),
    }
}

/// Calls of `table`'s claim statement so far, and the shared buffers and
/// execution time (ms) of it and the probe that runs with it.
async fn claim_stats(db: &tokio_postgres::Client, table: &str) -> (i64, i64, f64) {
    let r = db
        .query_one(
            "SELECT coalesce(sum(calls) FILTER (WHERE query LIKE 'WITH due AS%'), 0)::int8,
                    coalesce(sum(shared_blks_hit + shared_blks_read), 0)::int8,
                    coalesce(sum(total_exec_time), 0)::float8
             FROM pg_stat_statements WHERE (query LIKE 'WITH due AS%' OR query LIKE 'SELECT (SELECT seq FROM%AS head%')
               AND query LIKE '%\"' || $1 || '\"%'",
            &[&table],
        )
        .await
        .expect("pg_stat_statements (scripts/infra up loads it)");
    (r.get(0), r.get(1), r.get(2))
}

pub(crate) fn print_claim_cost(rows: &[ClaimCost]) {
    println!("claim cost, one relay, another holding a hot key's head; other keys at 1k ev/s for 20 s:");
    println!("  hot backlog │ claims │ buffers/claim │ ms/claim │ claim ms/s │ other keys insert→ack p50 / p99 ms");
    for r in rows {
        println!(
            "  {:>11} │ {:>6} │ {:>13.0} │ {:>8.3} │ {:>10.1} │ {:.1} / {:.1}",
            r.backlog,
            r.claims,
            r.buffers_per_claim,
            r.ms_per_claim,
            r.claim_ms_per_s,
            r.other_keys_commit_to_ack_ms.p50,
            r.other_keys_commit_to_ack_ms.p99
        );
    }
    if let [base, small, big] = rows {
        println!(
            "  {}-event hot backlog / {}: buffers per claim ×{:.2}, time per claim ×{:.2}, claim time per second ×{:.2} \
             (no hot key / {}: ×{:.2}, ×{:.2}, ×{:.2})",
            big.backlog,
            small.backlog,
            big.buffers_per_claim / small.buffers_per_claim,
            big.ms_per_claim / small.ms_per_claim,
            big.claim_ms_per_s / small.claim_ms_per_s,
            big.backlog,
            base.buffers_per_claim / big.buffers_per_claim,
            base.ms_per_claim / big.ms_per_claim,
            base.claim_ms_per_s / big.claim_ms_per_s
        );
    }
}
