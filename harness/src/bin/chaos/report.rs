//! The chaos run's verdict and table: lost, duplicates (each blamed exactly on
//! the disruption and the relay that caused it), order, poison, latency per
//! disruption window.

use std::collections::{BTreeMap, HashMap};

use outbox_relay::store::PublishedRow;
use outbox_relay::verify::{Report, Seen};
use outbox_relay_support::accounting::{duplicates_by_disruption, Disruption, Unexplained};
use outbox_relay_support::{quantiles, Quantiles};
use uuid::Uuid;

use super::relays::Cause;

/// Extra copies per disruption, summed per cause.
pub struct Duplicates {
    /// Per cause: (copies in all, most at one disruption).
    pub by_cause: BTreeMap<Cause, (usize, usize)>,
    /// The most copies one kill (or crash point) made.
    pub max_per_kill: usize,
    /// The most of a kill outside every window (Postgres restart, freeze,
    /// Kafka outage…), and the worst kill inside one, with that window's cause.
    pub max_outside: usize,
    pub worst_inside: Option<(usize, Cause)>,
    pub unexplained: Vec<Unexplained>,
}

pub fn duplicates(seen: &[Seen], disruptions: &[(Disruption, Cause)]) -> Duplicates {
    let spans: Vec<Disruption> = disruptions.iter().map(|(d, _)| d.clone()).collect();
    let (blamed, unexplained) = duplicates_by_disruption(seen, &spans);
    let mut by_cause: BTreeMap<Cause, (usize, usize)> = BTreeMap::new();
    for ((_, cause), n) in disruptions.iter().zip(&blamed) {
        let e = by_cause.entry(*cause).or_default();
        e.0 += n;
        e.1 = e.1.max(*n);
    }
    let is_kill = |c: Cause| matches!(c, Cause::Kill | Cause::CrashPoint);
    let max_per_kill = by_cause.iter().filter(|(c, _)| is_kill(**c)).map(|(_, e)| e.1).max().unwrap_or(0);
    // A kill inside a window that struck the same relay (or every relay) shares
    // the copies of the batches the window also kept from being recorded.
    let inside_window = |d: &Disruption| {
        disruptions
            .iter()
            .find(|(w, _)| {
                w.from < w.to && w.from <= d.from && d.from <= w.to && (w.relay.is_none() || w.relay == d.relay)
            })
            .map(|(_, c)| *c)
    };
    let (mut max_outside, mut worst_inside) = (0, None::<(usize, Cause)>);
    for ((d, cause), &n) in disruptions.iter().zip(&blamed) {
        if !is_kill(*cause) {
            continue;
        }
        match inside_window(d) {
            None => max_outside = max_outside.max(n),
            Some(w) if worst_inside.is_none_or(|(m, _)| n > m) => worst_inside = Some((n, w)),
            Some(_) => {}
        }
    }
    Duplicates { by_cause, max_per_kill, max_outside, worst_inside, unexplained }
}

/// Latency (row created → first copy sent, message CreateTime) of the events
/// written in [from, to).
pub struct Latency {
    first_sent: HashMap<Uuid, i64>,
}

impl Latency {
    pub fn new(seen: &[Seen]) -> Latency {
        let mut first_sent: HashMap<Uuid, i64> = HashMap::new();
        for m in seen {
            if let (Some(id), Some(ts)) = (m.id, m.timestamp_ms) {
                let e = first_sent.entry(id).or_insert(ts);
                *e = (*e).min(ts);
            }
        }
        Latency { first_sent }
    }

    pub fn of(&self, rows: &[PublishedRow], from: i64, to: i64) -> Quantiles {
        quantiles(
            rows.iter()
                .filter(|r| r.created_at_ms >= from && r.created_at_ms < to)
                .filter_map(|r| self.first_sent.get(&r.id).map(|s| (s - r.created_at_ms) as f64))
                .collect(),
        )
    }
}

/// One line of the table.
pub fn row(k: &str, v: impl std::fmt::Display) {
    println!("  │ {k:<48} │ {:>10} │", v.to_string());
}

/// The duplicate lines of the table.
/// `depth`: batches in flight per relay (at-least-once); `None`: exactly-once.
pub fn print_duplicates(report: &Report, d: &Duplicates, kills: usize, batch: usize, depth: Option<usize>) {
    row("duplicated events", report.duplicated_events);
    row("duplicate copies", report.duplicate_copies);
    row("duplicate copies per kill (mean)", format!("{:.1}", report.duplicate_copies as f64 / kills.max(1) as f64));
    row("duplicate copies per kill (MAX)", d.max_per_kill);
    if let Some((n, w)) = d.worst_inside.filter(|_| d.max_per_kill > d.max_outside) {
        row("  MAX of kills outside a window", d.max_outside);
        row(&format!("  MAX of kills inside a window ({w:?})"), n);
    }
    match depth {
        None => row("duplicates allowed (exactly-once)", 0),
        Some(n) => row(&format!("duplicate bound per kill ({n} batches)"), n * batch),
    }
    for (cause, label) in [
        (Cause::KafkaOutage, "dup copies of the Kafka outage"),
        (Cause::PostgresRestart, "dup copies of the Postgres restart"),
        (Cause::Freeze, "dup copies of the freeze"),
        (Cause::ModeSwitch, "dup copies of mode switches"),
        (Cause::LeaderKill, "dup copies of leader kills"),
        (Cause::BrokerRestart, "dup copies of broker restarts"),
        (Cause::CoordinatorKill, "dup copies of the coordinator kill"),
        (Cause::TwoBrokersDown, "dup copies of two brokers down"),
        (Cause::SelfExit, "dup copies of a relay's own exit"),
    ] {
        if let Some((n, _)) = d.by_cause.get(&cause) {
            row(label, n);
        }
    }
    row("dup copies no disruption explains", d.unexplained.len());
}

/// The copies nothing explains, with the disruption last before each.
pub fn print_unexplained(d: &Duplicates, disruptions: &[(Disruption, Cause)], t0_ms: i64) {
    if d.unexplained.is_empty() {
        return;
    }
    let secs = |t: i64| (t - t0_ms) as f64 / 1000.0;
    println!(
        "  duplicate copies no disruption explains (first 10 of {}): copy before (relay) → copy, run seconds; the last disruption before",
        d.unexplained.len()
    );
    for u in d.unexplained.iter().take(10) {
        let before = disruptions.iter().filter(|(w, _)| w.to < u.before_ms).max_by_key(|(w, _)| w.to);
        let last = before.map_or("none".to_string(), |(w, c)| format!("{c:?} ended at {:.3}", secs(w.to)));
        println!(
            "    {} {:.3} ({}) → {:.3}   {last}",
            u.id,
            secs(u.before_ms),
            u.before_relay.as_deref().unwrap_or("?"),
            secs(u.at_ms)
        );
    }
}
