//! A fresh outbox table per test (migrated by the relay binary), with its
//! topics, its relays, and what is in it.

use std::time::{Duration, Instant};

use crate::infra::{pg, require_kafka, InfraLock, Resource};
use crate::process::{RelayProcess, Stderr};
use crate::relay::relay_cmd;
use crate::topics::create_topic;

/// An outbox table `<prefix>_<random>` in `public`, unique per test so tests
/// can run in parallel. It holds shared locks on Postgres and the single
/// broker while it lives (see [`InfraLock`]).
pub struct Outbox {
    pub table: String,
    _lock: Option<InfraLock>,
}

impl Outbox {
    /// A migrated table.
    pub async fn new(prefix: &str) -> Outbox {
        Self::create(prefix, None, None).await
    }

    /// A table migrated only up to `to` (e.g. an installation of an older version).
    pub async fn new_at(prefix: &str, to: Option<i32>) -> Outbox {
        Self::create(prefix, to, None).await
    }

    /// For a test that holds `exclusive`: the shared locks it does not hold.
    pub async fn new_beside(prefix: &str, exclusive: &InfraLock) -> Outbox {
        Self::create(prefix, None, Some(exclusive)).await
    }

    async fn create(prefix: &str, to: Option<i32>, exclusive: Option<&InfraLock>) -> Outbox {
        let wanted: Vec<Resource> = [Resource::Postgres, Resource::Kafka]
            .into_iter()
            .filter(|r| !exclusive.is_some_and(|x| x.holds(*r)))
            .collect();
        let lock = InfraLock::shared(&wanted).await;
        require_kafka();
        roll_back_abandoned_prepared().await;
        let table = format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut cmd = relay_cmd(&table, &[]);
        cmd.arg("migrate");
        if let Some(to) = to {
            cmd.arg("--to").arg(to.to_string());
        }
        let out = cmd.output().expect("run outbox-relay migrate");
        assert!(
            out.status.success(),
            "migrate failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Outbox { table, _lock: Some(lock) }
    }

    /// A topic `<table>.<name>` with `partitions` partitions.
    pub async fn topic(&self, name: &str, partitions: i32) -> String {
        let topic = format!("{}.{}", self.table, name);
        create_topic(&topic, partitions).await;
        topic
    }

    pub fn qualified(&self) -> String {
        format!("public.{}", self.table)
    }

    pub async fn count(&self, filter: &str) -> i64 {
        pg().await
            .query_one(&format!("SELECT count(*) FROM {} WHERE {filter}", self.qualified()), &[])
            .await
            .unwrap_or_else(|e| panic!("count {filter}: {e}"))
            .get(0)
    }

    /// Inserts `n` events on `topic` with keys `key-0`..`key-<keys-1>` (`key-(i % keys)` for
    /// event i = 1..=n) and payload `{"n": i}`, in one transaction.
    pub async fn insert(&self, topic: &str, n: i64, keys: i64) {
        pg().await
            .execute(
                &format!(
                    "INSERT INTO {} (topic, key, payload)
                     SELECT $1, 'key-' || (i % $3), jsonb_build_object('n', i) FROM generate_series(1, $2::int8) i",
                    self.qualified()
                ),
                &[&topic, &n, &keys.max(1)],
            )
            .await
            .expect("insert events");
    }

    /// Waits until no row is pending (or fails after `timeout`).
    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self.count("published_at IS NULL AND parked_at IS NULL").await;
            if pending == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{pending} events still pending after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A relay process for this table with extra `OUTBOX_RELAY__…` settings.
    pub fn spawn_relay(&self, extra: &[(&str, &str)]) -> RelayProcess {
        self.spawn_relay_with(extra, None)
    }

    /// Like `spawn_relay`, with a TOML config file (for `kafka.properties`).
    pub fn spawn_relay_with(&self, extra: &[(&str, &str)], config_toml: Option<&str>) -> RelayProcess {
        let mut cmd = relay_cmd(&self.table, extra);
        if let Some(toml) = config_toml {
            let path = std::env::temp_dir().join(format!("{}-{}.toml", self.table, uuid::Uuid::new_v4().simple()));
            std::fs::write(&path, toml).expect("write config");
            cmd.arg("--config").arg(path);
        }
        cmd.arg("run");
        RelayProcess::spawn(cmd, Stderr::Keep)
    }

    /// A Postgres URL whose sessions carry this table's name as their
    /// `application_name` (so `pg_stat_activity` can tell its relay's sessions).
    pub fn tagged_url(&self) -> String {
        format!("{}?application_name={}", crate::infra::pg_url(), self.table)
    }
}

/// Prepared transactions older than 10 minutes in the test database belong to
/// an interrupted earlier run (each test resolves its own): roll them back so
/// they hold no locks or xmin horizon into this run.
pub async fn roll_back_abandoned_prepared() {
    let db = pg().await;
    let gids = db
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND prepared < now() - interval '10 minutes'",
            &[],
        )
        .await
        .expect("pg_prepared_xacts");
    for r in gids {
        let gid: String = r.get(0);
        let _ = db.batch_execute(&format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''"))).await;
    }
}

/// The longest any session with `application_name` had a transaction with a
/// snapshot or an xid open, in seconds, sampled now (0 when none).
pub async fn longest_transaction(db: &tokio_postgres::Client, application_name: &str) -> f64 {
    db.query_one(
        "SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8 FROM pg_stat_activity
         WHERE application_name = $1 AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)",
        &[&application_name],
    )
    .await
    .expect("pg_stat_activity")
    .get(0)
}
