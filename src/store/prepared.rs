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

/// What [`Store::exactly_once_relays_seen`] found.
#[derive(Debug, Clone, Copy)]
pub struct RelaysSeen {
    pub leases: i64,
    pub prepared_owners: i64,
}

impl RelaysSeen {
    /// The relays seen: the larger of the two counts (a live relay is in both
    /// while its batch is prepared).
    pub fn relays(&self) -> i64 {
        self.leases.max(self.prepared_owners)
    }
}

/// What [`Store::replication`] found.
#[derive(Debug, Clone)]
pub struct Replication {
    pub synchronous_standby_names: String,
    pub synchronous_commit: String,
    /// `(application_name, sync_state)` per standby.
    pub standbys: Vec<(String, Option<String>)>,
}

impl Store {
    /// Prepared transactions in this database whose id starts with one of `prefixes`.
    pub async fn prepared_any(&self, prefixes: &[String]) -> Result<Vec<Prepared>, StoreError> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT gid, extract(epoch FROM now() - prepared)::float8, owner::text FROM pg_prepared_xacts
                 WHERE database = current_database()
                   AND EXISTS (SELECT 1 FROM unnest($1::text[]) p WHERE left(gid, length(p)) = p)
                 ORDER BY prepared",
            )
            .await?;
        let rows = client.query(&stmt, &[&prefixes]).await?;
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

    /// Exactly-once relays this server can see, in any of its databases: those
    /// holding an id lease now (an advisory lock of an `outbox-relay` session),
    /// and the owners of prepared batches (a dead relay's batch keeps its slot
    /// until it is resolved). Each needs a `max_prepared_transactions` slot.
    /// Sessions of other roles may hide their `application_name` from an
    /// unprivileged role: this is a lower bound.
    pub async fn exactly_once_relays_seen(&self) -> Result<RelaysSeen, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                          WHERE l.locktype = 'advisory' AND l.granted
                            AND a.application_name LIKE 'outbox-relay%')::int8,
                        (SELECT count(DISTINCT regexp_replace(gid, '/[^/]*$', '')) FROM pg_prepared_xacts
                          WHERE gid LIKE 'outbox-relay/%')::int8",
                &[],
            )
            .await?;
        Ok(RelaysSeen { leases: row.get(0), prepared_owners: row.get(1) })
    }

    /// The server's replication: `synchronous_standby_names`,
    /// `synchronous_commit`, and its standbys with their `sync_state` (`None`
    /// when this role may not see it: it needs `pg_monitor`).
    pub async fn replication(&self) -> Result<Replication, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT current_setting('synchronous_standby_names'), current_setting('synchronous_commit')",
                &[],
            )
            .await?;
        let standbys = client
            .query("SELECT coalesce(application_name, ''), sync_state FROM pg_stat_replication", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(Replication { synchronous_standby_names: row.get(0), synchronous_commit: row.get(1), standbys })
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
