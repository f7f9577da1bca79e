//! What must hold before the relay claims anything: Postgres answers (retried
//! until `relay.startup_timeout`), the schema is usable, the database's
//! identity is known. Kafka is not waited for here: a relay that starts while
//! Kafka is away runs, holds nothing, and relays once Kafka answers.

use std::future::Future;
use std::time::{Duration, Instant};

use super::StartError;
use crate::relay::Backoff;
use crate::store::{describe, Store, TxnIds};

/// Waits for Postgres and checks the schema; returns the table's
/// transactional-id namespace.
pub(super) async fn postgres_ready(store: &Store, startup_timeout: Duration) -> Result<TxnIds, StartError> {
    let pg = describe(store.pg_config());
    let deadline = deadline(startup_timeout);
    retry_until(deadline, "postgres", || store.ping()).await.map_err(|e| {
        StartError::Unavailable(format!(
            "cannot reach Postgres at {pg}: {e} — check postgres.url and that the server accepts connections"
        ))
    })?;
    let problems = retry_until(deadline, "postgres", || store.verify_schema())
        .await
        .map_err(|e| StartError::Unavailable(format!("cannot inspect the schema at {pg}: {e}")))?;
    for p in problems.iter().filter(|p| !p.fatal) {
        tracing::warn!("{p}");
    }
    if let Some(p) = problems.iter().find(|p| p.fatal) {
        return Err(StartError::Schema(p.to_string()));
    }
    retry_until(deadline, "postgres", || store.txn_ids())
        .await
        .map_err(|e| StartError::Unavailable(format!("cannot read the database identity at {pg}: {e}")))
}

/// When `relay.startup_timeout` runs out; `None` (it is `0s`) waits forever.
pub(super) fn deadline(startup_timeout: Duration) -> Option<Instant> {
    (!startup_timeout.is_zero()).then(|| Instant::now() + startup_timeout)
}

/// Retries `op` with back-off until it succeeds or `deadline` passes.
pub(super) async fn retry_until<T, E, F, Fut>(deadline: Option<Instant>, what: &str, mut op: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if deadline.is_some_and(|d| Instant::now() >= d) => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what} not reachable yet");
                let left = deadline.map_or(delay, |d| d.saturating_duration_since(Instant::now()));
                tokio::time::sleep(delay.min(left)).await;
            }
        }
    }
}
