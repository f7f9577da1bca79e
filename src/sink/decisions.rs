//! Exactly-once: the commit decisions topic.
//!
//! Every batch's Kafka transaction also writes one record to partition 0 of
//! `relay.commits_topic` (key = the relay's transactional id, value = the
//! batch's Postgres prepared-transaction id). The record is visible to a
//! `read_committed` reader if and only if that transaction committed, which
//! makes it the decision record that recovery reads after fencing the owner.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::SinkError;
use crate::config::Settings;

pub struct Decisions {
    topic: String,
    base: ClientConfig,
    probe: FutureProducer,
}

impl Decisions {
    pub fn new(settings: &Settings) -> Result<Decisions, SinkError> {
        let base = crate::verify::client_config(settings.kafka_brokers(), &settings.kafka.properties);
        let probe = base
            .clone()
            .set("client.id", "outbox-relay-decisions")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .map_err(|e| SinkError(format!("cannot create the decisions producer: {e}")))?;
        Ok(Decisions { topic: settings.relay.commits_topic.clone(), base, probe })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Creates the decisions topic (one partition, compacted) unless it exists,
    /// and checks an existing one has exactly one partition.
    pub async fn ensure_topic(&self) -> Result<(), SinkError> {
        let admin: AdminClient<DefaultClientContext> =
            self.base.create().map_err(|e| SinkError(format!("cannot create the admin client: {e}")))?;
        let topic = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(-1))
            .set("cleanup.policy", "compact")
            .set("segment.ms", "600000")
            .set("min.cleanable.dirty.ratio", "0.1");
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(|e| SinkError(format!("cannot create topic {}: {e}", self.topic)))?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic = %self.topic, "created the exactly-once decisions topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(SinkError(format!(
                        "cannot create topic {t}: {code} — create it yourself: 1 partition, cleanup.policy=compact"
                    )))
                }
            }
        }
        let partitions = self.partitions(Duration::from_secs(10)).await?;
        if partitions != 1 {
            return Err(SinkError(format!(
                "topic {} has {partitions} partitions; the decisions topic must have exactly 1",
                self.topic
            )));
        }
        Ok(())
    }

    /// How many partitions the decisions topic has (0: it does not exist).
    pub async fn partitions(&self, timeout: Duration) -> Result<usize, SinkError> {
        let cfg = self.base.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = cfg.create().map_err(|e| SinkError(format!("kafka consumer: {e}")))?;
            let md = c.fetch_metadata(Some(&topic), timeout).map_err(|e| SinkError(format!("metadata: {e}")))?;
            Ok(md.topics().first().filter(|t| t.error().is_none()).map_or(0, |t| t.partitions().len()))
        })
        .await
        .map_err(|e| SinkError(format!("metadata task failed: {e}")))?
    }

    /// Did the Kafka transaction of batch `gid` (relay `transactional_id`)
    /// commit? Call only after fencing that transactional id, so the answer
    /// cannot change any more.
    ///
    /// How it knows it has read far enough: it appends a probe record (outside
    /// any transaction) and reads the partition with `read_committed` until the
    /// probe appears. A read_committed reader gets the probe only once every
    /// transaction with records before it has ended, and the decision record
    /// (if any) precedes the probe, because fencing waited for the transaction.
    pub async fn was_committed(&self, transactional_id: &str, gid: &str, timeout: Duration) -> Result<bool, SinkError> {
        let probe_key = format!("probe/{}", uuid::Uuid::new_v4());
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic).partition(0).key(&probe_key);
        let delivery = self
            .probe
            .send(record, timeout)
            .await
            .map_err(|(e, _)| SinkError(format!("cannot write the probe to {}: {e}", self.topic)))?;
        let probe_offset = delivery.offset;
        let mut cfg = self.base.clone();
        cfg.set("group.id", format!("outbox-relay-recovery-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "50");
        let (topic, key, gid) = (self.topic.clone(), transactional_id.to_string(), gid.to_string());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = cfg.create().map_err(|e| SinkError(format!("kafka consumer: {e}")))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Beginning).map_err(|e| SinkError(e.to_string()))?;
            c.assign(&tpl).map_err(|e| SinkError(format!("assign: {e}")))?;
            let deadline = Instant::now() + timeout;
            let mut committed = false;
            while Instant::now() < deadline {
                let Some(m) = c.poll(Duration::from_millis(100)) else { continue };
                let m = m.map_err(|e| SinkError(format!("reading {topic}: {e}")))?;
                if m.key() == Some(key.as_bytes()) && m.payload() == Some(gid.as_bytes()) {
                    committed = true;
                }
                if m.offset() >= probe_offset {
                    return Ok(committed);
                }
            }
            Err(SinkError(format!(
                "could not read {topic} up to offset {probe_offset} within {timeout:?} (a transaction still open?)"
            )))
        })
        .await
        .map_err(|e| SinkError(format!("decisions task failed: {e}")))?
    }
}
