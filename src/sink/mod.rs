//! Kafka side of the relay: the producer's configuration (`producer.rs`), the
//! producer with delivery confirmation for every message (`kafka.rs`, its
//! delivery reports in `acks.rs`), the transaction API of exactly-once mode
//! (`transactions.rs`), the decisions topic (`decisions.rs`), what the cluster
//! says about a topic (`topics.rs`), and the classification of failures
//! (`error.rs`). The relay talks to a [`Sink`], so tests can also drive it
//! against librdkafka's mock cluster.
//!
//! The sink knows Kafka and outbox events; it knows nothing of Postgres.

mod acks;
pub(crate) use acks::RelayContext;
mod decisions;
mod error;
mod evidence;
mod kafka;
mod polled;
mod producer;
pub mod topics;
mod transactions;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rdkafka::ClientConfig;

pub use decisions::{few_brokers_warning, Decisions, DecisionsTopic, Verdict, START_MARKER};
pub use error::{classify, classify_code, FailureClass, SinkError};
pub use evidence::{find_event, Found};
pub use kafka::KafkaSink;
pub use producer::{producer_config, RELAY_ID_HEADER};

use crate::event::OutboxEvent;

/// The final answer for one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendResult {
    /// Acknowledged by all in-sync replicas.
    Delivered,
    /// Not delivered; `class` says what to do about it.
    Failed { class: FailureClass, error: String },
    /// Rejected before it reached Kafka because the row itself is malformed;
    /// retrying cannot help, so it is parked at once.
    Invalid { error: String },
    /// Not sent: an earlier event of its key in this batch failed, and sending it
    /// would overtake that event. It stays pending.
    Skipped,
}

/// Which producer a batch went to. A producer that was purged or replaced
/// (a fatal error, a batch given back after `relay.publish_timeout`) has a
/// new epoch: a later batch claimed while an earlier one was unfinished must
/// not go to a new producer before the earlier batch's events went again.
pub type Epoch = u64;

/// A batch handed to the producer: its results arrive through `results`.
pub struct Sent {
    /// Resolves once every event has a final result (`[i]` belongs to `events[i]`).
    pub results: BoxFuture<'static, Vec<SendResult>>,
    /// Keys with an event of this batch that failed (or was skipped) before
    /// reaching Kafka: the next batch must not send later events of them.
    pub held_keys: HashSet<String>,
    /// Nothing was sent: the producer was replaced (or must be) while an
    /// earlier batch is unfinished. Finish what is in flight, then send again
    /// alone (the earlier batch's events come first again, on the new producer).
    pub stalled: bool,
    /// The producer epoch the batch went to.
    pub epoch: Epoch,
    /// The first event handed to the producer (not held, not invalid): if the
    /// batch's Kafka transaction commits, that event is in it.
    pub first_sent: Option<usize>,
}

/// Where batches go.
pub trait Sink: Send + Sync + 'static {
    /// Hands every event to the producer, in the order given, and returns at once
    /// with the pending results. An event whose key is in `hold`, or whose key had
    /// an earlier event fail before reaching Kafka, is [`SendResult::Skipped`]:
    /// sending it would overtake that event.
    ///
    /// `behind`: the epoch of this relay's earlier, unfinished batch (`None`
    /// when there is none). Only a batch with nothing before it may replace a
    /// broken producer; a batch behind one goes to that batch's producer or,
    /// if it was replaced meanwhile, comes back [`Sent::stalled`].
    fn send(
        &self,
        events: &[OutboxEvent],
        hold: &HashSet<String>,
        behind: Option<Epoch>,
    ) -> impl Future<Output = Sent> + Send;

    /// `send` and wait for every result.
    fn publish(&self, events: &[OutboxEvent]) -> impl Future<Output = Vec<SendResult>> + Send {
        async move { self.send(events, &HashSet::new(), None).await.results.await }
    }

    /// Gives up on everything handed over so far: drops what is queued or in
    /// flight (the pending results resolve as transient failures) and starts a
    /// new producer epoch, so nothing handed over before can reach Kafka after
    /// the rows are given back. `reason` goes to the logs and metrics.
    fn abandon(&self, reason: &'static str);

    /// Drops whatever is queued or in flight (shutdown past its deadline); the
    /// pending results resolve with transient failures.
    fn purge(&self);

    /// Waits until everything handed over so far is acknowledged.
    fn flush(&self, timeout: Duration) -> Result<(), SinkError>;

    /// Can we reach the cluster? (metadata round trip, blocking up to `timeout`)
    fn ping(&self, timeout: Duration) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Tests only (failpoint `fatal`): make the producer fail fatally now.
    fn inject_fatal_error(&self) {}
}

/// A Kafka client config (consumer, admin, plain producer) with the relay's
/// brokers and the connection/security parts of its `kafka.properties`.
pub fn client_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    for (k, v) in properties {
        if is_consumer_safe(k) {
            cfg.set(k, v);
        }
    }
    cfg.set("bootstrap.servers", brokers);
    // Reading or describing a topic must never create it (an empty decisions
    // topic created by accident holds no history).
    cfg.set("allow.auto.create.topics", "false");
    cfg
}

/// A `read_committed` consumer of `base`'s cluster in a group of its own,
/// committing nothing: for reading a few partitions from given offsets.
pub(crate) fn consumer_config(base: &ClientConfig, name: &str) -> ClientConfig {
    let mut cfg = base.clone();
    cfg.set("group.id", format!("{name}-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50");
    cfg
}

/// Producer-only properties make librdkafka warn in a consumer; leave them out.
fn is_consumer_safe(name: &str) -> bool {
    !matches!(
        name,
        "acks"
            | "request.required.acks"
            | "enable.idempotence"
            | "linger.ms"
            | "queue.buffering.max.ms"
            | "compression.type"
            | "compression.codec"
            | "batch.num.messages"
            | "batch.size"
            | "message.timeout.ms"
            | "delivery.timeout.ms"
            | "queue.buffering.max.messages"
            | "queue.buffering.max.kbytes"
            | "max.in.flight.requests.per.connection"
            | "max.in.flight"
            | "retries"
            | "message.send.max.retries"
            | "retry.backoff.ms"
            | "partitioner"
            | "transactional.id"
            | "enable.gapless.guarantee"
            | "sticky.partitioning.linger.ms"
            | "transaction.timeout.ms"
    )
}
