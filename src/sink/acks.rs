//! Delivery reports: librdkafka's delivery callback fills a per-batch tracker
//! (no future or channel per message), and librdkafka logs to `tracing`.

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::Notify;

use super::{classify, FailureClass, SendResult};

/// Where one batch's delivery reports land.
pub struct BatchAcks {
    results: Mutex<Vec<Option<SendResult>>>,
    remaining: AtomicUsize,
    done: Notify,
    size: usize,
}

impl BatchAcks {
    pub(super) fn new(n: usize) -> BatchAcks {
        BatchAcks { results: Mutex::new(vec![None; n]), remaining: AtomicUsize::new(n), done: Notify::new(), size: n }
    }

    /// The final result of event `i` (the first one counts).
    pub(super) fn set(&self, i: usize, r: SendResult) {
        let mut results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = results.get_mut(i) {
            if slot.is_none() {
                *slot = Some(r);
                drop(results);
                if self.remaining.fetch_sub(1, AtomicOrdering::AcqRel) == 1 {
                    self.done.notify_one();
                }
            }
        }
    }

    /// Waits for every result, noting every 30 s while Kafka does not answer
    /// (the relay bounds the wait itself: `relay.publish_timeout`).
    pub(super) async fn wait_all(&self) -> Vec<SendResult> {
        let started = Instant::now();
        let mut next_report = Duration::from_secs(30);
        while self.remaining.load(AtomicOrdering::Acquire) > 0 {
            let waited = started.elapsed();
            let left = next_report.saturating_sub(waited);
            if tokio::time::timeout(left, self.done.notified()).await.is_err() {
                tracing::warn!(
                    waiting_for = self.remaining.load(AtomicOrdering::Acquire),
                    batch = self.size,
                    waited_s = waited.as_secs(),
                    "Kafka has not acknowledged the whole batch yet; still retrying (is the cluster reachable?)"
                );
                next_report += Duration::from_secs(30);
            }
        }
        self.take()
    }

    pub(super) fn take(&self) -> Vec<SendResult> {
        let mut results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        results
            .drain(..)
            .map(|r| {
                r.unwrap_or(SendResult::Failed { class: FailureClass::Transient, error: "no delivery report".into() })
            })
            .collect()
    }
}

/// Routes delivery reports to their batch; librdkafka logs to `tracing`.
pub struct RelayContext {
    /// The last time the brokers refused the relay's credentials or TLS, and why.
    refused: Mutex<Option<(Instant, String)>>,
    /// The span the client was created in (the `outbox` span, in a process
    /// serving several outboxes): librdkafka logs from its own threads, where
    /// no span is current, so its lines enter this one to name their outbox.
    span: tracing::Span,
}

impl Default for RelayContext {
    /// A context for a client created now, in the current span.
    fn default() -> RelayContext {
        RelayContext::in_span(tracing::Span::current())
    }
}

/// Client errors of one kind are logged at most once per this long: while
/// Kafka is away librdkafka reports "all brokers down" and every failed
/// reconnect dozens of times a second, and the relay reports the outage itself.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

impl RelayContext {
    /// A context whose log lines belong to `span`: for a client created on a
    /// blocking thread, pass the span of the task that asked for it.
    pub fn in_span(span: tracing::Span) -> RelayContext {
        RelayContext { refused: Mutex::default(), span }
    }

    /// Why the brokers refused the relay's credentials or its TLS handshake, if
    /// they did within `within`: a wrong password is then named as such, not
    /// as "cannot reach the brokers".
    pub fn refused_recently(&self, within: Duration) -> Option<String> {
        let r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.as_ref().filter(|(at, _)| at.elapsed() <= within).map(|(_, why)| why.clone())
    }

    /// `Some(suppressed since the last line)` when this kind may be logged now.
    /// One budget for the whole process: the producer, the decisions probe and
    /// the admin clients all see the same outage and say it once between them.
    fn may_log(&self, kind: String) -> Option<u64> {
        static QUIET: Mutex<Option<std::collections::HashMap<String, (Instant, u64)>>> = Mutex::new(None);
        let mut guard = QUIET.lock().unwrap_or_else(|p| p.into_inner());
        let quiet = guard.get_or_insert_with(Default::default);
        let now = Instant::now();
        match quiet.get_mut(&kind) {
            Some((last, n)) if now.duration_since(*last) < ERROR_LOG_INTERVAL => {
                *n += 1;
                None
            }
            Some((last, n)) => {
                let suppressed = std::mem::take(n);
                *last = now;
                Some(suppressed)
            }
            None => {
                quiet.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for RelayContext {}

impl ClientContext for RelayContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        let _span = self.span.enter();
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                if let Some(suppressed) = self.may_log(format!("log/{fac}")) {
                    tracing::error!(target: "librdkafka", fac, suppressed, "{log_message}")
                }
            }
            L::Warning => {
                if let Some(suppressed) = self.may_log(format!("log/{fac}")) {
                    tracing::warn!(target: "librdkafka", fac, suppressed, "{log_message}")
                }
            }
            L::Notice | L::Info => tracing::info!(target: "librdkafka", fac, "{log_message}"),
            L::Debug => tracing::debug!(target: "librdkafka", fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Broker-down noise repeats while Kafka is away; the relay reports the
        // stalled batch and the outage itself, so keep these at warn, one line
        // per kind per ERROR_LOG_INTERVAL with the count of those left out.
        use rdkafka::types::RDKafkaErrorCode as C;
        let _span = self.span.enter();
        let code = error.rdkafka_error_code();
        if matches!(code, Some(C::Authentication | C::SaslAuthenticationFailed | C::SSL)) {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), reason.to_string()));
        }
        let kind = format!("error/{code:?}");
        if let Some(suppressed) = self.may_log(kind) {
            tracing::warn!(target: "librdkafka", %error, suppressed, "{reason}");
        }
    }
}

impl ProducerContext for RelayContext {
    /// The batch's acks, the event's index in it, and its producer span
    /// (`[tracing]`, when the row carried a `traceparent`).
    type DeliveryOpaque = Box<(Arc<BatchAcks>, usize, Option<opentelemetry_sdk::trace::Span>)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (acks, i, span) = *opaque;
        if let Some(span) = span {
            let landed = match result {
                Ok(m) => Ok((rdkafka::Message::partition(m), rdkafka::Message::offset(m))),
                Err((e, _)) => Err(e.to_string()),
            };
            crate::telemetry::otel::end_send_span(span, landed);
        }
        let r = match result {
            Ok(_) => SendResult::Delivered,
            Err((e, _)) => SendResult::Failed { class: classify(e), error: e.to_string() },
        };
        acks.set(i, r);
    }
}
