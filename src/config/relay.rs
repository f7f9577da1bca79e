//! `[relay]`: the loop's batch size, pacing, failure policy, delivery mode and
//! time bounds.

use std::time::Duration;

use serde::Deserialize;

use super::{duration, string_enum, ConfigError};

/// What happens to a row once Kafka acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPublish {
    /// Set `published_at`; the row is kept for `relay.retention` (replay, audit).
    Mark,
    /// Delete the row at once (fastest).
    Delete,
}

/// Ordering policy for events that are parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Per-key order; a parked event is skipped so its key keeps flowing.
    PerKey,
    /// Per-key order; a parked event blocks later events of its key until replayed.
    Strict,
}

/// Delivery semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every event at least once; a crash may republish the in-flight batch.
    AtLeastOnce,
    /// Kafka transactions; read_committed consumers see each event once.
    ExactlyOnce,
}

/// Where a Kafka message's timestamp comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageTimestamp {
    /// The row's `created_at`: when the application wrote the event.
    CreatedAt,
    /// Left to the producer: the time the relay sends it.
    SendTime,
}

string_enum!(MessageTimestamp { "created_at" => CreatedAt, "send_time" => SendTime });
string_enum!(OnPublish { "mark" => Mark, "delete" => Delete });
string_enum!(Ordering { "per-key" => PerKey, "strict" => Strict });
string_enum!(Delivery { "at-least-once" => AtLeastOnce, "exactly-once" => ExactlyOnce });

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Name of this relay instance (logs, metrics, the `outbox_relay_id` header;
    /// in exactly-once mode part of the Kafka transactional id, so unique per
    /// running relay and stable across its restarts). Defaults to the host name.
    #[serde(default)]
    pub id: Option<String>,
    /// Rows claimed per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// At-least-once: how many batches one relay may have in flight while it
    /// drains a backlog (claimed, handed to the producer, not yet recorded).
    /// 1 claims the next batch only once the last one is committed; 2 claims
    /// batch N+1 while N waits for Kafka; 3 claims N+2 as well while N is
    /// recorded. A relay that crashes republishes at most this many batches.
    /// Past 2, only a backlog goes deeper: a claim that finds less than a full
    /// batch is followed by the oldest batch's commit, as at 2. Exactly-once
    /// batches are never pipelined.
    #[serde(default = "default_pipeline_depth")]
    pub pipeline_depth: usize,
    /// Longest wait between two looks at the outbox while it is empty. The wait
    /// starts at 1 ms when the outbox runs dry and grows with the idle time (an
    /// eighth of it) up to this; a busy relay never waits.
    #[serde(default = "default_poll_interval", with = "duration")]
    pub poll_interval: Duration,
    /// After a claim that found fewer rows than `batch_size`, the next claim
    /// waits until this long after it started: a relay that keeps up with a
    /// steady stream claims at most once per `linger` instead of as often as it
    /// can, so each claim, mark and commit carries more events and the
    /// database does less work per event. Adds at most this to an event's
    /// latency. A full batch is followed at once (a backlog drains at full
    /// speed); `0s` claims again at once.
    #[serde(default = "default_linger", with = "duration")]
    pub linger: Duration,
    /// The longest that wait grows to while the database is busy: it grows
    /// with how much longer a third of the recent claims take than the
    /// quickest recent one of about as many rows, beyond the 2 ms a quiet
    /// database's claims spread by themselves (15 ms of wait per millisecond
    /// beyond it; one slow claim now and then does not count), so on a busy
    /// database each round carries more events and costs the application
    /// less, and events wait longer. At or below `linger` (`0s`), the wait
    /// never grows.
    #[serde(default = "default_max_linger", with = "duration")]
    pub max_linger: Duration,
    /// How often the relay looks for pending rows below its floor (one statement
    /// on its own connection, off the claim path): the safety net for replayed
    /// events whose notification was lost. Under a held xmin horizon that look
    /// passes every dead entry once; no claim waits for it.
    #[serde(default = "default_sweep_interval", with = "duration")]
    pub sweep_interval: Duration,
    /// How long a claimed batch may wait for Kafka's acknowledgements while its
    /// rows are held in an open Postgres transaction. Past it the relay drops what
    /// the producer still holds, gives the batch back (its rows are pending
    /// again, in order), holds nothing on the database, and claims again only
    /// once Kafka answers: a Kafka outage never holds the database's xmin horizon
    /// longer than this.
    #[serde(default = "default_publish_timeout", with = "duration")]
    pub publish_timeout: Duration,
    /// `mark` (keep published rows for `retention`) or `delete`.
    #[serde(default = "default_on_publish")]
    pub on_publish: OnPublish,
    /// How long published rows are kept with `on_publish = "mark"`.
    #[serde(default = "default_retention", with = "duration")]
    pub retention: Duration,
    /// Permanent failures of one event before it is parked.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First delay before a rejected event is tried again; doubles per attempt, at
    /// most 5 minutes. Later events of its key wait meanwhile; other keys flow.
    #[serde(default = "default_retry_backoff", with = "duration")]
    pub retry_backoff: Duration,
    /// The Kafka message timestamp: `created_at` (the row's, when the
    /// application wrote the event) or `send_time` (the producer's clock when
    /// the relay sends it). A topic with `message.timestamp.type=LogAppendTime`
    /// replaces either with the broker's.
    #[serde(default = "default_message_timestamp")]
    pub message_timestamp: MessageTimestamp,
    /// `per-key` or `strict` (a parked event blocks its own key).
    #[serde(default = "default_ordering")]
    pub ordering: Ordering,
    /// `at-least-once` or `exactly-once`.
    #[serde(default = "default_delivery")]
    pub delivery: Delivery,
    /// Exactly-once: a relay resolves another relay's prepared batch (fencing
    /// that relay's Kafka transactional id) once it is older than this.
    #[serde(default = "default_recovery_timeout", with = "duration")]
    pub recovery_timeout: Duration,
    /// Exactly-once: the compacted, single-partition topic that records each
    /// batch's commit decision inside its Kafka transaction.
    #[serde(default = "default_commits_topic")]
    pub commits_topic: String,
    /// On SIGTERM/SIGINT: time to finish (or release) the in-flight batch and flush.
    #[serde(default = "default_shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// At start-up, keep retrying an unreachable Postgres this long before
    /// exiting (69); `0s` waits for as long as it takes (a sidecar: an exited
    /// sidecar makes its pod unready). An unreachable Kafka never stops the
    /// relay: it waits, holding nothing on the database, and starts relaying
    /// when Kafka answers.
    #[serde(default = "default_startup_timeout", with = "duration")]
    pub startup_timeout: Duration,
    /// Upper bound of the exponential back-off after transient failures.
    #[serde(default = "default_max_backoff", with = "duration")]
    pub max_backoff: Duration,
}

fn default_batch_size() -> usize {
    500
}
fn default_pipeline_depth() -> usize {
    2
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_linger() -> Duration {
    Duration::from_millis(5)
}
fn default_max_linger() -> Duration {
    // Beside an application saturating the 2-core test host, 50 ms let it
    // commit 0.83-1.01 of its rate with no relay, against 0.60-0.79 with the
    // wait fixed at 5 ms; 25 ms did not help (docs/performance.md,
    // `relay.max_linger`). On a quiet database the wait stays at `linger`.
    Duration::from_millis(50)
}
fn default_sweep_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_publish_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_on_publish() -> OnPublish {
    OnPublish::Mark
}
fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_max_attempts() -> u32 {
    10
}
fn default_retry_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_message_timestamp() -> MessageTimestamp {
    MessageTimestamp::CreatedAt
}
fn default_ordering() -> Ordering {
    Ordering::PerKey
}
fn default_delivery() -> Delivery {
    Delivery::AtLeastOnce
}
fn default_recovery_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_commits_topic() -> String {
    "__outbox_relay_commits".into()
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            id: None,
            batch_size: default_batch_size(),
            pipeline_depth: default_pipeline_depth(),
            poll_interval: default_poll_interval(),
            linger: default_linger(),
            max_linger: default_max_linger(),
            sweep_interval: default_sweep_interval(),
            publish_timeout: default_publish_timeout(),
            on_publish: default_on_publish(),
            retention: default_retention(),
            max_attempts: default_max_attempts(),
            retry_backoff: default_retry_backoff(),
            message_timestamp: default_message_timestamp(),
            ordering: default_ordering(),
            delivery: default_delivery(),
            recovery_timeout: default_recovery_timeout(),
            commits_topic: default_commits_topic(),
            shutdown_timeout: default_shutdown_timeout(),
            startup_timeout: default_startup_timeout(),
            max_backoff: default_max_backoff(),
        }
    }
}

impl RelayConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.id {
            let ok =
                !id.is_empty() && id.len() <= 100 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(ConfigError::key(
                    "relay.id",
                    "must be 1-100 characters of letters, digits, '-', '_' or '.'",
                ));
            }
        }
        if !(1..=50_000).contains(&self.batch_size) {
            return Err(ConfigError::key("relay.batch_size", "must be between 1 and 50000"));
        }
        if !(1..=3).contains(&self.pipeline_depth) {
            return Err(ConfigError::key("relay.pipeline_depth", "must be 1, 2 or 3"));
        }
        let at_least = |key: &str, value: Duration, min: Duration, text: &str| {
            if value < min {
                Err(ConfigError::key(key, format!("must be at least {text}")))
            } else {
                Ok(())
            }
        };
        at_least("relay.poll_interval", self.poll_interval, Duration::from_millis(10), "10ms")?;
        at_least("relay.sweep_interval", self.sweep_interval, Duration::from_secs(1), "1s")?;
        if self.linger > Duration::from_secs(1) {
            return Err(ConfigError::key("relay.linger", "must be at most 1s: every event may wait this long"));
        }
        if self.max_linger > Duration::from_secs(1) {
            return Err(ConfigError::key("relay.max_linger", "must be at most 1s: every event may wait this long"));
        }
        at_least("relay.publish_timeout", self.publish_timeout, Duration::from_secs(1), "1s")?;
        if self.publish_timeout > Duration::from_secs(600) {
            return Err(ConfigError::key(
                "relay.publish_timeout",
                "must be at most 10m: it bounds how long a Kafka outage may hold the database's xmin horizon",
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::key("relay.max_attempts", "must be at least 1"));
        }
        at_least("relay.recovery_timeout", self.recovery_timeout, Duration::from_secs(1), "1s")?;
        let topic = &self.commits_topic;
        if topic.is_empty()
            || topic.len() > 249
            || !topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            || topic == "."
            || topic == ".."
        {
            return Err(ConfigError::key(
                "relay.commits_topic",
                "must be a Kafka topic name: 1-249 characters of letters, digits, '.', '_' or '-'",
            ));
        }
        at_least("relay.max_backoff", self.max_backoff, Duration::from_millis(100), "100ms")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::load_env;

    #[test]
    fn an_unknown_topic_must_fail_before_the_publish_timeout() {
        let prop = "OUTBOX_RELAY__KAFKA__PROPERTIES__topic.metadata.propagation.max.ms";
        assert!(load_env(&[(prop, "10000")]).is_ok());
        for (bad, timeout) in [("20000", "20s"), ("5000", "5s"), ("soon", "20s")] {
            let err = load_env(&[(prop, bad), ("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", timeout)]).unwrap_err();
            let err = err.to_string();
            assert!(
                err.contains("topic.metadata.propagation.max.ms") && err.contains("relay.publish_timeout"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_publish_timeout_is_bounded_both_ways() {
        assert_eq!(load_env(&[]).unwrap().relay.publish_timeout, std::time::Duration::from_secs(20));
        for bad in ["500ms", "1h"] {
            let err = load_env(&[("OUTBOX_RELAY__RELAY__PUBLISH_TIMEOUT", bad)]).unwrap_err().to_string();
            assert!(err.contains("relay.publish_timeout"), "{bad}: {err}");
        }
    }
}
