//! The exactly-once id lease: one live relay per Kafka transactional id.
//!
//! A session-level advisory lock, held on a connection of its own for as long
//! as the relay runs. Two exactly-once relays with one `relay.id` would fence
//! each other's Kafka producers and resolve each other's prepared batches.
//!
//! The lease is kept, not just taken: a keeper checks its session every
//! [`LEASE_CHECK`]. When the session is gone (a Postgres restart or failover,
//! a network fault) the lease is [`LeaseState::Lost`] and the relay claims
//! nothing until the keeper has taken it again; if another relay took it
//! meanwhile, the lease is [`LeaseState::Taken`] and the relay stops.
//!
//! In the other direction, a holder that vanishes without closing its session
//! (a partitioned or frozen host) must not keep the lease for the kernel's
//! default two hours of TCP keepalive: the lease session asks the server to
//! probe it after 10 s idle, every 5 s, 3 times (`tcp_keepalives_*`), and to
//! give up on unacknowledged data after 30 s (`tcp_user_timeout`). The server
//! then ends the session and the lock is free: within [`LEASE_EXPIRY`].

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Store, StoreError};

/// How often the keeper checks its session.
pub const LEASE_CHECK: Duration = Duration::from_secs(2);

/// The longest a vanished holder keeps the lease: the server's keepalive
/// (10 s idle + 3 × 5 s) or its user timeout (30 s), plus a margin.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(45);

/// The server-side settings of the lease session (see the module docs).
const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
    ("statement_timeout", "5000"),
];

/// Where the lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// This relay holds it.
    Held,
    /// Its session is gone; the keeper is taking it again. Claim nothing.
    Lost,
    /// Another relay with this relay's id holds it now. Stop.
    Taken,
}

/// The lease and its keeper (stopped when dropped).
pub struct IdLease {
    state: watch::Receiver<LeaseState>,
    keeper: JoinHandle<()>,
}

impl Drop for IdLease {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl IdLease {
    /// Follows the lease's state.
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }
}

/// One session holding the lock.
struct Session {
    client: tokio_postgres::Client,
    driver: JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Store {
    /// Takes the lease on `transactional_id`, or `Ok(None)` when another live
    /// session holds it (another relay runs with the same `relay.id`).
    pub async fn lease_transactional_id(&self, transactional_id: &str) -> Result<Option<IdLease>, StoreError> {
        let Some(session) = self.lease_session(transactional_id).await? else { return Ok(None) };
        let (tx, state) = watch::channel(LeaseState::Held);
        let keeper = crate::telemetry::spawn(keep(self.clone(), transactional_id.to_string(), session, tx));
        Ok(Some(IdLease { state, keeper }))
    }

    async fn lease_session(&self, transactional_id: &str) -> Result<Option<Session>, StoreError> {
        let (client, conn) = self.pg_config().connect(self.tls().clone()).await?;
        let driver = crate::telemetry::spawn(async move {
            let _ = conn.await;
        });
        let session = Session { client, driver };
        for (name, value) in SESSION_SETTINGS {
            // tcp_user_timeout is Postgres 12+; the keepalives still bound the lease.
            if let Err(e) = session.client.execute("SELECT set_config($1, $2, false)", &[name, value]).await {
                tracing::debug!(setting = name, error = %e, "lease session setting not applied");
            }
        }
        let got: bool = session
            .client
            .query_one("SELECT pg_try_advisory_lock(hashtext('outbox-relay id ' || $1))", &[&transactional_id])
            .await?
            .get(0);
        Ok(got.then_some(session))
    }
}

/// The keeper: checks the session, takes the lease again when it is gone.
async fn keep(store: Store, txn_id: String, session: Session, state: watch::Sender<LeaseState>) {
    let mut session = Some(session);
    loop {
        tokio::time::sleep(LEASE_CHECK).await;
        match session.take() {
            Some(s) => {
                let alive = tokio::time::timeout(Duration::from_secs(5), s.client.simple_query("SELECT 1")).await;
                if matches!(alive, Ok(Ok(_))) {
                    session = Some(s);
                    continue;
                }
                let error = match alive {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer within 5 s".to_string(),
                };
                tracing::warn!(transactional_id = %txn_id, %error,
                    "the exactly-once id lease's session is gone; claiming nothing until the lease is taken again");
                state.send_replace(LeaseState::Lost);
            }
            None => match tokio::time::timeout(Duration::from_secs(10), store.lease_session(&txn_id)).await {
                Ok(Ok(Some(s))) => {
                    tracing::info!(transactional_id = %txn_id, "took the exactly-once id lease again");
                    session = Some(s);
                    state.send_replace(LeaseState::Held);
                }
                Ok(Ok(None)) => {
                    tracing::error!(transactional_id = %txn_id,
                        "another relay with this relay.id took the exactly-once id lease while this one had lost it; stopping");
                    state.send_replace(LeaseState::Taken);
                    return;
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot take the id lease again yet"),
                Err(_) => tracing::debug!("taking the id lease again timed out"),
            },
        }
    }
}
