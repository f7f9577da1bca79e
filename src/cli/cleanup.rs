//! `outbox-relay cleanup`: delete published rows older than the retention.

use std::time::Duration;

use super::{exit, CliError};
use crate::config::Settings;
use crate::store::Store;

pub async fn cleanup(settings: Settings, older_than: Option<Duration>) -> Result<(), CliError> {
    let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let retention = older_than.unwrap_or(settings.relay.retention);
    let n = store.cleanup_all(retention).await.map_err(|e| super::store_error(&store, e))?;
    println!(
        "deleted {n} published row(s) older than {} from {}",
        humantime::format_duration(retention),
        store.table()
    );
    Ok(())
}
