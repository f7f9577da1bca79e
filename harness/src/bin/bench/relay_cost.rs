//! `relay-cost`: the application (pgbench, as in app-cost) into the outbox
//! with and without one relay draining it, alternating (N R R N), in delete and
//! mark mode: the application's commit rate, what it waited on, and what the
//! relay added to Postgres per relayed event (WAL, CPU), against what the
//! application's own writes cost per event. Production's shape: the relay
//! keeps up with writers committing, nothing is vacuumed by hand.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::*;

/// Samples what pgbench's sessions wait on until `stop`: share per wait event.
fn sample_waits(env: &Env, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<(String, f64)>> {
    let env = env.clone();
    tokio::spawn(async move {
        let db = env.db().await;
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut total = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let rows = db
                .query(
                    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU (running)') FROM pg_stat_activity
                     WHERE application_name = 'pgbench' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap_or_default();
            for r in rows {
                *counts.entry(r.get(0)).or_default() += 1;
                total += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut v: Vec<(String, f64)> = counts.into_iter().map(|(k, n)| (k, n as f64 / total.max(1) as f64)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.truncate(6);
        v
    })
}

#[derive(Debug, Serialize, Clone, Default)]
pub(crate) struct RelayDraining {
    pub(crate) mode: String,
    pub(crate) clients: u32,
    pub(crate) with: Vec<f64>,
    pub(crate) without: Vec<f64>,
    /// Events pending when each relay run ended (the relay kept up if ~0).
    pub(crate) behind: Vec<i64>,
    pub(crate) waits_with: Vec<(String, f64)>,
    pub(crate) waits_without: Vec<(String, f64)>,
    /// WAL bytes and Postgres CPU µs per committed transaction (= event), without and with the relay.
    pub(crate) wal_per_event_without: f64,
    pub(crate) wal_per_event_with: f64,
    pub(crate) cpu_us_per_event_without: f64,
    pub(crate) cpu_us_per_event_with: f64,
    /// The last run with the relay: every statement naming the outbox (the
    /// application's insert and the relay's), and the WAL, per event.
    pub(crate) breakdown: Breakdown,
}

impl RelayDraining {
    pub(crate) fn ratio(&self) -> f64 {
        mean(&self.with) / mean(&self.without).max(1e-9)
    }

    /// What the relay added per relayed event, as a share of what writing it cost.
    pub(crate) fn wal_ratio(&self) -> f64 {
        (self.wal_per_event_with - self.wal_per_event_without) / self.wal_per_event_without.max(1e-9)
    }

    pub(crate) fn cpu_ratio(&self) -> f64 {
        (self.cpu_us_per_event_with - self.cpu_us_per_event_without) / self.cpu_us_per_event_without.max(1e-9)
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The application into `outbox` with and without a relay (in `mode`)
/// draining it, alternating (N R R N).
pub(crate) async fn relay_draining(env: &Env, args: &Args, outbox: &str, clients: u32, mode: &str) -> RelayDraining {
    let db = env.db().await;
    let mut r = RelayDraining { mode: mode.into(), clients, ..Default::default() };
    let (mut spent_with, mut spent_without) = (Vec::new(), Vec::new());
    for (run, with) in [false, true, true, false].into_iter().enumerate() {
        let relay = with.then(|| spawn_relay(env, outbox, &args.relay_settings(mode, "at-least-once", outbox)));
        if with {
            tokio::time::sleep(Duration::from_secs(10)).await; // the relay drains what is left first
        }
        db.batch_execute("CHECKPOINT").await.ok();
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = sample_waits(env, stop.clone());
        let script = app_script(outbox);
        let (e, c, secs) = (env.clone(), clients, args.pgbench_secs);
        let from = if run == 2 { Some(breakdown_start(&db).await) } else { None };
        let meter = Meter::start(&db).await;
        let tps = tokio::task::spawn_blocking(move || pgbench(&e, &script, c, secs)).await.expect("pgbench");
        if let Some(relay) = &relay {
            // what the run wrote is relayed before the meter stops
            let deadline = Instant::now() + Duration::from_secs(60);
            while env.pending(&db, outbox).await > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = relay;
        }
        let spent = meter.stop(&db).await;
        stop.store(true, Ordering::Relaxed);
        let waits = sampler.await.unwrap_or_default();
        let events = tps * secs as f64;
        if let Some(from) = from {
            r.breakdown = breakdown(&db, outbox, &from, events as i64).await;
        }
        if let Some(relay) = relay {
            r.behind.push(env.pending(&db, outbox).await);
            relay.stop(Duration::from_secs(30));
            r.with.push(tps);
            r.waits_with = waits;
            spent_with.push((spent, events));
        } else {
            r.without.push(tps);
            r.waits_without = waits;
            spent_without.push((spent, events));
            // what the run wrote is deleted, so the next run starts alike
            db.batch_execute(&format!("DELETE FROM public.{outbox}")).await.ok();
        }
        say(format!(
            "relay-cost: {clients} clients, {mode}: outbox {} a relay: {tps:.0} tps",
            if with { "with" } else { "without" }
        ));
    }
    let per_event = |v: &[(Spent, f64)]| {
        let n: f64 = v.iter().map(|(_, e)| e).sum::<f64>().max(1.0);
        (
            v.iter().map(|(s, _)| s.wal_bytes as f64).sum::<f64>() / n,
            v.iter().map(|(s, _)| s.postgres_cpu_s).sum::<f64>() / n * 1e6,
        )
    };
    (r.wal_per_event_with, r.cpu_us_per_event_with) = per_event(&spent_with);
    (r.wal_per_event_without, r.cpu_us_per_event_without) = per_event(&spent_without);
    r
}

/// The section on its own: delete and mark mode, 16 clients.
pub(crate) async fn relay_cost(env: &Env, args: &Args) -> Vec<RelayDraining> {
    let db = env.db().await;
    crate::app_cost::business_table(&db).await;
    env.topics("bench", &["orders"], 4, false).await;
    let mut out = Vec::new();
    for &clients in &args.clients {
        for mode in ["delete", "mark"] {
            let outbox = env.new_table(&format!("relay_cost_{mode}"));
            out.push(relay_draining(env, args, &outbox, clients, mode).await);
            db.batch_execute(&format!("DROP TABLE IF EXISTS public.{outbox}")).await.ok();
        }
    }
    out
}

pub(crate) fn print_relay_cost(v: &[RelayDraining]) {
    println!();
    println!("the application while one relay drains, alternating runs without and with it (N R R N), the relay started 10 s before its runs; the meter runs until the relay has relayed what the run wrote");
    println!("  clients │ mode   │ no relay tps │ relay draining tps │ ratio │ behind at end │ WAL B/ev without → with (relay's share) │ PG CPU µs/ev without → with (relay's share)");
    for r in v {
        println!(
            "  {:>7} │ {:<6} │ {:>12.0} │ {:>18.0} │ {:>5.2} │ {:>13} │ {:>7.0} → {:>7.0} ({:>5.2}×) │ {:>7.1} → {:>7.1} ({:>5.2}×)",
            r.clients,
            r.mode,
            mean(&r.without),
            mean(&r.with),
            r.ratio(),
            format!("{:?}", r.behind),
            r.wal_per_event_without,
            r.wal_per_event_with,
            r.wal_ratio(),
            r.cpu_us_per_event_without,
            r.cpu_us_per_event_with,
            r.cpu_ratio()
        );
        let fmt = |w: &[(String, f64)]| {
            w.iter().map(|(k, s)| format!("{k} {:.0}%", s * 100.0)).collect::<Vec<_>>().join(", ")
        };
        println!("      the application waited on: without the relay: {}", fmt(&r.waits_without));
        println!("                                 with the relay:    {}", fmt(&r.waits_with));
        print_breakdown("the third run (with the relay), every statement naming the outbox", &r.breakdown);
    }
}
