//! Backlog figures for metrics and `status`, read through the partial indexes
//! (pending: `(seq) WHERE pending`, from the floor; parked: `(parked_at) WHERE
//! parked`), so their cost follows the backlog, not the table or its dead rows.

use super::{Store, StoreError};

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Backlog {
    pub pending: i64,
    pub oldest_pending_age_s: f64,
    pub parked: i64,
    /// Exactly-once batches prepared and not yet resolved, and the oldest's age.
    pub prepared: i64,
    pub oldest_prepared_age_s: f64,
}

impl Store {
    /// The backlog as this relay sees it: pending rows from its floor on, plus
    /// rows waiting for a retry (wherever they are). A relay that has not
    /// claimed yet (floor 0) counts the whole pending index. (`seq + 0`: below
    /// the floor, read the retry index, never the pending index's dead head.)
    pub async fn backlog(&self) -> Result<Backlog, StoreError> {
        let floor = self.floor().get();
        let t = self.table().quoted();
        let client = self.client().await?;
        let shape = self.shaped(&client).await?.claim.shape;
        // Prepared once per pooled connection (and table shape): the monitor
        // runs this every tick, and would otherwise plan it every time.
        let stmt = client.prepare_cached(&backlog_sql(&t, shape)).await?;
        let row = client.query_one(&stmt, &[&floor]).await?;
        drop(client);
        let prepared = self.prepared_any(&self.transactional_prefixes().await).await?;
        Ok(Backlog {
            pending: row.get(0),
            oldest_pending_age_s: row.get::<_, Option<f64>>(1).unwrap_or(0.0).max(0.0),
            parked: row.get(2),
            prepared: prepared.len() as i64,
            oldest_prepared_age_s: prepared.iter().map(|p| p.age_s).fold(0.0, f64::max),
        })
    }
}

/// Pending: from the floor on, plus events waiting for a retry (wherever they
/// are). With migration 0005, delayed events count once their time has come,
/// and their age runs from then: an event scheduled for tomorrow is not
/// behind today.
fn backlog_sql(t: &str, shape: super::shape::Shape) -> String {
    let parked = format!("(SELECT count(*) FROM {t} WHERE parked_at IS NOT NULL)");
    let Some(delayed) = shape.delayed("") else {
        return format!(
            "SELECT
               (SELECT count(*) FROM {t} WHERE published_at IS NULL AND parked_at IS NULL AND seq >= $1)
                 + (SELECT count(*) FROM {t} WHERE retry_at IS NOT NULL
                      AND coalesce(published_at, parked_at) IS NULL AND seq + 0 < $1),
               (SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM (
                  (SELECT created_at FROM {t} WHERE published_at IS NULL AND parked_at IS NULL AND seq >= $1
                   ORDER BY seq LIMIT 1)
                  UNION ALL
                  (SELECT created_at FROM {t} WHERE retry_at IS NOT NULL
                     AND coalesce(published_at, parked_at) IS NULL AND seq + 0 < $1 ORDER BY seq + 0 LIMIT 1)) h),
               {parked}"
        );
    };
    let ready = shape.ready("");
    let waiting = "retry_at IS NOT NULL AND coalesce(published_at, parked_at) IS NULL";
    format!(
        "SELECT
           (SELECT count(*) FROM {t} WHERE {ready} AND seq >= $1)
             + (SELECT count(*) FROM {t} WHERE {waiting})
             + (SELECT count(*) FROM {t} WHERE deliver_after <= now() AND {delayed}),
           (SELECT coalesce(extract(epoch FROM now() - min(since)), 0)::float8 FROM (
              (SELECT created_at AS since FROM {t} WHERE {ready} AND seq >= $1 ORDER BY seq LIMIT 1)
              UNION ALL
              (SELECT min(created_at) FROM {t} WHERE {waiting})
              UNION ALL
              (SELECT deliver_after FROM {t} WHERE deliver_after <= now() AND {delayed}
               ORDER BY deliver_after LIMIT 1)) h),
           {parked}"
    )
}
