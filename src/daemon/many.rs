//! Several outboxes in one process (`[[outboxes]]`): one HTTP endpoint, and
//! for each outbox its own relay (store and pool, producer, loop, floor,
//! fence, sweep, monitor) under a supervisor. An outbox that cannot start
//! (missing table, revoked permission, Postgres away) or whose loop stops is
//! retried on its own, with back-off, while the others go on: one outbox's
//! fault never stops or stalls another.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{serve_http, Daemon, StartError};
use crate::config::Settings;
use crate::http::Health;
use crate::telemetry::in_outbox;

/// The outboxes of one process, running: stop them with [`Many::shutdown`].
pub struct Many {
    stop: watch::Sender<bool>,
    outboxes: Vec<JoinHandle<()>>,
    http: Option<JoinHandle<()>>,
    http_addr: Option<SocketAddr>,
    shutdown_timeout: Duration,
}

impl Daemon {
    /// Binds the HTTP endpoints, then starts every outbox's supervisor. Waits
    /// for none of them: each starts (or keeps trying) on its own.
    pub async fn start_many(settings: Settings) -> Result<Many, StartError> {
        crate::failpoint::validate_env().map_err(StartError::Config)?;
        let (stop, stop_rx) = watch::channel(false);
        let each = settings.outbox_settings();
        let healths: crate::http::Healths =
            each.iter().map(|s| (s.table().to_string(), Arc::new(Health::default()))).collect();
        let (http, http_addr) = serve_http(&settings, healths.clone(), stop_rx.clone()).await?;
        let shutdown_timeout = each.iter().map(|s| s.relay.shutdown_timeout).max().unwrap_or_default();
        let outboxes = each
            .into_iter()
            .zip(healths)
            .map(|(s, (table, health))| {
                let stop = stop_rx.clone();
                tokio::spawn(async move { in_outbox(&table, supervise(s, health, stop)).await })
            })
            .collect();
        tracing::info!(outboxes = settings.outboxes.len(), "outbox-relay serving several outboxes");
        Ok(Many { stop, outboxes, http, http_addr, shutdown_timeout })
    }
}

impl Many {
    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Stops every outbox (each finishes or releases its in-flight batch and
    /// flushes its producer), within the longest `relay.shutdown_timeout`.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let bound = self.shutdown_timeout + Duration::from_secs(2);
        for o in self.outboxes {
            if tokio::time::timeout(bound, o).await.is_err() {
                tracing::warn!("an outbox did not stop within relay.shutdown_timeout");
            }
        }
        if let Some(t) = self.http {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        tracing::info!("outbox-relay stopped");
    }
}

/// Runs one outbox's relay until `stop`, starting it again (1 s, doubling up
/// to 60 s) whenever it cannot start or its loop ends by itself.
async fn supervise(settings: Settings, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = tokio::select! {
            r = Daemon::start_outbox(settings.clone(), health.clone()) => r,
            _ = stopped(&mut stop) => return,
        };
        match started {
            Ok(mut running) => {
                backoff = Duration::from_secs(1);
                tokio::select! {
                    _ = stopped(&mut stop) => {
                        running.shutdown().await;
                        return;
                    }
                    e = running.ended() => {
                        tracing::error!(error = %e, retry_in = ?backoff,
                            "this outbox's relay stopped; the other outboxes go on; starting it again");
                        health.update(false, false, false, vec![e.to_string()]);
                        running.shutdown().await;
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?backoff,
                    "this outbox cannot start; the other outboxes go on; trying again");
                health.update(false, false, false, vec![e.to_string()]);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Resolves once `stop` flips (holding no borrow of it).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
