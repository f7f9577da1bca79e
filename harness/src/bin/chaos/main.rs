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
//! exactly-once mode, there is no duplicate. Every extra copy is blamed on the
//! disruption that caused it, by the relay that sent the copy before it (the
//! `outbox_relay_id` header).
//!
//! Files: `relays.rs` (the relays and what was done to them), `plan.rs` (the
//! disruptions), `kafka.rs` (which broker to kill), `poison.rs`, `report.rs`.

mod kafka;
mod plan;
mod poison;
mod relays;
mod report;
mod verdict;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use outbox_relay::config::Settings;
use outbox_relay::store::Store;
use outbox_relay_support::{create_topics_at, infra, pg_at, InfraLock, Resource, TopicSpec, WriterSpec, Writers};
use uuid::Uuid;

use plan::{Disruptor, Step};
use relays::Relays;

#[derive(Parser, Debug)]
#[command(about = "outbox-relay chaos run (see the module docs)")]
pub struct Args {
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
    /// Batches each relay may have in flight while it drains a backlog
    /// (`relay.pipeline_depth`, at-least-once).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=3))]
    pipeline_depth: u8,
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
    /// Each relay process serves one outbox (`[outbox]`). By default each
    /// serves two (`[[outboxes]]`): the run's table, which takes the poison
    /// and the disruptions aimed at a table, and a second one written at a
    /// quarter of the rate; both must lose nothing and keep per-key order.
    #[arg(long)]
    one_outbox: bool,
    /// Check the arguments and exit (scripts/chaos does, before it starts
    /// any infrastructure).
    #[arg(long, hide = true)]
    check_args: bool,
}

const KEYS: u64 = 1000;
const WRITERS: u64 = 4;
const TOPICS: [&str; 4] = ["orders", "payments", "stock", "shipping"];
const PARTITIONS: i32 = 6;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn log(started: Instant, msg: impl AsRef<str>) {
    eprintln!("[{:>6.1}s] {}", started.elapsed().as_secs_f64(), msg.as_ref());
}

/// The relays' settings (one table per run).
fn relay_env(args: &Args, pg_url: &str, brokers: &str, run: &str) -> Vec<(String, String)> {
    outbox_relay_support::settings(&[
        ("OUTBOX_RELAY__POSTGRES__URL", pg_url),
        ("OUTBOX_RELAY__KAFKA__BROKERS", brokers),
        ("OUTBOX_RELAY__OUTBOX__TABLE", run),
        ("OUTBOX_RELAY__HTTP__LISTEN", ""),
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE", &args.batch_size.to_string()),
        ("OUTBOX_RELAY__RELAY__PIPELINE_DEPTH", &args.pipeline_depth.to_string()),
        ("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "3"),
        ("OUTBOX_RELAY__RELAY__RETRY_BACKOFF", "500ms"),
        ("OUTBOX_RELAY__RELAY__MAX_BACKOFF", "2s"),
        ("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT", "10m"),
        ("OUTBOX_RELAY__RELAY__RECOVERY_TIMEOUT", "10s"),
        // a frozen relay's batch goes to the others after 10 s
        ("OUTBOX_RELAY__POSTGRES__IDLE_IN_TRANSACTION_TIMEOUT", "10s"),
        ("OUTBOX_RELAY__LOG__LEVEL", "info,librdkafka=error"),
        // The report times each copy by its message timestamp: the send time
        // (the default since 0.3 is the row's created_at, the same for every copy).
        ("OUTBOX_RELAY__RELAY__MESSAGE_TIMESTAMP", "send_time"),
    ])
}

/// The table and its topics.
async fn setup(args: &Args, env: &[(String, String)], brokers: &str, run: &str) -> Vec<String> {
    let migrate = std::process::Command::new(outbox_relay_support::relay_bin())
        .envs(env.iter().cloned())
        .arg("migrate")
        .output()
        .expect("migrate");
    assert!(migrate.status.success(), "migrate: {}", String::from_utf8_lossy(&migrate.stderr));
    let topics: Vec<String> = TOPICS.iter().map(|t| format!("{run}.{t}")).collect();
    let spec = TopicSpec::new(PARTITIONS).replicated(if args.cluster { 3 } else { 1 });
    create_topics_at(brokers, &topics, &spec).await;
    topics
}

/// The relays' config file: its Kafka properties, and with two outboxes
/// their `[[outboxes]]` (then the relays' environment names no table).
fn relay_config(args: &Args, run: &str, second: Option<&str>) -> PathBuf {
    let config = args.run_dir.join(format!("{run}.toml"));
    let mut toml = String::from(
        "[kafka.properties]\n\"allow.auto.create.topics\" = \"false\"\n\"topic.metadata.propagation.max.ms\" = \"5000\"\n",
    );
    if let Some(b) = second {
        toml.push_str(&format!("\n[[outboxes]]\ntable = \"public.{run}\"\n\n[[outboxes]]\ntable = \"public.{b}\"\n"));
    }
    std::fs::write(&config, toml).expect("config");
    config
}

/// The environment with `OUTBOX_RELAY__OUTBOX__TABLE` set to `table`.
fn with_table(env: &[(String, String)], table: &str) -> Vec<(String, String)> {
    let mut e: Vec<(String, String)> =
        env.iter().filter(|(k, _)| k != "OUTBOX_RELAY__OUTBOX__TABLE").cloned().collect();
    e.push(("OUTBOX_RELAY__OUTBOX__TABLE".into(), table.into()));
    e
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.check_args {
        return;
    }
    // Nothing else may use or stop the infrastructure meanwhile (tests included).
    let _lock = InfraLock::exclusive(&[Resource::Postgres, Resource::Kafka, Resource::Cluster]).await;
    let pg_url = infra().pg_url.clone();
    let brokers = if args.cluster { infra().cluster.clone() } else { infra().brokers.clone() };
    let duration = args.duration.unwrap_or(if args.cluster { 480 } else { 250 });
    let run = format!("chaos_{}", &Uuid::new_v4().simple().to_string()[..8]);
    std::fs::create_dir_all(&args.run_dir).expect("run dir");
    let started = Instant::now();
    let mode = if args.exactly_once { "exactly-once" } else { "at-least-once" };
    let outage =
        if args.cluster { "3-broker cluster".to_string() } else { format!("Kafka down {} s", args.kafka_outage) };
    log(
        started,
        format!(
            "run {run}: {} events over {duration} s, {} relays ({mode}), ≥{} kills, {outage}",
            args.events, args.relays, args.kills
        ),
    );
    let env = relay_env(&args, &pg_url, &brokers, &run);
    let topics = setup(&args, &env, &brokers, &run).await;
    // The second outbox, served by the same relay processes.
    let second = (!args.one_outbox).then(|| format!("{run}_b"));
    let env_b = second.as_deref().map(|b| with_table(&env, b));
    let topics_b = match &env_b {
        Some(e) => setup(&args, e, &brokers, second.as_deref().unwrap_or_default()).await,
        None => Vec::new(),
    };
    let config = relay_config(&args, &run, second.as_deref());
    let relays_env: Vec<(String, String)> = match &second {
        Some(_) => env.iter().filter(|(k, _)| k != "OUTBOX_RELAY__OUTBOX__TABLE").cloned().collect(),
        None => env.clone(),
    };
    // One directory per run, every incarnation of a relay appended to its
    // log: what a relay did before a kill or its own exit stays readable.
    let logs = args.run_dir.join(&run);
    std::fs::create_dir_all(&logs).expect("log dir");
    log(started, format!("relay logs in {}", logs.display()));
    let mut relays = Relays::new(relays_env, config, logs, args.relays, args.exactly_once);

    // The application: WRITERS connections, each owning a share of the keys, so
    // seq order is commit order per key. Small transactions of 10 rows.
    let writers = Writers::start(WriterSpec {
        pg_url: pg_url.clone(),
        table: format!("public.{run}"),
        topics: topics.clone(),
        connections: WRITERS,
        per_tx: 10,
        rate: (args.events / duration).max(1),
        keys: KEYS,
        hot_key_share: 0.0,
        pad: 200,
        reconnect: true,
        rollback_share: 0.0,
        max_events: args.events,
    });
    let writers_b = second.as_ref().map(|b| {
        Writers::start(WriterSpec {
            pg_url: pg_url.clone(),
            table: format!("public.{b}"),
            topics: topics_b.clone(),
            connections: 2,
            per_tx: 10,
            rate: (args.events / 4 / duration).max(1),
            keys: KEYS,
            hot_key_share: 0.0,
            pad: 200,
            reconnect: true,
            rollback_share: 0.0,
            max_events: args.events / 4,
        })
    });
    let mut d = Disruptor::new(&args, &run, &pg_url, &brokers, &topics, &env, pg_at(&pg_url).await, started);
    d.poison(0).await;
    let revived = disrupt(&args, &mut d, &mut relays, &writers).await;
    writers.finish().await;
    if let Some(w) = writers_b {
        w.finish().await;
    }
    log(started, format!("writers done; {} kills; draining", relays.kills));
    let mut revived = revived + drain(&env, &mut relays).await;
    if let Some(e) = &env_b {
        revived += drain(e, &mut relays).await;
    }
    let clean_exits = relays.stop_all();
    log(started, "drained; reading Kafka back (read_committed)");
    let mut ok = verdict::verdict(&args, &d, &relays, &env, &brokers, &topics, revived, clean_exits).await;
    if let (Some(e), Some(b)) = (&env_b, &second) {
        ok &= verdict::verdict_second(&args, e, &brokers, &topics_b, b).await;
    }
    println!("{}", if ok { "chaos: PASS" } else { "chaos: FAIL" });
    if !ok {
        std::process::exit(1);
    }
}

/// Carries out the plan and the random kills until the writers are done and
/// the plan is through. Returns how many relays exited by themselves.
async fn disrupt(args: &Args, d: &mut Disruptor<'_>, relays: &mut Relays, writers: &Writers) -> usize {
    let plan = plan::plan(args);
    let plan_end = plan.last().map(|(t, _)| *t).unwrap_or(0);
    let (mut revived, mut step) = (0, 0);
    let mut next_kill = Instant::now() + Duration::from_secs(2);
    loop {
        let t = d.started.elapsed().as_secs();
        while step < plan.len() && plan[step].0 <= t {
            let what: Step = plan[step].1;
            step += 1;
            d.step(what, relays).await;
        }
        if Instant::now() >= next_kill {
            let killable = relays.killable();
            if !killable.is_empty() {
                relays.kill_and_restart(killable[fastrand::usize(0..killable.len())]);
                if relays.kills % 10 == 0 {
                    log(d.started, format!("{} kills; {} rows committed", relays.kills, writers.written()));
                }
            }
            next_kill = Instant::now() + Duration::from_millis(1500 + fastrand::u64(0..1500));
        }
        revived += relays.revive();
        if writers.is_finished() && relays.kills >= args.kills && step >= plan.len() && t >= plan_end {
            return revived;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until nothing is pending (retrying poison included). Returns how
/// many relays exited by themselves meanwhile.
async fn drain(env: &[(String, String)], relays: &mut Relays) -> usize {
    let store = Store::new(&Settings::load_from(None, env.to_vec()).expect("settings")).expect("store");
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut revived = 0;
    loop {
        revived += relays.revive();
        let b = store.backlog().await.expect("backlog");
        if b.pending == 0 {
            return revived;
        }
        assert!(Instant::now() < deadline, "still {} pending after 10 minutes", b.pending);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_args_parses_and_a_bad_value_is_refused_by_name() {
        assert!(Args::try_parse_from(["chaos", "--cluster", "--exactly-once", "--check-args"]).unwrap().check_args);
        let err = Args::try_parse_from(["chaos", "--pipeline-depth", "4"]).unwrap_err();
        assert!(err.to_string().contains("pipeline-depth"), "{err}");
        assert!(Args::try_parse_from(["chaos", "--exactly-onec"]).is_err());
    }
}
