//! Kafka side of the relay: the producer, delivery confirmation for every
//! message, and the classification of failures. The relay talks to a [`Sink`],
//! so tests can also drive it against librdkafka's mock cluster.

mod error;
mod kafka;

use std::future::Future;
use std::time::Duration;

pub use error::{classify, classify_code, FailureClass};
pub use kafka::{producer_config, KafkaSink};

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

/// A failure of the sink as a whole (not of one event).
#[derive(Debug, thiserror::Error)]
#[error("kafka: {0}")]
pub struct SinkError(pub String);

/// Where batches go.
pub trait Sink: Send + Sync + 'static {
    /// Publishes every event and resolves once each one has a final result
    /// (`result[i]` belongs to `events[i]`). Events of one key are handed to
    /// Kafka in the order given; after one of them fails before reaching Kafka,
    /// the later ones of that key are [`SendResult::Skipped`].
    fn publish(&self, events: &[OutboxEvent]) -> impl Future<Output = Vec<SendResult>> + Send;

    /// Drops whatever is queued or in flight (shutdown past its deadline); the
    /// pending `publish` resolves with transient failures.
    fn purge(&self);

    /// Waits until everything handed over so far is acknowledged.
    fn flush(&self, timeout: Duration) -> Result<(), SinkError>;

    /// Can we reach the cluster? (metadata round trip, blocking up to `timeout`)
    fn ping(&self, timeout: Duration) -> impl Future<Output = Result<(), SinkError>> + Send;
}
