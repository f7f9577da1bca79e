//! The loop that joins store and sink: claim a batch, publish it, wait for every
//! delivery report, record the outcome, commit. A busy relay never waits: the
//! pipeline keeps claiming. An idle one looks again after a wait that grows with
//! how long the outbox has been empty (see [`IdleWait`]). It backs off after
//! failures and never gives up on a transient one.

mod backoff;
mod exactly_once;
mod monitor;
mod recovery;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

pub use backoff::Backoff;
pub use exactly_once::{EosError, ExactlyOnceRelay};
pub use monitor::spawn_monitor;
pub use recovery::{Recovery, ResolveError, Resolved};

use crate::config::RelayConfig;
use crate::sink::{FailureClass, SendResult, Sink};
use crate::store::{Claimed, EventFailure, Finished, Outcome, Store, StoreError};

/// What one step of the loop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing was pending.
    Idle,
    /// A batch was claimed and finished.
    Batch { claimed: usize, finished: Finished },
    /// Every claimed row waits for another relay's earlier event of its key.
    Deferred { rows: usize },
}

/// Counters the loop keeps (read by logs, tests and, later, metrics).
#[derive(Debug, Default)]
pub struct Counters {
    pub published: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub batches: std::sync::atomic::AtomicU64,
}

pub struct Relay<S: Sink> {
    store: Store,
    sink: Arc<S>,
    cfg: RelayConfig,
    wake: Arc<Notify>,
    pub counters: Arc<Counters>,
}

/// A batch whose claim is older than this when it is about to be sent is
/// confirmed still held first (see `Relay::start_batch`).
const STALE_CLAIM: Duration = Duration::from_secs(1);

/// How long an idle relay waits before it looks at the outbox again: an eighth
/// of how long the outbox has been empty, at least 1 ms, at most
/// `relay.poll_interval`. Right after a batch the relay looks again within a
/// millisecond or two (an event rarely waits), and an outbox empty for minutes
/// costs Postgres one cheap claim per `poll_interval`. No NOTIFY is needed, so
/// nothing runs in the application's commit (see migration 0003).
#[derive(Debug, Clone)]
pub struct IdleWait {
    since: Option<Instant>,
    max: Duration,
}

impl IdleWait {
    pub fn new(max: Duration) -> IdleWait {
        IdleWait { since: None, max }
    }

    /// Work was found.
    pub fn busy(&mut self) {
        self.since = None;
    }

    /// Nothing was found: how long to wait now.
    pub fn wait(&mut self) -> Duration {
        let since = *self.since.get_or_insert_with(Instant::now);
        (since.elapsed() / 8).clamp(Duration::from_millis(1), self.max)
    }
}

impl<S: Sink> Relay<S> {
    /// `wake` receives a permit when an operator replays events (see
    /// `store::spawn_listener`).
    pub fn new(store: Store, sink: Arc<S>, cfg: RelayConfig, wake: Arc<Notify>) -> Relay<S> {
        Relay { store, sink, cfg, wake, counters: Arc::default() }
    }

    /// Runs until `shutdown` flips to true, then returns after the in-flight
    /// batches are finished. Never returns early on a transient fault.
    ///
    /// Two batches overlap: while batch N waits for Kafka's acknowledgements,
    /// batch N+1 is claimed and handed to the same producer (after N, so per-key
    /// order holds); then N is recorded and committed.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.cfg.max_backoff);
        let mut idle = IdleWait::new(self.cfg.poll_interval);
        let mut inflight: Option<Box<InFlight>> = None;
        loop {
            let stopping = *shutdown.borrow();
            if stopping && inflight.is_none() {
                return;
            }
            self.store.sweep_if_due(self.cfg.sweep_interval);
            crate::metrics::inflight_age(inflight.as_ref().map(|f| f.claimed.claimed_at.elapsed()));
            // 1. claim and send the next batch (unless stopping) while, on another
            //    connection, 2. the previous one is recorded and committed once
            //    its acknowledgements are in. Its rows stay locked until then, so
            //    the claim skips them; its events went to the producer first.
            let (mut next, mut deferred_only, mut failure) = (None, false, None);
            let (own, hold) = match &inflight {
                Some(f) => (f.claimed.events.iter().map(|e| e.id).collect(), f.held_keys.clone()),
                None => (Vec::new(), HashSet::new()),
            };
            // A batch that found the producer broken went back untouched: finish
            // the one in flight before claiming more (see `Sent::stalled`).
            let draining = inflight.as_ref().is_some_and(|f| f.stalled);
            let prev = inflight.take();
            let alone = prev.is_none();
            let claim = async {
                if stopping || draining {
                    None
                } else {
                    Some(self.start_batch(&own, &hold, alone).await)
                }
            };
            let finish = async {
                match prev {
                    Some(prev) => Some(self.finish_batch(prev).await),
                    None => None,
                }
            };
            let (claimed, finished) = tokio::join!(claim, finish);
            match claimed {
                Some(Ok(Started::Batch(f))) => next = Some(f),
                Some(Ok(Started::Idle)) | None => {}
                Some(Ok(Started::Deferred)) => deferred_only = true,
                Some(Err(e)) => failure = Some(e),
            }
            let mut retry = false;
            match finished {
                Some(Ok(finished)) => retry = finished.retry > 0,
                Some(Err(e)) => failure = failure.or(Some(e)),
                None => {}
            }
            inflight = next;
            // 3. keep the pipeline full, back off, or wait for work
            let pause = if let Some(e) = failure {
                crate::metrics::batch_error();
                let delay = backoff.next_delay();
                if e.is_transient() {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "batch failed; retrying");
                } else {
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "batch failed; retrying (this needs attention)");
                }
                delay
            } else if retry {
                // some events were not delivered for a passing reason: give Kafka a moment
                backoff.next_delay()
            } else if inflight.is_some() {
                backoff.reset();
                idle.busy();
                continue;
            } else if deferred_only {
                // everything claimable belongs to keys another relay holds the
                // head of (its keys are left out for a moment); let it finish
                Duration::from_millis(10 + fastrand::u64(0..20))
            } else {
                backoff.reset();
                if !stopping {
                    self.wait_for_work(&mut idle, &mut shutdown).await;
                }
                continue;
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Waits until something may be claimable: looks (one cheap statement),
    /// and while nothing is pending sleeps as `idle` says and looks again. The
    /// first look is at once: events that arrived while the last batch was
    /// being recorded go out without a wait.
    async fn wait_for_work(&self, idle: &mut IdleWait, shutdown: &mut watch::Receiver<bool>) {
        loop {
            self.store.sweep_if_due(self.cfg.sweep_interval);
            if *shutdown.borrow() {
                return;
            }
            match self.store.anything_pending().await {
                Ok(false) => {}
                Ok(true) | Err(_) => return,
            }
            tokio::select! {
                _ = self.wake.notified() => return,
                _ = tokio::time::sleep(idle.wait()) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One batch, start to end: claim, publish, record, commit.
    pub async fn step(&self) -> Result<Step, StoreError> {
        match self.start_batch(&[], &HashSet::new(), true).await? {
            Started::Idle => Ok(Step::Idle),
            Started::Deferred => Ok(Step::Deferred { rows: 0 }),
            Started::Batch(f) => {
                let claimed = f.claimed.events.len();
                let finished = self.finish_batch(f).await?;
                Ok(Step::Batch { claimed, finished })
            }
        }
    }

    /// Claims a batch and hands it to the producer. `own`: rows of this relay's
    /// batch still in flight; `hold`: keys the next batch must not send.
    async fn start_batch(
        &self,
        own: &[uuid::Uuid],
        hold: &HashSet<String>,
        alone: bool,
    ) -> Result<Started, StoreError> {
        let started = Instant::now();
        let Some(claimed) = self.store.claim(self.cfg.batch_size, own).await? else {
            return Ok(Started::Idle);
        };
        if claimed.events.is_empty() {
            crate::metrics::deferred(claimed.deferred);
            claimed.release().await?;
            return Ok(Started::Deferred);
        }
        crate::failpoint::hit("after-claim");
        // Claim to send is in-process work (microseconds). A gap this long means
        // the process stood still, long enough perhaps for Postgres to end the
        // claim's transaction and hand its rows to another relay: sending them
        // now would make a duplicate of every event in the batch.
        let waited = claimed.claimed_at.elapsed();
        if waited >= STALE_CLAIM {
            if let Err(e) = claimed.confirm_held().await {
                tracing::warn!(
                    error = %e, stood_still_ms = waited.as_millis() as u64, rows = claimed.events.len(),
                    "the relay stood still between claiming a batch and sending it, and lost the claim meanwhile; \
                     not sending it (another relay or a later claim will)"
                );
                return Err(e);
            }
        }
        let sent = self.sink.send(&claimed.events, hold, alone).await;
        if crate::failpoint::hit_batch("after-send", claimed.events.len()) == Some(crate::failpoint::Action::Fatal) {
            self.sink.inject_fatal_error();
        }
        Ok(Started::Batch(Box::new(InFlight {
            claimed,
            results: sent.results,
            held_keys: sent.held_keys,
            stalled: sent.stalled,
            started,
        })))
    }

    /// Waits for every result of the batch, records the outcomes and commits.
    async fn finish_batch(&self, f: Box<InFlight>) -> Result<Finished, StoreError> {
        let InFlight { claimed, results, started, .. } = *f;
        let claim_ms = claimed.claimed_at.saturating_duration_since(started).as_millis() as u64;
        let results = results.await;
        let acked_ms = started.elapsed().as_millis() as u64;
        let n = claimed.events.len();
        let outcomes: Vec<Outcome> = results.iter().map(outcome_of).collect();
        log_rejections(&claimed.events, &outcomes, self.cfg.max_attempts);
        let deferred = claimed.deferred;
        let (finished, events) = claimed.finish(&outcomes, self.cfg.max_attempts).await?;
        crate::metrics::batch_finished(&events, &results, self.cfg.max_attempts, started.elapsed());
        crate::metrics::deferred(deferred);
        self.counters.add(finished);
        tracing::debug!(
            claimed = n,
            deferred,
            published = finished.published,
            failed = finished.failed,
            retry = finished.retry,
            claim_ms,
            acked_ms,
            ms = started.elapsed().as_millis() as u64,
            "batch done"
        );
        Ok(finished)
    }
}

impl Counters {
    fn add(&self, finished: Finished) {
        use std::sync::atomic::Ordering::Relaxed;
        self.published.fetch_add(finished.published as u64, Relaxed);
        self.failed.fetch_add(finished.failed as u64, Relaxed);
        self.batches.fetch_add(1, Relaxed);
    }
}

/// One warning per event Kafka (or the row itself) rejected, with its id.
fn log_rejections(events: &[crate::event::OutboxEvent], outcomes: &[Outcome], max_attempts: u32) {
    for (ev, o) in events.iter().zip(outcomes) {
        if let Outcome::Failed(f) = o {
            tracing::warn!(
                event_id = %ev.id, seq = ev.seq, topic = %ev.topic, attempt = ev.attempts + 1,
                max_attempts,
                parked = f.park_now || ev.attempts + 1 >= max_attempts as i32,
                error = %f.error, "event rejected"
            );
        }
    }
}

/// A batch handed to the producer, waiting for its acknowledgements.
struct InFlight {
    claimed: Claimed,
    results: futures_util::future::BoxFuture<'static, Vec<SendResult>>,
    held_keys: HashSet<String>,
    stalled: bool,
    started: Instant,
}

enum Started {
    Idle,
    /// Every claimed row waits for another relay's earlier event of its key.
    Deferred,
    Batch(Box<InFlight>),
}

/// The store's view of a Kafka result.
fn outcome_of(r: &SendResult) -> Outcome {
    match r {
        SendResult::Delivered => Outcome::Delivered,
        SendResult::Invalid { error } => Outcome::Failed(EventFailure { error: error.clone(), park_now: true }),
        SendResult::Failed { class: FailureClass::Permanent, error } => {
            Outcome::Failed(EventFailure { error: error.clone(), park_now: false })
        }
        SendResult::Failed { class: FailureClass::Transient | FailureClass::Fatal, .. } | SendResult::Skipped => {
            Outcome::Retry
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_permanent_and_invalid_results_count_against_the_event() {
        assert_eq!(outcome_of(&SendResult::Delivered), Outcome::Delivered);
        let t = SendResult::Failed { class: FailureClass::Transient, error: "down".into() };
        assert_eq!(outcome_of(&t), Outcome::Retry);
        let f = SendResult::Failed { class: FailureClass::Fatal, error: "fenced".into() };
        assert_eq!(outcome_of(&f), Outcome::Retry);
        let p = SendResult::Failed { class: FailureClass::Permanent, error: "too large".into() };
        assert!(matches!(outcome_of(&p), Outcome::Failed(EventFailure { park_now: false, .. })));
        let i = SendResult::Invalid { error: "malformed headers".into() };
        assert!(matches!(outcome_of(&i), Outcome::Failed(EventFailure { park_now: true, .. })));
    }
}
