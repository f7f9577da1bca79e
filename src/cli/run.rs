//! `outbox-relay run`: the daemon (see `daemon`) until SIGTERM or SIGINT.

use super::CliError;
use crate::config::Settings;
use crate::daemon::Daemon;

pub async fn run(settings: Settings) -> Result<(), CliError> {
    // Handlers first: a SIGTERM during start-up (waiting for Postgres) is a
    // clean stop too, not a kill by the default action.
    let signals = Signals::install();
    if !settings.outboxes.is_empty() {
        return run_many(settings, signals).await;
    }
    run_one(settings, signals).await
}

/// Several outboxes: each supervised on its own (one that cannot start is
/// retried while the others run); the process exits only on a signal.
async fn run_many(settings: Settings, mut signals: Signals) -> Result<(), CliError> {
    let many = Daemon::start_many(settings).await?;
    let signal = signals.recv().await;
    tracing::info!(signal, "stopping: no new claims; finishing the in-flight batches");
    many.shutdown().await;
    Ok(())
}

async fn run_one(settings: Settings, mut signals: Signals) -> Result<(), CliError> {
    let mut running = tokio::select! {
        r = Daemon::start(settings) => r?,
        s = signals.recv() => {
            tracing::info!(signal = s, "stopped during start-up");
            return Ok(());
        }
    };
    let signal = tokio::select! {
        s = signals.recv() => s,
        e = running.ended() => return Err(e.into()),
    };
    tracing::info!(signal, "stopping: no new claims; finishing the in-flight batch");
    running.shutdown().await;
    Ok(())
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
