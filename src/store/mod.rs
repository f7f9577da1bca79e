//! PostgreSQL side of the relay: the connection pool, schema migrations and
//! verification, claiming batches, recording their outcome, and the dedicated
//! LISTEN connection that wakes the relay.

mod backlog;
mod batch;
mod error;
mod listen;
mod ops;
mod schema;
mod tls;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use postgres_native_tls::MakeTlsConnector;

pub use backlog::Backlog;
pub use batch::{Claimed, EventFailure, Finished, Outcome, Prepared};
pub use error::StoreError;
pub use listen::spawn_listener;
pub use ops::{ErrorCount, PublishedRow, ReplayRow, Selector, Status, TopicStatus};
pub use schema::{render_migration, Migration, SchemaProblem, MIGRATIONS};
pub use tls::{split_url as split_tls_options, TlsMode};

use crate::config::{OnPublish, Ordering, Settings, TableName};

/// Builds the tokio-postgres config and TLS connector from settings (URL, TLS
/// options, optional password file).
pub fn pg_config(settings: &Settings) -> Result<(tokio_postgres::Config, MakeTlsConnector), StoreError> {
    let (url, url_mode, url_root) = tls::split_url(settings.postgres_url());
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
}

impl Store {
    /// Creates the pool; connects lazily (call [`Store::ping`] to test it).
    pub fn new(settings: &Settings) -> Result<Store, StoreError> {
        let (pg, tls) = pg_config(settings)?;
        let manager =
            Manager::from_config(pg.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(settings.postgres.pool_size)
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
        Ok(Store { pool, pg, tls, table, sql })
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
    /// of those it applied.
    pub async fn migrate(&self) -> Result<Vec<&'static str>, StoreError> {
        let mut client = self.client().await?;
        schema::migrate(&mut client, &self.table).await
    }
}
