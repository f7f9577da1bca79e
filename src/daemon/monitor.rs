//! Background checks: dependency health for `/readyz`, backlog gauges, and the
//! health of the database the relay is a guest on (dead tuples, xmin horizon).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::http::Health;
use crate::sink::Sink;
use crate::store::Store;
use crate::telemetry::events::{Backlog, TableHealth};
use crate::telemetry::Emit;

/// The schema rarely changes and its check reads information_schema: every
/// minute (and after any failure). Reachability every round.
#[derive(Default)]
struct SchemaCheck {
    last: Option<(Instant, Vec<String>)>,
}

impl SchemaCheck {
    /// (Postgres reachable, schema usable); each problem goes to `problems`.
    async fn check(&mut self, store: &Store, problems: &mut Vec<String>) -> (bool, bool) {
        let fresh = self.last.as_ref().filter(|(t, p)| t.elapsed() < Duration::from_secs(60) && p.is_empty());
        if fresh.is_some() {
            return match store.ping().await {
                Ok(()) => (true, true),
                Err(e) => {
                    problems.push(format!("postgres: {e}"));
                    self.last = None;
                    (false, false)
                }
            };
        }
        match store.verify_schema().await {
            Ok(found) => {
                let fatal: Vec<String> = found.into_iter().filter(|p| p.fatal).map(|p| p.message).collect();
                problems.extend(fatal.iter().cloned());
                let usable = fatal.is_empty();
                self.last = Some((Instant::now(), fatal));
                (true, usable)
            }
            Err(e) => {
                problems.push(format!("postgres: {e}"));
                (false, false)
            }
        }
    }
}

/// Checks Postgres, the schema and Kafka every `every`, updates `health` and the
/// backlog gauges. Ends when `shutdown` flips.
pub fn spawn_monitor<S: Sink>(
    store: Store,
    sink: Arc<S>,
    health: Arc<Health>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    crate::telemetry::spawn(async move {
        let mut schema = SchemaCheck::default();
        let mut last_health: Option<Instant> = None;
        loop {
            let mut problems = Vec::new();
            let (pg_ok, schema_ok) = schema.check(&store, &mut problems).await;
            let kafka_ok = match sink.ping(Duration::from_secs(5)).await {
                Ok(()) => true,
                Err(e) => {
                    problems.push(e.to_string());
                    false
                }
            };
            if pg_ok && schema_ok {
                match store.backlog().await {
                    Ok(b) => Backlog {
                        pending: b.pending,
                        oldest_pending_age_s: b.oldest_pending_age_s,
                        parked: b.parked,
                        prepared: b.prepared,
                        oldest_prepared_age_s: b.oldest_prepared_age_s,
                    }
                    .emit(),
                    Err(e) => tracing::debug!(error = %e, "backlog query failed"),
                }
                if last_health.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    last_health = Some(Instant::now());
                    match store.db_health().await {
                        Ok(h) => {
                            let horizon = h.horizon.as_ref();
                            TableHealth {
                                live_tuples: h.live_tuples,
                                dead_tuples: h.dead_tuples,
                                horizon_age_s: horizon.and_then(|x| x.age_s).unwrap_or(0.0),
                                horizon_age_xids: horizon.and_then(|x| x.age_xids).unwrap_or(0),
                            }
                            .emit()
                        }
                        Err(e) => tracing::debug!(error = %e, "table statistics query failed"),
                    }
                }
            }
            health.update(pg_ok, schema_ok, kafka_ok, problems);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}
