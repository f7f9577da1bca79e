//! The outcome of a batch: what each Kafka result means for its row, and what
//! is reported once the database recorded it (parking is the database's
//! decision, read back from its `RETURNING`, so logs, metrics and the table
//! cannot disagree).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::event::OutboxEvent;
use crate::sink::{FailureClass, SendResult};
use crate::store::{EventFailure, Finished, Outcome};
use crate::telemetry::events::{
    EventAcked, EventRejected, EventsDeferred, EventsParked, EventsPublished, PublishFailures,
};
use crate::telemetry::Emit;

/// The store's view of a Kafka result.
pub fn outcome_of(r: &SendResult) -> Outcome {
    match r {
        SendResult::Delivered => Outcome::Delivered,
        SendResult::Invalid { error } => Outcome::Failed(EventFailure { error: error.clone(), park_now: true }),
        SendResult::Failed { class: FailureClass::Permanent, error } => {
            Outcome::Failed(EventFailure { error: error.clone(), park_now: false })
        }
        SendResult::Failed { class: FailureClass::Transient | FailureClass::Fatal, .. } | SendResult::Skipped => {
            Outcome::Retry
        }
    }
}

/// Reports a batch the database recorded: what was published and parked, per
/// topic; one warning per rejected event with the database's decision; the
/// failure classes; the latency of every delivered event.
pub fn report(events: &[OutboxEvent], results: &[SendResult], finished: &Finished, max_attempts: u32) {
    let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    let mut published: HashMap<&str, u64> = HashMap::new();
    let mut classes: HashMap<&'static str, u64> = HashMap::new();
    let mut skipped = 0;
    for (ev, r) in events.iter().zip(results) {
        match r {
            SendResult::Delivered => {
                *published.entry(ev.topic.as_str()).or_default() += 1;
                let micros = (now_us - ev.created_at_us).max(0) as u64;
                EventAcked { since_created: Duration::from_micros(micros) }.emit();
            }
            // held behind an earlier event of its key that failed: it waits
            SendResult::Skipped => skipped += 1,
            SendResult::Invalid { .. } => *classes.entry("invalid").or_default() += 1,
            SendResult::Failed { class, .. } => *classes.entry(class.as_str()).or_default() += 1,
        }
    }
    for (topic, count) in published {
        EventsPublished { topic, count }.emit();
    }
    for (class, count) in classes {
        PublishFailures { class, count }.emit();
    }
    EventsDeferred { count: skipped }.emit();
    let mut parked: HashMap<&str, u64> = HashMap::new();
    let by_id: HashMap<uuid::Uuid, (&OutboxEvent, &SendResult)> =
        events.iter().zip(results).map(|(e, r)| (e.id, (e, r))).collect();
    for rejected in &finished.rejected {
        if rejected.parked {
            *parked.entry(rejected.topic.as_str()).or_default() += 1;
        }
        let (seq, error) = match by_id.get(&rejected.id) {
            Some((ev, SendResult::Failed { error, .. } | SendResult::Invalid { error })) => (ev.seq, error.as_str()),
            Some((ev, _)) => (ev.seq, ""),
            None => (0, ""),
        };
        EventRejected {
            event_id: &rejected.id.to_string(),
            seq,
            topic: &rejected.topic,
            attempt: rejected.attempt,
            max_attempts,
            parked: rejected.parked,
            error,
        }
        .emit();
    }
    for (topic, count) in parked {
        EventsParked { topic, count }.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_permanent_and_invalid_results_count_against_the_event() {
        assert_eq!(outcome_of(&SendResult::Delivered), Outcome::Delivered);
        let t = SendResult::Failed { class: FailureClass::Transient, error: "down".into() };
        assert_eq!(outcome_of(&t), Outcome::Retry);
        let f = SendResult::Failed { class: FailureClass::Fatal, error: "fenced".into() };
        assert_eq!(outcome_of(&f), Outcome::Retry);
        let p = SendResult::Failed { class: FailureClass::Permanent, error: "too large".into() };
        assert!(matches!(outcome_of(&p), Outcome::Failed(EventFailure { park_now: false, .. })));
        let i = SendResult::Invalid { error: "malformed headers".into() };
        assert!(matches!(outcome_of(&i), Outcome::Failed(EventFailure { park_now: true, .. })));
    }
}
