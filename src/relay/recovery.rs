//! Resolving prepared exactly-once batches that their relay left behind, in
//! any delivery mode.
//!
//! A prepared transaction holds its rows' locks and the database's xmin horizon
//! until someone finishes it. An exactly-once relay finishes its own when it
//! restarts; a batch whose relay never comes back (scaled down, or the table was
//! switched to at-least-once) would be held forever. So every relay, whatever
//! its mode, resolves this table's prepared batches once they are older than
//! `relay.recovery_timeout`: fence the owner's transactional id (its open Kafka
//! transaction ends for good), read the decision record, then `COMMIT PREPARED`
//! or `ROLLBACK PREPARED`.
//!
//! Each batch is resolved on its own: one that cannot be (a permission error
//! after a password rotation, a missing decisions topic) is logged with its gid
//! and the fix, counted, and retried later; the others are still resolved.

use std::time::Duration;

use crate::sink::{Decisions, KafkaSink, SinkError};
use crate::store::{Prepared, Store, StoreError, TxnIds};
use crate::telemetry::events::{PreparedResolutionFailed, PreparedResolved};
use crate::telemetry::Emit;

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

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

    /// The owner is fenced: read the decision and finish the Postgres side.
    /// Returns whether the batch committed.
    async fn resolve(&self, owner: &str, p: &Prepared) -> Result<bool, ResolveError> {
        let committed = self.decisions.was_committed(owner, &p.gid, Duration::from_secs(120)).await?;
        let (verb, done) = if committed {
            ("COMMIT PREPARED", self.store.commit_prepared(&p.gid).await)
        } else {
            ("ROLLBACK PREPARED", self.store.rollback_prepared(&p.gid).await)
        };
        let done = done.map_err(|source| ResolveError::Finish { verb, source })?;
        PreparedResolved { gid: &p.gid, committed, resolved_here: done }.emit();
        Ok(committed)
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
