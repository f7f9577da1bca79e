//! The published rows `verify` compares with what Kafka holds.

use uuid::Uuid;

use crate::store::{Store, StoreError};

/// A published row, as `verify` needs it.
#[derive(Debug, Clone)]
pub struct PublishedRow {
    pub id: Uuid,
    pub seq: i64,
    pub topic: String,
    pub key: Option<String>,
    /// `created_at`, ms since the epoch (latency reports).
    pub created_at_ms: i64,
}

impl Store {
    /// Published rows created in [since, until) (optionally one topic), for `verify`.
    pub async fn published_rows(
        &self,
        since: Option<&str>,
        until: Option<&str>,
        topic: Option<&str>,
    ) -> Result<Vec<PublishedRow>, StoreError> {
        let t = self.table().quoted();
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT id, seq, topic, key, (extract(epoch FROM created_at) * 1000)::int8 FROM {t}
                     WHERE published_at IS NOT NULL
                       AND ($1::text IS NULL OR created_at >= $1::text::timestamptz)
                       AND ($2::text IS NULL OR created_at < $2::text::timestamptz)
                       AND ($3::text IS NULL OR topic = $3)"
                ),
                &[&since, &until, &topic],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| PublishedRow {
                id: r.get(0),
                seq: r.get(1),
                topic: r.get(2),
                key: r.get(3),
                created_at_ms: r.get(4),
            })
            .collect())
    }
}
