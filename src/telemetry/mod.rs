//! Telemetry, a leaf every layer may use and that uses none of them: logging
//! set-up, the metric names, and the named internal events (in the manner of
//! Vector's `internal_events`) through which the layer that knows a fact logs
//! and counts it in one place.

pub mod events;
pub mod metrics;
pub mod otel;

use std::future::Future;
use std::io::IsTerminal;
use std::sync::Arc;

use tracing::Instrument;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

pub use events::Emit;

/// Installs the global subscriber (once; later calls are ignored). `RUST_LOG`
/// overrides `log.level` when set.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // Server NOTICEs ("already exists, skipping") are noise for operators.
        let quiet = format!("tokio_postgres::connection=warn,{}", cfg.level);
        EnvFilter::try_new(quiet).unwrap_or_else(|_| EnvFilter::new("info"))
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}

tokio::task_local! {
    /// The outbox table the current task serves: every metric carries it as
    /// its `outbox` label, and every log line names it (a span).
    static OUTBOX: Arc<str>;
}

/// The `outbox` label of the current task: the table, in a process that
/// serves several outboxes; `None` otherwise.
pub fn outbox_label() -> Option<String> {
    OUTBOX.try_with(|o| o.to_string()).ok()
}

/// Runs `fut` as the tasks of outbox `table`: its metrics are labelled with
/// it, its logs carry it, and what it spawns through [`spawn`] too.
pub async fn in_outbox<F: Future>(table: &str, fut: F) -> F::Output {
    OUTBOX.scope(Arc::from(table), fut.instrument(tracing::info_span!("outbox", table))).await
}

/// `tokio::spawn`, keeping the current outbox (label and log span).
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let fut = fut.instrument(tracing::Span::current());
    match OUTBOX.try_with(Arc::clone) {
        Ok(label) => tokio::spawn(OUTBOX.scope(label, fut)),
        Err(_) => tokio::spawn(fut),
    }
}
