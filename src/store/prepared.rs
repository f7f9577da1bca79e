//! Prepared (two-phase) transactions of exactly-once batches: listing them and
//! finishing them from any session.

use super::{Store, StoreError};

/// A transaction prepared by a relay in exactly-once mode, still unresolved.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub gid: String,
    /// Seconds since `PREPARE TRANSACTION`.
    pub age_s: f64,
    /// The role that prepared it: only it (or a superuser) may finish it.
    pub owner: String,
}

/// A SQL string literal (PREPARE TRANSACTION takes no parameters).
pub(super) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Store {
    /// Prepared transactions in this database whose id starts with one of `prefixes`.
    pub async fn prepared_any(&self, prefixes: &[String]) -> Result<Vec<Prepared>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT gid, extract(epoch FROM now() - prepared)::float8, owner::text FROM pg_prepared_xacts
                 WHERE database = current_database()
                   AND EXISTS (SELECT 1 FROM unnest($1::text[]) p WHERE left(gid, length(p)) = p)
                 ORDER BY prepared",
                &[&prefixes],
            )
            .await?;
        Ok(rows.iter().map(|r| Prepared { gid: r.get(0), age_s: r.get(1), owner: r.get(2) }).collect())
    }

    /// Prepared transactions in this database whose id starts with `prefix`.
    pub async fn prepared(&self, prefix: &str) -> Result<Vec<Prepared>, StoreError> {
        self.prepared_any(&[prefix.to_string()]).await
    }

    /// `COMMIT PREPARED gid`; `Ok(false)` when no such transaction exists (any
    /// more: someone resolved it).
    pub async fn commit_prepared(&self, gid: &str) -> Result<bool, StoreError> {
        self.end_prepared("COMMIT PREPARED", gid).await
    }

    /// `ROLLBACK PREPARED gid`; `Ok(false)` when no such transaction exists.
    pub async fn rollback_prepared(&self, gid: &str) -> Result<bool, StoreError> {
        self.end_prepared("ROLLBACK PREPARED", gid).await
    }

    async fn end_prepared(&self, verb: &str, gid: &str) -> Result<bool, StoreError> {
        let client = self.client().await?;
        match client.batch_execute(&format!("{verb} {}", quote_literal(gid))).await {
            Ok(()) => Ok(true),
            Err(e) if e.code().map(|c| c.code()) == Some("42704") => Ok(false), // undefined_object
            Err(e) => Err(e.into()),
        }
    }

    /// Postgres's `max_prepared_transactions` (0 disables two-phase commit).
    pub async fn max_prepared_transactions(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let row = client.query_one("SELECT current_setting('max_prepared_transactions')::int8", &[]).await?;
        Ok(row.get(0))
    }

    /// The role this store connects as, and whether it is a superuser (who may
    /// finish any prepared transaction).
    pub async fn role(&self) -> Result<(String, bool), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT current_user::text, rolsuper FROM pg_roles WHERE rolname = current_user", &[])
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// The topic of event `id` (its row is still there, whatever a prepared
    /// batch did to it: the batch has not committed).
    pub async fn event_topic(&self, id: uuid::Uuid) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT topic FROM {} WHERE id = $1", self.table().quoted());
        Ok(client.query_opt(&sql, &[&id]).await?.map(|r| r.get(0)))
    }
}
