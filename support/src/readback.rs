//! Reading back what the relay published, and comparing it with the table
//! through the product's own `outbox_relay::verify::compare`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox_relay::store::PublishedRow;
use outbox_relay::verify::{compare, Seen};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::infra::{brokers, pg};
use crate::outbox::Outbox;

/// One message as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, Option<String>>,
    pub timestamp_ms: Option<i64>,
}

impl Received {
    pub fn event_id(&self) -> String {
        self.headers.get("event_id").cloned().flatten().expect("every message carries event_id")
    }

    /// As `outbox_relay::verify` reads a message.
    pub fn seen(&self) -> Seen {
        Seen {
            id: self.headers.get("event_id").cloned().flatten().and_then(|s| uuid::Uuid::parse_str(&s).ok()),
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            relay_id: self.headers.get("outbox_relay_id").cloned().flatten(),
        }
    }
}

/// Reads `topics` from the beginning (read_committed) until `expected` messages
/// arrived, then keeps reading for `settle` to catch duplicates. Fails (with
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
        if settle_until.is_some_and(|s| Instant::now() >= s) {
            break;
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
                    timestamp_ms: m.timestamp().to_millis(),
                });
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None => {}
        }
    }
    out
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
    /// Every message, for further checks.
    pub received: Vec<Received>,
}

/// Reads `topics` back (read_committed) and compares with every row of the table.
pub async fn delivery(ob: &Outbox, topics: &[String], settle: Duration) -> Delivery {
    delivery_from(&brokers(), ob, topics, settle).await
}

/// Like [`delivery`], reading the cluster at `bootstrap`.
pub async fn delivery_from(bootstrap: &str, ob: &Outbox, topics: &[String], settle: Duration) -> Delivery {
    let rows: Vec<PublishedRow> = pg()
        .await
        .query(&format!("SELECT id, seq, topic, key FROM {}", ob.qualified()), &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| PublishedRow { id: r.get(0), seq: r.get(1), topic: r.get(2), key: r.get(3), created_at_ms: 0 })
        .collect();
    let received = consume_from(bootstrap, topics, rows.len(), Duration::from_secs(120), settle);
    let seen: Vec<Seen> = received.iter().map(Received::seen).collect();
    let report = compare(&rows, &seen);
    let ids: HashSet<uuid::Uuid> = rows.iter().map(|r| r.id).collect();
    let lost_ids: HashSet<uuid::Uuid> = {
        let got: HashSet<uuid::Uuid> = seen.iter().filter_map(|s| s.id).collect();
        ids.iter().filter(|id| !got.contains(id)).copied().collect()
    };
    let d = Delivery {
        seq_of: rows.iter().map(|r| (r.id.to_string(), r.seq)).collect(),
        messages: received.len(),
        lost: lost_ids.iter().map(|id| id.to_string()).collect(),
        duplicates: report.duplicate_copies,
        order_violations: report.order_violations,
        unknown: seen.iter().filter(|s| s.id.is_none_or(|id| !ids.contains(&id))).count(),
        received,
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

/// Per-key order violations among `msgs` (each event's seq from `seq_of`),
/// counted by `outbox_relay::verify::compare`: within each (topic, partition),
/// a first copy of an event after a later event of its key. A redelivered
/// earlier event (a duplicate) is not a violation.
pub fn order_violations(msgs: &[Received], seq_of: &HashMap<String, i64>) -> usize {
    let mut rows: HashMap<String, PublishedRow> = HashMap::new();
    for m in msgs {
        let id = m.event_id();
        let seq = *seq_of.get(&id).unwrap_or_else(|| panic!("unknown event {id}"));
        rows.entry(id.clone()).or_insert_with(|| PublishedRow {
            id: uuid::Uuid::parse_str(&id).expect("event_id is a uuid"),
            seq,
            topic: m.topic.clone(),
            key: m.key.clone(),
            created_at_ms: 0,
        });
    }
    let rows: Vec<PublishedRow> = rows.into_values().collect();
    let seen: Vec<Seen> = msgs.iter().map(Received::seen).collect();
    compare(&rows, &seen).order_violations
}
