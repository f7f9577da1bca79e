//! Exactly-once start-up on the Postgres side: one live relay per
//! transactional id (the id lease), and Postgres two-phase commit on. The
//! Kafka side (decisions topic, producer registration, recovery of this relay's
//! own batches) runs in the relay loop, once Kafka answers.

use std::time::{Duration, Instant};

use super::StartError;
use crate::store::{describe, IdLease, Store, LEASE_EXPIRY};

/// Takes the lease on `txn_id`. A second relay with the same `relay.id` waits
/// (its twin may be a process that is just stopping, or a host that vanished:
/// its lease expires within [`LEASE_EXPIRY`]) until `startup_timeout`, but at
/// least `LEASE_EXPIRY`, then is refused.
pub(super) async fn take(
    store: &Store,
    relay_id: &str,
    txn_id: &str,
    startup_timeout: Duration,
) -> Result<IdLease, StartError> {
    let deadline = super::startup::deadline(startup_timeout);
    let lease_deadline = Instant::now() + LEASE_EXPIRY;
    let waiting = || deadline.is_none_or(|d| Instant::now() < d);
    let twin_may_expire = || waiting() || Instant::now() < lease_deadline;
    loop {
        match store.lease_transactional_id(txn_id).await {
            Ok(Some(lease)) => return Ok(lease),
            Ok(None) if twin_may_expire() => {
                tracing::warn!(relay = %relay_id, transactional_id = %txn_id,
                    "another live relay uses this relay.id; waiting for it to stop (each exactly-once relay needs its own relay.id)");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(None) => {
                return Err(StartError::Config(format!(
                    "another live relay of {} uses relay.id {relay_id:?}: in exactly-once mode every relay needs its \
                     own, stable relay.id (set OUTBOX_RELAY__RELAY__ID)",
                    store.table()
                )))
            }
            Err(e) if waiting() => {
                tracing::warn!(error = %e, "postgres not reachable yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(StartError::Unavailable(format!(
                    "cannot reach Postgres at {}: {e}",
                    describe(store.pg_config())
                )))
            }
        }
    }
}

/// Exactly-once needs Postgres two-phase commit (a prerequisite no retry can fix).
pub(super) async fn two_phase_commit(store: &Store, startup_timeout: Duration) -> Result<(), StartError> {
    let deadline = super::startup::deadline(startup_timeout);
    let max =
        super::startup::retry_until(deadline, "postgres", || store.max_prepared_transactions()).await.map_err(|e| {
            StartError::Unavailable(format!("cannot reach Postgres at {}: {e}", describe(store.pg_config())))
        })?;
    if max == 0 {
        return Err(StartError::Config(
            "exactly-once needs Postgres two-phase commit, but max_prepared_transactions = 0: set it in \
             postgresql.conf to at least the number of relays (e.g. 64) and restart Postgres"
                .into(),
        ));
    }
    Ok(())
}
