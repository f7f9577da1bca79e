//! Connections: the Postgres config and TLS from settings, the pool and the
//! settings of every relay session, the connection that holds a batch's open
//! transaction, and the clock of the transactions this process holds open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use postgres_native_tls::MakeTlsConnector;

use super::{tls, StoreError};
use crate::config::Settings;

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
/// analyzed rate). No sorts either, for the same reason: a statement's order
/// comes from its index, and a plan made while the table held ten rows (where
/// the ready index, bloated by churn, looked dearer than the rebuilt key
/// index) read the key index whole and sorted every pending row, in the claim
/// and in its probe, until the plan was remade (27k buffers per claim of 100
/// behind a 30k backlog; the sustained bench's delete-mode collapse). Sorts
/// every plan needs (a batch in seq order) still run. The settings only add a
/// cost penalty, so a statement with no index path still runs. The time bounds
/// keep a relay from holding locks, a snapshot or a query without limit
/// (PostgreSQL ends them server-side, so they also bound a relay that froze or
/// lost its network).
fn session_settings(statement_timeout: Duration, idle_in_transaction: Duration) -> String {
    let ms = |d: Duration| d.as_millis().min(i32::MAX as u128);
    format!(
        "SELECT set_config('jit', 'off', false), set_config('max_parallel_workers_per_gather', '0', false),
                set_config('plan_cache_mode', 'force_generic_plan', false),
                set_config('enable_bitmapscan', 'off', false), set_config('enable_seqscan', 'off', false),
                set_config('enable_sort', 'off', false),
                set_config('statement_timeout', '{}', false),
                set_config('idle_in_transaction_session_timeout', '{}', false),
                CASE WHEN current_setting('server_version_num')::int >= 140000
                     THEN set_config('client_connection_check_interval', '10000', false) END",
        ms(statement_timeout),
        ms(idle_in_transaction)
    )
}

/// The pool every relay statement runs on (connects lazily).
pub(super) fn pool(
    settings: &Settings,
    pg: &tokio_postgres::Config,
    tls: &MakeTlsConnector,
) -> Result<Pool, StoreError> {
    let manager =
        Manager::from_config(pg.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let setup = session_settings(settings.postgres.statement_timeout, settings.postgres.idle_in_transaction_timeout);
    Pool::builder(manager)
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
        .map_err(|e| StoreError::config(format!("cannot build the Postgres pool: {e}")))
}

/// What kind of transaction the relay holds open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxnKind {
    /// A claimed batch (row locks, an xid).
    Batch,
}

/// The transactions this process holds open on the database, by when they
/// began: the `outbox_relay_oldest_transaction_age_seconds` gauge reads it.
#[derive(Debug, Default)]
pub(super) struct TxnClock {
    next: AtomicU64,
    open: Mutex<HashMap<u64, (Instant, TxnKind)>>,
}

impl TxnClock {
    pub(super) fn begin(self: &Arc<Self>, kind: TxnKind) -> OpenTxn {
        let id = self.next.fetch_add(1, AtomicOrdering::Relaxed);
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (Instant::now(), kind));
        OpenTxn { id, clock: self.clone() }
    }

    /// The age of the oldest open transaction of any kind, and of the oldest batch.
    pub(super) fn oldest(&self) -> (Option<Duration>, Option<Duration>) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let age = |f: &dyn Fn(TxnKind) -> bool| open.values().filter(|(_, k)| f(*k)).map(|(t, _)| t.elapsed()).max();
        (age(&|_| true), age(&|k| k == TxnKind::Batch))
    }
}

/// One open transaction on the clock; dropping it ends it there.
pub(super) struct OpenTxn {
    id: u64,
    clock: Arc<TxnClock>,
}

impl Drop for OpenTxn {
    fn drop(&mut self) {
        self.clock.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// A pooled connection that holds an open transaction. Dropped without being
/// marked clean, it is detached from the pool and closed (Postgres rolls back),
/// and any statement still running on it is cancelled: a connection holding
/// locks is never lent out again.
pub(super) struct Conn {
    obj: Option<deadpool_postgres::Object>,
    clean: AtomicBool,
    tls: MakeTlsConnector,
    open: Mutex<Option<OpenTxn>>,
}

impl Conn {
    pub(super) fn new(obj: deadpool_postgres::Object, tls: MakeTlsConnector, open: OpenTxn) -> Conn {
        Conn { obj: Some(obj), clean: AtomicBool::new(false), tls, open: Mutex::new(Some(open)) }
    }

    pub(super) fn client(&self) -> &deadpool_postgres::Object {
        // Invariant: `obj` is Some from construction until `Drop::drop`, the only
        // place that takes it; no method can run after that.
        self.obj.as_ref().expect("connection present until dropped")
    }

    /// The transaction ended (COMMIT, ROLLBACK or PREPARE): the connection may
    /// go back to the pool.
    pub(super) fn ended(&self) {
        self.clean.store(true, AtomicOrdering::Release);
        self.open.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(obj) = self.obj.take() else { return };
        if self.clean.load(AtomicOrdering::Acquire) {
            return; // back to the pool
        }
        let token = obj.cancel_token();
        drop(deadpool_postgres::Object::take(obj));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let tls = self.tls.clone();
            rt.spawn(async move {
                let _ = token.cancel_query(tls).await;
            });
        }
    }
}
