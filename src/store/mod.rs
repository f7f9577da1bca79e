//! PostgreSQL side of the relay, one file per operation: the pool and session
//! settings (`connection`), claiming a batch from the floor (`claim`, `floor`),
//! recording its outcome (`finish`), the look for work and the sweep below the
//! floor (`sweep`), prepared exactly-once batches (`prepared`, `txn_ids`,
//! `lease`), the schema (`schema/`), the operator's commands (`ops/`), the
//! health of the database the relay is a guest on (`health`, `backlog`), and
//! the LISTEN connection that hears operators' replays (`listen`).
//!
//! The store knows Postgres and the outbox's rows; it knows nothing of Kafka.

mod backlog;
mod claim;
mod claim_sql;
mod connection;
mod error;
mod finish;
mod floor;
mod health;
mod lease;
mod listen;
mod ops;
mod passed;
mod prepared;
mod schema;
mod shape;
mod skip;
mod sweep;
mod tls;
mod txn_ids;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use deadpool_postgres::Pool;
use postgres_native_tls::MakeTlsConnector;

pub use backlog::Backlog;
pub use connection::{describe, pg_config};
pub use error::StoreError;
pub use finish::{Claimed, EventFailure, Finished, Outcome, Parked};
pub use floor::Floor;
pub use health::{DbHealth, HorizonHolder};
pub use lease::{IdLease, LeaseState, LEASE_EXPIRY};
pub use listen::spawn_listener;
pub use ops::{ErrorCount, PublishedRow, ReplayRow, Selector, Status, TopicStatus, CLEANUP_BATCH};
pub use prepared::{Prepared, RelaysSeen, Replication};
pub use schema::{render_migration, Migration, SchemaProblem, MIGRATIONS};
pub use txn_ids::{batch_gid, database_id, gid_event, GidEvent, TxnIds};

use crate::config::{OnPublish, Ordering, Settings, TableName};

/// The outbox table and the pool of connections that claim and mark it.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    pg: tokio_postgres::Config,
    tls: MakeTlsConnector,
    table: TableName,
    ordering: Ordering,
    /// Columns the claim reads beyond the relay's own, as (alias, column).
    extra_columns: Arc<Vec<(&'static str, String)>>,
    finish_sql: Arc<finish::FinishSql>,
    shared: Arc<Shared>,
}

/// The statements that depend on the table's shape, built for the shape last
/// seen.
struct ShapedSql {
    claim: claim_sql::ClaimSql,
    sweep: sweep::SweepSql,
}

/// State every clone of a store shares: where claims start, which keys are
/// left out for a moment, the identity sequence, the open transactions.
struct Shared {
    floor: Mutex<Floor>,
    blocked: Mutex<skip::LeftOut>,
    /// Where the main scan may start above the floor while keys are left out.
    skip: Mutex<Option<skip::Skip>>,
    /// What the last batches' main scans passed (where the next one may start
    /// while those batches are in flight: `passed.rs`).
    passed: Mutex<passed::Passed>,
    /// What the table offers (migrations 0004 and 0005) and the statements
    /// built for it. `None`: not looked up yet (the first claim does; every
    /// schema check looks again).
    shaped: Mutex<Option<Arc<ShapedSql>>>,
    /// A sweep below the floor is running (at most one at a time: a slow one
    /// must not pile up and take the pool's connections from the claims).
    sweeping: std::sync::atomic::AtomicBool,
    /// `None`: not looked up yet; `Some(None)`: the table has no owned sequence.
    seq_oid: Mutex<Option<Option<u32>>>,
    /// Heartbeat period of an open batch (a third of the idle-in-transaction bound).
    keepalive: Option<Duration>,
    txn_ids: Mutex<Option<TxnIds>>,
    clock: Arc<connection::TxnClock>,
}

impl Store {
    /// Creates the pool; connects lazily (call [`Store::ping`] to test it).
    pub fn new(settings: &Settings) -> Result<Store, StoreError> {
        let (pg, tls) = pg_config(settings)?;
        let pool = connection::pool(settings, &pg, &tls)?;
        let table = settings.table();
        let relay = &settings.relay;
        let idle = settings.postgres.idle_in_transaction_timeout;
        let shared = Arc::new(Shared {
            floor: Mutex::new(Floor::default()),
            blocked: Mutex::new(skip::LeftOut::default()),
            skip: Mutex::new(None),
            passed: Mutex::default(),
            shaped: Mutex::new(None),
            sweeping: std::sync::atomic::AtomicBool::new(false),
            seq_oid: Mutex::new(None),
            keepalive: (!idle.is_zero()).then(|| (idle / 3).max(Duration::from_millis(100))),
            txn_ids: Mutex::new(None),
            clock: Arc::default(),
        });
        Ok(Store {
            pool,
            pg,
            tls,
            ordering: relay.ordering,
            extra_columns: Arc::new(settings.cloudevents.columns()),
            finish_sql: Arc::new(finish::FinishSql::new(&table, relay.on_publish, relay.retry_backoff)),
            table,
            shared,
        })
    }

    /// Where this relay's claims start (see `floor.rs`).
    pub fn floor(&self) -> MutexGuard<'_, Floor> {
        self.shared.floor.lock().unwrap_or_else(|p| p.into_inner())
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
        self.finish_sql.on_publish
    }

    pub fn ordering(&self) -> Ordering {
        self.ordering
    }

    /// How long the oldest transaction this store holds open has been open (any
    /// kind), and the oldest claimed batch: `None` when there is none.
    pub fn oldest_open_transaction(&self) -> (Option<Duration>, Option<Duration>) {
        self.shared.clock.oldest()
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
        let extra: Vec<&str> = self.extra_columns.iter().map(|(_, c)| c.as_str()).collect();
        let problems = schema::verify(&client, &self.table, &extra).await?;
        if !problems.iter().any(|p| p.fatal) {
            if let Ok(shape) = schema::shape(&client, &self.table).await {
                self.set_shape(shape);
            }
        }
        Ok(problems)
    }

    /// The statements for the table's shape, looked up at the first call.
    async fn shaped(&self, client: &deadpool_postgres::Object) -> Result<Arc<ShapedSql>, StoreError> {
        if let Some(known) = self.shared.shaped.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(known);
        }
        let shape = schema::shape(client, &self.table).await?;
        Ok(self.set_shape(shape))
    }

    /// Builds the statements for `shape`, unless they are built already.
    fn set_shape(&self, shape: shape::Shape) -> Arc<ShapedSql> {
        let mut current = self.shared.shaped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(same) = current.as_ref().filter(|s| s.claim.shape == shape) {
            return same.clone();
        }
        if !shape.key_index {
            tracing::warn!(
                table = %self.table,
                "the table lacks the pending key index of migration 0004: with several relays, a claim's order \
                 check reads every pending event between the floor and its batch; run `outbox-relay migrate`"
            );
        }
        tracing::info!(table = %self.table, key_index = shape.key_index, deliver_after = shape.delay,
            partition = shape.partition, ready_index = shape.ready_index, "claims built for the table's schema");
        let built = Arc::new(ShapedSql {
            claim: claim_sql::ClaimSql::new(&self.table, self.ordering, shape, &self.extra_columns),
            sweep: sweep::SweepSql::new(&self.table, shape),
        });
        *current = Some(built.clone());
        built
    }

    /// Applies the bundled migrations that are not yet recorded. Returns the names
    /// of those it applied. (No statement timeout: an index build may be long.)
    pub async fn migrate(&self, to: Option<i32>) -> Result<Vec<&'static str>, StoreError> {
        // Its own connection: the session settings it needs are not the pool's.
        let (mut client, conn) = self.pg.connect(self.tls.clone()).await?;
        let driver = crate::telemetry::spawn(conn);
        let result = schema::migrate(&mut client, &self.table, to).await;
        drop(client);
        let _ = driver.await;
        result
    }
}
