//! Past this relay's own batch in flight: where the next claim's main scan
//! starts while the previous batch is still held (pipelining, `own`).
//!
//! A relay that pipelines claims batch N+1 while N, claimed just before, waits
//! for Kafka. N's rows are still pending and locked, so N+1's main scan, from
//! the floor, used to step over every one of them (`SKIP LOCKED`: a heap
//! fetch and a lock test per row, about a quarter of a 500-row claim on
//! 2026-12-02). Everything N's main scan passed, from where it started to its
//! last row, it either took or passed for a reason: locked by another relay,
//! not committed yet, waiting for a retry or its time (the claim reads those
//! through their own indexes), or of a key left out. So N+1's main scan may
//! start right after N's last row when it would have started within that
//! range.
//!
//! Only the *main* scan starts there. The per-key order check (the fence)
//! still reads every key of the batch from the floor, so a row the jump passes
//! (another relay gave it back, it committed late, its key was let back in)
//! can delay an event of its key but never let a later one go first; and the
//! claim after, with N finished and the floor at that row, starts from the
//! floor again and takes it.

use uuid::Uuid;

/// What one claim's main scan passed, and which batch it made.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Passed {
    /// Where its main scan started.
    from: i64,
    /// The last `seq` its main scan took.
    to: i64,
    /// The floor's generation then (a lowered or reset floor invalidates it).
    generation: u64,
    /// The batch's first event and its count, to know it when it is `own`.
    first: Uuid,
    count: usize,
}

impl Passed {
    /// `from`: where the main scan started; `to`: its last row (`None`: it took
    /// none); `first` and `count`: the batch's first event (`None`: nothing to
    /// publish) and how many, as the relay will hold them.
    pub(super) fn new(
        from: i64,
        to: Option<i64>,
        generation: u64,
        first: Option<Uuid>,
        count: usize,
    ) -> Option<Passed> {
        Some(Passed { from, to: to?, generation, first: first?, count })
    }

    /// Where the next main scan starts: after `to` when `own` (the batch the
    /// relay still holds) is this one, the floor's generation has not changed,
    /// and the scan would start within what this one passed; else `start`.
    pub(super) fn start(this: Option<&Passed>, start: i64, generation: u64, own: &[Uuid]) -> i64 {
        match this {
            Some(p)
                if p.generation == generation
                    && own.len() == p.count
                    && own.first() == Some(&p.first)
                    && (p.from..=p.to).contains(&start) =>
            {
                p.to + 1
            }
            _ => start,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    #[test]
    fn the_next_scan_starts_after_the_batch_in_flight() {
        let own = ids(500);
        let p = Passed::new(100, Some(650), 3, own.first().copied(), own.len());
        assert_eq!(Passed::start(p.as_ref(), 100, 3, &own), 651);
        assert_eq!(Passed::start(p.as_ref(), 300, 3, &own), 651, "a start within what it passed");
    }

    #[test]
    fn otherwise_it_starts_where_it_would() {
        let own = ids(500);
        let p = Passed::new(100, Some(650), 3, own.first().copied(), own.len());
        assert_eq!(Passed::start(p.as_ref(), 100, 3, &[]), 100, "nothing in flight (finished, given back)");
        assert_eq!(Passed::start(p.as_ref(), 100, 3, &ids(499)), 100, "another batch in flight");
        assert_eq!(Passed::start(p.as_ref(), 100, 4, &own), 100, "the floor was lowered or reset");
        assert_eq!(Passed::start(p.as_ref(), 99, 3, &own), 99, "below what it passed (a row given back)");
        assert_eq!(Passed::start(p.as_ref(), 651, 3, &own), 651, "already above it");
        assert_eq!(Passed::start(None, 100, 3, &own), 100);
        assert_eq!(Passed::new(100, None, 3, own.first().copied(), own.len()), None, "the main scan took nothing");
        assert_eq!(Passed::new(100, Some(650), 3, None, 0), None, "nothing to publish");
    }
}
