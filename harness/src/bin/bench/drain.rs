//! `drain`, `churn`, `retained`: a preloaded backlog drained by one relay, in
//! production's shapes (not vacuumed, after a delete burst, next to retained rows).

use super::*;

/// N rows of ≈1 KB JSON over 1k keys and 4 topics, server-side in 4 parallel
/// chunks. Returns what inserting them cost.
pub(crate) async fn preload(env: &Env, table: &str, run: &str, n: i64) -> Spent {
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

/// What writing one event costs Postgres the way applications write: one
/// transaction per event with its business row (app-cost's pgbench script), 16
/// clients, into a fresh outbox: (Postgres CPU µs, WAL bytes) per event.
pub(crate) async fn app_write_cost(env: &Env) -> (f64, f64) {
    static COST: tokio::sync::OnceCell<(f64, f64)> = tokio::sync::OnceCell::const_new();
    *COST
        .get_or_init(|| async {
            let db = env.db().await;
            crate::app_cost::business_table(&db).await;
            let table = env.new_table("app_write");
            // 16 clients × 2500 transactions = 40k events, after a warm-up
            pgbench_for(env, &app_script(&table), 16, &["-t", "200"]);
            let n = 16 * 2500;
            let meter = Meter::start(&db).await;
            pgbench_for(env, &app_script(&table), 16, &["-t", "2500"]);
            let spent = meter.stop(&db).await;
            db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
            let cost = (spent.postgres_cpu_s / n as f64 * 1e6, spent.wal_bytes as f64 / n as f64);
            say(format!(
                "writing an event the application's way costs {:.1} µs of Postgres CPU and {:.0} B of WAL",
                cost.0, cost.1
            ));
            cost
        })
        .await
}

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Drain {
    pub(crate) scenario: String,
    pub(crate) mode: String,
    pub(crate) delivery: String,
    pub(crate) events: i64,
    pub(crate) events_per_s: f64,
    /// Dead tuples in the table when the relay started (pg_stat_user_tables).
    pub(crate) dead_tuples_at_start: i64,
    pub(crate) relay_cpu_s_per_million: f64,
    pub(crate) relay_peak_rss_mib: f64,
    pub(crate) postgres_cpu_us_per_event: f64,
    pub(crate) wal_bytes_per_event: f64,
    pub(crate) insert_postgres_cpu_us_per_event: f64,
    pub(crate) insert_wal_bytes_per_event: f64,
    /// Writing the event the application's way (one transaction per event with
    /// its business row): the baseline the relay's cost is held to.
    pub(crate) app_write_postgres_cpu_us_per_event: f64,
    pub(crate) app_write_wal_bytes_per_event: f64,
    /// Where the drain's Postgres time and WAL went.
    pub(crate) breakdown: Breakdown,
}

/// Per statement (pg_stat_statements) and per WAL record type (pg_walinspect)
/// over a drain, per event.
#[derive(Debug, Serialize, Clone, Default)]
pub(crate) struct Breakdown {
    /// (statement, calls, µs per event, buffers per event, WAL bytes per event)
    pub(crate) statements: Vec<(String, i64, f64, f64, f64)>,
    /// (resource manager / record, records per event, WAL bytes per event, of it full-page images)
    pub(crate) wal: Vec<(String, f64, f64, f64)>,
}

/// Starts counting: resets pg_stat_statements, returns the WAL position.
pub(crate) async fn breakdown_start(db: &tokio_postgres::Client) -> String {
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect; SELECT pg_stat_statements_reset()").await.ok();
    db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0)
}

/// What the statements touching `table` and the WAL since `from` cost, per event.
pub(crate) async fn breakdown(db: &tokio_postgres::Client, table: &str, from: &str, n: i64) -> Breakdown {
    let n = n.max(1) as f64;
    let statements = db
        .query(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 70), calls, total_exec_time,
                    shared_blks_hit + shared_blks_read, wal_bytes::float8
             FROM pg_stat_statements WHERE query ILIKE '%' || $1 || '%' ORDER BY total_exec_time DESC LIMIT 8",
            &[&table],
        )
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let (q, calls, ms, blks, wal): (String, i64, f64, i64, f64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            (q, calls, ms * 1000.0 / n, blks as f64 / n, wal / n)
        })
        .collect();
    let wal = db
        .query(
            "SELECT \"resource_manager/record_type\", count::float8, (record_size + fpi_size)::float8, fpi_size::float8
             FROM pg_get_wal_stats($1::text::pg_lsn, pg_current_wal_lsn(), true) WHERE count > 0
             ORDER BY record_size + fpi_size DESC LIMIT 8",
            &[&from],
        )
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let (k, c, b, f): (String, f64, f64, f64) = (r.get(0), r.get(1), r.get(2), r.get(3));
            (k, c / n, b / n, f / n)
        })
        .collect();
    Breakdown { statements, wal }
}

pub(crate) fn print_breakdown(label: &str, b: &Breakdown) {
    println!("  {label}: per event");
    for (q, calls, us, blks, wal) in &b.statements {
        println!("    {us:>7.2} µs {blks:>6.1} buffers {wal:>7.0} B WAL  {calls:>7} calls  {q}");
    }
    for (k, c, bytes, fpi) in &b.wal {
        println!("    WAL {k:<28} {c:>6.2} records {bytes:>7.0} B (of it full-page images {fpi:>6.0} B)");
    }
}

pub(crate) async fn dead_tuples(db: &tokio_postgres::Client, table: &str) -> i64 {
    // the statistics are flushed with a delay; good enough for a report
    tokio::time::sleep(Duration::from_millis(700)).await;
    db.query_one("SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relname = $1", &[&table])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// One relay drains `table` (already loaded with `n` rows); timed from its
/// first finished batch to an empty outbox.
pub(crate) async fn drain(
    env: &Env,
    args: &Args,
    table: &str,
    n: i64,
    mode: &str,
    delivery: &str,
) -> (f64, f64, f64, Spent, Breakdown) {
    let db = env.db().await;
    let first = env.head(&db, table).await.expect("preloaded");
    let lsn = breakdown_start(&db).await;
    // `--batch-size` before the settings, so a `--set` of it still wins: the
    // poller and the ceilings take the same size.
    let mut settings = settings(&[("OUTBOX_RELAY__RELAY__BATCH_SIZE", &args.batch_size.to_string())]);
    settings.extend(args.relay_settings(mode, delivery, table));
    let relay = spawn_relay(env, table, &settings);
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
    let b = breakdown(&db, table, &lsn, n).await;
    let (t0, left) = started.map(|(t, l, _)| (t, l)).unwrap_or((t_end, n));
    let rate = left as f64 / (t_end - t0).as_secs_f64().max(1e-3);
    (rate, cpu / n as f64 * 1e6, rss, spent, b)
}

pub(crate) async fn drain_run(env: &Env, args: &Args, scenario: &str, mode: &str, delivery: &str) -> Drain {
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
    let app = app_write_cost(env).await;
    say(format!("drain: {scenario}, {mode}, {delivery}: {n} events, {dead} dead tuples in the table"));
    let (rate, cpu, rss, spent, breakdown) = drain(env, args, &table, n, mode, delivery).await;
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    Drain {
        breakdown,
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
        app_write_postgres_cpu_us_per_event: app.0,
        app_write_wal_bytes_per_event: app.1,
    }
}

/// Mark mode into a table that keeps `retained` published rows (what
/// `relay.retention` keeps), vacuumed as a long-lived table would be; the new
/// backlog is not vacuumed.
pub(crate) async fn retained_run(env: &Env, args: &Args) -> Drain {
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
    let app = app_write_cost(env).await;
    say(format!("retained: draining {n} new events in mark mode next to {r} retained rows"));
    let (rate, cpu, rss, spent, breakdown) = drain(env, args, &table, n, "mark", "at-least-once").await;
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    Drain {
        breakdown,
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
        app_write_postgres_cpu_us_per_event: app.0,
        app_write_wal_bytes_per_event: app.1,
    }
}

pub(crate) fn print_drains(d: &[Drain], batch_size: usize) {
    println!();
    if let Some(x) = d.first() {
        println!(
            "drains: one relay, batch {batch_size}, 1 KB JSON events, 1k keys, 4 topics × 6 partitions. Per event: Postgres CPU and WAL of the \
             drain, and its ratio to writing the event the application's way ({:.1} µs, {:.0} B: one transaction per event \
             with its business row, pgbench, 16 clients); in brackets the bulk preload insert",
            x.app_write_postgres_cpu_us_per_event, x.app_write_wal_bytes_per_event
        );
    }
    println!("  scenario        │ mode   │ delivery      │ dead tuples │ relay ev/s │ vs vacuumed │ PG CPU µs/ev (× app) (bulk) │ WAL B/ev (× app) (bulk) │ relay CPU s/1M │ RSS MiB");
    for x in d {
        let base = d
            .iter()
            .find(|b| b.scenario == "vacuumed" && b.mode == x.mode && b.delivery == x.delivery)
            .map(|b| b.events_per_s);
        println!(
            "  {:<15} │ {:<6} │ {:<13} │ {:>11} │ {:>10.0} │ {:>11} │ {:>6.1} ({:>4.2}×) ({:>6.1}) │ {:>6.0} ({:>4.2}×) ({:>6.0}) │ {:>14.1} │ {:>7.1}",
            x.scenario,
            x.mode,
            x.delivery,
            x.dead_tuples_at_start,
            x.events_per_s,
            base.map(|b| format!("{:.0}%", x.events_per_s / b * 100.0)).unwrap_or_else(|| "-".into()),
            x.postgres_cpu_us_per_event,
            x.postgres_cpu_us_per_event / x.app_write_postgres_cpu_us_per_event.max(1e-9),
            x.insert_postgres_cpu_us_per_event,
            x.wal_bytes_per_event,
            x.wal_bytes_per_event / x.app_write_wal_bytes_per_event.max(1e-9),
            x.insert_wal_bytes_per_event,
            x.relay_cpu_s_per_million,
            x.relay_peak_rss_mib
        );
    }
    println!("where the drains' Postgres time and WAL went (pg_stat_statements, statements naming the table; pg_walinspect, all WAL in the drain, autovacuum included)");
    for x in d {
        print_breakdown(&format!("{}, {}, {}", x.scenario, x.mode, x.delivery), &x.breakdown);
    }
}
