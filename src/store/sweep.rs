//! Between claims: an idle relay's cheap look for work, and the sweep for
//! pending rows below the floor (the safety net for a replay whose
//! notification was lost), off the claim path.

use std::sync::atomic::Ordering as AtomicOrdering;

use super::shape::Shape;
use super::{Store, StoreError};
use crate::config::TableName;

#[derive(Debug)]
pub(super) struct SweepSql {
    pending: String,
    below_floor: String,
}

impl SweepSql {
    pub(super) fn new(table: &TableName, shape: Shape) -> SweepSql {
        let t = table.quoted();
        let ready = shape.ready("");
        let waiting = "coalesce(published_at, parked_at) IS NULL";
        let late = shape
            .delayed("")
            .map(|d| {
                format!("\n                     OR EXISTS (SELECT 1 FROM {t} WHERE deliver_after <= now() AND {d})")
            })
            .unwrap_or_default();
        SweepSql {
            // An idle relay's look at the outbox between claims: one statement, no
            // transaction, two index probes (from the floor; the retry index).
            pending: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE {ready} AND seq >= $1)
                     OR EXISTS (SELECT 1 FROM {t} WHERE retry_at IS NOT NULL AND retry_at <= now() AND {waiting}){late}
                          AS pending,
                        {source}",
                source = super::floor::SOURCE_COLUMNS
            ),
            // The sweep: the lowest pending row below the floor.
            below_floor: format!("SELECT (SELECT seq FROM {t} WHERE {ready} AND seq < $1 ORDER BY seq LIMIT 1)"),
        }
    }
}

impl Store {
    /// Is anything claimable, perhaps? (Pending rows from the floor on, or a
    /// retry that is due; some may be held by other relays.) What an idle relay
    /// asks between claims: much cheaper than a claim that finds nothing.
    ///
    /// It also reads where sequence values come from: when they went backwards
    /// (see floor.rs) the floor is reset and the answer is yes.
    pub async fn anything_pending(&self) -> Result<bool, StoreError> {
        let floor = self.floor().get();
        let client = self.client().await?;
        let oid: u32 = self.sequence_oid(&client).await.unwrap_or(0);
        let sql = self.shaped(&client).await?;
        let stmt = client.prepare_cached(&sql.sweep.pending).await?;
        let row = client.query_one(&stmt, &[&floor, &oid]).await?;
        if self.floor().check_source(super::floor::read_source(&row)?) {
            tracing::warn!(table = %self.table, "the outbox's sequence went backwards (a failover, a recovery, \
                a restarted sequence or a lower setval): claims start from the beginning again");
            return Ok(true);
        }
        Ok(row.try_get("pending")?)
    }

    /// The safety net for a replay whose notification was lost (or any row
    /// made pending again below the floor by hand), off the claim path: when
    /// `every` has passed, one statement on its own connection, in a task of its
    /// own, looks for the lowest pending row below the floor, and the floor is
    /// lowered to it. That statement walks the pending index from its start,
    /// dead entries included; under a held horizon with 580k dead rows it took
    /// 1-2 s, and when it was the claim itself that swept from the start, every
    /// batch behind it waited that long once a minute. Returns at once.
    pub fn sweep_if_due(&self, every: std::time::Duration) {
        if self.shared.sweeping.load(AtomicOrdering::Acquire) || !self.floor().sweep_due(every) {
            return;
        }
        let below = self.floor().get();
        // Claimed, not just checked: every clone of the store shares the flag and may call this.
        if below <= 0
            || self
                .shared
                .sweeping
                .compare_exchange(false, true, AtomicOrdering::AcqRel, AtomicOrdering::Acquire)
                .is_err()
        {
            return;
        }
        let store = self.clone();
        crate::telemetry::spawn(async move {
            let found = store.lowest_pending_below(below).await;
            store.shared.sweeping.store(false, AtomicOrdering::Release);
            match found {
                Ok(Some(seq)) => {
                    tracing::info!(seq, floor = below, "a pending event below the floor (a replay whose notification was lost?): claims look there next");
                    store.floor().lower(seq);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "looking for pending events below the floor failed; trying again after relay.sweep_interval"
                ),
            }
        });
    }

    async fn lowest_pending_below(&self, below: i64) -> Result<Option<i64>, StoreError> {
        let client = self.client().await?;
        let sql = self.shaped(&client).await?;
        let stmt = client.prepare_cached(&sql.sweep.below_floor).await?;
        Ok(client.query_one(&stmt, &[&below]).await?.get(0))
    }
}
