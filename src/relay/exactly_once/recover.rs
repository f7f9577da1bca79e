//! Recovery of the relay's own prepared batches at start-up and after a
//! failed step, and of other relays' stale ones.

use super::{EosError, ExactlyOnceRelay, KAFKA_TIMEOUT};

impl ExactlyOnceRelay {
    /// Registers a fresh producer (fencing older instances of this relay and
    /// ending the transaction the last one left open), then resolves every
    /// batch this relay prepared and did not finish. A batch that cannot be
    /// resolved is logged with its fix and retried later; it does not stop the
    /// relay (its rows stay locked meanwhile).
    ///
    /// Then it writes its start marker to the decisions topic (see
    /// `Decisions::verdict`).
    ///
    /// A batch of its own that cannot be resolved stops the relay from
    /// claiming (it retries the resolution, saying so): every batch writes a
    /// new decision record under this relay's transactional id, and the
    /// decisions topic is compacted, so a new record could let compaction drop
    /// the one the unresolved batch needs, and whoever resolves it later would
    /// read "not committed" and roll back a batch Kafka committed.
    pub async fn recover_own(&self) -> Result<(), EosError> {
        self.sink.reset_transactional(KAFKA_TIMEOUT).await?;
        let resolved = self.recovery.resolve_own(&self.txn_id, &self.own_prefix).await?;
        if let Some((gid, error, fix)) = resolved.unresolved.first() {
            return Err(EosError::OwnUnresolved(format!(
                "this relay's batch {gid} is still prepared and cannot be resolved ({error}); claiming nothing until it is: {fix}"
            )));
        }
        // Nothing of this relay is prepared: from here on a batch whose
        // decision record is missing while this marker is there did not commit.
        self.decisions.mark_start(&self.txn_id, KAFKA_TIMEOUT).await?;
        Ok(())
    }

    /// Resolves batches other relays prepared more than `recovery_timeout` ago
    /// (the relay died, or hangs): fence it first, then decide.
    pub async fn recover_stale(&self) -> Result<usize, EosError> {
        let r = self.recovery.resolve_stale(&self.sink, Some(&self.own_prefix)).await?;
        Ok(r.committed + r.rolled_back)
    }
}
