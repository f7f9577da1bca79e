//! How long an idle relay waits before it looks at the outbox again.

use std::time::{Duration, Instant};

/// An eighth of how long the outbox has been empty, at least 1 ms, at most
/// `relay.poll_interval`. Right after a batch the relay looks again within a
/// millisecond or two (an event rarely waits), and an outbox empty for minutes
/// costs Postgres one cheap look per `poll_interval`. No NOTIFY is needed, so
/// nothing runs in the application's commit (see migration 0003).
#[derive(Debug, Clone)]
pub struct IdleWait {
    since: Option<Instant>,
    max: Duration,
}

impl IdleWait {
    pub fn new(max: Duration) -> IdleWait {
        IdleWait { since: None, max }
    }

    /// Work was found.
    pub fn busy(&mut self) {
        self.since = None;
    }

    /// Nothing was found: how long to wait now.
    pub fn wait(&mut self) -> Duration {
        let since = *self.since.get_or_insert_with(Instant::now);
        (since.elapsed() / 8).clamp(Duration::from_millis(1), self.max)
    }
}
