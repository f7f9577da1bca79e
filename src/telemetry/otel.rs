//! Producer spans that continue the application's traces (`[tracing]`): for
//! a row whose headers carry a valid W3C `traceparent`, a span from the claim
//! to the broker's ack, a child of that parent, exported over OTLP/HTTP. The
//! Kafka message carries the span's own `traceparent`, so consumers continue
//! from the relay's span. Rows without one get no span.

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};

use crate::config::TracingConfig;

/// The provider, kept to flush what is buffered at shutdown.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The relay's tracer, when `[tracing]` has an endpoint. Once per process.
pub fn tracer(config: &TracingConfig) -> Result<Option<SdkTracer>, String> {
    let Some(endpoint) = config.endpoint() else { return Ok(None) };
    if let Some(p) = PROVIDER.get() {
        return Ok(Some(p.tracer("outbox-relay")));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(5))
        .with_headers(Default::default())
        .build()
        .map_err(|e| format!("tracing: cannot build the OTLP exporter for {endpoint}: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(config.service_name.clone()).build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let provider = PROVIDER.get_or_init(|| provider);
    Ok(Some(provider.tracer("outbox-relay")))
}

/// Exports what is buffered (at shutdown; bounded by the exporter's timeout).
pub fn flush() {
    if let Some(p) = PROVIDER.get() {
        if let Err(e) = p.force_flush() {
            tracing::warn!(error = %e, "tracing: could not export the last spans");
        }
    }
}

/// Parses a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`). `None`:
/// absent or invalid (then the relay records no span and passes it on as is).
pub fn parse_traceparent(value: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let state = tracestate.and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state))
}

/// The `traceparent` of a span context.
pub fn traceparent(sc: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())
}

/// Starts the producer span of one event: `send <topic>`, a child of
/// `parent`, starting at the claim.
pub fn start_send_span(
    tracer: &SdkTracer,
    parent: SpanContext,
    claimed: SystemTime,
    topic: &str,
    event_id: &str,
    key: Option<&str>,
) -> Span {
    let cx = Context::new().with_remote_span_context(parent);
    let mut attributes = vec![
        KeyValue::new("messaging.system", "kafka"),
        KeyValue::new("messaging.operation.type", "send"),
        KeyValue::new("messaging.operation.name", "send"),
        KeyValue::new("messaging.destination.name", topic.to_string()),
        KeyValue::new("messaging.message.id", event_id.to_string()),
    ];
    attributes.extend(key.map(|k| KeyValue::new("messaging.kafka.message.key", k.to_string())));
    tracer
        .span_builder(format!("send {topic}"))
        .with_kind(SpanKind::Producer)
        .with_start_time(claimed)
        .with_attributes(attributes)
        .start_with_context(tracer, &cx)
}

/// Ends the span at the broker's answer: where the event landed, or why not.
pub fn end_send_span(mut span: Span, delivered: Result<(i32, i64), String>) {
    match delivered {
        Ok((partition, offset)) => {
            span.set_attribute(KeyValue::new("messaging.destination.partition.id", partition.to_string()));
            span.set_attribute(KeyValue::new("messaging.kafka.offset", offset));
        }
        Err(error) => span.set_status(Status::error(error)),
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_parses_and_round_trips() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(tp, Some("vendor=x")).unwrap();
        assert_eq!(traceparent(&sc), tp);
        assert!(sc.is_remote() && sc.is_sampled());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for tp in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(parse_traceparent(tp, None).is_none(), "{tp}");
        }
    }
}
