//! Resolving prepared exactly-once batches that their relay left behind, in
//! any delivery mode.
//!
//! A prepared transaction holds its rows' locks and the database's xmin horizon
//! until someone finishes it. An exactly-once relay finishes its own when it
//! restarts; a batch whose relay never comes back (scaled down, or the table was
//! switched to at-least-once) would be held forever. So every relay, whatever
//! its mode, resolves this table's prepared batches once they are older than
//! `relay.recovery_timeout`: fence the owner's transactional id (its open Kafka
//! transaction ends for good), read the decision, then `COMMIT PREPARED` or
//! `ROLLBACK PREPARED`.
//!
//! Only positive evidence decides. The decisions topic gives it while it
//! holds the owner's history ([`Verdict`]); when it does not (deleted and
//! recreated, or another `relay.commits_topic`), the event the gid names is
//! looked up in its own topic ([`find_event`]). With neither, the batch stays
//! prepared and is reported with its fix: a missing record is never read as
//! "not committed".
//!
//! Each batch is resolved on its own: one that cannot be (a permission error
//! after a password rotation, a missing decisions topic) is logged with its gid
//! and the fix, counted, and retried later; the others are still resolved.

use std::time::{Duration, SystemTime};

use crate::sink::{find_event, Decisions, Found, KafkaSink, SinkError, Verdict};
use crate::store::{gid_event, GidEvent, Prepared, Store, StoreError, TxnIds};
use crate::telemetry::events::{PreparedResolutionFailed, PreparedResolved};
use crate::telemetry::Emit;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// How far before its `PREPARE` a batch's events are looked for: its Kafka
/// transaction began at most `relay.publish_timeout` (≤ 10 min) earlier, and
/// the producer's clock may be behind the database's.
const EVIDENCE_LOOKBACK: Duration = Duration::from_secs(30 * 60);

/// Why one prepared batch could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Kafka(#[from] SinkError),
    /// The decision is known; carrying it out failed.
    #[error("{verb} failed: {source}")]
    Finish { verb: &'static str, source: StoreError },
    /// Nothing shows whether the batch's Kafka transaction committed.
    #[error("its decision cannot be established: {0}")]
    NoEvidence(String),
}

/// What a pass over the prepared batches did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub committed: usize,
    pub rolled_back: usize,
    pub failed: usize,
    /// The batches that could not be resolved: gid, what went wrong, the fix.
    pub unresolved: Vec<(String, String, String)>,
}

pub struct Recovery {
    store: Store,
    decisions: Decisions,
    txn_ids: TxnIds,
    timeout: Duration,
}

impl Recovery {
    pub fn new(store: Store, decisions: Decisions, txn_ids: TxnIds, recovery_timeout: Duration) -> Recovery {
        Recovery { store, decisions, txn_ids, timeout: recovery_timeout }
    }

    pub fn txn_ids(&self) -> &TxnIds {
        &self.txn_ids
    }

    /// Resolves this table's prepared batches older than `recovery_timeout`,
    /// except those whose gid starts with `skip` (a live relay's own), fencing
    /// each owner first with a throw-away producer of `sink`'s configuration.
    pub async fn resolve_stale(&self, sink: &KafkaSink, skip: Option<&str>) -> Result<Resolved, StoreError> {
        let mut done = Resolved::default();
        for p in self.store.prepared_any(&self.txn_ids.prefixes()).await? {
            if skip.is_some_and(|s| p.gid.starts_with(s)) || p.age_s < self.timeout.as_secs_f64() {
                continue;
            }
            let Some(owner) = self.txn_ids.owner_of(&p.gid) else { continue };
            tracing::warn!(gid = %p.gid, age_s = p.age_s as u64, owner, "resolving a stale prepared batch; fencing its relay");
            let fenced = sink.fence(owner, KAFKA_TIMEOUT).await.map_err(ResolveError::Kafka);
            let result = match fenced {
                Ok(()) => self.resolve(owner, &p).await,
                Err(e) => Err(e),
            };
            done.add(result, &p);
        }
        Ok(done)
    }

    /// Resolves every batch under `own_prefix` (a relay's own, after it fenced
    /// its earlier instances by registering its producer).
    pub async fn resolve_own(&self, owner: &str, own_prefix: &str) -> Result<Resolved, StoreError> {
        let mut done = Resolved::default();
        for p in self.store.prepared(own_prefix).await? {
            let result = self.resolve(owner, &p).await;
            done.add(result, &p);
        }
        Ok(done)
    }

    /// The owner is fenced: establish the decision and finish the Postgres
    /// side. Returns whether the batch committed.
    async fn resolve(&self, owner: &str, p: &Prepared) -> Result<bool, ResolveError> {
        let committed = match self.decisions.verdict(owner, &p.gid, Duration::from_secs(120)).await? {
            Verdict::Committed => true,
            Verdict::NotCommitted => false,
            Verdict::NoHistory(why) => self.decide_from_event_topic(p, &why).await?,
        };
        let (verb, done) = if committed {
            ("COMMIT PREPARED", self.store.commit_prepared(&p.gid).await)
        } else {
            ("ROLLBACK PREPARED", self.store.rollback_prepared(&p.gid).await)
        };
        let done = done.map_err(|source| ResolveError::Finish { verb, source })?;
        // Its keys were left out here while it held them: take them now.
        self.store.let_keys_back_in();
        PreparedResolved { gid: &p.gid, committed, resolved_here: done }.emit();
        Ok(committed)
    }

    /// The decisions topic has no history of the owner: is the event the gid
    /// names in its topic (committed)?
    async fn decide_from_event_topic(&self, p: &Prepared, why: &str) -> Result<bool, ResolveError> {
        let id = match gid_event(&p.gid) {
            GidEvent::Sent(id) => id,
            // Nothing but the decision record could have gone out: either way
            // is the same to Kafka's readers, and rolled back the rows go again.
            GidEvent::NoneSent => return Ok(false),
            GidEvent::Unknown => {
                return Err(ResolveError::NoEvidence(format!(
                    "{why}, and the gid names none of the batch's events (a relay before 0.3 prepared it)"
                )))
            }
        };
        let Some(topic) = self.store.event_topic(id).await? else {
            return Err(ResolveError::NoEvidence(format!("{why}, and event {id} of the batch is not in the table")));
        };
        let since = SystemTime::now() - Duration::from_secs_f64(p.age_s.max(0.0)) - EVIDENCE_LOOKBACK;
        tracing::warn!(gid = %p.gid, %topic, event_id = %id, "{why}: looking for the batch's event in its topic");
        match find_event(self.decisions.client_config(), &topic, id, since, Duration::from_secs(300)).await? {
            Found::Yes => Ok(true),
            Found::No => Ok(false),
            Found::Unknown(w) => Err(ResolveError::NoEvidence(format!("{why}, and for event {id}: {w}"))),
        }
    }
}

impl Resolved {
    fn add(&mut self, result: Result<bool, ResolveError>, p: &Prepared) {
        match result {
            Ok(true) => self.committed += 1,
            Ok(false) => self.rolled_back += 1,
            Err(e) => {
                self.failed += 1;
                let fix = match &e {
                    ResolveError::Finish { verb, source } if source.code() == Some("42501") => format!(
                        "only the role that prepared it ({owner}) or a superuser may finish it: connect as {owner} and \
                         run {verb} '{gid}' (the decision record says so); or run the relay as {owner} again",
                        owner = p.owner,
                        gid = p.gid
                    ),
                    ResolveError::NoEvidence(_) => format!(
                        "find out whether the batch's events reached Kafka (read_committed); then, as {owner}, run \
                         COMMIT PREPARED '{gid}' if they did, ROLLBACK PREPARED '{gid}' if not",
                        owner = p.owner,
                        gid = p.gid
                    ),
                    ResolveError::Kafka(_) => {
                        "check that Kafka and relay.commits_topic are reachable; retried every relay.recovery_timeout/2"
                            .into()
                    }
                    _ => "retried every relay.recovery_timeout/2".into(),
                };
                PreparedResolutionFailed { gid: &p.gid, owner_role: &p.owner, age_s: p.age_s, error: &e, fix: &fix }
                    .emit();
                self.unresolved.push((p.gid.clone(), e.to_string(), fix));
            }
        }
    }
}
