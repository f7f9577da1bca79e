//! The dedicated LISTEN connection. It hears operators, not the application:
//! `outbox-relay replay` notifies the table's channel with the lowest `seq` it
//! put back, below the relays' floors, and the relay lowers its floor there.
//! (The application's inserts notify nothing: a NOTIFY in the application's
//! transaction serialises its commits, see migration 0003.) Pooled connections
//! drop notifications, so this is one plain tokio-postgres connection whose
//! messages are polled here; it reconnects by itself, and after every
//! (re)connect the next claim sweeps from the start, since notifications sent
//! while it was away are lost.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{watch, Notify};
use tokio_postgres::AsyncMessage;

use super::Store;

/// Spawns the listener task. Each notification on the table's channel lowers
/// the floor where it says and stores a wake-up permit in `wake`. Ends when
/// `shutdown` flips.
pub fn spawn_listener(
    store: Store,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let channel = store.table().channel();
    let (pg, tls) = (store.pg_config().clone(), store.tls().clone());
    crate::telemetry::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            if *shutdown.borrow() {
                return;
            }
            match pg.connect(tls.clone()).await {
                Ok((client, mut conn)) => {
                    let (lost_tx, mut lost_rx) = tokio::sync::oneshot::channel::<String>();
                    let wake_conn = wake.clone();
                    let store_conn = store.clone();
                    let driver = crate::telemetry::spawn(async move {
                        loop {
                            match poll_fn(|cx| conn.poll_message(cx)).await {
                                Some(Ok(AsyncMessage::Notification(n))) => {
                                    // "replay <seq>"; anything else (an old trigger's
                                    // empty payload) just wakes the relay.
                                    if let Some(seq) =
                                        n.payload().strip_prefix("replay ").and_then(|s| s.trim().parse::<i64>().ok())
                                    {
                                        store_conn.floor().lower(seq);
                                    }
                                    wake_conn.notify_one();
                                }
                                Some(Ok(_)) => {}
                                Some(Err(e)) => {
                                    let _ = lost_tx.send(e.to_string());
                                    return;
                                }
                                None => {
                                    let _ = lost_tx.send("connection closed".into());
                                    return;
                                }
                            }
                        }
                    });
                    match client.batch_execute(&format!("LISTEN \"{channel}\"")).await {
                        Ok(()) => {
                            tracing::debug!(channel = %channel, "listening for outbox notifications");
                            backoff = Duration::from_millis(200);
                            // Notifications sent while it was away are lost, and a
                            // reconnect may be to another server (a failover):
                            // forget the floor, start from the beginning.
                            store.floor().reset();
                            wake.notify_one();
                            tokio::select! {
                                reason = &mut lost_rx => {
                                    let reason = reason.unwrap_or_else(|_| "connection task ended".into());
                                    tracing::warn!(%reason, "LISTEN connection lost; polling until it is back");
                                }
                                _ = shutdown.changed() => {}
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %super::StoreError::from(e), "LISTEN failed")
                        }
                    }
                    driver.abort();
                }
                Err(e) => {
                    tracing::debug!(error = %super::StoreError::from(e), "LISTEN connection failed; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    })
}
