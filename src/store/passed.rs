//! Past this relay's own batches in flight: where the next claim's main scan
//! starts while the previous batches are still held (pipelining, `own`).
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
//!
//! With a deeper pipeline (`relay.pipeline_depth` 3), N+2 is claimed while N
//! and N+1 are both in flight. N+1's main scan started right after N's last
//! row, so together they passed one range, from where N's scan started to
//! N+1's last row: N+2 starts after it. The ranges chain only while every
//! batch that passed them is still in flight (`own` is exactly those
//! batches, oldest first) and the ranges meet.

use uuid::Uuid;

/// The most claims whose ranges chain: the deepest pipeline.
const LINKS: usize = 3;

/// What one claim's main scan passed, and which batch it made.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Link {
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

impl Link {
    /// `from`: where the main scan started; `to`: its last row (`None`: it took
    /// none); `first` and `count`: the batch's first event (`None`: nothing to
    /// publish) and how many, as the relay will hold them.
    pub(super) fn new(from: i64, to: Option<i64>, generation: u64, first: Option<Uuid>, count: usize) -> Option<Link> {
        Some(Link { from, to: to?, generation, first: first?, count })
    }
}

/// The ranges the last claims passed, oldest first.
#[derive(Debug, Default)]
pub(super) struct Passed {
    links: Vec<Link>,
}

impl Passed {
    /// Records the latest claim (`None`: it made no batch, which breaks the chain).
    pub(super) fn record(&mut self, link: Option<Link>) {
        match link {
            Some(l) => {
                if self.links.last().is_some_and(|last| last.generation != l.generation) {
                    self.links.clear();
                }
                self.links.push(l);
                if self.links.len() > LINKS {
                    self.links.remove(0);
                }
            }
            None => self.links.clear(),
        }
    }

    /// Where the next main scan starts: after the range the batches in `own`
    /// passed (the relay still holds them, oldest first) when they are the
    /// latest claims, the floor's generation has not changed, and the scan
    /// would start within that range; else `start`.
    pub(super) fn start(&self, start: i64, generation: u64, own: &[Uuid]) -> i64 {
        let Some(held) = self.held(own) else { return start };
        let last = &held[held.len() - 1];
        if last.generation != generation {
            return start;
        }
        let (mut from, mut to) = (last.from, last.to);
        for l in held.iter().rev().skip(1) {
            if l.to + 1 < from || l.from > to {
                break; // a gap: what lies in it was not passed
            }
            (from, to) = (from.min(l.from), to.max(l.to));
        }
        if (from..=to).contains(&start) {
            to + 1
        } else {
            start
        }
    }

    /// The latest links whose batches are exactly `own`, in order.
    fn held(&self, own: &[Uuid]) -> Option<&[Link]> {
        (0..self.links.len()).map(|i| &self.links[i..]).find(|links| {
            let mut at = 0;
            for l in *links {
                if own.get(at) != Some(&l.first) {
                    return false;
                }
                at += l.count;
            }
            at == own.len()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(from: u128, n: u128) -> Vec<Uuid> {
        (from..from + n).map(Uuid::from_u128).collect()
    }

    fn link(from: i64, to: i64, generation: u64, batch: &[Uuid]) -> Option<Link> {
        Link::new(from, Some(to), generation, batch.first().copied(), batch.len())
    }

    fn chain(links: &[Option<Link>]) -> Passed {
        let mut p = Passed::default();
        for l in links {
            p.record(l.clone());
        }
        p
    }

    #[test]
    fn the_next_scan_starts_after_the_batch_in_flight() {
        let own = ids(1, 500);
        let p = chain(&[link(100, 650, 3, &own)]);
        assert_eq!(p.start(100, 3, &own), 651);
        assert_eq!(p.start(300, 3, &own), 651, "a start within what it passed");
    }

    #[test]
    fn otherwise_it_starts_where_it_would() {
        let own = ids(1, 500);
        let p = chain(&[link(100, 650, 3, &own)]);
        assert_eq!(p.start(100, 3, &[]), 100, "nothing in flight (finished, given back)");
        assert_eq!(p.start(100, 3, &ids(1, 499)), 100, "another batch in flight");
        assert_eq!(p.start(100, 4, &own), 100, "the floor was lowered or reset");
        assert_eq!(p.start(99, 3, &own), 99, "below what it passed (a row given back)");
        assert_eq!(p.start(651, 3, &own), 651, "already above it");
        assert_eq!(Passed::default().start(100, 3, &own), 100);
        assert_eq!(Link::new(100, None, 3, own.first().copied(), own.len()), None, "the main scan took nothing");
        assert_eq!(Link::new(100, Some(650), 3, None, 0), None, "nothing to publish");
        let broken = chain(&[link(100, 650, 3, &own), None]);
        assert_eq!(broken.start(100, 3, &own), 100, "a claim that made no batch breaks the chain");
    }

    #[test]
    fn two_batches_in_flight_chain_their_ranges() {
        let (n, n1) = (ids(1, 500), ids(1001, 500));
        let both: Vec<Uuid> = n.iter().chain(&n1).copied().collect();
        let p = chain(&[link(100, 650, 3, &n), link(651, 1200, 3, &n1)]);
        assert_eq!(p.start(100, 3, &both), 1201, "N+2 starts after N+1, from where N started");
        assert_eq!(p.start(700, 3, &n1), 1201, "N finished: from within N+1's range");
        assert_eq!(p.start(100, 3, &n1), 100, "N finished: N's range says nothing any more");
        let reversed: Vec<Uuid> = n1.iter().chain(&n).copied().collect();
        assert_eq!(p.start(100, 3, &reversed), 100, "not the batches, in order, that passed them");
        let gap = chain(&[link(100, 650, 3, &n), link(700, 1200, 3, &n1)]);
        assert_eq!(gap.start(100, 3, &both), 100, "rows 651-699 were not passed");
        assert_eq!(gap.start(800, 3, &both), 1201);
        let regenerated = chain(&[link(100, 650, 3, &n), link(651, 1200, 4, &n1)]);
        assert_eq!(regenerated.start(100, 4, &both), 100, "N's range is from before the floor changed");
        assert_eq!(regenerated.start(651, 4, &n1), 1201);
    }

    #[test]
    fn the_chain_keeps_the_deepest_pipeline_only() {
        let batches: Vec<Vec<Uuid>> = (0..5).map(|i| ids(1000 * i + 1, 10)).collect();
        let links: Vec<Option<Link>> =
            batches.iter().enumerate().map(|(i, b)| link(10 * i as i64, 10 * i as i64 + 9, 1, b)).collect();
        let p = chain(&links);
        assert_eq!(p.links.len(), LINKS);
        let last_two: Vec<Uuid> = batches[3].iter().chain(&batches[4]).copied().collect();
        assert_eq!(p.start(30, 1, &last_two), 50);
    }
}
