//! Exactly-once: the commit decisions topic.
//!
//! Every batch's Kafka transaction also writes one record to partition 0 of
//! `relay.commits_topic` (key = the relay's transactional id, value = the
//! batch's Postgres prepared-transaction id). The record is visible to a
//! `read_committed` reader if and only if that transaction committed, which
//! makes it the decision record that recovery reads after fencing the owner.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};

use rdkafka::message::ToBytes;
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::SinkError;
use crate::config::Settings;

/// The value prefix of a relay's start marker (see [`Decisions::mark_start`]);
/// never a gid.
pub const START_MARKER: &str = "start/";

/// What the decisions topic says about one prepared batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Its decision record is there: the Kafka transaction committed.
    Committed,
    /// The relay's history is there and this batch's record is not: it did not commit.
    NotCommitted,
    /// The topic holds nothing under the relay's key: no evidence either way.
    NoHistory(String),
}

/// What [`Decisions::inspect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionsTopic {
    /// Exists with the settings the protocol needs.
    Trusted,
    /// Does not exist (and no batch is prepared): create it like this.
    Missing { replication_factor: usize, min_insync_replicas: usize },
    /// Must not be used; the message says why and how to fix it.
    Untrusted(String),
}

/// Exactly-once on fewer than 3 brokers: what `check` and start-up say.
pub fn few_brokers_warning(brokers: usize) -> Option<String> {
    (brokers < 3).then(|| {
        format!(
            "exactly-once on a cluster of {brokers} broker(s): a single broker that stops while it completes a \
             commit can lose that committed transaction (Kafka 4.4.0 does; see docs/exactly-once.md, \
             \"Assumptions\"); run exactly-once against at least 3 brokers in production"
        )
    })
}

pub struct Decisions {
    topic: String,
    base: ClientConfig,
}

impl Decisions {
    pub fn new(settings: &Settings) -> Result<Decisions, SinkError> {
        let base = super::client_config(settings.kafka_brokers(), &settings.kafka.properties);
        Ok(Decisions { topic: settings.relay.commits_topic.clone(), base })
    }

    /// Writes one record outside any transaction (a probe, a start marker)
    /// through a producer made for it. Both are rare (a relay's start, a
    /// recovery), and a producer kept between them polled its queue in a
    /// loop: ~0.7 % of a core per relay for nothing (see `polled.rs`).
    async fn write<K, P>(
        &self,
        what: &str,
        record: FutureRecord<'_, K, P>,
        timeout: Duration,
    ) -> Result<Delivery, SinkError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let producer: FutureProducer<super::RelayContext> = self
            .base
            .clone()
            .set("client.id", "outbox-relay-decisions")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .create_with_context(super::RelayContext::default())
            .map_err(|e| SinkError::config("cannot create the decisions producer", e))?;
        let written = producer
            .send(record, timeout)
            .await
            .map_err(|(e, _)| SinkError::kafka(format!("cannot write the {what} to {}", self.topic), e));
        // Dropping it joins its poll thread and flushes: not on the runtime.
        tokio::task::spawn_blocking(move || drop(producer));
        written
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The relay's Kafka client settings (brokers, security).
    pub fn client_config(&self) -> &ClientConfig {
        &self.base
    }

    /// Makes sure the decisions topic can be trusted, or says why not.
    ///
    /// A decision that is lost turns a crash in the commit window into a
    /// duplicate, so the topic must hold every decision for as long as a batch
    /// may stay prepared: one partition, `cleanup.policy=compact` (not
    /// `delete`, which expires decisions, nor `compact,delete`), replicated
    /// like the event topics (replication factor min(3, brokers),
    /// `min.insync.replicas` min(2, replication factor)).
    ///
    /// A missing topic is created with those settings, also while batches
    /// are prepared (the topic was deleted, or `relay.commits_topic` changed):
    /// their decisions are then not in it, and recovery never reads a missing
    /// record as "not committed" without the relay's history beside it (see
    /// [`Decisions::verdict`]); it asks the event topics instead.
    /// Returns how many brokers the cluster lists.
    pub async fn ensure_topic(&self) -> Result<usize, SinkError> {
        match self.inspect().await? {
            (brokers, DecisionsTopic::Trusted) => Ok(brokers),
            (_, DecisionsTopic::Missing { replication_factor, min_insync_replicas }) => {
                self.create(replication_factor, min_insync_replicas).await?;
                // Another relay may have created it a moment ago: check what exists.
                match self.inspect().await? {
                    (_, DecisionsTopic::Untrusted(why)) => Err(SinkError::prerequisite(why)),
                    (brokers, _) => Ok(brokers),
                }
            }
            (_, DecisionsTopic::Untrusted(why)) => Err(SinkError::prerequisite(why)),
        }
    }

    /// How many brokers the cluster lists, and whether the decisions topic can
    /// be trusted (see [`Decisions::ensure_topic`]).
    pub async fn inspect(&self) -> Result<(usize, DecisionsTopic), SinkError> {
        let timeout = Duration::from_secs(10);
        let (brokers, info) = super::topics::describe(&self.base, &self.topic, timeout).await?;
        let want_rf = brokers.clamp(1, 3);
        let want_isr = want_rf.min(2);
        let Some(info) = info else {
            return Ok((
                brokers,
                DecisionsTopic::Missing { replication_factor: want_rf, min_insync_replicas: want_isr },
            ));
        };
        let mut wrong = Vec::new();
        if info.partitions != 1 {
            wrong.push(format!("{} partitions (must be 1)", info.partitions));
        }
        if info.cleanup_policy != "compact" {
            wrong.push(format!(
                "cleanup.policy={} (must be compact: other policies expire decisions)",
                info.cleanup_policy
            ));
        }
        if info.replication_factor < want_rf {
            wrong.push(format!(
                "replication factor {} (must be {want_rf} on {brokers} brokers)",
                info.replication_factor
            ));
        }
        if info.min_insync_replicas < want_isr {
            wrong.push(format!("min.insync.replicas={} (must be at least {want_isr})", info.min_insync_replicas));
        }
        if info.unclean_leader_election {
            wrong.push(
                "unclean.leader.election.enable=true (must be false: an unclean election drops decisions)".into(),
            );
        }
        if wrong.is_empty() {
            return Ok((brokers, DecisionsTopic::Trusted));
        }
        Ok((
            brokers,
            DecisionsTopic::Untrusted(format!(
                "the decisions topic {} cannot be trusted: {}. Fix it (kafka-configs --alter --entity-type topics \
             --entity-name {} --add-config cleanup.policy=compact,min.insync.replicas={want_isr},unclean.leader.election.enable=false; partitions and \
             replication need a new topic: stop the relays, let no batch stay prepared, create it with 1 partition, \
             replication factor {want_rf}), or point relay.commits_topic at a correct one while no batch is prepared",
                self.topic,
                wrong.join(", "),
                self.topic
            )),
        ))
    }

    async fn create(&self, rf: usize, isr: usize) -> Result<(), SinkError> {
        let admin: AdminClient<super::RelayContext> = self
            .base
            .create_with_context(super::RelayContext::default())
            .map_err(|e| SinkError::config("cannot create the admin client", e))?;
        let isr = isr.to_string();
        let topic = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(rf as i32))
            .set("cleanup.policy", "compact")
            .set("min.insync.replicas", &isr)
            .set("unclean.leader.election.enable", "false")
            .set("segment.ms", "600000")
            .set("min.cleanable.dirty.ratio", "0.1");
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(|e| SinkError::kafka(format!("cannot create topic {}", self.topic), e))?;
        for r in results {
            match r {
                Ok(_) => tracing::info!(topic = %self.topic, replication_factor = rf, min_insync_replicas = %isr,
                    "created the exactly-once decisions topic"),
                // Another relay created it a moment ago: validate what it made.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) if super::classify_code(code) == super::FailureClass::Transient => {
                    return Err(SinkError::unavailable(format!("cannot create topic {t}"), code))
                }
                Err((t, code)) => {
                    return Err(SinkError::prerequisite(format!(
                        "cannot create topic {t}: {code} — create it yourself: 1 partition, replication factor {rf}, \
                         cleanup.policy=compact, min.insync.replicas={isr}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// How many partitions the decisions topic has (0: it does not exist).
    pub async fn partitions(&self, timeout: Duration) -> Result<usize, SinkError> {
        let (_, info) = super::topics::describe(&self.base, &self.topic, timeout).await?;
        Ok(info.map_or(0, |i| i.partitions))
    }

    /// What the decisions topic says about batch `gid` of relay
    /// `transactional_id`. Call only after fencing that transactional id, so
    /// the answer cannot change any more.
    ///
    /// Only positive evidence counts: the batch's own record says it
    /// committed; a later record under the relay's key (an earlier batch's
    /// decision, or the marker every relay writes when it starts, see
    /// [`Decisions::mark_start`]) says the history is intact and the record is
    /// not there, so it did not commit. Nothing under the key at all (a topic
    /// that was deleted and recreated, or another `relay.commits_topic`) says
    /// nothing: [`Verdict::NoHistory`].
    ///
    /// How it knows it has read far enough: it appends a probe record (outside
    /// any transaction) and reads the partition with `read_committed` until the
    /// probe appears. A read_committed reader gets the probe only once every
    /// transaction with records before it has ended, and the decision record
    /// (if any) precedes the probe, because fencing waited for the transaction.
    pub async fn verdict(&self, transactional_id: &str, gid: &str, timeout: Duration) -> Result<Verdict, SinkError> {
        // Never let the probe create the topic (the clients also refuse to
        // auto-create): an empty new topic holds no history.
        match self.partitions(Duration::from_secs(10)).await? {
            1 => {}
            0 => return Ok(Verdict::NoHistory(format!("the decisions topic {} does not exist", self.topic))),
            n => {
                return Ok(Verdict::NoHistory(format!(
                    "the decisions topic {} has {n} partitions, not 1: its records cannot be read in order",
                    self.topic
                )))
            }
        }
        let probe_key = format!("probe/{}", uuid::Uuid::new_v4());
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic).partition(0).key(&probe_key);
        let delivery = self.write("probe", record, timeout).await?;
        let probe_offset = delivery.offset;
        let cfg = super::consumer_config(&self.base, "outbox-relay-recovery");
        let (topic, key, gid) = (self.topic.clone(), transactional_id.to_string(), gid.to_string());
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer<super::RelayContext> = cfg
                .create_with_context(super::RelayContext::in_span(span))
                .map_err(|e| SinkError::config("kafka consumer", e))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Beginning)
                .map_err(|e| SinkError::kafka("decisions partition", e))?;
            c.assign(&tpl).map_err(|e| SinkError::kafka("assign", e))?;
            let deadline = Instant::now() + timeout;
            let (mut committed, mut history) = (false, false);
            while Instant::now() < deadline {
                let Some(m) = c.poll(Duration::from_millis(100)) else { continue };
                let m = m.map_err(|e| SinkError::kafka(format!("reading {topic}"), e))?;
                if m.key() == Some(key.as_bytes()) {
                    history = true;
                    committed |= m.payload() == Some(gid.as_bytes());
                }
                if m.offset() >= probe_offset {
                    return Ok(match (committed, history) {
                        (true, _) => Verdict::Committed,
                        (false, true) => Verdict::NotCommitted,
                        (false, false) => Verdict::NoHistory(format!(
                            "the decisions topic {topic} holds no record of {key} (was it deleted and recreated, \
                             or relay.commits_topic changed?)"
                        )),
                    });
                }
            }
            Err(SinkError::unavailable(
                format!("reading {topic}"),
                format!(
                    "could not read {topic} up to offset {probe_offset} within {timeout:?} (a transaction still open?)"
                ),
            ))
        })
        .await
        .map_err(|e| SinkError::unavailable("decisions task", e))?
    }

    /// Writes the start marker of relay `transactional_id` (after its own
    /// batches are resolved, before it prepares anything): from then on the
    /// topic holds a record under its key, so a missing decision of any later
    /// batch is evidence that the batch did not commit.
    pub async fn mark_start(&self, transactional_id: &str, timeout: Duration) -> Result<(), SinkError> {
        let value = format!("{START_MARKER}{}", uuid::Uuid::new_v4().simple());
        let record: FutureRecord<'_, str, str> =
            FutureRecord::to(&self.topic).partition(0).key(transactional_id).payload(&value);
        self.write("start marker", record, timeout).await.map(|_| ())
    }
}
