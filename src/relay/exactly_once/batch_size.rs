//! The exactly-once batch size, adapted to `transaction.timeout.ms`.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use super::{EosError, ExactlyOnceRelay, Step};

impl ExactlyOnceRelay {
    /// A batch must fit in `transaction.timeout.ms` (send, acks, PREPARE and the
    /// commit), or the coordinator aborts it and the same batch comes back
    /// forever. So a batch that failed after most of that time, or succeeded
    /// after half of it, halves the next batches (down to 1); quick ones grow
    /// them back to `relay.batch_size`.
    pub(super) fn adapt_batch(&self, step: &Result<Step, EosError>, took: Duration) {
        let size = self.batch.load(AtomicOrdering::Relaxed);
        let failed = match step {
            Err(_) => true,
            Ok(Step::Batch { finished, .. }) => finished.retry > 0,
            Ok(_) => return,
        };
        let next = if (failed && took >= self.txn_timeout.mul_f32(0.8)) || took >= self.txn_timeout / 2 {
            (size / 2).max(1)
        } else if !failed && took < self.txn_timeout / 8 {
            (size * 2).min(self.cfg.batch_size)
        } else {
            size
        };
        if next < size {
            tracing::warn!(
                batch = size,
                took_ms = took.as_millis() as u64,
                txn_timeout_ms = self.txn_timeout.as_millis() as u64,
                next,
                "a batch took too long for transaction.timeout.ms; claiming smaller batches"
            );
        }
        self.batch.store(next, AtomicOrdering::Relaxed);
    }
}
