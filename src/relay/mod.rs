//! The loops that join store and sink: claim a batch, publish it, wait for
//! every delivery report (at most `relay.publish_timeout`), record the outcome,
//! commit. `at_least_once.rs` pipelines two batches; `exactly_once.rs` runs
//! the Kafka-transaction protocol one batch at a time; `recovery.rs` resolves
//! prepared batches a relay left behind; `outcome.rs` says what a result means
//! for its row; `kafka_gate.rs` keeps the loops from claiming while Kafka is
//! away. Both loops back off after failures and never give up on a transient one.

mod at_least_once;
mod backoff;
mod exactly_once;
mod idle;
mod kafka_gate;
mod linger;
mod outcome;
mod recovery;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use at_least_once::Relay;
pub use backoff::Backoff;
pub use exactly_once::{EosError, ExactlyOnceRelay};
pub use idle::IdleWait;
pub use kafka_gate::KafkaGate;
pub use linger::Linger;
pub use outcome::outcome_of;
pub use recovery::{Recovery, ResolveError, Resolved};

use crate::store::Finished;

/// What one step of a loop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing was pending.
    Idle,
    /// A batch was claimed and finished.
    Batch { claimed: usize, finished: Finished },
    /// Every claimed row waits for another relay's earlier event of its key.
    Deferred { rows: usize },
}

/// Counters the loop keeps (read by logs and tests).
#[derive(Debug, Default)]
pub struct Counters {
    pub published: AtomicU64,
    pub failed: AtomicU64,
    pub batches: AtomicU64,
}

impl Counters {
    fn add(&self, finished: &Finished) {
        self.published.fetch_add(finished.published as u64, Relaxed);
        self.failed.fetch_add(finished.failed as u64, Relaxed);
        self.batches.fetch_add(1, Relaxed);
    }
}
