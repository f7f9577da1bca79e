//! How long a relay that keeps up waits between claims: `relay.linger`, and
//! longer, up to `relay.max_linger`, while its database is busy.
//!
//! A relay keeping up with a steady stream claims a small batch each round,
//! and most of a round's cost is per round, not per event: the claim, the
//! delete or mark and the commit in Postgres, and one produce request per
//! partition in the relay and the broker. On a quiet database that cost is
//! cheap and the short wait keeps latency low. On a busy one every round's
//! statements queue for the CPU the application needs (issue #25: the
//! application committed 0.72 of its rate beside a relay lingering 5 ms and
//! 0.80 beside one lingering 40 ms, alternating runs on one host).
//!
//! The relay cannot see the database host's CPU, but it sees what contention
//! does to its own claims: they take longer than the quickest claim of about
//! as many rows did lately. So the wait grows with that slowdown:
//! [`PER_MS_SLOWER`] of wait per millisecond of the slowdown that a third of
//! the last [`RECENT`] claims reach, beyond [`QUIET_SPREAD_MS`]. A busy
//! database slows many claims; a shared, noisy host slows one now and then,
//! and a quiet database's claims spread a little around the quickest by
//! themselves. Taking a third of the latest claims ignores an isolated slow
//! claim (with a running mean, one claim delayed 4 ms by a neighbour lengthened
//! the next waits by up to 10 ms); the spread allowed for keeps the wait at
//! `relay.linger` on a quiet database (without it, at 1k ev/s on the test
//! host, the wait grew to ~12 ms and the at-least-once p99 read about twice
//! the fixed wait's: docs/performance.md, 2026-12-03).
//!
//! The quickest claim stands for the network's and the statement's own time, so
//! a database far away over the network does not by itself make the relay wait
//! longer; only a slowdown does (a network that spreads claims by more than
//! [`QUIET_SPREAD_MS`] by itself does lengthen it). Claims are compared with
//! claims of about as many rows (a power-of-two bucket), because a longer wait
//! makes fuller batches, whose claims take longer by themselves: compared with
//! small ones, that would read as a slowdown and lengthen the wait again, until
//! it reached the most even on a quiet database. A full batch is still followed
//! at once (the loops decide that), so a backlog drains at full speed whatever
//! the wait.

use std::time::{Duration, Instant};

/// Wait added per millisecond a claim takes beyond the quickest recent claim
/// of about as many rows and [`QUIET_SPREAD_MS`] (as a third of the latest
/// claims reach).
pub const PER_MS_SLOWER: u32 = 15;
/// How much slower than the quickest claim of its size a claim runs on a quiet
/// database by itself: the quickest is a minimum, and the claims around it
/// spread. Measured on the 2-core test host (docs/performance.md,
/// 2026-12-03): at 1k ev/s a third of claims ran 0.7 ms or more slower than
/// the quickest (one in a hundred 1.7 ms); beside 16 pgbench clients
/// saturating the host, each transaction carrying an event, a third ran
/// 5.5 ms or more slower. Growing on the quiet spread made the wait ~12 ms
/// instead of 5.
pub const QUIET_SPREAD_MS: f64 = 2.0;
/// The quickest claim of a size is the lowest of this window and the one
/// before it, so it follows a database that got slower for good (a new network
/// path, a larger table) within two windows.
const WINDOW: Duration = Duration::from_secs(10);
/// How many of the latest claims' slowdowns the wait follows: a few rounds'
/// worth, so the wait grows within ~5 slow claims of a database getting busy
/// and comes back down within ~10 quick ones.
const RECENT: usize = 15;
/// Size buckets: 1, 2-3, 4-7, … rows, the last one for everything larger.
const BUCKETS: usize = 16;

/// The quickest claim (ms) of one size bucket in the current window and the
/// previous one, and when the current one began.
#[derive(Debug, Clone, Copy)]
struct Quickest {
    current: f64,
    previous: f64,
    since: Option<Instant>,
}

impl Quickest {
    const NONE: Quickest = Quickest { current: f64::MAX, previous: f64::MAX, since: None };

    /// Records `ms` and returns the quickest of the two windows (`ms` itself
    /// the first time).
    fn observe(&mut self, ms: f64, now: Instant) -> f64 {
        *self = match self.since {
            Some(t) if now.duration_since(t) < WINDOW => Quickest { current: self.current.min(ms), ..*self },
            Some(_) => Quickest { current: ms, previous: self.current, since: Some(now) },
            None => Quickest { current: ms, previous: f64::MAX, since: Some(now) },
        };
        self.current.min(self.previous)
    }
}

#[derive(Debug, Clone)]
pub struct Linger {
    min: Duration,
    max: Duration,
    /// The latest claims' slowdowns (ms) against the quickest of their size,
    /// a ring of up to [`RECENT`], the newest at `next - 1`.
    slower_ms: [f64; RECENT],
    seen: usize,
    next: usize,
    quickest: [Quickest; BUCKETS],
}

impl Linger {
    /// Between `min` (`relay.linger`) and `max` (`relay.max_linger`; at or
    /// below `min` turns growth off).
    pub fn new(min: Duration, max: Duration) -> Linger {
        Linger {
            min,
            max: max.max(min),
            slower_ms: [0.0; RECENT],
            seen: 0,
            next: 0,
            quickest: [Quickest::NONE; BUCKETS],
        }
    }

    /// A claim's round trip (from sending it to reading its rows) and the rows
    /// it returned.
    pub fn observe(&mut self, took: Duration, rows: usize, now: Instant) {
        let ms = took.as_secs_f64() * 1000.0;
        let bucket = (usize::BITS - rows.max(1).leading_zeros() - 1).min(BUCKETS as u32 - 1) as usize;
        self.slower_ms[self.next] = ms - self.quickest[bucket].observe(ms, now);
        self.next = (self.next + 1) % RECENT;
        self.seen = (self.seen + 1).min(RECENT);
    }

    /// The slowdown that a third of the latest claims reach (ms; 0 before
    /// any): of the last [`RECENT`], the one two thirds up the sorted list.
    fn slower(&self) -> f64 {
        let mut recent = self.slower_ms;
        let recent = &mut recent[..self.seen];
        recent.sort_unstable_by(f64::total_cmp);
        recent.get(recent.len() * 2 / 3).copied().unwrap_or(0.0)
    }

    /// How long after a claim that found less than a full batch the next one
    /// starts.
    pub fn get(&self) -> Duration {
        let busy_ms = (self.slower() - QUIET_SPREAD_MS).max(0.0);
        let wait = self.min.as_secs_f64() + busy_ms * PER_MS_SLOWER as f64 / 1000.0;
        Duration::from_secs_f64(wait.min(self.max.as_secs_f64())).max(self.min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// `n` claims of `rows` rows taking `ms` each, 1 ms apart from `t`.
    fn claims(l: &mut Linger, t: Instant, from: u32, n: u32, ms: Duration, rows: usize) {
        for i in from..from + n {
            l.observe(ms, rows, t + i * MS);
        }
    }

    #[test]
    fn a_quiet_database_gets_the_shortest_wait() {
        let mut l = Linger::new(5 * MS, 50 * MS);
        assert_eq!(l.get(), 5 * MS, "before any claim");
        claims(&mut l, Instant::now(), 0, 50, MS, 10);
        assert_eq!(l.get(), 5 * MS);
    }

    #[test]
    fn a_far_away_database_alone_does_not_lengthen_the_wait() {
        let mut l = Linger::new(5 * MS, 50 * MS);
        claims(&mut l, Instant::now(), 0, 50, 20 * MS, 10);
        assert_eq!(l.get(), 5 * MS);
    }

    #[test]
    fn claims_slowed_by_a_busy_database_lengthen_it_up_to_the_most() {
        let mut l = Linger::new(5 * MS, 50 * MS);
        let t = Instant::now();
        claims(&mut l, t, 0, 1, MS, 20);
        claims(&mut l, t, 1, 40, 5 * MS, 20);
        // 4 ms slower than the quickest claim of that size, 2 ms beyond a
        // quiet database's spread: 5 + 2 × 15 = 35 ms
        let w = l.get();
        assert!(w > 34 * MS && w < 36 * MS, "{w:?}");
        claims(&mut l, t, 41, 40, 30 * MS, 20);
        assert_eq!(l.get(), 50 * MS);
    }

    /// A shared host delays a claim now and then; that is not a busy
    /// database, and must not lengthen the wait (with a running mean it did,
    /// by up to 10 ms after each such claim).
    #[test]
    fn a_claim_slowed_now_and_then_does_not_lengthen_it() {
        let mut l = Linger::new(5 * MS, 50 * MS);
        let t = Instant::now();
        for i in 0..60 {
            let ms = if i % 4 == 3 { 5 * MS } else { MS };
            l.observe(ms, 10, t + i * MS);
            assert_eq!(l.get(), 5 * MS, "after claim {i}");
        }
    }

    /// Claims on a quiet database spread around the quickest one: at 1k ev/s
    /// on the test host a third ran 0.7 ms slower than it, one in a hundred
    /// 1.7 ms. That spread is not a busy database, and must not lengthen the
    /// wait (growing on it, the wait was 12 ms instead of 5).
    #[test]
    fn a_quiet_database_s_own_spread_does_not_lengthen_it() {
        let mut l = Linger::new(5 * MS, 50 * MS);
        let t = Instant::now();
        let spread_us = [0, 200, 400, 500, 600, 700, 800, 1000, 1200, 1700];
        for i in 0..100u32 {
            let ms = MS + Duration::from_micros(spread_us[(i as usize * 7) % spread_us.len()]);
            l.observe(ms, 40, t + i * MS);
            assert_eq!(l.get(), 5 * MS, "after claim {i}");
        }
    }

    /// A longer wait makes fuller batches, whose claims take longer by
    /// themselves: that is not a busy database, and must not feed the wait.
    #[test]
    fn fuller_batches_claims_taking_longer_do_not_lengthen_it() {
        let mut l = Linger::new(5 * MS, 50 * MS);
        let t = Instant::now();
        claims(&mut l, t, 0, 20, MS, 5);
        claims(&mut l, t, 20, 20, 3 * MS, 60);
        claims(&mut l, t, 40, 20, 8 * MS, 400);
        assert_eq!(l.get(), 5 * MS);
    }

    #[test]
    fn the_wait_comes_back_down_when_the_database_does() {
        let mut l = Linger::new(5 * MS, 50 * MS);
        let t = Instant::now();
        claims(&mut l, t, 0, 1, MS, 20);
        claims(&mut l, t, 1, 20, 10 * MS, 20);
        assert_eq!(l.get(), 50 * MS);
        claims(&mut l, t, 21, 40, MS, 20);
        assert!(l.get() < 5 * MS + MS / 10, "{:?}", l.get());
    }

    #[test]
    fn the_quickest_claim_is_forgotten_after_two_windows() {
        let mut l = Linger::new(5 * MS, 500 * MS);
        let t = Instant::now();
        l.observe(MS, 20, t);
        // The database got slower for good: 4 ms a claim from now on.
        for i in 1..=60 {
            l.observe(4 * MS, 20, t + i * Duration::from_secs(1));
        }
        assert!(l.get() < 5 * MS + MS / 10, "{l:?}");
    }

    #[test]
    fn max_at_or_below_min_turns_growth_off() {
        let mut l = Linger::new(5 * MS, 5 * MS);
        let t = Instant::now();
        l.observe(MS, 20, t);
        l.observe(30 * MS, 20, t + MS);
        assert_eq!(l.get(), 5 * MS);
        assert_eq!(Linger::new(5 * MS, MS).get(), 5 * MS, "a max below the min is the min");
    }
}
