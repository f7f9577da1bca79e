//! `app-cost`: what the outbox costs the application's commits (real pgbench),
//! against a plain table, the old NOTIFY trigger, and with a relay draining.

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct AppCost {
    pub(crate) clients: u32,
    pub(crate) seconds: u64,
    /// tps per run, in the order run (alternating)
    pub(crate) outbox_tps: Vec<f64>,
    pub(crate) plain_tps: Vec<f64>,
    pub(crate) old_trigger_tps: Vec<f64>,
    pub(crate) outbox_with_relay_tps: Vec<f64>,
    pub(crate) ratio: f64,
    /// Outbox / plain copy of each adjacent pair of runs (O P, P O, …): the spread.
    pub(crate) pair_ratios: Vec<f64>,
    pub(crate) ratio_old_trigger: f64,
    /// Outbox with a relay draining / plain copy (mixes the outbox's own cost in).
    pub(crate) ratio_with_relay: f64,
    /// The same outbox with and without a relay draining it (delete mode).
    pub(crate) relay: RelayDraining,
}

pub(crate) fn pgbench(env: &Env, script: &str, clients: u32, secs: u64) -> f64 {
    pgbench_for(env, script, clients, &["-T", &secs.to_string()])
}

/// pgbench with `length` (`-T secs` or `-t transactions per client`); returns tps.
pub(crate) fn pgbench_for(env: &Env, script: &str, clients: u32, length: &[&str]) -> f64 {
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
        .args(["-n", "-M", "prepared", "-c", &clients.to_string(), "-j", "2"])
        .args(length)
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
pub(crate) fn app_script(table: &str) -> String {
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

/// The application's business table, which the pgbench script writes beside
/// each event.
pub(crate) async fn business_table(db: &tokio_postgres::Client) {
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS bench_app_orders (id bigserial PRIMARY KEY, customer int, total int,
         created_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .expect("business table");
}

pub(crate) async fn app_cost(env: &Env, args: &Args) -> Vec<AppCost> {
    let db = env.db().await;
    business_table(&db).await;
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
        let (mut o, mut p, mut t) = (Vec::new(), Vec::new(), Vec::new());
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
        // The same into the outbox while a relay publishes what it gets
        // (delete mode), alternating with runs without one.
        let rd = relay_draining(env, args, &outbox, clients, "delete").await;
        let r = rd.with.clone();
        let relay = rd;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        results.push(AppCost {
            clients,
            seconds: args.pgbench_secs,
            ratio: mean(&o) / mean(&p),
            pair_ratios: o.iter().zip(&p).map(|(o, p)| o / p).collect(),
            ratio_old_trigger: mean(&t) / mean(&p),
            ratio_with_relay: mean(&r) / mean(&p),
            relay,
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
    println!("  clients │ plain copy tps │ outbox tps │ ratio │ pairs min–max │ 0001/0002 with NOTIFY trigger tps │ ratio │ outbox + relay draining tps │ ratio (vs copy)");
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
    print_relay_cost(&results.iter().map(|a| a.relay.clone()).collect::<Vec<_>>());
    results
}
