//! Exit codes (sysexits.h), so scripts, init systems and operators can tell
//! failures apart. systemd's unit does not restart on 64 and 65: they need a
//! person, not a restart loop.

/// `check` found at least one problem (each printed on its own line).
pub const PROBLEMS: u8 = 1;
/// Invalid configuration or command-line arguments, or a prerequisite no retry
/// can fix (Postgres two-phase commit off, an untrusted decisions topic,
/// another live relay with this exactly-once relay.id).
pub const USAGE: u8 = 64;
/// The outbox schema is missing or outdated.
pub const SCHEMA: u8 = 65;
/// Postgres unreachable (after `relay.startup_timeout`), or a command could not
/// reach Postgres or Kafka.
pub const UNAVAILABLE: u8 = 69;
/// Any other runtime failure.
pub const SOFTWARE: u8 = 70;
