//! Named telemetry: every metric the relay exports is recorded here, in one
//! place, so names stay consistent with the dashboards and alerts in `deploy/`.
//! Everything else calls these functions.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::event::OutboxEvent;
use crate::sink::{FailureClass, SendResult};
use crate::store::Backlog;

pub const PUBLISHED: &str = "outbox_relay_events_published_total";
pub const FAILED: &str = "outbox_relay_publish_failures_total";
pub const PARKED: &str = "outbox_relay_events_parked_total";
pub const DEFERRED: &str = "outbox_relay_events_deferred_total";
pub const BATCHES: &str = "outbox_relay_batches_total";
pub const BATCH_ERRORS: &str = "outbox_relay_batch_errors_total";
pub const BATCH_SIZE: &str = "outbox_relay_batch_size";
pub const BATCH_DURATION: &str = "outbox_relay_batch_duration_seconds";
pub const COMMIT_TO_ACK: &str = "outbox_relay_commit_to_ack_seconds";
pub const PENDING: &str = "outbox_relay_pending_events";
pub const OLDEST_PENDING_AGE: &str = "outbox_relay_oldest_pending_age_seconds";
pub const PARKED_NOW: &str = "outbox_relay_parked_events";
pub const READY: &str = "outbox_relay_ready";
pub const RECOVERED: &str = "outbox_relay_batches_recovered_total";
pub const PREPARED: &str = "outbox_relay_prepared_batches";
pub const OLDEST_PREPARED_AGE: &str = "outbox_relay_oldest_prepared_batch_age_seconds";
pub const RECOVERY_FAILURES: &str = "outbox_relay_prepared_resolution_failures_total";
pub const CLAIM_DURATION: &str = "outbox_relay_claim_duration_seconds";
pub const INFLIGHT_AGE: &str = "outbox_relay_inflight_batch_age_seconds";
pub const DEAD_TUPLES: &str = "outbox_relay_table_dead_tuples";
pub const LIVE_TUPLES: &str = "outbox_relay_table_live_tuples";
pub const HORIZON_AGE: &str = "outbox_relay_xmin_horizon_age_seconds";
pub const HORIZON_XIDS: &str = "outbox_relay_xmin_horizon_age_xids";

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: std::sync::OnceLock<Result<PrometheusHandle, String>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(COMMIT_TO_ACK.into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_DURATION.into()), LATENCY_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), SIZE_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(CLAIM_DURATION.into()), LATENCY_BUCKETS))
                .map_err(|e| e.to_string())?;
            let handle = builder.install_recorder().map_err(|e| e.to_string())?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(PUBLISHED, "Events acknowledged by Kafka and marked published (or deleted), by topic.");
    describe_counter!(FAILED, "Events not delivered, by failure class (transient, permanent, invalid, fatal).");
    describe_counter!(PARKED, "Events this relay parked after permanent failures, by topic.");
    describe_counter!(DEFERRED, "Claimed events left for another relay that holds an earlier event of their key.");
    describe_counter!(BATCHES, "Batches claimed and finished.");
    describe_counter!(BATCH_ERRORS, "Batches that failed on the Postgres side (retried).");
    describe_histogram!(BATCH_SIZE, Unit::Count, "Events per claimed batch.");
    describe_histogram!(BATCH_DURATION, Unit::Seconds, "Claim to commit, per batch.");
    describe_histogram!(COMMIT_TO_ACK, Unit::Seconds, "From the row's created_at to Kafka's acknowledgement.");
    describe_gauge!(PENDING, Unit::Count, "Rows waiting to be published.");
    describe_gauge!(OLDEST_PENDING_AGE, Unit::Seconds, "Age of the oldest pending row (0 when none).");
    describe_gauge!(PARKED_NOW, Unit::Count, "Rows parked, waiting for an operator (outbox-relay replay).");
    describe_gauge!(READY, "1 when Postgres and Kafka are reachable and the schema is usable.");
    describe_gauge!(PREPARED, Unit::Count, "Exactly-once batches prepared in Postgres and not yet resolved.");
    describe_gauge!(OLDEST_PREPARED_AGE, Unit::Seconds, "Age of the oldest unresolved prepared batch (0 when none).");
    describe_counter!(RECOVERED, "Exactly-once batches resolved by recovery, by decision (commit, rollback).");
    describe_counter!(
        RECOVERY_FAILURES,
        "Attempts to resolve a prepared batch that failed (logged with the gid and fix)."
    );
    describe_histogram!(
        CLAIM_DURATION,
        Unit::Seconds,
        "The claim statement (row locks and the per-key fence), per batch."
    );
    describe_gauge!(
        INFLIGHT_AGE,
        Unit::Seconds,
        "How long the oldest batch this relay holds has been open (0 when none)."
    );
    describe_gauge!(
        DEAD_TUPLES,
        Unit::Count,
        "Dead tuples of the outbox table (pg_stat_user_tables), waiting for vacuum."
    );
    describe_gauge!(LIVE_TUPLES, Unit::Count, "Live tuples of the outbox table (pg_stat_user_tables).");
    describe_gauge!(
        HORIZON_AGE,
        Unit::Seconds,
        "Age of the oldest transaction or snapshot holding back vacuum in this database (0 when none)."
    );
    describe_gauge!(
        HORIZON_XIDS,
        Unit::Count,
        "How many transaction ids the oldest snapshot holding back vacuum is behind."
    );
}

/// A batch was finished: count per topic, record latency from commit to ack.
pub fn batch_finished(events: &[OutboxEvent], results: &[SendResult], max_attempts: u32, took: Duration) {
    let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    let mut published: HashMap<&str, u64> = HashMap::new();
    let mut parked: HashMap<&str, u64> = HashMap::new();
    let (mut transient, mut permanent, mut invalid, mut fatal, mut skipped) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for (ev, r) in events.iter().zip(results) {
        match r {
            SendResult::Delivered => {
                *published.entry(ev.topic.as_str()).or_default() += 1;
                let secs = (now_us - ev.created_at_us).max(0) as f64 / 1e6;
                histogram!(COMMIT_TO_ACK).record(secs);
            }
            SendResult::Skipped => skipped += 1,
            SendResult::Invalid { .. } => {
                invalid += 1;
                *parked.entry(ev.topic.as_str()).or_default() += 1;
            }
            SendResult::Failed { class, .. } => match class {
                FailureClass::Transient => transient += 1,
                FailureClass::Fatal => fatal += 1,
                FailureClass::Permanent => {
                    permanent += 1;
                    if ev.attempts + 1 >= max_attempts as i32 {
                        *parked.entry(ev.topic.as_str()).or_default() += 1;
                    }
                }
            },
        }
    }
    for (topic, n) in published {
        counter!(PUBLISHED, "topic" => topic.to_string()).increment(n);
    }
    for (topic, n) in parked {
        counter!(PARKED, "topic" => topic.to_string()).increment(n);
    }
    for (class, n) in [("transient", transient), ("permanent", permanent), ("invalid", invalid), ("fatal", fatal)] {
        if n > 0 {
            counter!(FAILED, "class" => class).increment(n);
        }
    }
    if skipped > 0 {
        counter!(DEFERRED).increment(skipped);
    }
    counter!(BATCHES).increment(1);
    histogram!(BATCH_SIZE).record(events.len() as f64);
    histogram!(BATCH_DURATION).record(took.as_secs_f64());
}

pub fn deferred(n: usize) {
    if n > 0 {
        counter!(DEFERRED).increment(n as u64);
    }
}

/// Exactly-once: an unfinished batch was resolved by recovery.
pub fn recovered(committed: bool) {
    counter!(RECOVERED, "decision" => if committed { "commit" } else { "rollback" }).increment(1);
}

/// An attempt to resolve a prepared batch failed.
pub fn recovery_failed() {
    counter!(RECOVERY_FAILURES).increment(1);
}

pub fn claim_duration(took: Duration) {
    histogram!(CLAIM_DURATION).record(took.as_secs_f64());
}

/// How long the oldest batch this relay holds has been open.
pub fn inflight_age(age: Option<Duration>) {
    gauge!(INFLIGHT_AGE).set(age.map_or(0.0, |a| a.as_secs_f64()));
}

pub fn db_health(h: &crate::store::DbHealth) {
    gauge!(DEAD_TUPLES).set(h.dead_tuples as f64);
    gauge!(LIVE_TUPLES).set(h.live_tuples as f64);
    let horizon = h.horizon.as_ref();
    gauge!(HORIZON_AGE).set(horizon.and_then(|x| x.age_s).unwrap_or(0.0).max(0.0));
    gauge!(HORIZON_XIDS).set(horizon.and_then(|x| x.age_xids).unwrap_or(0) as f64);
}

pub fn batch_error() {
    counter!(BATCH_ERRORS).increment(1);
}

pub fn backlog(b: &Backlog) {
    gauge!(PENDING).set(b.pending as f64);
    gauge!(OLDEST_PENDING_AGE).set(b.oldest_pending_age_s);
    gauge!(PARKED_NOW).set(b.parked as f64);
    gauge!(PREPARED).set(b.prepared as f64);
    gauge!(OLDEST_PREPARED_AGE).set(b.oldest_prepared_age_s);
}

pub fn ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}
