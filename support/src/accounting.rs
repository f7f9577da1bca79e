//! The chaos run's duplicate accounting: which disruption caused each extra
//! copy of an event, exactly, from the copies' timestamps and the relay that
//! sent each one (the `outbox_relay_id` header).

use std::collections::HashMap;

use outbox_relay::verify::Seen;
use uuid::Uuid;

/// Something done to the system: a moment (`from == to`, a SIGKILL) or a
/// window (a Postgres restart, a freeze, a Kafka outage), in ms since the
/// epoch, that struck one relay (`relay`: its `relay.id`) or every relay
/// (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disruption {
    pub from: i64,
    pub to: i64,
    pub relay: Option<String>,
}

/// An extra copy no disruption explains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unexplained {
    pub id: Uuid,
    /// The copy before it: when, and by which relay.
    pub before_ms: i64,
    pub before_relay: Option<String>,
    /// This copy: when.
    pub at_ms: i64,
}

/// Blames every extra copy of an event on the disruption that caused it.
///
/// A second copy exists because the batch that sent the first was not
/// recorded: the relay that sent it (its `outbox_relay_id`) was killed, froze,
/// lost Postgres or gave the batch back, after the first copy was produced and
/// before the next one was. So each extra copy goes to the first moment that
/// struck that relay (or every relay) between the two copies, else to the
/// first window that struck it and overlaps them. Needs one clock for both
/// sides (relays and caller on one machine) and CreateTime topics, so that a
/// copy's timestamp is when it was sent. Returns the copies per disruption
/// (same index) and the copies nothing explains.
pub fn duplicates_by_disruption(seen: &[Seen], disruptions: &[Disruption]) -> (Vec<usize>, Vec<Unexplained>) {
    let mut copies: HashMap<Uuid, Vec<(i64, Option<&str>)>> = HashMap::new();
    for m in seen {
        if let (Some(id), Some(ts)) = (m.id, m.timestamp_ms) {
            copies.entry(id).or_default().push((ts, m.relay_id.as_deref()));
        }
    }
    let mut per = vec![0; disruptions.len()];
    let mut unexplained = Vec::new();
    for (id, cs) in copies.iter_mut().filter(|(_, c)| c.len() > 1) {
        cs.sort_unstable();
        for pair in cs.windows(2) {
            let ((t0, sender), (t1, _)) = (pair[0], pair[1]);
            let struck = |d: &Disruption| d.relay.is_none() || sender.is_none() || d.relay.as_deref() == sender;
            let moment = disruptions.iter().position(|d| d.from == d.to && struck(d) && d.from >= t0 && d.from <= t1);
            let window = || disruptions.iter().position(|d| d.from != d.to && struck(d) && d.to >= t0 && d.from <= t1);
            match moment.or_else(window) {
                Some(i) => per[i] += 1,
                None => unexplained.push(Unexplained {
                    id: *id,
                    before_ms: t0,
                    before_relay: sender.map(str::to_string),
                    at_ms: t1,
                }),
            }
        }
    }
    unexplained.sort_unstable_by_key(|u| (u.before_ms, u.id));
    (per, unexplained)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(id: Uuid, ts: i64, relay: &str) -> Seen {
        Seen {
            id: Some(id),
            topic: "t".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: Some(ts),
            relay_id: Some(relay.into()),
        }
    }

    fn kill(t: i64, relay: &str) -> Disruption {
        Disruption { from: t, to: t, relay: Some(relay.into()) }
    }

    #[test]
    fn each_extra_copy_is_blamed_on_the_disruption_of_the_relay_that_sent_the_copy_before_it() {
        let (a1, a2, b3) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let msgs = vec![
            at(a1, 100, "r1"),
            at(a2, 101, "r1"),
            at(b3, 102, "r2"),
            // r1 killed at 150 (r2 killed at 140 too, but r2 did not send a1, a2)
            at(a1, 200, "r2"),
            at(a2, 201, "r2"),
            // r2 killed at 250: a1 a third time
            at(a1, 400, "r3"),
            // a copy with no disruption of r2 in between
            at(b3, 103, "r2"),
        ];
        let disruptions = [kill(140, "r2"), kill(150, "r1"), kill(250, "r2")];
        let (per, unexplained) = duplicates_by_disruption(&msgs, &disruptions);
        assert_eq!(per, vec![0, 2, 1], "the kill of r2 at 140 did not make a1's and a2's copies");
        assert_eq!(unexplained.len(), 1);
        assert_eq!((unexplained[0].before_ms, unexplained[0].at_ms), (102, 103));
        assert_eq!(unexplained[0].before_relay.as_deref(), Some("r2"));
        // A window of every relay (a Postgres restart) that overlaps b3's
        // copies explains it; a1's and a2's stay with r1's kill.
        let all = Disruption { from: 101, to: 102, relay: None };
        let (per, unexplained) = duplicates_by_disruption(&msgs, &[all, kill(150, "r1"), kill(250, "r2")]);
        assert_eq!(per, vec![1, 2, 1]);
        assert!(unexplained.is_empty(), "{unexplained:?}");
    }
}
