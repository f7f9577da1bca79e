//! `status`: backlog, parked events and their errors, throughput, per topic.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Default, Serialize)]
pub struct TopicStatus {
    pub topic: String,
    pub pending: i64,
    pub oldest_pending_age_s: Option<f64>,
    /// Waiting for a `deliver_after` still ahead (migration 0005); not in `pending`.
    pub scheduled: i64,
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
    /// Events waiting for a `deliver_after` still ahead; not in `pending`.
    pub scheduled: i64,
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
    pub health: crate::store::DbHealth,
}

impl Store {
    pub async fn status(&self) -> Result<Status, StoreError> {
        let topics: Vec<TopicStatus> = self.topic_status().await?.into_values().collect();
        let top_errors = self.top_errors().await?;
        let oldest = topics
            .iter()
            .filter_map(|t| t.oldest_pending_age_s)
            .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a))));
        let prepared = self.prepared_any(&self.transactional_prefixes().await).await?;
        let health = self.db_health().await?;
        Ok(Status {
            prepared_batches: prepared.len(),
            oldest_prepared_age_s: prepared.iter().map(|p| p.age_s).reduce(f64::max),
            prepared_gids: prepared.iter().take(10).map(|p| p.gid.clone()).collect(),
            health,
            table: self.table().to_string(),
            pending: topics.iter().map(|t| t.pending).sum(),
            scheduled: topics.iter().map(|t| t.scheduled).sum(),
            oldest_pending_age_s: oldest,
            parked: topics.iter().map(|t| t.parked).sum(),
            published_1m: topics.iter().map(|t| t.published_1m).sum(),
            published_5m: topics.iter().map(|t| t.published_5m).sum(),
            published_15m: topics.iter().map(|t| t.published_15m).sum(),
            top_errors,
            topics,
        })
    }

    /// Pending, parked and recently published rows per topic, each counted
    /// through its partial index.
    async fn topic_status(&self) -> Result<BTreeMap<String, TopicStatus>, StoreError> {
        let t = self.table().quoted();
        let client = self.client().await?;
        let mut topics: BTreeMap<String, TopicStatus> = BTreeMap::new();
        fn entry(topics: &mut BTreeMap<String, TopicStatus>, topic: String) -> &mut TopicStatus {
            topics.entry(topic.clone()).or_insert_with(|| TopicStatus { topic, ..Default::default() })
        }
        // A delayed event counts as pending once its time came, aged from then.
        let delay = self.shaped(&client).await?.claim.shape.delay;
        let (now, since, ahead) = if delay {
            (
                "deliver_after IS NULL OR deliver_after <= now()",
                "coalesce(deliver_after, created_at)",
                "deliver_after > now()",
            )
        } else {
            ("true", "created_at", "false")
        };
        let pending = format!(
            "SELECT topic, count(*) FILTER (WHERE {now}),
                    extract(epoch FROM now() - min({since}) FILTER (WHERE {now}))::float8,
                    count(*) FILTER (WHERE {ahead})
             FROM {t} WHERE published_at IS NULL AND parked_at IS NULL GROUP BY topic"
        );
        for r in client.query(&pending, &[]).await? {
            let s = entry(&mut topics, r.get(0));
            s.pending = r.get(1);
            s.oldest_pending_age_s = r.get::<_, Option<f64>>(2).map(|a| a.max(0.0));
            s.scheduled = r.get(3);
        }
        let parked = format!("SELECT topic, count(*) FROM {t} WHERE parked_at IS NOT NULL GROUP BY topic");
        for r in client.query(&parked, &[]).await? {
            entry(&mut topics, r.get(0)).parked = r.get(1);
        }
        let published = format!(
            "SELECT topic,
                    count(*) FILTER (WHERE published_at > now() - interval '1 minute'),
                    count(*) FILTER (WHERE published_at > now() - interval '5 minutes'),
                    count(*)
             FROM {t} WHERE published_at > now() - interval '15 minutes' GROUP BY topic"
        );
        for r in client.query(&published, &[]).await? {
            let s = entry(&mut topics, r.get(0));
            s.published_1m = r.get(1);
            s.published_5m = r.get(2);
            s.published_15m = r.get(3);
        }
        Ok(topics)
    }

    /// The most common errors of parked rows.
    async fn top_errors(&self) -> Result<Vec<ErrorCount>, StoreError> {
        let t = self.table().quoted();
        let client = self.client().await?;
        let sql = format!(
            "SELECT coalesce(left(last_error, 200), '(no error recorded)'), count(*) FROM {t}
             WHERE parked_at IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5"
        );
        Ok(client.query(&sql, &[]).await?.iter().map(|r| ErrorCount { error: r.get(0), count: r.get(1) }).collect())
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
}
