//! PostgreSQL side of the relay: the connection pool and the settings of its
//! sessions, schema migrations and verification, claiming batches from the
//! floor, recording their outcome, prepared (exactly-once) batches, the health
//! of the database the relay is a guest on, and the LISTEN connection that
//! hears operators' replays.

mod backlog;
mod batch;
mod error;
mod floor;
mod health;
mod listen;
mod ops;
mod prepared;
mod schema;
mod tls;
mod txn_ids;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use postgres_native_tls::MakeTlsConnector;

pub use backlog::Backlog;
pub use batch::{Claimed, EventFailure, Finished, Outcome};
pub use error::StoreError;
pub use floor::Floor;
pub use health::{DbHealth, HorizonHolder};
pub use listen::spawn_listener;
pub use ops::{ErrorCount, PublishedRow, ReplayRow, Selector, Status, TopicStatus};
pub use prepared::Prepared;
pub use schema::{render_migration, Migration, SchemaProblem, MIGRATIONS};

pub use txn_ids::{database_id, IdLease, TxnIds};

use crate::config::{OnPublish, Ordering, Settings, TableName};

/// Builds the tokio-postgres config and TLS connector from settings (URL, TLS
/// options, optional password file).
pub fn pg_config(settings: &Settings) -> Result<(tokio_postgres::Config, MakeTlsConnector), StoreError> {
    let (url, url_mode, url_root) = crate::config::split_url(settings.postgres_url());
    let mut cfg: tokio_postgres::Config =
        url.parse().map_err(|e| StoreError::config(format!("postgres.url is not a valid connection string: {e}")))?;
    let (tls, ssl_mode) = tls::connector(settings, url_mode, url_root)?;
    cfg.ssl_mode(ssl_mode);
    if let Some(path) = &settings.postgres.password_file {
        let password = std::fs::read_to_string(path)
            .map_err(|e| StoreError::config(format!("cannot read postgres.password_file {}: {e}", path.display())))?;
        cfg.password(password.trim_end_matches(['\n', '\r']));
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("outbox-relay");
    }
    cfg.connect_timeout(settings.postgres.connect_timeout);
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(30));
    Ok((cfg, tls))
}

/// Where the relay's Postgres is, without the password, for messages.
pub fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{}@{}:{}/{}", cfg.get_user().unwrap_or("?"), host, port, cfg.get_dbname().unwrap_or("?"))
}

/// The outbox table and the pool of connections that claim and mark it.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    pg: tokio_postgres::Config,
    tls: MakeTlsConnector,
    table: TableName,
    sql: batch::Statements,
    shared: Arc<Shared>,
}

/// State every clone of a store shares: where claims start, which keys are
/// left out for a moment, the identity sequence.
struct Shared {
    floor: Mutex<Floor>,
    blocked: Mutex<HashMap<String, Instant>>,
    /// A sweep below the floor is running (at most one at a time: a slow one
    /// must not pile up and take the pool's connections from the claims).
    sweeping: std::sync::atomic::AtomicBool,
    /// `None`: not looked up yet; `Some(None)`: the table has no owned sequence.
    seq_oid: Mutex<Option<Option<u32>>>,
    /// Heartbeat period of an open batch (a third of the idle-in-transaction bound).
    keepalive: Option<Duration>,
    txn_ids: Mutex<Option<TxnIds>>,
}

/// Settings of every relay session. No JIT, parallel workers or custom plans:
/// the relay runs the same small, indexed statements over and over, where JIT
/// compilation alone took ~100 ms per statement on a table with many dead rows,
/// a parallel plan starts processes, and a custom plan re-plans 1000-element
/// arrays on every call. No bitmap or sequential scans: every statement of the
/// relay is a range of an index read in order until a LIMIT or a bound, and on
/// a table without statistics (never analyzed, or analyzed when it looked
/// different: a fresh outbox, a restored one, autovacuum behind) the planner
/// estimated one pending row and chose, by a hair, a bitmap scan of the whole
/// pending index plus a sort of every pending row, on every claim (350 ms and
/// 29k buffers for 500 rows behind a 200k backlog; drains ran at a third of the
/// analyzed rate). The settings only add a cost penalty, so a statement with no
/// index path still runs. The time bounds keep a relay from holding locks, a
/// snapshot or a query without limit (PostgreSQL ends them server-side, so they
/// also bound a relay that froze or lost its network).
fn session_settings(statement_timeout: Duration, idle_in_transaction: Duration) -> String {
    let ms = |d: Duration| d.as_millis().min(i32::MAX as u128);
    format!(
        "SELECT set_config('jit', 'off', false), set_config('max_parallel_workers_per_gather', '0', false),
                set_config('plan_cache_mode', 'force_generic_plan', false),
                set_config('enable_bitmapscan', 'off', false), set_config('enable_seqscan', 'off', false),
                set_config('statement_timeout', '{}', false),
                set_config('idle_in_transaction_session_timeout', '{}', false),
                CASE WHEN current_setting('server_version_num')::int >= 140000
                     THEN set_config('client_connection_check_interval', '10000', false) END",
        ms(statement_timeout),
        ms(idle_in_transaction)
    )
}

impl Store {
    /// Creates the pool; connects lazily (call [`Store::ping`] to test it).
    pub fn new(settings: &Settings) -> Result<Store, StoreError> {
        let (pg, tls) = pg_config(settings)?;
        let manager =
            Manager::from_config(pg.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let setup =
            session_settings(settings.postgres.statement_timeout, settings.postgres.idle_in_transaction_timeout);
        let pool = Pool::builder(manager)
            .max_size(settings.postgres.pool_size)
            .post_create(Hook::async_fn(move |client, _| {
                let setup = setup.clone();
                Box::pin(async move {
                    client.simple_query(&setup).await.map_err(HookError::Backend)?;
                    Ok(())
                })
            }))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(settings.postgres.connect_timeout))
            .wait_timeout(Some(settings.postgres.connect_timeout + Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::config(format!("cannot build the Postgres pool: {e}")))?;
        let table = settings.table();
        let sql = batch::Statements::new(
            &table,
            settings.relay.on_publish,
            settings.relay.ordering,
            settings.relay.retry_backoff,
        );
        let idle = settings.postgres.idle_in_transaction_timeout;
        let shared = Arc::new(Shared {
            floor: Mutex::new(Floor::default()),
            blocked: Mutex::new(HashMap::new()),
            sweeping: std::sync::atomic::AtomicBool::new(false),
            seq_oid: Mutex::new(None),
            keepalive: (!idle.is_zero()).then(|| (idle / 3).max(Duration::from_millis(100))),
            txn_ids: Mutex::new(None),
        });
        Ok(Store { pool, pg, tls, table, sql, shared })
    }

    /// Where this relay's claims start (see `floor.rs`).
    pub fn floor(&self) -> MutexGuard<'_, Floor> {
        self.shared.floor.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn observe_floor(&self, started: i64, claimed_max: Option<i64>, head: Option<i64>, lockers: Option<Vec<String>>) {
        self.floor().observe(started, claimed_max, head, lockers);
    }

    /// The outbox's identity sequence, looked up once. `None` when the table has
    /// none: then the floor cannot rule out stragglers and stays at the start.
    async fn sequence_oid(&self, client: &deadpool_postgres::Object) -> Option<u32> {
        if let Some(known) = *self.shared.seq_oid.lock().unwrap_or_else(|p| p.into_inner()) {
            return known;
        }
        let row = client
            .query_one("SELECT pg_get_serial_sequence($1, 'seq')::regclass::oid", &[&self.table.quoted()])
            .await
            .ok()?;
        let oid: Option<u32> = row.get(0);
        if oid.is_none() {
            tracing::warn!(
                table = %self.table,
                "the seq column has no owned sequence: claims cannot skip dead rows safely and scan from the start"
            );
        }
        *self.shared.seq_oid.lock().unwrap_or_else(|p| p.into_inner()) = Some(oid);
        oid
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// The TLS connector every connection of this store uses.
    pub fn tls(&self) -> &MakeTlsConnector {
        &self.tls
    }

    pub fn on_publish(&self) -> OnPublish {
        self.sql.on_publish
    }

    pub fn ordering(&self) -> Ordering {
        self.sql.ordering
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(StoreError::from)
    }

    /// One round trip: is Postgres reachable?
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Checks that the outbox table has everything the relay relies on.
    pub async fn verify_schema(&self) -> Result<Vec<SchemaProblem>, StoreError> {
        let client = self.client().await?;
        schema::verify(&client, &self.table).await
    }

    /// Applies the bundled migrations that are not yet recorded. Returns the names
    /// of those it applied. (No statement timeout: an index build may be long.)
    pub async fn migrate(&self, to: Option<i32>) -> Result<Vec<&'static str>, StoreError> {
        // Its own connection: the session settings it needs are not the pool's.
        let (mut client, conn) = self.pg.connect(self.tls.clone()).await?;
        let driver = tokio::spawn(conn);
        let result = schema::migrate(&mut client, &self.table, to).await;
        drop(client);
        let _ = driver.await;
        result
    }
}
