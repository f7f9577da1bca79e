//! What the live table offers the relay beyond migration 0003: the pending key
//! index (0004), the `deliver_after` and `partition` columns and the ready
//! index (0005). Looked up at the first claim and again by every schema check;
//! the claim's SQL is built for it, in the words that pin each lookup to its
//! index (see claim_sql.rs).

/// The table's optional parts, as the relay found them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Migration 0004's `(key, seq)` index over pending rows, valid.
    pub key_index: bool,
    /// The `deliver_after` column (0005): rows with it set wait for their time.
    pub delay: bool,
    /// The `partition` column (0005).
    pub partition: bool,
    /// 0005's ready index, valid: `(seq)` over rows pending now, delayed ones
    /// left out.
    pub ready_index: bool,
}

impl Shape {
    /// Rows that may go now: pending, not waiting for a retry or for their
    /// time. `a` is the table's alias with its dot, or "".
    ///
    /// With the ready index, in its words (only it then serves the scans in
    /// `seq` order, and delayed rows cost nothing); without it, in the pending
    /// index's words, delayed rows filtered out as they are read.
    pub(crate) fn ready(&self, a: &str) -> String {
        if self.delay && self.ready_index {
            format!(
                "{a}deliver_after IS NULL AND {a}retry_at IS NULL AND coalesce({a}published_at, {a}parked_at) IS NULL"
            )
        } else if self.delay {
            format!(
                "{a}published_at IS NULL AND {a}parked_at IS NULL AND {a}retry_at IS NULL AND {a}deliver_after IS NULL"
            )
        } else {
            format!("{a}published_at IS NULL AND {a}parked_at IS NULL AND {a}retry_at IS NULL")
        }
    }

    /// Delayed rows, in the words of 0005's two delayed indexes (pending, not
    /// waiting for a retry, `deliver_after` set, whether or not its time has
    /// come). `None` without the column.
    pub(crate) fn delayed(&self, a: &str) -> Option<String> {
        self.delay.then(|| {
            format!(
                "{a}deliver_after IS NOT NULL AND {a}retry_at IS NULL AND coalesce({a}published_at, {a}parked_at) IS NULL"
            )
        })
    }

    /// The claim's `partition` column.
    pub(crate) fn partition_column(&self) -> &'static str {
        if self.partition {
            "o.\"partition\""
        } else {
            "NULL::int4"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_0005_ready_rows_are_the_pending_index_words_without_retries() {
        let s = Shape::default();
        assert_eq!(s.ready("o."), "o.published_at IS NULL AND o.parked_at IS NULL AND o.retry_at IS NULL");
        assert_eq!(s.delayed("o."), None);
        assert_eq!(s.partition_column(), "NULL::int4");
    }

    #[test]
    fn with_0005_delayed_rows_are_never_ready() {
        let mid_migration = Shape { delay: true, partition: true, ..Shape::default() };
        assert!(mid_migration.ready("").ends_with("AND deliver_after IS NULL"));
        let full = Shape { ready_index: true, ..mid_migration };
        assert!(full.ready("").starts_with("deliver_after IS NULL AND retry_at IS NULL AND coalesce("));
        assert!(full.delayed("d.").is_some_and(|d| d.starts_with("d.deliver_after IS NOT NULL")));
        assert_eq!(full.partition_column(), "o.\"partition\"");
    }
}
