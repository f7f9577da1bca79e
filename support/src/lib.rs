//! The test kit of outbox-relay, one for the integration tests and the bench
//! and chaos harnesses: the local infrastructure and its locks (`infra`), relay
//! processes that die with their parent (`process`, `relay`), an outbox table
//! per test (`outbox`), the application (`writer`), topics (`topics`),
//! read-back through `outbox_relay::verify` (`readback`), latency (`latency`),
//! what the machine spent (`meter`), figures (`report`), and the chaos run's
//! duplicate accounting (`accounting`).
//!
//! Everything is re-exported at the top: `use outbox_relay_support::*;`.

pub mod accounting;
pub mod infra;
pub mod latency;
pub mod meter;
pub mod outbox;
pub mod process;
pub mod readback;
pub mod relay;
pub mod report;
pub mod topics;
pub mod writer;

pub use infra::*;
pub use latency::*;
pub use meter::*;
pub use outbox::*;
pub use process::*;
pub use readback::*;
pub use relay::*;
pub use report::*;
pub use topics::*;
pub use writer::*;
