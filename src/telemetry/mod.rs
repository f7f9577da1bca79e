//! Telemetry, a leaf every layer may use and that uses none of them: logging
//! set-up, the metric names, and the named internal events (in the manner of
//! Vector's `internal_events`) through which the layer that knows a fact logs
//! and counts it in one place.

pub mod events;
pub mod metrics;
pub mod otel;

use std::io::IsTerminal;

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
