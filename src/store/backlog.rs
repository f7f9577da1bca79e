//! Backlog figures for metrics and `status`, read through the partial indexes
//! (pending: `(seq) WHERE pending`; parked: `(parked_at) WHERE parked`), so their
//! cost follows the backlog, not the table.

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
    pub async fn backlog(&self) -> Result<Backlog, StoreError> {
        let t = self.table().quoted();
        let client = self.client().await?;
        let row = client
            .query_one(
                &format!(
                    "SELECT
                       (SELECT count(*) FROM {t} WHERE published_at IS NULL AND parked_at IS NULL),
                       (SELECT coalesce(extract(epoch FROM now() - created_at), 0)::float8 FROM {t}
                          WHERE published_at IS NULL AND parked_at IS NULL ORDER BY seq LIMIT 1),
                       (SELECT count(*) FROM {t} WHERE parked_at IS NOT NULL)"
                ),
                &[],
            )
            .await?;
        drop(client);
        let prepared = self.prepared(&self.table().transactional_prefix()).await?;
        Ok(Backlog {
            pending: row.get(0),
            oldest_pending_age_s: row.get::<_, Option<f64>>(1).unwrap_or(0.0).max(0.0),
            parked: row.get(2),
            prepared: prepared.len() as i64,
            oldest_prepared_age_s: prepared.iter().map(|p| p.age_s).fold(0.0, f64::max),
        })
    }
}
