//! `horizon`: writers while a REPEATABLE READ transaction holds the xmin horizon.

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Window {
    /// Seconds since the writers started (window start).
    pub(crate) t: u64,
    pub(crate) phase: String,
    pub(crate) events: usize,
    pub(crate) commit_to_ack_ms: Quantiles,
    /// Consumer lag at the end of the window: now − insert time of the newest
    /// event consumed so far.
    pub(crate) lag_s: f64,
    pub(crate) dead_tuples: i64,
}

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Horizon {
    pub(crate) mode: String,
    pub(crate) rate: u64,
    pub(crate) hold_secs: u64,
    pub(crate) windows: Vec<Window>,
    pub(crate) p99_before_ms: f64,
    pub(crate) p99_last_minute_of_hold_ms: f64,
    pub(crate) ratio: f64,
    pub(crate) windows_without_progress: usize,
    pub(crate) lag_after_release_s: f64,
    pub(crate) pass: bool,
}

pub(crate) async fn horizon(env: &Env, args: &Args, mode: &str) -> Horizon {
    let rate = 2000;
    let (before, hold, after) = (60u64, args.hold_secs, 30u64);
    let table = env.new_table(&format!("hz_{mode}"));
    let topics = env.topics(&table, &TOPICS, 6, true).await;
    let db = env.db().await;
    let relay = spawn_relay(env, &table, &args.relay_settings(mode, "at-least-once", &table));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumer = LatencyConsumer::start(&env.brokers, &topics, 6);
    let t0 = now_us();
    let writers = env.writers(&table, topics, 4, rate);
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

pub(crate) fn print_horizon(h: &[Horizon]) {
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
