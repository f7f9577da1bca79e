//! `outbox-relay check`: config, Postgres, schema, Kafka — one line each.

use std::time::Duration;

use super::{exit, CliError};
use crate::config::Settings;
use crate::sink::{KafkaSink, Sink};
use crate::store::{describe, Store};

pub async fn check(settings: Settings) -> Result<(), CliError> {
    let mut problems = 0;
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
        }
        Err(e) => {
            problems += 1;
            println!("PROBLEM postgres unreachable ({pg}): {e}");
        }
    }
    match KafkaSink::new(&settings) {
        Ok(sink) => match sink.ping(Duration::from_secs(10)).await {
            Ok(()) => println!("ok      kafka reachable ({})", settings.kafka_brokers()),
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
