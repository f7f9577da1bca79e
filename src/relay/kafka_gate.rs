//! Whether the relay may claim: Kafka answers. A batch that waited for Kafka
//! past `relay.publish_timeout` closes the gate; while it is closed the relay
//! claims nothing and holds nothing on the database (no transaction, snapshot,
//! xid or row lock), and probes Kafka on its own — a metadata request, outside
//! any transaction — until it answers. Each batch given back in a row doubles
//! the pause before the next probe (up to `relay.max_backoff`), so a cluster
//! that answers metadata requests but accepts no writes is not met with a new
//! held transaction every second.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::sink::Sink;
use crate::telemetry::events::{KafkaAvailability, KafkaStillUnavailable};
use crate::telemetry::Emit;

/// How long one probe may wait for the cluster's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Between probes while Kafka does not answer.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often a relay that is still waiting says so.
const REPORT_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug)]
enum State {
    /// Not probed yet (start-up): probe before the first claim.
    Unknown,
    Open,
    Closed {
        since: Instant,
        reason: String,
    },
}

#[derive(Debug)]
pub struct KafkaGate {
    state: Mutex<State>,
    /// Batches given back in a row (reset by a batch Kafka acknowledged).
    strikes: Mutex<u32>,
    max_pause: Duration,
}

impl KafkaGate {
    pub fn new(max_pause: Duration) -> KafkaGate {
        KafkaGate { state: Mutex::new(State::Unknown), strikes: Mutex::new(0), max_pause }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May the relay claim now?
    pub fn is_open(&self) -> bool {
        matches!(*self.state(), State::Open)
    }

    /// Kafka did not answer a batch in time: claim nothing until it does.
    pub fn close(&self, reason: &str) {
        *self.strikes.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let mut state = self.state();
        if !matches!(*state, State::Closed { .. }) {
            *state = State::Closed { since: Instant::now(), reason: reason.to_string() };
            drop(state);
            KafkaAvailability { available: false, waited: None, reason }.emit();
        }
    }

    /// A batch went through: Kafka takes writes.
    pub fn record_success(&self) {
        *self.strikes.lock().unwrap_or_else(|p| p.into_inner()) = 0;
    }

    /// Returns at once while the gate is open; otherwise probes Kafka (outside
    /// any transaction) until it answers, and opens the gate. `false` when a
    /// stop was requested meanwhile.
    pub async fn wait_open<S: Sink>(&self, sink: &S, shutdown: &mut watch::Receiver<bool>) -> bool {
        if self.is_open() {
            return true;
        }
        let strikes = *self.strikes.lock().unwrap_or_else(|p| p.into_inner());
        let mut pause = if strikes == 0 {
            Duration::ZERO
        } else {
            (Duration::from_secs(1) * 2u32.saturating_pow(strikes - 1)).min(self.max_pause)
        };
        let mut next_report = Instant::now() + REPORT_EVERY;
        loop {
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => {}
                }
            }
            if *shutdown.borrow() {
                return false;
            }
            match sink.ping(PROBE_TIMEOUT).await {
                Ok(()) => {
                    let mut state = self.state();
                    let waited = match &*state {
                        State::Closed { since, .. } => Some(since.elapsed()),
                        _ => None,
                    };
                    *state = State::Open;
                    drop(state);
                    KafkaAvailability { available: true, waited, reason: "" }.emit();
                    return true;
                }
                Err(e) => {
                    let error = e.to_string();
                    let mut state = self.state();
                    match &*state {
                        State::Closed { since, .. } if Instant::now() >= next_report => {
                            let waited = since.elapsed();
                            drop(state);
                            KafkaStillUnavailable { waited, error: &error }.emit();
                            next_report = Instant::now() + REPORT_EVERY;
                        }
                        State::Closed { .. } => {}
                        _ => {
                            *state = State::Closed { since: Instant::now(), reason: error.clone() };
                            drop(state);
                            KafkaAvailability { available: false, waited: None, reason: &error }.emit();
                        }
                    }
                    pause = PROBE_EVERY;
                }
            }
        }
    }

    /// Why the gate is closed, if it is.
    pub fn closed_because(&self) -> Option<String> {
        match &*self.state() {
            State::Closed { reason, .. } => Some(reason.clone()),
            _ => None,
        }
    }
}
