//! The command line: argument parsing, exit codes, and one file per subcommand.

mod check;
mod migrate;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;

/// Exit codes (sysexits.h), so scripts and init containers can tell failures apart.
pub mod exit {
    /// `check` found at least one problem (each printed on its own line).
    pub const PROBLEMS: u8 = 1;
    /// Invalid configuration or command-line arguments.
    pub const USAGE: u8 = 64;
    /// The outbox schema is missing or outdated.
    pub const SCHEMA: u8 = 65;
    /// Postgres or Kafka unreachable (after `relay.startup_timeout`).
    pub const UNAVAILABLE: u8 = 69;
    /// Any other runtime failure.
    pub const SOFTWARE: u8 = 70;
}

/// A failure to report as one line on stderr, with its exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
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

Exit codes: 0 ok, 1 check found problems, 64 bad config/arguments,
65 schema missing or outdated, 69 Postgres/Kafka unreachable, 70 other failure.";

/// Transactional outbox relay: publishes PostgreSQL outbox rows to Apache Kafka.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about, after_help = AFTER_HELP)]
pub struct Cli {
    /// TOML config file [default: ./outbox-relay.toml if it exists]
    #[arg(
        long,
        short = 'c',
        global = true,
        value_name = "FILE",
        env = "OUTBOX_RELAY_CONFIG"
    )]
    pub config: Option<PathBuf>,

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
  outbox-relay --config /etc/outbox-relay.toml run

Stops on SIGTERM/SIGINT: stops claiming, finishes or releases the in-flight
batch, flushes the producer and exits 0 within relay.shutdown_timeout.")]
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
    },
    /// Validate config, connect to Postgres and Kafka, verify the schema.
    #[command(after_help = "\
Examples:
  outbox-relay check && echo ready
  outbox-relay --config relay.toml check      # e.g. as a Kubernetes init container

Prints one line per check; exits 0 only when everything is usable.")]
    Check,
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
    if let Command::Migrate { print: true } = cli.command {
        return migrate::print(cli.config.as_deref());
    }
    let settings = Settings::load(cli.config.as_deref())
        .map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    crate::telemetry::init(&settings.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("outbox-relay")
        .build()
        .map_err(|e| {
            CliError::new(
                exit::SOFTWARE,
                format!("cannot start the async runtime: {e}"),
            )
        })?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run => run::run(settings).await,
            Command::Migrate { .. } => migrate::apply(settings).await,
            Command::Check => check::check(settings).await,
        }
    })
}
