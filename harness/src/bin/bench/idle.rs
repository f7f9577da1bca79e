//! `idle`: what an idle relay costs Postgres (statements/s, CPU).

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Idle {
    pub(crate) seconds: u64,
    pub(crate) poll_interval: String,
    pub(crate) statements_per_s: f64,
    /// Time Postgres spent executing the relay's statements (pg_stat_statements).
    pub(crate) statement_ms_per_s: f64,
    pub(crate) transactions_per_s: f64,
    pub(crate) postgres_cpu_ms_per_s: f64,
    pub(crate) baseline_statements_per_s: f64,
    pub(crate) baseline_postgres_cpu_ms_per_s: f64,
}

pub(crate) async fn counters(db: &tokio_postgres::Client) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT (SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements),
                    (SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = current_database())",
            &[],
        )
        .await
        .expect("counters");
    (row.get(0), row.get(1))
}

pub(crate) async fn idle_cost(env: &Env, args: &Args) -> Idle {
    let secs = 60;
    let db = env.db().await;
    let table = env.new_table("idle");
    let measure = |label: &'static str| {
        let db = &db;
        async move {
            let (s0, x0) = counters(db).await;
            let c0 = postgres_cpu_s();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let (s1, x1) = counters(db).await;
            let cpu = postgres_cpu_s() - c0;
            say(format!("idle: {label}: {} statements, {:.2} s Postgres CPU in {secs} s", s1 - s0, cpu));
            // the two counter reads themselves: 2 statements, 2 transactions
            (((s1 - s0 - 2) as f64) / secs as f64, ((x1 - x0 - 2) as f64) / secs as f64, cpu / secs as f64 * 1000.0)
        }
    };
    let (bs, _, bc) = measure("no relay").await;
    let relay = spawn_relay(env, &table, &args.relay_settings("mark", "at-least-once", &table));
    tokio::time::sleep(Duration::from_secs(10)).await; // past start-up, into the longest wait
    db.batch_execute("SELECT pg_stat_statements_reset()").await.ok();
    let (s, x, c) = measure("one idle relay").await;
    let top = db
        .query(
            "SELECT calls::int8, (total_exec_time / greatest(calls, 1))::float8, left(regexp_replace(query, '[[:space:]]+', ' ', 'g'), 60)
             FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_%' ORDER BY total_exec_time DESC LIMIT 4",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, f64>(1), r.get::<_, String>(2))).collect::<Vec<_>>())
        .unwrap_or_default();
    let exec_ms: f64 = db
        .query_one("SELECT coalesce(sum(total_exec_time), 0)::float8 FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_%'", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0.0);
    relay.stop(Duration::from_secs(30));
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    let idle = Idle {
        seconds: secs,
        poll_interval: "100ms (default)".into(),
        statements_per_s: s - bs,
        statement_ms_per_s: exec_ms / secs as f64,
        transactions_per_s: x,
        postgres_cpu_ms_per_s: c - bc,
        baseline_statements_per_s: bs,
        baseline_postgres_cpu_ms_per_s: bc,
    };
    println!();
    println!("an idle relay's cost to Postgres (empty outbox, {secs} s, default relay.poll_interval; minus the same {secs} s without a relay)");
    for (calls, ms, q) in &top {
        println!("    {calls:>6} calls × {ms:.3} ms  {q}");
    }
    println!(
        "  statements/s {:.1} ({:.3} ms/s executing them) · transactions/s {:.1} · Postgres CPU {:.2} ms per s ({:.3} % of one core)   [baseline without relay: {:.1} statements/s, {:.2} ms CPU/s]",
        idle.statements_per_s,
        idle.statement_ms_per_s,
        idle.transactions_per_s,
        idle.postgres_cpu_ms_per_s,
        idle.postgres_cpu_ms_per_s / 10.0,
        idle.baseline_statements_per_s,
        idle.baseline_postgres_cpu_ms_per_s
    );
    idle
}
