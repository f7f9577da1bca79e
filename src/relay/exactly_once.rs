//! The exactly-once loop (`relay.delivery = "exactly-once"`).
//!
//! One batch at a time:
//!
//! 1. claim rows (`FOR UPDATE SKIP LOCKED` + the per-key fence) in a Postgres
//!    transaction;
//! 2. begin a Kafka transaction; produce the events and the batch's decision
//!    record (to `relay.commits_topic`); wait for every acknowledgement (at
//!    most `relay.publish_timeout`; librdkafka bounds each message by
//!    `transaction.timeout.ms` too);
//! 3. write the outcome (mark/delete, park invalid rows) and
//!    `PREPARE TRANSACTION gid` — the Postgres side can now only go the way
//!    the Kafka transaction goes;
//! 4. commit the Kafka transaction — the decision;
//! 5. `COMMIT PREPARED gid`.
//!
//! A crash anywhere leaves at most one prepared transaction per relay. It is
//! resolved by the relay itself when it restarts, or by any other relay once it
//! is older than `relay.recovery_timeout`: fence the owner's transactional id
//! (its open Kafka transaction ends for good), read whether the decision record
//! committed, then `COMMIT PREPARED` or `ROLLBACK PREPARED`. docs/exactly-once.md
//! has the argument.
//!
//! While Kafka is away nothing new is claimed or prepared (see `kafka_gate.rs`);
//! a batch that was prepared when Kafka vanished waits for its decision —
//! at most one per relay.

mod batch_size;
mod recover;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::outcome::{outcome_of, report};
use super::recovery::Recovery;
use super::{Backoff, Counters, IdleWait, KafkaGate, Step};
use crate::config::{RelayConfig, Settings};
use crate::failpoint;
use crate::sink::{Decisions, FailureClass, KafkaSink, SendResult, Sink, SinkError};
use crate::store::{batch_gid, Claimed, Finished, LeaseState, Outcome, Store, StoreError, TxnIds};
use crate::telemetry::events::{BatchFailed, BatchFinished, EventsDeferred};
use crate::telemetry::Emit;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EosError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Kafka(#[from] SinkError),
    /// A batch of this relay is still prepared and could not be resolved: the
    /// relay must not claim (a new decision under its transactional id could
    /// let compaction drop the one that batch needs).
    #[error("{0}")]
    OwnUnresolved(String),
    /// Another relay with this relay's id took the id lease: stop.
    #[error("another relay with relay.id {0:?} took the exactly-once id lease while this one had lost it (a Postgres restart or network fault); this relay stops: every exactly-once relay needs its own relay.id")]
    LeaseTaken(String),
}

impl EosError {
    /// Worth retrying as it is (a prerequisite no retry can fix is not).
    pub fn is_transient(&self) -> bool {
        match self {
            EosError::Store(e) => e.is_transient(),
            EosError::Kafka(e) => e.is_transient(),
            EosError::OwnUnresolved(_) | EosError::LeaseTaken(_) => false,
        }
    }

    /// A prerequisite no retry can fix: the relay must not run as it is.
    pub fn is_prerequisite(&self) -> bool {
        matches!(self, EosError::Kafka(e) if e.is_prerequisite()) || matches!(self, EosError::LeaseTaken(_))
    }
}

pub struct ExactlyOnceRelay {
    store: Store,
    sink: Arc<KafkaSink>,
    decisions: Decisions,
    recovery: Recovery,
    cfg: RelayConfig,
    wake: Arc<Notify>,
    gate: Arc<KafkaGate>,
    /// Rows per claim: `relay.batch_size`, halved while batches take too long
    /// for `transaction.timeout.ms` (see `adapt_batch`).
    batch: AtomicUsize,
    txn_timeout: Duration,
    /// This relay's Kafka transactional id.
    txn_id: String,
    /// `<txn_id>/`: the prefix of its batches' prepared-transaction ids.
    own_prefix: String,
    /// The id lease (the daemon's); `None`: not checked (tests).
    lease: Option<watch::Receiver<LeaseState>>,
    relay_id: String,
    /// The wait after a claim that found less than a full batch (see `Linger`).
    linger: std::sync::Mutex<super::Linger>,
    pub counters: Arc<Counters>,
}

impl ExactlyOnceRelay {
    /// `sink` must be transactional with `txn_ids.transactional_id(relay id)`.
    pub fn new(
        settings: &Settings,
        store: Store,
        sink: Arc<KafkaSink>,
        wake: Arc<Notify>,
        txn_ids: &TxnIds,
    ) -> Result<ExactlyOnceRelay, EosError> {
        let decisions = Decisions::new(settings)?;
        let recovery =
            Recovery::new(store.clone(), Decisions::new(settings)?, txn_ids.clone(), settings.relay.recovery_timeout);
        let txn_id = txn_ids.transactional_id(&settings.relay_id());
        let txn_timeout = crate::sink::producer_config(settings, None)
            .get("transaction.timeout.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(60));
        Ok(ExactlyOnceRelay {
            batch: AtomicUsize::new(settings.relay.batch_size),
            txn_timeout,
            store,
            sink,
            decisions,
            recovery,
            cfg: settings.relay.clone(),
            wake,
            gate: Arc::new(KafkaGate::new(settings.relay.max_backoff)),
            own_prefix: format!("{txn_id}/"),
            txn_id,
            lease: None,
            relay_id: settings.relay_id(),
            linger: std::sync::Mutex::new(super::Linger::new(settings.relay.linger, settings.relay.max_linger)),
            counters: Arc::default(),
        })
    }

    fn linger(&self) -> std::sync::MutexGuard<'_, super::Linger> {
        self.linger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims only while this lease is held (see `store::IdLease`).
    pub fn with_lease(mut self, lease: watch::Receiver<LeaseState>) -> ExactlyOnceRelay {
        self.lease = Some(lease);
        self
    }

    /// Waits while the id lease is lost (a Postgres restart: the keeper takes
    /// it again); `Err` once another relay took it. `Ok(false)`: shutdown.
    async fn lease_held(&self, shutdown: &mut watch::Receiver<bool>) -> Result<bool, EosError> {
        let Some(mut lease) = self.lease.clone() else { return Ok(true) };
        loop {
            let state = *lease.borrow_and_update();
            match state {
                LeaseState::Held => return Ok(true),
                LeaseState::Taken => return Err(EosError::LeaseTaken(self.relay_id.clone())),
                LeaseState::Lost => {}
            }
            tokio::select! {
                changed = lease.changed() => {
                    if changed.is_err() {
                        return Err(EosError::LeaseTaken(self.relay_id.clone()));
                    }
                }
                _ = shutdown.changed() => return Ok(false),
            }
        }
    }

    /// Whether the loop currently claims (Kafka answers).
    pub fn gate(&self) -> Arc<KafkaGate> {
        self.gate.clone()
    }

    /// The Kafka side of start-up: the decisions topic exists and can be
    /// trusted, a registered producer (fencing any zombie of this relay), and
    /// this relay's own unresolved batches resolved. An untrusted decisions
    /// topic is a prerequisite error ([`EosError::is_prerequisite`]); Kafka
    /// being unreachable or slow is transient.
    pub async fn start(&self) -> Result<(), EosError> {
        let brokers = self.decisions.ensure_topic().await?;
        if let Some(warning) = crate::sink::few_brokers_warning(brokers) {
            tracing::warn!(brokers, "{warning}");
        }
        tracing::info!(transactional_id = %self.txn_id, decisions = %self.decisions.topic(), "exactly-once ready");
        self.recover_own().await
    }

    /// Runs until `shutdown` flips to true (between batches), or until a
    /// prerequisite no retry can fix turns up at start-up: then it returns
    /// that error (the daemon stops with it).
    ///
    /// It stops at once (wherever it is, waiting for Kafka included) with
    /// [`EosError::LeaseTaken`] when another relay took its id lease.
    pub async fn run(&self, shutdown: watch::Receiver<bool>) -> Result<(), EosError> {
        let Some(mut lease) = self.lease.clone() else { return self.run_loop(shutdown).await };
        tokio::select! {
            result = self.run_loop(shutdown) => result,
            _ = lease.wait_for(|s| *s == LeaseState::Taken) => Err(EosError::LeaseTaken(self.relay_id.clone())),
        }
    }

    async fn run_loop(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), EosError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.cfg.max_backoff);
        let mut idle = IdleWait::new(self.cfg.poll_interval);
        let mut started = false;
        let mut must_recover = false;
        let mut last_scan = Instant::now();
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            self.store.sweep_if_due(self.cfg.sweep_interval);
            if !self.lease_held(&mut shutdown).await? {
                continue;
            }
            // Nothing held between batches: wait here while Kafka is away.
            if !self.gate.wait_open(&*self.sink, &mut shutdown).await {
                continue;
            }
            let pause = if !started || must_recover {
                // start() again after an error: the decisions topic may be gone.
                let attempt = self.start().await;
                match attempt {
                    Ok(()) => {
                        (started, must_recover) = (true, false);
                        backoff.reset();
                        continue;
                    }
                    Err(e) if !started && e.is_prerequisite() => return Err(e),
                    Err(e) => {
                        if matches!(e, EosError::Kafka(_)) && e.is_transient() {
                            self.gate.close("exactly-once start-up or recovery could not reach Kafka");
                        }
                        let delay = backoff.next_delay();
                        let next = if started { "recovering" } else { "starting exactly-once" };
                        BatchFailed { error: &e, transient: e.is_transient(), retry_in: delay, next }.emit();
                        delay
                    }
                }
            } else {
                if last_scan.elapsed() >= self.cfg.recovery_timeout / 2 {
                    last_scan = Instant::now();
                    if let Err(e) = self.recover_stale().await {
                        tracing::warn!(error = %e, "could not resolve another relay's stale batch; will try again");
                    }
                }
                let size = self.batch.load(AtomicOrdering::Relaxed);
                let step_started = Instant::now();
                let step = self.step().await;
                self.adapt_batch(&step, step_started.elapsed());
                match step {
                    Ok(Step::Batch { finished, claimed }) if finished.retry == 0 => {
                        backoff.reset();
                        idle.busy();
                        // Less than a full batch: the next claim waits for
                        // the linger from this one's start.
                        if claimed < size {
                            let linger = self.linger().get();
                            tokio::select! {
                                _ = tokio::time::sleep_until((step_started + linger).into()) => {}
                                _ = shutdown.changed() => {}
                            }
                        }
                        continue;
                    }
                    Ok(Step::Batch { .. }) => backoff.next_delay(),
                    Ok(Step::Deferred { .. }) => Duration::from_millis(10 + fastrand::u64(0..20)),
                    Ok(Step::Idle) => {
                        backoff.reset();
                        self.wait_for_work(&mut idle, &mut shutdown, last_scan).await;
                        continue;
                    }
                    Err(e) => {
                        must_recover = true;
                        let delay = backoff.next_delay();
                        BatchFailed { error: &e, transient: e.is_transient(), retry_in: delay, next: "recovering" }
                            .emit();
                        delay
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Until something may be claimable (one cheap look per wait), but back
    /// to the loop for the stale-batch scan on time.
    async fn wait_for_work(&self, idle: &mut IdleWait, shutdown: &mut watch::Receiver<bool>, last_scan: Instant) {
        loop {
            let wait = idle.wait().min(self.cfg.recovery_timeout / 2);
            tokio::select! {
                _ = self.wake.notified() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            self.store.sweep_if_due(self.cfg.sweep_interval);
            if *shutdown.borrow()
                || last_scan.elapsed() >= self.cfg.recovery_timeout / 2
                || !matches!(self.store.anything_pending().await, Ok(false))
            {
                return;
            }
        }
    }

    /// One batch through the whole protocol. An `Err` leaves at most this
    /// batch's prepared transaction behind; `recover_own` resolves it.
    pub async fn step(&self) -> Result<Step, EosError> {
        let started = Instant::now();
        let Some(claimed) = self.store.claim(self.batch.load(AtomicOrdering::Relaxed), &[]).await? else {
            return Ok(Step::Idle);
        };
        self.linger().observe(claimed.round_trip, claimed.events.len() + claimed.deferred, Instant::now());
        if claimed.events.is_empty() {
            EventsDeferred { count: claimed.deferred as u64 }.emit();
            claimed.release().await?;
            return Ok(Step::Deferred { rows: 0 });
        }
        failpoint::hit("after-claim");

        if let Err(e) = self.sink.begin().await {
            claimed.release().await?;
            return Err(e.into());
        }
        let (gid, results, decision) = self.publish(&claimed).await;
        failpoint::hit_batch("after-kafka-send", claimed.events.len());
        let all_in = decision == SendResult::Delivered
            && results
                .iter()
                .all(|r| matches!(r, SendResult::Delivered | SendResult::Invalid { .. } | SendResult::Skipped));
        let n = claimed.events.len();
        if !all_in {
            let finished = self.give_back(claimed, &results).await?;
            // The decision record was refused (the topic deleted, say): set up
            // again (the topic, a producer) before the next batch.
            match decision {
                SendResult::Failed { error, class } if class != FailureClass::Transient => {
                    let what = format!("the decision record to {} ({class:?})", self.decisions.topic());
                    return Err(SinkError::unavailable(what, error).into());
                }
                _ => {}
            }
            return Ok(Step::Batch { claimed: n, finished });
        }
        let outcomes: Vec<Outcome> = results.iter().map(outcome_of).collect();
        let prepared = claimed.prepare(&outcomes, self.cfg.max_attempts, &gid).await;
        let (finished, events) = match prepared {
            Ok(p) => p,
            Err(e) => {
                // Perhaps prepared, perhaps not: without a Kafka commit the
                // decision is "roll back" either way (recovery finishes it).
                let _ = self.sink.abort(KAFKA_TIMEOUT).await;
                return Err(e.into());
            }
        };
        failpoint::hit("after-prepare");
        if !self.decide(&gid).await? {
            return Ok(Step::Batch { claimed: n, finished: Finished { retry: n, ..Default::default() } });
        }
        report(&events, &results, &finished, self.cfg.max_attempts);
        self.gate.record_success();
        self.counters.add(&finished);
        BatchFinished {
            claimed: n,
            deferred: 0,
            published: finished.published,
            failed: finished.failed,
            retry: finished.retry,
            claim_ms: 0,
            acked_ms: 0,
            took: started.elapsed(),
        }
        .emit();
        Ok(Step::Batch { claimed: n, finished })
    }

    /// Produces the batch's events and its decision record in the open Kafka
    /// transaction and waits for every acknowledgement, at most until
    /// `relay.publish_timeout` after the claim (missing ones count as transient).
    /// Returns the batch's gid too: it names the first event handed to Kafka.
    async fn publish(&self, claimed: &Claimed) -> (String, Vec<SendResult>, SendResult) {
        let sent = self.sink.send(&claimed.events, &HashSet::new(), None).await;
        let gid = batch_gid(&self.txn_id, sent.first_sent.map(|i| claimed.events[i].id));
        let decision = self.sink.send_decision(self.decisions.topic(), &self.txn_id, &gid);
        let deadline = tokio::time::Instant::from_std(claimed.claimed_at + self.cfg.publish_timeout);
        let both = async { (sent.results.await, decision.await) };
        match tokio::time::timeout_at(deadline, both).await {
            Ok((results, decision)) => (gid, results, decision),
            Err(_) => {
                let late = SendResult::Failed {
                    class: FailureClass::Transient,
                    error: "no acknowledgement within relay.publish_timeout".into(),
                };
                (gid, vec![late.clone(); claimed.events.len()], late)
            }
        }
    }

    /// Kafka refused part of the batch: the transaction cannot commit. Gives
    /// the rows back first (counting the attempt against the refused events;
    /// the rest go again in the next batch, in order), then aborts: an abort
    /// waits for Kafka, the database must not.
    async fn give_back(&self, claimed: Claimed, results: &[SendResult]) -> Result<Finished, EosError> {
        let outcomes: Vec<Outcome> =
            results.iter().map(outcome_of).map(|o| if o == Outcome::Delivered { Outcome::Retry } else { o }).collect();
        let transient = results.iter().any(|r| matches!(r, SendResult::Failed { class: FailureClass::Transient, .. }));
        let (finished, events) = claimed.finish(&outcomes, self.cfg.max_attempts).await?;
        let aborted: Vec<SendResult> =
            results.iter().map(|r| if *r == SendResult::Delivered { SendResult::Skipped } else { r.clone() }).collect();
        report(&events, &aborted, &finished, self.cfg.max_attempts);
        self.counters.add(&finished);
        if transient {
            self.gate.close("a Kafka transaction did not complete (Kafka unreachable or slow)");
        }
        self.sink.abort(KAFKA_TIMEOUT).await?;
        Ok(finished)
    }

    /// The decision: commit the Kafka transaction, then `COMMIT PREPARED`.
    /// `Ok(false)`: Kafka refused the commit and the batch was rolled back on
    /// both sides (it goes again). An `Err` is an unknown outcome: recovery
    /// decides from the decision record.
    async fn decide(&self, gid: &str) -> Result<bool, EosError> {
        if let Err(e) = self.sink.commit(KAFKA_TIMEOUT).await {
            if e.requires_abort() && self.sink.abort(KAFKA_TIMEOUT).await.is_ok() {
                self.store.rollback_prepared(gid).await?;
                tracing::warn!(error = %e, "Kafka refused to commit the batch; rolled back, retrying it");
                return Ok(false);
            }
            return Err(e.into());
        }
        failpoint::hit("after-kafka-commit");
        // Committed in Kafka: Postgres must follow, whatever it takes.
        if !self.store.commit_prepared(gid).await? {
            tracing::warn!(%gid, "batch was already resolved by a recovering relay");
        }
        failpoint::hit("after-commit-prepared");
        Ok(true)
    }
}
