//! `outbox-relay status [--json]`.

use super::{exit, CliError};
use crate::config::Settings;
use crate::store::{describe, Status, Store};

pub async fn status(settings: Settings, json: bool) -> Result<(), CliError> {
    let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let status = store.status().await.map_err(|e| super::store_error(&store, e))?;
    if json {
        let text = serde_json::to_string_pretty(&status).map_err(|e| CliError::new(exit::SOFTWARE, e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", render(&status, &describe(store.pg_config())));
    }
    Ok(())
}

/// `status --json` with several outboxes: one JSON array, an object per outbox.
pub async fn json_array(targets: Vec<Settings>) -> Result<(), CliError> {
    let mut all = Vec::new();
    for settings in targets {
        let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
        all.push(store.status().await.map_err(|e| super::store_error(&store, e))?);
    }
    let text = serde_json::to_string_pretty(&all).map_err(|e| CliError::new(exit::SOFTWARE, e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn age(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) if s < 120.0 => format!("{s:.1}s"),
        Some(s) if s < 7200.0 => format!("{:.1}m", s / 60.0),
        Some(s) => format!("{:.1}h", s / 3600.0),
    }
}

pub fn render(s: &Status, where_: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!("outbox {} on {where_}\n", s.table));
    out.push_str(&format!("  pending     {:>10}   oldest {}\n", s.pending, age(s.oldest_pending_age_s)));
    if s.scheduled > 0 {
        out.push_str(&format!("  scheduled   {:>10}   (deliver_after still ahead)\n", s.scheduled));
    }
    out.push_str(&format!(
        "  published   {:>10} last 1m   {:>10} last 5m   {:>10} last 15m   (rows kept by on_publish = \"mark\")\n",
        s.published_1m, s.published_5m, s.published_15m
    ));
    out.push_str(&format!("  parked      {:>10}\n", s.parked));
    if s.prepared_batches > 0 {
        out.push_str(&format!(
            "  in doubt    {:>10} prepared exactly-once batch(es), oldest {} (a running relay resolves them)\n",
            s.prepared_batches,
            age(s.oldest_prepared_age_s)
        ));
    }
    if !s.top_errors.is_empty() {
        out.push_str("  most common errors of parked events:\n");
        for e in &s.top_errors {
            out.push_str(&format!("    {:>8}  {}\n", e.count, e.error));
        }
    }
    if !s.topics.is_empty() {
        let w = s.topics.iter().map(|t| t.topic.len()).max().unwrap_or(5).max(5);
        out.push_str(&format!(
            "\n  {:<w$}  {:>9}  {:>8}  {:>7}  {:>8}  {:>8}  {:>9}\n",
            "topic", "pending", "oldest", "parked", "pub 1m", "pub 5m", "pub 15m"
        ));
        for t in &s.topics {
            out.push_str(&format!(
                "  {:<w$}  {:>9}  {:>8}  {:>7}  {:>8}  {:>8}  {:>9}\n",
                t.topic,
                t.pending,
                age(t.oldest_pending_age_s),
                t.parked,
                t.published_1m,
                t.published_5m,
                t.published_15m
            ));
        }
    }
    out
}
