//! A consumer that timestamps every message, and the latencies read from it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::report::{quantiles, Quantiles};
use crate::writer::now_us;

/// One message as the latency consumer saw it.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
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
    pub seen: Arc<Mutex<Vec<Timed>>>,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl LatencyConsumer {
    /// Starts and waits until it is connected and fetching.
    pub fn start(brokers: &str, topics: &[String], partitions: i32) -> LatencyConsumer {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let (brokers, topics) = (brokers.to_string(), topics.to_vec());
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
                            batch.push(Timed { recv_us, append_us, insert_us, tx, hot: m.key() == Some(b"hot-key") });
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

    pub fn finish(self) -> Vec<Timed> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        std::mem::take(&mut *self.seen.lock().expect("seen"))
    }
}

/// commit→ack (broker append) latencies in ms of `seen`.
pub fn insert_to_ack_ms(seen: &[Timed]) -> Vec<f64> {
    seen.iter().filter_map(|s| s.append_us.map(|a| (a - s.insert_us) as f64 / 1000.0)).collect()
}

/// Commit→ack latencies in ms, from when the writer's COMMIT returned (its
/// `commits`) to the broker's append time: what the relay adds. The functions
/// around it start at the INSERT, which also counts the application's own
/// commit (a WAL flush) and so bound this from above.
pub fn commit_to_ack_ms(seen: &[Timed], commits: &HashMap<i64, i64>) -> Vec<f64> {
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
pub fn insert_to_visible_ms(seen: &[Timed]) -> Vec<f64> {
    seen.iter().map(|s| (s.recv_us - s.insert_us) as f64 / 1000.0).collect()
}

/// Per-window counts and latency of `seen` (windows of `width` from `t0_us`).
pub fn windows(seen: &[Timed], t0_us: i64, width: Duration, count: usize) -> Vec<(usize, Quantiles)> {
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
