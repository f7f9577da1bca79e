//! The chaos run behind `scripts/chaos`: on the real local Postgres and Kafka, an
//! application writes continuously while several relays run; relays are
//! SIGKILLed at random moments and restarted, the Kafka broker is stopped for a
//! minute, Postgres is restarted, and every poison class is injected. Then
//! everything is read back (read_committed) and compared with the table.
//!
//! Fails unless lost = 0, per-key order violations = 0, and every poison row is
//! parked with the right reason (and nothing else is parked).

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use outbox_relay::config::Settings;
use outbox_relay::store::Store;
use outbox_relay::verify::{compare, duplicates_by_disruption, read_topics};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use tokio_postgres::NoTls;
use uuid::Uuid;

#[derive(Parser, Debug)]
struct Args {
    /// Events the application writes.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Seconds over which they are written.
    #[arg(long, default_value_t = 150)]
    duration: u64,
    /// Relay instances running at once.
    #[arg(long, default_value_t = 3)]
    relays: usize,
    /// Minimum number of SIGKILLs.
    #[arg(long, default_value_t = 50)]
    kills: usize,
    /// Seconds the Kafka broker stays down.
    #[arg(long, default_value_t = 60)]
    kafka_outage: u64,
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
}

const KEYS: usize = 1000;
const WRITERS: usize = 4;
const TOPICS: [&str; 4] = ["orders", "payments", "stock", "shipping"];

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
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

struct Relays {
    bin: PathBuf,
    env: Vec<(String, String)>,
    config: PathBuf,
    logs: PathBuf,
    children: Vec<Child>,
    kills: usize,
    /// Exactly-once: half the starts arm a random crash point of the batch
    /// protocol (a SIGKILL exactly between two of its steps).
    failpoints: bool,
    armed: Vec<bool>,
    failpoint_kills: usize,
    /// When each disruption happened (ms since the epoch), in order.
    disruptions: Vec<(i64, Disruption)>,
}

impl Relays {
    fn spawn(&mut self, i: usize) -> Child {
        let mut cmd = Command::new(&self.bin);
        let armed = self.failpoints && fastrand::bool();
        if armed {
            let point = outbox_relay::failpoint::POINTS[fastrand::usize(0..outbox_relay::failpoint::POINTS.len())];
            cmd.env(outbox_relay::failpoint::ENV, format!("{point}=crash@{}", fastrand::u32(1..=4)));
        }
        if i < self.armed.len() {
            self.armed[i] = armed;
        } else {
            self.armed.push(armed);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("relay-{i}.log")))
            .expect("log file");
        cmd.envs(self.env.iter().cloned())
            .env("OUTBOX_RELAY__RELAY__ID", format!("chaos-{i}"))
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn relay")
    }

    fn kill_and_restart(&mut self, i: usize) {
        self.disruptions.push((now_ms(), Disruption::Kill));
        let _ = self.children[i].kill(); // SIGKILL
        let _ = self.children[i].wait();
        self.kills += 1;
        self.children[i] = self.spawn(i);
    }

    /// Restarts any relay that exited by itself (it should not; counted).
    fn revive(&mut self) -> usize {
        let mut revived = 0;
        for i in 0..self.children.len() {
            if let Ok(Some(status)) = self.children[i].try_wait() {
                if self.armed[i] && status.code().is_none() {
                    // killed itself at its crash point, as armed
                    self.failpoint_kills += 1;
                    self.disruptions.push((now_ms(), Disruption::CrashPoint));
                    self.children[i] = self.spawn(i);
                    continue;
                }
                eprintln!("chaos: relay {i} exited by itself ({status}); restarting");
                self.disruptions.push((now_ms(), Disruption::SelfExit));
                self.children[i] = self.spawn(i);
                revived += 1;
            }
        }
        revived
    }
}

fn infra(cmd: &str) {
    let ok = Command::new("scripts/infra").arg(cmd).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "scripts/infra {cmd} failed");
}

fn log(started: Instant, msg: impl AsRef<str>) {
    eprintln!("[{:>6.1}s] {}", started.elapsed().as_secs_f64(), msg.as_ref());
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let pg_url =
        std::env::var("OUTBOX_RELAY__POSTGRES__URL").expect("OUTBOX_RELAY__POSTGRES__URL (run via scripts/chaos)");
    let brokers = std::env::var("OUTBOX_RELAY__KAFKA__BROKERS").expect("OUTBOX_RELAY__KAFKA__BROKERS");
    let run = format!("chaos_{}", &Uuid::new_v4().simple().to_string()[..8]);
    std::fs::create_dir_all(&args.run_dir).expect("run dir");
    let started = Instant::now();
    log(
        started,
        format!(
            "run {run}: {} events over {} s, {} relays, ≥{} kills, Kafka down {} s",
            args.events, args.duration, args.relays, args.kills, args.kafka_outage
        ),
    );

    // Table, topics (auto-creation is off for the relays: unknown topics are poison).
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
        ("OUTBOX_RELAY__LOG__LEVEL".into(), "info,librdkafka=error".into()),
    ];
    let mut env = env;
    if args.exactly_once {
        env.push(("OUTBOX_RELAY__RELAY__DELIVERY".into(), "exactly-once".into()));
        env.push(("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT".into(), "10s".into()));
    }
    let migrate = Command::new(&args.relay_bin).envs(env.iter().cloned()).arg("migrate").output().expect("migrate");
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let topics: Vec<String> = TOPICS.iter().map(|t| format!("{run}.{t}")).collect();
    let admin: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("admin");
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, 6, TopicReplication::Fixed(1))).collect();
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
        logs: args.run_dir.clone(),
        children: Vec::new(),
        kills: 0,
        failpoints: args.exactly_once,
        armed: Vec::new(),
        failpoint_kills: 0,
        disruptions: Vec::new(),
    };
    relays.children = (0..args.relays).map(|i| relays.spawn(i)).collect();

    // The application: WRITERS connections, each owning a share of the keys, so
    // seq order is commit order per key. Small transactions of 10 rows.
    let stop = Arc::new(AtomicBool::new(false));
    let attempted = Arc::new(AtomicU64::new(0));
    let per_writer = args.events / WRITERS as u64;
    let tx_per_sec = (args.events as f64 / 10.0 / args.duration as f64 / WRITERS as f64).max(1.0);
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
                    // pace: tx_per_sec transactions per second per writer
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

    let kafka_down_at = Duration::from_secs(20);
    let pg_restart_at = kafka_down_at + Duration::from_secs(args.kafka_outage + 15);
    let (mut kafka_down, mut kafka_back, mut pg_restarted, mut second_poison) = (false, false, false, false);
    let mut revived = 0;
    let mut next_kill = Instant::now() + Duration::from_secs(2);
    for (i, id) in inject(0).await.into_iter().enumerate() {
        poison.push((id, poison_classes[i].0));
    }
    log(started, "poison injected (round 1)");
    loop {
        let t = started.elapsed();
        let writing = writers.iter().any(|w| !w.is_finished());
        if !kafka_down && t >= kafka_down_at {
            log(started, format!("stopping Kafka for {} s", args.kafka_outage));
            relays.disruptions.push((now_ms(), Disruption::KafkaStop));
            infra("stop-kafka");
            kafka_down = true;
        }
        if kafka_down && !kafka_back && t >= kafka_down_at + Duration::from_secs(args.kafka_outage) {
            log(started, "starting Kafka");
            // Both ends of the start: the broker may take writes before the
            // script sees it ready.
            relays.disruptions.push((now_ms(), Disruption::KafkaStart));
            infra("start-kafka");
            relays.disruptions.push((now_ms(), Disruption::KafkaStart));
            kafka_back = true;
        }
        if kafka_back && !pg_restarted && t >= pg_restart_at {
            log(started, "restarting Postgres");
            // A restart lasts a while: a batch sent while Postgres goes down
            // cannot be committed and is sent again once it is back, so both
            // ends are noted.
            relays.disruptions.push((now_ms(), Disruption::PostgresRestart));
            infra("restart-postgres");
            relays.disruptions.push((now_ms(), Disruption::PostgresRestart));
            pg_restarted = true;
        }
        if pg_restarted && !second_poison {
            for (i, id) in inject(1).await.into_iter().enumerate() {
                poison.push((id, poison_classes[i].0));
            }
            log(started, "poison injected (round 2)");
            second_poison = true;
        }
        if Instant::now() >= next_kill {
            let i = fastrand::usize(0..relays.children.len());
            relays.kill_and_restart(i);
            if relays.kills % 10 == 0 {
                log(started, format!("{} kills; {} rows attempted", relays.kills, attempted.load(Ordering::Relaxed)));
            }
            next_kill = Instant::now() + Duration::from_millis(1500 + fastrand::u64(0..1500));
        }
        revived += relays.revive();
        if !writing && relays.kills >= args.kills && pg_restarted && kafka_back {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
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
    for c in relays.children.iter_mut() {
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        if c.wait().map(|s| s.success()).unwrap_or(false) {
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
    let moments: Vec<i64> = relays.disruptions.iter().map(|d| d.0).collect();
    let (blamed, unexplained) = duplicates_by_disruption(&seen, &moments);
    let mut by_cause: BTreeMap<Disruption, (usize, usize)> = BTreeMap::new(); // (total, max at one)
    for ((_, cause), n) in relays.disruptions.iter().zip(&blamed) {
        let e = by_cause.entry(*cause).or_default();
        e.0 += n;
        e.1 = e.1.max(*n);
    }
    let max_per_kill = [Disruption::Kill, Disruption::CrashPoint]
        .iter()
        .filter_map(|c| by_cause.get(c).map(|e| e.1))
        .max()
        .unwrap_or(0);

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
    let ok = report.lost == 0 && report.order_violations == 0 && poison_ok && wrongly_parked == 0 && dup_ok;
    println!();
    println!(
        "chaos run {run}  ({:.0} s, {} relays, batch {}, {})",
        started.elapsed().as_secs_f64(),
        args.relays,
        args.batch_size,
        if args.exactly_once { "exactly-once" } else { "at-least-once" }
    );
    println!("  ┌──────────────────────────────────────────┬────────────┐");
    let row = |k: &str, v: String| println!("  │ {k:<40} │ {v:>10} │");
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
    if args.exactly_once {
        row("duplicates allowed (exactly-once)", "0".into());
    } else {
        row("duplicate bound per kill (2 batches)", (2 * args.batch_size).to_string());
    }
    for (cause, label) in [
        (Disruption::KafkaStop, "dup copies after the Kafka stop"),
        (Disruption::KafkaStart, "dup copies after the Kafka start"),
        (Disruption::PostgresRestart, "dup copies after the Postgres restart"),
        (Disruption::SelfExit, "dup copies after a relay's own exit"),
    ] {
        if let Some((n, _)) = by_cause.get(&cause) {
            row(label, n.to_string());
        }
    }
    row("dup copies no disruption explains", unexplained.to_string());
    row("PER-KEY ORDER VIOLATIONS", report.order_violations.to_string());
    row("SIGKILLs (random moments)", relays.kills.to_string());
    if args.exactly_once {
        row("SIGKILLs at protocol crash points", relays.failpoint_kills.to_string());
    }
    row("relays that exited by themselves", revived.to_string());
    row("clean exits on final SIGTERM", format!("{clean_exits}/{}", args.relays));
    row("Kafka outage (s)", args.kafka_outage.to_string());
    row("Postgres restarts", "1".into());
    row("wrongly parked (not poison)", wrongly_parked.to_string());
    println!("  ├──────────────────────────────────────────┼────────────┤");
    for (class, (n, ok_n, reason)) in &by_reason {
        row(&format!("parked: {class}"), format!("{ok_n}/{n}"));
        println!("  │   reason: {reason:<60}");
    }
    println!("  └──────────────────────────────────────────┴────────────┘");
    println!("{}", if ok { "chaos: PASS" } else { "chaos: FAIL" });
    if !ok {
        std::process::exit(1);
    }
}
