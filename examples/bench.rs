//! The benchmark behind `scripts/bench`, on the real local Postgres and Kafka:
//!
//! 1. saturation: preload N 1 KB JSON events over 1k keys and 4 topics, then time
//!    one relay draining them (`on_publish` = delete and mark), with its CPU
//!    seconds and peak RSS;
//! 2. the ceilings in the same run: SQL-only (a stored procedure that claims and
//!    deletes/marks the same kind of rows in the same batches, without Kafka)
//!    and Kafka-only (the relay's producer settings, the same messages, without
//!    Postgres);
//! 3. latency at a fixed offered rate (writers inserting in small transactions):
//!    commit → Kafka append (≈ ack; topics use LogAppendTime) and commit →
//!    consumer-visible, p50/p99/p99.9, from a timestamp written in the row.
//!
//! Each part runs for `relay.delivery` = at-least-once and exactly-once (skip the
//! latter with `--no-exactly-once`).
//!
//! Prints a table and writes JSON (bench/results/<date>.json).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use tokio_postgres::NoTls;
use uuid::Uuid;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Events preloaded for each saturation run.
    #[arg(long, default_value_t = 200_000)]
    events: i64,
    /// Offered rates for the latency runs (events/s).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    rates: Vec<u64>,
    /// Seconds per latency run.
    #[arg(long, default_value_t = 60)]
    latency_secs: u64,
    /// Relay batch size.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Extra relay settings, KEY=VALUE (OUTBOX_RELAY__… names), repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// librdkafka producer properties for the relay (`[kafka.properties]`),
    /// NAME=VALUE, repeatable, e.g. --kafka-prop linger.ms=1.
    #[arg(long = "kafka-prop", value_name = "NAME=VALUE")]
    kafka_props: Vec<String>,
    /// Skip the saturation or latency parts.
    #[arg(long)]
    no_saturation: bool,
    #[arg(long)]
    no_latency: bool,
    /// Skip the exactly-once runs (relay.delivery = "exactly-once").
    #[arg(long)]
    no_exactly_once: bool,
    #[arg(long, default_value = "target/release/outbox-relay")]
    relay_bin: PathBuf,
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

const TOPICS: [&str; 4] = ["orders", "payments", "stock", "shipping"];
const PAD: usize = 960; // payload ≈ 1 KB of JSON

#[derive(Debug, Serialize, Clone)]
struct Saturation {
    mode: String,
    delivery: String,
    events: i64,
    seconds: f64,
    events_per_s: f64,
    sql_ceiling_events_per_s: f64,
    fraction_of_ceiling: f64,
    kafka_ceiling_events_per_s: f64,
    fraction_of_kafka_ceiling: f64,
    /// The relay's own Postgres work, no Kafka: `Store::claim` (fence included)
    /// and `Claimed::finish`, pipelined on two connections like the relay, rows
    /// shipped to a client. What any relay built on these queries could reach
    /// with an infinitely fast Kafka.
    store_path_events_per_s: f64,
    store_path_fraction_of_sql_ceiling: f64,
    /// Share of all cores busy (any process) while the relay drained.
    machine_cpu_busy: f64,
    /// Machine CPU seconds per million events of each ceiling run (Kafka-only:
    /// without the producing client's own CPU).
    sql_ceiling_machine_cpu_s_per_million: f64,
    kafka_ceiling_machine_cpu_s_per_million: f64,
    /// What this machine's cores could relay if the work per event measured by
    /// the two ceilings (Postgres, Kafka) plus the relay's own CPU were all that
    /// ran, perfectly overlapped. An upper bound: it leaves out Postgres sending
    /// the rows to a client, which the SQL-only run never does.
    two_core_bound_events_per_s: f64,
    relay_cpu_s_per_million: f64,
    relay_peak_rss_mib: f64,
}

#[derive(Debug, Serialize, Clone)]
struct Latency {
    delivery: String,
    offered_per_s: u64,
    achieved_per_s: f64,
    seconds: u64,
    samples: usize,
    commit_to_ack_ms: Quantiles,
    commit_to_visible_ms: Quantiles,
}

#[derive(Debug, Serialize, Clone, Default)]
struct Quantiles {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn quantiles(mut v: Vec<f64>) -> Quantiles {
    if v.is_empty() {
        return Quantiles::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    Quantiles { p50: q(0.50), p99: q(0.99), p999: q(0.999), max: v[v.len() - 1] }
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

struct Env {
    pg_url: String,
    brokers: String,
    args: Args,
}

impl Env {
    fn relay_cmd(&self, table: &str, mode: &str) -> Command {
        self.relay_cmd_with(table, mode, false)
    }

    fn relay_cmd_with(&self, table: &str, mode: &str, exactly_once: bool) -> Command {
        let mut cmd = Command::new(&self.args.relay_bin);
        if exactly_once {
            cmd.env("OUTBOX_RELAY__RELAY__DELIVERY", "exactly-once").env("OUTBOX_RELAY__RELAY__ID", table);
        }
        cmd.env("OUTBOX_RELAY__POSTGRES__URL", &self.pg_url)
            .env("OUTBOX_RELAY__KAFKA__BROKERS", &self.brokers)
            .env("OUTBOX_RELAY__OUTBOX__TABLE", table)
            .env("OUTBOX_RELAY__HTTP__LISTEN", "")
            .env("OUTBOX_RELAY__RELAY__ON_PUBLISH", mode)
            .env("OUTBOX_RELAY__RELAY__BATCH_SIZE", self.args.batch_size.to_string())
            .env("OUTBOX_RELAY__LOG__LEVEL", "warn");
        for kv in &self.args.set {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        if !self.args.kafka_props.is_empty() {
            let mut toml = String::from("[kafka.properties]\n");
            for kv in &self.args.kafka_props {
                if let Some((k, v)) = kv.split_once('=') {
                    toml.push_str(&format!("{k:?} = {v:?}\n"));
                }
            }
            let path = std::env::temp_dir().join(format!("outbox-relay-bench-{}.toml", std::process::id()));
            std::fs::write(&path, toml).expect("write bench relay config");
            cmd.arg("--config").arg(path);
        }
        cmd
    }

    async fn db(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.pg_url, NoTls).await.expect("connect to Postgres");
        tokio::spawn(conn);
        c
    }

    async fn new_table(&self, prefix: &str) -> String {
        let table = format!("bench_{prefix}_{}", &Uuid::new_v4().simple().to_string()[..8]);
        let out = self.relay_cmd(&table, "delete").arg("migrate").output().expect("migrate");
        assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
        table
    }

    async fn topics(&self, run: &str, append_time: bool) -> Vec<String> {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create().expect("admin");
        let topics: Vec<String> = TOPICS.iter().map(|t| format!("{run}.{t}")).collect();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| {
                let n = NewTopic::new(t, 4, TopicReplication::Fixed(1));
                if append_time {
                    n.set("message.timestamp.type", "LogAppendTime")
                } else {
                    n
                }
            })
            .collect();
        admin.create_topics(&new, &AdminOptions::new()).await.expect("create topics");
        topics
    }

    /// N rows of ≈1 KB JSON over 1k keys and 4 topics, server-side in parallel
    /// chunks (the load must not be what is measured).
    async fn preload(&self, table: &str, run: &str, n: i64) {
        let chunks = 4;
        let per = n / chunks;
        let mut tasks = Vec::new();
        for c in 0..chunks {
            let (url, table, run) = (self.pg_url.clone(), table.to_string(), run.to_string());
            tasks.push(tokio::spawn(async move {
                let (db, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
                tokio::spawn(conn);
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
        self.db().await.batch_execute(&format!("VACUUM ANALYZE public.{table}")).await.expect("vacuum");
    }

    /// The lowest pending seq (None when drained): one index probe, so watching
    /// the relay costs the database next to nothing.
    async fn head(&self, db: &tokio_postgres::Client, table: &str) -> Option<i64> {
        db.query_one(
            &format!("SELECT (SELECT seq FROM public.{table} WHERE published_at IS NULL AND parked_at IS NULL ORDER BY seq LIMIT 1)"),
            &[],
        )
        .await
        .expect("head")
        .get(0)
    }
}

/// Counts failed deliveries of the Kafka-only ceiling run.
struct CountFailures(AtomicU64);

impl rdkafka::ClientContext for CountFailures {}

impl rdkafka::producer::ProducerContext for CountFailures {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if r.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The Kafka-only ceiling: the relay's own producer settings
/// (`producer_config`), the same 1 KB payloads, keys and topics, every message
/// acknowledged — and no Postgres. Blocking.
fn kafka_ceiling(env: &Env, topics: &[String], n: i64) -> (f64, f64) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let settings = outbox_relay::config::Settings::load_from(
        None,
        vec![
            ("OUTBOX_RELAY__POSTGRES__URL".to_string(), env.pg_url.clone()),
            ("OUTBOX_RELAY__KAFKA__BROKERS".to_string(), env.brokers.clone()),
        ],
    )
    .expect("settings");
    let mut cfg = ClientConfig::new();
    for (k, v) in outbox_relay::sink::producer_config(&settings, None) {
        cfg.set(k, v);
    }
    for kv in &env.args.kafka_props {
        if let Some((k, v)) = kv.split_once('=') {
            cfg.set(k, v);
        }
    }
    let producer: BaseProducer<CountFailures> =
        cfg.create_with_context(CountFailures(AtomicU64::new(0))).expect("producer");
    // Built before the clock starts: generating load is not what is measured.
    let pad = "x".repeat(PAD);
    let payloads: Vec<String> =
        (0..1000).map(|i| format!(r#"{{"i": {i}, "pad": "{pad}", "type": "OrderPlaced"}}"#)).collect();
    let keys: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
    let me = std::process::id();
    let (t, busy0, own0) = (Instant::now(), machine_busy_s(), proc_cpu_s(me));
    for i in 0..n {
        let j = (i % 1000) as usize;
        let mut record = BaseRecord::to(&topics[(i % 4) as usize]).key(&keys[j]).payload(&payloads[j]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    r,
                )) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => panic!("kafka ceiling: produce failed: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(300)).expect("flush");
    let rate = n as f64 / t.elapsed().as_secs_f64();
    // The broker's side only: the producing client's CPU (this process) is left
    // out, because the relay's own CPU, which includes its producer, is counted
    // separately in the bound.
    let busy = (machine_busy_s() - busy0) - (proc_cpu_s(me) - own0);
    let failed = producer.context().0.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "kafka ceiling: {failed} deliveries failed");
    (rate, busy / n as f64 * 1e6)
}

/// Busy CPU seconds of the whole machine so far (all processes: Postgres,
/// Kafka, relay, this bench), from /proc/stat.
fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let f: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum::<f64>();
    busy / 100.0
}

fn proc_cpu_s(pid: u32) -> f64 {
    // utime + stime (fields 14, 15) in clock ticks (100/s on Linux)
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

fn proc_peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

fn cores() -> f64 {
    std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0)
}

fn delivery(exactly_once: bool) -> String {
    if exactly_once { "exactly-once" } else { "at-least-once" }.into()
}

/// The store-path ceiling (see `Saturation::store_path_events_per_s`) for `mode`.
async fn store_path_ceiling(env: &Env, mode: &str) -> f64 {
    use outbox_relay::store::{Claimed, Outcome, Store};
    let n = env.args.events;
    let table = env.new_table("store").await;
    env.preload(&table, "store", n).await;
    let settings = outbox_relay::config::Settings::load_from(
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
    let store = Store::new(&settings).expect("store");
    let batch = env.args.batch_size;
    let finish = |c: Option<Claimed>| async move {
        if let Some(c) = c {
            let outcomes: Vec<Outcome> = c.events.iter().map(|_| Outcome::Delivered).collect();
            c.finish(&outcomes, 10).await.expect("finish");
        }
    };
    let t = Instant::now();
    let mut in_flight: Option<Claimed> = None;
    loop {
        // Like the relay: claim batch N+1 while batch N is recorded.
        let own: Vec<Uuid> = in_flight.iter().flat_map(|c| c.events.iter().map(|e| e.id)).collect();
        let (next, ()) = tokio::join!(store.claim(batch, &own), finish(in_flight.take()));
        match next.expect("claim") {
            Some(c) => in_flight = Some(c),
            None => break,
        }
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let db = env.db().await;
    let left: i64 = db
        .query_one(&format!("SELECT count(*) FROM public.{table} WHERE published_at IS NULL"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(left, 0, "store-path run left rows pending");
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    rate
}

async fn saturation(env: &Env, mode: &str, exactly_once: bool, kafka: (f64, f64), store_path: f64) -> Saturation {
    let (kafka_ceiling, kafka_cpu) = kafka;
    let n = env.args.events;
    // SQL-only ceiling: same rows, same claim, same batch, no Kafka.
    let ceiling_table = env.new_table("sql").await;
    env.preload(&ceiling_table, "sql", n).await;
    let db = env.db().await;
    let action = if mode == "delete" {
        format!("DELETE FROM public.{ceiling_table} o USING c WHERE o.id = c.id")
    } else {
        format!("UPDATE public.{ceiling_table} o SET published_at = now() FROM c WHERE o.id = c.id")
    };
    db.batch_execute(&format!(
        "CREATE OR REPLACE PROCEDURE public.{ceiling_table}_drain(batch int) LANGUAGE plpgsql AS $$
         DECLARE n int;
         BEGIN
           LOOP
             WITH c AS (
               SELECT id FROM public.{ceiling_table}
               WHERE published_at IS NULL AND parked_at IS NULL
                 AND (retry_at IS NULL OR retry_at <= now())
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
    let (t, busy0) = (Instant::now(), machine_busy_s());
    db.execute(&format!("CALL public.{ceiling_table}_drain($1)"), &[&(env.args.batch_size as i32)])
        .await
        .expect("call");
    let ceiling = n as f64 / t.elapsed().as_secs_f64();
    let sql_cpu = (machine_busy_s() - busy0) / n as f64 * 1e6;
    db.batch_execute(&format!("DROP TABLE public.{ceiling_table}; DROP PROCEDURE public.{ceiling_table}_drain"))
        .await
        .ok();

    // The relay on an identical table.
    let table = env.new_table(mode).await;
    let run = table.clone();
    env.topics(&run, false).await;
    env.preload(&table, &run, n).await;
    let child = env
        .relay_cmd_with(&table, mode, exactly_once)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("relay");
    let pid = child.id();
    // Start the clock at the first finished batch (start-up is not throughput).
    let first = env.head(&db, &table).await.expect("preloaded");
    let (mut t0, mut p0, mut busy0) = (None, n, machine_busy_s());
    let deadline = Instant::now() + Duration::from_secs(600);
    let (t_end, busy_end) = loop {
        let head = env.head(&db, &table).await;
        if t0.is_none() && head != Some(first) {
            t0 = Some(Instant::now());
            busy0 = machine_busy_s();
            // rows still to go from here (seq is dense in a preloaded table)
            p0 = head.map(|h| n - (h - first)).unwrap_or(0);
        }
        if head.is_none() {
            break (Instant::now(), machine_busy_s());
        }
        assert!(Instant::now() < deadline, "relay did not drain {n} events in 10 minutes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cpu = proc_cpu_s(pid);
    let rss = proc_peak_rss_mib(pid);
    stop(child);
    let t0 = t0.unwrap_or(t_end);
    let secs = (t_end - t0).as_secs_f64().max(1e-3);
    let rate = p0 as f64 / secs;
    db.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    Saturation {
        mode: mode.into(),
        delivery: delivery(exactly_once),
        events: n,
        seconds: secs,
        events_per_s: rate,
        sql_ceiling_events_per_s: ceiling,
        fraction_of_ceiling: rate / ceiling,
        kafka_ceiling_events_per_s: kafka_ceiling,
        fraction_of_kafka_ceiling: rate / kafka_ceiling,
        store_path_events_per_s: store_path,
        store_path_fraction_of_sql_ceiling: store_path / ceiling,
        machine_cpu_busy: (busy_end - busy0) / secs / cores(),
        sql_ceiling_machine_cpu_s_per_million: sql_cpu,
        kafka_ceiling_machine_cpu_s_per_million: kafka_cpu,
        two_core_bound_events_per_s: cores() / ((sql_cpu + kafka_cpu + cpu / n as f64 * 1e6) / 1e6),
        relay_cpu_s_per_million: cpu / n as f64 * 1e6,
        relay_peak_rss_mib: rss,
    }
}

async fn latency(env: &Env, rate: u64, exactly_once: bool) -> Latency {
    let table = env.new_table("lat").await;
    let run = table.clone();
    let topics = env.topics(&run, true).await;
    let child = env
        .relay_cmd_with(&table, "mark", exactly_once)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("relay");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Consumer: from the current end, until the writers are done and all arrived.
    let done = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    let consumer = {
        let (brokers, topics, done, expected, ready) =
            (env.brokers.clone(), topics.clone(), done.clone(), expected.clone(), ready.clone());
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", format!("bench-{}", Uuid::new_v4()))
                .set("enable.auto.commit", "false")
                .set("isolation.level", "read_committed")
                .set("fetch.wait.max.ms", "5")
                .set("fetch.min.bytes", "1")
                .create()
                .expect("consumer");
            let mut tpl = TopicPartitionList::new();
            for t in &topics {
                for p in 0..4 {
                    tpl.add_partition_offset(t, p, Offset::Beginning).expect("tpl");
                }
            }
            c.assign(&tpl).expect("assign");
            // Connected and fetching before the writers start: otherwise the
            // consumer's own start-up shows up as latency of the first events.
            let warm = Instant::now();
            while warm.elapsed() < Duration::from_secs(2) {
                let _ = c.poll(Duration::from_millis(50));
            }
            ready.store(true, Ordering::Relaxed);
            let (mut ack, mut vis) = (Vec::new(), Vec::new());
            let mut last = Instant::now();
            loop {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(50)) {
                    let recv = now_us();
                    last = Instant::now();
                    let ts = m
                        .payload()
                        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                        .and_then(|v| v["ts_us"].as_i64());
                    if let Some(ts) = ts {
                        vis.push((recv - ts) as f64 / 1000.0);
                        if let Timestamp::LogAppendTime(ms) = m.timestamp() {
                            ack.push((ms * 1000 - ts) as f64 / 1000.0);
                        }
                    }
                }
                let target = expected.load(Ordering::Relaxed);
                if done.load(Ordering::Relaxed)
                    && (vis.len() as u64 >= target || last.elapsed() > Duration::from_secs(20))
                {
                    return (ack, vis);
                }
            }
        })
    };

    // Writers: 4 connections, 10 events per transaction, paced to the offered rate.
    let writers = 4u64;
    let per_tx = 10u64;
    let tx_per_writer_per_s = rate as f64 / per_tx as f64 / writers as f64;
    let secs = env.args.latency_secs;
    let written = Arc::new(AtomicU64::new(0));
    while !ready.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (url, table, run, written) = (env.pg_url.clone(), table.clone(), run.clone(), written.clone());
        tasks.push(tokio::spawn(async move {
            let (mut db, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
            tokio::spawn(conn);
            let stmt = format!(
                "INSERT INTO public.{table} (topic, key, payload)
                 SELECT '{run}.' || (ARRAY['orders','payments','stock','shipping'])[1 + (($1::bigint + i) % 4)],
                        'key-' || (($1::bigint * 7 + i * 13 + {w}) % 1000),
                        jsonb_build_object('ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::int8,
                                           'pad', repeat('x', {PAD}))
                 FROM generate_series(1, {per_tx}) i"
            );
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < Duration::from_secs(secs) {
                let tx = db.transaction().await.expect("tx");
                tx.execute(&stmt, &[&((n * writers + w) as i64)]).await.expect("insert");
                tx.commit().await.expect("commit");
                n += 1;
                written.fetch_add(per_tx, Ordering::Relaxed);
                let due = Duration::from_secs_f64(n as f64 / tx_per_writer_per_s);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let elapsed = started.elapsed().as_secs_f64();
    expected.store(written.load(Ordering::Relaxed), Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    let (ack, vis) = consumer.join().expect("consumer thread");
    stop(child);
    env.db().await.batch_execute(&format!("DROP TABLE public.{table}")).await.ok();
    Latency {
        delivery: delivery(exactly_once),
        offered_per_s: rate,
        achieved_per_s: written.load(Ordering::Relaxed) as f64 / elapsed,
        seconds: secs,
        samples: vis.len(),
        commit_to_ack_ms: quantiles(ack),
        commit_to_visible_ms: quantiles(vis),
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let env = Env {
        pg_url: std::env::var("OUTBOX_RELAY__POSTGRES__URL")
            .expect("OUTBOX_RELAY__POSTGRES__URL (run via scripts/bench)"),
        brokers: std::env::var("OUTBOX_RELAY__KAFKA__BROKERS").expect("OUTBOX_RELAY__KAFKA__BROKERS"),
        args: args.clone(),
    };
    let mut sat = Vec::new();
    if !args.no_saturation {
        let mut runs = vec![("delete", false), ("mark", false)];
        if !args.no_exactly_once {
            runs.extend([("delete", true), ("mark", true)]);
        }
        eprintln!("bench: Kafka-only ceiling, {} events…", args.events);
        let kafka_topics =
            env.topics(&format!("bench_kafka_{}", &Uuid::new_v4().simple().to_string()[..8]), false).await;
        let kafka = tokio::task::block_in_place(|| kafka_ceiling(&env, &kafka_topics, args.events));
        let mut store_path = std::collections::HashMap::new();
        for mode in ["delete", "mark"] {
            eprintln!("bench: store-path ceiling (the relay's Postgres work, no Kafka), on_publish = {mode}…");
            store_path.insert(mode, store_path_ceiling(&env, mode).await);
        }
        for (mode, eos) in runs {
            eprintln!("bench: saturation, on_publish = {mode}, {}, {} events…", delivery(eos), args.events);
            sat.push(saturation(&env, mode, eos, kafka, store_path[mode]).await);
        }
    }
    let mut lat = Vec::new();
    if !args.no_latency {
        let eos_runs: &[bool] = if args.no_exactly_once { &[false] } else { &[false, true] };
        for &eos in eos_runs {
            for &rate in &args.rates {
                eprintln!("bench: latency at {rate} events/s, {}, for {} s…", delivery(eos), args.latency_secs);
                lat.push(latency(&env, rate, eos).await);
            }
        }
    }

    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!();
    println!(
        "outbox-relay benchmark — {cores} cores ({host}), batch_size {}, settings {:?}, kafka properties {:?}",
        args.batch_size, args.set, args.kafka_props
    );
    if !sat.is_empty() {
        println!();
        println!("saturation ({} × 1 KB JSON events, 1k keys, 4 topics)", args.events);
        println!(
            "  mode    │ delivery      │ relay ev/s │ SQL-only ev/s │ fraction │ Kafka-only ev/s │ fraction │ CPU s / 1M ev │ peak RSS MiB"
        );
        for s in &sat {
            println!(
                "  {:<7} │ {:<13} │ {:>10.0} │ {:>13.0} │ {:>7.0}% │ {:>15.0} │ {:>7.0}% │ {:>13.1} │ {:>12.1}",
                s.mode,
                s.delivery,
                s.events_per_s,
                s.sql_ceiling_events_per_s,
                s.fraction_of_ceiling * 100.0,
                s.kafka_ceiling_events_per_s,
                s.fraction_of_kafka_ceiling * 100.0,
                s.relay_cpu_s_per_million,
                s.relay_peak_rss_mib
            );
        }
        println!();
        println!("  the relay's own Postgres work without Kafka (Store::claim with the per-key fence + finish, pipelined on two connections)");
        println!("  mode    │ store-path ev/s │ of SQL-only │ relay / store-path");
        for s in sat.iter().filter(|s| s.delivery == delivery(false)) {
            println!(
                "  {:<7} │ {:>15.0} │ {:>10.0}% │ {:>17.0}%",
                s.mode,
                s.store_path_events_per_s,
                s.store_path_fraction_of_sql_ceiling * 100.0,
                s.events_per_s / s.store_path_events_per_s * 100.0
            );
        }
        println!();
        println!("  the machine (all processes) — what bounds the relay here");
        println!("  mode    │ delivery      │ cores busy while draining │ CPU-s/1M ev: SQL-only │ Kafka broker │ {cores}-core bound ev/s │ relay / bound");
        println!(
            "  (bound = cores / (SQL-only + Kafka broker side + relay CPU per event): the machine's limit if nothing waited)"
        );
        for s in &sat {
            println!(
                "  {:<7} │ {:<13} │ {:>24.0}% │ {:>21.1} │ {:>12.1} │ {:>18.0} │ {:>12.0}%",
                s.mode,
                s.delivery,
                s.machine_cpu_busy * 100.0,
                s.sql_ceiling_machine_cpu_s_per_million,
                s.kafka_ceiling_machine_cpu_s_per_million,
                s.two_core_bound_events_per_s,
                s.events_per_s / s.two_core_bound_events_per_s * 100.0
            );
        }
    }
    if !lat.is_empty() {
        println!();
        println!("latency at a fixed offered rate (on_publish = mark; ms; commit→ack = broker LogAppendTime, 1 ms resolution)");
        println!(
            "  delivery      │ offered/s │ achieved/s │ samples │ commit→ack p50 / p99 / p99.9 │ commit→visible p50 / p99 / p99.9"
        );
        for l in &lat {
            println!(
                "  {:<13} │ {:>9} │ {:>10.0} │ {:>7} │ {:>8.1} / {:>6.1} / {:>7.1}   │ {:>10.1} / {:>6.1} / {:>7.1}",
                l.delivery,
                l.offered_per_s,
                l.achieved_per_s,
                l.samples,
                l.commit_to_ack_ms.p50,
                l.commit_to_ack_ms.p99,
                l.commit_to_ack_ms.p999,
                l.commit_to_visible_ms.p50,
                l.commit_to_visible_ms.p99,
                l.commit_to_visible_ms.p999
            );
        }
    }
    std::fs::create_dir_all(&args.out_dir).ok();
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "-");
    let path = args.out_dir.join(format!("{stamp}.json"));
    let json = serde_json::json!({
        "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "cores": cores, "cpu": host, "batch_size": args.batch_size, "settings": args.set, "kafka_properties": args.kafka_props,
        "saturation": sat, "latency": lat,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default()).expect("write results");
    println!();
    println!("results: {}", path.display());
}
