//! Real outages on the real infrastructure: the Kafka broker stopped mid-load and
//! started again; PostgreSQL restarted mid-load. Nothing may be lost, parked or
//! reordered, and /readyz must say "not ready" while a dependency is gone.
//!
//! These tests stop shared services, so they hold one lock (cargo runs test
//! binaries one after another, so no other binary runs meanwhile).

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn infra(cmd: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/infra");
    let out = Command::new(script).arg(cmd).output().expect("run scripts/infra");
    assert!(out.status.success(), "scripts/infra {cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

fn kafka_reachable() -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    c.fetch_metadata(None, Duration::from_secs(2)).is_ok()
}

fn ready(port: u16) -> Option<bool> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf.starts_with("HTTP/1.1 200"))
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An application writing small transactions over 20 keys from one connection;
/// it reconnects after errors (Postgres restarts) and keeps going.
fn spawn_writer(
    table: String,
    topic: String,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n: i64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut db, conn)) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                let r = async {
                    let tx = db.transaction().await?;
                    tx.execute(
                        &format!(
                            "INSERT INTO {table} (topic, key, payload)
                             SELECT $1, 'key-' || (($2::bigint + i) % 20), jsonb_build_object('n', $2::bigint + i)
                             FROM generate_series(0, 9) i"
                        ),
                        &[&topic, &n],
                    )
                    .await?;
                    tx.commit().await
                }
                .await;
                if r.is_err() {
                    break; // reconnect; the table is the truth about what committed
                }
                n += 10;
                written.fetch_add(10, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
}

async fn check_all_delivered(ob: &Outbox, topic: &str) {
    ob.wait_drained(Duration::from_secs(180)).await;
    let d = delivery(ob, &[topic.to_string()], Duration::from_secs(2)).await;
    assert!(d.lost.is_empty(), "{} lost events", d.lost.len());
    assert_eq!(d.order_violations, 0, "per-key order");
    assert_eq!(ob.count("parked_at IS NOT NULL OR attempts > 0").await, 0, "an outage never counts against events");
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_stopped_mid_load_loses_nothing_and_readyz_flips() {
    let _serial = SERIAL.lock().await;
    let ob = Outbox::new("kafkaout").await;
    let topic = ob.topic("events", 3).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut relay =
        ob.spawn_relay(&[("OUTBOX_RELAY__HTTP__LISTEN", listen.as_str()), ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100")]);
    wait_for("ready", Duration::from_secs(30), || ready(port) == Some(true)).await;
    let (stop, written) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = spawn_writer(ob.qualified(), topic.clone(), stop.clone(), written.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    infra("stop-kafka");
    assert!(!kafka_reachable(), "Kafka still answers: these tests need the broker run by scripts/infra");
    wait_for("not ready", Duration::from_secs(30), || ready(port) == Some(false)).await;
    tokio::time::sleep(Duration::from_secs(10)).await; // writes keep committing meanwhile
    relay.assert_running();
    infra("start-kafka");
    wait_for("ready again", Duration::from_secs(60), || ready(port) == Some(true)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    check_all_delivered(&ob, &topic).await;
    let (code, err) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_mid_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let ob = Outbox::new("pgout").await;
    let topic = ob.topic("events", 3).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut relay = ob.spawn_relay(&[
        ("OUTBOX_RELAY__HTTP__LISTEN", listen.as_str()),
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100"),
        ("OUTBOX_RELAY__RELAY__MAX_BACKOFF", "1s"),
    ]);
    wait_for("ready", Duration::from_secs(30), || ready(port) == Some(true)).await;
    let (stop, written) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = spawn_writer(ob.qualified(), topic.clone(), stop.clone(), written.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    infra("restart-postgres");
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.assert_running();
    wait_for("ready again", Duration::from_secs(60), || ready(port) == Some(true)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(written.load(Ordering::Relaxed) > 0);
    check_all_delivered(&ob, &topic).await;
    let (code, err) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
}

/// What the relay's sessions hold on the application's database, sampled from
/// `pg_stat_activity`: the longest any of its transactions with a snapshot or
/// an xid had been open at a sample.
async fn longest_relay_transaction(db: &tokio_postgres::Client, app: &str) -> f64 {
    db.query_one(
        "SELECT coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8 FROM pg_stat_activity
         WHERE application_name = $1 AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)",
        &[&app],
    )
    .await
    .unwrap()
    .get(0)
}

/// The default bound on how long a batch may wait for Kafka (relay.publish_timeout,
/// 20 s), plus what one round trip and a heartbeat may add.
const HOLD_BOUND: f64 = 20.0 + 5.0;

#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_outage_holds_no_transaction_on_the_database_past_the_bound() {
    let _serial = SERIAL.lock().await;
    let ob = Outbox::new("horizon").await;
    let topic = ob.topic("events", 3).await;
    // The relay's sessions carry the table's name, so the sampler sees only them.
    let url = format!("{}?application_name={}", pg_url(), ob.table);
    let mut relay =
        ob.spawn_relay(&[("OUTBOX_RELAY__POSTGRES__URL", url.as_str()), ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100")]);
    let (stop, written) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = spawn_writer(ob.qualified(), topic.clone(), stop.clone(), written.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    let db = pg().await;
    infra("stop-kafka");
    assert!(!kafka_reachable(), "Kafka still answers: these tests need the broker run by scripts/infra");
    // Kafka stays away for twice the bound while the application keeps writing.
    let outage = Duration::from_secs(50);
    let started = Instant::now();
    let mut longest: f64 = 0.0;
    while started.elapsed() < outage {
        longest = longest.max(longest_relay_transaction(&db, &ob.table).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    relay.assert_running();
    infra("start-kafka");
    let during = written.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    eprintln!("longest relay transaction during a {outage:?} Kafka outage: {longest:.1} s ({during} events written)");
    assert!(
        longest <= HOLD_BOUND,
        "a relay session held a transaction for {longest:.1} s while Kafka was away (bound {HOLD_BOUND} s): \
         vacuum stops for the whole database meanwhile"
    );
    check_all_delivered(&ob, &topic).await;
    let (code, err) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
}
