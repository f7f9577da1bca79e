//! CloudEvents in Kafka's binary content mode, read by the CloudEvents SDK
//! (Python, with confluent-kafka) as an application would, from the real
//! Kafka of `scripts/infra`. The SDK comes from `scripts/py-env` (run by
//! scripts/test); without it the test fails and says so.

use std::process::Command;
use std::time::Duration;

use outbox_relay_support::*;

fn sdk_python() -> String {
    let py = std::env::var("HOME").map(|h| format!("{h}/.cache/outbox-relay/py/bin/python")).unwrap_or_default();
    assert!(
        std::path::Path::new(&py).exists(),
        "{py} missing: run scripts/py-env (scripts/test creates it: the CloudEvents SDK and confluent-kafka)"
    );
    py
}

/// The events the SDK read from `topic`, as JSON (attributes and data).
fn read_with_sdk(topic: &str, count: usize) -> Vec<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/read_cloudevents.py");
    let out = Command::new(sdk_python())
        .args([script, &brokers(), topic, &count.to_string()])
        .output()
        .expect("run the CloudEvents SDK reader");
    assert!(out.status.success(), "the SDK reader failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cloudevents_sdk_consumer_reads_every_event_with_its_attributes() {
    let ob = Outbox::new("cloudevents").await;
    let topic = ob.topic("orders", 2).await;
    let t = ob.qualified();
    let db = pg().await;
    // The application keeps each event's type in a column of its own.
    db.batch_execute(&format!(
        "ALTER TABLE {t} ADD COLUMN event_type text;
         INSERT INTO {t} (id, topic, key, payload, event_type, headers, created_at) VALUES
           ('00000000-0000-4000-8000-000000000001', '{topic}', 'order-1', '{{\"total\": 12}}',
            'com.example.order.created', '{{\"ce_subject\": \"order-1\"}}', '2026-06-01 12:00:00.25+00'),
           ('00000000-0000-4000-8000-000000000002', '{topic}', 'order-2', '{{\"total\": 7}}',
            NULL, '{{}}', '2026-06-01 12:00:01+00')"
    ))
    .await
    .unwrap();
    let relay = ob.spawn_relay(&[
        ("OUTBOX_RELAY__CLOUDEVENTS__ENABLED", "true"),
        ("OUTBOX_RELAY__CLOUDEVENTS__SOURCE", "/orders-service"),
        ("OUTBOX_RELAY__CLOUDEVENTS__TYPE", "com.example.order.event"),
        ("OUTBOX_RELAY__CLOUDEVENTS__TYPE_COLUMN", "event_type"),
    ]);
    ob.wait_drained(Duration::from_secs(30)).await;
    let mut events = read_with_sdk(&topic, 2);
    events.sort_by_key(|e| e["attributes"]["id"].as_str().unwrap_or_default().to_string());
    let a = &events[0]["attributes"];
    assert_eq!(a["id"], "00000000-0000-4000-8000-000000000001", "ce_id is the event id: {a}");
    assert_eq!(a["specversion"], "1.0");
    assert_eq!(a["source"], "/orders-service");
    assert_eq!(a["type"], "com.example.order.created", "from the row's column");
    assert_eq!(a["time"], "2026-06-01T12:00:00.250000+00:00", "created_at");
    assert_eq!(a["datacontenttype"], "application/json");
    assert_eq!(a["subject"], "order-1", "a ce_ header of the row passes through");
    assert_eq!(a["partitionkey"], "order-1", "the SDK reads the message key as partitionkey");
    assert_eq!(events[0]["data"], serde_json::json!({"total": 12}), "the payload is the data, unchanged");
    let b = &events[1]["attributes"];
    assert_eq!(b["type"], "com.example.order.event", "a NULL column falls back to cloudevents.type: {b}");
    assert_eq!(b["time"], "2026-06-01T12:00:01+00:00");
    // The relay's own headers are still there for its consumers.
    let raw = consume(std::slice::from_ref(&topic), 2, Duration::from_secs(30), Duration::from_millis(200));
    assert!(raw.iter().all(|m| m.headers.contains_key("event_id")));
    let (code, log) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cloudevents_column_the_table_lacks_is_one_clear_error_at_check() {
    let ob = Outbox::new("cecolumn").await;
    let out = relay_cmd(
        &ob.table,
        &[
            ("OUTBOX_RELAY__CLOUDEVENTS__ENABLED", "true"),
            ("OUTBOX_RELAY__CLOUDEVENTS__SOURCE", "/svc"),
            ("OUTBOX_RELAY__CLOUDEVENTS__TYPE_COLUMN", "event_type"),
        ],
    )
    .arg("check")
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no column `event_type`") && err.contains("[cloudevents]"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
