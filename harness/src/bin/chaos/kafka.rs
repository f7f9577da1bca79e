//! What the chaos run asks the cluster: which broker to kill, and whether the
//! cluster is back in sync.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

fn consumer(brokers: &str) -> BaseConsumer {
    rdkafka::ClientConfig::new().set("bootstrap.servers", brokers).create().expect("consumer")
}

/// The broker leading partition 0 of the first topic (the writers spread
/// evenly, so every partition is as busy as the others).
pub fn busiest_leader(brokers: &str, topics: &[String]) -> i32 {
    let md = consumer(brokers).fetch_metadata(Some(&topics[0]), Duration::from_secs(10)).expect("metadata");
    md.topics()[0].partitions().iter().find(|p| p.id() == 0).map(|p| p.leader()).unwrap_or(1)
}

/// The broker coordinating `transactional_id`: the leader of its partition of
/// `__transaction_state` (Java's String.hashCode, as the broker computes it).
pub fn coordinator(brokers: &str, transactional_id: &str) -> Option<i32> {
    let h = transactional_id.encode_utf16().fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32));
    let md = consumer(brokers).fetch_metadata(Some("__transaction_state"), Duration::from_secs(10)).ok()?;
    let parts = md.topics().first()?.partitions();
    let p = (h & 0x7fff_ffff) % parts.len().max(1) as i32;
    parts.iter().find(|x| x.id() == p).map(|x| x.leader())
}

/// Waits until every partition of `topics` has `n` in-sync replicas.
pub async fn wait_isr(brokers: &str, topics: &[String], n: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let c = consumer(brokers);
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
