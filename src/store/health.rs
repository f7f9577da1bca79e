//! The health of the database the relay is a guest on, as it concerns the
//! outbox: dead tuples waiting for vacuum, and who holds the xmin horizon back
//! (vacuum removes nothing an open snapshot may still see).

use serde::Serialize;

use super::{Store, StoreError};

/// What holds back vacuum in this database: the oldest snapshot or transaction.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HorizonHolder {
    /// `session`, `prepared transaction` or `replication slot`.
    pub kind: String,
    /// How long it has held it (seconds since its transaction began; for a
    /// slot, unknown).
    pub age_s: Option<f64>,
    /// How many transaction ids behind it is.
    pub age_xids: Option<i64>,
    pub pid: Option<i32>,
    pub application_name: Option<String>,
    pub user: Option<String>,
    /// `active`, `idle in transaction`… (hidden from roles without pg_read_all_stats).
    pub state: Option<String>,
    /// The prepared transaction's gid or the slot's name.
    pub name: Option<String>,
}

impl std::fmt::Display for HorizonHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(pid) = self.pid {
            write!(f, " pid {pid}")?;
        }
        if let Some(n) = &self.name {
            write!(f, " {n}")?;
        }
        if let Some(a) = self.application_name.as_deref().filter(|a| !a.is_empty()) {
            write!(f, " (application_name {a})")?;
        }
        if let Some(u) = &self.user {
            write!(f, " user {u}")?;
        }
        if let Some(s) = &self.state {
            write!(f, ", {s}")?;
        }
        match (self.age_s, self.age_xids) {
            (Some(s), _) => write!(f, ", for {s:.0} s"),
            (None, Some(x)) => write!(f, ", {x} transactions behind"),
            _ => Ok(()),
        }
    }
}

/// Dead tuples of the outbox table and the oldest holder of the xmin horizon.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DbHealth {
    pub live_tuples: i64,
    pub dead_tuples: i64,
    /// Seconds since the last (auto)vacuum of the table finished, if any.
    pub last_vacuum_age_s: Option<f64>,
    /// The oldest snapshot or transaction in this database (`None`: nothing open
    /// long enough to matter, or nothing this role may see).
    pub horizon: Option<HorizonHolder>,
}

impl Store {
    /// Reads `pg_stat_user_tables`, `pg_stat_activity`, `pg_prepared_xacts` and
    /// `pg_replication_slots`: catalog views, nothing scans the outbox.
    pub async fn db_health(&self) -> Result<DbHealth, StoreError> {
        let client = self.client().await?;
        let t = self.table().quoted();
        let stats = client
            .query_opt(
                "SELECT n_live_tup, n_dead_tup,
                        extract(epoch FROM now() - greatest(last_vacuum, last_autovacuum))::float8
                 FROM pg_stat_user_tables WHERE relid = $1::text::regclass",
                &[&t],
            )
            .await?;
        let mut health = DbHealth::default();
        if let Some(r) = stats {
            health.live_tuples = r.get(0);
            health.dead_tuples = r.get(1);
            health.last_vacuum_age_s = r.get(2);
        }
        // Sessions of this database (and walsenders, which carry a standby's
        // hot_standby_feedback) with a snapshot or a transaction id.
        let session = client
            .query_opt(
                "SELECT pid, application_name, usename::text, state,
                        extract(epoch FROM now() - xact_start)::float8,
                        greatest(age(backend_xmin), age(backend_xid))::int8
                 FROM pg_stat_activity
                 WHERE pid <> pg_backend_pid()
                   AND (datname = current_database() OR backend_type = 'walsender')
                   AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
                 ORDER BY greatest(age(backend_xmin), age(backend_xid)) DESC NULLS LAST, xact_start
                 LIMIT 1",
                &[],
            )
            .await?
            .map(|r| HorizonHolder {
                kind: "session".into(),
                pid: r.get(0),
                application_name: r.get(1),
                user: r.get(2),
                state: r.get(3),
                age_s: r.get(4),
                age_xids: r.get(5),
                name: None,
            });
        let prepared = client
            .query_opt(
                "SELECT gid, owner::text, extract(epoch FROM now() - prepared)::float8, age(transaction)::int8
                 FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared LIMIT 1",
                &[],
            )
            .await?
            .map(|r| HorizonHolder {
                kind: "prepared transaction".into(),
                name: r.get(0),
                user: r.get(1),
                age_s: r.get(2),
                age_xids: r.get(3),
                ..Default::default()
            });
        let slot = client
            .query_opt(
                "SELECT slot_name::text, greatest(age(xmin), age(catalog_xmin))::int8 FROM pg_replication_slots
                 WHERE (xmin IS NOT NULL OR catalog_xmin IS NOT NULL)
                   AND (database IS NULL OR database = current_database())
                 ORDER BY 2 DESC LIMIT 1",
                &[],
            )
            .await?
            .map(|r| HorizonHolder {
                kind: "replication slot".into(),
                name: r.get(0),
                age_xids: r.get(1),
                ..Default::default()
            });
        health.horizon = [session, prepared, slot].into_iter().flatten().max_by_key(|h| h.age_xids.unwrap_or(0));
        Ok(health)
    }
}
