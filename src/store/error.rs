//! The store's one error type; the relay only asks it `is_transient()`.

use std::fmt;

/// A Postgres failure. Never contains the connection password.
#[derive(Debug)]
pub struct StoreError {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Db(tokio_postgres::Error),
    Pool(String, bool),
    Config(String),
    Schema(String),
}

impl StoreError {
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        StoreError { kind: Kind::Config(msg.into()) }
    }

    pub(crate) fn schema(msg: impl Into<String>) -> Self {
        StoreError { kind: Kind::Schema(msg.into()) }
    }

    /// Worth retrying as it is: the connection dropped, the server restarts, a
    /// lock conflict. Not transient: bad configuration, missing schema,
    /// permission denied — those need a person.
    pub fn is_transient(&self) -> bool {
        match &self.kind {
            Kind::Db(e) => match e.code() {
                None => true, // I/O, closed connection, timeout
                Some(code) => {
                    let c = code.code();
                    c.starts_with("08") // connection exception
                        || c.starts_with("40") // serialization failure, deadlock
                        || c.starts_with("53") // insufficient resources
                        || c.starts_with("57") // admin shutdown, cannot connect now
                        || c.starts_with("58") // system error
                        || c == "55P03" // lock not available
                        || c == "25P03" // idle in transaction timeout
                        || c == "57014" // statement timeout, cancel request
                }
            },
            Kind::Pool(_, transient) => *transient,
            Kind::Config(_) | Kind::Schema(_) => false,
        }
    }

    /// Cancelled by `statement_timeout` (or a cancel request).
    pub fn is_statement_timeout(&self) -> bool {
        self.code() == Some("57014")
    }

    /// The SQLSTATE, if the server sent one.
    pub fn code(&self) -> Option<&str> {
        match &self.kind {
            Kind::Db(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Db(e) => match e.as_db_error() {
                Some(db) => write!(f, "postgres: {} ({})", db.message(), db.code().code()),
                None => {
                    // tokio-postgres' Display for I/O errors is terse; include the cause.
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(e);
                    while let Some(s) = src {
                        msg.push_str(": ");
                        msg.push_str(&s.to_string());
                        src = s.source();
                    }
                    write!(f, "postgres: {msg}")
                }
            },
            Kind::Pool(msg, _) => write!(f, "postgres: {msg}"),
            Kind::Config(msg) => write!(f, "{msg}"),
            Kind::Schema(msg) => write!(f, "{msg}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError { kind: Kind::Db(e) }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError as P;
        match e {
            P::Backend(db) => db.into(),
            P::Timeout(t) => {
                StoreError { kind: Kind::Pool(format!("timed out waiting for a connection ({t:?})"), true) }
            }
            P::Closed => StoreError { kind: Kind::Pool("pool closed".into(), false) },
            P::NoRuntimeSpecified => StoreError { kind: Kind::Pool("no runtime".into(), false) },
            P::PostCreateHook(h) => StoreError { kind: Kind::Pool(format!("connection hook failed: {h}"), true) },
        }
    }
}
