//! `outbox-relay check`: config, Postgres, schema, Kafka — one line each.

use std::time::Duration;

use super::{exit, CliError};
use crate::config::{Delivery, Settings};
use crate::sink::{Decisions, KafkaSink, Sink};
use crate::store::{describe, Store};

pub async fn check(settings: Settings) -> Result<(), CliError> {
    let mut problems = 0;
    let exactly_once = settings.relay.delivery == Delivery::ExactlyOnce;
    println!("ok      config (table {}, relay {})", settings.table(), settings.relay_id());
    let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let pg = describe(store.pg_config());
    match store.ping().await {
        Ok(()) => {
            println!("ok      postgres reachable ({pg})");
            match store.verify_schema().await {
                Ok(found) if found.is_empty() => {
                    println!("ok      schema of {} is complete", store.table())
                }
                Ok(found) => {
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
            if exactly_once {
                problems += check_two_phase_commit(&settings, &store).await;
            }
        }
        Err(e) => {
            problems += 1;
            println!("PROBLEM postgres unreachable ({pg}): {e}");
        }
    }
    match KafkaSink::new(&settings) {
        Ok(sink) => match sink.ping(Duration::from_secs(10)).await {
            Ok(()) => {
                println!("ok      kafka reachable ({})", settings.kafka_brokers());
                if exactly_once {
                    problems += check_transactions(&settings, &sink).await;
                }
            }
            Err(e) => {
                problems += 1;
                println!("PROBLEM kafka unreachable ({}): {e}", settings.kafka_brokers());
            }
        },
        Err(e) => {
            problems += 1;
            println!("PROBLEM kafka producer config: {e}");
        }
    }
    if problems > 0 {
        return Err(CliError::new(exit::PROBLEMS, format!("{problems} problem(s) found")));
    }
    Ok(())
}

/// Exactly-once needs Postgres two-phase commit. Returns the number of problems.
async fn check_two_phase_commit(settings: &Settings, store: &Store) -> usize {
    match store.max_prepared_transactions().await {
        Ok(0) => {
            println!(
                "PROBLEM exactly-once needs two-phase commit but max_prepared_transactions = 0 — set it in \
                 postgresql.conf to at least the number of relays (e.g. 64) and restart Postgres"
            );
            return 1;
        }
        Ok(n) => println!("ok      postgres two-phase commit enabled (max_prepared_transactions = {n})"),
        Err(e) => {
            println!("PROBLEM cannot read max_prepared_transactions: {e}");
            return 1;
        }
    }
    match store.prepared(&settings.transactional_prefix()).await {
        Ok(p) => {
            let stale: Vec<_> = p.iter().filter(|p| p.age_s > settings.relay.recovery_timeout.as_secs_f64()).collect();
            if !stale.is_empty() {
                println!(
                    "warning {} prepared batch(es) older than relay.recovery_timeout (oldest {:.0} s): a running \
                     relay in exactly-once mode resolves them; they hold their rows until then",
                    stale.len(),
                    stale.iter().map(|p| p.age_s).fold(0.0, f64::max)
                );
            }
            0
        }
        Err(e) => {
            println!("PROBLEM cannot list prepared transactions: {e}");
            1
        }
    }
}

/// Exactly-once needs Kafka transactions and the decisions topic. Returns the
/// number of problems.
async fn check_transactions(settings: &Settings, sink: &KafkaSink) -> usize {
    let mut problems = 0;
    // A throw-away transactional id: registering the relay's own would fence it.
    let probe = format!("{}check-{}", settings.transactional_prefix(), uuid::Uuid::new_v4().simple());
    match sink.fence(&probe, Duration::from_secs(15)).await {
        Ok(()) => println!("ok      kafka transactions available"),
        Err(e) => {
            problems += 1;
            println!(
                "PROBLEM kafka transactions unavailable: {e} — the brokers need transaction support \
                 (transaction.state.log.replication.factor and min.isr no larger than the number of brokers) \
                 and the relay's principal needs Write and Describe on transactional ids \"{}*\"",
                settings.transactional_prefix()
            );
        }
    }
    let topic = &settings.relay.commits_topic;
    match Decisions::new(settings) {
        Ok(d) => match d.partitions(Duration::from_secs(10)).await {
            Ok(0) => println!(
                "ok      decisions topic {topic} does not exist yet; the relay creates it at start-up \
                 (1 partition, compacted; needs permission to create topics, or create it yourself)"
            ),
            Ok(1) => println!("ok      decisions topic {topic} has 1 partition"),
            Ok(n) => {
                problems += 1;
                println!("PROBLEM decisions topic {topic} has {n} partitions; it must have exactly 1");
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
