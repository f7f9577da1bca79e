//! The outbox's schema: the bundled migrations (`migrations/`), rendering them
//! for a configured table (`render.rs`), applying them (`migrate.rs`), and
//! verifying the live schema, one function per check (`verify.rs`).

mod migrate;
mod render;
mod verify;

pub(super) use migrate::migrate;
pub use render::render_migration;
pub(super) use verify::{shape, verify};

/// One numbered migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. The files are written for `public.outbox`.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_create_outbox.sql",
        sql: include_str!("../../../migrations/0001_create_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "0002_retry_backoff.sql",
        sql: include_str!("../../../migrations/0002_retry_backoff.sql"),
    },
    Migration {
        version: 3,
        name: "0003_no_notify_on_commit.sql",
        sql: include_str!("../../../migrations/0003_no_notify_on_commit.sql"),
    },
    Migration {
        version: 4,
        name: "0004_pending_key_index.sql",
        sql: include_str!("../../../migrations/0004_pending_key_index.sql"),
    },
    Migration {
        version: 5,
        name: "0005_partition_and_delay.sql",
        sql: include_str!("../../../migrations/0005_partition_and_delay.sql"),
    },
];

/// First line of a migration that must run outside a transaction.
const NO_TRANSACTION: &str = "-- outbox-relay: no-transaction";

/// Something the relay needs that the live schema lacks, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    pub message: String,
    /// Without it the relay cannot run (vs. works, but worse).
    pub fatal: bool,
}

impl std::fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::render::statements;
    use super::*;
    use crate::config::TableName;

    #[test]
    fn a_no_transaction_migration_splits_into_its_statements() {
        let t = TableName::parse("billing.events").unwrap();
        let sql = render_migration(MIGRATIONS[2].sql, &t);
        assert!(MIGRATIONS[2].sql.starts_with(NO_TRANSACTION));
        let st = statements(&sql);
        assert_eq!(st.len(), 3, "{st:?}");
        assert!(st[2].contains("CREATE INDEX CONCURRENTLY IF NOT EXISTS \"events_retry_due_idx\""), "{st:?}");
    }
}
