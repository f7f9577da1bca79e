//! The rdkafka producer behind [`Sink`]: one idempotent (or, for exactly-once,
//! transactional) producer (`polled.rs`) whose delivery callback fills a per-batch
//! tracker, replaced after a fatal error or when the relay abandons what it
//! holds. Each replacement starts a new producer epoch (see [`Epoch`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, PurgeConfig};

use super::acks::{BatchAcks, RelayContext};
use super::{classify, producer_config, Epoch, SendResult, Sent, Sink, SinkError, RELAY_ID_HEADER};
use crate::config::{CloudEventsConfig, MessageTimestamp, Settings};
use crate::event::{parse_headers, OutboxEvent, EVENT_ID_HEADER};
use crate::telemetry::events::ProducerRebuilt;
use crate::telemetry::otel;
use crate::telemetry::Emit;

/// What a delivery report hands back: the batch's acks and the event's index.
type Opaque = <RelayContext as ProducerContext>::DeliveryOpaque;
/// One event's message, ready for the producer.
type Record<'a> = BaseRecord<'a, [u8], [u8], Opaque>;

pub(super) type RelayProducer = super::polled::Polled<RelayContext>;

/// Kafka through one idempotent (or transactional) producer at a time.
pub struct KafkaSink {
    pub(super) config: ClientConfig,
    relay_id: String,
    /// Stamp each message with its row's `created_at`.
    created_at_timestamps: bool,
    /// The CloudEvents mapping, when enabled.
    cloudevents: Option<CloudEventsConfig>,
    /// Producer spans for rows with a `traceparent`, when `[tracing]` is on.
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// The producer and its epoch, replaced together.
    current: RwLock<(Epoch, RelayProducer)>,
    rebuilds: AtomicU64,
}

impl KafkaSink {
    /// The Kafka message of one event: its topic, key, payload, headers (the
    /// row's, then `event_id` and `outbox_relay_id`), partition when the row
    /// names one, and timestamp. Err: the row's headers or partition are
    /// malformed.
    fn record<'a>(&self, ev: &'a OutboxEvent, acks: &Arc<BatchAcks>, i: usize) -> Result<Record<'a>, String> {
        let mut headers = parse_headers(&ev.headers, &ev.id)?;
        let id = ev.id.to_string();
        let span = self.tracer.as_ref().and_then(|tracer| {
            let get = |n: &str| headers.iter().find(|(k, _)| k == n).and_then(|(_, v)| v.as_deref());
            let parent = otel::parse_traceparent(get("traceparent")?, get("tracestate"))?;
            let span = otel::start_send_span(tracer, parent, ev.claimed, &ev.topic, &id, ev.key.as_deref());
            // The message carries the relay's span as its parent.
            let mine = otel::traceparent(opentelemetry::trace::Span::span_context(&span));
            for (_, value) in headers.iter_mut().filter(|(k, _)| k == "traceparent") {
                *value = Some(mine.clone());
            }
            Some(span)
        });
        let opaque: Opaque = Box::new((acks.clone(), i, span));
        let mut kafka_headers = OwnedHeaders::new_with_capacity(headers.len() + 2)
            .insert(Header { key: EVENT_ID_HEADER, value: Some(id.as_bytes()) })
            .insert(Header { key: RELAY_ID_HEADER, value: Some(self.relay_id.as_bytes()) });
        for (name, value) in &headers {
            kafka_headers = kafka_headers.insert(Header { key: name, value: value.as_deref().map(str::as_bytes) });
        }
        if let Some(ce) = &self.cloudevents {
            for (name, value) in cloudevents_headers(ce, ev, &headers)? {
                kafka_headers = kafka_headers.insert(Header { key: name, value: Some(value.as_bytes()) });
            }
        }
        let mut record = BaseRecord::with_opaque_to(&ev.topic, opaque).headers(kafka_headers);
        if let Some(key) = &ev.key {
            record = record.key(key.as_bytes());
        }
        if let Some(payload) = &ev.payload {
            record = record.payload(payload.as_slice());
        }
        match ev.partition {
            // librdkafka reads -1 as "let the partitioner decide".
            Some(p) if p < 0 => return Err(format!("malformed partition: {p} is negative (NULL lets the key decide)")),
            Some(p) => record = record.partition(p),
            None => {}
        }
        if self.created_at_timestamps {
            record = record.timestamp(ev.created_at_us.div_euclid(1000));
        }
        Ok(record)
    }

    /// An idempotent producer (at-least-once mode; also what `check` pings with).
    pub fn new(settings: &Settings) -> Result<KafkaSink, SinkError> {
        Self::build_sink(settings, None)
    }

    /// A transactional producer with this transactional id (exactly-once mode).
    pub fn transactional(settings: &Settings, transactional_id: &str) -> Result<KafkaSink, SinkError> {
        Self::build_sink(settings, Some(transactional_id))
    }

    fn build_sink(settings: &Settings, transactional_id: Option<&str>) -> Result<KafkaSink, SinkError> {
        let mut config = ClientConfig::new();
        for (k, v) in producer_config(settings, transactional_id) {
            config.set(k, v);
        }
        let producer = build(&config)?;
        Ok(KafkaSink {
            config,
            relay_id: settings.relay_id(),
            created_at_timestamps: settings.relay.message_timestamp == MessageTimestamp::CreatedAt,
            cloudevents: settings.cloudevents.enabled.then(|| settings.cloudevents.clone()),
            tracer: otel::tracer(&settings.tracing).map_err(|e| SinkError::config("tracing", e))?,
            current: RwLock::new((0, producer)),
            rebuilds: Default::default(),
        })
    }

    /// How often the producer was replaced (fatal errors, abandoned batches).
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds.load(AtomicOrdering::Relaxed)
    }

    pub(super) fn producer(&self) -> RelayProducer {
        self.current().1
    }

    fn current(&self) -> (Epoch, RelayProducer) {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        (guard.0, guard.1.clone())
    }

    fn epoch(&self) -> Epoch {
        self.current.read().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Puts `fresh` in place of the current producer under a new epoch, then
    /// drops what the old one still had queued or in flight (its pending results
    /// resolve as failures). A `send` that was still handing events to the old
    /// producer notices the new epoch when it is done and purges again.
    pub(super) fn install(&self, fresh: RelayProducer) {
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        let epoch = guard.0 + 1;
        let (_, old) = std::mem::replace(&mut *guard, (epoch, fresh));
        drop(guard);
        old.purge(PurgeConfig::default().queue().inflight());
    }

    /// Replaces the producer (a fatal error, or the relay gave up on a batch).
    fn rebuild(&self, reason: &'static str, detail: &str) {
        ProducerRebuilt { reason, detail }.emit();
        self.rebuilds.fetch_add(1, AtomicOrdering::Relaxed);
        match build(&self.config) {
            Ok(p) => self.install(p),
            Err(e) => {
                // Still a new epoch, and nothing of the old one may go out.
                tracing::error!(error = %e, "could not rebuild the Kafka producer; purging the old one instead");
                let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
                guard.0 += 1;
                let old = guard.1.clone();
                drop(guard);
                old.purge(PurgeConfig::default().queue().inflight());
            }
        }
    }

    pub(super) fn is_transactional(&self) -> bool {
        self.config.get("transactional.id").is_some()
    }

    /// Every event skipped, nothing sent: the batch goes back untouched.
    fn stalled(events: &[OutboxEvent], epoch: Epoch) -> Sent {
        let acks = Arc::new(BatchAcks::new(events.len()));
        for i in 0..events.len() {
            acks.set(i, SendResult::Skipped);
        }
        let held_keys = events.iter().filter_map(|e| e.key.clone()).collect();
        Sent { results: async move { acks.take() }.boxed(), held_keys, stalled: true, epoch, first_sent: None }
    }
}

pub(super) fn build(config: &ClientConfig) -> Result<RelayProducer, SinkError> {
    super::polled::Polled::create(config, RelayContext::default())
        .map_err(|e| SinkError::config("cannot create the producer", e))
}

impl Sink for KafkaSink {
    async fn send(&self, events: &[OutboxEvent], hold: &HashSet<String>, behind: Option<Epoch>) -> Sent {
        let (mut epoch, mut producer) = self.current();
        if behind.is_some_and(|b| b != epoch) {
            // The earlier batch's producer was abandoned or replaced: its events
            // go again first; this batch may hold later events of their keys.
            return Self::stalled(events, epoch);
        }
        // A transactional producer is rebuilt (and registered) by the exactly-once loop.
        if let Some((code, reason)) = producer.client().fatal_error().filter(|_| !self.is_transactional()) {
            if behind.is_some() {
                return Self::stalled(events, epoch);
            }
            self.rebuild("fatal", &format!("{code:?}: {reason}"));
            (epoch, producer) = self.current();
        }
        let acks = Arc::new(BatchAcks::new(events.len()));
        // Keys whose event failed before reaching Kafka, here or unsent in the
        // batch before this one: their later events in this batch wait. Handed
        // on are only the keys of events of *this* batch that did not go out:
        // a key the predecessor held and this batch has no event of is not held
        // any more once the predecessor ends (its rows are pending again, and
        // the claim's fence defers later events of that key).
        let mut failed_keys: HashSet<&str> = hold.iter().map(String::as_str).collect();
        let mut held_here: HashSet<&str> = HashSet::new();
        let mut first_sent = None;
        for (i, ev) in events.iter().enumerate() {
            if let Some(k) = ev.key.as_deref().filter(|k| failed_keys.contains(k)) {
                acks.set(i, SendResult::Skipped);
                held_here.insert(k);
                continue;
            }
            let mut record = match self.record(ev, &acks, i) {
                Ok(r) => r,
                Err(error) => {
                    acks.set(i, SendResult::Invalid { error });
                    failed_keys.extend(ev.key.as_deref());
                    held_here.extend(ev.key.as_deref());
                    continue;
                }
            };
            loop {
                match producer.send(record) {
                    Ok(()) => {
                        first_sent = first_sent.or(Some(i));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // Back-pressure: the local queue drains as Kafka acks.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        acks.set(i, SendResult::Failed { class: classify(&e), error: e.to_string() });
                        failed_keys.extend(ev.key.as_deref());
                        held_here.extend(ev.key.as_deref());
                        break;
                    }
                }
            }
        }
        if self.epoch() != epoch {
            // The producer was abandoned while this batch was handed to it:
            // whatever reached it after its purge must not go out either.
            producer.purge(PurgeConfig::default().queue().inflight());
        }
        let held_keys = held_here.into_iter().map(str::to_string).collect();
        let results = async move {
            let results = acks.wait_all().await;
            drop(producer); // kept alive until the last report arrived
            results
        }
        .boxed();
        Sent { results, held_keys, stalled: false, epoch, first_sent }
    }

    fn abandon(&self, reason: &'static str) {
        self.rebuild(reason, "gave up on what the producer held");
    }

    fn purge(&self) {
        self.producer().purge(PurgeConfig::default().queue().inflight());
    }

    fn flush(&self, timeout: Duration) -> Result<(), SinkError> {
        self.producer().flush(timeout).map_err(|e| SinkError::kafka("flush", e))
    }

    fn inject_fatal_error(&self) {
        let producer = self.producer();
        let ptr = producer.client().native_ptr();
        let reason = std::ffi::CString::new("failpoint: injected fatal error").unwrap_or_default();
        #[allow(unsafe_code)]
        // SAFETY: `ptr` is the live handle of `producer`, which is kept alive for
        // the call; librdkafka's test hook only records a fatal error on it.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                ptr,
                rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }

    async fn ping(&self, timeout: Duration) -> Result<(), SinkError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, timeout).map(|_| ()).map_err(|e| {
                match producer.context().refused_recently(timeout + Duration::from_secs(5)) {
                    Some(why) => SinkError::refused(why),
                    None => SinkError::kafka("cannot reach the brokers", e),
                }
            })
        })
        .await
        .map_err(|e| SinkError::unavailable("metadata task", e))?
    }
}

/// The CloudEvents 1.0 attributes of one event in Kafka's binary content mode
/// (`ce_*` headers and `content-type`), those the row's own headers do not set
/// already. `ce_id` (the event id) and `ce_specversion` are the relay's: a row
/// header of either name is malformed. Err: malformed, or no `ce_source`.
pub(super) fn cloudevents_headers(
    ce: &CloudEventsConfig,
    ev: &OutboxEvent,
    row: &[(String, Option<String>)],
) -> Result<Vec<(&'static str, String)>, String> {
    let has = |name: &str| row.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    for reserved in ["ce_id", "ce_specversion"] {
        if has(reserved) {
            return Err(format!(
                "malformed headers: {reserved:?} is reserved with [cloudevents] enabled (the relay sets it)"
            ));
        }
    }
    let source = ev.ce_source.clone().or_else(|| ce.source.clone()).filter(|s| !s.is_empty());
    let source = match (source, has("ce_source")) {
        (Some(s), false) => Some(s),
        (_, true) => None,
        (None, false) => {
            return Err(format!(
                "malformed row: no ce_source (its {} is NULL and cloudevents.source is not set)",
                ce.source_column.as_deref().unwrap_or("source column")
            ))
        }
    };
    let event_type = ev.ce_type.clone().or_else(|| ce.r#type.clone()).unwrap_or_else(|| ev.topic.clone());
    let time = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::from_micros(ev.created_at_us.max(0) as u64))
        .map(|t| humantime::format_rfc3339_micros(t).to_string())
        .unwrap_or_default();
    let mut out = vec![("ce_specversion", "1.0".to_string()), ("ce_id", ev.id.to_string())];
    out.extend(source.map(|s| ("ce_source", s)));
    for (name, value) in [("ce_type", event_type), ("ce_time", time), ("content-type", ce.content_type.clone())] {
        if !has(name) {
            out.push((name, value));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> OutboxEvent {
        OutboxEvent {
            id: uuid::Uuid::nil(),
            seq: 1,
            topic: "orders".into(),
            key: None,
            payload: None,
            headers: b"{}".to_vec(),
            attempts: 0,
            created_at_us: 1_780_315_200_250_000,
            partition: None,
            ce_source: None,
            ce_type: None,
            claimed: std::time::SystemTime::now(),
        }
    }

    fn config() -> CloudEventsConfig {
        CloudEventsConfig { enabled: true, source: Some("/svc".into()), ..CloudEventsConfig::default() }
    }

    #[test]
    fn cloudevents_attributes_come_from_the_row_then_the_config_then_the_topic() {
        let h = cloudevents_headers(&config(), &event(), &[]).unwrap();
        let get = |h: &[(&str, String)], n: &str| h.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
        assert_eq!(get(&h, "ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(get(&h, "ce_id").as_deref(), Some("00000000-0000-0000-0000-000000000000"));
        assert_eq!(get(&h, "ce_source").as_deref(), Some("/svc"));
        assert_eq!(get(&h, "ce_type").as_deref(), Some("orders"), "the topic by default");
        assert_eq!(get(&h, "ce_time").as_deref(), Some("2026-06-01T12:00:00.250000Z"));
        assert_eq!(get(&h, "content-type").as_deref(), Some("application/json"));
        let mut ev = event();
        ev.ce_type = Some("com.example.created".into());
        ev.ce_source = Some("/row".into());
        let h = cloudevents_headers(&CloudEventsConfig { r#type: Some("cfg".into()), ..config() }, &ev, &[]).unwrap();
        assert_eq!(get(&h, "ce_type").as_deref(), Some("com.example.created"));
        assert_eq!(get(&h, "ce_source").as_deref(), Some("/row"));
        // A row header of the same name wins and is not repeated.
        let row = [("ce_type".to_string(), Some("from-header".to_string()))];
        assert_eq!(get(&cloudevents_headers(&config(), &event(), &row).unwrap(), "ce_type"), None);
    }

    #[test]
    fn cloudevents_reserved_headers_and_a_missing_source_are_malformed_rows() {
        let row = [("ce_id".to_string(), Some("x".to_string()))];
        assert!(cloudevents_headers(&config(), &event(), &row).unwrap_err().contains("reserved"));
        let no_source = CloudEventsConfig { source: None, source_column: Some("src".into()), ..config() };
        let err = cloudevents_headers(&no_source, &event(), &[]).unwrap_err();
        assert!(err.contains("no ce_source") && err.contains("src"), "{err}");
    }
}
