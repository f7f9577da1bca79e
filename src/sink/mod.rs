//! Kafka side of the relay: the producer, delivery confirmation for every
//! message, and the classification of failures. The relay talks to a [`Sink`],
//! so tests can also drive it against librdkafka's mock cluster.

mod decisions;
mod error;
mod kafka;
pub mod topics;

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;

pub use decisions::{few_brokers_warning, Decisions, DecisionsTopic};
pub use error::{classify, classify_code, FailureClass};
pub use kafka::{producer_config, KafkaSink};

use crate::event::OutboxEvent;
use rdkafka::ClientConfig;
use std::collections::BTreeMap;

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

/// A failure of the sink as a whole (not of one event).
#[derive(Debug, thiserror::Error)]
#[error("kafka: {0}")]
pub struct SinkError(pub String);

/// A batch handed to the producer: its results arrive through `results`.
pub struct Sent {
    /// Resolves once every event has a final result (`[i]` belongs to `events[i]`).
    pub results: BoxFuture<'static, Vec<SendResult>>,
    /// Keys with an event that failed (or was skipped) before reaching Kafka:
    /// the next batch must not send later events of them either.
    pub held_keys: HashSet<String>,
    /// Nothing was sent: the producer failed fatally while an earlier batch is
    /// unfinished. Finish what is in flight, then send again with `alone` (the
    /// earlier batch's events come first again, on a new producer).
    pub stalled: bool,
}

/// Where batches go.
pub trait Sink: Send + Sync + 'static {
    /// Hands every event to the producer, in the order given, and returns at once
    /// with the pending results. An event whose key is in `hold`, or whose key had
    /// an earlier event fail before reaching Kafka, is [`SendResult::Skipped`]:
    /// sending it would overtake that event.
    ///
    /// `alone`: no earlier batch of this relay was unfinished when this one was
    /// claimed. Only then may a broken producer be replaced for it; otherwise
    /// the batch comes back [`Sent::stalled`], because a new producer could put
    /// its events ahead of the earlier batch's failed ones.
    fn send(&self, events: &[OutboxEvent], hold: &HashSet<String>, alone: bool) -> impl Future<Output = Sent> + Send;

    /// `send` and wait for every result.
    fn publish(&self, events: &[OutboxEvent]) -> impl Future<Output = Vec<SendResult>> + Send {
        async move { self.send(events, &HashSet::new(), true).await.results.await }
    }

    /// Drops whatever is queued or in flight (shutdown past its deadline); the
    /// pending `publish` resolves with transient failures.
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
