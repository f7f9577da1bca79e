//! Shared helpers for the integration tests: they run against the real local
//! PostgreSQL and Kafka started by `scripts/infra up` (or whatever
//! OUTBOX_RELAY__POSTGRES__URL / OUTBOX_RELAY__KAFKA__BROKERS point at), and FAIL
//! with a clear message when those are not reachable.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_postgres::NoTls;

pub const DEFAULT_PG: &str = "postgres://outbox:outbox@127.0.0.1:55432/outbox";
pub const DEFAULT_KAFKA: &str = "127.0.0.1:59092";

pub fn pg_url() -> String {
    std::env::var("OUTBOX_RELAY__POSTGRES__URL").unwrap_or_else(|_| DEFAULT_PG.into())
}

pub fn brokers() -> String {
    std::env::var("OUTBOX_RELAY__KAFKA__BROKERS").unwrap_or_else(|_| DEFAULT_KAFKA.into())
}

const MISSING: &str = "integration tests need the local PostgreSQL and Kafka: run `scripts/test` \
                       (or `scripts/infra up` and `eval \"$(scripts/infra env)\"`)";

/// A connected client; panics (fails the test) with instructions if Postgres is not there.
pub async fn pg() -> tokio_postgres::Client {
    let (client, conn) = match tokio_postgres::connect(&pg_url(), NoTls).await {
        Ok(c) => c,
        Err(e) => panic!("cannot connect to PostgreSQL ({e}); {MISSING}"),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Fails the test with instructions when the broker is not reachable.
pub fn require_kafka() {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("consumer config");
    if let Err(e) = c.fetch_metadata(None, Duration::from_secs(10)) {
        panic!("cannot reach Kafka at {} ({e}); {MISSING}", brokers());
    }
}

/// A fresh outbox table (migrated by the relay binary) and a topic prefix, unique
/// per test so tests can run in parallel.
pub struct Outbox {
    pub table: String,
}

impl Outbox {
    pub async fn new(prefix: &str) -> Outbox {
        Self::new_at(prefix, None).await
    }

    /// A table migrated only up to `to` (e.g. an installation of an older version).
    pub async fn new_at(prefix: &str, to: Option<i32>) -> Outbox {
        require_kafka();
        roll_back_abandoned_prepared().await;
        let table = format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut cmd = relay_cmd(&table, &[]);
        cmd.arg("migrate");
        if let Some(to) = to {
            cmd.arg("--to").arg(to.to_string());
        }
        let out = cmd.output().expect("run outbox-relay migrate");
        assert!(
            out.status.success(),
            "migrate failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Outbox { table }
    }

    /// A topic name for this test (created with `partitions` partitions).
    pub async fn topic(&self, name: &str, partitions: i32) -> String {
        let topic = format!("{}.{}", self.table, name);
        create_topic(&topic, partitions).await;
        topic
    }

    pub fn qualified(&self) -> String {
        format!("public.{}", self.table)
    }

    pub async fn count(&self, filter: &str) -> i64 {
        pg().await
            .query_one(&format!("SELECT count(*) FROM {} WHERE {filter}", self.qualified()), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until no row is pending (or panics after `timeout`).
    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self.count("published_at IS NULL AND parked_at IS NULL").await;
            if pending == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{pending} events still pending after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A relay process for this table with extra `OUTBOX_RELAY__…` settings.
    pub fn spawn_relay(&self, extra: &[(&str, &str)]) -> RelayProcess {
        self.spawn_relay_with(extra, None)
    }

    /// Like `spawn_relay`, with a TOML config file (for `kafka.properties`).
    pub fn spawn_relay_with(&self, extra: &[(&str, &str)], config_toml: Option<&str>) -> RelayProcess {
        let mut cmd = relay_cmd(&self.table, extra);
        if let Some(toml) = config_toml {
            let path = std::env::temp_dir().join(format!("{}-{}.toml", self.table, uuid::Uuid::new_v4().simple()));
            std::fs::write(&path, toml).expect("write config");
            cmd.arg("--config").arg(path);
        }
        cmd.arg("run").stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn outbox-relay run");
        // Drain stderr continuously: a full pipe would block the relay's logging.
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        RelayProcess { child: Some(child), log }
    }
}

/// Prepared transactions older than 10 minutes in the test database belong to
/// an interrupted earlier run (each test resolves its own): roll them back so
/// they hold no locks or xmin horizon into this run.
pub async fn roll_back_abandoned_prepared() {
    let db = pg().await;
    let gids = db
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND prepared < now() - interval '10 minutes'",
            &[],
        )
        .await
        .expect("pg_prepared_xacts");
    for r in gids {
        let gid: String = r.get(0);
        let _ = db.batch_execute(&format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''"))).await;
    }
}

/// `outbox-relay` with the test infrastructure and `table` configured.
pub fn relay_cmd(table: &str, extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OUTBOX_RELAY__POSTGRES__URL", pg_url())
        .env("OUTBOX_RELAY__KAFKA__BROKERS", brokers())
        .env("OUTBOX_RELAY__OUTBOX__TABLE", table)
        .env("OUTBOX_RELAY__HTTP__LISTEN", "")
        .env("OUTBOX_RELAY__RELAY__ID", table)
        .env("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT", "20s")
        .env("OUTBOX_RELAY__LOG__LEVEL", "info,librdkafka=error")
        .current_dir(std::env::temp_dir());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

pub struct RelayProcess {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl RelayProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or_default()
    }

    /// What the relay logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns (exit code, stderr).
    pub fn terminate(mut self, timeout: Duration) -> (Option<i32>, String) {
        let mut c = self.child.take().expect("relay running");
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(100)); // let the reader finish
                return (status.code(), self.log());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("relay did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to end by itself (e.g. a failpoint killed it).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("relay");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(Instant::now() < deadline, "relay still running after {timeout:?}: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the process is stopped (SIGSTOP, state `T` in /proc).
    pub fn wait_stopped(&mut self, timeout: Duration) {
        let pid = self.pid();
        let deadline = Instant::now() + timeout;
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "pid (comm) S ..." — the state follows the closing parenthesis
            if stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')) {
                return;
            }
            self.assert_running();
            assert!(Instant::now() < deadline, "relay not stopped after {timeout:?}: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (e.g. "-CONT") to the process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill").args([signal, &self.pid().to_string()]).status().expect("kill").success();
        assert!(ok, "kill {signal} {} failed", self.pid());
    }

    /// Panics if the process has already exited (with its stderr).
    pub fn assert_running(&mut self) {
        let c = self.child.as_mut().expect("relay");
        if let Some(status) = c.try_wait().expect("wait") {
            std::thread::sleep(Duration::from_millis(100));
            panic!("relay exited early ({status}): {}", self.log());
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A topic's configuration as the broker describes it.
pub async fn kafka_topic_config(name: &str) -> HashMap<String, String> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client");
    let res = admin
        .describe_configs([&rdkafka::admin::ResourceSpecifier::Topic(name)], &AdminOptions::new())
        .await
        .expect("describe configs");
    let r = res.into_iter().next().expect("one resource").expect("topic described");
    r.entries.iter().filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v))).collect()
}

pub async fn delete_topic(name: &str) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client");
    admin
        .delete_topics(&[name], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))))
        .await
        .expect("delete topic");
    // Wait until the broker no longer lists it.
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = c.fetch_metadata(Some(name), Duration::from_secs(5)).expect("metadata");
        if md.topics().first().is_none_or(|t| t.error().is_some() || t.partitions().is_empty()) {
            return;
        }
        assert!(Instant::now() < deadline, "topic {name} still listed after deletion");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let res = admin
        .create_topics(&[topic], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))))
        .await
        .unwrap_or_else(|e| panic!("create topic {name}: {e}; is Kafka running?"));
    for r in res {
        if let Err((t, code)) = r {
            assert_eq!(code, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "create topic {t}: {code:?}");
        }
    }
}

/// One message as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, Option<String>>,
}

impl Received {
    pub fn event_id(&self) -> String {
        self.headers.get("event_id").cloned().flatten().expect("every message carries event_id")
    }
}

/// Reads `topics` from the beginning (read_committed) until `expected` messages
/// arrived, then keeps reading for `settle` to catch duplicates. Panics (with
/// what it got) after `timeout`.
pub fn consume(topics: &[String], expected: usize, timeout: Duration, settle: Duration) -> Vec<Received> {
    consume_from(&brokers(), topics, expected, timeout, settle)
}

/// Like [`consume`], from the cluster at `bootstrap`.
pub fn consume_from(
    bootstrap: &str,
    topics: &[String],
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Received> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10)).expect("metadata");
        let parts = md.topics()[0].partitions().len();
        assert!(parts > 0, "topic {t} has no partitions");
        for p in 0..parts as i32 {
            tpl.add_partition_offset(t, p, Offset::Beginning).expect("tpl");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut settle_until: Option<Instant> = None;
    loop {
        if out.len() >= expected && settle_until.is_none() {
            settle_until = Some(Instant::now() + settle);
        }
        if let Some(s) = settle_until {
            if Instant::now() >= s {
                break;
            }
        }
        assert!(Instant::now() < deadline, "only {} of {expected} messages arrived within {timeout:?}", out.len());
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for hdr in h.iter() {
                        headers.insert(hdr.key.to_string(), hdr.value.map(|v| String::from_utf8_lossy(v).into_owned()));
                    }
                }
                out.push(Received {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    payload: m.payload().map(|p| p.to_vec()),
                    headers,
                });
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out
}

/// Per-key order check: within each (topic, partition), messages of one key must
/// appear in increasing `seq` order. Returns the number of violations. A
/// redelivered earlier event (a duplicate) is not a violation.
pub fn order_violations(msgs: &[Received], seq_of: &HashMap<String, i64>) -> usize {
    let mut sorted: Vec<&Received> = msgs.iter().collect();
    sorted.sort_by_key(|m| (m.topic.clone(), m.partition, m.offset));
    let mut last: HashMap<(String, String), i64> = HashMap::new();
    let mut seen: std::collections::HashSet<String> = Default::default();
    let mut violations = 0;
    for m in sorted {
        let id = m.event_id();
        let first_time = seen.insert(id.clone());
        let Some(key) = &m.key else { continue };
        let seq = *seq_of.get(&id).unwrap_or_else(|| panic!("unknown event {id}"));
        let slot = last.entry((m.topic.clone(), key.clone())).or_insert(i64::MIN);
        if seq < *slot && first_time {
            violations += 1;
        }
        *slot = (*slot).max(seq);
    }
    violations
}

/// What a read_committed consumer saw of an outbox table's rows on `topics`.
#[derive(Debug)]
pub struct Delivery {
    /// Rows in the table (id → seq).
    pub seq_of: HashMap<String, i64>,
    /// Messages read.
    pub messages: usize,
    /// Rows with no message.
    pub lost: Vec<String>,
    /// Extra copies beyond the first.
    pub duplicates: usize,
    pub order_violations: usize,
    /// Messages whose event_id is not a row of the table.
    pub unknown: usize,
}

/// Reads `topics` back (read_committed) and compares with every row of the table.
pub async fn delivery(ob: &Outbox, topics: &[String], settle: Duration) -> Delivery {
    delivery_from(&brokers(), ob, topics, settle).await
}

/// Like [`delivery`], reading the cluster at `bootstrap`.
pub async fn delivery_from(bootstrap: &str, ob: &Outbox, topics: &[String], settle: Duration) -> Delivery {
    let rows = pg().await.query(&format!("SELECT id::text, seq FROM {}", ob.qualified()), &[]).await.unwrap();
    let seq_of: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let msgs = consume_from(bootstrap, topics, seq_of.len(), Duration::from_secs(120), settle);
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &msgs {
        *count.entry(m.event_id()).or_default() += 1;
    }
    let d = Delivery {
        lost: seq_of.keys().filter(|id| !count.contains_key(*id)).cloned().collect(),
        duplicates: count.values().map(|c| c - 1).sum(),
        order_violations: order_violations(&msgs, &seq_of),
        unknown: count.keys().filter(|id| !seq_of.contains_key(*id)).count(),
        messages: msgs.len(),
        seq_of,
    };
    eprintln!(
        "rows {} messages {} lost {} duplicates {} order violations {}",
        d.seq_of.len(),
        d.messages,
        d.lost.len(),
        d.duplicates,
        d.order_violations
    );
    d
}
