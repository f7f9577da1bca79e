//! Every Kafka outcome is classified here, once.
//!
//! Per event ([`FailureClass`]): transient → keep the event pending and retry
//! (never park); permanent → count an attempt against the event and park it
//! after `relay.max_attempts`; fatal → rebuild the producer and retry.
//!
//! Per operation of the sink as a whole ([`SinkError`]): an opaque error the
//! relay asks questions of — `is_transient()` (retry as it is), `requires_abort()`
//! (a Kafka transaction must be aborted before anything else), `is_fenced()`
//! (another producer with this transactional id took over).

use std::fmt;

use rdkafka::error::{KafkaError, RDKafkaErrorCode as C};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Broker down, leader change, timeouts, full queue, network: retry forever.
    Transient,
    /// This event can never be accepted as it is (too large, bad topic, not
    /// authorised, malformed row): count it against the event.
    Permanent,
    /// The producer itself is unusable (idempotence fatal error, fenced).
    Fatal,
}

impl FailureClass {
    pub fn as_str(&self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Permanent => "permanent",
            FailureClass::Fatal => "fatal",
        }
    }
}

pub fn classify(err: &KafkaError) -> FailureClass {
    match err.rdkafka_error_code() {
        Some(code) => classify_code(code),
        None => FailureClass::Transient,
    }
}

pub fn classify_code(code: C) -> FailureClass {
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidTopic
        | C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::UnknownPartition
        | C::TopicAuthorizationFailed
        | C::InvalidRecord
        | C::PolicyViolation
        | C::InvalidTimestamp
        | C::UnsupportedForMessageFormat
        | C::KeySerialization
        | C::ValueSerialization
        | C::InvalidArgument => FailureClass::Permanent,
        C::Fatal
        | C::Fenced
        | C::ProducerFenced
        | C::InvalidProducerEpoch
        | C::OutOfOrderSequenceNumber
        | C::InvalidProducerIdMapping
        | C::UnknownProducerId
        | C::TransactionalIdAuthorizationFailed
        | C::GaplessGuarantee => FailureClass::Fatal,
        _ => FailureClass::Transient,
    }
}

/// A failure of the sink as a whole (not of one event). Never contains secrets.
#[derive(Debug)]
pub struct SinkError {
    /// What was being done (`begin transaction`, `metadata of topic x`).
    context: String,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// What librdkafka said.
    Kafka(KafkaError),
    /// The cluster could not be reached or did not answer in time.
    Unavailable(String),
    /// A client could not be created from the configuration.
    Config(String),
    /// A prerequisite no retry can fix (an untrusted decisions topic); the
    /// message says how to fix it.
    Prerequisite(String),
}

impl SinkError {
    pub(crate) fn kafka(context: impl Into<String>, e: KafkaError) -> SinkError {
        SinkError { context: context.into(), kind: Kind::Kafka(e) }
    }

    pub(crate) fn unavailable(context: impl Into<String>, why: impl fmt::Display) -> SinkError {
        SinkError { context: context.into(), kind: Kind::Unavailable(why.to_string()) }
    }

    /// The brokers refused the relay's credentials or its TLS handshake. Still
    /// retried (credentials may be mid-rotation), but named for what it is.
    pub(crate) fn refused(why: impl fmt::Display) -> SinkError {
        SinkError::unavailable(
            "the brokers refused the relay's credentials or TLS handshake (check sasl.mechanism, sasl.username, \
             the password from kafka.sasl_password or kafka.sasl_password_file, and ssl.ca.location)",
            why,
        )
    }

    pub(crate) fn config(context: impl Into<String>, why: impl fmt::Display) -> SinkError {
        SinkError { context: context.into(), kind: Kind::Config(why.to_string()) }
    }

    pub(crate) fn prerequisite(message: impl Into<String>) -> SinkError {
        SinkError { context: String::new(), kind: Kind::Prerequisite(message.into()) }
    }

    /// Worth retrying as it is: Kafka unreachable, a timeout, a leader
    /// election, a retriable transaction error. Not transient: bad client
    /// configuration, an untrusted decisions topic, a fenced producer, a
    /// permanent rejection.
    pub fn is_transient(&self) -> bool {
        match &self.kind {
            Kind::Unavailable(_) => true,
            Kind::Config(_) | Kind::Prerequisite(_) => false,
            Kind::Kafka(KafkaError::Transaction(t)) => t.is_retriable() && !t.is_fatal() && !self.is_fenced(),
            Kind::Kafka(e) => classify(e) == FailureClass::Transient,
        }
    }

    /// The Kafka transaction cannot go on and must be aborted first.
    pub fn requires_abort(&self) -> bool {
        matches!(&self.kind, Kind::Kafka(KafkaError::Transaction(t)) if t.txn_requires_abort())
    }

    /// Another producer with this transactional id took over (or a recovering
    /// relay fenced this one): this producer must not be used again.
    pub fn is_fenced(&self) -> bool {
        let Kind::Kafka(e) = &self.kind else { return false };
        matches!(e.rdkafka_error_code(), Some(C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch))
    }

    /// A prerequisite no retry can fix (the relay must not start as it is).
    pub fn is_prerequisite(&self) -> bool {
        matches!(self.kind, Kind::Prerequisite(_) | Kind::Config(_))
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = if self.context.is_empty() { String::new() } else { format!("{}: ", self.context) };
        match &self.kind {
            Kind::Kafka(e) => write!(f, "kafka: {prefix}{e}"),
            Kind::Unavailable(why) | Kind::Config(why) => write!(f, "kafka: {prefix}{why}"),
            Kind::Prerequisite(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for SinkError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_specific_rejections_are_permanent() {
        for c in [
            C::MessageSizeTooLarge,
            C::InvalidTopic,
            C::TopicAuthorizationFailed,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
        ] {
            assert_eq!(classify_code(c), FailureClass::Permanent, "{c:?}");
        }
    }

    #[test]
    fn outages_are_transient() {
        for c in [
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::MessageTimedOut,
            C::QueueFull,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::RequestTimedOut,
            C::NotEnoughReplicas,
            C::NetworkException,
            C::PurgeQueue,
            C::PurgeInflight,
            C::ClusterAuthorizationFailed,
        ] {
            assert_eq!(classify_code(c), FailureClass::Transient, "{c:?}");
        }
    }

    #[test]
    fn broken_producer_state_is_fatal() {
        for c in [C::Fatal, C::ProducerFenced, C::InvalidProducerEpoch, C::OutOfOrderSequenceNumber] {
            assert_eq!(classify_code(c), FailureClass::Fatal, "{c:?}");
        }
    }

    #[test]
    fn sink_errors_answer_the_relay_s_questions() {
        let timeout = SinkError::kafka("metadata of topic d", KafkaError::MetadataFetch(C::OperationTimedOut));
        assert!(timeout.is_transient() && !timeout.is_prerequisite(), "a metadata timeout is retried: {timeout}");
        let down = SinkError::unavailable("metadata", "all brokers down");
        assert!(down.is_transient() && !down.is_fenced() && !down.requires_abort());
        let untrusted = SinkError::prerequisite("the decisions topic d cannot be trusted: 2 partitions");
        assert!(!untrusted.is_transient() && untrusted.is_prerequisite());
        assert_eq!(untrusted.to_string(), "the decisions topic d cannot be trusted: 2 partitions");
        let fenced = SinkError::kafka("commit transaction", KafkaError::MessageProduction(C::ProducerFenced));
        assert!(fenced.is_fenced() && !fenced.is_transient());
        let config = SinkError::config("producer", "No such configuration property: \"x\"");
        assert!(!config.is_transient() && config.is_prerequisite());
    }
}
