//! `poller`: the hand-written poller issue #25 holds the relay's drain to
//! (`bench/poller.py`: psycopg and confluent-kafka, claim in seq order with
//! `FOR UPDATE SKIP LOCKED`, publish, one `DELETE … WHERE id = ANY` per batch,
//! no per-key fence), on the same backlog as the relay's not-vacuumed
//! delete-mode drain, in the same run.

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Goal5 {
    pub(crate) events: i64,
    /// The relay's, the poller's and the ceilings' (`--batch-size`).
    pub(crate) batch_size: usize,
    pub(crate) poller_events_per_s: f64,
    /// The relay's not-vacuumed, delete-mode, at-least-once drain of this run.
    pub(crate) relay_events_per_s: Option<f64>,
    /// The SQL-only delete ceiling of this run (a vacuumed table).
    pub(crate) sql_only_events_per_s: Option<f64>,
}

/// The poller drains `args.events` preloaded rows (delete mode, not vacuumed).
/// Needs `OUTBOX_RELAY_PYTHON` (scripts/bench sets it from `scripts/py-env`).
pub(crate) async fn poller_drain(env: &Env, args: &Args) -> f64 {
    let python = std::env::var("OUTBOX_RELAY_PYTHON").expect(
        "OUTBOX_RELAY_PYTHON is not set: run the bench through scripts/bench, which sets it from scripts/py-env",
    );
    let n = args.events;
    let table = env.new_table("poller");
    env.topics(&table, &TOPICS, 6, false).await;
    preload(env, &table, &table, n).await;
    let dead = dead_tuples(&env.db().await, &table).await;
    say(format!("poller: the hand-written poller drains {n} events (delete, not vacuumed, {dead} dead tuples)"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/poller.py");
    let out = std::process::Command::new(&python)
        .args([script, &env.pg_url, &env.brokers, &format!("public.{table}"), &args.batch_size.to_string()])
        .output()
        .expect("run bench/poller.py");
    assert!(
        out.status.success(),
        "bench/poller.py failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let left = env.pending(&env.db().await, &table).await;
    assert_eq!(left, 0, "the poller left {left} events");
    env.db().await.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("poller's JSON line");
    report["events_per_s"].as_f64().expect("events_per_s")
}

pub(crate) fn print_goal5(g: &Goal5) {
    let ratio = |x: Option<f64>, y: f64| x.map(|x| format!("{:.2}", x / y)).unwrap_or_else(|| "-".into());
    println!();
    println!(
        "goal 5 (issue #25): {} preloaded events, delete mode, not vacuumed, batch {} for all three, one run; the SQL-only ceiling is this run's (vacuumed)",
        g.events, g.batch_size
    );
    println!(
        "  hand-written poller ev/s │ relay ev/s │ relay / poller (≥ 3) │ SQL-only ev/s │ relay / SQL-only (≥ 0.6)"
    );
    println!(
        "  {:>24.0} │ {:>10} │ {:>20} │ {:>13} │ {:>24}",
        g.poller_events_per_s,
        g.relay_events_per_s.map(|r| format!("{r:.0}")).unwrap_or_else(|| "-".into()),
        ratio(g.relay_events_per_s, g.poller_events_per_s),
        g.sql_only_events_per_s.map(|r| format!("{r:.0}")).unwrap_or_else(|| "-".into()),
        g.relay_events_per_s.zip(g.sql_only_events_per_s).map(|(r, s)| format!("{:.2}", r / s)).unwrap_or("-".into()),
    );
}
