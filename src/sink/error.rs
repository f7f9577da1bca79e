//! Every Kafka outcome is classified here, once. The relay acts on the class:
//! transient → keep the event pending and retry (never park); permanent → count an
//! attempt against the event and park it after `relay.max_attempts`; fatal →
//! rebuild the producer and retry the batch.

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
}
