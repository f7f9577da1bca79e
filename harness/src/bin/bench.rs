//! The benchmark behind `scripts/bench`, on the local Postgres and Kafka, in
//! production's shape as far as one machine allows: nothing is vacuumed before a
//! measurement unless the table says so, application writers commit while the
//! relay works, a long transaction holds the xmin horizon, and the
//! application's own throughput is reported next to the relay's.
//!
//! Sections (all by default; `--only a,b` picks some):
//!
//! * `app-cost` — the cost to the application: real `pgbench`, 16 and 64
//!   clients, `synchronous_commit = on`, one business row plus one event per
//!   transaction, into the outbox as `migrate` creates it and into a plain copy
//!   (`LIKE outbox INCLUDING ALL`), alternating; also the 0001/0002 schema with
//!   its NOTIFY trigger, and the outbox while a relay drains it.
//! * `idle` — what an idle relay costs Postgres: statements/s, CPU.
//! * `latency` — commit→ack at fixed offered rates.
//! * `drain` — a preloaded backlog drained by one relay, vacuumed and not; with
//!   the SQL-only, store-path and Kafka-only ceilings; WAL and Postgres CPU per
//!   event next to what the inserts cost.
//! * `churn` — a drain right after a large delete burst, no VACUUM.
//! * `retained` — mark mode into a table holding ≥ 1M retained published rows.
//! * `sustained` — writers and relay together: the highest offered rate the
//!   relay keeps up with.
//! * `horizon` — writers at 2k ev/s while a REPEATABLE READ transaction holds
//!   the horizon for 5 minutes: a latency table per 10 s window.
//! * `hotkey` — 3 relays, one key with a 10k backlog, other keys at 1k ev/s.
//!
//! Prints each table as it completes and writes everything to bench/results/.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use outbox_relay_harness::*;
use serde::Serialize;
use serde_json::json;

#[derive(Parser, Debug, Clone)]
#[command(about = "outbox-relay benchmark (see the module docs or docs/performance.md)")]
struct Args {
    /// Sections to run, comma separated (default: all): app-cost, idle, latency,
    /// drain, churn, retained, sustained, horizon, hotkey (and `ceilings`: only
    /// the SQL-only and store-path ceilings that `drain` includes).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Events preloaded for each drain.
    #[arg(long, default_value_t = 200_000)]
    events: i64,
    /// Retained published rows for the `retained` section.
    #[arg(long, default_value_t = 1_100_000)]
    retained: i64,
    /// Seconds per pgbench run (app-cost).
    #[arg(long, default_value_t = 15)]
    pgbench_secs: u64,
    /// pgbench client counts (app-cost).
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    clients: Vec<u32>,
    /// Offered rates for the latency section (events/s).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    rates: Vec<u64>,
    /// Seconds per latency run.
    #[arg(long, default_value_t = 60)]
    latency_secs: u64,
    /// Seconds of writing before each latency run is measured (not counted).
    #[arg(long, default_value_t = 15)]
    latency_warmup_secs: u64,
    /// How long the horizon section holds its snapshot.
    #[arg(long, default_value_t = 300)]
    hold_secs: u64,
    /// Relay batch size for the drains.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Skip the exactly-once runs.
    #[arg(long)]
    no_exactly_once: bool,
    /// Extra relay settings, KEY=VALUE (OUTBOX_RELAY__… names), repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[arg(long, default_value = "target/release/outbox-relay")]
    relay_bin: PathBuf,
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

impl Args {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }

    fn relay_settings(&self, mode: &str, delivery: &str, table: &str) -> Vec<(String, String)> {
        let mut s = settings(&[("OUTBOX_RELAY__RELAY__ON_PUBLISH", mode)]);
        if delivery == "exactly-once" {
            s.push(("OUTBOX_RELAY__RELAY__DELIVERY".into(), "exactly-once".into()));
            s.push(("OUTBOX_RELAY__RELAY__ID".into(), table.into()));
        }
        for kv in &self.set {
            if let Some((k, v)) = kv.split_once('=') {
                s.push((k.into(), v.into()));
            }
        }
        s
    }
}

const TOPICS: [&str; 4] = ["orders", "payments", "stock", "shipping"];

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

// ---------------------------------------------------------------------------
// app-cost

#[derive(Debug, Serialize, Clone)]
struct AppCost {
    clients: u32,
    seconds: u64,
    /// tps per run, in the order run (alternating)
    outbox_tps: Vec<f64>,
    plain_tps: Vec<f64>,
    old_trigger_tps: Vec<f64>,
    outbox_with_relay_tps: Vec<f64>,
    ratio: f64,
    /// Outbox / plain copy of each adjacent pair of runs (O P, P O, …): the spread.
    pair_ratios: Vec<f64>,
    ratio_old_trigger: f64,
    ratio_with_relay: f64,
}

fn pgbench(env: &Env, script: &str, clients: u32, secs: u64) -> f64 {
    let cfg: tokio_postgres::Config = env.pg_url.parse().expect("postgres url");
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432).to_string();
    let path = std::env::temp_dir().join(format!("bench-{}.sql", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, script).expect("write pgbench script");
    let bin = ["pgbench", "/usr/lib/postgresql/15/bin/pgbench"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("pgbench (Debian's postgresql package, installed by scripts/infra)");
    let out = Command::new(bin)
        .args(["-n", "-M", "prepared", "-c", &clients.to_string(), "-j", "2", "-T", &secs.to_string()])
        .args(["-h", &host, "-p", &port, "-U", cfg.get_user().unwrap_or("postgres")])
        .arg("-f")
        .arg(&path)
        .arg(cfg.get_dbname().unwrap_or("postgres"))
        .env("PGPASSWORD", cfg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default())
        .stderr(Stdio::piped())
        .output()
        .expect("run pgbench");
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("pgbench failed: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// What the README tells app teams to write: a business row and an event, one transaction.
fn app_script(table: &str) -> String {
    format!(
        "\\set k random(1, 100000)
BEGIN;
INSERT INTO bench_app_orders (customer, total) VALUES (:k, 100);
INSERT INTO public.{table} (topic, key, payload)
  VALUES ('bench.orders', 'order-' || :k::text, jsonb_build_object('type', 'OrderPlaced', 'customer', :k::int, 'pad', repeat('x', {PAD})));
END;
"
    )
}

async fn app_cost(env: &Env, args: &Args) -> Vec<AppCost> {
    let db = env.db().await;
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS bench_app_orders (id bigserial PRIMARY KEY, customer int, total int,
         created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .expect("business table");
    let sync: String = db.query_one("SHOW synchronous_commit", &[]).await.expect("show").get(0);
    say(format!("app-cost: synchronous_commit = {sync}"));
    let outbox = env.new_table("app_outbox");
    let plain = format!("app_plain_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    db.batch_execute(&format!("CREATE TABLE public.{plain} (LIKE public.{outbox} INCLUDING ALL)")).await.expect("copy");
    // The schema before migration 0003: with its NOTIFY trigger.
    let old = format!("app_old_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let out = env.relay_cmd(&old, &[]).args(["migrate", "--to", "2"]).output().expect("migrate --to 2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.topics("bench", &["orders"], 4, false).await;
    let mut results = Vec::new();
    for &clients in &args.clients {
        let (mut o, mut p, mut t, mut r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // A first run pays for what later ones reuse (new WAL segments, cold
        // buffers): one warm-up into the plain copy, not counted. Then the two
        // tables in a balanced order (O P P O, three times), so drift over the
        // run (table and WAL growth, a neighbour on the shared host) favours
        // neither; single runs vary by ±5-10 % here, so six of each.
        db.batch_execute("CHECKPOINT").await.ok();
        let warm = pgbench(env, &app_script(&plain), clients, args.pgbench_secs.min(10));
        say(format!("app-cost: {clients} clients, warm-up (not counted): {warm:.0} tps"));
        let order = ["outbox", "plain", "plain", "outbox"].repeat(3);
        for which in order.iter().copied().chain(["old", "old"]) {
            let table = match which {
                "outbox" => &outbox,
                "plain" => &plain,
                _ => &old,
            };
            db.batch_execute("CHECKPOINT").await.ok();
            let tps = pgbench(env, &app_script(table), clients, args.pgbench_secs);
            say(format!("app-cost: {clients} clients, {which}: {tps:.0} tps"));
            match which {
                "outbox" => o.push(tps),
                "plain" => p.push(tps),
                _ => t.push(tps),
            }
        }
        // The same into the outbox while a relay publishes what it gets.
        for _ in 0..2 {
            let relay = spawn_relay(env, &outbox, &args.relay_settings("mark", "at-least-once", &outbox));
            tokio::time::sleep(Duration::from_secs(2)).await;
            db.batch_execute("CHECKPOINT").await.ok();
            let tps = pgbench(env, &app_script(&outbox), clients, args.pgbench_secs);
            relay.stop(Duration::from_secs(30));
            say(format!("app-cost: {clients} clients, outbox with a relay draining it: {tps:.0} tps"));
            r.push(tps);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        results.push(AppCost {
            clients,
            seconds: args.pgbench_secs,
            ratio: mean(&o) / mean(&p),
            pair_ratios: o.iter().zip(&p).map(|(o, p)| o / p).collect(),
            ratio_old_trigger: mean(&t) / mean(&p),
            ratio_with_relay: mean(&r) / mean(&p),
            outbox_tps: o,
            plain_tps: p,
            old_trigger_tps: t,
            outbox_with_relay_tps: r,
        });
    }
    for t in [&outbox, &plain, &old] {
        db.batch_execute(&format!("DROP TABLE IF EXISTS public.{t}")).await.ok();
    }
    println!();
    println!("cost to the application (pgbench, synchronous_commit = {sync}, 1 business row + 1 ≈1 KB event per transaction, {} s runs; a warm-up, then outbox and copy in the order O P P O, three times; pairs: outbox/copy of each adjacent pair of runs)", args.pgbench_secs);
    println!("  clients │ plain copy tps │ outbox tps │ ratio │ pairs min–max │ 0001/0002 with NOTIFY trigger tps │ ratio │ outbox + relay draining tps │ ratio");
    for a in &results {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "  {:>7} │ {:>14.0} │ {:>10.0} │ {:>5.2} │   {:>4.2} – {:>4.2} │ {:>33.0} │ {:>5.2} │ {:>27.0} │ {:>5.2}",
            a.clients,
            mean(&a.plain_tps),
            mean(&a.outbox_tps),
            a.ratio,
            a.pair_ratios.iter().copied().fold(f64::INFINITY, f64::min),
            a.pair_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            mean(&a.old_trigger_tps),
            a.ratio_old_trigger,
            mean(&a.outbox_with_relay_tps),
            a.ratio_with_relay
        );
    }
    results
}

// ---------------------------------------------------------------------------
// idle

#[derive(Debug, Serialize, Clone)]
struct Idle {
    seconds: u64,
    poll_interval: String,
    statements_per_s: f64,
    /// Time Postgres spent executing the relay's statements (pg_stat_statements).
    statement_ms_per_s: f64,
    transactions_per_s: f64,
    postgres_cpu_ms_per_s: f64,
    baseline_statements_per_s: f64,
    baseline_postgres_cpu_ms_per_s: f64,
}

async fn counters(db: &tokio_postgres::Client) -> (i64, i64) {
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

async fn idle_cost(env: &Env, args: &Args) -> Idle {
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

// ---------------------------------------------------------------------------
// latency

#[derive(Debug, Serialize, Clone)]
struct Latency {
    delivery: String,
    offered_per_s: u64,
    achieved_per_s: f64,
    seconds: u64,
    /// Seconds written before the measured ones (not counted).
    warmup_secs: u64,
    /// From the writer's COMMIT returning to the broker's append.
    commit_to_ack_ms: Quantiles,
    /// From the INSERT (so also the writer's own commit) to the append.
    insert_to_ack_ms: Quantiles,
    commit_to_visible_ms: Quantiles,
}

async fn latency(env: &Env, args: &Args, rate: u64, delivery: &str) -> Latency {
    let table = env.new_table("lat");
    let topics = env.topics(&table, &TOPICS, 4, true).await;
    let relay = spawn_relay(env, &table, &args.relay_settings("mark", delivery, &table));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumer = LatencyConsumer::start(env, &topics, 4);
    let writers = Writers::start(
        env,
        WriterSpec { table: table.clone(), topics, connections: 4, per_tx: 10, rate, keys: 1000, hot_key_share: 0.0 },
    );
    // Warm-up, not counted: the broker's JIT and every cache reach their steady
    // state (a broker started a minute earlier needs ~20 s; see docs/performance.md).
    tokio::time::sleep(Duration::from_secs(args.latency_warmup_secs)).await;
    let measured_from = now_us();
    let written_before = writers.written.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.latency_secs)).await;
    let elapsed = (now_us() - measured_from) as f64 / 1e6;
    let commits = writers.commits.clone();
    let written = writers.finish().await;
    consumer.wait_for(written as usize, Duration::from_secs(20));
    let seen = consumer.finish();
    relay.stop(Duration::from_secs(30));
    env.db().await.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    let mut commits = commits.lock().map(|c| c.clone()).unwrap_or_default();
    // only transactions committed after the warm-up count, in every column
    commits.retain(|_, &mut c| c >= measured_from);
    let seen: Vec<Seen> = seen.into_iter().filter(|s| s.tx.is_some_and(|t| commits.contains_key(&t))).collect();
    let written = written - written_before;
    if let Ok(dir) = std::env::var("BENCH_LATENCY_DUMP") {
        dump_latency(std::path::Path::new(&dir), delivery, &seen, &commits);
    }
    Latency {
        delivery: delivery.into(),
        offered_per_s: rate,
        achieved_per_s: written as f64 / elapsed,
        seconds: args.latency_secs,
        warmup_secs: args.latency_warmup_secs,
        commit_to_ack_ms: quantiles(commit_to_ack_ms(&seen, &commits)),
        insert_to_ack_ms: quantiles(insert_to_ack_ms(&seen)),
        commit_to_visible_ms: quantiles(insert_to_visible_ms(&seen)),
    }
}

/// Diagnostics (`BENCH_LATENCY_DUMP=<dir>`): one CSV row per event, µs since
/// the epoch: tx, commit, insert, append, recv.
fn dump_latency(dir: &std::path::Path, delivery: &str, seen: &[Seen], commits: &HashMap<i64, i64>) {
    let mut out = String::from("tx,commit_us,insert_us,append_us,recv_us\n");
    for s in seen {
        let c = s.tx.and_then(|t| commits.get(&t)).copied().unwrap_or(0);
        out.push_str(&format!(
            "{},{},{},{},{}\n",
            s.tx.unwrap_or(-1),
            c,
            s.insert_us,
            s.append_us.unwrap_or(0),
            s.recv_us
        ));
    }
    std::fs::create_dir_all(dir).ok();
    let path = dir.join(format!("latency-{delivery}.csv"));
    if let Err(e) = std::fs::write(&path, out) {
        say(format!("could not write {}: {e}", path.display()));
    }
}

fn print_latency(l: &[Latency]) {
    println!();
    let warmup = l.first().map_or(0, |l| l.warmup_secs);
    println!("latency at a fixed offered rate (4 writers, 10 events per transaction, on_publish = mark; ms, to the broker's LogAppendTime, 1 ms resolution; transactions committed in the first {warmup} s are a warm-up and not counted)");
    println!("  commit→ack: from the writer's COMMIT returning; insert→ack and insert→visible (a read_committed consumer got it): from its INSERT, so they also count the writer's own commit");
    println!("  delivery      │ offered/s │ achieved/s │ samples │ commit→ack p50 / p99 / p99.9 │ insert→ack p50 / p99 │ insert→visible p50 / p99");
    for l in l {
        println!(
            "  {:<13} │ {:>9} │ {:>10.0} │ {:>7} │ {:>8.1} / {:>6.1} / {:>7.1}   │ {:>10.1} / {:>6.1} │ {:>14.1} / {:>6.1}",
            l.delivery,
            l.offered_per_s,
            l.achieved_per_s,
            l.commit_to_ack_ms.n,
            l.commit_to_ack_ms.p50,
            l.commit_to_ack_ms.p99,
            l.commit_to_ack_ms.p999,
            l.insert_to_ack_ms.p50,
            l.insert_to_ack_ms.p99,
            l.commit_to_visible_ms.p50,
            l.commit_to_visible_ms.p99,
        );
    }
}

// ---------------------------------------------------------------------------
// drains

/// N rows of ≈1 KB JSON over 1k keys and 4 topics, server-side in 4 parallel
/// chunks. Returns what inserting them cost.
async fn preload(env: &Env, table: &str, run: &str, n: i64) -> Spent {
    let db = env.db().await;
    let meter = Meter::start(&db).await;
    let chunks = 4;
    let per = n / chunks;
    let mut tasks = Vec::new();
    for c in 0..chunks {
        let (env, table, run) = (env.clone(), table.to_string(), run.to_string());
        tasks.push(tokio::spawn(async move {
            let db = env.db().await;
            db.execute(
                &format!(
                    "INSERT INTO public.{table} (topic, key, payload)
                     SELECT '{run}.' || (ARRAY['orders','payments','stock','shipping'])[1 + i % 4],
                            'key-' || (i % 1000),
                            jsonb_build_object('i', i, 'type', 'OrderPlaced', 'pad', repeat('x', {PAD}))
                     FROM generate_series($1::bigint, $2::bigint) i"
                ),
                &[&(c * per), &((c + 1) * per - 1)],
            )
            .await
            .expect("preload");
        }));
    }
    for t in tasks {
        t.await.expect("preload task");
    }
    meter.stop(&db).await
}

#[derive(Debug, Serialize, Clone)]
struct Drain {
    scenario: String,
    mode: String,
    delivery: String,
    events: i64,
    events_per_s: f64,
    /// Dead tuples in the table when the relay started (pg_stat_user_tables).
    dead_tuples_at_start: i64,
    relay_cpu_s_per_million: f64,
    relay_peak_rss_mib: f64,
    postgres_cpu_us_per_event: f64,
    wal_bytes_per_event: f64,
    insert_postgres_cpu_us_per_event: f64,
    insert_wal_bytes_per_event: f64,
}

async fn dead_tuples(db: &tokio_postgres::Client, table: &str) -> i64 {
    // the statistics are flushed with a delay; good enough for a report
    tokio::time::sleep(Duration::from_millis(700)).await;
    db.query_one("SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relname = $1", &[&table])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// One relay drains `table` (already loaded with `n` rows); timed from its
/// first finished batch to an empty outbox.
async fn drain(env: &Env, args: &Args, table: &str, n: i64, mode: &str, delivery: &str) -> (f64, f64, f64, Spent) {
    let db = env.db().await;
    let first = env.head(&db, table).await.expect("preloaded");
    let relay = spawn_relay(env, table, &args.relay_settings(mode, delivery, table));
    let pid = relay.pid();
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut started: Option<(Instant, i64, Meter)> = None;
    let (t_end, spent) = loop {
        let head = env.head(&db, table).await;
        if started.is_none() && head != Some(first) {
            let left = head.map(|h| n - (h - first)).unwrap_or(0);
            started = Some((Instant::now(), left, Meter::start(&db).await));
        }
        if head.is_none() {
            let spent = match &started {
                Some((_, _, m)) => m.stop(&db).await,
                None => Spent::default(),
            };
            break (Instant::now(), spent);
        }
        assert!(Instant::now() < deadline, "relay did not drain {n} events in 15 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cpu = proc_cpu_s(pid);
    let rss = proc_peak_rss_mib(pid);
    relay.stop(Duration::from_secs(30));
    let (t0, left) = started.map(|(t, l, _)| (t, l)).unwrap_or((t_end, n));
    let rate = left as f64 / (t_end - t0).as_secs_f64().max(1e-3);
    (rate, cpu / n as f64 * 1e6, rss, spent)
}

async fn drain_run(env: &Env, args: &Args, scenario: &str, mode: &str, delivery: &str) -> Drain {
    let n = args.events;
    let db = env.db().await;
    let table = env.new_table(&format!("drain_{mode}"));
    env.topics(&table, &TOPICS, 6, false).await;
    if scenario.ends_with("autovacuum off") {
        db.batch_execute(&format!("ALTER TABLE public.{table} SET (autovacuum_enabled = off)")).await.expect("alter");
    }
    let insert = preload(env, &table, &table, n).await;
    match scenario {
        "vacuumed" => db.batch_execute(&format!("VACUUM ANALYZE public.{table}")).await.expect("vacuum"),
        "not vacuumed" => {}
        // diagnostics (--only drain-diag): which part of VACUUM ANALYZE matters
        "analyzed" | "analyzed, autovacuum off" => {
            db.batch_execute(&format!("ANALYZE public.{table}")).await.expect("analyze")
        }
        "not vacuumed, autovacuum off" => {}
        "vacuumed, no analyze" => db.batch_execute(&format!("VACUUM public.{table}")).await.expect("vacuum"),
        "churned" => {
            // a backlog of the same size published (deleted) a moment ago: its dead
            // rows are still in front of the new one, no VACUUM in between
            db.batch_execute(&format!("DELETE FROM public.{table}")).await.expect("delete burst");
            let _ = preload(env, &table, &table, n).await;
        }
        other => panic!("unknown scenario {other}"),
    }
    let dead = dead_tuples(&db, &table).await;
    say(format!("drain: {scenario}, {mode}, {delivery}: {n} events, {dead} dead tuples in the table"));
    let (rate, cpu, rss, spent) = drain(env, args, &table, n, mode, delivery).await;
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    Drain {
        scenario: scenario.into(),
        mode: mode.into(),
        delivery: delivery.into(),
        events: n,
        events_per_s: rate,
        dead_tuples_at_start: dead,
        relay_cpu_s_per_million: cpu,
        relay_peak_rss_mib: rss,
        postgres_cpu_us_per_event: spent.postgres_cpu_s / n as f64 * 1e6,
        wal_bytes_per_event: spent.wal_bytes as f64 / n as f64,
        insert_postgres_cpu_us_per_event: insert.postgres_cpu_s / n as f64 * 1e6,
        insert_wal_bytes_per_event: insert.wal_bytes as f64 / n as f64,
    }
}

/// Mark mode into a table that keeps `retained` published rows (what
/// `relay.retention` keeps), vacuumed as a long-lived table would be; the new
/// backlog is not vacuumed.
async fn retained_run(env: &Env, args: &Args) -> Drain {
    let (n, r) = (args.events / 2, args.retained);
    let db = env.db().await;
    let table = env.new_table("retained");
    env.topics(&table, &TOPICS, 6, false).await;
    say(format!("retained: loading {r} published rows (≈ what relay.retention = 7d keeps at ~2 ev/s)…"));
    let chunks = 4;
    let mut tasks = Vec::new();
    for c in 0..chunks {
        let (env, table) = (env.clone(), table.clone());
        tasks.push(tokio::spawn(async move {
            env.db()
                .await
                .execute(
                    &format!(
                        "INSERT INTO public.{table} (topic, key, payload, published_at, created_at)
                         SELECT 'old.orders', 'key-' || (i % 1000),
                                jsonb_build_object('i', i, 'type', 'OrderPlaced', 'pad', repeat('x', {PAD})),
                                now() - (i % 600000) * interval '1 second', now() - (i % 600000) * interval '1 second'
                         FROM generate_series($1::bigint, $2::bigint) i"
                    ),
                    &[&(c * r / chunks), &((c + 1) * r / chunks - 1)],
                )
                .await
                .expect("retained rows");
        }));
    }
    for t in tasks {
        t.await.expect("retained task");
    }
    db.batch_execute(&format!("VACUUM ANALYZE public.{table}")).await.expect("vacuum");
    let insert = preload(env, &table, &table, n).await;
    let dead = dead_tuples(&db, &table).await;
    say(format!("retained: draining {n} new events in mark mode next to {r} retained rows"));
    let (rate, cpu, rss, spent) = drain(env, args, &table, n, "mark", "at-least-once").await;
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    Drain {
        scenario: format!("{}M retained", r as f64 / 1e6),
        mode: "mark".into(),
        delivery: "at-least-once".into(),
        events: n,
        events_per_s: rate,
        dead_tuples_at_start: dead,
        relay_cpu_s_per_million: cpu,
        relay_peak_rss_mib: rss,
        postgres_cpu_us_per_event: spent.postgres_cpu_s / n as f64 * 1e6,
        wal_bytes_per_event: spent.wal_bytes as f64 / n as f64,
        insert_postgres_cpu_us_per_event: insert.postgres_cpu_s / n as f64 * 1e6,
        insert_wal_bytes_per_event: insert.wal_bytes as f64 / n as f64,
    }
}

fn print_drains(d: &[Drain]) {
    println!();
    println!("drains: one relay, 1 KB JSON events, 1k keys, 4 topics × 6 partitions; per event: Postgres CPU and WAL of the drain next to those of the inserts");
    println!("  scenario        │ mode   │ delivery      │ dead tuples │ relay ev/s │ vs vacuumed │ PG CPU µs/ev (insert) │ WAL B/ev (insert) │ relay CPU s/1M │ RSS MiB");
    for x in d {
        let base = d
            .iter()
            .find(|b| b.scenario == "vacuumed" && b.mode == x.mode && b.delivery == x.delivery)
            .map(|b| b.events_per_s);
        println!(
            "  {:<15} │ {:<6} │ {:<13} │ {:>11} │ {:>10.0} │ {:>11} │ {:>10.1} ({:>7.1}) │ {:>8.0} ({:>6.0}) │ {:>14.1} │ {:>7.1}",
            x.scenario,
            x.mode,
            x.delivery,
            x.dead_tuples_at_start,
            x.events_per_s,
            base.map(|b| format!("{:.0}%", x.events_per_s / b * 100.0)).unwrap_or_else(|| "-".into()),
            x.postgres_cpu_us_per_event,
            x.insert_postgres_cpu_us_per_event,
            x.wal_bytes_per_event,
            x.insert_wal_bytes_per_event,
            x.relay_cpu_s_per_million,
            x.relay_peak_rss_mib
        );
    }
}

// ---------------------------------------------------------------------------
// ceilings (drain section)

#[derive(Debug, Serialize, Clone)]
struct Ceilings {
    mode: String,
    sql_only_events_per_s: f64,
    store_path_events_per_s: f64,
    store_path_fraction: f64,
}

/// SQL-only: a stored procedure claims the same rows with the same query
/// shape and deletes/marks them, committing per batch; no rows leave the server.
async fn sql_only(env: &Env, args: &Args, mode: &str) -> f64 {
    let n = args.events;
    let table = env.new_table("sql");
    preload(env, &table, "sql", n).await;
    let db = env.db().await;
    db.batch_execute(&format!("VACUUM ANALYZE public.{table}")).await.expect("vacuum");
    let action = if mode == "delete" {
        format!("DELETE FROM public.{table} o USING c WHERE o.id = c.id")
    } else {
        format!("UPDATE public.{table} o SET published_at = now() FROM c WHERE o.id = c.id")
    };
    db.batch_execute(&format!(
        "CREATE OR REPLACE PROCEDURE public.{table}_drain(batch int) LANGUAGE plpgsql AS $$
         DECLARE n int;
         BEGIN
           LOOP
             WITH c AS (
               SELECT id FROM public.{table}
               WHERE published_at IS NULL AND parked_at IS NULL AND retry_at IS NULL
               ORDER BY seq LIMIT batch FOR UPDATE SKIP LOCKED)
             {action};
             GET DIAGNOSTICS n = ROW_COUNT;
             COMMIT;
             EXIT WHEN n = 0;
           END LOOP;
         END $$;"
    ))
    .await
    .expect("procedure");
    let t = Instant::now();
    db.execute(&format!("CALL public.{table}_drain($1)"), &[&(args.batch_size as i32)]).await.expect("call");
    let rate = n as f64 / t.elapsed().as_secs_f64();
    db.batch_execute(&format!("DROP TABLE public.{table}; DROP PROCEDURE public.{table}_drain")).await.ok();
    rate
}

/// The relay's own Postgres work with no Kafka: `Store::claim` (row locks, the
/// per-key fence, the floor probe) and `Claimed::finish`, pipelined on two
/// connections like the relay, rows shipped to this client.
async fn store_path(env: &Env, args: &Args, mode: &str) -> f64 {
    use outbox_relay::store::{Claimed, Outcome, Store};
    let n = args.events;
    let table = env.new_table("store");
    preload(env, &table, "store", n).await;
    env.db().await.batch_execute(&format!("VACUUM ANALYZE public.{table}")).await.expect("vacuum");
    let s = outbox_relay::config::Settings::load_from(
        None,
        [
            ("OUTBOX_RELAY__POSTGRES__URL", env.pg_url.as_str()),
            ("OUTBOX_RELAY__KAFKA__BROKERS", env.brokers.as_str()),
            ("OUTBOX_RELAY__OUTBOX__TABLE", table.as_str()),
            ("OUTBOX_RELAY__RELAY__ON_PUBLISH", mode),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("settings");
    let store = Store::new(&s).expect("store");
    let finish = |c: Option<Claimed>| async move {
        if let Some(c) = c {
            let outcomes: Vec<Outcome> = c.events.iter().map(|_| Outcome::Delivered).collect();
            c.finish(&outcomes, 10).await.expect("finish");
        }
    };
    let t = Instant::now();
    let mut in_flight: Option<Claimed> = None;
    loop {
        let own: Vec<uuid::Uuid> = in_flight.iter().flat_map(|c| c.events.iter().map(|e| e.id)).collect();
        let (next, ()) = tokio::join!(store.claim(args.batch_size, &own), finish(in_flight.take()));
        match next.expect("claim") {
            Some(c) => in_flight = Some(c),
            None => break,
        }
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    env.db().await.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    rate
}

// ---------------------------------------------------------------------------
// sustained

#[derive(Debug, Serialize, Clone)]
struct Step {
    offered_per_s: u64,
    app_events_per_s: f64,
    app_tps: f64,
    relayed_per_s: f64,
    backlog_start: i64,
    backlog_end: i64,
    commit_to_ack_ms: Quantiles,
    kept_up: bool,
}

#[derive(Debug, Serialize, Clone)]
struct Sustained {
    mode: String,
    steps: Vec<Step>,
    highest_kept_up_per_s: u64,
}

async fn sustained(env: &Env, args: &Args, mode: &str) -> Sustained {
    let rates = [1000u64, 2000, 5000, 10000, 15000, 20000, 30000];
    let step_secs = 20;
    let table = env.new_table(&format!("sus_{mode}"));
    let topics = env.topics(&table, &TOPICS, 6, true).await;
    let db = env.db().await;
    let relay = spawn_relay(env, &table, &args.relay_settings(mode, "at-least-once", &table));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumer = LatencyConsumer::start(env, &topics, 6);
    let writers = Writers::start(
        env,
        WriterSpec {
            table: table.clone(),
            topics,
            connections: 8,
            per_tx: 10,
            rate: rates[0],
            keys: 1000,
            hot_key_share: 0.0,
        },
    );
    let mut steps = Vec::new();
    for &rate in &rates {
        writers.rate.store(rate, std::sync::atomic::Ordering::Relaxed);
        let (w0, c0, b0, t0) = (
            writers.written.load(std::sync::atomic::Ordering::Relaxed),
            consumer.count(),
            env.pending(&db, &table).await,
            now_us(),
        );
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(step_secs)).await;
        let secs = started.elapsed().as_secs_f64();
        let (w1, c1, b1) = (
            writers.written.load(std::sync::atomic::Ordering::Relaxed),
            consumer.count(),
            env.pending(&db, &table).await,
        );
        let lat: Vec<f64> = {
            let seen = consumer.seen.lock().expect("seen");
            insert_to_ack_ms(&seen.iter().filter(|s| s.insert_us >= t0).copied().collect::<Vec<_>>())
        };
        let q = quantiles(lat);
        let app = (w1 - w0) as f64 / secs;
        // kept up: the backlog ends below a second of the offered rate and did
        // not grow by more than that, and events arrive within a second
        let kept_up = (b1 as f64) < rate as f64 && (b1 - b0) < rate as i64 && q.p99 < 1000.0 && app > rate as f64 * 0.9;
        say(format!(
            "sustained {mode}: offered {rate}/s, app wrote {app:.0}/s, relayed {:.0}/s, backlog {b0} → {b1}, p99 {:.1} ms{}",
            (c1 - c0) as f64 / secs,
            q.p99,
            if kept_up { "" } else { " — not kept up" }
        ));
        steps.push(Step {
            offered_per_s: rate,
            app_events_per_s: app,
            app_tps: app / 10.0,
            relayed_per_s: (c1 - c0) as f64 / secs,
            backlog_start: b0,
            backlog_end: b1,
            commit_to_ack_ms: q,
            kept_up,
        });
        if !kept_up {
            break;
        }
    }
    writers.finish().await;
    drop(consumer.finish());
    relay.stop(Duration::from_secs(30));
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    let highest = steps.iter().filter(|s| s.kept_up).map(|s| s.offered_per_s).max().unwrap_or(0);
    Sustained { mode: mode.into(), steps, highest_kept_up_per_s: highest }
}

fn print_sustained(s: &[Sustained]) {
    println!();
    println!("sustained: 8 writer connections (10 events per transaction) and one relay together, {} s per offered rate, until it stops keeping up", 20);
    println!(
        "  mode   │ offered/s │ app ev/s (tx/s) │ relayed/s │ backlog start → end │ insert→ack p50 / p99 ms │ kept up"
    );
    for x in s {
        for st in &x.steps {
            println!(
                "  {:<6} │ {:>9} │ {:>8.0} ({:>5.0}) │ {:>9.0} │ {:>8} → {:>8} │ {:>9.1} / {:>9.1} │ {}",
                x.mode,
                st.offered_per_s,
                st.app_events_per_s,
                st.app_tps,
                st.relayed_per_s,
                st.backlog_start,
                st.backlog_end,
                st.commit_to_ack_ms.p50,
                st.commit_to_ack_ms.p99,
                if st.kept_up { "yes" } else { "NO" }
            );
        }
        println!("  {}: highest offered rate kept up with: {} events/s", x.mode, x.highest_kept_up_per_s);
    }
}

// ---------------------------------------------------------------------------
// horizon

#[derive(Debug, Serialize, Clone)]
struct Window {
    /// Seconds since the writers started (window start).
    t: u64,
    phase: String,
    events: usize,
    commit_to_ack_ms: Quantiles,
    /// Consumer lag at the end of the window: now − insert time of the newest
    /// event consumed so far.
    lag_s: f64,
    dead_tuples: i64,
}

#[derive(Debug, Serialize, Clone)]
struct Horizon {
    mode: String,
    rate: u64,
    hold_secs: u64,
    windows: Vec<Window>,
    p99_before_ms: f64,
    p99_last_minute_of_hold_ms: f64,
    ratio: f64,
    windows_without_progress: usize,
    lag_after_release_s: f64,
    pass: bool,
}

async fn horizon(env: &Env, args: &Args, mode: &str) -> Horizon {
    let rate = 2000;
    let (before, hold, after) = (60u64, args.hold_secs, 30u64);
    let table = env.new_table(&format!("hz_{mode}"));
    let topics = env.topics(&table, &TOPICS, 6, true).await;
    let db = env.db().await;
    let relay = spawn_relay(env, &table, &args.relay_settings(mode, "at-least-once", &table));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumer = LatencyConsumer::start(env, &topics, 6);
    let t0 = now_us();
    let writers = Writers::start(
        env,
        WriterSpec { table: table.clone(), topics, connections: 4, per_tx: 10, rate, keys: 1000, hot_key_share: 0.0 },
    );
    let mut dead: Vec<(i64, i64)> = Vec::new();
    let total = before + hold + after;
    let report = env.db().await;
    let mut held = false;
    let mut hold_start = 0;
    let mut hold_end = 0;
    for s in 0..total {
        if s == before {
            // A report in REPEATABLE READ: its snapshot holds the horizon
            report
                .batch_execute(&format!("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM public.{table}"))
                .await
                .expect("hold");
            held = true;
            hold_start = now_us();
            say(format!("horizon {mode}: snapshot held for {hold} s"));
        }
        if held && s == before + hold {
            report.batch_execute("COMMIT").await.expect("release");
            held = false;
            hold_end = now_us();
            say(format!("horizon {mode}: released"));
        }
        if s % 10 == 0 {
            if let Ok(r) = db
                .query_one("SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relname = $1", &[&table])
                .await
            {
                dead.push((now_us(), r.get(0)));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let written = writers.finish().await;
    consumer.wait_for(written as usize, Duration::from_secs(60));
    let seen = consumer.finish();
    relay.stop(Duration::from_secs(30));
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    let n = (total / 10) as usize;
    let per = windows(&seen, t0, Duration::from_secs(10), n);
    let lag_at = |t_us: i64| {
        let newest = seen.iter().filter(|x| x.recv_us <= t_us).map(|x| x.insert_us).max().unwrap_or(t0);
        (t_us - newest) as f64 / 1e6
    };
    let mut rows = Vec::new();
    for (i, (events, q)) in per.into_iter().enumerate() {
        let start = t0 + i as i64 * 10_000_000;
        let phase = if start < hold_start {
            "before"
        } else if start < hold_end {
            "held"
        } else {
            "after"
        };
        let d = dead.iter().filter(|(t, _)| *t <= start + 10_000_000).map(|(_, d)| *d).next_back().unwrap_or(0);
        rows.push(Window {
            t: i as u64 * 10,
            phase: phase.into(),
            events,
            commit_to_ack_ms: q,
            lag_s: lag_at(start + 10_000_000),
            dead_tuples: d,
        });
    }
    let lat_in = |from: i64, to: i64| {
        quantiles(
            seen.iter()
                .filter(|x| x.insert_us >= from && x.insert_us < to)
                .filter_map(|x| x.append_us.map(|a| (a - x.insert_us) as f64 / 1000.0))
                .collect(),
        )
    };
    let p99_before = lat_in(t0 + 10_000_000, hold_start).p99; // the first 10 s warm up
    let p99_last = lat_in(hold_end - 60_000_000, hold_end).p99;
    let no_progress = rows.iter().filter(|w| w.events == 0).count();
    let lag_after = lag_at(hold_end + 1_000_000);
    let ratio = p99_last / p99_before.max(0.001);
    Horizon {
        mode: mode.into(),
        rate,
        hold_secs: hold,
        windows: rows,
        p99_before_ms: p99_before,
        p99_last_minute_of_hold_ms: p99_last,
        ratio,
        windows_without_progress: no_progress,
        lag_after_release_s: lag_after,
        pass: ratio <= 3.0 && no_progress == 0 && lag_after < 5.0,
    }
}

fn print_horizon(h: &[Horizon]) {
    for x in h {
        println!();
        println!(
            "held horizon, {}: writers offer {} ev/s; a REPEATABLE READ transaction holds the xmin horizon for {} s (after 60 s)",
            x.mode, x.rate, x.hold_secs
        );
        println!("    t s │ phase  │ events │ insert→ack p50 / p99 ms │ lag s │ dead tuples");
        for w in &x.windows {
            println!(
                "  {:>5} │ {:<6} │ {:>6} │ {:>9.1} / {:>9.1} │ {:>5.2} │ {:>11}",
                w.t, w.phase, w.events, w.commit_to_ack_ms.p50, w.commit_to_ack_ms.p99, w.lag_s, w.dead_tuples
            );
        }
        println!(
            "  p99 before {:.1} ms · last minute of the hold {:.1} ms · ratio {:.2} (≤ 3) · 10 s windows without progress {} · lag 1 s after release {:.2} s (< 5) · {}",
            x.p99_before_ms,
            x.p99_last_minute_of_hold_ms,
            x.ratio,
            x.windows_without_progress,
            x.lag_after_release_s,
            if x.pass { "PASS" } else { "FAIL" }
        );
    }
}

// ---------------------------------------------------------------------------
// hotkey

#[derive(Debug, Serialize, Clone)]
struct HotKey {
    relays: usize,
    backlog: i64,
    other_rate: u64,
    other_keys_commit_to_ack_ms: Quantiles,
    hot_key_drained_s: f64,
}

async fn hotkey(env: &Env, args: &Args) -> HotKey {
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
    let consumer = LatencyConsumer::start(env, &topics, 6);
    let writers = Writers::start(
        env,
        WriterSpec {
            table: table.clone(),
            topics,
            connections: 4,
            per_tx: 10,
            rate: 1000,
            keys: 1000,
            hot_key_share: 0.0,
        },
    );
    let t0 = Instant::now();
    let relays: Vec<Proc> = (0..3)
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
    let others: Vec<Seen> = seen.into_iter().filter(|s| !s.hot).collect();
    HotKey {
        relays: 3,
        backlog,
        other_rate: 1000,
        other_keys_commit_to_ack_ms: quantiles(insert_to_ack_ms(&others)),
        hot_key_drained_s: hot_done.unwrap_or(f64::NAN),
    }
}

// ---------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let env = Env::from_env(args.relay_bin.clone());
    let (cores, cpu) = host();
    let mut report = serde_json::Map::new();
    if args.runs("app-cost") {
        let r = app_cost(&env, &args).await;
        report.insert("app_cost".into(), json!(r));
    }
    if args.runs("idle") {
        say("idle: an idle relay's cost to Postgres…");
        let r = idle_cost(&env, &args).await;
        report.insert("idle".into(), json!(r));
    }
    if args.runs("latency") {
        let mut lat = Vec::new();
        let deliveries: &[&str] =
            if args.no_exactly_once { &["at-least-once"] } else { &["at-least-once", "exactly-once"] };
        for d in deliveries {
            for &rate in &args.rates {
                say(format!("latency: {rate} events/s, {d}, {} s…", args.latency_secs));
                lat.push(latency(&env, &args, rate, d).await);
            }
        }
        print_latency(&lat);
        report.insert("latency".into(), json!(lat));
    }
    let mut drains = Vec::new();
    if args.runs("drain") {
        let mut runs = vec![
            ("vacuumed", "delete", "at-least-once"),
            ("vacuumed", "mark", "at-least-once"),
            ("not vacuumed", "delete", "at-least-once"),
            ("not vacuumed", "mark", "at-least-once"),
        ];
        if !args.no_exactly_once {
            runs.extend([("not vacuumed", "delete", "exactly-once"), ("not vacuumed", "mark", "exactly-once")]);
        }
        for (scenario, mode, delivery) in runs {
            drains.push(drain_run(&env, &args, scenario, mode, delivery).await);
        }
    }
    if args.only.iter().any(|s| s == "drain-diag") {
        for scenario in [
            "vacuumed",
            "not vacuumed",
            "analyzed",
            "vacuumed, no analyze",
            "not vacuumed, autovacuum off",
            "analyzed, autovacuum off",
        ] {
            drains.push(drain_run(&env, &args, scenario, "delete", "at-least-once").await);
        }
    }
    if args.runs("drain") || args.only.iter().any(|s| s == "ceilings") {
        let mut ceilings = Vec::new();
        for mode in ["delete", "mark"] {
            say(format!("drain: SQL-only and store-path ceilings, {mode}…"));
            let sql = sql_only(&env, &args, mode).await;
            let store = store_path(&env, &args, mode).await;
            ceilings.push(Ceilings {
                mode: mode.into(),
                sql_only_events_per_s: sql,
                store_path_events_per_s: store,
                store_path_fraction: store / sql,
            });
        }
        println!();
        println!("ceilings on a vacuumed table (batch {}): SQL-only = a stored procedure doing the same claims and deletes/marks, no rows leave the server; store path = the relay's own Postgres work (claim with fence and floor probe, finish), pipelined, no Kafka", args.batch_size);
        println!("  mode   │ SQL-only ev/s │ store path ev/s │ store path / SQL-only");
        for c in &ceilings {
            println!(
                "  {:<6} │ {:>13.0} │ {:>15.0} │ {:>20.0}%",
                c.mode,
                c.sql_only_events_per_s,
                c.store_path_events_per_s,
                c.store_path_fraction * 100.0
            );
        }
        report.insert("ceilings".into(), json!(ceilings));
    }
    if args.runs("churn") {
        drains.push(drain_run(&env, &args, "churned", "delete", "at-least-once").await);
        if !args.runs("drain") {
            drains.push(drain_run(&env, &args, "vacuumed", "delete", "at-least-once").await);
        }
    }
    if args.runs("retained") {
        drains.push(retained_run(&env, &args).await);
        if !args.runs("drain") {
            drains.push(drain_run(&env, &args, "vacuumed", "mark", "at-least-once").await);
        }
    }
    if !drains.is_empty() {
        print_drains(&drains);
        report.insert("drains".into(), json!(drains));
    }
    if args.runs("sustained") {
        let mut s = Vec::new();
        for mode in ["mark", "delete"] {
            s.push(sustained(&env, &args, mode).await);
        }
        print_sustained(&s);
        report.insert("sustained".into(), json!(s));
    }
    if args.runs("horizon") {
        let mut h = Vec::new();
        for mode in ["mark", "delete"] {
            h.push(horizon(&env, &args, mode).await);
        }
        print_horizon(&h);
        report.insert("horizon".into(), json!(h));
    }
    if args.runs("hotkey") {
        say("hotkey: 3 relays, one key with a 10k backlog, other keys at 1k ev/s…");
        let h = hotkey(&env, &args).await;
        println!();
        println!(
            "hot key: {} relays; one key has a backlog of {} events; other keys offered at {} ev/s for 30 s",
            h.relays, h.backlog, h.other_rate
        );
        println!(
            "  other keys' insert→ack p50 / p99 / max: {:.1} / {:.1} / {:.1} ms ({} events) · hot key's backlog drained after {:.1} s",
            h.other_keys_commit_to_ack_ms.p50, h.other_keys_commit_to_ack_ms.p99, h.other_keys_commit_to_ack_ms.max, h.other_keys_commit_to_ack_ms.n, h.hot_key_drained_s
        );
        report.insert("hotkey".into(), json!(h));
    }
    report.insert("date".into(), json!(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()));
    report.insert("cores".into(), json!(cores));
    report.insert("cpu".into(), json!(cpu));
    report.insert("args".into(), json!(format!("{args:?}")));
    let path = save(&args.out_dir, &serde_json::Value::Object(report));
    println!();
    println!("host: {cores} cores ({cpu}); results: {}", path.display());
}
