//! Every metric the relay exports, by name, in one place (the dashboards and
//! alerts in `deploy/` are checked against this file), and the Prometheus
//! recorder. Values are recorded only by the events in `events.rs`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const PUBLISHED: &str = "outbox_relay_events_published_total";
pub const FAILED: &str = "outbox_relay_publish_failures_total";
pub const PARKED: &str = "outbox_relay_events_parked_total";
pub const DEFERRED: &str = "outbox_relay_events_deferred_total";
pub const BATCHES: &str = "outbox_relay_batches_total";
pub const BATCH_ERRORS: &str = "outbox_relay_batch_errors_total";
pub const BATCH_SIZE: &str = "outbox_relay_batch_size";
pub const BATCH_DURATION: &str = "outbox_relay_batch_duration_seconds";
pub const CREATED_TO_ACK: &str = "outbox_relay_created_to_ack_seconds";
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
pub const OLDEST_TRANSACTION_AGE: &str = "outbox_relay_oldest_transaction_age_seconds";
pub const KAFKA_AVAILABLE: &str = "outbox_relay_kafka_available";
pub const BATCHES_RELEASED: &str = "outbox_relay_batches_released_total";
pub const PRODUCER_REBUILDS: &str = "outbox_relay_producer_rebuilds_total";

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install() -> Result<PrometheusHandle, String> {
    static HANDLE: std::sync::OnceLock<Result<PrometheusHandle, String>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(CREATED_TO_ACK.into()), LATENCY_BUCKETS)
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
    describe_histogram!(CREATED_TO_ACK, Unit::Seconds, "From the row's created_at (now() in the writing transaction: its start, not its commit) to Kafka's acknowledgement.");
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
        OLDEST_TRANSACTION_AGE,
        Unit::Seconds,
        "How long the oldest transaction this relay holds on the database has been open (0 when none); \
         bounded by relay.publish_timeout while Kafka is away."
    );
    describe_gauge!(
        KAFKA_AVAILABLE,
        "1 while the relay can reach Kafka and claims batches; 0 while it waits for Kafka, holding nothing."
    );
    describe_counter!(
        BATCHES_RELEASED,
        "Batches given back unpublished (rows pending again, in order), by reason (publish_timeout)."
    );
    describe_counter!(PRODUCER_REBUILDS, "Kafka producers replaced, by reason (fatal error, publish_timeout).");
    describe_gauge!(
        HORIZON_XIDS,
        Unit::Count,
        "How many transaction ids the oldest snapshot holding back vacuum is behind."
    );
}
