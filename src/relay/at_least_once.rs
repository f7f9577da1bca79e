//! The at-least-once loop: claim a batch, publish it, wait for every delivery
//! report, record the outcome, commit. A busy relay never waits: batches
//! overlap, so while batch N waits for Kafka's acknowledgements, batch N+1 is
//! claimed and handed to the same producer (after N, so per-key order holds);
//! then N is recorded and committed. With `relay.pipeline_depth` 3 and a
//! backlog, N+2 is claimed too before N is recorded: the claim connection
//! need not wait for N's commit. An idle relay looks again after a wait
//! that grows with how long the outbox has been empty (see [`IdleWait`]).
//!
//! No batch waits for Kafka longer than `relay.publish_timeout`: past it the
//! relay abandons the producer (so nothing handed over can reach Kafka after
//! the rows are given back, nor overtake them), records what Kafka did
//! acknowledge, gives the rest back, and claims nothing until Kafka answers
//! again (see `kafka_gate.rs`). A Kafka outage never holds the database's
//! xmin horizon longer than that.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::{watch, Notify};

use super::outcome::{outcome_of, report};
use super::{Backoff, Counters, IdleWait, KafkaGate, Linger, Step};
use crate::config::RelayConfig;
use crate::sink::{Epoch, SendResult, Sink};
use crate::store::{Claimed, Finished, Outcome, Store, StoreError};
use crate::telemetry::events::{BatchFailed, BatchFinished, BatchReleased, EventsDeferred};
use crate::telemetry::Emit;

/// A batch whose claim is older than this when it is about to be sent is
/// confirmed still held first (see `Relay::start_batch`).
const STALE_CLAIM: Duration = Duration::from_secs(1);

pub struct Relay<S: Sink> {
    store: Store,
    sink: Arc<S>,
    cfg: RelayConfig,
    wake: Arc<Notify>,
    gate: Arc<KafkaGate>,
    linger: std::sync::Mutex<Linger>,
    pub counters: Arc<Counters>,
}

/// A batch handed to the producer, waiting for its acknowledgements.
struct InFlight {
    claimed: Claimed,
    results: BoxFuture<'static, Vec<SendResult>>,
    held_keys: HashSet<String>,
    stalled: bool,
    epoch: Epoch,
    started: Instant,
}

/// What one round of the loop came to.
#[derive(Default)]
struct Round {
    failure: Option<StoreError>,
    /// Some events were not delivered for a passing reason.
    retry: bool,
    /// Everything claimable belongs to keys another relay holds.
    deferred_only: bool,
}

/// What the loop does next.
enum Next {
    /// Claim (or finish) at once.
    Go,
    Pause(Duration),
    /// Nothing to do: look for work, waiting longer the longer the outbox is empty.
    WaitForWork,
}

enum Started {
    Idle,
    /// Every claimed row waits for another relay's earlier event of its key.
    Deferred,
    Batch(Box<InFlight>),
}

impl<S: Sink> Relay<S> {
    /// `wake` receives a permit when an operator replays events (see
    /// `store::spawn_listener`).
    pub fn new(store: Store, sink: Arc<S>, cfg: RelayConfig, wake: Arc<Notify>) -> Relay<S> {
        let gate = Arc::new(KafkaGate::new(cfg.max_backoff));
        let linger = std::sync::Mutex::new(Linger::new(cfg.linger, cfg.max_linger));
        Relay { store, sink, cfg, wake, gate, linger, counters: Arc::default() }
    }

    fn linger(&self) -> std::sync::MutexGuard<'_, Linger> {
        self.linger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the loop currently claims (Kafka answers).
    pub fn gate(&self) -> Arc<KafkaGate> {
        self.gate.clone()
    }

    /// Runs until `shutdown` flips to true, then returns after the in-flight
    /// batches are finished. Never returns early on a transient fault.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.cfg.max_backoff);
        let mut idle = IdleWait::new(self.cfg.poll_interval);
        // Oldest first; at most `relay.pipeline_depth`.
        let mut inflight: VecDeque<Box<InFlight>> = VecDeque::new();
        // When the last claim found less than a full batch: when it started
        // (the next claim waits for the linger from then: `relay.linger`, or
        // longer while the database is busy, see `Linger`).
        let mut lingering: Option<Instant> = None;
        // The last claim found a full batch: there is a backlog, and the
        // pipeline may go deeper than one batch beside the claim.
        let mut backlog = false;
        loop {
            let stopping = *shutdown.borrow();
            if stopping && inflight.is_empty() {
                return;
            }
            self.store.sweep_if_due(self.cfg.sweep_interval);
            // Nothing held: wait here, outside any transaction, while Kafka is away.
            if inflight.is_empty() && !self.gate.wait_open(&*self.sink, &mut shutdown).await {
                continue;
            }
            // 1. claim and send the next batch (unless stopping, or Kafka is
            //    away, or the pipeline is full) while, on another connection,
            //    2. the oldest one is recorded and committed once its
            //    acknowledgements are in. The rows of every batch in flight stay
            //    locked until then, so the claim skips them; their events went
            //    to the producer first.
            let own: Vec<uuid::Uuid> = inflight.iter().flat_map(|f| f.claimed.events.iter().map(|e| e.id)).collect();
            let hold: HashSet<String> = inflight.iter().flat_map(|f| f.held_keys.iter().cloned()).collect();
            let behind = inflight.back().map(|f| f.epoch);
            // A batch that found the producer replaced went back untouched:
            // finish those in flight before claiming more (see `Sent::stalled`).
            let draining = inflight.iter().any(|f| f.stalled);
            // Past two batches only while a backlog lasts: once a claim finds
            // less than a full batch, the deeper ones are recorded first.
            let room = inflight.len() < self.cfg.pipeline_depth && (backlog || inflight.len() < 2);
            let claiming = !stopping && !draining && self.gate.is_open() && room;
            // The oldest batch is finished in this round unless the pipeline
            // has room to go deeper while a backlog lasts.
            let deeper = claiming && backlog && inflight.len() + 1 < self.cfg.pipeline_depth;
            let prev = if deeper { None } else { inflight.pop_front() };
            let linger_until = lingering.take().map(|t| t + self.linger().get());
            let claim = async {
                if claiming {
                    // The oldest batch is recorded meanwhile (join below).
                    if let Some(until) = linger_until {
                        tokio::time::sleep_until(until.into()).await;
                    }
                    Some(self.start_batch(&own, &hold, behind).await)
                } else {
                    None
                }
            };
            let finish = async {
                match prev {
                    Some(prev) => Some(self.finish_batch(prev).await),
                    None => None,
                }
            };
            let (claimed, finished) = tokio::join!(claim, finish);
            let mut outcome = Round::default();
            // A round that claimed nothing (the pipeline was full, or draining)
            // leaves what the last claim said about the backlog.
            match claimed {
                Some(Ok(Started::Batch(f))) => {
                    let full = f.claimed.events.len() + f.claimed.deferred >= self.cfg.batch_size;
                    lingering = (!full).then_some(f.started);
                    backlog = full;
                    inflight.push_back(f);
                }
                None => {}
                Some(Ok(Started::Idle)) => backlog = false,
                Some(Ok(Started::Deferred)) => (backlog, outcome.deferred_only) = (false, true),
                Some(Err(e)) => (backlog, outcome.failure) = (false, Some(e)),
            }
            match finished {
                Some(Ok(finished)) => outcome.retry = finished.retry > 0,
                Some(Err(e)) => outcome.failure = outcome.failure.or(Some(e)),
                None => {}
            }
            // 3. keep the pipeline full, back off, or wait for work
            let busy = !inflight.is_empty() || backlog;
            match self.next(outcome, busy, &mut backoff, &mut idle) {
                Next::Go => {}
                Next::WaitForWork => {
                    if !stopping {
                        self.wait_for_work(&mut idle, &mut shutdown).await;
                    }
                }
                Next::Pause(pause) => {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }

    /// What the loop does after a round.
    /// `busy`: a batch is in flight, or the last claim found a full one.
    fn next(&self, round: Round, busy: bool, backoff: &mut Backoff, idle: &mut IdleWait) -> Next {
        if let Some(e) = round.failure {
            let delay = backoff.next_delay();
            BatchFailed { error: &e, transient: e.is_transient(), retry_in: delay, next: "retrying" }.emit();
            return Next::Pause(delay);
        }
        if !self.gate.is_open() {
            // Kafka is away: the gate waits for it (once nothing is held).
            return Next::Go;
        }
        if round.retry {
            // some events were not delivered for a passing reason: give Kafka a moment
            return Next::Pause(backoff.next_delay());
        }
        if busy {
            backoff.reset();
            idle.busy();
            return Next::Go;
        }
        if round.deferred_only {
            // everything claimable belongs to keys another relay holds the
            // head of (its keys are left out for a moment); let it finish
            return Next::Pause(Duration::from_millis(10 + fastrand::u64(0..20)));
        }
        backoff.reset();
        Next::WaitForWork
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
        match self.start_batch(&[], &HashSet::new(), None).await? {
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
    /// batch still in flight; `hold`: keys the next batch must not send;
    /// `behind`: the producer epoch that batch went to.
    async fn start_batch(
        &self,
        own: &[uuid::Uuid],
        hold: &HashSet<String>,
        behind: Option<Epoch>,
    ) -> Result<Started, StoreError> {
        let started = Instant::now();
        let Some(claimed) = self.store.claim(self.cfg.batch_size, own).await? else {
            return Ok(Started::Idle);
        };
        self.linger().observe(claimed.round_trip, claimed.events.len() + claimed.deferred, Instant::now());
        if claimed.events.is_empty() {
            EventsDeferred { count: claimed.deferred as u64 }.emit();
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
        let sent = self.sink.send(&claimed.events, hold, behind).await;
        if crate::failpoint::hit_batch("after-send", claimed.events.len()) == Some(crate::failpoint::Action::Fatal) {
            self.sink.inject_fatal_error();
        }
        Ok(Started::Batch(Box::new(InFlight {
            claimed,
            results: sent.results,
            held_keys: sent.held_keys,
            stalled: sent.stalled,
            epoch: sent.epoch,
            started,
        })))
    }

    /// Waits for every result of the batch (until `relay.publish_timeout` after
    /// its claim), records the outcomes and commits.
    async fn finish_batch(&self, f: Box<InFlight>) -> Result<Finished, StoreError> {
        let InFlight { claimed, mut results, started, .. } = *f;
        let claim_ms = claimed.claimed_at.saturating_duration_since(started).as_millis() as u64;
        let deadline = claimed.claimed_at + self.cfg.publish_timeout;
        let results = match tokio::time::timeout_at(deadline.into(), &mut results).await {
            Ok(results) => results,
            Err(_) => {
                // Kafka did not answer in time. Nothing the producer holds may
                // reach Kafka once the rows are pending again (another relay, or
                // this one later, publishes them): abandon it as a whole, which
                // resolves every pending report as purged.
                self.gate.close("no acknowledgement within relay.publish_timeout");
                self.sink.abandon("publish_timeout");
                let results = results.await;
                let unacknowledged = results.iter().filter(|r| !matches!(r, SendResult::Delivered)).count();
                BatchReleased { rows: claimed.events.len(), waited: claimed.claimed_at.elapsed(), unacknowledged }
                    .emit();
                results
            }
        };
        let acked_ms = started.elapsed().as_millis() as u64;
        let n = claimed.events.len();
        let outcomes: Vec<Outcome> = results.iter().map(outcome_of).collect();
        let deferred = claimed.deferred;
        let (finished, events) = claimed.finish(&outcomes, self.cfg.max_attempts).await?;
        report(&events, &results, &finished, self.cfg.max_attempts);
        EventsDeferred { count: deferred as u64 }.emit();
        if finished.published > 0 {
            self.gate.record_success();
        }
        self.counters.add(&finished);
        BatchFinished {
            claimed: n,
            deferred,
            published: finished.published,
            failed: finished.failed,
            retry: finished.retry,
            claim_ms,
            acked_ms,
            took: started.elapsed(),
        }
        .emit();
        Ok(finished)
    }
}
