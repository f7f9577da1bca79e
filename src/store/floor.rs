//! Where a claim starts scanning the pending index: the **floor**.
//!
//! An outbox is a queue in a table. Every published row leaves a dead entry in
//! the pending index until vacuum removes it, and vacuum removes nothing that an
//! old snapshot (a long report, `pg_dump`, a forgotten `BEGIN`) may still see.
//! A claim that scans the index from its start walks all of those entries, one
//! heap visit each, on every batch. So every per-batch query of the relay starts
//! at the floor instead: `seq >= floor`.
//!
//! # Why the floor never passes a row that is still to come
//!
//! The floor is `min(head, visible)`:
//!
//! * **head** is the lowest `seq` of a pending row (not waiting for a retry)
//!   that a snapshot taken *after* the claim saw, locked by anyone or not. Every
//!   pending row that exists now, including rows another relay holds and may
//!   give back, is at or above it.
//! * **visible** (`V`) bounds the rows that do not exist *yet*: sequence values
//!   are taken at insert and become visible at commit, so a row with a low `seq`
//!   can appear long after higher ones were published (a "straggler"). `V` is
//!   a `seq` such that every row below it is committed or will never exist.
//!
//! `V` comes from the identity sequence's lock. `nextval()` takes a lock on the
//! sequence that its transaction holds until it ends, so a transaction that owns
//! a sequence value shows up in `pg_locks` from before it got the value until it
//! commits or aborts. An **epoch** is `(m, W)`: `m` is the highest `seq` the relay
//! has seen committed, then `W` is the set of transactions holding the sequence
//! lock, read *after* `m` was known. Any transaction that took a value `≤ m`
//! (with `CACHE 1` the values are handed out in order, so before `m` was) is
//! either finished or in `W`. Once none of `W` holds the lock any more, every
//! row with `seq ≤ m` is committed or gone, and `V = m + 1`.
//!
//! What is still below the floor and not found by the main scan: events waiting
//! for their `retry_at` (the claim reads those through the small retry index)
//! and events an operator replays (`replay` notifies the relays, which lower
//! their floor; a periodic sweep covers a lost notification: a statement of
//! its own, off the claim path, looks for pending rows below the floor).
//! `check` refuses a sequence with `CACHE > 1`.
//!
//! # When the sequence goes backwards
//!
//! All of the above assumes sequence values only grow. They do not after a
//! failover to an asynchronous standby or a point-in-time recovery (the new
//! server's sequence is behind what the relay saw), an `ALTER SEQUENCE …
//! RESTART` (or `ALTER TABLE … ALTER COLUMN seq RESTART`), a `TRUNCATE …
//! RESTART IDENTITY`, or a `setval()` to a lower value: new rows then get `seq`
//! values below the floor. Every look at the outbox (the claim's probe and an
//! idle relay's look) also reads where the values come from ([`SeqSource`]):
//! the server's start time (a failover, a recovery or a restart shows as a new
//! one), the sequence's storage (a restart or a truncation gives it a new one)
//! and its last value (a `setval` lowers it). When any of them says the values
//! went backwards, the floor forgets everything it knew ([`Floor::reset`]) and
//! the next claim starts from the beginning. A `setval` that lowers the
//! sequence and is followed, before the relay's next look (at most
//! `relay.poll_interval`), by enough inserts to pass its old value is the one
//! case only the sweep finds.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The columns of a look at the outbox that say where sequence values come
/// from ([`SeqSource`]), for the sequence whose oid is `$2` (0: none). Its last
/// value is read only with SELECT on the sequence (`has_sequence_privilege`):
/// without it a lower `setval` goes unnoticed until the sweep.
pub(super) const SOURCE_COLUMNS: &str =
    "(extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8 AS server_started_us,
     pg_relation_filenode(NULLIF($2::oid, 0)::regclass) AS seq_filenode,
     CASE WHEN $2::oid <> 0 AND has_sequence_privilege($2::oid, 'SELECT')
          THEN pg_sequence_last_value($2::oid::regclass) END AS seq_last_value";

/// Reads [`SOURCE_COLUMNS`] from a row.
pub(super) fn read_source(row: &tokio_postgres::Row) -> Result<SeqSource, super::StoreError> {
    Ok(SeqSource {
        server_started_us: row.try_get("server_started_us")?,
        filenode: row.try_get("seq_filenode")?,
        last_value: row.try_get("seq_last_value")?,
    })
}

/// How many epochs may be open at once; more would only cost memory.
const MAX_EPOCHS: usize = 16;

/// The relay's floor over the pending index, and how it advances.
#[derive(Debug, Clone)]
pub struct Floor {
    floor: i64,
    visible: i64,
    max_seen: i64,
    epochs: Vec<(i64, HashSet<String>)>,
    /// When the floor was last reset to the start (a sweep).
    swept: Instant,
    /// Set when something below the floor may be pending again (a replay).
    lowered_to: Option<i64>,
    /// Where sequence values came from at the last look.
    source: Option<SeqSource>,
    /// How many resets so far: a look that began before the last reset says
    /// nothing any more.
    generation: u64,
    /// How many times the floor was reset or lowered (see `skip.rs`).
    lowerings: u64,
}

/// Where the outbox's sequence values come from, as one look saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSource {
    /// `pg_postmaster_start_time()`, µs since the epoch: a new server after a
    /// failover, a recovery or a restart.
    pub server_started_us: i64,
    /// The identity sequence's relfilenode (new after a restart or truncation).
    pub filenode: Option<u32>,
    /// Its last value handed out (`None` until the first after a restart).
    pub last_value: Option<i64>,
}

impl Default for Floor {
    fn default() -> Self {
        Floor {
            floor: 0,
            visible: 0,
            max_seen: 0,
            epochs: Vec::new(),
            swept: Instant::now(),
            lowered_to: None,
            source: None,
            generation: 0,
            lowerings: 0,
        }
    }
}

impl Floor {
    /// Where the next claim starts.
    pub fn get(&self) -> i64 {
        match self.lowered_to {
            Some(l) => l.min(self.floor),
            None => self.floor,
        }
    }

    /// The visibility frontier `V` (for metrics and tests).
    pub fn visible(&self) -> i64 {
        self.visible
    }

    /// Which reset this floor is at (see [`Floor::observe_since`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// [`Floor::observe`] for a look that began at `generation`: ignored when
    /// the floor was reset meanwhile (it scanned from the old floor).
    pub fn observe_since(
        &mut self,
        generation: u64,
        started: i64,
        claimed_max: Option<i64>,
        head: Option<i64>,
        lockers: Option<Vec<String>>,
    ) {
        if generation == self.generation {
            self.observe(started, claimed_max, head, lockers);
        }
    }

    /// How many times the floor was reset or lowered: rows below it may be
    /// pending again each time.
    pub fn lowerings(&self) -> u64 {
        self.lowerings
    }

    /// Does the next probe need the sequence's lockers (an epoch to start or finish)?
    pub fn wants_lockers(&self) -> bool {
        !self.epochs.is_empty() || self.max_seen + 1 > self.visible
    }

    /// Records what a claim and its probe saw. `started`: the floor the claim
    /// and the probe scanned from; `claimed_max`: the highest `seq` claimed (if
    /// any); `head`: the lowest pending, non-retry `seq` at or above `started`
    /// (if any); `lockers`: when read, the transactions holding the sequence lock.
    pub fn observe(&mut self, started: i64, claimed_max: Option<i64>, head: Option<i64>, lockers: Option<Vec<String>>) {
        if let Some(m) = claimed_max.into_iter().chain(head).max() {
            self.max_seen = self.max_seen.max(m);
        }
        if let Some(lockers) = lockers {
            let now: HashSet<String> = lockers.into_iter().collect();
            // An epoch is over once none of its transactions holds the lock.
            for (m, w) in &self.epochs {
                if w.is_disjoint(&now) {
                    self.visible = self.visible.max(m + 1);
                }
            }
            let visible = self.visible;
            self.epochs.retain(|(m, _)| m + 1 > visible);
            let newest = self.epochs.last().map(|(m, _)| *m).unwrap_or(visible - 1);
            if self.max_seen > newest && self.epochs.len() < MAX_EPOCHS {
                if now.is_empty() {
                    // Nobody holds a sequence value: everything seen is settled.
                    self.visible = self.visible.max(self.max_seen + 1);
                } else {
                    self.epochs.push((self.max_seen, now));
                }
            }
        }
        // Every pending row at or above `started` is at or above the head, and
        // every row still to come is at or above `visible`.
        let candidate = head.map_or(self.visible, |h| h.min(self.visible)).max(started);
        match self.lowered_to {
            // The scan covered the lowered range: settled.
            Some(l) if started <= l => {
                self.floor = candidate;
                self.lowered_to = None;
            }
            // Lowered while this scan ran: keep it for the next one.
            Some(_) => self.floor = self.floor.max(candidate),
            None => self.floor = self.floor.max(candidate),
        }
    }

    /// Records where sequence values come from now. Returns true when they
    /// went backwards (a new server, a restarted sequence, a lower last value):
    /// the floor is then reset, and what a look from the old floor saw must
    /// not be applied.
    pub fn check_source(&mut self, now: SeqSource) -> bool {
        let went_back = self.source.is_some_and(|before| {
            before.server_started_us != now.server_started_us
                || before.filenode != now.filenode
                || matches!((before.last_value, now.last_value), (Some(b), Some(n)) if n < b)
        });
        self.source = Some(now);
        if went_back {
            self.reset();
        }
        went_back
    }

    /// Forgets everything: the next claim starts from the beginning, and the
    /// floor advances again only on what it sees from then on. (Lowering it
    /// alone would not do: `visible` and the epochs would put it straight back.)
    pub fn reset(&mut self) {
        self.generation += 1;
        self.lowerings += 1;
        self.floor = 0;
        self.visible = 0;
        self.max_seen = 0;
        self.epochs.clear();
        self.lowered_to = None;
    }

    /// Something at or above `seq` may be pending again (a replay): scan from
    /// there next time.
    pub fn lower(&mut self, seq: i64) {
        self.lowerings += 1;
        self.lowered_to = Some(self.lowered_to.map_or(seq, |l| l.min(seq)).max(0));
    }

    /// True when `every` has passed since the last sweep (and starts the next
    /// period): time to look for pending rows below the floor, the safety net
    /// for a lost replay notification (`Store::sweep_if_due` does the looking,
    /// off the claim path, and lowers the floor to what it finds).
    pub fn sweep_due(&mut self, every: Duration) -> bool {
        if self.swept.elapsed() >= every {
            self.swept = Instant::now();
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Option<Vec<String>> {
        Some(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn the_floor_follows_the_head_once_no_inserter_can_hold_a_lower_value() {
        let mut f = Floor::default();
        assert_eq!(f.get(), 0);
        // First batch: rows 1..=500 claimed, head 1 (ours), inserter A is running.
        f.observe(f.get(), Some(500), Some(1), ids(&["3/1"]));
        assert_eq!(f.get(), 0, "V unknown yet: A may hold a value below 500");
        // A still runs: the floor may not pass anything A could have.
        f.observe(f.get(), Some(1000), Some(501), ids(&["3/1", "4/7"]));
        assert_eq!(f.get(), 0);
        // A ended: every value <= 500 is settled; the head (501) is the floor.
        f.observe(f.get(), Some(1500), Some(1001), ids(&["4/7"]));
        assert_eq!(f.get(), 501);
        assert_eq!(f.visible(), 501);
        // B (4/7) ended too: everything <= 1000 settled.
        f.observe(f.get(), Some(2000), Some(1501), ids(&[]));
        assert_eq!(f.get(), 1501);
    }

    #[test]
    fn a_straggler_below_the_head_keeps_the_floor_down_until_it_commits() {
        let mut f = Floor::default();
        // Inserter S took seq 10 and stays open; rows 11..=100 commit and are claimed.
        f.observe(f.get(), Some(100), Some(11), ids(&["9/1"]));
        for i in 1..50 {
            f.observe(f.get(), Some(100 + i * 100), Some(101 + i * 100), ids(&["9/1", &format!("5/{i}")]));
            assert!(f.get() <= 10, "floor {} passed the open straggler", f.get());
        }
        // S commits: its row (10) is pending and is now the head.
        f.observe(f.get(), None, Some(10), ids(&["5/99"]));
        assert!(f.get() <= 10);
    }

    #[test]
    fn rows_held_by_other_relays_keep_the_floor_at_them() {
        let mut f = Floor::default();
        f.observe(f.get(), Some(10), Some(1), ids(&[]));
        assert_eq!(f.get(), 1);
        // We claimed 501..=1000; rows 1..=500 are held by another relay: head stays 1.
        f.observe(f.get(), Some(1000), Some(1), ids(&[]));
        assert_eq!(f.get(), 1);
        // It published them: the head moves on.
        f.observe(f.get(), Some(1500), Some(1001), ids(&[]));
        assert_eq!(f.get(), 1001);
    }

    #[test]
    fn nothing_pending_moves_the_floor_to_the_visibility_frontier() {
        let mut f = Floor::default();
        f.observe(f.get(), Some(42), None, ids(&[]));
        assert_eq!(f.get(), 43);
        // Without the lockers (not read), the floor does not move past V.
        f.observe(f.get(), Some(100), None, None);
        assert_eq!(f.get(), 43);
    }

    #[test]
    fn a_replay_lowers_the_floor_and_the_next_scan_settles_it_again() {
        let mut f = Floor::default();
        f.observe(f.get(), Some(1000), Some(1001), ids(&[]));
        assert_eq!(f.get(), 1001);
        f.lower(17);
        assert_eq!(f.get(), 17);
        f.observe(f.get(), None, Some(17), ids(&[]));
        assert_eq!(f.get(), 17, "the replayed row is pending: the floor stays at it");
        f.observe(f.get(), Some(1001), Some(1200), ids(&[]));
        assert_eq!(f.get(), 1200, "replayed row published: up to the head again");
    }

    #[test]
    fn a_sweep_is_due_once_per_period_and_does_not_move_the_floor_by_itself() {
        let mut f = Floor::default();
        f.observe(f.get(), Some(10), Some(11), ids(&[]));
        assert!(!f.sweep_due(Duration::from_secs(3600)));
        assert!(f.sweep_due(Duration::ZERO));
        assert_eq!(f.get(), 11, "the claim does not scan from the start: the sweep looks on its own");
        assert!(!f.sweep_due(Duration::from_secs(3600)), "the period restarted");
    }

    fn source(started: i64, filenode: u32, last: i64) -> SeqSource {
        SeqSource { server_started_us: started, filenode: Some(filenode), last_value: Some(last) }
    }

    #[test]
    fn a_sequence_that_goes_backwards_resets_the_floor_and_keeps_it_down() {
        let mut f = Floor::default();
        assert!(!f.check_source(source(1, 10, 1200)));
        f.observe(f.get(), Some(1200), None, ids(&[]));
        assert_eq!(f.get(), 1201);
        // ALTER SEQUENCE … RESTART WITH 950: a new relfilenode, no value yet.
        assert!(f.check_source(SeqSource { filenode: Some(11), last_value: None, ..source(1, 10, 0) }));
        assert_eq!(f.get(), 0);
        // Nothing pending and nobody inserting: the next look must not put the
        // floor back above the new values (0.2's "lower to 0" did, through V).
        assert!(!f.check_source(source(1, 11, 950)));
        f.observe(f.get(), None, Some(950), ids(&["3/9"]));
        assert!(f.get() <= 950, "floor {} passed the new values", f.get());
        // A setval() to a lower value, and a failover (a new server start time).
        let mut g = Floor::default();
        g.check_source(source(1, 10, 500));
        g.observe(g.get(), Some(500), None, ids(&[]));
        assert!(g.check_source(source(1, 10, 300)), "setval lower");
        assert_eq!(g.get(), 0);
        g.observe(g.get(), Some(320), None, ids(&[]));
        assert!(g.check_source(source(2, 10, 320)), "a new server");
        assert_eq!(g.get(), 0);
        // Normal growth resets nothing.
        assert!(!g.check_source(source(2, 10, 5000)));
        // A claim that began before a reset (the LISTEN connection came back
        // meanwhile) does not raise the floor again when it ends.
        let mut h = Floor::default();
        h.observe(h.get(), Some(700), None, ids(&[]));
        let (generation, started) = (h.generation(), h.get());
        h.reset();
        h.observe_since(generation, started, Some(800), Some(750), ids(&[]));
        assert_eq!(h.get(), 0);
    }

    #[test]
    fn the_floor_never_moves_backwards_by_itself() {
        let mut f = Floor::default();
        f.observe(f.get(), Some(100), Some(50), ids(&[]));
        let before = f.get();
        f.observe(f.get(), Some(100), Some(40), ids(&[])); // a head below the scan start is impossible; ignored
        assert!(f.get() >= before);
        // A lowering that arrives while a scan from the old floor runs is kept.
        let started = f.get();
        f.lower(5);
        f.observe(started, Some(100), Some(60), ids(&[]));
        assert_eq!(f.get(), 5);
    }
}
