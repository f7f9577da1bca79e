//! The chaos run behind `scripts/chaos`: on the real local Postgres and Kafka, an
//! application writes continuously while several relays run, and everything a
//! production database and Kafka cluster do to a relay happens to them:
//!
//! * relays SIGKILLed at random moments and restarted (≥ 50 times);
//! * one long-lived relay that is never restarted and is slow (every batch
//!   takes longer), living through every other disruption;
//! * a REPEATABLE READ transaction holding the xmin horizon for a minute;
//! * a relay frozen (SIGSTOP) for 30 s while holding a batch;
//! * a rolling switch of the other relays to the other delivery mode and back,
//!   so both modes share the table for a while;
//! * one broker: Kafka stopped for a minute. `--cluster` (3 brokers, RF 3,
//!   min.insync.replicas 2) instead: the leader of the busiest partition
//!   SIGKILLed three times, a rolling restart of all brokers, the transaction
//!   coordinator SIGKILLed (exactly-once), and two brokers down at once;
//! * PostgreSQL restarted;
//! * every poison class.
//!
//! Then everything is read back (read_committed) and compared with the table.
//! Fails unless lost = 0, per-key order violations = 0, every poison row is
//! parked with the right reason and nothing else is parked, and, in
//! exactly-once mode, there is no duplicate.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use outbox_relay::config::Settings;
use outbox_relay::store::Store;
use outbox_relay::verify::{compare, duplicates_by_disruption, read_topics};
use outbox_relay_harness::{quantiles, Proc, Quantiles};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_postgres::NoTls;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "outbox-relay chaos run (see the module docs)")]
struct Args {
    /// Events the application writes.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Seconds over which they are written (default 250; 480 with --cluster).
    #[arg(long)]
    duration: Option<u64>,
    /// Relay instances running at once (relay 0 is the long-lived, slow one).
    #[arg(long, default_value_t = 3)]
    relays: usize,
    /// Minimum number of SIGKILLs.
    #[arg(long, default_value_t = 50)]
    kills: usize,
    /// Seconds the Kafka broker stays down (one broker).
    #[arg(long, default_value_t = 60)]
    kafka_outage: u64,
    /// Seconds a REPEATABLE READ transaction holds the xmin horizon.
    #[arg(long, default_value_t = 60)]
    hold: u64,
    /// Seconds relay 1 stays frozen (SIGSTOP).
    #[arg(long, default_value_t = 30)]
    freeze: u64,
    /// Rows per relay batch.
    #[arg(long, default_value_t = 200)]
    batch_size: usize,
    /// The relay binary.
    #[arg(long, default_value = "target/release/outbox-relay")]
    relay_bin: PathBuf,
    /// Where relay logs go.
    #[arg(long, default_value = "target/chaos")]
    run_dir: PathBuf,
    /// Run the relays with relay.delivery = "exactly-once"; the run then also
    /// fails on any duplicate.
    #[arg(long)]
    exactly_once: bool,
    /// Against the 3-broker cluster (`scripts/infra up --brokers 3`), with its
    /// broker failures instead of the single broker's outage.
    #[arg(long)]
    cluster: bool,
}

const KEYS: usize = 1000;
const WRITERS: usize = 4;
const TOPICS: [&str; 4] = ["orders", "payments", "stock", "shipping"];
const PARTITIONS: i32 = 6;

/// Something done to the system at a moment: the duplicates an at-least-once
/// relay may produce are blamed on these (see `duplicates_by_disruption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Disruption {
    Kill,
    CrashPoint,
    SelfExit,
    KafkaStop,
    KafkaStart,
    PostgresRestart,
    Freeze,
    ModeSwitch,
    LeaderKill,
    BrokerRestart,
    CoordinatorKill,
    TwoBrokersDown,
}

impl Disruption {
    /// This disruption as a moment, now.
    fn now(self) -> (i64, i64, Disruption) {
        let t = now_ms();
        (t, t, self)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

struct Relays {
    bin: PathBuf,
    env: Vec<(String, String)>,
    config: PathBuf,
    logs: PathBuf,
    children: Vec<Proc>,
    /// The delivery mode each relay runs now (a rolling switch changes it).
    modes: Vec<bool>,
    base_exactly_once: bool,
    kills: usize,
    armed: Vec<bool>,
    failpoint_kills: usize,
    frozen: Option<usize>,
    /// (from, to, what), ms since the epoch: a moment (from = to) or a window.
    disruptions: Vec<(i64, i64, Disruption)>,
}

impl Relays {
    fn spawn(&mut self, i: usize) -> Proc {
        let mut cmd = Command::new(&self.bin);
        let exactly_once = self.modes[i];
        // Relay 0 lives through the whole run and is slow: every batch takes 1 ms
        // longer per event (a relay stalled behind a slow database or host).
        let mut failpoints = Vec::new();
        if i == 0 {
            let point = if exactly_once { "after-kafka-send" } else { "after-send" };
            failpoints.push(format!("{point}=delay-per-event:1"));
        }
        // Exactly-once: half the other starts arm a crash point of the protocol.
        let armed = i > 0 && exactly_once && fastrand::bool();
        if armed {
            let points = outbox_relay::failpoint::POINTS;
            failpoints.push(format!("{}=crash@{}", points[fastrand::usize(0..points.len())], fastrand::u32(1..=4)));
        }
        if !failpoints.is_empty() {
            cmd.env(outbox_relay::failpoint::ENV, failpoints.join(","));
        }
        self.armed[i] = armed;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("relay-{i}.log")))
            .expect("log file");
        cmd.envs(self.env.iter().cloned())
            .env("OUTBOX_RELAY__RELAY__ID", format!("chaos-{i}"))
            .env("OUTBOX_RELAY__RELAY__DELIVERY", if exactly_once { "exactly-once" } else { "at-least-once" })
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        Proc::spawn(cmd)
    }

    /// Relays that may be SIGKILLed now: not relay 0 (long-lived), not the
    /// frozen one, and in an exactly-once run not those switched to
    /// at-least-once (their duplicates would be that mode's, not a failure).
    fn killable(&self) -> Vec<usize> {
        (1..self.children.len())
            .filter(|&i| Some(i) != self.frozen && (!self.base_exactly_once || self.modes[i]))
            .collect()
    }

    fn kill_and_restart(&mut self, i: usize) {
        self.disruptions.push(Disruption::Kill.now());
        let old = std::mem::replace(&mut self.children[i], Proc::placeholder());
        old.kill();
        self.kills += 1;
        self.children[i] = self.spawn(i);
    }

    /// Graceful restart in `exactly_once` mode (a rolling deploy).
    fn switch(&mut self, i: usize, exactly_once: bool) {
        self.disruptions.push(Disruption::ModeSwitch.now());
        let old = std::mem::replace(&mut self.children[i], Proc::placeholder());
        if !old.stop(Duration::from_secs(60)) {
            eprintln!("chaos: relay {i} did not stop cleanly on SIGTERM during the mode switch");
        }
        self.modes[i] = exactly_once;
        self.children[i] = self.spawn(i);
    }

    /// The moment relay `i` last crashed at its failpoint (`at_ms=` of the
    /// failpoint's line in its log).
    fn crash_moment(&self, i: usize) -> Option<i64> {
        let text = std::fs::read_to_string(self.logs.join(format!("relay-{i}.log"))).ok()?;
        let line = text.lines().rev().find(|l| l.starts_with("failpoint "))?;
        line.rsplit_once("at_ms=")?.1.trim().parse().ok()
    }

    /// Restarts any relay that exited by itself (it should not; counted).
    fn revive(&mut self) -> usize {
        let mut revived = 0;
        for i in 0..self.children.len() {
            if let Some(status) = self.children[i].exited() {
                if self.armed[i] && status.code().is_none() {
                    // killed itself at its crash point, as armed
                    self.failpoint_kills += 1;
                    // when it crashed (its log says), not when we noticed: the
                    // loop may have been busy with a step for seconds meanwhile
                    let at = self.crash_moment(i).unwrap_or_else(now_ms);
                    self.disruptions.push((at, at, Disruption::CrashPoint));
                    self.children[i] = self.spawn(i);
                    continue;
                }
                eprintln!("chaos: relay {i} exited by itself ({status}); restarting. Its last log lines:");
                let text = std::fs::read_to_string(self.logs.join(format!("relay-{i}.log"))).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                for l in &lines[lines.len().saturating_sub(3)..] {
                    eprintln!("    {l}");
                }
                self.disruptions.push(Disruption::SelfExit.now());
                self.children[i] = self.spawn(i);
                revived += 1;
            }
        }
        revived
    }
}

fn infra(args: &[&str]) {
    let ok = Command::new("scripts/infra").args(args).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "scripts/infra {} failed", args.join(" "));
}

fn log(started: Instant, msg: impl AsRef<str>) {
    eprintln!("[{:>6.1}s] {}", started.elapsed().as_secs_f64(), msg.as_ref());
}

/// The broker leading partition 0 of the first topic (the writers spread
/// evenly, so every partition is as busy as the others).
fn busiest_leader(brokers: &str, topics: &[String]) -> i32 {
    let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().expect("consumer");
    let md = c.fetch_metadata(Some(&topics[0]), Duration::from_secs(10)).expect("metadata");
    md.topics()[0].partitions().iter().find(|p| p.id() == 0).map(|p| p.leader()).unwrap_or(1)
}

/// The broker coordinating `transactional_id`: the leader of its partition of
/// `__transaction_state` (Java's String.hashCode, as the broker computes it).
fn coordinator(brokers: &str, transactional_id: &str) -> Option<i32> {
    let h = transactional_id.encode_utf16().fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32));
    let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().expect("consumer");
    let md = c.fetch_metadata(Some("__transaction_state"), Duration::from_secs(10)).ok()?;
    let parts = md.topics().first()?.partitions();
    let p = (h & 0x7fff_ffff) % parts.len().max(1) as i32;
    parts.iter().find(|x| x.id() == p).map(|x| x.leader())
}

/// Waits until every partition of `topics` has `n` in-sync replicas.
async fn wait_isr(brokers: &str, topics: &[String], n: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let c: BaseConsumer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().expect("consumer");
        let ok = topics.iter().all(|t| {
            c.fetch_metadata(Some(t), Duration::from_secs(5))
                .map(|md| md.topics()[0].partitions().iter().all(|p| p.isr().len() >= n && p.leader() >= 0))
                .unwrap_or(false)
        });
        if ok {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

/// One step of the plan: when, and what.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    HoldStart,
    HoldEnd,
    Freeze,
    Thaw,
    KafkaStop,
    KafkaStart,
    LeaderKill,
    RollingRestart,
    CoordinatorKill,
    TwoBrokersDown,
    PostgresRestart,
    SwitchModes,
    SwitchBack,
    Poison,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let pg_url =
        std::env::var("OUTBOX_RELAY__POSTGRES__URL").expect("OUTBOX_RELAY__POSTGRES__URL (run via scripts/chaos)");
    let brokers = if args.cluster {
        std::env::var("OUTBOX_RELAY_TEST_CLUSTER").expect("OUTBOX_RELAY_TEST_CLUSTER (scripts/infra env)")
    } else {
        std::env::var("OUTBOX_RELAY__KAFKA__BROKERS").expect("OUTBOX_RELAY__KAFKA__BROKERS")
    };
    let duration = args.duration.unwrap_or(if args.cluster { 480 } else { 250 });
    let run = format!("chaos_{}", &Uuid::new_v4().simple().to_string()[..8]);
    std::fs::create_dir_all(&args.run_dir).expect("run dir");
    let started = Instant::now();
    let mode = if args.exactly_once { "exactly-once" } else { "at-least-once" };
    log(
        started,
        format!(
            "run {run}: {} events over {duration} s, {} relays ({mode}), ≥{} kills, {}",
            args.events,
            args.relays,
            args.kills,
            if args.cluster { "3-broker cluster".to_string() } else { format!("Kafka down {} s", args.kafka_outage) }
        ),
    );

    let env: Vec<(String, String)> = vec![
        ("OUTBOX_RELAY__POSTGRES__URL".into(), pg_url.clone()),
        ("OUTBOX_RELAY__KAFKA__BROKERS".into(), brokers.clone()),
        ("OUTBOX_RELAY__OUTBOX__TABLE".into(), run.clone()),
        ("OUTBOX_RELAY__HTTP__LISTEN".into(), String::new()),
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE".into(), args.batch_size.to_string()),
        ("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS".into(), "3".into()),
        ("OUTBOX_RELAY__RELAY__RETRY_BACKOFF".into(), "500ms".into()),
        ("OUTBOX_RELAY__RELAY__MAX_BACKOFF".into(), "2s".into()),
        ("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT".into(), "10m".into()),
        ("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT".into(), "10s".into()),
        // a frozen relay's batch goes to the others after 10 s
        ("OUTBOX_RELAY__POSTGRES__IDLE_IN_TRANSACTION_TIMEOUT".into(), "10s".into()),
        ("OUTBOX_RELAY__LOG__LEVEL".into(), "info,librdkafka=error".into()),
    ];
    let migrate = Command::new(&args.relay_bin).envs(env.iter().cloned()).arg("migrate").output().expect("migrate");
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let topics: Vec<String> = TOPICS.iter().map(|t| format!("{run}.{t}")).collect();
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("admin");
    let rf = if args.cluster { 3 } else { 1 };
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            let n = NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(rf));
            if args.cluster {
                n.set("min.insync.replicas", "2")
            } else {
                n
            }
        })
        .collect();
    admin.create_topics(&new, &AdminOptions::new()).await.expect("create topics");
    let config = args.run_dir.join(format!("{run}.toml"));
    std::fs::write(
        &config,
        "[kafka.properties]\n\"allow.auto.create.topics\" = \"false\"\n\"topic.metadata.propagation.max.ms\" = \"5000\"\n",
    )
    .expect("config");
    let mut relays = Relays {
        bin: args.relay_bin.clone(),
        env: env.clone(),
        config,
        logs: {
            // One directory per run, every incarnation of a relay appended to its
            // log: what a relay did before a kill or its own exit stays readable.
            let d = args.run_dir.join(&run);
            std::fs::create_dir_all(&d).expect("log dir");
            log(started, format!("relay logs in {}", d.display()));
            d
        },
        children: Vec::new(),
        modes: vec![args.exactly_once; args.relays],
        base_exactly_once: args.exactly_once,
        kills: 0,
        armed: vec![false; args.relays],
        failpoint_kills: 0,
        frozen: None,
        disruptions: Vec::new(),
    };
    for i in 0..args.relays {
        let c = relays.spawn(i);
        relays.children.push(c);
    }

    // The application: WRITERS connections, each owning a share of the keys, so
    // seq order is commit order per key. Small transactions of 10 rows.
    let attempted = Arc::new(AtomicU64::new(0));
    let per_writer = args.events / WRITERS as u64;
    let tx_per_sec = (args.events as f64 / 10.0 / duration as f64 / WRITERS as f64).max(1.0);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (pg_url, run, topics, attempted) = (pg_url.clone(), run.clone(), topics.clone(), attempted.clone());
        writers.push(tokio::spawn(async move {
            let mut written: u64 = 0;
            let t0 = Instant::now();
            while written < per_writer {
                let Ok((mut db, conn)) = tokio_postgres::connect(&pg_url, NoTls).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                tokio::spawn(conn);
                while written < per_writer {
                    let rows: Vec<(String, String)> = (0..10u64)
                        .map(|j| {
                            let k = w + WRITERS * (((written + j) as usize * 7919) % (KEYS / WRITERS));
                            (topics[k % topics.len()].clone(), format!("key-{k}"))
                        })
                        .collect();
                    let (ts, ks): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
                    let r = async {
                        let tx = db.transaction().await?;
                        tx.execute(
                            &format!(
                                "INSERT INTO public.{run} (topic, key, payload)
                                 SELECT t, k, jsonb_build_object('writer', $3::int, 'n', $4::bigint + o, 'pad', repeat('x', 200))
                                 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(t, k, o)"
                            ),
                            &[&ts, &ks, &(w as i32), &(written as i64)],
                        )
                        .await?;
                        tx.commit().await
                    }
                    .await;
                    attempted.fetch_add(10, Ordering::Relaxed);
                    if r.is_err() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break; // reconnect (Postgres restart); the table is the truth
                    }
                    written += 10;
                    let due = Duration::from_secs_f64(written as f64 / 10.0 / tx_per_sec);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }));
    }

    // Poison rows: every class, twice (early, and after the outages).
    let poison_classes: [(&str, &str); 4] = [
        ("oversized payload", "Message size too large"),
        ("invalid topic name", "topic"),
        ("malformed headers", "malformed headers"),
        ("unknown topic (auto-create off)", "Unknown topic"),
    ];
    let mut poison: Vec<(Uuid, &str)> = Vec::new();
    let inject = |round: usize| {
        let (pg_url, run) = (pg_url.clone(), run.clone());
        async move {
            let (db, conn) = tokio_postgres::connect(&pg_url, NoTls).await.expect("poison connection");
            tokio::spawn(conn);
            let sql = format!(
                "INSERT INTO public.{run} (topic, key, payload, headers) VALUES
                   ('{run}.orders', 'poison-size-{round}', jsonb_build_object('big', repeat('x', 1100000)), '{{}}'),
                   ('{run} invalid topic!', 'poison-name-{round}', '{{}}', '{{}}'),
                   ('{run}.orders', 'poison-headers-{round}', '{{}}', '{{\"n\": 1}}'),
                   ('{run}.never-created', 'poison-unknown-{round}', '{{}}', '{{}}')
                 RETURNING id"
            );
            db.query(&sql, &[]).await.expect("inject poison").iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>()
        }
    };

    // The plan, in seconds from the start: one disruption at a time, so that
    // the latency of the events written meanwhile shows its effect alone.
    let mut plan: Vec<(u64, Step)> = vec![
        (30, Step::HoldStart),
        (30 + args.hold, Step::HoldEnd),
        (35 + args.hold, Step::Freeze),
        (35 + args.hold + args.freeze, Step::Thaw),
        (40 + args.hold + args.freeze, Step::SwitchModes),
        (60 + args.hold + args.freeze, Step::SwitchBack),
    ];
    let mut t = 70 + args.hold + args.freeze;
    if args.cluster {
        for _ in 0..3 {
            plan.push((t, Step::LeaderKill));
            t += 20;
        }
        if args.exactly_once {
            plan.push((t, Step::CoordinatorKill));
            t += 15;
        }
        plan.push((t, Step::TwoBrokersDown));
        t += 35;
        // last, and the longest: each broker must be back in sync before the next
        plan.push((t, Step::RollingRestart));
        t += 100;
    } else {
        plan.extend([(t, Step::KafkaStop), (t + args.kafka_outage, Step::KafkaStart)]);
        t += args.kafka_outage + 10;
    }
    plan.extend([(t, Step::PostgresRestart), (t + 3, Step::Poison)]);
    plan.sort_by_key(|(t, _)| *t);
    let plan_end = plan.last().map(|(t, _)| *t).unwrap_or(0);

    let report_db = {
        let (db, conn) = tokio_postgres::connect(&pg_url, NoTls).await.expect("connect");
        tokio::spawn(conn);
        db
    };
    let mut windows: BTreeMap<&str, (i64, i64)> = BTreeMap::new(); // label → (from ms, to ms)
    let mut counts: BTreeMap<&str, String> = BTreeMap::new();
    let mut revived = 0;
    let mut next_kill = Instant::now() + Duration::from_secs(2);
    let mut step = 0;
    for (i, id) in inject(0).await.into_iter().enumerate() {
        poison.push((id, poison_classes[i].0));
    }
    log(started, "poison injected (round 1)");
    let mut pg_restarts = 0;
    let mut frozen_at = 0;
    loop {
        let t = started.elapsed().as_secs();
        while step < plan.len() && plan[step].0 <= t {
            let what = plan[step].1;
            step += 1;
            match what {
                Step::HoldStart => {
                    log(started, format!("a REPEATABLE READ transaction holds the xmin horizon for {} s", args.hold));
                    report_db
                        .batch_execute(&format!(
                            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM public.{run}"
                        ))
                        .await
                        .expect("hold");
                    windows.insert("long transaction held", (now_ms(), 0));
                }
                Step::HoldEnd => {
                    report_db.batch_execute("COMMIT").await.ok();
                    windows.entry("long transaction held").and_modify(|w| w.1 = now_ms());
                    log(started, "horizon released");
                }
                Step::Freeze => {
                    let i = 1.min(relays.children.len() - 1);
                    relays.frozen = Some(i);
                    frozen_at = now_ms();
                    relays.children[i].signal(libc::SIGSTOP);
                    windows.insert("relay 1 frozen", (now_ms(), 0));
                    log(started, format!("relay {i} frozen (SIGSTOP) for {} s", args.freeze));
                }
                Step::Thaw => {
                    if let Some(i) = relays.frozen.take() {
                        // It sends the batch it held (others published it meanwhile).
                        relays.disruptions.push((frozen_at, now_ms(), Disruption::Freeze));
                        relays.children[i].signal(libc::SIGCONT);
                        windows.entry("relay 1 frozen").and_modify(|w| w.1 = now_ms());
                        log(started, format!("relay {i} thawed (SIGCONT)"));
                    }
                }
                Step::KafkaStop => {
                    log(started, format!("stopping Kafka for {} s", args.kafka_outage));
                    relays.disruptions.push(Disruption::KafkaStop.now());
                    infra(&["stop-kafka"]);
                }
                Step::KafkaStart => {
                    log(started, "starting Kafka");
                    relays.disruptions.push(Disruption::KafkaStart.now());
                    infra(&["start-kafka"]);
                    relays.disruptions.push(Disruption::KafkaStart.now());
                }
                Step::LeaderKill => {
                    let victim = busiest_leader(&brokers, &topics);
                    log(started, format!("SIGKILL broker {victim}, leader of {}[0]", topics[0]));
                    relays.disruptions.push(Disruption::LeaderKill.now());
                    windows.entry("leader kills (first)").or_insert((now_ms(), 0));
                    infra(&["broker", "kill", &victim.to_string()]);
                    tokio::time::sleep(Duration::from_secs(8)).await;
                    infra(&["broker", "start", &victim.to_string()]);
                    relays.disruptions.push(Disruption::LeaderKill.now());
                    windows.entry("leader kills (first)").and_modify(|w| {
                        if w.1 == 0 {
                            w.1 = now_ms()
                        }
                    });
                    *counts.entry("partition leaders SIGKILLed").or_default() = format!(
                        "{}",
                        counts.get("partition leaders SIGKILLed").and_then(|c| c.parse::<u32>().ok()).unwrap_or(0) + 1
                    );
                }
                Step::RollingRestart => {
                    log(started, "rolling restart of the 3 brokers");
                    windows.insert("rolling restart", (now_ms(), 0));
                    for n in 1..=3 {
                        relays.disruptions.push(Disruption::BrokerRestart.now());
                        infra(&["broker", "stop", &n.to_string()]);
                        infra(&["broker", "start", &n.to_string()]);
                        let synced = wait_isr(&brokers, &topics, 3, Duration::from_secs(90)).await;
                        log(
                            started,
                            format!(
                                "  broker {n} restarted{}",
                                if synced { ", in sync" } else { ", NOT in sync after 90 s" }
                            ),
                        );
                    }
                    windows.entry("rolling restart").and_modify(|w| w.1 = now_ms());
                    counts.insert("rolling restart (brokers)", "3/3".into());
                }
                Step::CoordinatorKill => {
                    let ids = Store::new(&Settings::load_from(None, env.clone()).expect("settings"))
                        .expect("store")
                        .txn_ids()
                        .await
                        .expect("txn ids");
                    let txn = ids.transactional_id("chaos-0");
                    if let Some(victim) = coordinator(&brokers, &txn) {
                        log(started, format!("SIGKILL broker {victim}, transaction coordinator of {txn}"));
                        relays.disruptions.push(Disruption::CoordinatorKill.now());
                        windows.insert("transaction coordinator killed", (now_ms(), 0));
                        infra(&["broker", "kill", &victim.to_string()]);
                        tokio::time::sleep(Duration::from_secs(8)).await;
                        infra(&["broker", "start", &victim.to_string()]);
                        windows.entry("transaction coordinator killed").and_modify(|w| w.1 = now_ms());
                        counts.insert("transaction coordinator SIGKILLed", format!("broker {victim}"));
                    }
                }
                Step::TwoBrokersDown => {
                    let (a, b) = (2, 3);
                    log(started, format!("brokers {a} and {b} down for 20 s: writes must stall (min.insync.replicas = 2), nothing parks"));
                    // (chaos fails if anything but the poison rows is parked)
                    relays.disruptions.push(Disruption::TwoBrokersDown.now());
                    infra(&["broker", "stop", &a.to_string()]);
                    infra(&["broker", "stop", &b.to_string()]);
                    windows.insert("two brokers down", (now_ms(), 0));
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    infra(&["broker", "start", &a.to_string()]);
                    windows.entry("two brokers down").and_modify(|w| w.1 = now_ms());
                    log(started, format!("broker {a} back: 2 in sync, events flow again"));
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    infra(&["broker", "start", &b.to_string()]);
                    relays.disruptions.push(Disruption::TwoBrokersDown.now());
                    counts.insert("two brokers down at once (s)", "20".into());
                }
                Step::PostgresRestart => {
                    log(started, "restarting Postgres");
                    // a window: a batch sent while Postgres goes down and comes back
                    // cannot be recorded, and goes out again
                    let from = now_ms();
                    infra(&["restart-postgres"]);
                    relays.disruptions.push((from, now_ms(), Disruption::PostgresRestart));
                    pg_restarts += 1;
                }
                Step::Poison => {
                    for (i, id) in inject(1).await.into_iter().enumerate() {
                        poison.push((id, poison_classes[i].0));
                    }
                    log(started, "poison injected (round 2)");
                }
                Step::SwitchModes | Step::SwitchBack => {
                    let to = if what == Step::SwitchModes { !args.exactly_once } else { args.exactly_once };
                    let label = if to { "exactly-once" } else { "at-least-once" };
                    log(started, format!("rolling switch of relays 1..{} to {label} (relay 0 stays)", args.relays - 1));
                    for i in 1..args.relays {
                        relays.switch(i, to);
                    }
                    if what == Step::SwitchModes {
                        windows.insert("both delivery modes on the table", (now_ms(), 0));
                    } else {
                        windows.entry("both delivery modes on the table").and_modify(|w| w.1 = now_ms());
                    }
                }
            }
        }
        let writing = writers.iter().any(|w| !w.is_finished());
        if Instant::now() >= next_kill {
            let killable = relays.killable();
            if !killable.is_empty() {
                let i = killable[fastrand::usize(0..killable.len())];
                relays.kill_and_restart(i);
                if relays.kills % 10 == 0 {
                    log(
                        started,
                        format!("{} kills; {} rows attempted", relays.kills, attempted.load(Ordering::Relaxed)),
                    );
                }
            }
            next_kill = Instant::now() + Duration::from_millis(1500 + fastrand::u64(0..1500));
        }
        revived += relays.revive();
        if !writing && relays.kills >= args.kills && step >= plan.len() && t >= plan_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for w in writers {
        let _ = w.await;
    }
    log(started, format!("writers done; {} kills; draining", relays.kills));

    // Drain: nothing pending (retrying poison included), then stop the relays cleanly.
    let settings = Settings::load_from(None, env.clone()).expect("settings");
    let store = Store::new(&settings).expect("store");
    let drain_deadline = Instant::now() + Duration::from_secs(600);
    loop {
        revived += relays.revive();
        let b = store.backlog().await.expect("backlog");
        if b.pending == 0 {
            break;
        }
        assert!(Instant::now() < drain_deadline, "still {} pending after 10 minutes", b.pending);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut clean_exits = 0;
    for c in std::mem::take(&mut relays.children) {
        if c.stop(Duration::from_secs(60)) {
            clean_exits += 1;
        }
    }
    log(started, "drained; reading Kafka back (read_committed)");

    let rows = store.published_rows(None, None, None).await.expect("published rows");
    let (b, p) = (brokers.clone(), BTreeMap::new());
    let read_topics_list = topics.clone();
    let seen =
        tokio::task::spawn_blocking(move || read_topics(&b, &p, &read_topics_list, Duration::from_secs(600), |_| {}))
            .await
            .expect("reader")
            .expect("read topics");
    let report = compare(&rows, &seen);
    relays.disruptions.sort_by_key(|d| (d.0, d.1));
    let spans: Vec<(i64, i64)> = relays.disruptions.iter().map(|d| (d.0, d.1)).collect();
    let (blamed, unexplained) = duplicates_by_disruption(&seen, &spans);
    let mut by_cause: BTreeMap<Disruption, (usize, usize)> = BTreeMap::new(); // (total, max at one)
    for ((_, _, cause), n) in relays.disruptions.iter().zip(&blamed) {
        let e = by_cause.entry(*cause).or_default();
        e.0 += n;
        e.1 = e.1.max(*n);
    }
    let max_per_kill = [Disruption::Kill, Disruption::CrashPoint]
        .iter()
        .filter_map(|c| by_cause.get(c).map(|e| e.1))
        .max()
        .unwrap_or(0);
    // A kill inside a window (the Postgres restart, the freeze) takes the copies
    // of pairs it lies between, some of which the window caused: the two cannot
    // be told apart. The bound is for the kills outside any window.
    let inside_window = |t: i64| relays.disruptions.iter().find(|w| w.0 < w.1 && w.0 <= t && t <= w.1).map(|w| w.2);
    let (mut max_outside, mut worst_inside) = (0, None);
    for (d, &n) in relays.disruptions.iter().zip(&blamed) {
        if !matches!(d.2, Disruption::Kill | Disruption::CrashPoint) {
            continue;
        }
        match inside_window(d.0) {
            None => max_outside = max_outside.max(n),
            Some(w) if worst_inside.is_none_or(|(m, _)| n > m) => worst_inside = Some((n, w)),
            Some(_) => {}
        }
    }

    // Latency (row created_at → the relay sent it, message CreateTime) of the
    // first copy of each event, for events written in each disruption window.
    let mut first_sent: HashMap<Uuid, i64> = HashMap::new();
    for m in &seen {
        if let (Some(id), Some(ts)) = (m.id, m.timestamp_ms) {
            let e = first_sent.entry(id).or_insert(ts);
            *e = (*e).min(ts);
        }
    }
    let latency_in = |from: i64, to: i64| -> Quantiles {
        quantiles(
            rows.iter()
                .filter(|r| r.created_at_ms >= from && r.created_at_ms < to)
                .filter_map(|r| first_sent.get(&r.id).map(|s| (s - r.created_at_ms) as f64))
                .collect(),
        )
    };
    // The 15 s before the first disruption window (start-up and the first
    // kills are behind by then).
    let calm = {
        let first = windows.values().map(|w| w.0).min().unwrap_or(i64::MAX);
        latency_in(first - 15_000, first)
    };

    // Poison: each parked, with its reason; nothing else parked.
    let db = {
        let (db, conn) = tokio_postgres::connect(&pg_url, NoTls).await.expect("connect");
        tokio::spawn(conn);
        db
    };
    let parked: HashMap<Uuid, String> = db
        .query(&format!("SELECT id, coalesce(last_error, '') FROM public.{run} WHERE parked_at IS NOT NULL"), &[])
        .await
        .expect("parked")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let written: i64 = db.query_one(&format!("SELECT count(*) FROM public.{run}"), &[]).await.expect("count").get(0);
    let prepared_left = store.prepared_any(&store.transactional_prefixes().await).await.map(|p| p.len()).unwrap_or(0);
    let mut by_reason: BTreeMap<&str, (usize, usize, String)> = BTreeMap::new();
    let mut poison_ok = true;
    for (id, class) in &poison {
        let want = poison_classes.iter().find(|(c, _)| c == class).map(|(_, w)| *w).unwrap_or("");
        let e = by_reason.entry(class).or_insert((0, 0, String::new()));
        e.0 += 1;
        match parked.get(id) {
            Some(err) if err.contains(want) => {
                e.1 += 1;
                e.2 = err.chars().take(60).collect();
            }
            other => {
                poison_ok = false;
                eprintln!("chaos: poison row {id} ({class}) not parked with {want:?}: {other:?}");
            }
        }
    }
    let wrongly_parked = parked.keys().filter(|id| !poison.iter().any(|(p, _)| p == *id)).count();

    let dup_ok = !args.exactly_once || report.duplicate_copies == 0;
    let ok = report.lost == 0
        && report.order_violations == 0
        && poison_ok
        && wrongly_parked == 0
        && dup_ok
        && prepared_left == 0;
    println!();
    println!(
        "chaos run {run}  ({:.0} s, {} relays, batch {}, {}{})",
        started.elapsed().as_secs_f64(),
        args.relays,
        args.batch_size,
        mode,
        if args.cluster { ", 3-broker cluster (RF 3, min.insync.replicas 2)" } else { ", one broker" }
    );
    println!("  ┌──────────────────────────────────────────────────┬────────────┐");
    let row = |k: &str, v: String| println!("  │ {k:<48} │ {v:>10} │");
    row("events written (committed rows)", written.to_string());
    row("  of them published", report.expected.to_string());
    row("  of them poison (injected)", poison.len().to_string());
    row("messages delivered for published rows", report.delivered.to_string());
    row("LOST", report.lost.to_string());
    row("duplicated events", report.duplicated_events.to_string());
    row("duplicate copies", report.duplicate_copies.to_string());
    row(
        "duplicate copies per kill (mean)",
        format!("{:.1}", report.duplicate_copies as f64 / relays.kills.max(1) as f64),
    );
    row("duplicate copies per kill (MAX)", max_per_kill.to_string());
    if let Some((n, w)) = worst_inside.filter(|_| max_per_kill > max_outside) {
        row("  MAX of kills outside a window", max_outside.to_string());
        row(&format!("  MAX of kills inside a window ({w:?})"), n.to_string());
    }
    if args.exactly_once {
        row("duplicates allowed (exactly-once)", "0".into());
    } else {
        row("duplicate bound per kill (2 batches)", (2 * args.batch_size).to_string());
    }
    for (cause, label) in [
        (Disruption::KafkaStop, "dup copies after the Kafka stop"),
        (Disruption::KafkaStart, "dup copies after the Kafka start"),
        (Disruption::PostgresRestart, "dup copies after the Postgres restart"),
        (Disruption::Freeze, "dup copies after the freeze"),
        (Disruption::ModeSwitch, "dup copies after mode switches"),
        (Disruption::LeaderKill, "dup copies after leader kills"),
        (Disruption::BrokerRestart, "dup copies after broker restarts"),
        (Disruption::CoordinatorKill, "dup copies after the coordinator kill"),
        (Disruption::TwoBrokersDown, "dup copies after two brokers down"),
        (Disruption::SelfExit, "dup copies after a relay's own exit"),
    ] {
        if let Some((n, _)) = by_cause.get(&cause) {
            row(label, n.to_string());
        }
    }
    row("dup copies no disruption explains", unexplained.len().to_string());
    row("PER-KEY ORDER VIOLATIONS", report.order_violations.to_string());
    row("prepared batches left behind", prepared_left.to_string());
    row("SIGKILLs (random moments)", relays.kills.to_string());
    if args.exactly_once {
        row("SIGKILLs at protocol crash points", relays.failpoint_kills.to_string());
    }
    row("relays that exited by themselves", revived.to_string());
    row("clean exits on final SIGTERM", format!("{clean_exits}/{}", args.relays));
    row("long-lived slow relay (never restarted)", "relay 0".into());
    if !args.cluster {
        row("Kafka outage (s)", args.kafka_outage.to_string());
    }
    for (k, v) in &counts {
        row(k, v.clone());
    }
    row("Postgres restarts", pg_restarts.to_string());
    row("wrongly parked (not poison)", wrongly_parked.to_string());
    println!("  ├──────────────────────────────────────────────────┼────────────┤");
    for (class, (n, ok_n, reason)) in &by_reason {
        row(&format!("parked: {class}"), format!("{ok_n}/{n}"));
        println!("  │   reason: {reason:<60}");
    }
    println!("  └──────────────────────────────────────────────────┴────────────┘");
    println!("  latency, row created → sent by a relay (first copy, ms): p50 / p99 / max");
    println!(
        "    {:<46} {:>8.0} / {:>8.0} / {:>8.0}   ({} events)",
        "written in the 15 s before (kills only)", calm.p50, calm.p99, calm.max, calm.n
    );
    for (label, (from, to)) in &windows {
        let q = latency_in(*from, if *to == 0 { i64::MAX } else { *to });
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
    if !unexplained.is_empty() {
        // run time of each copy, and the disruption last before the first one
        let t0 = now_ms() - started.elapsed().as_millis() as i64;
        let secs = |t: i64| (t - t0) as f64 / 1000.0;
        println!("  duplicate copies no disruption explains (first 10 of {}): copy before → copy, run seconds; the last disruption before", unexplained.len());
        for (id, a, b) in unexplained.iter().take(10) {
            let before = relays.disruptions.iter().filter(|d| d.1 < *a).max_by_key(|d| d.1);
            let last = before.map_or("none".to_string(), |d| format!("{:?} ended at {:.3}", d.2, secs(d.1)));
            println!("    {id} {:.3} → {:.3}   {last}", secs(*a), secs(*b));
        }
    }
    if report.lost > 0 {
        // Enough to find them again: `outbox-relay verify` lists them, and the
        // batch they went out in (same published_at) tells which relay and when.
        println!("  lost events (first {}), with the transaction that published them:", report.lost_ids.len());
        let lost = db
            .query(
                &format!(
                    "SELECT id::text, seq, topic, coalesce(key, ''), created_at::text, published_at::text, \
                            (SELECT count(*) FROM public.{run} b WHERE b.published_at = o.published_at) \
                     FROM public.{run} o WHERE id = ANY($1) ORDER BY seq"
                ),
                &[&report.lost_ids],
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
    println!("{}", if ok { "chaos: PASS" } else { "chaos: FAIL" });
    if !ok {
        std::process::exit(1);
    }
}
