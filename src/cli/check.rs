//! `outbox-relay check`: config, Postgres, schema, Kafka — one line each.

use std::time::Duration;

use super::{exit, CliError};
use crate::config::{Delivery, Settings};
use crate::sink::{Decisions, DecisionsTopic, KafkaSink, Sink};
use crate::store::{describe, RelaysSeen, Replication, Store};

/// Every check; with `start_gate`, only what must hold for the relay to start
/// (config, Postgres, schema; exactly-once: two-phase commit), never Kafka —
/// so that a start gate (an init container, a systemd `ExecStartPre`) cannot
/// tie anything's start to Kafka's availability.
pub async fn check(settings: Settings, start_gate: bool) -> Result<(), CliError> {
    println!("ok      config (table {}, relay {})", settings.table(), settings.relay_id());
    let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let (mut problems, table_usable) = check_postgres(&settings, &store, start_gate).await;
    if start_gate {
        println!("skipped kafka (--start-gate: the relay waits for Kafka by itself and holds nothing meanwhile)");
    } else {
        problems += check_kafka(&settings, &store, table_usable).await;
    }
    if problems > 0 {
        return Err(CliError::new(exit::PROBLEMS, format!("{problems} problem(s) found")));
    }
    Ok(())
}

/// Postgres, the schema, two-phase commit (exactly-once), prepared batches and
/// the table's health. Returns the problems and whether the table is usable.
async fn check_postgres(settings: &Settings, store: &Store, start_gate: bool) -> (usize, bool) {
    let pg = describe(store.pg_config());
    if let Err(e) = store.ping().await {
        println!("PROBLEM postgres unreachable ({pg}): {e}");
        return (1, false);
    }
    println!("ok      postgres reachable ({pg})");
    let mut problems = 0;
    // Checks that read the table say nothing more when its schema is unusable:
    // the one problem above is the message.
    let mut table_usable = false;
    match store.verify_schema().await {
        Ok(found) if found.is_empty() => {
            table_usable = true;
            println!("ok      schema of {} is complete", store.table())
        }
        Ok(found) => {
            table_usable = !found.iter().any(|p| p.fatal);
            for p in found {
                if p.fatal {
                    problems += 1;
                    println!("PROBLEM {p}");
                } else {
                    println!("warning {p}");
                }
            }
        }
        Err(e) => {
            problems += 1;
            println!("PROBLEM cannot inspect the schema: {e}");
        }
    }
    if settings.relay.delivery == Delivery::ExactlyOnce {
        problems += check_two_phase_commit(store).await;
    }
    if start_gate {
        return (problems, table_usable);
    }
    problems += check_prepared_batches(settings, store).await;
    if table_usable {
        problems += check_db_health(store).await;
    }
    (problems, table_usable)
}

/// Kafka reachable, the event topics, and (exactly-once) transactions and the
/// decisions topic. Returns the problems.
async fn check_kafka(settings: &Settings, store: &Store, table_usable: bool) -> usize {
    let sink = match KafkaSink::new(settings) {
        Ok(sink) => sink,
        Err(e) => {
            println!("PROBLEM kafka producer config: {e}");
            return 1;
        }
    };
    if let Err(e) = sink.ping(Duration::from_secs(10)).await {
        println!("PROBLEM kafka unreachable ({}): {e}", settings.kafka_brokers());
        return 1;
    }
    println!("ok      kafka reachable ({})", settings.kafka_brokers());
    let mut problems = 0;
    if table_usable {
        problems += check_event_topics(settings, store).await;
    }
    if settings.relay.delivery == Delivery::ExactlyOnce {
        problems += check_transactions(settings, store, &sink).await;
    }
    problems
}

/// Exactly-once needs Postgres two-phase commit with a slot for every relay,
/// a standby that cannot lose commits, and ids no clone shares. Returns the
/// number of problems.
async fn check_two_phase_commit(store: &Store) -> usize {
    let max = match store.max_prepared_transactions().await {
        Ok(n) => n,
        Err(e) => {
            println!("PROBLEM cannot read max_prepared_transactions: {e}");
            return 1;
        }
    };
    let mut problems = 0;
    match store.exactly_once_relays_seen().await {
        Ok(seen) => {
            let (problem, line) = prepared_slots(max, seen);
            problems += usize::from(problem);
            println!("{} {line}", if problem { "PROBLEM" } else { "ok     " });
        }
        Err(e) => {
            let (problem, line) = prepared_slots(max, RelaysSeen { leases: 0, prepared_owners: 0 });
            problems += usize::from(problem);
            println!("{} {line}", if problem { "PROBLEM" } else { "ok     " });
            println!("warning cannot count the exactly-once relays of this server: {e}");
        }
    }
    match store.replication().await {
        Ok(r) => {
            for (level, line) in replication_lines(&r) {
                println!("{level} {line}");
            }
        }
        Err(e) => println!("warning cannot read the replication settings: {e}"),
    }
    if let Ok(ids) = store.txn_ids().await {
        println!(
            "ok      exactly-once ids {}<relay.id> (from the system identifier and database name: a physical \
             clone made by a snapshot restore or pg_basebackup has the same ones; a clone that relays must use \
             relay.id values of its own)",
            ids.prefix
        );
    }
    problems
}

/// Whether `max_prepared_transactions` leaves a slot for every relay seen
/// and one more (this relay, or a rolling restart's new one); the line to print.
fn prepared_slots(max: i64, seen: RelaysSeen) -> (bool, String) {
    let want = seen.relays() + 1;
    let counted = format!("{} holding an id lease, {} with prepared batches", seen.leases, seen.prepared_owners);
    if max == 0 {
        return (
            true,
            format!(
                "exactly-once needs two-phase commit but max_prepared_transactions = 0 — set it in \
                 postgresql.conf to at least the number of exactly-once relays plus one ({want} now; e.g. 64) and \
                 restart Postgres"
            ),
        );
    }
    if max < want {
        return (
            true,
            format!(
                "max_prepared_transactions = {max} but this server has {} exactly-once relay(s) ({counted}) and \
                 needs one slot each plus one for the next: set it to at least {want} and restart Postgres \
                 (a relay that finds no slot fails its PREPARE and retries)",
                seen.relays()
            ),
        );
    }
    (false, format!("postgres two-phase commit enabled (max_prepared_transactions = {max}; relays seen: {counted})"))
}

/// What the replication settings mean for the guarantees: a failover to an
/// asynchronous standby can lose committed transactions (and move the
/// sequence back; see docs/exactly-once.md).
fn replication_lines(r: &Replication) -> Vec<(&'static str, String)> {
    let sync_names = r.synchronous_standby_names.trim();
    let in_sync = r.standbys.iter().filter(|(_, s)| matches!(s.as_deref(), Some("sync" | "quorum"))).count();
    let hidden = r.standbys.iter().filter(|(_, s)| s.is_none()).count();
    let mut out = Vec::new();
    if sync_names.is_empty() {
        if r.standbys.is_empty() {
            out.push(("ok     ", "no standby streams from this server".to_string()));
        } else {
            out.push((
                "warning",
                format!(
                    "{} asynchronous standby(s) and synchronous_standby_names is empty: a failover to one can lose \
                     committed transactions, whose events may already be in Kafka (see docs/exactly-once.md, \
                     \"Failover\"); configure a synchronous standby for exactly-once",
                    r.standbys.len()
                ),
            ));
        }
        return out;
    }
    if matches!(r.synchronous_commit.as_str(), "off" | "local") {
        out.push((
            "warning",
            format!(
                "synchronous_standby_names is set but synchronous_commit = {}: commits do not wait for the \
                 standby, so a failover can still lose them; use on or remote_apply",
                r.synchronous_commit
            ),
        ));
    }
    if in_sync > 0 {
        out.push(("ok     ", format!("synchronous standby: {in_sync} in sync ({sync_names})")));
    } else if hidden > 0 {
        out.push((
            "warning",
            format!(
                "synchronous_standby_names = '{sync_names}' but this role cannot see the standbys' sync_state \
                 (grant pg_monitor to check it)"
            ),
        ));
    } else {
        out.push((
            "warning",
            format!(
                "synchronous_standby_names = '{sync_names}' but no standby is in sync ({} connected): commits \
                 wait for one",
                r.standbys.len()
            ),
        ));
    }
    out
}

/// Prepared exactly-once batches of this table, in any mode: they hold their
/// rows and the xmin horizon until resolved. Returns the number of problems.
async fn check_prepared_batches(settings: &Settings, store: &Store) -> usize {
    let prefixes = store.transactional_prefixes().await;
    match store.prepared_any(&prefixes).await {
        Ok(p) if p.is_empty() => 0,
        Ok(p) => {
            let timeout = settings.relay.recovery_timeout.as_secs_f64();
            let stale: Vec<_> = p.iter().filter(|p| p.age_s > timeout).collect();
            if stale.is_empty() {
                println!("ok      {} prepared batch(es) in flight (younger than relay.recovery_timeout)", p.len());
                return 0;
            }
            let (role, superuser) = store.role().await.unwrap_or_default();
            let foreign: Vec<_> = stale.iter().filter(|p| !superuser && p.owner != role).collect();
            println!(
                "warning {} prepared batch(es) older than relay.recovery_timeout (oldest {:.0} s, e.g. {}): they hold \
                 their rows and the xmin horizon; a running relay of this table (any mode) resolves them",
                stale.len(),
                stale.iter().map(|p| p.age_s).fold(0.0, f64::max),
                stale[0].gid
            );
            if !foreign.is_empty() {
                println!(
                    "PROBLEM {} of them were prepared by another role ({}); role {role} cannot finish them: run the \
                     relay as that role, or finish them as it (COMMIT/ROLLBACK PREPARED as the decision record says)",
                    foreign.len(),
                    foreign[0].owner
                );
                return 1;
            }
            0
        }
        Err(e) => {
            println!("PROBLEM cannot list prepared transactions: {e}");
            1
        }
    }
}

/// Dead tuples of the outbox and who holds vacuum back. Warnings only.
async fn check_db_health(store: &Store) -> usize {
    match store.db_health().await {
        Ok(h) => {
            println!(
                "ok      table {}: {} live, {} dead tuples{}",
                store.table(),
                h.live_tuples,
                h.dead_tuples,
                h.last_vacuum_age_s.map(|a| format!(", last vacuum {a:.0} s ago")).unwrap_or_default()
            );
            match &h.horizon {
                Some(x) if x.age_s.unwrap_or(0.0) > 300.0 => println!(
                    "warning the xmin horizon is held by {x}: vacuum cannot remove dead rows younger than it in \
                     this database (see README, \"Running next to a production database\")"
                ),
                Some(x) if x.age_s.unwrap_or(0.0) > 10.0 => println!("ok      oldest snapshot: {x}"),
                _ => println!("ok      no long-running snapshot holds the xmin horizon"),
            }
            0
        }
        Err(e) => {
            println!("warning cannot read table statistics: {e}");
            0
        }
    }
}

/// The event topics this outbox writes to (those of pending rows and of the
/// last hour's published ones): warns when one is replicated less than a
/// production cluster allows (replication factor < 3, min.insync.replicas < 2)
/// or has unclean leader election on. Exactly-once counts an unclean election
/// as a problem: it can drop a committed transaction's events and markers.
/// Returns the number of problems.
async fn check_event_topics(settings: &Settings, store: &Store) -> usize {
    let exactly_once = settings.relay.delivery == Delivery::ExactlyOnce;
    let mut problems = 0;
    let topics = match store.recent_topics(50).await {
        Ok(t) => t,
        Err(e) => {
            println!("warning cannot list the outbox's topics: {e}");
            return 0;
        }
    };
    if topics.is_empty() {
        println!("ok      no pending or recently published events: no event topic to check yet");
        return 0;
    }
    let base = crate::sink::client_config(settings.kafka_brokers(), &settings.kafka.properties);
    let mut warned = 0;
    for topic in &topics {
        match crate::sink::topics::describe(&base, topic, Duration::from_secs(10)).await {
            Ok((brokers, Some(info))) => {
                for w in crate::sink::topics::event_topic_warnings(topic, &info, brokers) {
                    warned += 1;
                    if exactly_once && w.contains("unclean.leader.election.enable=true") {
                        problems += 1;
                        println!("PROBLEM {w}");
                    } else {
                        println!("warning {w}");
                    }
                }
            }
            Ok((_, None)) => println!("warning topic {topic} does not exist (events for it are retried, then parked)"),
            Err(e) => println!("warning cannot describe topic {topic}: {e}"),
        }
    }
    if warned == 0 {
        println!("ok      event topics replicated as the cluster allows ({})", topics.join(", "));
    }
    problems
}

/// Exactly-once needs Kafka transactions and the decisions topic. Returns the
/// number of problems.
async fn check_transactions(settings: &Settings, store: &Store, sink: &KafkaSink) -> usize {
    let mut problems = 0;
    let prefix = match store.txn_ids().await {
        Ok(ids) => ids.prefix,
        Err(_) => settings.table().legacy_transactional_prefix(),
    };
    // A throw-away transactional id: registering the relay's own would fence it.
    let probe = format!("{prefix}check-{}", uuid::Uuid::new_v4().simple());
    match sink.fence(&probe, Duration::from_secs(15)).await {
        Ok(()) => println!("ok      kafka transactions available"),
        Err(e) => {
            problems += 1;
            println!(
                "PROBLEM kafka transactions unavailable: {e} — the brokers need transaction support \
                 (transaction.state.log.replication.factor and min.isr no larger than the number of brokers) \
                 and the relay's principal needs Write and Describe on transactional ids \"{prefix}*\""
            );
        }
    }
    let topic = &settings.relay.commits_topic;
    match Decisions::new(settings) {
        Ok(d) => match d.inspect().await.map(|(brokers, state)| {
            if let Some(warning) = crate::sink::few_brokers_warning(brokers) {
                println!("warning {warning}");
            }
            state
        }) {
            Ok(DecisionsTopic::Trusted) => {
                println!("ok      decisions topic {topic}: 1 partition, compacted, replicated like the brokers allow")
            }
            Ok(DecisionsTopic::Missing { replication_factor, min_insync_replicas }) => println!(
                "ok      decisions topic {topic} does not exist yet; the relay creates it at start-up (1 partition, \
                 compacted, replication factor {replication_factor}, min.insync.replicas {min_insync_replicas}; \
                 needs permission to create topics, or create it yourself)"
            ),
            Ok(DecisionsTopic::Untrusted(why)) => {
                problems += 1;
                println!("PROBLEM {why}");
            }
            Err(e) => {
                problems += 1;
                println!("PROBLEM cannot describe decisions topic {topic}: {e}");
            }
        },
        Err(e) => {
            problems += 1;
            println!("PROBLEM {e}");
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_prepared_transactions_needs_a_slot_per_relay_seen_and_one_more() {
        let seen = RelaysSeen { leases: 3, prepared_owners: 5 };
        let (problem, line) = prepared_slots(5, seen);
        assert!(problem && line.contains("at least 6"), "{line}");
        assert!(!prepared_slots(6, seen).0);
        assert!(prepared_slots(0, RelaysSeen { leases: 0, prepared_owners: 0 }).0);
        assert!(!prepared_slots(1, RelaysSeen { leases: 0, prepared_owners: 0 }).0);
    }

    #[test]
    fn an_asynchronous_standby_or_an_unsynced_synchronous_one_is_named() {
        let r = |names: &str, commit: &str, standbys: Vec<(&str, Option<&str>)>| Replication {
            synchronous_standby_names: names.into(),
            synchronous_commit: commit.into(),
            standbys: standbys.into_iter().map(|(a, s)| (a.to_string(), s.map(str::to_string))).collect(),
        };
        let lines = |r: Replication| replication_lines(&r);
        assert_eq!(lines(r("", "on", vec![]))[0].0, "ok     ");
        let async_one = lines(r("", "on", vec![("s1", Some("async"))]));
        assert!(async_one[0].0 == "warning" && async_one[0].1.contains("asynchronous"), "{async_one:?}");
        let synced = lines(r("s1", "on", vec![("s1", Some("sync"))]));
        assert_eq!(synced, vec![("ok     ", "synchronous standby: 1 in sync (s1)".to_string())]);
        assert_eq!(lines(r("s1", "on", vec![("s1", None)]))[0].0, "warning");
        assert_eq!(lines(r("s1", "on", vec![]))[0].0, "warning");
        let local = lines(r("s1", "local", vec![("s1", Some("sync"))]));
        assert!(local[0].1.contains("synchronous_commit = local"), "{local:?}");
    }
}
