//! The daemon: starts, runs and stops a relay — the HTTP endpoints, the
//! start-up waits (`startup.rs`), the exactly-once lease and prerequisites
//! (`lease.rs`), the relay loop, and the tasks beside it (`monitor.rs`,
//! `tasks.rs`) — in the library, so `cli run` only parses and waits for a
//! signal, and tests can run a whole relay in-process.
//!
//! ```no_run
//! # async fn demo(settings: outbox_relay::config::Settings) -> Result<(), outbox_relay::daemon::StartError> {
//! let running = outbox_relay::daemon::Daemon::start(settings).await?;
//! // … until SIGTERM …
//! running.shutdown().await;
//! # Ok(()) }
//! ```

mod lease;
mod many;
mod monitor;
mod startup;
mod tasks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

pub use many::Many;
pub use monitor::spawn_monitor;

use crate::config::{Delivery, OnPublish, Settings};
use crate::exit;
use crate::http::Health;
use crate::relay::{Counters, ExactlyOnceRelay, KafkaGate, Relay};
use crate::sink::{KafkaSink, Sink};
use crate::store::{describe, spawn_listener, Store, TxnIds};

/// Why a relay did not start (or stopped by itself), with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Invalid configuration, or a prerequisite no retry can fix.
    #[error("{0}")]
    Config(String),
    /// The outbox schema is missing or outdated.
    #[error("{0}")]
    Schema(String),
    /// Postgres unreachable after `relay.startup_timeout`.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (a bug).
    #[error("{0}")]
    Software(String),
}

impl StartError {
    /// The process's exit code for this error (see [`crate::exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Config(_) => exit::USAGE,
            StartError::Schema(_) => exit::SCHEMA,
            StartError::Unavailable(_) => exit::UNAVAILABLE,
            StartError::Software(_) => exit::SOFTWARE,
        }
    }
}

/// Starts relays.
pub struct Daemon;

/// A relay that runs: stop it with [`Running::shutdown`].
pub struct Running {
    stop: watch::Sender<bool>,
    relay: JoinHandle<Result<(), StartError>>,
    /// The loop's task has been awaited to its end (by [`Running::ended`]).
    relay_done: bool,
    tasks: Vec<JoinHandle<()>>,
    http: Option<JoinHandle<()>>,
    http_addr: Option<SocketAddr>,
    /// Stops the HTTP server (a single-outbox relay's own).
    http_stop: Option<watch::Sender<bool>>,
    sink: Arc<KafkaSink>,
    store: Store,
    gate: Arc<KafkaGate>,
    counters: Arc<Counters>,
    shutdown_timeout: Duration,
}

/// What a stopped relay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub published: u64,
    pub failed: u64,
}

impl Daemon {
    /// Binds the HTTP endpoints, waits for Postgres and checks the schema
    /// (and, exactly-once, takes the id lease), then starts the relay loop and
    /// its tasks. Does not wait for Kafka.
    pub async fn start(settings: Settings) -> Result<Running, StartError> {
        crate::failpoint::validate_env().map_err(StartError::Config)?;
        let health = Arc::new(Health::default());
        let (http_stop, http_stop_rx) = watch::channel(false);
        let table = settings.table().to_string();
        let (http, http_addr) = serve_http(&settings, vec![(table, health.clone())], http_stop_rx).await?;
        let mut running = Self::start_outbox(settings, health).await?;
        running.http = http;
        running.http_addr = http_addr;
        running.http_stop = Some(http_stop);
        Ok(running)
    }

    /// One outbox's relay: its store and producer, its loop and tasks,
    /// reporting to `health`. No HTTP endpoint of its own.
    pub async fn start_outbox(settings: Settings, health: Arc<Health>) -> Result<Running, StartError> {
        let store = Store::new(&settings).map_err(|e| StartError::Config(e.to_string()))?;
        let (stop, stop_rx) = watch::channel(false);
        let txn_ids = startup::postgres_ready(&store, settings.relay.startup_timeout).await?;
        let exactly_once = settings.relay.delivery == Delivery::ExactlyOnce;
        let sink = match exactly_once {
            true => KafkaSink::transactional(&settings, &txn_ids.transactional_id(&settings.relay_id())),
            false => KafkaSink::new(&settings),
        };
        let sink = Arc::new(sink.map_err(|e| StartError::Config(e.to_string()))?);
        let wake = Arc::new(Notify::new());
        let (relay, gate, counters) = if exactly_once {
            start_exactly_once(&settings, &store, &sink, &txn_ids, wake.clone(), stop_rx.clone()).await?
        } else {
            start_at_least_once(&settings, &store, &sink, wake.clone(), stop_rx.clone())
        };
        let mut background = vec![
            spawn_monitor(store.clone(), sink.clone(), health, Duration::from_secs(5), stop_rx.clone()),
            spawn_listener(store.clone(), wake, stop_rx.clone()),
            tasks::transaction_clock(store.clone(), stop_rx.clone()),
        ];
        if settings.relay.on_publish == OnPublish::Mark {
            background.push(tasks::retention(store.clone(), settings.relay.retention, stop_rx.clone()));
        }
        if !exactly_once {
            // Exactly-once relays resolve stale prepared batches in their loop.
            background.extend(tasks::orphan_resolver(&settings, store.clone(), sink.clone(), txn_ids, stop_rx));
        }
        tracing::info!(
            relay = %settings.relay_id(), table = %store.table(), postgres = %describe(store.pg_config()),
            kafka = %settings.kafka_brokers(), on_publish = ?settings.relay.on_publish,
            batch_size = settings.relay.batch_size, delivery = settings.relay.delivery.as_str(),
            "outbox-relay started"
        );
        Ok(Running {
            stop,
            relay,
            relay_done: false,
            tasks: background,
            http: None,
            http_addr: None,
            http_stop: None,
            sink,
            store,
            gate,
            counters,
            shutdown_timeout: settings.relay.shutdown_timeout,
        })
    }
}

type Started = (JoinHandle<Result<(), StartError>>, Arc<KafkaGate>, Arc<Counters>);

fn start_at_least_once(
    settings: &Settings,
    store: &Store,
    sink: &Arc<KafkaSink>,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> Started {
    let (depth, pool) = (settings.relay.pipeline_depth, settings.postgres.pool_size);
    if pool <= depth {
        // Allowed (a small pool is a valid choice), but the depth is then not
        // what it says: each batch in flight holds a pooled connection.
        tracing::warn!(
            pool_size = pool,
            pipeline_depth = depth,
            "postgres.pool_size leaves no connection beside relay.pipeline_depth batches in flight: \
             claims wait for one, and fewer batches are in flight than configured \
             (give the pool at least pipeline_depth + 1)"
        );
    }
    let relay = Arc::new(Relay::new(store.clone(), sink.clone(), settings.relay.clone(), wake));
    let (gate, counters) = (relay.gate(), relay.counters.clone());
    let task = crate::telemetry::spawn(async move {
        relay.run(stop).await;
        Ok(())
    });
    (task, gate, counters)
}

/// The id lease and two-phase commit (Postgres), then the loop, which does the
/// Kafka side of start-up once Kafka answers.
async fn start_exactly_once(
    settings: &Settings,
    store: &Store,
    sink: &Arc<KafkaSink>,
    txn_ids: &TxnIds,
    wake: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> Result<Started, StartError> {
    let relay_id = settings.relay_id();
    let txn_id = txn_ids.transactional_id(&relay_id);
    let lease = lease::take(store, &relay_id, &txn_id, settings.relay.startup_timeout).await?;
    lease::two_phase_commit(store, settings.relay.startup_timeout).await?;
    let relay = ExactlyOnceRelay::new(settings, store.clone(), sink.clone(), wake, txn_ids)
        .map_err(|e| StartError::Config(e.to_string()))?
        .with_lease(lease.state());
    let relay = Arc::new(relay);
    let (gate, counters) = (relay.gate(), relay.counters.clone());
    let task = crate::telemetry::spawn(async move {
        let result = relay.run(stop).await;
        drop(lease);
        result.map_err(|e| StartError::Config(format!("exactly-once cannot start: {e}")))
    });
    Ok((task, gate, counters))
}

/// Binds `http.listen` first (a port conflict is a configuration error,
/// reported before any wait) and serves `/metrics`, `/healthz`, `/readyz`.
pub(crate) async fn serve_http(
    settings: &Settings,
    health: crate::http::Healths,
    stop: watch::Receiver<bool>,
) -> Result<(Option<JoinHandle<()>>, Option<SocketAddr>), StartError> {
    let addr = settings.http.listen.as_str();
    if addr.is_empty() {
        return Ok((None, None));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Config(format!("config: `http.listen` = {addr:?}: cannot listen ({e})")))?;
    let handle = crate::telemetry::metrics::install().map_err(|e| StartError::Software(format!("metrics: {e}")))?;
    let local = listener.local_addr().ok();
    tracing::info!(addr = %local.map(|a| a.to_string()).unwrap_or_default(), "serving /metrics, /healthz, /readyz");
    let task = crate::telemetry::spawn(async move {
        if let Err(e) = crate::http::serve(listener, handle, health, stop).await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    Ok((Some(task), local))
}

impl Running {
    /// Resolves only if the relay loop ended by itself: a prerequisite no
    /// retry can fix (exactly-once), or a bug. The process should exit with
    /// the error's code.
    pub async fn ended(&mut self) -> StartError {
        if self.relay_done {
            return std::future::pending().await;
        }
        let result = (&mut self.relay).await;
        self.relay_done = true;
        match result {
            Ok(Err(e)) => e,
            Ok(Ok(())) => StartError::Software("relay loop ended unexpectedly".into()),
            Err(e) => StartError::Software(format!("relay loop ended unexpectedly: {e}")),
        }
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if anywhere.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Whether the relay claims now (Kafka answers).
    pub fn kafka_gate(&self) -> &KafkaGate {
        &self.gate
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Stops claiming, finishes or releases the in-flight batch, flushes the
    /// producer and stops every task, within `relay.shutdown_timeout`.
    pub async fn shutdown(mut self) -> Summary {
        let _ = self.stop.send(true);
        let timeout = self.shutdown_timeout;
        let started = Instant::now();
        if !self.relay_done && tokio::time::timeout(timeout.mul_f32(0.8), &mut self.relay).await.is_err() {
            // Kafka did not acknowledge in time: drop what is queued so the batch
            // finishes with those events still pending (they are published later).
            tracing::warn!("in-flight batch not acknowledged in time; releasing it");
            self.sink.purge();
            if tokio::time::timeout(timeout.saturating_sub(started.elapsed()), &mut self.relay).await.is_err() {
                self.relay.abort();
            }
        }
        let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
        let sink = self.sink.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || sink.flush(left)).await {
            tracing::warn!(error = %e, "producer not fully flushed");
        }
        // The last producer spans ([tracing]), bounded by the exporter's timeout.
        let _ = tokio::task::spawn_blocking(crate::telemetry::otel::flush).await;
        for t in &self.tasks {
            t.abort();
        }
        if let Some(s) = self.http_stop.take() {
            let _ = s.send(true);
        }
        if let Some(t) = self.http.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        let summary = Summary {
            published: self.counters.published.load(std::sync::atomic::Ordering::Relaxed),
            failed: self.counters.failed.load(std::sync::atomic::Ordering::Relaxed),
        };
        tracing::info!(published = summary.published, failed = summary.failed, "outbox-relay stopped");
        summary
    }
}
