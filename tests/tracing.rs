//! Tracing: a row with a W3C `traceparent` gets a producer span, a child of
//! the application's span, from claim to broker ack, exported over OTLP/HTTP
//! and received by a receiver built on the official protobuf definitions
//! (`tests/py/otlp_receiver.py`, from `scripts/py-env`). The Kafka message
//! carries the span's own `traceparent`.

use std::process::Command;
use std::time::{Duration, Instant};

use outbox_relay_support::*;

fn receiver(port: u16) -> RelayProcess {
    let py = std::env::var("HOME").map(|h| format!("{h}/.cache/outbox-relay/py/bin/python")).unwrap_or_default();
    assert!(
        std::path::Path::new(&py).exists(),
        "{py} missing: run scripts/py-env (scripts/test creates it: opentelemetry-proto for the OTLP receiver)"
    );
    let mut cmd = Command::new(py);
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/otlp_receiver.py")).arg(port.to_string());
    let r = RelayProcess::spawn(cmd, Stderr::Keep);
    r.wait_log("listening", Duration::from_secs(20));
    r
}

fn spans(r: &RelayProcess) -> Vec<serde_json::Value> {
    r.log().lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).expect("a span")).collect()
}

const TRACE: [&str; 2] = ["4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"];
const PARENT: [&str; 2] = ["00f067aa0ba902b7", "b7ad6b7169203331"];

#[tokio::test(flavor = "multi_thread")]
async fn a_rows_traceparent_gets_a_producer_span_in_its_trace_from_claim_to_ack_over_otlp() {
    let ob = Outbox::new("tracing").await;
    let topic = ob.topic("events", 3).await;
    let t = ob.qualified();
    let port = free_port();
    let otlp = receiver(port);
    let relay = ob.spawn_relay(&[
        ("OUTBOX_RELAY__TRACING__OTLP_ENDPOINT", &format!("http://127.0.0.1:{port}/v1/traces")),
        ("OUTBOX_RELAY__TRACING__SERVICE_NAME", "relay-under-test"),
    ]);
    let db = pg().await;
    let mut ids = Vec::new();
    for i in 0..2 {
        let id: uuid::Uuid = db
            .query_one(
                &format!(
                    "INSERT INTO {t} (topic, key, payload, headers) VALUES ($1, $2, '{{}}',
                       jsonb_build_object('traceparent', $3::text, 'tracestate', 'app=1')) RETURNING id"
                ),
                &[&topic, &format!("k{i}"), &format!("00-{}-{}-01", TRACE[i], PARENT[i])],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id.to_string());
    }
    // No traceparent, and a malformed one: no span, headers untouched.
    db.batch_execute(&format!(
        "INSERT INTO {t} (topic, key, payload) VALUES ('{topic}', 'plain', '{{}}');
         INSERT INTO {t} (topic, key, payload, headers) VALUES ('{topic}', 'bad', '{{}}', '{{\"traceparent\": \"nope\"}}')"
    ))
    .await
    .unwrap();
    ob.wait_drained(Duration::from_secs(30)).await;
    let msgs = consume(std::slice::from_ref(&topic), 4, Duration::from_secs(30), Duration::from_millis(300));
    // The batch exporter sends within 5 s; SIGTERM flushes what is left.
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while spans(&otlp).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = spans(&otlp);
    assert_eq!(got.len(), 2, "one span per traced row, none for the others: {got:?}\n{}", otlp.log());
    for i in 0..2 {
        let s =
            got.iter().find(|s| s["trace_id"] == TRACE[i]).unwrap_or_else(|| panic!("no span in trace {i}: {got:?}"));
        assert_eq!(s["parent_span_id"], PARENT[i], "a child of the application's span");
        assert_eq!(s["service"], "relay-under-test");
        assert_eq!(s["kind"], 4, "SPAN_KIND_PRODUCER");
        assert_eq!(s["name"], format!("send {topic}"));
        let a = &s["attributes"];
        assert_eq!(a["messaging.system"], "kafka");
        assert_eq!(a["messaging.destination.name"], topic.as_str());
        assert_eq!(a["messaging.message.id"], ids[i].as_str(), "the event id");
        let m = msgs.iter().find(|m| m.event_id() == ids[i]).expect("its message");
        assert_eq!(a["messaging.destination.partition.id"], m.partition.to_string(), "where it landed");
        assert_eq!(a["messaging.kafka.offset"], m.offset, "at the offset the consumer read");
        assert!(s["start_ns"].as_u64() < s["end_ns"].as_u64(), "claim before ack: {s}");
        let tp = m.headers.get("traceparent").cloned().flatten().unwrap_or_default();
        assert_eq!(
            tp,
            format!("00-{}-{}-01", TRACE[i], s["span_id"].as_str().unwrap()),
            "the message's parent is the relay's span"
        );
        assert_eq!(m.headers.get("tracestate").cloned().flatten().as_deref(), Some("app=1"));
    }
    let bad = msgs.iter().find(|m| m.key.as_deref() == Some("bad")).unwrap();
    assert_eq!(bad.headers.get("traceparent").cloned().flatten().as_deref(), Some("nope"), "passed on as it was");
    let plain = msgs.iter().find(|m| m.key.as_deref() == Some("plain")).unwrap();
    assert!(!plain.headers.contains_key("traceparent"));
}
