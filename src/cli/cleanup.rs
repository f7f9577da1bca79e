//! `outbox-relay cleanup`: delete published rows older than the retention.

use std::time::Duration;

use super::{exit, CliError};
use crate::config::Settings;
use crate::store::{Store, StoreError};

pub const BATCH: i64 = 1000;

/// Deletes published rows older than `retention` in small batches until none is
/// left; returns how many. Shared by the command and the running relay.
pub async fn cleanup_all(store: &Store, retention: Duration) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = store.cleanup_batch(retention, BATCH).await?;
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
        // let claims and autovacuum breathe between batches
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn cleanup(settings: Settings, older_than: Option<Duration>) -> Result<(), CliError> {
    let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let retention = older_than.unwrap_or(settings.relay.retention);
    let n = cleanup_all(&store, retention).await.map_err(|e| super::store_error(&store, e))?;
    println!(
        "deleted {n} published row(s) older than {} from {}",
        humantime::format_duration(retention),
        store.table()
    );
    Ok(())
}
