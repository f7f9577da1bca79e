//! `outbox-relay run`: start-up checks, the relay loop, signals and shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::{exit, CliError};
use crate::config::Delivery;
use crate::config::Settings;
use crate::http::Health;
use crate::relay::{spawn_monitor, Backoff, EosError, ExactlyOnceRelay, Recovery, Relay};
use crate::sink::{Decisions, KafkaSink, Sink};
use crate::store::{describe, spawn_listener, Store, TxnIds};

pub async fn run(settings: Settings) -> Result<(), CliError> {
    // Handlers first: a SIGTERM during start-up (waiting for Postgres or Kafka)
    // is a clean stop too, not a kill by the default action.
    let mut signals = Signals::install();
    crate::failpoint::validate_env().map_err(|e| CliError::new(exit::USAGE, e))?;
    let relay_id = settings.relay_id();
    let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let pg = describe(store.pg_config());
    // Bind first: a port conflict is a configuration error, reported before any wait.
    let http_listener = match settings.http.listen.as_str() {
        "" => None,
        addr => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::new(exit::USAGE, format!("config: `http.listen` = {addr:?}: cannot listen ({e})"))
        })?),
    };
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let http_task = match http_listener {
        Some(listener) => {
            let handle =
                crate::metrics::install().map_err(|e| CliError::new(exit::SOFTWARE, format!("metrics: {e}")))?;
            let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
            let (health, stop) = (health.clone(), stop_rx.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = crate::http::serve(listener, handle, health, stop).await {
                    tracing::error!(error = %e, "http server failed");
                }
            }))
        }
        None => None,
    };
    let startup = async {
        let deadline = Instant::now() + settings.relay.startup_timeout;

        retry_until(deadline, "postgres", || store.ping()).await.map_err(|e| {
            CliError::new(
                exit::UNAVAILABLE,
                format!(
                    "cannot reach Postgres at {pg}: {e} — check postgres.url and that the server accepts connections"
                ),
            )
        })?;
        let problems = retry_until(deadline, "postgres", || store.verify_schema())
            .await
            .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("cannot inspect the schema at {pg}: {e}")))?;
        for p in problems.iter().filter(|p| !p.fatal) {
            tracing::warn!("{p}");
        }
        if let Some(p) = problems.iter().find(|p| p.fatal) {
            return Err(CliError::new(exit::SCHEMA, p.to_string()));
        }
        let txn_ids = retry_until(deadline, "postgres", || store.txn_ids())
            .await
            .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("cannot read the database identity at {pg}: {e}")))?;

        let sink = if settings.relay.delivery == Delivery::ExactlyOnce {
            KafkaSink::transactional(&settings, &txn_ids.transactional_id(&relay_id))
        } else {
            KafkaSink::new(&settings)
        };
        let sink = Arc::new(sink.map_err(|e| CliError::new(exit::USAGE, e.to_string()))?);
        retry_until(deadline, "kafka", || sink.ping(Duration::from_secs(5))).await.map_err(|e| {
            CliError::new(
                exit::UNAVAILABLE,
                format!(
                    "cannot reach Kafka at {}: {e} — check kafka.brokers and kafka.properties",
                    settings.kafka_brokers()
                ),
            )
        })?;
        Ok::<_, CliError>((sink, txn_ids))
    };
    let (sink, txn_ids) = tokio::select! {
        r = startup => r?,
        s = signals.recv() => {
            tracing::info!(signal = s, "stopped during start-up");
            return Ok(());
        }
    };

    let wake = Arc::new(Notify::new());
    let monitor = spawn_monitor(store.clone(), sink.clone(), health.clone(), Duration::from_secs(5), stop_rx.clone());
    let listener = spawn_listener(store.clone(), wake.clone(), stop_rx.clone());
    let retention = (settings.relay.on_publish == crate::config::OnPublish::Mark)
        .then(|| spawn_retention(store.clone(), settings.relay.retention, stop_rx.clone()));
    let exactly_once = settings.relay.delivery == Delivery::ExactlyOnce;
    let (counters, mut relay_task) = if exactly_once {
        let relay = ExactlyOnceRelay::new(&settings, store.clone(), sink.clone(), wake, &txn_ids)
            .map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
        // One live relay per transactional id: a second one with the same
        // relay.id waits (its twin may be a process that is just stopping).
        let txn_id = txn_ids.transactional_id(&relay_id);
        let deadline = Instant::now() + settings.relay.startup_timeout;
        let lease = loop {
            match store.lease_transactional_id(&txn_id).await {
                Ok(Some(lease)) => break lease,
                Ok(None) if Instant::now() < deadline => {
                    tracing::warn!(relay = %relay_id, transactional_id = %txn_id,
                        "another live relay uses this relay.id; waiting for it to stop (each exactly-once relay needs its own relay.id)");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Ok(None) => {
                    return Err(CliError::new(
                        exit::USAGE,
                        format!(
                            "another live relay of {} uses relay.id {relay_id:?}: in exactly-once mode every relay \
                             needs its own, stable relay.id (set OUTBOX_RELAY__RELAY__ID)",
                            store.table()
                        ),
                    ))
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "postgres not reachable yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(CliError::new(exit::UNAVAILABLE, format!("cannot reach Postgres at {pg}: {e}"))),
            }
        };
        // Resolve what an earlier run of this relay left prepared before claiming.
        let deadline = Instant::now() + settings.relay.startup_timeout;
        retry_until(deadline, "postgres", || async {
            match relay.check_prerequisites().await {
                Err(EosError::Store(e)) => Err(e),
                other => Ok(other),
            }
        })
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("cannot reach Postgres at {pg}: {e}")))?
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
        // Unreachable dependencies are retried; a prerequisite no retry can fix
        // (an untrustworthy decisions topic) stops the start-up at once.
        let start = || async {
            match relay.start().await {
                Err(EosError::Prerequisite(p)) => Ok(Err(p)),
                Err(e) => Err(e),
                Ok(()) => Ok(Ok(())),
            }
        };
        let started = tokio::select! {
            r = retry_until(deadline, "exactly-once recovery", start) => r,
            s = signals.recv() => {
                tracing::info!(signal = s, "stopped during start-up");
                return Ok(());
            }
        };
        started
            .map_err(|e| {
                CliError::new(
                    exit::UNAVAILABLE,
                    format!("exactly-once start-up failed: {e} (try `outbox-relay check`)"),
                )
            })?
            .map_err(|p| CliError::new(exit::USAGE, format!("exactly-once cannot start: {p}")))?;
        let relay = Arc::new(relay);
        let counters = relay.counters.clone();
        let stop = stop_rx.clone();
        (
            counters,
            tokio::spawn(async move {
                relay.run(stop).await;
                drop(lease);
            }),
        )
    } else {
        let relay = Arc::new(Relay::new(store.clone(), sink.clone(), settings.relay.clone(), wake));
        let counters = relay.counters.clone();
        let stop = stop_rx.clone();
        (counters, tokio::spawn(async move { relay.run(stop).await }))
    };
    // Exactly-once relays resolve stale prepared batches in their loop; in
    // at-least-once mode a task does it (a table switched from exactly-once, or
    // an exactly-once relay that never came back, leaves them behind).
    let orphans = (!exactly_once)
        .then(|| spawn_orphan_resolver(&settings, store.clone(), sink.clone(), txn_ids.clone(), stop_rx.clone()));
    tracing::info!(
        relay = %relay_id, table = %store.table(), postgres = %pg, kafka = %settings.kafka_brokers(),
        on_publish = ?settings.relay.on_publish, batch_size = settings.relay.batch_size,
        delivery = settings.relay.delivery.as_str(),
        "outbox-relay started"
    );

    let signal = tokio::select! {
        s = signals.recv() => s,
        r = &mut relay_task => {
            // The loop only returns after a stop request; anything else is a bug.
            return Err(CliError::new(exit::SOFTWARE, format!("relay loop ended unexpectedly: {r:?}")));
        }
    };
    tracing::info!(signal, "stopping: no new claims; finishing the in-flight batch");
    let _ = stop_tx.send(true);
    let timeout = settings.relay.shutdown_timeout;
    let started = Instant::now();
    if tokio::time::timeout(timeout.mul_f32(0.8), &mut relay_task).await.is_err() {
        // Kafka did not acknowledge in time: drop what is queued so the batch
        // finishes with those events still pending (they are published later).
        tracing::warn!("in-flight batch not acknowledged in time; releasing it");
        sink.purge();
        if tokio::time::timeout(timeout.saturating_sub(started.elapsed()), &mut relay_task).await.is_err() {
            relay_task.abort();
        }
    }
    let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
    let flush_sink = sink.clone();
    let flushed = tokio::task::spawn_blocking(move || flush_sink.flush(left)).await;
    if let Ok(Err(e)) = flushed {
        tracing::warn!(error = %e, "producer not fully flushed");
    }
    listener.abort();
    monitor.abort();
    if let Some(o) = orphans.flatten() {
        o.abort();
    }
    if let Some(r) = retention {
        r.abort();
    }
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let c = &counters;
    tracing::info!(
        published = c.published.load(std::sync::atomic::Ordering::Relaxed),
        failed = c.failed.load(std::sync::atomic::Ordering::Relaxed),
        "outbox-relay stopped"
    );
    Ok(())
}

/// Retries `op` with back-off until it succeeds or `deadline` passes.
async fn retry_until<T, E, F, Fut>(deadline: Instant, what: &str, mut op: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what} not reachable yet");
                tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
        }
    }
}

/// SIGTERM and SIGINT, registered once at start.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals { term: signal(SignalKind::terminate()).ok(), int: signal(SignalKind::interrupt()).ok() }
    }

    async fn recv(&mut self) -> &'static str {
        match (&mut self.term, &mut self.int) {
            (Some(term), Some(int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            // Without handlers the process still stops on SIGTERM (default action).
            _ => std::future::pending().await,
        }
    }
}

/// At-least-once mode: resolves this table's prepared batches older than
/// `relay.recovery_timeout` (see `relay::Recovery`), every half of it.
fn spawn_orphan_resolver(
    settings: &Settings,
    store: Store,
    sink: Arc<KafkaSink>,
    txn_ids: TxnIds,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let every = settings.relay.recovery_timeout / 2;
    let decisions = match Decisions::new(settings) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot resolve prepared batches left by exactly-once relays");
            return None;
        }
    };
    let recovery = Recovery::new(store, decisions, txn_ids, settings.relay.recovery_timeout);
    Some(tokio::spawn(async move {
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
/// minute, in small batches (see `cleanup`), off the hot path.
fn spawn_retention(store: Store, retention: Duration, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                _ = stop.changed() => return,
            }
            match super::cleanup_all(&store, retention).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(deleted = n, retention = %humantime::format_duration(retention), "retention clean-up")
                }
                Err(e) => tracing::warn!(error = %e, "retention clean-up failed; will retry"),
            }
        }
    })
}
