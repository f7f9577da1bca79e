//! `delayed`: what events waiting for `deliver_after` (migration 0005) cost
//! the claims of everything else: one relay's claim cost with no delayed
//! events, then with 100k and 1M of them scheduled a day ahead.

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct DelayedCost {
    /// Events waiting for a `deliver_after` a day ahead.
    pub(crate) future: i64,
    pub(crate) claims: i64,
    pub(crate) buffers_per_claim: f64,
    pub(crate) ms_per_claim: f64,
    /// Postgres time of the claims per second of the run (ms/s).
    pub(crate) claim_ms_per_s: f64,
    /// Postgres time per second of every relay statement on the table
    /// (claims, finishes, the idle look, the sweep below the floor, the
    /// backlog gauges): everything the relay asks of the database.
    pub(crate) relay_ms_per_s: f64,
    pub(crate) other_keys_commit_to_ack_ms: Quantiles,
    /// Delayed events published during the run (must be 0: not yet due).
    pub(crate) published_early: i64,
}

/// One relay (mark mode, batch 500, sweep every 5 s so the sweep below the
/// floor is measured too) while 4 writers add other keys' events at 1k ev/s
/// for 20 s, with `future` events already waiting a day ahead (200-byte
/// payloads, 10k keys of their own). Nothing is vacuumed.
pub(crate) async fn delayed_claim_cost(env: &Env, args: &Args, future: i64) -> DelayedCost {
    let table = env.new_table("delayed");
    let topics = env.topics(&table, &TOPICS, 6, true).await;
    let db = env.db().await;
    if future > 0 {
        let started = Instant::now();
        db.execute(
            &format!(
                "INSERT INTO public.{table} (topic, key, payload, deliver_after)
                 SELECT $1, 'later-' || (i % 10000), jsonb_build_object('pad', repeat('x', 200)), now() + interval '1 day'
                 FROM generate_series(1, $2::int8) i"
            ),
            &[&topics[0], &future],
        )
        .await
        .expect("delayed events");
        say(format!("delayed: {future} future events written in {:.1} s", started.elapsed().as_secs_f64()));
    }
    let consumer = LatencyConsumer::start(&env.brokers, &topics, 6);
    let mut s = args.relay_settings("mark", "at-least-once", &table);
    s.push(("OUTBOX_RELAY__RELAY__BATCH_SIZE".into(), "500".into()));
    s.push(("OUTBOX_RELAY__RELAY__SWEEP_INTERVAL".into(), "5s".into()));
    let relay = spawn_relay(env, &table, &s);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = relay_stats(&db, &table).await;
    let writers = env.writers(&table, topics, 4, 1000);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let written = writers.finish().await;
    let after = relay_stats(&db, &table).await;
    consumer.wait_for(written as usize, Duration::from_secs(30));
    let seen = consumer.finish();
    relay.stop(Duration::from_secs(30));
    let published_early: i64 = db
        .query_one(
            &format!(
                "SELECT count(*) FROM public.{table} WHERE deliver_after IS NOT NULL AND published_at IS NOT NULL"
            ),
            &[],
        )
        .await
        .expect("published early")
        .get(0);
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    let claims = (after.claims - before.claims).max(1);
    DelayedCost {
        future,
        claims,
        buffers_per_claim: (after.claim_buffers - before.claim_buffers) as f64 / claims as f64,
        ms_per_claim: (after.claim_ms - before.claim_ms) / claims as f64,
        claim_ms_per_s: (after.claim_ms - before.claim_ms) / 20.0,
        relay_ms_per_s: (after.relay_ms - before.relay_ms) / 20.0,
        other_keys_commit_to_ack_ms: quantiles(insert_to_ack_ms(&seen)),
        published_early,
    }
}

struct RelayStats {
    claims: i64,
    claim_buffers: i64,
    claim_ms: f64,
    relay_ms: f64,
}

/// From pg_stat_statements, for `table`: the claim statement's calls; the
/// shared buffers and time of it and its probe; the time of every statement
/// but the application's inserts.
async fn relay_stats(db: &tokio_postgres::Client, table: &str) -> RelayStats {
    let r = db
        .query_one(
            "SELECT coalesce(sum(calls) FILTER (WHERE query LIKE 'WITH due AS%'), 0)::int8,
                    coalesce(sum(shared_blks_hit + shared_blks_read)
                      FILTER (WHERE query LIKE 'WITH due AS%' OR query LIKE 'SELECT (SELECT seq FROM%AS head%'), 0)::int8,
                    coalesce(sum(total_exec_time)
                      FILTER (WHERE query LIKE 'WITH due AS%' OR query LIKE 'SELECT (SELECT seq FROM%AS head%'), 0)::float8,
                    coalesce(sum(total_exec_time) FILTER (WHERE query NOT ILIKE 'INSERT%'), 0)::float8
             FROM pg_stat_statements WHERE query LIKE '%\"' || $1 || '\"%'",
            &[&table],
        )
        .await
        .expect("pg_stat_statements (scripts/infra up loads it)");
    RelayStats { claims: r.get(0), claim_buffers: r.get(1), claim_ms: r.get(2), relay_ms: r.get(3) }
}

pub(crate) fn print_delayed(rows: &[DelayedCost]) {
    println!("delayed events: one relay, other keys at 1k ev/s for 20 s, with N events waiting a day ahead:");
    println!("  waiting │ claims │ buffers/claim │ ms/claim │ claim ms/s │ relay ms/s │ insert→ack p50 / p99 ms │ sent early");
    for r in rows {
        println!(
            "  {:>7} │ {:>6} │ {:>13.0} │ {:>8.3} │ {:>10.1} │ {:>10.1} │ {:.1} / {:.1} │ {}",
            r.future,
            r.claims,
            r.buffers_per_claim,
            r.ms_per_claim,
            r.claim_ms_per_s,
            r.relay_ms_per_s,
            r.other_keys_commit_to_ack_ms.p50,
            r.other_keys_commit_to_ack_ms.p99,
            r.published_early
        );
    }
    if let [none, some, many] = rows {
        for (a, b) in [(many, none), (many, some)] {
            println!(
                "  {} waiting / {}: buffers per claim ×{:.2}, time per claim ×{:.2}, relay time per second ×{:.2}",
                a.future,
                b.future,
                a.buffers_per_claim / b.buffers_per_claim,
                a.ms_per_claim / b.ms_per_claim,
                a.relay_ms_per_s / b.relay_ms_per_s
            );
        }
    }
}
