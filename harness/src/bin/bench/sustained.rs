//! `sustained`: writers and relay together: the highest offered rate the relay
//! keeps up with.

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Step {
    pub(crate) offered_per_s: u64,
    pub(crate) app_events_per_s: f64,
    pub(crate) app_tps: f64,
    pub(crate) relayed_per_s: f64,
    pub(crate) backlog_start: i64,
    pub(crate) backlog_end: i64,
    pub(crate) commit_to_ack_ms: Quantiles,
    pub(crate) kept_up: bool,
}

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Sustained {
    pub(crate) mode: String,
    /// What the same writers commit with no relay, unthrottled (events/s):
    /// the higher of a run before the steps and one after them (the host's
    /// speed drifts over minutes; one 15 s run once read 11.6k where the
    /// writers then wrote 12.6k beside a relay).
    pub(crate) writers_max_per_s: f64,
    pub(crate) writers_max_before_after: (f64, f64),
    pub(crate) steps: Vec<Step>,
    pub(crate) highest_kept_up_per_s: u64,
}

/// The writers' maximum: the same 8 connections and transactions, as fast as
/// the database takes them, for 15 s (after 3 s unmeasured) into a table of
/// their own with no relay running (dropped after).
async fn writers_max(env: &Env, mode: &str) -> f64 {
    let table = env.new_table(&format!("sus_{mode}_max"));
    let topics = TOPICS.iter().map(|t| format!("{table}.{t}")).collect();
    let writers = env.writers(&table, topics, 8, 0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (w0, started) = (writers.written.load(std::sync::atomic::Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(15)).await;
    let max =
        (writers.written.load(std::sync::atomic::Ordering::Relaxed) - w0) as f64 / started.elapsed().as_secs_f64();
    writers.finish().await;
    env.db().await.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    say(format!("sustained {mode}: the writers alone, no relay: {max:.0} events/s"));
    max
}

pub(crate) async fn sustained(env: &Env, args: &Args, mode: &str) -> Sustained {
    // finer steps around where a relay stops keeping up on 2 cores (goal 3's
    // fraction could read only 10k or 15k of the writers' maximum before)
    let rates = [1000u64, 2000, 5000, 7500, 10000, 12500, 15000, 17500, 20000, 30000];
    let step_secs = 20;
    let max_before = writers_max(env, mode).await;
    let table = env.new_table(&format!("sus_{mode}"));
    let topics = env.topics(&table, &TOPICS, 6, true).await;
    let db = env.db().await;
    let relay = spawn_relay(env, &table, &args.relay_settings(mode, "at-least-once", &table));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumer = LatencyConsumer::start(&env.brokers, &topics, 6);
    let writers = env.writers(&table, topics, 8, rates[0]);
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
        // kept up: the backlog ends below a second of the offered rate and grew
        // by at most 2 % of what the step wrote (it used to be allowed a
        // second of the rate: a relay 3 % short, 8.4k behind after 20 s at
        // 12.5k, passed), and events arrive within a second
        let kept_up = (b1 as f64) < rate as f64
            && (b1 - b0) as f64 <= 0.02 * (w1 - w0) as f64
            && q.p99 < 1000.0
            && app > rate as f64 * 0.9;
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
    let max_after = writers_max(env, mode).await;
    let highest = steps.iter().filter(|s| s.kept_up).map(|s| s.offered_per_s).max().unwrap_or(0);
    Sustained {
        mode: mode.into(),
        writers_max_per_s: max_before.max(max_after),
        writers_max_before_after: (max_before, max_after),
        steps,
        highest_kept_up_per_s: highest,
    }
}

pub(crate) fn print_sustained(s: &[Sustained]) {
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
        println!(
            "  {}: highest offered rate kept up with: {} events/s, {:.2} of the writers' maximum with no relay ({:.0} events/s: the higher of {:.0} before the steps and {:.0} after)",
            x.mode,
            x.highest_kept_up_per_s,
            x.highest_kept_up_per_s as f64 / x.writers_max_per_s.max(1.0),
            x.writers_max_per_s,
            x.writers_max_before_after.0,
            x.writers_max_before_after.1
        );
    }
}
