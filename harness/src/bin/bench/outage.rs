//! `outage`: the application writes at a steady rate while Kafka is down for
//! minutes, then Kafka returns: how long the relay takes to catch up, how fast
//! it drains the backlog against a fresh table of the same size (writers
//! running in both), what the application's commits see before, during and
//! after, and what the table looks like afterwards. No VACUUM anywhere.

use super::*;

#[derive(Debug, Serialize, Clone, Default)]
pub(crate) struct AppWindow {
    pub(crate) commits_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Outage {
    pub(crate) mode: String,
    pub(crate) offered_events_per_s: u64,
    pub(crate) outage_s: u64,
    /// Pending when Kafka came back.
    pub(crate) backlog: i64,
    /// From Kafka's return to an empty outbox.
    pub(crate) catch_up_s: f64,
    /// Events relayed per second over the catch-up (the backlog plus what the
    /// application wrote meanwhile).
    pub(crate) catch_up_events_per_s: f64,
    /// The same backlog preloaded into a fresh table, drained with the same
    /// writers running.
    pub(crate) fresh_events_per_s: f64,
    pub(crate) catch_up_vs_fresh: f64,
    pub(crate) app_before: AppWindow,
    pub(crate) app_during_outage: AppWindow,
    pub(crate) app_catch_up: AppWindow,
    pub(crate) dead_tuples_after: i64,
    pub(crate) table_mib_after: f64,
    pub(crate) longest_relay_transaction_during_outage_s: f64,
}

/// The application's commits between `from` and `to` (µs since the epoch).
fn app_window(writers: &Writers, from: i64, to: i64, per_tx: u64) -> AppWindow {
    let d = writers.durations.lock().expect("durations");
    let ms: Vec<f64> = d.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, ms)| *ms).collect();
    let secs = ((to - from) as f64 / 1e6).max(1e-3);
    let q = quantiles(ms.clone());
    AppWindow { commits_per_s: ms.len() as f64 * per_tx as f64 / secs, p50_ms: q.p50, p99_ms: q.p99 }
}

/// Waits until nothing is pending; returns when.
async fn drained(env: &Env, db: &tokio_postgres::Client, table: &str, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    while env.pending(db, table).await > 0 {
        assert!(Instant::now() < deadline, "{table} not drained within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Instant::now()
}

pub(crate) async fn outage(env: &Env, args: &Args) -> Outage {
    let mode = "mark";
    let db = env.db().await;
    let table = env.new_table("outage");
    let topics = env.topics(&table, &TOPICS, 6, false).await;
    let url = format!("{}?application_name={table}", env.pg_url);
    let mut settings = args.relay_settings(mode, "at-least-once", &table);
    settings.push(("OUTBOX_RELAY__POSTGRES__URL".into(), url));
    let relay = spawn_relay(env, &table, &settings);
    let rate = args.outage_rate;
    let writers = env.writers(&table, topics.clone(), 4, rate);
    say(format!("outage: {rate} ev/s for 60 s with Kafka up…"));
    let t0 = now_us();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (t_stop, _) = (now_us(), infra_cmd(&["stop-kafka"]));
    say(format!("outage: Kafka stopped for {} s; the application keeps writing…", args.outage_secs));
    let outage_end = Instant::now() + Duration::from_secs(args.outage_secs);
    let mut longest: f64 = 0.0;
    while Instant::now() < outage_end {
        longest = longest.max(longest_transaction(&db, &table).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let backlog = env.pending(&db, &table).await;
    let (t_start, returned) = (now_us(), Instant::now());
    infra_cmd(&["start-kafka"]);
    say(format!("outage: Kafka back; {backlog} events behind"));
    let done = drained(env, &db, &table, Duration::from_secs(3600)).await;
    let t_done = now_us();
    let catch_up_s = (done - returned).as_secs_f64();
    let written_during = {
        let d = writers.durations.lock().expect("durations");
        d.iter().filter(|(t, _)| *t >= t_start && *t < t_done).count() as i64 * 10
    };
    let windows = (
        app_window(&writers, t0, t_stop, 10),
        app_window(&writers, t_stop, t_start, 10),
        app_window(&writers, t_start, t_done, 10),
    );
    writers.finish().await;
    relay.stop(Duration::from_secs(30));
    let dead = dead_tuples(&db, &table).await;
    let size: i64 = db
        .query_one("SELECT pg_total_relation_size($1::text::regclass)", &[&format!("public.{table}")])
        .await
        .expect("size")
        .get(0);
    let fresh = fresh_drain(env, args, mode, backlog).await;
    let catch_up_rate = (backlog + written_during) as f64 / catch_up_s.max(1e-3);
    Outage {
        mode: mode.into(),
        offered_events_per_s: rate,
        outage_s: args.outage_secs,
        backlog,
        catch_up_s,
        catch_up_events_per_s: catch_up_rate,
        fresh_events_per_s: fresh,
        catch_up_vs_fresh: catch_up_rate / fresh.max(1e-3),
        app_before: windows.0,
        app_during_outage: windows.1,
        app_catch_up: windows.2,
        dead_tuples_after: dead,
        table_mib_after: size as f64 / (1 << 20) as f64,
        longest_relay_transaction_during_outage_s: longest,
    }
}

/// A fresh table preloaded with `n` events, drained by one relay while the
/// same writers run: events relayed per second.
async fn fresh_drain(env: &Env, args: &Args, mode: &str, n: i64) -> f64 {
    let db = env.db().await;
    let table = env.new_table("outage_fresh");
    let topics = env.topics(&table, &TOPICS, 6, false).await;
    say(format!("outage: the same {n} events in a fresh table, drained with the writers running…"));
    preload(env, &table, &table, n).await;
    let writers = env.writers(&table, topics, 4, args.outage_rate);
    let relay = spawn_relay(env, &table, &args.relay_settings(mode, "at-least-once", &table));
    let started = Instant::now();
    let t0 = now_us();
    let done = drained(env, &db, &table, Duration::from_secs(3600)).await;
    let t1 = now_us();
    let written = {
        let d = writers.durations.lock().expect("durations");
        d.iter().filter(|(t, _)| *t >= t0 && *t < t1).count() as i64 * 10
    };
    writers.finish().await;
    relay.stop(Duration::from_secs(30));
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    (n + written) as f64 / (done - started).as_secs_f64().max(1e-3)
}

pub(crate) fn print_outage(o: &Outage) {
    println!();
    println!(
        "Kafka outage ({} mode, one broker: a lab figure for Kafka): the application writes {} ev/s; Kafka down {} s; no VACUUM",
        o.mode, o.offered_events_per_s, o.outage_s
    );
    println!(
        "  backlog when Kafka returned {} · caught up in {:.1} s · catch-up {:.0} ev/s vs fresh table {:.0} ev/s = {:.2}",
        o.backlog, o.catch_up_s, o.catch_up_events_per_s, o.fresh_events_per_s, o.catch_up_vs_fresh
    );
    println!("  the application          │ commits/s │ p50 ms │ p99 ms");
    for (label, w) in
        [("before the outage", &o.app_before), ("Kafka down", &o.app_during_outage), ("catch-up", &o.app_catch_up)]
    {
        println!("  {label:<24} │ {:>9.0} │ {:>6.1} │ {:>6.1}", w.commits_per_s, w.p50_ms, w.p99_ms);
    }
    println!(
        "  afterwards: {} dead tuples, table {:.0} MiB · longest relay transaction while Kafka was down {:.1} s",
        o.dead_tuples_after, o.table_mib_after, o.longest_relay_transaction_during_outage_s
    );
}
