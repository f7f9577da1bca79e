//! Operator queries: status, replay, retention clean-up, and the published rows
//! `verify` compares with Kafka. Each reads through a partial index (pending,
//! published or parked) so its cost follows what it selects, not the table.

use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreError};

#[derive(Debug, Clone, Default, Serialize)]
pub struct TopicStatus {
    pub topic: String,
    pub pending: i64,
    pub oldest_pending_age_s: Option<f64>,
    pub parked: i64,
    pub published_1m: i64,
    pub published_5m: i64,
    pub published_15m: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorCount {
    pub error: String,
    pub count: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub table: String,
    pub pending: i64,
    pub oldest_pending_age_s: Option<f64>,
    pub parked: i64,
    pub published_1m: i64,
    pub published_5m: i64,
    pub published_15m: i64,
    pub top_errors: Vec<ErrorCount>,
    pub topics: Vec<TopicStatus>,
    /// Exactly-once batches prepared in Postgres and not yet committed or rolled
    /// back (normally 0, or 1 per relay for a few milliseconds), in any mode.
    pub prepared_batches: usize,
    pub oldest_prepared_age_s: Option<f64>,
    /// Their gids, oldest first (at most 10).
    pub prepared_gids: Vec<String>,
    /// Dead tuples of the table and who holds the xmin horizon back.
    pub health: super::DbHealth,
}

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

const SELECTOR: &str = "(published_at IS NOT NULL OR parked_at IS NOT NULL)
    AND ($1::bool IS FALSE OR parked_at IS NOT NULL)
    AND (cardinality($2::uuid[]) = 0 OR id = ANY($2))
    AND ($3::text IS NULL OR topic = $3)
    AND ($4::text IS NULL OR key = $4)
    AND ($5::text IS NULL OR created_at >= $5::text::timestamptz)
    AND ($6::text IS NULL OR created_at < $6::text::timestamptz)
    AND ($7::int8 IS NULL OR seq > $7)";

impl Store {
    pub async fn status(&self) -> Result<Status, StoreError> {
        let t = self.table().quoted();
        let client = self.client().await?;
        let mut topics: std::collections::BTreeMap<String, TopicStatus> = Default::default();
        let entry = |topics: &mut std::collections::BTreeMap<String, TopicStatus>, topic: String| {
            topics.entry(topic.clone()).or_insert_with(|| TopicStatus { topic, ..Default::default() }).clone()
        };
        for r in client
            .query(
                &format!(
                    "SELECT topic, count(*), extract(epoch FROM now() - min(created_at))::float8
                     FROM {t} WHERE published_at IS NULL AND parked_at IS NULL GROUP BY topic"
                ),
                &[],
            )
            .await?
        {
            let mut s = entry(&mut topics, r.get(0));
            s.pending = r.get(1);
            s.oldest_pending_age_s = r.get::<_, Option<f64>>(2).map(|a| a.max(0.0));
            topics.insert(s.topic.clone(), s);
        }
        for r in client
            .query(&format!("SELECT topic, count(*) FROM {t} WHERE parked_at IS NOT NULL GROUP BY topic"), &[])
            .await?
        {
            let mut s = entry(&mut topics, r.get(0));
            s.parked = r.get(1);
            topics.insert(s.topic.clone(), s);
        }
        for r in client
            .query(
                &format!(
                    "SELECT topic,
                            count(*) FILTER (WHERE published_at > now() - interval '1 minute'),
                            count(*) FILTER (WHERE published_at > now() - interval '5 minutes'),
                            count(*)
                     FROM {t} WHERE published_at > now() - interval '15 minutes' GROUP BY topic"
                ),
                &[],
            )
            .await?
        {
            let mut s = entry(&mut topics, r.get(0));
            s.published_1m = r.get(1);
            s.published_5m = r.get(2);
            s.published_15m = r.get(3);
            topics.insert(s.topic.clone(), s);
        }
        let top_errors = client
            .query(
                &format!(
                    "SELECT coalesce(left(last_error, 200), '(no error recorded)'), count(*) FROM {t}
                     WHERE parked_at IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| ErrorCount { error: r.get(0), count: r.get(1) })
            .collect();
        let topics: Vec<TopicStatus> = topics.into_values().collect();
        let oldest = topics
            .iter()
            .filter_map(|t| t.oldest_pending_age_s)
            .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a))));
        drop(client);
        let prepared = self.prepared_any(&self.transactional_prefixes().await).await?;
        let health = self.db_health().await?;
        Ok(Status {
            prepared_batches: prepared.len(),
            oldest_prepared_age_s: prepared.iter().map(|p| p.age_s).reduce(f64::max),
            prepared_gids: prepared.iter().take(10).map(|p| p.gid.clone()).collect(),
            health,
            table: self.table().to_string(),
            pending: topics.iter().map(|t| t.pending).sum(),
            oldest_pending_age_s: oldest,
            parked: topics.iter().map(|t| t.parked).sum(),
            published_1m: topics.iter().map(|t| t.published_1m).sum(),
            published_5m: topics.iter().map(|t| t.published_5m).sum(),
            published_15m: topics.iter().map(|t| t.published_15m).sum(),
            top_errors,
            topics,
        })
    }

    /// Topics of pending rows and of rows published in the last hour (at most
    /// `limit`, each read through its partial index, at most 10k rows each).
    pub async fn recent_topics(&self, limit: i64) -> Result<Vec<String>, StoreError> {
        let t = self.table().quoted();
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT DISTINCT topic FROM (
                       (SELECT topic FROM {t} WHERE published_at IS NULL AND parked_at IS NULL ORDER BY seq LIMIT 10000)
                       UNION ALL
                       (SELECT topic FROM {t} WHERE published_at > now() - interval '1 hour' LIMIT 10000)) x
                     ORDER BY topic LIMIT $1"
                ),
                &[&limit],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

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
