//! Shared pieces of the benchmark and chaos harnesses: the local Postgres and
//! Kafka, relay processes that die with the harness, paced application writers,
//! a consumer that measures latency, and what the machine spent (CPU, WAL).

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_postgres::NoTls;

/// ≈ 1 KB of JSON per event.
pub const PAD: usize = 960;

pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// The local infrastructure and the relay binary.
#[derive(Debug, Clone)]
pub struct Env {
    pub pg_url: String,
    pub brokers: String,
    pub relay_bin: PathBuf,
    /// Replication factor of the topics the harness creates.
    pub replication: i32,
}

impl Env {
    /// From `OUTBOX_RELAY__POSTGRES__URL` / `OUTBOX_RELAY__KAFKA__BROKERS`
    /// (`scripts/infra env` prints them).
    pub fn from_env(relay_bin: PathBuf) -> Env {
        let pg_url =
            std::env::var("OUTBOX_RELAY__POSTGRES__URL").expect("OUTBOX_RELAY__POSTGRES__URL (run via scripts/)");
        let brokers = std::env::var("OUTBOX_RELAY__KAFKA__BROKERS").expect("OUTBOX_RELAY__KAFKA__BROKERS");
        let replication = if brokers.split(',').count() >= 3 { 3 } else { 1 };
        Env { pg_url, brokers, relay_bin, replication }
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(&self.pg_url, NoTls).await.expect("connect to Postgres");
        tokio::spawn(conn);
        c
    }

    /// `outbox-relay` for `table` with `settings` (`OUTBOX_RELAY__…` pairs).
    pub fn relay_cmd(&self, table: &str, settings: &[(String, String)]) -> Command {
        let mut cmd = Command::new(&self.relay_bin);
        cmd.env("OUTBOX_RELAY__POSTGRES__URL", &self.pg_url)
            .env("OUTBOX_RELAY__KAFKA__BROKERS", &self.brokers)
            .env("OUTBOX_RELAY__OUTBOX__TABLE", table)
            .env("OUTBOX_RELAY__HTTP__LISTEN", "")
            .env("OUTBOX_RELAY__LOG__LEVEL", "warn");
        for (k, v) in settings {
            cmd.env(k, v);
        }
        cmd
    }

    /// A new outbox table `<prefix>_<random>`, migrated.
    pub fn new_table(&self, prefix: &str) -> String {
        let table = format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let out = self.relay_cmd(&table, &[]).arg("migrate").output().expect("migrate");
        assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
        table
    }

    /// Topics `<run>.<name>` with `partitions` each (LogAppendTime if asked:
    /// the broker then stamps when it appended, for commit→ack latency).
    pub async fn topics(&self, run: &str, names: &[&str], partitions: i32, append_time: bool) -> Vec<String> {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.brokers).create().expect("admin");
        let topics: Vec<String> = names.iter().map(|t| format!("{run}.{t}")).collect();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| {
                let n = NewTopic::new(t, partitions, TopicReplication::Fixed(self.replication));
                let n = if self.replication >= 3 { n.set("min.insync.replicas", "2") } else { n };
                if append_time {
                    n.set("message.timestamp.type", "LogAppendTime")
                } else {
                    n
                }
            })
            .collect();
        for r in admin.create_topics(&new, &AdminOptions::new()).await.expect("create topics") {
            if let Err((t, e)) = r {
                assert_eq!(e, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "create topic {t}: {e}");
            }
        }
        topics
    }

    /// The lowest pending seq (None when drained): one index probe.
    pub async fn head(&self, db: &tokio_postgres::Client, table: &str) -> Option<i64> {
        db.query_one(
            &format!(
                "SELECT (SELECT seq FROM public.{table} WHERE published_at IS NULL AND parked_at IS NULL ORDER BY seq LIMIT 1)"
            ),
            &[],
        )
        .await
        .expect("head")
        .get(0)
    }

    /// Pending rows (counted through the pending index).
    pub async fn pending(&self, db: &tokio_postgres::Client, table: &str) -> i64 {
        db.query_one(
            &format!("SELECT count(*) FROM public.{table} WHERE published_at IS NULL AND parked_at IS NULL"),
            &[],
        )
        .await
        .expect("pending")
        .get(0)
    }
}

/// A child process in its own process group, killed (the whole group) when
/// dropped, and killed by the kernel if the harness itself dies.
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        cmd.process_group(0);
        // SAFETY: prctl in the forked child before exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Proc { child: Some(cmd.spawn().expect("spawn")) }
    }

    /// Nothing (while a slot's process is being replaced).
    pub fn placeholder() -> Proc {
        Proc { child: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's process group.
            unsafe {
                libc::kill(-(c.id() as i32), sig);
            }
        }
    }

    /// SIGTERM, then wait (SIGKILL after `timeout`). Returns whether it exited 0.
    pub fn stop(mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else { return false };
        // SAFETY: as in `signal`.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            if Instant::now() > deadline {
                unsafe {
                    libc::kill(-(c.id() as i32), libc::SIGKILL);
                }
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL the whole group and reap it.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as in `signal`.
            unsafe {
                libc::kill(-(c.id() as i32), libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// Has it exited (and how)?
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// A relay process whose stderr goes to the harness's stderr.
pub fn spawn_relay(env: &Env, table: &str, settings: &[(String, String)]) -> Proc {
    let mut cmd = env.relay_cmd(table, settings);
    cmd.arg("run").stdout(Stdio::null()).stderr(Stdio::inherit());
    Proc::spawn(cmd)
}

/// Settings as owned pairs.
pub fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Busy CPU seconds of the whole machine so far (all processes), from /proc/stat.
pub fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let f: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum::<f64>() / 100.0
}

/// utime + stime of one process, in seconds.
pub fn proc_cpu_s(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().map_or(0.0, |s| stat_cpu(&s))
}

fn stat_cpu(stat: &str) -> f64 {
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime, stime, cutime, cstime (fields 14-17): children count once they are reaped
    (t(11) + t(12) + t(13) + t(14)) / 100.0
}

/// CPU seconds of every PostgreSQL process so far (the postmaster with the
/// backends it reaped, and the live backends, autovacuum and WAL writer).
pub fn postgres_cpu_s() -> f64 {
    let mut total = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            if stat.contains("(postgres)") {
                total += stat_cpu(&stat);
            }
        }
    }
    total
}

pub fn proc_peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// WAL written so far, in bytes.
pub async fn wal_bytes(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await.expect("wal lsn").get(0)
}

/// What the machine spent over an interval: wall time, Postgres CPU, WAL.
pub struct Meter {
    t: Instant,
    pg_cpu: f64,
    wal: i64,
    machine: f64,
}

#[derive(Debug, Clone, Copy, serde::Serialize, Default)]
pub struct Spent {
    pub seconds: f64,
    pub postgres_cpu_s: f64,
    pub wal_bytes: i64,
    pub machine_cpu_s: f64,
}

impl Meter {
    pub async fn start(db: &tokio_postgres::Client) -> Meter {
        Meter { t: Instant::now(), pg_cpu: postgres_cpu_s(), wal: wal_bytes(db).await, machine: machine_busy_s() }
    }

    pub async fn stop(&self, db: &tokio_postgres::Client) -> Spent {
        Spent {
            seconds: self.t.elapsed().as_secs_f64(),
            postgres_cpu_s: postgres_cpu_s() - self.pg_cpu,
            wal_bytes: wal_bytes(db).await - self.wal,
            machine_cpu_s: machine_busy_s() - self.machine,
        }
    }
}

#[derive(Debug, serde::Serialize, Clone, Default)]
pub struct Quantiles {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

pub fn quantiles(mut v: Vec<f64>) -> Quantiles {
    if v.is_empty() {
        return Quantiles::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    Quantiles { n: v.len(), p50: q(0.50), p99: q(0.99), p999: q(0.999), max: v[v.len() - 1] }
}

/// Application writers: `connections` sessions, each committing transactions
/// of `per_tx` events (the business row is left out: this measures the relay),
/// paced to `rate` events/s in total. Each payload carries `clock_timestamp()`
/// at insert (`ts_us`) for latency. Keys: `key-<n % keys>`, each writer owning
/// its own share, so seq order is commit order per key.
pub struct Writers {
    pub stop: Arc<AtomicBool>,
    pub written: Arc<AtomicU64>,
    pub rate: Arc<AtomicU64>,
    /// When each transaction's COMMIT returned to the writer (µs since the
    /// epoch), by the transaction number in its events' payload (`tx`).
    pub commits: Arc<std::sync::Mutex<HashMap<i64, i64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub started: Instant,
}

pub struct WriterSpec {
    pub table: String,
    pub topics: Vec<String>,
    pub connections: u64,
    pub per_tx: u64,
    pub rate: u64,
    pub keys: u64,
    /// A key that takes this share of the events (0: none), written by writer 0.
    pub hot_key_share: f64,
}

impl Writers {
    pub fn start(env: &Env, spec: WriterSpec) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(spec.rate));
        let commits: Arc<std::sync::Mutex<HashMap<i64, i64>>> = Arc::default();
        let spec = Arc::new(spec);
        let mut tasks = Vec::new();
        for w in 0..spec.connections {
            let (url, stop, written, rate, spec, commits) =
                (env.pg_url.clone(), stop.clone(), written.clone(), rate.clone(), spec.clone(), commits.clone());
            tasks.push(tokio::spawn(async move {
                let Ok((mut db, conn)) = tokio_postgres::connect(&url, NoTls).await else { return };
                tokio::spawn(conn);
                let n_topics = spec.topics.len() as i64;
                let stmt = format!(
                    "INSERT INTO public.{} (topic, key, payload)
                     SELECT ($3::text[])[1 + (($1::bigint + i) % {n_topics})], k,
                            jsonb_build_object('ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::int8,
                                               'tx', $1::bigint, 'pad', repeat('x', {PAD}))
                     FROM unnest($2::text[]) WITH ORDINALITY AS u(k, i)",
                    spec.table
                );
                let mut n: u64 = 0;
                let mut due = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let keys: Vec<String> = (0..spec.per_tx)
                        .map(|j| {
                            let x = (n * spec.connections + w) * spec.per_tx + j;
                            if w == 0
                                && spec.hot_key_share > 0.0
                                && fastrand::f64() < spec.hot_key_share * spec.connections as f64
                            {
                                "hot-key".to_string()
                            } else {
                                // writer w owns keys ≡ w (mod connections)
                                let k = (x * 7919 / spec.connections) % (spec.keys / spec.connections).max(1);
                                format!("key-{}", k * spec.connections + w)
                            }
                        })
                        .collect();
                    let Ok(tx) = db.transaction().await else { return };
                    if tx.execute(&stmt, &[&((n * spec.connections + w) as i64), &keys, &spec.topics]).await.is_err() {
                        return;
                    }
                    if tx.commit().await.is_err() {
                        return;
                    }
                    if let Ok(mut c) = commits.lock() {
                        c.insert((n * spec.connections + w) as i64, now_us());
                    }
                    n += 1;
                    written.fetch_add(spec.per_tx, Ordering::Relaxed);
                    let r = rate.load(Ordering::Relaxed).max(1);
                    due += Duration::from_secs_f64(spec.per_tx as f64 * spec.connections as f64 / r as f64);
                    match due.checked_duration_since(Instant::now()) {
                        Some(wait) => tokio::time::sleep(wait).await,
                        // fell behind (e.g. the database is saturated): do not burst to catch up
                        None if Instant::now() - due > Duration::from_secs(1) => due = Instant::now(),
                        None => {}
                    }
                }
            }));
        }
        Writers { stop, written, rate, commits, tasks, started: Instant::now() }
    }

    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.written.load(Ordering::Relaxed)
    }
}

/// One message as the latency consumer saw it.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// When the consumer got it (µs since the epoch).
    pub recv_us: i64,
    /// The broker's append time (LogAppendTime topics), µs.
    pub append_us: Option<i64>,
    /// When the application inserted it (`ts_us` in the payload).
    pub insert_us: i64,
    /// Its writer transaction (`tx` in the payload).
    pub tx: Option<i64>,
    pub hot: bool,
}

/// A read_committed consumer from the topics' current end, collecting every
/// message's timestamps until stopped.
pub struct LatencyConsumer {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl LatencyConsumer {
    /// Starts and waits until it is connected and fetching.
    pub fn start(env: &Env, topics: &[String], partitions: i32) -> LatencyConsumer {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let (brokers, topics) = (env.brokers.clone(), topics.to_vec());
        let handle = {
            let (seen, stop, ready) = (seen.clone(), stop.clone(), ready.clone());
            std::thread::spawn(move || {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("group.id", format!("bench-{}", uuid::Uuid::new_v4()))
                    .set("enable.auto.commit", "false")
                    .set("isolation.level", "read_committed")
                    .set("fetch.wait.max.ms", "5")
                    .set("fetch.min.bytes", "1")
                    .create()
                    .expect("consumer");
                let mut tpl = TopicPartitionList::new();
                for t in &topics {
                    for p in 0..partitions {
                        tpl.add_partition_offset(t, p, Offset::End).expect("tpl");
                    }
                }
                c.assign(&tpl).expect("assign");
                let warm = Instant::now();
                while warm.elapsed() < Duration::from_secs(2) {
                    let _ = c.poll(Duration::from_millis(50));
                }
                ready.store(true, Ordering::Relaxed);
                let mut batch = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let polled = c.poll(Duration::from_millis(20));
                    let idle = polled.is_none();
                    if let Some(Ok(m)) = polled {
                        let recv_us = now_us();
                        let body = m.payload().and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok());
                        let insert_us = body.as_ref().and_then(|v| v["ts_us"].as_i64());
                        let tx = body.as_ref().and_then(|v| v["tx"].as_i64());
                        if let Some(insert_us) = insert_us {
                            let append_us = match m.timestamp() {
                                Timestamp::LogAppendTime(ms) => Some(ms * 1000),
                                _ => None,
                            };
                            batch.push(Seen { recv_us, append_us, insert_us, tx, hot: m.key() == Some(b"hot-key") });
                        }
                    }
                    if batch.len() >= 100 || (idle && !batch.is_empty()) {
                        seen.lock().expect("seen").append(&mut batch);
                    }
                }
                seen.lock().expect("seen").append(&mut batch);
            })
        };
        while !ready.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        LatencyConsumer { seen, stop, handle }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }

    /// Waits until `expected` messages arrived (or nothing came for `idle`).
    pub fn wait_for(&self, expected: usize, idle: Duration) {
        let (mut last, mut at) = (self.count(), Instant::now());
        while self.count() < expected && at.elapsed() < idle {
            std::thread::sleep(Duration::from_millis(50));
            let n = self.count();
            if n != last {
                (last, at) = (n, Instant::now());
            }
        }
    }

    pub fn finish(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        std::mem::take(&mut *self.seen.lock().expect("seen"))
    }
}

/// commit→ack (broker append) latencies in ms of `seen`.
pub fn insert_to_ack_ms(seen: &[Seen]) -> Vec<f64> {
    seen.iter().filter_map(|s| s.append_us.map(|a| (a - s.insert_us) as f64 / 1000.0)).collect()
}

/// Commit→ack latencies in ms, from when the writer's COMMIT returned (its
/// `commits`) to the broker's append time: what the relay adds. The functions
/// around it start at the INSERT, which also counts the application's own
/// commit (a WAL flush) and so bound this from above.
pub fn commit_to_ack_ms(seen: &[Seen], commits: &HashMap<i64, i64>) -> Vec<f64> {
    seen.iter()
        .filter_map(|s| match (s.append_us, s.tx.and_then(|t| commits.get(&t))) {
            // LogAppendTime has 1 ms resolution; an append in the same ms as the
            // commit returned reads as up to 1 ms early
            (Some(a), Some(&c)) => Some(((a - c) as f64 / 1000.0).max(0.0)),
            _ => None,
        })
        .collect()
}

/// Insert→visible (consumer got it) latencies in ms.
pub fn insert_to_visible_ms(seen: &[Seen]) -> Vec<f64> {
    seen.iter().map(|s| (s.recv_us - s.insert_us) as f64 / 1000.0).collect()
}

/// The host's CPU model and core count, for the report header.
pub fn host() -> (usize, String) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), model)
}

/// Saves `json` under `dir/<date>.json` and returns the path.
pub fn save(dir: &std::path::Path, json: &serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(dir).ok();
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "-");
    let path = dir.join(format!("{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(json).unwrap_or_default()).expect("write results");
    path
}

/// Per-window counts and latency of `seen` (windows of `width` from `t0_us`).
pub fn windows(seen: &[Seen], t0_us: i64, width: Duration, count: usize) -> Vec<(usize, Quantiles)> {
    let w = width.as_micros() as i64;
    let mut buckets: HashMap<usize, Vec<f64>> = HashMap::new();
    for s in seen {
        let Some(a) = s.append_us else { continue };
        if a < t0_us {
            continue;
        }
        let i = ((a - t0_us) / w) as usize;
        if i < count {
            buckets.entry(i).or_default().push((a - s.insert_us) as f64 / 1000.0);
        }
    }
    (0..count)
        .map(|i| {
            let v = buckets.remove(&i).unwrap_or_default();
            (v.len(), quantiles(v))
        })
        .collect()
}
