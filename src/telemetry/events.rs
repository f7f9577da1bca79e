//! Named internal events. The layer that knows a fact builds one of these
//! from plain values and calls `emit()`; the event logs it and records its
//! metrics here, in one place, so logs and metrics cannot disagree. Nothing in
//! this file knows the store's or the sink's types.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use super::metrics::*;
use metrics::Label;

use super::outbox_label;

/// `extra`, and the `outbox` label when the process serves several outboxes
/// (`[[outboxes]]`); a single-outbox relay's series stay as they were.
fn labels(mut extra: Vec<Label>) -> Vec<Label> {
    if let Some(o) = outbox_label() {
        extra.insert(0, Label::new("outbox", o));
    }
    extra
}

/// An event that logs and counts itself.
pub trait Emit {
    fn emit(self);
}

/// Rows the database marked published (or deleted) for one topic.
pub struct EventsPublished<'a> {
    pub topic: &'a str,
    pub count: u64,
}

impl Emit for EventsPublished<'_> {
    fn emit(self) {
        counter!(PUBLISHED, labels(vec![Label::new("topic", self.topic.to_string())])).increment(self.count);
    }
}

/// Rows the database parked for one topic (as its `RETURNING` said).
pub struct EventsParked<'a> {
    pub topic: &'a str,
    pub count: u64,
}

impl Emit for EventsParked<'_> {
    fn emit(self) {
        counter!(PARKED, labels(vec![Label::new("topic", self.topic.to_string())])).increment(self.count);
    }
}

/// Events of a batch not delivered, by failure class.
pub struct PublishFailures {
    /// `transient`, `permanent`, `invalid` or `fatal`.
    pub class: &'static str,
    pub count: u64,
}

impl Emit for PublishFailures {
    fn emit(self) {
        if self.count > 0 {
            counter!(FAILED, labels(vec![Label::new("class", self.class)])).increment(self.count);
        }
    }
}

/// Claimed rows left pending: an earlier event of their key is elsewhere.
pub struct EventsDeferred {
    pub count: u64,
}

impl Emit for EventsDeferred {
    fn emit(self) {
        if self.count > 0 {
            counter!(DEFERRED, labels(Vec::new())).increment(self.count);
        }
    }
}

/// One event Kafka (or the row itself) rejected, with what the database did.
pub struct EventRejected<'a> {
    pub event_id: &'a str,
    pub seq: i64,
    pub topic: &'a str,
    pub attempt: i32,
    pub max_attempts: u32,
    pub parked: bool,
    pub error: &'a str,
}

impl Emit for EventRejected<'_> {
    fn emit(self) {
        tracing::warn!(
            event_id = self.event_id,
            seq = self.seq,
            topic = self.topic,
            attempt = self.attempt,
            max_attempts = self.max_attempts,
            parked = self.parked,
            error = self.error,
            "event rejected"
        );
    }
}

/// A batch was recorded and committed.
pub struct BatchFinished {
    pub claimed: usize,
    pub deferred: usize,
    pub published: usize,
    pub failed: usize,
    pub retry: usize,
    pub claim_ms: u64,
    pub acked_ms: u64,
    pub took: Duration,
}

impl Emit for BatchFinished {
    fn emit(self) {
        counter!(BATCHES, labels(Vec::new())).increment(1);
        histogram!(BATCH_SIZE, labels(Vec::new())).record(self.claimed as f64);
        histogram!(BATCH_DURATION, labels(Vec::new())).record(self.took.as_secs_f64());
        tracing::debug!(
            claimed = self.claimed,
            deferred = self.deferred,
            published = self.published,
            failed = self.failed,
            retry = self.retry,
            claim_ms = self.claim_ms,
            acked_ms = self.acked_ms,
            ms = self.took.as_millis() as u64,
            "batch done"
        );
    }
}

/// From the row's `created_at` to Kafka's acknowledgement, one delivered event.
pub struct EventAcked {
    pub since_created: Duration,
}

impl Emit for EventAcked {
    fn emit(self) {
        histogram!(CREATED_TO_ACK, labels(Vec::new())).record(self.since_created.as_secs_f64());
    }
}

/// A batch failed (the database or the protocol); the loop backs off and retries.
pub struct BatchFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub transient: bool,
    pub retry_in: Duration,
    /// What the loop does next (`retrying`, `recovering`).
    pub next: &'static str,
}

impl Emit for BatchFailed<'_> {
    fn emit(self) {
        counter!(BATCH_ERRORS, labels(Vec::new())).increment(1);
        let retry_in_ms = self.retry_in.as_millis() as u64;
        if self.transient {
            tracing::warn!(error = %self.error, retry_in_ms, "batch failed; {}", self.next);
        } else {
            tracing::error!(error = %self.error, retry_in_ms, "batch failed; {} (this needs attention)", self.next);
        }
    }
}

/// The claim statement ran.
pub struct ClaimRan {
    pub took: Duration,
}

impl Emit for ClaimRan {
    fn emit(self) {
        histogram!(CLAIM_DURATION, labels(Vec::new())).record(self.took.as_secs_f64());
    }
}

/// A relay statement was cancelled by `postgres.statement_timeout`.
pub struct StatementTimedOut {
    pub statement: &'static str,
    pub took: Duration,
}

impl Emit for StatementTimedOut {
    fn emit(self) {
        tracing::warn!(
            statement = self.statement,
            took_ms = self.took.as_millis() as u64,
            "a relay query ran into postgres.statement_timeout and was cancelled; retrying"
        );
    }
}

/// A claimed batch waited for Kafka past `relay.publish_timeout` and was given back.
pub struct BatchReleased {
    pub rows: usize,
    pub waited: Duration,
    pub unacknowledged: usize,
}

impl Emit for BatchReleased {
    fn emit(self) {
        counter!(BATCHES_RELEASED, labels(vec![Label::new("reason", "publish_timeout")])).increment(1);
        tracing::warn!(
            rows = self.rows,
            unacknowledged = self.unacknowledged,
            waited_ms = self.waited.as_millis() as u64,
            "Kafka did not acknowledge the batch within relay.publish_timeout: gave it back (its rows are pending \
             again, in order) and hold nothing on the database until Kafka answers"
        );
    }
}

/// The relay stopped or started claiming because of Kafka's reachability.
pub struct KafkaAvailability<'a> {
    pub available: bool,
    /// How long the relay waited, when it became available again.
    pub waited: Option<Duration>,
    pub reason: &'a str,
}

impl Emit for KafkaAvailability<'_> {
    fn emit(self) {
        gauge!(KAFKA_AVAILABLE, labels(Vec::new())).set(if self.available { 1.0 } else { 0.0 });
        match (self.available, self.waited) {
            (true, Some(w)) => tracing::info!(
                waited_s = w.as_secs(),
                "Kafka answers again; claiming batches (the events that waited go out in order)"
            ),
            (true, None) => {}
            (false, _) => tracing::warn!(
                reason = self.reason,
                "Kafka is not reachable: claiming nothing and holding nothing on the database until it answers \
                 (events wait in the outbox; check kafka.brokers, the brokers and the network)"
            ),
        }
    }
}

/// Kafka has been unreachable for a while (repeated every 30 s while waiting).
pub struct KafkaStillUnavailable<'a> {
    pub waited: Duration,
    pub error: &'a str,
}

impl Emit for KafkaStillUnavailable<'_> {
    fn emit(self) {
        tracing::warn!(
            waited_s = self.waited.as_secs(),
            error = self.error,
            "still waiting for Kafka; nothing is held on the database meanwhile"
        );
    }
}

/// The Kafka producer was replaced.
pub struct ProducerRebuilt<'a> {
    /// `fatal` or `publish_timeout`.
    pub reason: &'static str,
    pub detail: &'a str,
}

impl Emit for ProducerRebuilt<'_> {
    fn emit(self) {
        counter!(PRODUCER_REBUILDS, labels(vec![Label::new("reason", self.reason)])).increment(1);
        if self.reason == "fatal" {
            tracing::error!(
                reason = self.detail,
                "Kafka producer hit a fatal error; rebuilding it (unacknowledged events stay pending)"
            );
        } else {
            tracing::debug!(reason = self.detail, "Kafka producer replaced");
        }
    }
}

/// An exactly-once batch left prepared was resolved.
pub struct PreparedResolved<'a> {
    pub gid: &'a str,
    pub committed: bool,
    pub resolved_here: bool,
}

impl Emit for PreparedResolved<'_> {
    fn emit(self) {
        counter!(RECOVERED, labels(vec![Label::new("decision", if self.committed { "commit" } else { "rollback" })]))
            .increment(1);
        tracing::info!(
            gid = self.gid,
            committed = self.committed,
            resolved_here = self.resolved_here,
            "recovered an unfinished batch"
        );
    }
}

/// A prepared batch could not be resolved this time.
pub struct PreparedResolutionFailed<'a> {
    pub gid: &'a str,
    pub owner_role: &'a str,
    pub age_s: f64,
    pub error: &'a dyn std::fmt::Display,
    pub fix: &'a str,
}

impl Emit for PreparedResolutionFailed<'_> {
    fn emit(self) {
        counter!(RECOVERY_FAILURES, labels(Vec::new())).increment(1);
        tracing::error!(
            gid = self.gid, owner_role = self.owner_role, age_s = self.age_s as u64, error = %self.error,
            fix = self.fix, "cannot resolve a prepared batch; its rows stay locked until it is"
        );
    }
}

/// The outbox's backlog as one relay sees it.
pub struct Backlog {
    pub pending: i64,
    pub oldest_pending_age_s: f64,
    pub parked: i64,
    pub prepared: i64,
    pub oldest_prepared_age_s: f64,
}

impl Emit for Backlog {
    fn emit(self) {
        gauge!(PENDING, labels(Vec::new())).set(self.pending as f64);
        gauge!(OLDEST_PENDING_AGE, labels(Vec::new())).set(self.oldest_pending_age_s);
        gauge!(PARKED_NOW, labels(Vec::new())).set(self.parked as f64);
        gauge!(PREPARED, labels(Vec::new())).set(self.prepared as f64);
        gauge!(OLDEST_PREPARED_AGE, labels(Vec::new())).set(self.oldest_prepared_age_s);
    }
}

/// The outbox table's tuples and who holds the database's xmin horizon.
pub struct TableHealth {
    pub live_tuples: i64,
    pub dead_tuples: i64,
    pub horizon_age_s: f64,
    pub horizon_age_xids: i64,
}

impl Emit for TableHealth {
    fn emit(self) {
        gauge!(DEAD_TUPLES, labels(Vec::new())).set(self.dead_tuples as f64);
        gauge!(LIVE_TUPLES, labels(Vec::new())).set(self.live_tuples as f64);
        gauge!(HORIZON_AGE, labels(Vec::new())).set(self.horizon_age_s.max(0.0));
        gauge!(HORIZON_XIDS, labels(Vec::new())).set(self.horizon_age_xids as f64);
    }
}

/// The transactions this relay holds on the database, sampled.
pub struct OpenTransactions {
    /// The oldest one (any kind), if any.
    pub oldest: Option<Duration>,
    /// The oldest claimed batch, if any.
    pub oldest_batch: Option<Duration>,
}

impl Emit for OpenTransactions {
    fn emit(self) {
        gauge!(OLDEST_TRANSACTION_AGE, labels(Vec::new())).set(self.oldest.map_or(0.0, |a| a.as_secs_f64()));
        gauge!(INFLIGHT_AGE, labels(Vec::new())).set(self.oldest_batch.map_or(0.0, |a| a.as_secs_f64()));
    }
}

/// Readiness changed or was re-checked.
pub struct Readiness<'a> {
    pub ready: bool,
    pub was_ready: bool,
    pub problems: &'a [String],
}

impl Emit for Readiness<'_> {
    fn emit(self) {
        gauge!(READY, labels(Vec::new())).set(if self.ready { 1.0 } else { 0.0 });
        if self.was_ready && !self.ready {
            tracing::warn!(problems = ?self.problems, "not ready");
        } else if !self.was_ready && self.ready {
            tracing::info!("ready");
        }
    }
}
