//! `outbox-relay verify`: compare what Postgres marked published with what Kafka holds.

use std::time::Duration;

use super::{exit, CliError};
use crate::config::Settings;
use crate::store::Store;
use crate::verify::{compare, read_topics};

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Rows created at or after: a timestamp or an age ("1h").
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Rows created before: a timestamp or an age.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Machine-readable report.
    #[arg(long)]
    pub json: bool,
    /// Give up reading Kafka after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

pub async fn verify(settings: Settings, args: VerifyArgs) -> Result<(), CliError> {
    let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let mut bounds = Vec::new();
    for (flag, v) in [("--since", &args.since), ("--until", &args.until)] {
        bounds.push(match v {
            None => None,
            Some(v) => Some(super::parse_time_arg(&store, flag, v).await?),
        });
    }
    let rows = store
        .published_rows(bounds[0].as_deref(), bounds[1].as_deref(), args.topic.as_deref())
        .await
        .map_err(|e| super::store_error(&store, e))?;
    if rows.is_empty() {
        println!(
            "nothing to verify: no published rows in {} for this window (verify needs on_publish = \"mark\" and rows within relay.retention)",
            store.table()
        );
        return Ok(());
    }
    let mut topics: Vec<String> = rows.iter().map(|r| r.topic.clone()).collect();
    topics.sort();
    topics.dedup();
    eprintln!("reading {} topic(s) for {} published row(s)…", topics.len(), rows.len());
    let (brokers, props, timeout) =
        (settings.kafka_brokers().to_string(), settings.kafka.properties.clone(), args.timeout);
    let seen = tokio::task::spawn_blocking(move || {
        read_topics(&brokers, &props, &topics, timeout, |n| eprintln!("  {n} messages read"))
    })
    .await
    .map_err(|e| CliError::new(exit::SOFTWARE, e.to_string()))?
    .map_err(|e| CliError::new(exit::UNAVAILABLE, e))?;
    let report = compare(&rows, &seen);
    if args.json {
        let mut v = serde_json::to_value(&report).map_err(|e| CliError::new(exit::SOFTWARE, e.to_string()))?;
        v["duplicate_rate"] = report.duplicate_rate().into();
        v["lost_rate"] = report.lost_rate().into();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("published rows        {:>10}", report.expected);
        println!("messages for them     {:>10}", report.delivered);
        println!("lost                  {:>10}   ({:.4}%)", report.lost, report.lost_rate() * 100.0);
        println!(
            "duplicated events     {:>10}   ({} extra copies, max {} copies, duplicate rate {:.4}%)",
            report.duplicated_events,
            report.duplicate_copies,
            report.max_copies,
            report.duplicate_rate() * 100.0
        );
        println!("per-key order errors  {:>10}", report.order_violations);
        for id in &report.lost_ids {
            println!("  lost: {id}");
        }
    }
    if report.lost > 0 {
        return Err(CliError::new(exit::PROBLEMS, format!("{} published event(s) are not in Kafka", report.lost)));
    }
    Ok(())
}
