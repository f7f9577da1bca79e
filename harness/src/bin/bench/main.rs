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
//!   event next to what the inserts cost; and the hand-written poller of issue
//!   #25 (`bench/poller.py`) on the same backlog, for goal 5's ratios.
//! * `churn` — a drain right after a large delete burst, no VACUUM.
//! * `retained` — mark mode into a table holding ≥ 1M retained published rows.
//! * `sustained` — writers and relay together: the highest offered rate the
//!   relay keeps up with.
//! * `horizon` — writers at 2k ev/s while a REPEATABLE READ transaction holds
//!   the horizon for 5 minutes: a latency table per 10 s window.
//! * `hotkey` — 3 relays, one key with a 10k backlog, other keys at 1k ev/s;
//!   then one relay's claim cost with no hot key and with a held hot key's 10k
//!   and 100k backlog.
//! * `delayed` — one relay's claim cost with no events waiting for their
//!   `deliver_after`, then with 100k and 1M of them a day ahead; other keys at
//!   1k ev/s.
//! * `outage` — the application writes at 1k ev/s while Kafka is down for 10
//!   minutes; catch-up time and rate against a fresh table, the application's
//!   commits before, during and after, the table afterwards.
//!
//! * `compare` — only with `--before-bin PATH`: the not-vacuumed drains and
//!   the latency runs with that earlier binary and with this build,
//!   alternating, `--compare-rounds` times; medians and their ratio.
//!
//! Prints each table as it completes and writes everything to bench/results/.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use outbox_relay_support::*;

mod app_cost;
mod ceilings;
mod compare;
mod delayed;
mod drain;
mod env;
mod horizon;
mod hotkey;
mod idle;
mod latency;
mod outage;
mod poller;
mod relay_cost;
mod sustained;

use app_cost::*;
use ceilings::*;
use compare::*;
use delayed::*;
use drain::*;
pub(crate) use env::*;
use horizon::*;
use hotkey::*;
use idle::*;
use latency::*;
use outage::*;
use poller::*;
use relay_cost::*;
use serde::Serialize;
use serde_json::json;
use sustained::*;

#[derive(Parser, Debug, Clone)]
#[command(about = "outbox-relay benchmark (see the module docs or docs/performance.md)")]
struct Args {
    /// Sections to run, comma separated (default: all): app-cost, idle, latency, compare,
    /// relay-cost, drain, churn, retained, sustained, horizon, hotkey, delayed, outage (and
    /// `ceilings`: only the SQL-only and store-path ceilings that `drain` includes;
    /// `poller`: only the hand-written poller's drain that `drain` includes;
    /// `drain-diag`: drains with and without VACUUM, ANALYZE and autovacuum).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(SECTIONS))]
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
    /// Batch size for the drains: the relay's (`relay.batch_size`; the other
    /// sections run at its default), the hand-written poller's and the
    /// SQL-only and store-path ceilings'.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Seconds Kafka stays down in the outage section.
    #[arg(long, default_value_t = 600)]
    outage_secs: u64,
    /// Events/s the application writes in the outage section.
    #[arg(long, default_value_t = 1000)]
    outage_rate: u64,
    /// Skip the exactly-once runs.
    #[arg(long)]
    no_exactly_once: bool,
    /// An earlier `outbox-relay` binary: the `compare` section runs the drains
    /// and latency runs with it and with this build, alternating.
    #[arg(long, value_name = "PATH")]
    before_bin: Option<PathBuf>,
    /// Rounds of the `compare` section (each runs every configuration with both binaries).
    #[arg(long, default_value_t = 2)]
    compare_rounds: usize,
    /// `compare` runs only the configurations whose name contains one of
    /// these, separated by `|` (e.g. "mark, exactly-once|latency").
    #[arg(long, value_name = "TEXT", value_delimiter = '|')]
    compare_only: Vec<String>,
    /// Relay settings for the "before" side of `compare` only, KEY=VALUE
    /// (with `--before-bin` naming this build: a knob against its default).
    #[arg(long = "before-set", value_name = "KEY=VALUE")]
    before_set: Vec<String>,
    /// Extra relay settings, KEY=VALUE (OUTBOX_RELAY__… names), repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// Check the arguments and exit (scripts/bench does, before it starts
    /// any infrastructure).
    #[arg(long, hide = true)]
    check_args: bool,
}

/// What `--only` takes.
const SECTIONS: [&str; 16] = [
    "app-cost",
    "idle",
    "latency",
    "compare",
    "relay-cost",
    "drain",
    "churn",
    "retained",
    "sustained",
    "horizon",
    "hotkey",
    "delayed",
    "outage",
    "ceilings",
    "poller",
    "drain-diag",
];

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

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.check_args {
        return;
    }
    // Nothing else may use or stop the infrastructure meanwhile (tests
    // included): the figures would be spoilt, and the outage section stops Kafka.
    let _lock = InfraLock::exclusive(&[Resource::Postgres, Resource::Kafka]).await;
    let env = Env::from_infra();
    let (cores, cpu) = host();
    let mut report = serde_json::Map::new();
    if args.runs("app-cost") {
        let r = app_cost(&env, &args).await;
        report.insert("app_cost".into(), json!(r));
    }
    if args.runs("relay-cost") {
        let r = relay_cost(&env, &args).await;
        print_relay_cost(&r);
        report.insert("relay_cost".into(), json!(r));
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
    if let Some(before) = args.before_bin.as_deref().filter(|_| args.runs("compare")) {
        let r = compare(&env, &args, before).await;
        report.insert("compare".into(), json!({ "before_bin": before, "runs": r }));
    }
    drain_sections(&env, &args, &mut report).await;
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
        say("hotkey: claim cost with no hot key, and with a held hot key's 10k and 100k backlog…");
        let mut costs = Vec::new();
        for backlog in [0, 10_000, 100_000] {
            costs.push(hotkey_claim_cost(&env, &args, backlog).await);
        }
        println!();
        print_claim_cost(&costs);
        report.insert("hotkey_claim_cost".into(), json!(costs));
    }
    if args.runs("delayed") {
        let mut rows = Vec::new();
        for future in [0, 100_000, 1_000_000] {
            say(format!("delayed: claim cost with {future} events waiting a day ahead…"));
            rows.push(delayed_claim_cost(&env, &args, future).await);
        }
        println!();
        print_delayed(&rows);
        report.insert("delayed".into(), json!(rows));
    }
    if args.runs("outage") {
        let o = outage(&env, &args).await;
        print_outage(&o);
        report.insert("outage".into(), json!(o));
    }
    report.insert("date".into(), json!(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()));
    report.insert("cores".into(), json!(cores));
    report.insert("cpu".into(), json!(cpu));
    report.insert("args".into(), json!(format!("{args:?}")));
    let path = save(&args.out_dir, &serde_json::Value::Object(report));
    println!();
    println!("host: {cores} cores ({cpu}); results: {}", path.display());
}

/// The sections that drain a preloaded backlog (`drain`, `drain-diag`, the
/// ceilings, the hand-written poller, `churn`, `retained`), printed as one
/// drains table.
async fn drain_sections(env: &Env, args: &Args, report: &mut serde_json::Map<String, serde_json::Value>) {
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
            drains.push(drain_run(env, args, scenario, mode, delivery).await);
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
            drains.push(drain_run(env, args, scenario, "delete", "at-least-once").await);
        }
    }
    let mut sql_only_delete = None;
    if args.runs("drain") || args.only.iter().any(|s| s == "ceilings") {
        let mut ceilings = Vec::new();
        for mode in ["delete", "mark"] {
            say(format!("drain: SQL-only and store-path ceilings, {mode}…"));
            let sql = sql_only(env, args, mode).await;
            let store = store_path(env, args, mode).await;
            if mode == "delete" {
                sql_only_delete = Some(sql);
            }
            ceilings.push(Ceilings {
                mode: mode.into(),
                sql_only_events_per_s: sql,
                store_path_events_per_s: store,
                store_path_fraction: store / sql,
            });
        }
        print_ceilings(&ceilings, args.batch_size);
        report.insert("ceilings".into(), json!(ceilings));
    }
    if args.runs("drain") || args.only.iter().any(|s| s == "poller") {
        let g = Goal5 {
            events: args.events,
            batch_size: args.batch_size,
            poller_events_per_s: poller_drain(env, args).await,
            relay_events_per_s: drains
                .iter()
                .find(|d| d.scenario == "not vacuumed" && d.mode == "delete" && d.delivery == "at-least-once")
                .map(|d| d.events_per_s),
            sql_only_events_per_s: sql_only_delete,
        };
        print_goal5(&g);
        report.insert("goal5".into(), json!(g));
    }
    if args.runs("churn") {
        drains.push(drain_run(env, args, "churned", "delete", "at-least-once").await);
        if !args.runs("drain") {
            drains.push(drain_run(env, args, "vacuumed", "delete", "at-least-once").await);
        }
    }
    if args.runs("retained") {
        drains.push(retained_run(env, args).await);
        if !args.runs("drain") {
            drains.push(drain_run(env, args, "vacuumed", "mark", "at-least-once").await);
        }
    }
    if !drains.is_empty() {
        print_drains(&drains, args.batch_size);
        report.insert("drains".into(), json!(drains));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--only drian` ran no section and printed nothing, after starting and
    /// cleaning the infrastructure.
    #[test]
    fn a_mistyped_section_is_refused_by_name() {
        let err = Args::try_parse_from(["bench", "--only", "drain,drian"]).unwrap_err();
        assert!(err.to_string().contains("drian"), "{err}");
        let args = Args::try_parse_from(["bench", "--only", "drain,ceilings,poller", "--check-args"]).unwrap();
        assert!(args.check_args && args.runs("drain") && !args.runs("latency"));
    }

    /// Every `--only …` the performance docs show is taken (`drain-diag` is
    /// handled apart from `runs`, and was nearly left out of the list).
    #[test]
    fn every_only_the_docs_show_is_taken() {
        let docs = include_str!("../../../../docs/performance.md");
        let mut seen = 0;
        for (_, rest) in docs.match_indices("--only ").map(|(i, _)| docs.split_at(i + "--only ".len())) {
            let list: String = rest.chars().take_while(|c| c.is_ascii_lowercase() || *c == '-' || *c == ',').collect();
            if list.is_empty() {
                continue;
            }
            seen += 1;
            if let Err(e) = Args::try_parse_from(["bench", "--only", &list]) {
                panic!("docs/performance.md shows `--only {list}`: {e}");
            }
        }
        assert!(seen >= 10, "found {seen} `--only` examples in docs/performance.md");
    }
}
