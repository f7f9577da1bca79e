//! The operator's side against the real Postgres and Kafka: status, replay,
//! cleanup, verify, /metrics and /readyz.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_relay_support::*;

fn cli(ob: &Outbox, args: &[&str]) -> (Option<i32>, String, String) {
    let o = relay_cmd(&ob.table, &[]).args(args).output().expect("run outbox-relay");
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn status_numbers_match_the_table() {
    let ob = Outbox::new("status").await;
    let t = ob.qualified();
    pg().await
        .batch_execute(&format!(
            "INSERT INTO {t} (topic, payload) SELECT 'a', '{{}}' FROM generate_series(1, 7);
             INSERT INTO {t} (topic, payload, created_at) VALUES ('b', '{{}}', now() - interval '1 hour');
             INSERT INTO {t} (topic, payload, published_at) SELECT 'a', '{{}}', now() - interval '30 seconds' FROM generate_series(1, 4);
             INSERT INTO {t} (topic, payload, published_at) SELECT 'b', '{{}}', now() - interval '10 minutes' FROM generate_series(1, 2);
             INSERT INTO {t} (topic, payload, parked_at, last_error, attempts)
               SELECT 'b', '{{}}', now(), 'Broker: Message size too large', 10 FROM generate_series(1, 3);
             INSERT INTO {t} (topic, payload, parked_at, last_error, attempts) VALUES ('a', '{{}}', now(), 'malformed headers: x', 1);"
        ))
        .await
        .unwrap();
    let (code, out, err) = cli(&ob, &["status", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pending"], 8);
    assert_eq!(v["parked"], 4);
    assert_eq!(v["published_1m"], 4);
    assert_eq!(v["published_5m"], 4);
    assert_eq!(v["published_15m"], 6);
    let oldest = v["oldest_pending_age_s"].as_f64().unwrap();
    assert!((3590.0..3700.0).contains(&oldest), "{oldest}");
    assert_eq!(v["top_errors"][0]["error"], "Broker: Message size too large");
    assert_eq!(v["top_errors"][0]["count"], 3);
    let topics = v["topics"].as_array().unwrap();
    let b = topics.iter().find(|t| t["topic"] == "b").unwrap();
    assert_eq!((b["pending"].as_i64(), b["parked"].as_i64(), b["published_15m"].as_i64()), (Some(1), Some(3), Some(2)));
    // and the text form says the same
    let (code, out, _) = cli(&ob, &["status"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("pending") && out.contains("Message size too large"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_restores_parked_events_to_kafka_with_their_original_ids() {
    let ob = Outbox::new("replay").await;
    let topic = ob.topic("t", 1).await;
    let t = ob.qualified();
    let db = pg().await;
    let ids: Vec<String> = db
        .query(
            &format!(
                "INSERT INTO {t} (topic, key, payload, headers) SELECT $1, 'k', jsonb_build_object('i', i), '\"not an object\"'
                 FROM generate_series(1, 3) i RETURNING id::text"
            ),
            &[&topic],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let relay = ob.spawn_relay(&[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ob.count("parked_at IS NOT NULL").await < 3 {
        assert!(Instant::now() < deadline, "rows not parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // nothing matching → says so; no selector → usage error; dry run → no change
    let (code, out, _) = cli(&ob, &["replay", "--topic", "no-such-topic"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("nothing matches"), "{out}");
    let (code, _, err) = cli(&ob, &["replay"]);
    assert_eq!(code, Some(64), "{err}");
    let (code, out, _) = cli(&ob, &["replay", "--parked", "--dry-run"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("would put 3 event(s)"), "{out}");
    assert_eq!(ob.count("parked_at IS NOT NULL").await, 3, "dry run changes nothing");
    let (code, _, err) = cli(&ob, &["replay", "--parked", "--since", "not a time"]);
    assert_eq!(code, Some(64), "{err}");

    // The operator fixes the rows, then replays them.
    db.execute(&format!("UPDATE {t} SET headers = '{{}}' WHERE parked_at IS NOT NULL"), &[]).await.unwrap();
    let (code, out, err) = cli(&ob, &["replay", "--parked"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed 3 event(s)"), "{out}");
    let msgs = consume(std::slice::from_ref(&topic), 3, Duration::from_secs(60), Duration::from_secs(1));
    let got: HashSet<String> = msgs.iter().map(|m| m.event_id()).collect();
    assert_eq!(got, ids.iter().cloned().collect::<HashSet<_>>(), "same ids as the original rows");
    ob.wait_drained(Duration::from_secs(10)).await;
    assert_eq!(ob.count("attempts = 0 AND last_error IS NULL AND published_at IS NOT NULL").await, 3);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_of_published_events_needs_yes_above_the_threshold() {
    let ob = Outbox::new("replayyes").await;
    pg().await
        .execute(
            &format!(
                "INSERT INTO {} (topic, payload, published_at) SELECT 'x', '{{}}', now() FROM generate_series(1, 1500)",
                ob.qualified()
            ),
            &[],
        )
        .await
        .unwrap();
    let (code, _, err) = cli(&ob, &["replay", "--topic", "x"]);
    assert_eq!(code, Some(64));
    assert!(err.contains("--yes") && err.contains("1500"), "{err}");
    let (code, out, err) = cli(&ob, &["replay", "--topic", "x", "--since", "1h", "--yes", "--batch-size", "400"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("replayed 1500"), "{out}");
    assert_eq!(ob.count("published_at IS NULL AND parked_at IS NULL").await, 1500);
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_deletes_only_published_rows_older_than_retention() {
    let ob = Outbox::new("cleanup").await;
    let t = ob.qualified();
    pg().await
        .batch_execute(&format!(
            "INSERT INTO {t} (topic, payload, published_at) SELECT 'x', '{{}}', now() - interval '2 days' FROM generate_series(1, 2500);
             INSERT INTO {t} (topic, payload, published_at) SELECT 'x', '{{}}', now() - interval '1 hour' FROM generate_series(1, 10);
             INSERT INTO {t} (topic, payload, created_at) VALUES ('x', '{{}}', now() - interval '3 days');
             INSERT INTO {t} (topic, payload, parked_at) VALUES ('x', '{{}}', now() - interval '3 days');"
        ))
        .await
        .unwrap();
    let (code, out, err) = cli(&ob, &["cleanup", "--older-than", "1d"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deleted 2500"), "{out}");
    assert_eq!(ob.count("true").await, 12, "recent published, pending and parked rows stay");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_proves_delivery_and_reports_a_lost_event() {
    let ob = Outbox::new("verify").await;
    let topic = ob.topic("t", 2).await;
    let t = ob.qualified();
    let db = pg().await;
    db.execute(
        &format!(
            "INSERT INTO {t} (topic, key, payload) SELECT $1, 'k' || i % 3, '{{}}' FROM generate_series(1, 200) i"
        ),
        &[&topic],
    )
    .await
    .unwrap();
    let relay = ob.spawn_relay(&[]);
    ob.wait_drained(Duration::from_secs(60)).await;
    drop(relay);
    let (code, out, err) = cli(&ob, &["verify", "--since", "1h", "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["expected"].as_i64(), v["lost"].as_i64(), v["order_violations"].as_i64()),
        (Some(200), Some(0), Some(0))
    );
    // A row marked published that never reached Kafka is reported as lost.
    db.execute(
        &format!("INSERT INTO {t} (topic, key, payload, published_at) VALUES ($1, 'k1', '{{}}', now())"),
        &[&topic],
    )
    .await
    .unwrap();
    let (code, out, err) = cli(&ob, &["verify", "--since", "1h"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("lost") && err.contains("1 published event(s) are not in Kafka"), "{out}{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

fn metric(body: &str, line_prefix: &str) -> f64 {
    body.lines().filter(|l| l.starts_with(line_prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_when_events_flow_and_readyz_reports_ready() {
    let ob = Outbox::new("metrics").await;
    let topic = ob.topic("t", 1).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut relay = ob.spawn_relay(&[("OUTBOX_RELAY__HTTP__LISTEN", listen.as_str())]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        relay.assert_running();
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && http_get(port, "/readyz").0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http_get(port, "/healthz"), (200, "ok\n".to_string()));
    // A single-outbox relay's series have no `outbox` label (as before 0.3).
    let published = format!("outbox_relay_events_published_total{{topic=\"{topic}\"}}");
    let before = metric(&http_get(port, "/metrics").1, &published);
    pg().await
        .execute(
            &format!("INSERT INTO {} (topic, payload) SELECT $1, '{{}}' FROM generate_series(1, 25)", ob.qualified()),
            &[&topic],
        )
        .await
        .unwrap();
    ob.wait_drained(Duration::from_secs(30)).await;
    // The relay counts a batch once its commit returns; the rows are gone for
    // everyone else a moment earlier.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut body = http_get(port, "/metrics").1;
    while metric(&body, &published) - before < 25.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        body = http_get(port, "/metrics").1;
    }
    assert_eq!(metric(&body, &published) - before, 25.0, "{body}");
    assert!(metric(&body, "outbox_relay_created_to_ack_seconds_count") >= 25.0, "{body}");
    assert!(body.contains("outbox_relay_batch_duration_seconds_bucket"), "histograms: {body}");
    assert!(body.contains("outbox_relay_ready 1"), "{body}");
    assert!(!body.contains("outbox=\""), "{body}");
    drop(relay);
}
