//! The application: writers committing events into the outbox, paced, over a
//! set of keys each writer owns (so `seq` order is commit order per key, the
//! documented assumption), surviving Postgres restarts if asked, rolling some
//! transactions back if asked (those must never be published).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::NoTls;

/// ≈ 1 KB of JSON per event.
pub const PAD: usize = 960;

pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// What the application writes.
#[derive(Debug, Clone)]
pub struct WriterSpec {
    pub pg_url: String,
    /// Schema-qualified outbox table.
    pub table: String,
    /// Events go to these topics in turn.
    pub topics: Vec<String>,
    /// Sessions writing at once.
    pub connections: u64,
    /// Events per transaction.
    pub per_tx: u64,
    /// Events per second in total (0: as fast as the database takes them).
    pub rate: u64,
    /// Keys `key-0`..; writer `w` owns the keys ≡ w (mod connections).
    pub keys: u64,
    /// A key that takes this share of the events (0: none), written by writer 0.
    pub hot_key_share: f64,
    /// Payload padding (`PAD` for ≈1 KB events).
    pub pad: usize,
    /// Reconnect and go on after an error (Postgres restarted); otherwise stop.
    pub reconnect: bool,
    /// This share of transactions is rolled back (their events never exist).
    pub rollback_share: f64,
    /// Stop after this many committed events in all (0: until stopped).
    pub max_events: u64,
}

impl WriterSpec {
    /// One session, 10 events per transaction over 20 keys, ~2k events/s,
    /// reconnecting: the tests' application.
    pub fn small(table: &str, topic: &str) -> WriterSpec {
        WriterSpec {
            pg_url: crate::infra::pg_url(),
            table: table.to_string(),
            topics: vec![topic.to_string()],
            connections: 1,
            per_tx: 10,
            rate: 2000,
            keys: 20,
            hot_key_share: 0.0,
            pad: 0,
            reconnect: true,
            rollback_share: 0.0,
            max_events: 0,
        }
    }
}

/// Running writers. Each payload carries `clock_timestamp()` at insert
/// (`ts_us`), the transaction number (`tx`) and the event number (`n`).
pub struct Writers {
    pub stop: Arc<AtomicBool>,
    /// Events committed (a commit whose answer was lost to a restart is not counted).
    pub written: Arc<AtomicU64>,
    /// Events rolled back.
    pub rolled_back: Arc<AtomicU64>,
    /// The pace, changeable while running.
    pub rate: Arc<AtomicU64>,
    /// When each transaction's COMMIT returned to the writer (µs since the
    /// epoch), by the transaction number in its events' payload (`tx`).
    pub commits: Arc<Mutex<HashMap<i64, i64>>>,
    /// Each committed transaction: when its COMMIT returned (µs since the
    /// epoch) and how long it took from BEGIN (ms): the application's latency.
    pub durations: Arc<Mutex<Vec<(i64, f64)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub started: Instant,
}

struct Shared {
    spec: WriterSpec,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    rolled_back: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
    commits: Arc<Mutex<HashMap<i64, i64>>>,
    durations: Arc<Mutex<Vec<(i64, f64)>>>,
}

impl Writers {
    pub fn start(spec: WriterSpec) -> Writers {
        let shared = Arc::new(Shared {
            rate: Arc::new(AtomicU64::new(spec.rate)),
            spec,
            stop: Arc::default(),
            written: Arc::default(),
            rolled_back: Arc::default(),
            commits: Arc::default(),
            durations: Arc::default(),
        });
        let tasks = (0..shared.spec.connections)
            .map(|w| {
                let shared = shared.clone();
                tokio::spawn(async move { shared.write(w).await })
            })
            .collect();
        Writers {
            stop: shared.stop.clone(),
            written: shared.written.clone(),
            rolled_back: shared.rolled_back.clone(),
            rate: shared.rate.clone(),
            commits: shared.commits.clone(),
            durations: shared.durations.clone(),
            tasks,
            started: Instant::now(),
        }
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Stops the writers; returns the events committed.
    /// Have the writers written all they were to (`max_events`)?
    pub fn is_finished(&self) -> bool {
        self.tasks.iter().all(|t| t.is_finished())
    }

    pub async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.written.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn sql(&self) -> String {
        let n_topics = self.spec.topics.len().max(1) as i64;
        format!(
            "INSERT INTO {} (topic, key, payload)
             SELECT ($3::text[])[1 + (($1::bigint + i) % {n_topics})], k,
                    jsonb_build_object('ts_us', (extract(epoch FROM clock_timestamp()) * 1000000)::int8,
                                       'tx', $1::bigint, 'n', $1::bigint * {per_tx} + i, 'pad', repeat('x', {pad}))
             FROM unnest($2::text[]) WITH ORDINALITY AS u(k, i)",
            self.spec.table,
            per_tx = self.spec.per_tx,
            pad = self.spec.pad
        )
    }

    fn keys(&self, w: u64, n: u64) -> Vec<String> {
        let s = &self.spec;
        (0..s.per_tx)
            .map(|j| {
                if w == 0 && s.hot_key_share > 0.0 && fastrand::f64() < s.hot_key_share * s.connections as f64 {
                    return "hot-key".to_string();
                }
                let x = (n * s.connections + w) * s.per_tx + j;
                // writer w owns keys ≡ w (mod connections)
                let k = (x * 7919 / s.connections) % (s.keys / s.connections).max(1);
                format!("key-{}", k * s.connections + w)
            })
            .collect()
    }

    async fn write(&self, w: u64) {
        let stmt = self.sql();
        let s = &self.spec;
        let mut n: u64 = 0;
        let mut due = Instant::now();
        // each writer's share of max_events
        let share = if s.max_events == 0 { u64::MAX } else { s.max_events.div_ceil(s.connections) };
        let done = |n: u64| self.stop.load(Ordering::Relaxed) || n * s.per_tx >= share;
        while !done(n) {
            let Ok((mut db, conn)) = tokio_postgres::connect(&s.pg_url, NoTls).await else {
                if !s.reconnect {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            tokio::spawn(conn);
            while !done(n) {
                let tx_no = (n * s.connections + w) as i64;
                let keys = self.keys(w, n);
                let rollback = s.rollback_share > 0.0 && fastrand::f64() < s.rollback_share;
                let began = Instant::now();
                let r = async {
                    let tx = db.transaction().await?;
                    tx.execute(&stmt, &[&tx_no, &keys, &s.topics]).await?;
                    if rollback {
                        tx.rollback().await
                    } else {
                        tx.commit().await
                    }
                }
                .await;
                if r.is_err() {
                    // reconnect (or stop); the table is the truth about what committed
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                n += 1;
                if rollback {
                    self.rolled_back.fetch_add(s.per_tx, Ordering::Relaxed);
                } else {
                    let at = now_us();
                    if let Ok(mut c) = self.commits.lock() {
                        c.insert(tx_no, at);
                    }
                    if let Ok(mut d) = self.durations.lock() {
                        d.push((at, began.elapsed().as_secs_f64() * 1000.0));
                    }
                    self.written.fetch_add(s.per_tx, Ordering::Relaxed);
                }
                let r = self.rate.load(Ordering::Relaxed);
                if r == 0 {
                    continue;
                }
                due += Duration::from_secs_f64(s.per_tx as f64 * s.connections as f64 / r as f64);
                match due.checked_duration_since(Instant::now()) {
                    Some(wait) => tokio::time::sleep(wait).await,
                    // fell behind (e.g. the database is saturated): do not burst to catch up
                    None if Instant::now() - due > Duration::from_secs(1) => due = Instant::now(),
                    None => {}
                }
            }
            if !s.reconnect {
                return;
            }
        }
    }
}
