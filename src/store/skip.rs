//! Past a hot key another relay holds: where this relay's main scan may start
//! above its floor.
//!
//! The floor (`floor.rs`) is the lowest pending `seq`, held by anyone. When
//! another relay holds the head of a hot key with a long backlog, that head is
//! the floor, and every row of the backlog lies above it. This relay leaves the
//! key out of its claims for a moment (`claim.rs`, blocked keys), but a scan in
//! `seq` order that leaves a key out still has to read past each of its rows:
//! claim after claim, the whole backlog (#21 item 5).
//!
//! So a claim that leaves keys out remembers how far its scan got: the **skip**.
//! Every row pending below it, at the time of that scan, was of a key left out,
//! held by a relay (locked), waiting for a retry (the claim reads those through
//! their own index), or not committed yet: the skip never passes `visible`
//! (every row below `visible` was committed, or will never exist). The next
//! claim's main scan starts at `max(floor, skip)` for as long as that stays
//! true:
//!
//! * every key it left out is still left out (a key let back in may have rows
//!   below the skip);
//! * the floor was not lowered or reset (a replay, a sweep's find, a sequence
//!   that went backwards);
//! * rows this relay gives back (a released batch, a retry without back-off,
//!   a batch that failed or was rolled back prepared) lower it to the lowest
//!   of them;
//! * a row its own claim deferred below it (an earlier event of its key is
//!   held elsewhere) adds that key to the keys it needs left out;
//! * [`RESCAN`] (60 s) has not passed: a row another relay held and gave back
//!   and does not claim again itself (it died and nothing replaces it) is
//!   seen within it.
//!
//! The skip only decides where the *main* scan starts. The per-key order check
//! (the fence) still reads every key of the batch from the floor, so a row the
//! skip passes can delay an event but never let a later one of its key go first.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long a key whose earlier event another relay holds is first left out
/// of this relay's claims: the other relay publishes it (and, pipelining, what
/// follows).
const LEFT_OUT_FIRST: Duration = Duration::from_millis(500);
/// Found held again as soon as it was let back in, a key is left out twice as
/// long each time, up to this. (Letting it back in costs a claim of a batch of
/// its rows, locked and given back: every 500 ms, that was most of what a
/// relay spent on a hot key another relay works through.)
const LEFT_OUT_LONGEST: Duration = Duration::from_secs(4);
/// At most this many keys are left out at once.
const LEFT_OUT_MAX: usize = 10_000;

/// The keys left out of this relay's claims, and for how long.
#[derive(Debug, Default)]
pub(super) struct LeftOut {
    keys: HashMap<String, (Instant, Duration)>,
}

impl LeftOut {
    /// Leaves `keys` out from `now`: for [`LEFT_OUT_FIRST`], or twice as long
    /// as last time when the key's last period ended less than a period ago.
    pub(super) fn add(&mut self, keys: Vec<String>, now: Instant) {
        self.forget(now);
        for k in keys {
            let period = match self.keys.get(&k) {
                Some(&(until, period)) if until <= now => (period * 2).min(LEFT_OUT_LONGEST),
                Some(&(_, period)) => period,
                None if self.keys.len() >= LEFT_OUT_MAX => continue,
                None => LEFT_OUT_FIRST,
            };
            self.keys.insert(k, (now + period, period));
        }
    }

    /// The keys left out at `now`.
    pub(super) fn current(&mut self, now: Instant) -> Vec<String> {
        self.forget(now);
        self.keys.iter().filter(|(_, (until, _))| *until > now).map(|(k, _)| k.clone()).collect()
    }

    /// A key is remembered for one more period after it is let back in.
    fn forget(&mut self, now: Instant) {
        self.keys.retain(|_, (until, period)| *until + *period > now);
    }
}

/// How long a skip is trusted at most: the bound on how long a row another
/// relay gave back below it waits for this relay, when that relay does not
/// claim it again itself (it died and nothing replaces it). The same bound as
/// the default `relay.sweep_interval`, the safety net for rows below the floor;
/// each rescan reads the held key's backlog once.
pub(super) const RESCAN: Duration = Duration::from_secs(60);

/// What a skip was established under, and where it is.
#[derive(Debug, Clone)]
pub(super) struct Skip {
    at: i64,
    keys: HashSet<String>,
    lowerings: u64,
    since: Instant,
}

/// What a claim knew when it started: the inputs of [`Skip::start`] and
/// [`Skip::after_scan`].
#[derive(Debug, Clone)]
pub(super) struct ScanContext {
    pub(super) floor: i64,
    pub(super) visible: i64,
    pub(super) blocked: Vec<String>,
    pub(super) lowerings: u64,
}

/// What the main scan returned.
#[derive(Debug, Clone, Copy)]
pub(super) struct MainScan {
    /// Rows the main scan was allowed (its limit after the retries due).
    pub(super) limit: i64,
    /// Rows it returned.
    pub(super) rows: i64,
    /// The lowest `seq` it returned.
    pub(super) first: Option<i64>,
}

impl Skip {
    fn valid(&self, cx: &ScanContext) -> bool {
        self.lowerings == cx.lowerings
            && self.since.elapsed() < RESCAN
            && self.keys.iter().all(|k| cx.blocked.contains(k))
    }

    /// Rows from `seq` on were given back: pending again, held by nobody.
    pub(super) fn lower(&mut self, seq: i64) {
        self.at = self.at.min(seq);
    }

    /// This relay's claim deferred a row of `key` at `seq` (it released it):
    /// below the skip, it may be passed only while `key` is left out.
    pub(super) fn deferred(&mut self, seq: i64, key: &str) {
        if seq < self.at {
            self.keys.insert(key.to_string());
        }
    }

    /// Where the main scan starts: the floor, or the skip above it when it
    /// still holds.
    pub(super) fn start(skip: Option<&Skip>, cx: &ScanContext) -> i64 {
        match skip {
            Some(s) if s.valid(cx) => s.at.max(cx.floor),
            _ => cx.floor,
        }
    }

    /// The skip after a main scan that started at `start`. A scan that left
    /// no key out keeps the one before as it is: it stays right for when its
    /// keys are left out again (another relay still holds them, this relay
    /// just looked), and [`Skip::start`] checks it each time.
    pub(super) fn after_scan(prev: Option<Skip>, cx: &ScanContext, start: i64, main: MainScan) -> Option<Skip> {
        if cx.blocked.is_empty() {
            return prev;
        }
        let prev = prev.filter(|s| s.valid(cx));
        let at = if main.rows < main.limit {
            // Read to the end: every pending row from `start` on, committed
            // when the scan ran, was left out or held.
            cx.visible
        } else if let Some(first) = main.first {
            first.min(cx.visible)
        } else {
            // Allowed no rows (the retries due filled the batch): it read nothing.
            return prev;
        };
        if at <= cx.floor.max(start) && prev.is_some() {
            return prev;
        }
        Some(Skip {
            at,
            keys: cx.blocked.iter().cloned().collect(),
            lowerings: cx.lowerings,
            // A skip that goes on from a trusted one is only as fresh as it.
            since: prev.map_or_else(Instant::now, |p| p.since),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(floor: i64, visible: i64, blocked: &[&str]) -> ScanContext {
        ScanContext { floor, visible, blocked: blocked.iter().map(|s| s.to_string()).collect(), lowerings: 0 }
    }

    fn full(first: i64) -> MainScan {
        MainScan { limit: 100, rows: 100, first: Some(first) }
    }

    #[test]
    fn a_key_found_held_again_at_once_is_left_out_longer_each_time_and_forgotten_later() {
        let mut l = LeftOut::default();
        let mut t = Instant::now();
        let ms = Duration::from_millis;
        // Found held again 10 ms after each period ends: 0.5, 1, 2, 4, 4 s.
        for period in [500, 1000, 2000, 4000, 4000] {
            l.add(vec!["hot".into()], t);
            assert_eq!(l.current(t + ms(period - 10)), vec!["hot".to_string()], "{period} ms");
            assert!(l.current(t + ms(period + 10)).is_empty(), "let back in after {period} ms");
            t += ms(period + 10);
        }
        // Not found held for longer than a period: back to the first period.
        let later = t + Duration::from_secs(10);
        l.add(vec!["hot".into()], later);
        assert!(l.current(later + ms(510)).is_empty());
    }

    #[test]
    fn a_scan_past_a_left_out_key_starts_the_next_claim_where_it_found_rows() {
        let c = cx(10, 50_000, &["hot"]);
        let s = Skip::after_scan(None, &c, 10, full(20_011)).unwrap();
        assert_eq!(Skip::start(Some(&s), &c), 20_011);
        // Found nothing at all: everything committed up to `visible` was looked at.
        let s = Skip::after_scan(None, &c, 10, MainScan { limit: 100, rows: 0, first: None }).unwrap();
        assert_eq!(Skip::start(Some(&s), &c), 50_000);
    }

    #[test]
    fn the_skip_never_passes_rows_that_may_still_commit() {
        let c = cx(10, 15_000, &["hot"]);
        let s = Skip::after_scan(None, &c, 10, full(20_011)).unwrap();
        assert_eq!(Skip::start(Some(&s), &c), 15_000);
    }

    #[test]
    fn no_key_left_out_means_no_skip_and_keeps_the_one_for_when_they_are_again() {
        let none = cx(10, 50_000, &[]);
        assert!(Skip::after_scan(None, &none, 10, full(20_011)).is_none());
        let hot = cx(10, 50_000, &["hot"]);
        let s = Skip::after_scan(None, &hot, 10, full(20_011));
        // The key's block ran out: one claim from the floor, then it is left out again.
        let s = Skip::after_scan(s, &none, 10, full(101));
        assert_eq!(Skip::start(s.as_ref(), &none), 10);
        assert_eq!(Skip::start(s.as_ref(), &hot), 20_011);
    }

    #[test]
    fn the_skip_ends_or_drops_when_a_key_is_let_back_in_the_floor_is_lowered_or_rows_come_back() {
        let c = cx(10, 50_000, &["hot"]);
        let s = Skip::after_scan(None, &c, 10, full(20_011)).unwrap();
        assert_eq!(Skip::start(Some(&s), &cx(10, 50_000, &["hot", "other"])), 20_011, "more keys left out");
        assert_eq!(Skip::start(Some(&s), &cx(10, 50_000, &["other"])), 10, "hot let back in");
        assert_eq!(Skip::start(Some(&s), &ScanContext { lowerings: 1, ..c.clone() }), 10, "replay");
        let mut lowered = s.clone();
        lowered.lower(15_000);
        assert_eq!(Skip::start(Some(&lowered), &c), 15_000, "gave rows back from 15000 on");
        let mut deferred = s.clone();
        deferred.deferred(12_000, "k");
        deferred.deferred(30_000, "later");
        assert_eq!(Skip::start(Some(&deferred), &c), 10, "k is not left out: its row below the skip may go");
        assert_eq!(Skip::start(Some(&deferred), &cx(10, 50_000, &["hot", "k"])), 20_011);
        let old = Skip { since: Instant::now() - RESCAN, ..s };
        assert_eq!(Skip::start(Some(&old), &c), 10, "too old");
    }

    #[test]
    fn a_batch_filled_by_retries_keeps_the_skip() {
        let c = cx(10, 50_000, &["hot"]);
        let s = Skip::after_scan(None, &c, 10, full(20_011));
        let kept = Skip::after_scan(s, &c, 20_011, MainScan { limit: 0, rows: 0, first: None }).unwrap();
        assert_eq!(Skip::start(Some(&kept), &c), 20_011);
    }
}
