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
//! So a claim that leaves keys out also looks where the next row it could
//! take is: the lowest pending `seq` from where its scan started that is not of
//! a key it left out and not waiting for a retry, *held by anyone or not* (the
//! claim's probe, in its transaction). That, but never above `visible` (every
//! row below `visible` is committed, or will never exist), is the **skip**:
//! every pending row below it is of a key left out, waits for a retry (the
//! claim reads those through their own index), or will never exist. A row
//! another relay holds is never passed, so a batch it gives back (it failed,
//! the relay died, it was rolled back prepared) is seen at once; nor is a row of
//! this relay's own batches. The next claim's main scan starts at
//! `max(floor, skip)` while:
//!
//! * every key it left out is still left out (a key let back in has rows below
//!   the skip);
//! * the floor was not lowered or reset since (a replay, a sweep's find, a
//!   sequence that went backwards);
//! * [`RESCAN`] (60 s) has not passed: a safety net, like the sweep below the
//!   floor, for a row made pending again some other way.
//!
//! The skip only decides where the *main* scan starts. The per-key order check
//! (the fence) still reads every key of the batch from the floor, so a row the
//! skip passes can delay an event but never let a later one of its key go first.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long a key whose earlier event another relay holds is left out of this
/// relay's claims: the other relay publishes it (and, pipelining, what
/// follows). Not longer, and not growing while the key stays held: when the
/// holder lets go, every relay that left the key out waits this long before it
/// may take it over (a longer, growing period measured slower hot-key drains
/// with three relays, 14 s instead of 1 s for 10k events, as relays that had
/// collided on the key each waited it out).
const LEFT_OUT_FOR: Duration = Duration::from_millis(500);
/// At most this many keys are left out at once.
const LEFT_OUT_MAX: usize = 10_000;

/// The keys left out of this relay's claims, and until when.
#[derive(Debug, Default)]
pub(super) struct LeftOut {
    keys: HashMap<String, Instant>,
}

impl LeftOut {
    /// Leaves `keys` out from `now` for [`LEFT_OUT_FOR`].
    pub(super) fn add(&mut self, keys: Vec<String>, now: Instant) {
        self.keys.retain(|_, until| *until > now);
        for k in keys {
            if self.keys.len() >= LEFT_OUT_MAX && !self.keys.contains_key(&k) {
                continue;
            }
            self.keys.insert(k, now + LEFT_OUT_FOR);
        }
    }

    /// Lets every key back in (a batch that held them was resolved here).
    pub(super) fn clear(&mut self) {
        self.keys.clear();
    }

    /// The keys left out at `now`.
    pub(super) fn current(&mut self, now: Instant) -> Vec<String> {
        self.keys.retain(|_, until| *until > now);
        self.keys.keys().cloned().collect()
    }
}

/// How long a skip is trusted at most (a safety net: see the module's docs).
/// Each rescan reads a held key's backlog once.
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
/// [`Skip::after_claim`].
#[derive(Debug, Clone)]
pub(super) struct ScanContext {
    pub(super) floor: i64,
    pub(super) visible: i64,
    pub(super) blocked: Vec<String>,
    pub(super) lowerings: u64,
}

impl Skip {
    fn valid(&self, cx: &ScanContext) -> bool {
        self.lowerings == cx.lowerings
            && self.since.elapsed() < RESCAN
            && self.keys.iter().all(|k| cx.blocked.contains(k))
    }

    /// Where the main scan starts: the floor, or the skip above it when it
    /// still holds.
    pub(super) fn start(skip: Option<&Skip>, cx: &ScanContext) -> i64 {
        match skip {
            Some(s) if s.valid(cx) => s.at.max(cx.floor),
            _ => cx.floor,
        }
    }

    /// The skip after a claim that left `cx.blocked` out, scanned from
    /// `start`, and whose probe found `next`: the lowest pending, not waiting
    /// `seq` from `start` on whose key was not left out, held by anyone.
    ///
    /// A claim that left no key out keeps the skip before as it is: it stays
    /// right for when its keys are left out again (another relay still holds
    /// them, this relay just looked), and [`Skip::start`] checks it each time.
    pub(super) fn after_claim(prev: Option<Skip>, cx: &ScanContext, next: Option<i64>) -> Option<Skip> {
        if cx.blocked.is_empty() {
            return prev;
        }
        let prev = prev.filter(|s| s.valid(cx));
        Some(Skip {
            at: next.map_or(cx.visible, |n| n.min(cx.visible)),
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

    #[test]
    fn a_key_is_left_out_for_half_a_second_and_let_back_in_when_cleared() {
        let mut l = LeftOut::default();
        let t = Instant::now();
        l.add(vec!["hot".into()], t);
        assert_eq!(l.current(t + Duration::from_millis(490)), vec!["hot".to_string()]);
        assert!(l.current(t + Duration::from_millis(510)).is_empty());
        l.add(vec!["hot".into()], t);
        l.clear();
        assert!(l.current(t).is_empty());
    }

    #[test]
    fn a_claim_that_leaves_a_key_out_starts_the_next_at_the_next_row_it_could_take() {
        let c = cx(10, 50_000, &["hot"]);
        let s = Skip::after_claim(None, &c, Some(20_011)).unwrap();
        assert_eq!(Skip::start(Some(&s), &c), 20_011);
        // Nothing but left-out rows: everything committed up to `visible` was looked at.
        let s = Skip::after_claim(None, &c, None).unwrap();
        assert_eq!(Skip::start(Some(&s), &c), 50_000);
    }

    #[test]
    fn the_skip_never_passes_rows_that_may_still_commit() {
        let c = cx(10, 15_000, &["hot"]);
        let s = Skip::after_claim(None, &c, Some(20_011)).unwrap();
        assert_eq!(Skip::start(Some(&s), &c), 15_000);
    }

    #[test]
    fn no_key_left_out_means_no_skip_and_keeps_the_one_for_when_they_are_again() {
        let none = cx(10, 50_000, &[]);
        assert!(Skip::after_claim(None, &none, Some(20_011)).is_none());
        let hot = cx(10, 50_000, &["hot"]);
        let s = Skip::after_claim(None, &hot, Some(20_011));
        // The key's block ran out: one claim from the floor, then it is left out again.
        let s = Skip::after_claim(s, &none, Some(101));
        assert_eq!(Skip::start(s.as_ref(), &none), 10);
        assert_eq!(Skip::start(s.as_ref(), &hot), 20_011);
    }

    #[test]
    fn the_skip_ends_when_a_key_is_let_back_in_the_floor_is_lowered_or_after_the_rescan_period() {
        let c = cx(10, 50_000, &["hot"]);
        let s = Skip::after_claim(None, &c, Some(20_011)).unwrap();
        assert_eq!(Skip::start(Some(&s), &cx(10, 50_000, &["hot", "other"])), 20_011, "more keys left out");
        assert_eq!(Skip::start(Some(&s), &cx(10, 50_000, &["other"])), 10, "hot let back in");
        assert_eq!(Skip::start(Some(&s), &ScanContext { lowerings: 1, ..c.clone() }), 10, "replay");
        let old = Skip { since: Instant::now() - RESCAN, ..s.clone() };
        assert_eq!(Skip::start(Some(&old), &c), 10, "too old");
        // Going on from a trusted skip keeps its age.
        let next = Skip::after_claim(Some(old), &c, Some(30_000)).unwrap();
        assert!(next.since.elapsed() < RESCAN, "an untrusted skip is not inherited");
        let later = Skip::after_claim(Some(s.clone()), &c, Some(30_000)).unwrap();
        assert_eq!(later.since, s.since);
    }
}
