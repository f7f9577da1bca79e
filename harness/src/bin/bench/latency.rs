//! `latency`: commit→ack at fixed offered rates.

use super::*;

#[derive(Debug, Serialize, Clone)]
pub(crate) struct Latency {
    pub(crate) delivery: String,
    pub(crate) offered_per_s: u64,
    pub(crate) achieved_per_s: f64,
    pub(crate) seconds: u64,
    /// Seconds written before the measured ones (not counted).
    pub(crate) warmup_secs: u64,
    /// From the writer's COMMIT returning to the broker's append.
    pub(crate) commit_to_ack_ms: Quantiles,
    /// From the INSERT (so also the writer's own commit) to the append.
    pub(crate) insert_to_ack_ms: Quantiles,
    pub(crate) commit_to_visible_ms: Quantiles,
}

pub(crate) async fn latency(env: &Env, args: &Args, rate: u64, delivery: &str) -> Latency {
    let table = env.new_table("lat");
    let topics = env.topics(&table, &TOPICS, 4, true).await;
    let relay = spawn_relay(env, &table, &args.relay_settings("mark", delivery, &table));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumer = LatencyConsumer::start(&env.brokers, &topics, 4);
    let writers = env.writers(&table, topics, 4, rate);
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
    let seen: Vec<Timed> = seen.into_iter().filter(|s| s.tx.is_some_and(|t| commits.contains_key(&t))).collect();
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
pub(crate) fn dump_latency(dir: &std::path::Path, delivery: &str, seen: &[Timed], commits: &HashMap<i64, i64>) {
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

pub(crate) fn print_latency(l: &[Latency]) {
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
