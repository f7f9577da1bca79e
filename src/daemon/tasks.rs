//! The background tasks beside the relay loop: resolving prepared batches
//! exactly-once relays left behind (at-least-once mode), retention clean-up
//! (mark mode), and the sampler of the transactions the relay holds open.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Settings;
use crate::relay::Recovery;
use crate::sink::{Decisions, KafkaSink};
use crate::store::{Store, TxnIds};
use crate::telemetry::events::OpenTransactions;
use crate::telemetry::Emit;

/// At-least-once mode: resolves this table's prepared batches older than
/// `relay.recovery_timeout` (see `relay::Recovery`), every half of it. A table
/// switched from exactly-once, or an exactly-once relay that never came back,
/// leaves them behind.
pub(super) fn orphan_resolver(
    settings: &Settings,
    store: Store,
    sink: Arc<KafkaSink>,
    txn_ids: TxnIds,
    mut stop: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    let every = settings.relay.recovery_timeout / 2;
    let decisions = match Decisions::new(settings) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot resolve prepared batches left by exactly-once relays");
            return None;
        }
    };
    let recovery = Recovery::new(store, decisions, txn_ids, settings.relay.recovery_timeout);
    Some(crate::telemetry::spawn(async move {
        loop {
            match recovery.resolve_stale(&sink, None).await {
                Ok(r) if r.committed + r.rolled_back > 0 => tracing::info!(
                    committed = r.committed,
                    rolled_back = r.rolled_back,
                    failed = r.failed,
                    "resolved prepared batches left by exactly-once relays"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not list prepared batches; will try again"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
        }
    }))
}

/// With `on_publish = "mark"`: delete rows older than `relay.retention` once a
/// minute, in small batches, off the hot path.
pub(super) fn retention(store: Store, retention: Duration, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    crate::telemetry::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                _ = stop.changed() => return,
            }
            match store.cleanup_all(retention).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(deleted = n, retention = %humantime::format_duration(retention), "retention clean-up")
                }
                Err(e) => tracing::warn!(error = %e, "retention clean-up failed; will retry"),
            }
        }
    })
}

/// Samples, every second, how long the oldest transaction the relay holds on
/// the database has been open (`outbox_relay_oldest_transaction_age_seconds`).
pub(super) fn transaction_clock(store: Store, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    crate::telemetry::spawn(async move {
        loop {
            let (oldest, oldest_batch) = store.oldest_open_transaction();
            OpenTransactions { oldest, oldest_batch }.emit();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    })
}
