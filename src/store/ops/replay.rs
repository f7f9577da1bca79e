//! `replay`: put parked or published events back in the queue.

use serde::Serialize;
use uuid::Uuid;

use crate::store::{Store, StoreError};

/// Which rows `replay` puts back in the queue. All given conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    /// Only parked rows (otherwise parked and published ones).
    pub parked: bool,
    pub ids: Vec<Uuid>,
    pub topic: Option<String>,
    pub key: Option<String>,
    /// created_at bounds, as Postgres timestamps (validated by [`Store::parse_time`]).
    pub since: Option<String>,
    pub until: Option<String>,
    /// Resume after this seq (an interrupted replay prints it).
    pub after_seq: Option<i64>,
}

/// One row a replay would touch (for --dry-run).
#[derive(Debug, Clone, Serialize)]
pub struct ReplayRow {
    pub id: Uuid,
    pub seq: i64,
    pub topic: String,
    pub state: String,
}

const SELECTOR: &str = "(published_at IS NOT NULL OR parked_at IS NOT NULL)
    AND ($1::bool IS FALSE OR parked_at IS NOT NULL)
    AND (cardinality($2::uuid[]) = 0 OR id = ANY($2))
    AND ($3::text IS NULL OR topic = $3)
    AND ($4::text IS NULL OR key = $4)
    AND ($5::text IS NULL OR created_at >= $5::text::timestamptz)
    AND ($6::text IS NULL OR created_at < $6::text::timestamptz)
    AND ($7::int8 IS NULL OR seq > $7)";

impl Store {
    /// Checks a time bound the way the SQL will read it; returns it normalised.
    pub async fn parse_time(&self, value: &str) -> Result<String, StoreError> {
        let client = self.client().await?;
        let row = client.query_one("SELECT $1::text::timestamptz::text", &[&value]).await?;
        Ok(row.get(0))
    }

    fn selector_params(s: &Selector) -> [Box<dyn tokio_postgres::types::ToSql + Sync + Send>; 7] {
        [
            Box::new(s.parked),
            Box::new(s.ids.clone()),
            Box::new(s.topic.clone()),
            Box::new(s.key.clone()),
            Box::new(s.since.clone()),
            Box::new(s.until.clone()),
            Box::new(s.after_seq),
        ]
    }

    /// How many rows the selector matches, and the first `sample` of them.
    pub async fn replay_preview(&self, s: &Selector, sample: i64) -> Result<(i64, Vec<ReplayRow>), StoreError> {
        let t = self.table().quoted();
        let client = self.client().await?;
        let p = Self::selector_params(s);
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            p.iter().map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let count: i64 = client.query_one(&format!("SELECT count(*) FROM {t} WHERE {SELECTOR}"), &params).await?.get(0);
        let mut with_limit = params.clone();
        with_limit.push(&sample);
        let rows = client
            .query(
                &format!(
                    "SELECT id, seq, topic, CASE WHEN parked_at IS NOT NULL THEN 'parked' ELSE 'published' END
                     FROM {t} WHERE {SELECTOR} ORDER BY seq LIMIT $8"
                ),
                &with_limit,
            )
            .await?
            .iter()
            .map(|r| ReplayRow { id: r.get(0), seq: r.get(1), topic: r.get(2), state: r.get(3) })
            .collect();
        Ok((count, rows))
    }

    /// Puts the next `limit` matching rows (in seq order) back in the queue —
    /// same id, same seq, attempts and error cleared — in one short transaction,
    /// and wakes the relays. Returns (rows replayed, highest seq replayed).
    pub async fn replay_batch(&self, s: &Selector, limit: i64) -> Result<(u64, Option<i64>), StoreError> {
        let t = self.table().quoted();
        let mut client = self.client().await?;
        let p = Self::selector_params(s);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            p.iter().map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        params.push(&limit);
        let tx = client.transaction().await?;
        let seqs: Vec<i64> = tx
            .query(
                &format!(
                    "WITH picked AS (
                        SELECT id FROM {t} WHERE {SELECTOR} ORDER BY seq LIMIT $8 FOR UPDATE SKIP LOCKED
                     )
                     UPDATE {t} o SET published_at = NULL, parked_at = NULL, attempts = 0, last_error = NULL, retry_at = NULL
                     FROM picked WHERE o.id = picked.id RETURNING o.seq"
                ),
                &params,
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(min) = seqs.iter().min() {
            // Relays scan from their floor, above these old rows: tell them where
            // to look (the operator's transaction; nothing on the app's path).
            tx.execute("SELECT pg_notify($1, $2)", &[&self.table().channel(), &format!("replay {min}")]).await?;
        }
        tx.commit().await?;
        Ok((seqs.len() as u64, seqs.iter().max().copied()))
    }
}
