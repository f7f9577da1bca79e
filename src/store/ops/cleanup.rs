//! Retention clean-up: delete published rows older than `relay.retention`, in
//! small batches (`cleanup` and the running relay).

use std::time::Duration;

use crate::store::{Store, StoreError};

/// Rows deleted per statement.
pub const CLEANUP_BATCH: i64 = 1000;

impl Store {
    /// Deletes up to `limit` published rows older than `retention`; returns how
    /// many. Small batches and SKIP LOCKED keep locks short and away from claims.
    pub async fn cleanup_batch(&self, retention: Duration, limit: i64) -> Result<u64, StoreError> {
        let t = self.table().quoted();
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "DELETE FROM {t} WHERE id IN (
                    SELECT id FROM {t} WHERE published_at < now() - make_interval(secs => $1)
                    ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            ))
            .await?;
        Ok(client.execute(&stmt, &[&retention.as_secs_f64(), &limit]).await?)
    }

    /// Deletes published rows older than `retention` in small batches until none is
    /// left; returns how many. Shared by the command and the running relay.
    pub async fn cleanup_all(&self, retention: Duration) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n = self.cleanup_batch(retention, CLEANUP_BATCH).await?;
            total += n;
            if n < CLEANUP_BATCH as u64 {
                return Ok(total);
            }
            // let claims and autovacuum breathe between batches
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
