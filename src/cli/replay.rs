//! `outbox-relay replay`: put parked or published events back in the queue.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use uuid::Uuid;

use super::{exit, CliError};
use crate::config::Settings;
use crate::store::{Selector, Store};

/// Replays larger than this need `--yes`.
pub const CONFIRM_ABOVE: i64 = 1000;

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Only parked events (otherwise parked and published ones match).
    #[arg(long)]
    pub parked: bool,
    /// This event (repeatable).
    #[arg(long = "id", value_name = "UUID")]
    pub ids: Vec<Uuid>,
    /// Events of this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Events with this key.
    #[arg(long)]
    pub key: Option<String>,
    /// Created at or after: a timestamp ("2026-11-24 10:00:00+00") or an age ("2h").
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Created before: a timestamp or an age.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Continue an interrupted replay after this seq (it prints the value).
    #[arg(long, value_name = "SEQ")]
    pub after_seq: Option<i64>,
    /// Show what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Confirm a replay of more than 1000 events.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Rows per transaction.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000))]
    pub batch_size: i64,
}

pub async fn replay(settings: Settings, args: ReplayArgs) -> Result<(), CliError> {
    if !args.parked
        && args.ids.is_empty()
        && args.topic.is_none()
        && args.key.is_none()
        && args.since.is_none()
        && args.until.is_none()
    {
        return Err(CliError::new(
            exit::USAGE,
            "choose what to replay: --parked, --id UUID, --topic, --key, --since/--until (see `outbox-relay replay --help`)",
        ));
    }
    let store = Store::new(&settings).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let mut sel = Selector {
        parked: args.parked,
        ids: args.ids.clone(),
        topic: args.topic.clone(),
        key: args.key.clone(),
        since: None,
        until: None,
        after_seq: args.after_seq,
    };
    if let Some(v) = &args.since {
        sel.since = Some(super::parse_time_arg(&store, "--since", v).await?);
    }
    if let Some(v) = &args.until {
        sel.until = Some(super::parse_time_arg(&store, "--until", v).await?);
    }
    let (total, sample) = store.replay_preview(&sel, 10).await.map_err(|e| super::store_error(&store, e))?;
    if total == 0 {
        println!("nothing matches: no parked or published event in {} fits this selection", store.table());
        return Ok(());
    }
    if args.dry_run {
        println!(
            "dry run: would put {total} event(s) of {} back in the queue (same id, same seq); first ones:",
            store.table()
        );
        for r in &sample {
            println!("  seq {:>10}  {}  {:<9}  {}", r.seq, r.id, r.state, r.topic);
        }
        if total > sample.len() as i64 {
            println!("  … and {} more", total - sample.len() as i64);
        }
        return Ok(());
    }
    if total > CONFIRM_ABOVE && !args.yes {
        return Err(CliError::new(
            exit::USAGE,
            format!("this replays {total} events (more than {CONFIRM_ABOVE}); check with --dry-run, then add --yes"),
        ));
    }
    replay_all(&store, sel, total, args.batch_size).await
}

/// Replays in batches with progress; Ctrl-C stops between batches and says how
/// to continue.
async fn replay_all(store: &Store, mut sel: Selector, total: i64, batch_size: i64) -> Result<(), CliError> {
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(total as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events replayed ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut done: u64 = 0;
    let mut interrupted = false;
    let mut last_report = std::time::Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let step = tokio::select! {
            r = store.replay_batch(&sel, batch_size) => r.map_err(|e| super::store_error(store, e))?,
            _ = &mut ctrl_c => { interrupted = true; break; }
        };
        let (n, max_seq) = step;
        if n == 0 {
            break;
        }
        done += n;
        sel.after_seq = max_seq.or(sel.after_seq);
        bar.set_position(done.min(total as u64));
        if bar.is_hidden() && last_report.elapsed() > Duration::from_secs(2) {
            eprintln!("replayed {done}/{total}");
            last_report = std::time::Instant::now();
        }
    }
    bar.finish_and_clear();
    if interrupted {
        let resume = sel.after_seq.map(|s| format!(" --after-seq {s}")).unwrap_or_default();
        println!("interrupted: {done} of {total} event(s) replayed; to continue, rerun the same command with{resume}");
        return Err(CliError::new(exit::SOFTWARE, "replay interrupted"));
    }
    println!("replayed {done} event(s) of {}: pending again with their original id and seq", store.table());
    Ok(())
}
