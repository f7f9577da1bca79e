//! Positive evidence of a Kafka transaction's fate from the event topics
//! themselves, for a prepared batch whose decision record is gone (the
//! decisions topic was deleted and recreated, or `relay.commits_topic`
//! changed).
//!
//! A batch's gid names one event the batch handed to Kafka (see
//! `store::Gid`). Once the batch's relay is fenced its transaction has ended,
//! and that event is visible to a `read_committed` reader of its topic if and
//! only if the transaction committed. So: read every partition of the topic
//! from a time safely before the batch began up to the end the partition had
//! after the fence. Found: committed. Read completely and not found: not
//! committed. Anything less (the topic is gone, compacted, or its retention has
//! passed the batch's time) is no evidence, and the batch stays prepared.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use uuid::Uuid;

use super::SinkError;
use crate::event::EVENT_ID_HEADER;

/// What the event topic says about one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// It is there, committed.
    Yes,
    /// Every message since `since` was read and it is not there.
    No,
    /// No evidence either way, and why.
    Unknown(String),
}

/// Looks for event `id` in `topic`, among the committed messages from `since`
/// (take it well before the batch began: producer clocks may be skewed) up to
/// the end of each partition now. Call only after fencing the producer.
pub async fn find_event(
    base: &ClientConfig,
    topic: &str,
    id: Uuid,
    since: SystemTime,
    timeout: Duration,
) -> Result<Found, SinkError> {
    let (_, info) = super::topics::describe(base, topic, Duration::from_secs(10)).await?;
    let Some(info) = info else {
        return Ok(Found::Unknown(format!("its topic {topic} does not exist")));
    };
    // A compacted topic may have dropped the event for a later one of its key.
    let complete_if_absent = !info.cleanup_policy.contains("compact");
    let cfg = super::consumer_config(base, "outbox-relay-evidence");
    let topic = topic.to_string();
    let since_ms = since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer<super::RelayContext> = cfg
            .create_with_context(super::RelayContext::in_span(span))
            .map_err(|e| SinkError::config("kafka consumer", e))?;
        let deadline = Instant::now() + timeout;
        let (start, ends, retention_passed) = ranges(&c, &topic, info.partitions, since_ms, timeout)?;
        if !ends.is_empty() {
            c.assign(&start).map_err(|e| SinkError::kafka("assign", e))?;
        }
        let want = id.to_string();
        let mut last_check = Instant::now();
        let mut done = ends.is_empty();
        while !done {
            if Instant::now() > deadline {
                return Err(SinkError::unavailable(
                    format!("reading {topic}"),
                    format!("could not read it to its end within {timeout:?} (a transaction still open?)"),
                ));
            }
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                let m = m.map_err(|e| SinkError::kafka(format!("reading {topic}"), e))?;
                let has = m
                    .headers()
                    .is_some_and(|h| h.iter().any(|h| h.key == EVENT_ID_HEADER && h.value == Some(want.as_bytes())));
                if has {
                    return Ok(Found::Yes);
                }
            }
            if last_check.elapsed() > Duration::from_millis(200) {
                last_check = Instant::now();
                let pos = c.position().map_err(|e| SinkError::kafka("position", e))?;
                done = pos.elements().iter().all(|e| match e.offset() {
                    Offset::Offset(o) => ends.get(&e.partition()).is_none_or(|&end| o >= end),
                    _ => false,
                });
            }
        }
        Ok(if retention_passed {
            Found::Unknown(format!("{topic}'s retention has removed messages from the batch's time"))
        } else if !complete_if_absent {
            Found::Unknown(format!("{topic} is compacted: the event may have been compacted away"))
        } else {
            Found::No
        })
    })
    .await
    .map_err(|e| SinkError::unavailable("evidence task", e))?
}

type Ranges = (TopicPartitionList, HashMap<i32, i64>, bool);

/// Where to start reading each partition (the first offset at `since_ms`),
/// where its end is now, and whether retention has already removed messages
/// from that time (then absence proves nothing).
fn ranges(
    c: &BaseConsumer<super::RelayContext>,
    topic: &str,
    partitions: usize,
    since_ms: i64,
    timeout: Duration,
) -> Result<Ranges, SinkError> {
    let mut at = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        at.add_partition_offset(topic, p, Offset::Offset(since_ms)).map_err(|e| SinkError::kafka("partition", e))?;
    }
    let found = c.offsets_for_times(at, timeout).map_err(|e| SinkError::kafka("offsets for times", e))?;
    let (mut start, mut ends, mut retention_passed) = (TopicPartitionList::new(), HashMap::new(), false);
    for e in found.elements() {
        let p = e.partition();
        let (low, high) = c.fetch_watermarks(topic, p, timeout).map_err(|e| SinkError::kafka("watermarks", e))?;
        let from = match e.offset() {
            Offset::Offset(o) => o,
            // Nothing at or after that time.
            _ => continue,
        };
        if from <= low && low > 0 {
            retention_passed = true;
        }
        if from < high {
            start.add_partition_offset(topic, p, Offset::Offset(from)).map_err(|e| SinkError::kafka("partition", e))?;
            ends.insert(p, high);
        }
    }
    Ok((start, ends, retention_passed))
}
