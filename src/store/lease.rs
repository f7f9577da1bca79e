//! The exactly-once id lease: one live relay per Kafka transactional id.

use super::{Store, StoreError};

/// Proof that this process is the only live relay with its transactional id:
/// a session-level advisory lock held on a connection of its own for as long
/// as the relay runs. Two exactly-once relays with one `relay.id` would fence
/// each other's Kafka producers and resolve each other's prepared batches.
pub struct IdLease {
    _client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for IdLease {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Store {
    /// Takes the lease on `transactional_id`, or `Ok(None)` when another live
    /// session holds it (another relay runs with the same `relay.id`).
    pub async fn lease_transactional_id(&self, transactional_id: &str) -> Result<Option<IdLease>, StoreError> {
        let (client, conn) = self.pg_config().connect(self.tls().clone()).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtext('outbox-relay id ' || $1))", &[&transactional_id])
            .await?
            .get(0);
        if !got {
            driver.abort();
            return Ok(None);
        }
        Ok(Some(IdLease { _client: client, driver }))
    }
}
