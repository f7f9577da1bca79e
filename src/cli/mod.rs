//! The command line: argument parsing, exit codes, and one file per subcommand.

mod check;
mod cleanup;
mod migrate;
mod replay;
mod run;
mod status;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::store::{describe, Store, StoreError};

pub use crate::exit;

/// A failure to report as one line on stderr, with its exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError { code, message: message.into() }
    }
}

impl From<crate::daemon::StartError> for CliError {
    fn from(e: crate::daemon::StartError) -> CliError {
        CliError::new(e.exit_code(), e.to_string())
    }
}

const AFTER_HELP: &str = "\
Configuration comes from an optional TOML file (--config, or ./outbox-relay.toml if
present) with OUTBOX_RELAY__SECTION__KEY environment variables on top.

Examples:
  export OUTBOX_RELAY__POSTGRES__URL=postgres://relay:secret@localhost:5432/app
  export OUTBOX_RELAY__KAFKA__BROKERS=localhost:9092
  outbox-relay migrate            # create the outbox table (or: migrate --print)
  outbox-relay check              # config, connectivity and schema; exit 0 if all is well
  outbox-relay run                # the daemon
  outbox-relay status             # backlog, parked events and their errors, per topic
  outbox-relay replay --parked    # put parked events back in the queue
  outbox-relay verify --since 1h  # prove it: compare Postgres with what Kafka holds

Exit codes: 0 ok, 1 check found problems, 64 bad config/arguments or an unmet
prerequisite, 65 schema missing or outdated, 69 Postgres unreachable, 70 other failure.";

/// Transactional outbox relay: publishes PostgreSQL outbox rows to Apache Kafka.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// TOML config file [default: ./outbox-relay.toml if it exists]
    #[arg(long, short = 'c', global = true, value_name = "FILE", env = "OUTBOX_RELAY_CONFIG")]
    pub config: Option<PathBuf>,

    /// With [[outboxes]]: the one outbox table to work on. `run`, `migrate`,
    /// `check` and `status` work on every configured outbox without it;
    /// `replay`, `cleanup` and `verify` need it when several are configured
    #[arg(long, global = true, value_name = "TABLE")]
    pub outbox: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay daemon: claim pending outbox rows, publish them, mark them.
    #[command(after_help = "\
Examples:
  outbox-relay run
  OUTBOX_RELAY__RELAY__ON_PUBLISH=delete outbox-relay run
  OUTBOX_RELAY__RELAY__DELIVERY=exactly-once OUTBOX_RELAY__RELAY__ID=relay-1 outbox-relay run
  outbox-relay --config /etc/outbox-relay.toml run

Stops on SIGTERM/SIGINT: stops claiming, finishes or releases the in-flight
batch, flushes the producer and exits 0 within relay.shutdown_timeout.

Exactly-once mode (relay.delivery = \"exactly-once\") needs Postgres
max_prepared_transactions > 0 and Kafka transactions; each running relay needs
its own stable relay.id. `outbox-relay check` verifies the prerequisites.")]
    Run,
    /// Apply the bundled schema migrations (or print their SQL with --print).
    #[command(after_help = "\
Examples:
  outbox-relay migrate                       # apply what is missing, record versions
  outbox-relay migrate --print > V1__outbox.sql   # for Flyway, Liquibase, sqlx, ...
  OUTBOX_RELAY__OUTBOX__TABLE=billing.outbox outbox-relay migrate --print

--print needs no database and only reads outbox.table from the configuration.")]
    Migrate {
        /// Write the SQL for the configured table to stdout instead of applying it.
        #[arg(long)]
        print: bool,
        /// Apply (or print) migrations up to this version only, e.g. to stage an upgrade.
        #[arg(long, value_name = "VERSION")]
        to: Option<i32>,
    },
    /// Validate config, connect to Postgres and Kafka, verify the schema.
    #[command(after_help = "\
Examples:
  outbox-relay check && echo ready
  outbox-relay check --start-gate           # config, Postgres and schema only: never Kafka

Prints one line per check; exits 0 only when everything is usable (1 when a check
found a problem). Use --start-gate, never the full check, for anything that gates a
start (an init container, a systemd ExecStartPre): a Kafka outage must not stop an
application or a relay from starting (the relay waits for Kafka by itself).")]
    Check {
        /// Check only what must hold for the relay to start (config, Postgres, schema,
        /// two-phase commit in exactly-once mode); do not contact Kafka.
        #[arg(long)]
        start_gate: bool,
    },
    /// Backlog, recent throughput and parked events, per topic.
    #[command(after_help = "\
Examples:
  outbox-relay status
  outbox-relay status --json | jq .pending

Reads only the partial indexes over pending, parked and recently published rows,
so it stays fast on tables with millions of rows.")]
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Put parked or published events back in the queue (same id, same seq).
    #[command(after_help = "\
Examples:
  outbox-relay replay --parked --dry-run
  outbox-relay replay --parked
  outbox-relay replay --id 0b6f…  --id 9c21…
  outbox-relay replay --topic orders --since 2h --yes
  outbox-relay replay --key order-42 --since \"2026-11-24 09:00:00+00\" --until \"2026-11-24 10:00:00+00\"

Without --parked, published rows match too (while relay.retention keeps them);
consumers deduplicate on the unchanged event_id. Replays of more than 1000 events
need --yes. Ctrl-C stops between batches and prints how to continue.")]
    Replay(replay::ReplayArgs),
    /// Delete published rows older than relay.retention (the running relay does this too).
    #[command(after_help = "\
Examples:
  outbox-relay cleanup
  outbox-relay cleanup --older-than 1d

Deletes in batches of 1000 with SKIP LOCKED: no long locks, no contention with claims.")]
    Cleanup {
        /// Override relay.retention.
        #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
    },
    /// Compare published rows with the messages in Kafka: lost, duplicated, out of order.
    #[command(after_help = "\
Examples:
  outbox-relay verify --since 1h
  outbox-relay verify --topic orders --since \"2026-11-24 00:00:00+00\" --until 1h --json

Reads the topics with a read_committed consumer from the beginning to their current
end. Needs on_publish = \"mark\" (rows kept for relay.retention). Exits 1 if any
published event is missing from Kafka.")]
    Verify(verify::VerifyArgs),
}

/// A store failure as a CLI error: unreachable → 69, anything else → 70.
pub(crate) fn store_error(store: &Store, e: StoreError) -> CliError {
    let code = if e.code().is_none() && e.is_transient() { exit::UNAVAILABLE } else { exit::SOFTWARE };
    CliError::new(code, format!("{} on {}: {e}", store.table(), describe(store.pg_config())))
}

/// A `--since/--until` value: an age ("2h" = two hours ago) or a timestamp Postgres accepts.
pub(crate) async fn parse_time_arg(store: &Store, flag: &str, value: &str) -> Result<String, CliError> {
    let candidate = match humantime::parse_duration(value.trim()) {
        Ok(d) => humantime::format_rfc3339_micros(std::time::SystemTime::now() - d).to_string(),
        Err(_) => value.to_string(),
    };
    store.parse_time(&candidate).await.map_err(|e| {
        if e.code().is_some() {
            CliError::new(
                exit::USAGE,
                format!("{flag} {value:?} is not a time: use e.g. \"2026-11-24 10:00:00+00\" or an age like \"2h\""),
            )
        } else {
            store_error(store, e)
        }
    })
}

/// Parses arguments, loads the configuration and runs the subcommand.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => exit::USAGE,
                _ => exit::USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-relay: error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

fn dispatch(cli: Cli) -> Result<(), CliError> {
    if let Command::Migrate { print: true, to } = cli.command {
        return migrate::print(cli.config.as_deref(), to, cli.outbox.as_deref());
    }
    // Commands that never contact Kafka do not require its settings.
    let kafka_needed = matches!(cli.command, Command::Run | Command::Check { .. } | Command::Verify(_));
    let loaded = if kafka_needed {
        Settings::load(cli.config.as_deref())
    } else {
        Settings::load_postgres_only(cli.config.as_deref())
    };
    let settings = loaded.map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    crate::telemetry::init(&settings.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outbox-relay")
        .build()
        .map_err(|e| CliError::new(exit::SOFTWARE, format!("cannot start the async runtime: {e}")))?;
    let targets = select_outboxes(&settings, cli.outbox.as_deref())?;
    let one = match targets.as_slice() {
        [only] => Ok(only.clone()),
        _ => Err(CliError::new(
            exit::USAGE,
            format!(
                "{} outboxes are configured ({}): pick one with --outbox <table>",
                targets.len(),
                targets.iter().map(|t| t.table().to_string()).collect::<Vec<_>>().join(", ")
            ),
        )),
    };
    let several = targets.len() > 1;
    runtime.block_on(async move {
        match cli.command {
            Command::Run if cli.outbox.is_some() => run::run(one?).await,
            Command::Run => run::run(settings).await,
            Command::Migrate { to, .. } => each(targets, |t| migrate::apply(t, to)).await,
            Command::Check { start_gate } => each(targets, |t| check::check(t, start_gate)).await,
            Command::Status { json: true } if several => status::json_array(targets).await,
            Command::Status { json } => each(targets, |t| status::status(t, json)).await,
            Command::Replay(args) => replay::replay(one?, args).await,
            Command::Cleanup { older_than } => cleanup::cleanup(one?, older_than).await,
            Command::Verify(args) => verify::verify(one?, args).await,
        }
    })
}

/// The outboxes a command works on: every configured one, or the one
/// `--outbox` names (it must be configured).
fn select_outboxes(settings: &Settings, outbox: Option<&str>) -> Result<Vec<Settings>, CliError> {
    let all = settings.outbox_settings();
    let Some(wanted) = outbox else { return Ok(all) };
    let wanted_name = crate::config::TableName::parse(wanted)
        .map_err(|e| CliError::new(exit::USAGE, format!("--outbox {wanted:?}: {e}")))?;
    let found: Vec<Settings> = all.iter().filter(|s| s.table() == wanted_name).cloned().collect();
    if found.is_empty() {
        let known: Vec<String> = all.iter().map(|s| s.table().to_string()).collect();
        return Err(CliError::new(
            exit::USAGE,
            format!("--outbox {wanted}: not a configured outbox (configured: {})", known.join(", ")),
        ));
    }
    Ok(found)
}

/// Runs `f` for each outbox in turn, all of them even when one fails; the
/// first failure is the result.
async fn each<F, Fut>(targets: Vec<Settings>, f: F) -> Result<(), CliError>
where
    F: Fn(Settings) -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>>,
{
    let several = targets.len() > 1;
    let mut first_error = None;
    for t in targets {
        if several {
            println!("== outbox {}", t.table());
        }
        if let Err(e) = f(t).await {
            if several {
                eprintln!("outbox-relay: error: {}", e.message);
            }
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
