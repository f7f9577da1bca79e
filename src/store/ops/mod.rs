//! Operator queries, one file per command: status, replay, retention
//! clean-up, and the published rows `verify` compares with Kafka. Each reads
//! through a partial index (pending, published or parked) so its cost follows
//! what it selects, not the table.

mod cleanup;
mod published;
mod replay;
mod status;

pub use cleanup::CLEANUP_BATCH;
pub use published::PublishedRow;
pub use replay::{ReplayRow, Selector};
pub use status::{ErrorCount, Status, TopicStatus};
