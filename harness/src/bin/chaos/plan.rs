//! The chaos run's plan (one disruption at a time, so that the latency of the
//! events written meanwhile shows its effect alone) and what each step does.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_relay::config::Settings;
use outbox_relay::store::Store;
use outbox_relay_support::infra_cmd;
use uuid::Uuid;

use super::kafka::{busiest_leader, coordinator, wait_isr};
use super::relays::{Cause, Relays};
use super::{log, now_ms, poison, Args};

/// One step of the plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
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

/// The plan, in seconds from the start.
pub fn plan(args: &Args) -> Vec<(u64, Step)> {
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
    plan
}

/// What carries out the plan, and what it noted.
pub struct Disruptor<'a> {
    pub args: &'a Args,
    pub run: &'a str,
    pub pg_url: &'a str,
    pub brokers: &'a str,
    pub topics: &'a [String],
    pub env: &'a [(String, String)],
    pub db: tokio_postgres::Client,
    pub started: std::time::Instant,
    /// label → (from ms, to ms) of each disruption window, for the latency table.
    pub windows: BTreeMap<&'static str, (i64, i64)>,
    pub counts: BTreeMap<&'static str, String>,
    pub poison: Vec<(Uuid, &'static str)>,
    pub pg_restarts: usize,
    frozen_at: i64,
    kafka_down_at: i64,
}

impl<'a> Disruptor<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        args: &'a Args,
        run: &'a str,
        pg_url: &'a str,
        brokers: &'a str,
        topics: &'a [String],
        env: &'a [(String, String)],
        db: tokio_postgres::Client,
        started: std::time::Instant,
    ) -> Disruptor<'a> {
        Disruptor {
            args,
            run,
            pg_url,
            brokers,
            topics,
            env,
            db,
            started,
            windows: BTreeMap::new(),
            counts: BTreeMap::new(),
            poison: Vec::new(),
            pg_restarts: 0,
            frozen_at: 0,
            kafka_down_at: 0,
        }
    }

    fn log(&self, msg: impl AsRef<str>) {
        log(self.started, msg);
    }

    fn open(&mut self, label: &'static str) {
        self.windows.insert(label, (now_ms(), 0));
    }

    fn close(&mut self, label: &'static str) {
        self.windows.entry(label).and_modify(|w| w.1 = now_ms());
    }

    pub async fn poison(&mut self, round: usize) {
        let injected = poison::inject(&self.db, self.run, round).await;
        self.poison.extend(injected);
        self.log(format!("poison injected (round {})", round + 1));
    }

    pub async fn step(&mut self, what: Step, relays: &mut Relays) {
        match what {
            Step::HoldStart => {
                self.log(format!("a REPEATABLE READ transaction holds the xmin horizon for {} s", self.args.hold));
                let sql = format!("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM public.{}", self.run);
                self.db.batch_execute(&sql).await.expect("hold");
                self.open("long transaction held");
            }
            Step::HoldEnd => {
                self.db.batch_execute("COMMIT").await.ok();
                self.close("long transaction held");
                self.log("horizon released");
            }
            Step::Freeze => {
                let i = 1.min(relays.children.len() - 1);
                relays.frozen = Some(i);
                self.frozen_at = now_ms();
                relays.children[i].signal(libc::SIGSTOP);
                self.open("relay 1 frozen");
                self.log(format!("relay {i} frozen (SIGSTOP) for {} s", self.args.freeze));
            }
            Step::Thaw => {
                if let Some(i) = relays.frozen.take() {
                    // It sends the batch it held (others published it meanwhile).
                    relays.window(self.frozen_at, now_ms(), Some(i), Cause::Freeze);
                    relays.children[i].signal(libc::SIGCONT);
                    self.close("relay 1 frozen");
                    self.log(format!("relay {i} thawed (SIGCONT)"));
                }
            }
            Step::KafkaStop => {
                self.log(format!("stopping Kafka for {} s", self.args.kafka_outage));
                self.kafka_down_at = now_ms();
                infra_cmd(&["stop-kafka"]);
                self.open("Kafka down");
            }
            Step::KafkaStart => {
                self.log("starting Kafka");
                infra_cmd(&["start-kafka"]);
                // every batch sent before the stop and given back meanwhile
                relays.window(self.kafka_down_at, now_ms(), None, Cause::KafkaOutage);
                self.close("Kafka down");
            }
            Step::LeaderKill => self.leader_kill(relays).await,
            Step::RollingRestart => self.rolling_restart(relays).await,
            Step::CoordinatorKill => self.coordinator_kill(relays).await,
            Step::TwoBrokersDown => self.two_brokers_down(relays).await,
            Step::PostgresRestart => {
                self.log("restarting Postgres");
                // a window: a batch sent while Postgres goes down and comes back
                // cannot be recorded, and goes out again
                let from = now_ms();
                infra_cmd(&["restart-postgres"]);
                relays.window(from, now_ms(), None, Cause::PostgresRestart);
                self.pg_restarts += 1;
                self.db = outbox_relay_support::pg_at(self.pg_url).await;
            }
            Step::Poison => self.poison(1).await,
            Step::SwitchModes | Step::SwitchBack => {
                let to = if what == Step::SwitchModes { !self.args.exactly_once } else { self.args.exactly_once };
                let label = if to { "exactly-once" } else { "at-least-once" };
                self.log(format!("rolling switch of relays 1..{} to {label} (relay 0 stays)", self.args.relays - 1));
                for i in 1..self.args.relays {
                    relays.switch(i, to);
                }
                if what == Step::SwitchModes {
                    self.open("both delivery modes on the table");
                } else {
                    self.close("both delivery modes on the table");
                }
            }
        }
    }

    async fn leader_kill(&mut self, relays: &mut Relays) {
        let victim = busiest_leader(self.brokers, self.topics);
        self.log(format!("SIGKILL broker {victim}, leader of {}[0]", self.topics[0]));
        let from = now_ms();
        self.windows.entry("leader kills (first)").or_insert((from, 0));
        infra_cmd(&["broker", "kill", &victim.to_string()]);
        tokio::time::sleep(Duration::from_secs(8)).await;
        infra_cmd(&["broker", "start", &victim.to_string()]);
        relays.window(from, now_ms(), None, Cause::LeaderKill);
        self.windows.entry("leader kills (first)").and_modify(|w| {
            if w.1 == 0 {
                w.1 = now_ms()
            }
        });
        let n = self.counts.get("partition leaders SIGKILLed").and_then(|c| c.parse::<u32>().ok()).unwrap_or(0);
        self.counts.insert("partition leaders SIGKILLed", (n + 1).to_string());
    }

    async fn rolling_restart(&mut self, relays: &mut Relays) {
        self.log("rolling restart of the 3 brokers");
        self.open("rolling restart");
        for n in 1..=3 {
            let from = now_ms();
            infra_cmd(&["broker", "stop", &n.to_string()]);
            infra_cmd(&["broker", "start", &n.to_string()]);
            let synced = wait_isr(self.brokers, self.topics, 3, Duration::from_secs(90)).await;
            relays.window(from, now_ms(), None, Cause::BrokerRestart);
            self.log(format!(
                "  broker {n} restarted{}",
                if synced { ", in sync" } else { ", NOT in sync after 90 s" }
            ));
        }
        self.close("rolling restart");
        self.counts.insert("rolling restart (brokers)", "3/3".into());
    }

    async fn coordinator_kill(&mut self, relays: &mut Relays) {
        let settings = Settings::load_from(None, self.env.to_vec()).expect("settings");
        let ids = Store::new(&settings).expect("store").txn_ids().await.expect("txn ids");
        let txn = ids.transactional_id(&super::relays::relay_id(0));
        let Some(victim) = coordinator(self.brokers, &txn) else { return };
        self.log(format!("SIGKILL broker {victim}, transaction coordinator of {txn}"));
        let from = now_ms();
        self.open("transaction coordinator killed");
        infra_cmd(&["broker", "kill", &victim.to_string()]);
        tokio::time::sleep(Duration::from_secs(8)).await;
        infra_cmd(&["broker", "start", &victim.to_string()]);
        relays.window(from, now_ms(), None, Cause::CoordinatorKill);
        self.close("transaction coordinator killed");
        self.counts.insert("transaction coordinator SIGKILLed", format!("broker {victim}"));
    }

    async fn two_brokers_down(&mut self, relays: &mut Relays) {
        let (a, b) = (2, 3);
        self.log(format!(
            "brokers {a} and {b} down for 20 s: writes must stall (min.insync.replicas = 2), nothing parks"
        ));
        // (chaos fails if anything but the poison rows is parked)
        let from = now_ms();
        infra_cmd(&["broker", "stop", &a.to_string()]);
        infra_cmd(&["broker", "stop", &b.to_string()]);
        self.open("two brokers down");
        tokio::time::sleep(Duration::from_secs(20)).await;
        infra_cmd(&["broker", "start", &a.to_string()]);
        self.close("two brokers down");
        self.log(format!("broker {a} back: 2 in sync, events flow again"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        infra_cmd(&["broker", "start", &b.to_string()]);
        relays.window(from, now_ms(), None, Cause::TwoBrokersDown);
        self.counts.insert("two brokers down at once (s)", "20".into());
    }
}
