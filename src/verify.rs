//! Proof on a live system: read back what the relay published (read_committed)
//! and compare it with the rows Postgres marked published — lost, duplicated,
//! out of order per key. Used by `outbox-relay verify` and `scripts/chaos`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use uuid::Uuid;

use crate::event::EVENT_ID_HEADER;
use crate::sink::RELAY_ID_HEADER;
use crate::store::PublishedRow;

/// One message read back from Kafka.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: Option<Uuid>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The message's timestamp, ms since the epoch: when the relay's producer
    /// took it (topics with CreateTime, the default) or when the broker
    /// appended it (LogAppendTime).
    pub timestamp_ms: Option<i64>,
    /// The relay that published it (the `outbox_relay_id` header).
    pub relay_id: Option<String>,
}

/// The comparison of rows and messages.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Rows Postgres marked published (in the window).
    pub expected: usize,
    /// Messages read that belong to those rows (copies included).
    pub delivered: usize,
    /// Rows without any message.
    pub lost: usize,
    /// Events seen more than once.
    pub duplicated_events: usize,
    /// Extra copies in all (delivered - distinct).
    pub duplicate_copies: usize,
    /// Most copies of one event.
    pub max_copies: usize,
    /// Events that reached their partition after a later event of their key.
    pub order_violations: usize,
    /// Messages without an event_id header.
    pub without_event_id: usize,
    pub lost_ids: Vec<Uuid>,
}

impl Report {
    pub fn duplicate_rate(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.duplicate_copies as f64 / self.expected as f64
        }
    }

    pub fn lost_rate(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.lost as f64 / self.expected as f64
        }
    }
}

/// Compares published rows with the messages read. Messages of events outside
/// `expected` (other windows, other tables) are ignored. A redelivered copy of
/// an earlier event is a duplicate, not an order violation.
pub fn compare(expected: &[PublishedRow], seen: &[Seen]) -> Report {
    let rows: HashMap<Uuid, &PublishedRow> = expected.iter().map(|r| (r.id, r)).collect();
    let mut copies: HashMap<Uuid, usize> = HashMap::with_capacity(expected.len());
    let mut sorted: Vec<&Seen> = seen.iter().collect();
    sorted.sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    let mut last_seq: HashMap<(&str, &str), i64> = HashMap::new();
    let mut report = Report { expected: expected.len(), ..Default::default() };
    for m in sorted {
        let Some(id) = m.id else {
            report.without_event_id += 1;
            continue;
        };
        let Some(row) = rows.get(&id) else { continue };
        report.delivered += 1;
        let n = copies.entry(id).or_default();
        *n += 1;
        let first = *n == 1;
        if let Some(key) = row.key.as_deref() {
            let slot = last_seq.entry((row.topic.as_str(), key)).or_insert(i64::MIN);
            if first && row.seq < *slot {
                report.order_violations += 1;
            }
            *slot = (*slot).max(row.seq);
        }
    }
    for r in expected {
        match copies.get(&r.id) {
            None => {
                report.lost += 1;
                if report.lost_ids.len() < 20 {
                    report.lost_ids.push(r.id);
                }
            }
            Some(&c) if c > 1 => {
                report.duplicated_events += 1;
                report.duplicate_copies += c - 1;
                report.max_copies = report.max_copies.max(c);
            }
            Some(&c) => report.max_copies = report.max_copies.max(c),
        }
    }
    report
}

/// Reads `topics` from the beginning up to their current end with a
/// read_committed consumer. `properties` are the relay's `kafka.properties`
/// (security settings apply to the consumer too). Blocking.
pub fn read_topics(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    topics: &[String],
    timeout: Duration,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Seen>, String> {
    let mut cfg = crate::sink::client_config(brokers, properties);
    cfg.set("group.id", format!("outbox-relay-verify-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer<crate::sink::RelayContext> =
        cfg.create_with_context(crate::sink::RelayContext::default()).map_err(|e| format!("kafka consumer: {e}"))?;
    let (tpl, ends) = partitions_to_read(&consumer, topics)?;
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&tpl).map_err(|e| format!("assign: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut last_check = Instant::now();
    loop {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.map_err(|e| format!("consume: {e}"))?;
            let header = |name: &str| {
                m.headers()
                    .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(str::to_string)
            };
            let id = header(EVENT_ID_HEADER).and_then(|s| Uuid::parse_str(&s).ok());
            let relay_id = header(RELAY_ID_HEADER);
            seen.push(Seen {
                id,
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                relay_id,
            });
            if seen.len() % 100_000 == 0 {
                progress(seen.len());
            }
        }
        if last_check.elapsed() > Duration::from_millis(500) {
            last_check = Instant::now();
            let pos = consumer.position().map_err(|e| format!("position: {e}"))?;
            let done = pos.elements().iter().all(|e| match e.offset() {
                Offset::Offset(o) => ends.get(&(e.topic().to_string(), e.partition())).is_none_or(|&end| o >= end),
                _ => false,
            });
            if done {
                progress(seen.len());
                return Ok(seen);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "read {} messages but did not reach the end of the topics within {timeout:?}",
                    seen.len()
                ));
            }
        }
    }
}

/// Every non-empty partition of `topics` from its beginning, and where it ends now.
#[allow(clippy::type_complexity)]
fn partitions_to_read(
    consumer: &BaseConsumer<crate::sink::RelayContext>,
    topics: &[String],
) -> Result<(TopicPartitionList, HashMap<(String, i32), i64>), String> {
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for t in topics {
        let md =
            consumer.fetch_metadata(Some(t), Duration::from_secs(10)).map_err(|e| format!("metadata of {t}: {e}"))?;
        let Some(mt) = md.topics().first() else {
            continue;
        };
        for p in mt.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(t, p.id(), Duration::from_secs(10))
                .map_err(|e| format!("watermarks of {t}/{}: {e}", p.id()))?;
            if high > 0 {
                ends.insert((t.clone(), p.id()), high);
                tpl.add_partition_offset(t, p.id(), Offset::Beginning).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok((tpl, ends))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, key: &str) -> PublishedRow {
        PublishedRow { id: Uuid::new_v4(), seq, topic: "t".into(), key: Some(key.into()), created_at_ms: 0 }
    }

    fn seen(r: &PublishedRow, offset: i64) -> Seen {
        Seen {
            id: Some(r.id),
            topic: "t".into(),
            partition: 0,
            offset,
            timestamp_ms: Some(1_000 + offset),
            relay_id: None,
        }
    }

    #[test]
    fn clean_delivery_has_nothing_to_report() {
        let rows = vec![row(1, "a"), row(2, "a"), row(3, "b")];
        let msgs: Vec<Seen> = rows.iter().enumerate().map(|(i, r)| seen(r, i as i64)).collect();
        let rep = compare(&rows, &msgs);
        assert_eq!((rep.lost, rep.duplicate_copies, rep.order_violations), (0, 0, 0));
        assert_eq!(rep.delivered, 3);
    }

    #[test]
    fn lost_duplicated_and_reordered_events_are_counted() {
        let rows = vec![row(1, "a"), row(2, "a"), row(3, "a"), row(4, "b")];
        // a2 before a1 (violation), a2 again (duplicate, not a violation), a3, b lost
        let msgs = vec![seen(&rows[1], 0), seen(&rows[0], 1), seen(&rows[1], 2), seen(&rows[2], 3)];
        let rep = compare(&rows, &msgs);
        assert_eq!(rep.lost, 1);
        assert_eq!(rep.lost_ids, vec![rows[3].id]);
        assert_eq!(rep.duplicated_events, 1);
        assert_eq!(rep.duplicate_copies, 1);
        assert_eq!(rep.max_copies, 2);
        assert_eq!(rep.order_violations, 1);
        assert!((rep.lost_rate() - 0.25).abs() < 1e-9);
    }

    #[test]
    fn a_republished_batch_is_duplicates_only() {
        let rows = vec![row(1, "a"), row(2, "a")];
        let msgs = vec![seen(&rows[0], 0), seen(&rows[1], 1), seen(&rows[0], 2), seen(&rows[1], 3)];
        let rep = compare(&rows, &msgs);
        assert_eq!(rep.order_violations, 0);
        assert_eq!(rep.duplicate_copies, 2);
    }
}
