//! The run's verdict: read both outboxes and their topics back, compare them,
//! print the tables (lost, duplicated, out of order, poison parked, latency by
//! disruption window) and say whether the run passed.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use outbox_relay::config::Settings;
use outbox_relay::store::Store;
use outbox_relay::verify::{compare, read_topics};
use outbox_relay_support::{infra, pg_at};
use uuid::Uuid;

use crate::plan::Disruptor;
use crate::relays::Relays;
use crate::report::{self, row};
use crate::{now_ms, poison, Args};

/// Reads everything back, prints the table, and says whether the run passed.
#[allow(clippy::too_many_arguments)]
pub async fn verdict(
    args: &Args,
    d: &Disruptor<'_>,
    relays: &Relays,
    env: &[(String, String)],
    brokers: &str,
    topics: &[String],
    revived: usize,
    clean_exits: usize,
) -> bool {
    let (store, rows, seen, report) = read_back(env, brokers, topics).await;
    let mut disruptions = relays.disruptions.clone();
    disruptions.sort_by_key(|(w, _)| (w.from, w.to));
    let dups = report::duplicates(&seen, &disruptions);
    let db = pg_at(&infra().pg_url).await;
    let run = d.run;
    let parked: HashMap<Uuid, String> = db
        .query(&format!("SELECT id, coalesce(last_error, '') FROM public.{run} WHERE parked_at IS NOT NULL"), &[])
        .await
        .expect("parked")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let written: i64 = db.query_one(&format!("SELECT count(*) FROM public.{run}"), &[]).await.expect("count").get(0);
    let prepared_left = store.prepared_any(&store.transactional_prefixes().await).await.map(|p| p.len()).unwrap_or(0);
    let poison = poison::judge(&d.poison, &parked);
    let dup_ok = !args.exactly_once || report.duplicate_copies == 0;
    let ok = report.lost == 0
        && report.order_violations == 0
        && poison.ok
        && poison.wrongly_parked == 0
        && dup_ok
        && prepared_left == 0;

    let mode = if args.exactly_once { "exactly-once" } else { "at-least-once" };
    let cluster = if args.cluster { ", 3-broker cluster (RF 3, min.insync.replicas 2)" } else { ", one broker" };
    println!();
    println!(
        "chaos run {run}  ({:.0} s, {} relays, batch {}, pipeline depth {}, {mode}{cluster})",
        d.started.elapsed().as_secs_f64(),
        args.relays,
        args.batch_size,
        args.pipeline_depth
    );
    println!("  ┌──────────────────────────────────────────────────┬────────────┐");
    row("events written (committed rows)", written);
    row("  of them published", report.expected);
    row("  of them poison (injected)", d.poison.len());
    row("messages delivered for published rows", report.delivered);
    row("LOST", report.lost);
    let bound = (!args.exactly_once).then_some(usize::from(args.pipeline_depth));
    report::print_duplicates(&report, &dups, relays.kills, args.batch_size, bound);
    row("PER-KEY ORDER VIOLATIONS", report.order_violations);
    row("prepared batches left behind", prepared_left);
    row("SIGKILLs (random moments)", relays.kills);
    if args.exactly_once {
        row("SIGKILLs at protocol crash points", relays.failpoint_kills);
    }
    row("relays that exited by themselves", revived);
    row("clean exits on final SIGTERM", format!("{clean_exits}/{}", args.relays));
    row("long-lived slow relay (never restarted)", "relay 0");
    if !args.cluster {
        row("Kafka outage (s)", args.kafka_outage);
    }
    for (k, v) in &d.counts {
        row(k, v);
    }
    row("Postgres restarts", d.pg_restarts);
    row("wrongly parked (not poison)", poison.wrongly_parked);
    println!("  ├──────────────────────────────────────────────────┼────────────┤");
    for (class, (n, ok_n, reason)) in &poison.by_class {
        row(&format!("parked: {class}"), format!("{ok_n}/{n}"));
        println!("  │   reason: {reason:<60}");
    }
    println!("  └──────────────────────────────────────────────────┴────────────┘");
    print_latency(d, &rows, &seen);
    let t0 = now_ms() - d.started.elapsed().as_millis() as i64;
    report::print_unexplained(&dups, &disruptions, t0);
    if report.lost > 0 {
        print_lost(&db, run, &report.lost_ids).await;
    }
    ok
}

/// One outbox's table and what its topics hold (read_committed), compared.
async fn read_back(
    env: &[(String, String)],
    brokers: &str,
    topics: &[String],
) -> (Store, Vec<outbox_relay::store::PublishedRow>, Vec<outbox_relay::verify::Seen>, outbox_relay::verify::Report) {
    let store = Store::new(&Settings::load_from(None, env.to_vec()).expect("settings")).expect("store");
    let rows = store.published_rows(None, None, None).await.expect("published rows");
    let (b, t) = (brokers.to_string(), topics.to_vec());
    let seen =
        tokio::task::spawn_blocking(move || read_topics(&b, &BTreeMap::new(), &t, Duration::from_secs(600), |_| {}))
            .await
            .expect("reader")
            .expect("read topics");
    let report = compare(&rows, &seen);
    (store, rows, seen, report)
}

/// The second outbox: nothing lost, per-key order, no duplicate in
/// exactly-once mode, no prepared batch left. Prints its own table.
pub async fn verdict_second(
    args: &Args,
    env: &[(String, String)],
    brokers: &str,
    topics: &[String],
    table: &str,
) -> bool {
    let (store, _, _, report) = read_back(env, brokers, topics).await;
    let prepared_left = store.prepared_any(&store.transactional_prefixes().await).await.map(|p| p.len()).unwrap_or(0);
    let dup_ok = !args.exactly_once || report.duplicate_copies == 0;
    println!();
    println!("second outbox public.{table}, in the same relay processes");
    println!("  ┌──────────────────────────────────────────────────┬────────────┐");
    row("events published", report.expected);
    row("messages delivered for them", report.delivered);
    row("LOST", report.lost);
    row("duplicate copies", report.duplicate_copies);
    row("PER-KEY ORDER VIOLATIONS", report.order_violations);
    row("prepared batches left behind", prepared_left);
    println!("  └──────────────────────────────────────────────────┴────────────┘");
    if report.lost > 0 {
        print_lost(&pg_at(&infra().pg_url).await, table, &report.lost_ids).await;
    }
    report.lost == 0 && report.order_violations == 0 && dup_ok && prepared_left == 0
}

fn print_latency(d: &Disruptor<'_>, rows: &[outbox_relay::store::PublishedRow], seen: &[outbox_relay::verify::Seen]) {
    let latency = report::Latency::new(seen);
    // The 15 s before the first disruption window (start-up and the first
    // kills are behind by then).
    let first = d.windows.values().map(|w| w.0).min().unwrap_or(i64::MAX);
    let calm = latency.of(rows, first - 15_000, first);
    println!("  latency, row created → sent by a relay (first copy, ms): p50 / p99 / max");
    println!(
        "    {:<46} {:>8.0} / {:>8.0} / {:>8.0}   ({} events)",
        "written in the 15 s before (kills only)", calm.p50, calm.p99, calm.max, calm.n
    );
    for (label, (from, to)) in &d.windows {
        let q = latency.of(rows, *from, if *to == 0 { i64::MAX } else { *to });
        let secs = if *to > 0 { (to - from) as f64 / 1000.0 } else { 0.0 };
        println!(
            "    {:<46} {:>8.0} / {:>8.0} / {:>8.0}   ({} events, {secs:.0} s)",
            format!("written while {label}"),
            q.p50,
            q.p99,
            q.max,
            q.n
        );
    }
}

/// Enough to find the lost events again: `outbox-relay verify` lists them, and
/// the batch they went out in (same published_at) tells which relay and when.
async fn print_lost(db: &tokio_postgres::Client, run: &str, ids: &[Uuid]) {
    println!("  lost events (first {}), with the transaction that published them:", ids.len());
    let lost = db
        .query(
            &format!(
                "SELECT id::text, seq, topic, coalesce(key, ''), created_at::text, published_at::text, \
                        (SELECT count(*) FROM public.{run} b WHERE b.published_at = o.published_at) \
                 FROM public.{run} o WHERE id = ANY($1) ORDER BY seq"
            ),
            &[&ids],
        )
        .await
        .unwrap_or_default();
    for r in lost {
        println!(
            "    {} seq {} {} key {} created {} published {} (batch of {})",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4),
            r.get::<_, String>(5),
            r.get::<_, i64>(6)
        );
    }
}
