//! Real outages on the real infrastructure: the Kafka broker stopped mid-load and
//! started again; PostgreSQL restarted mid-load; relays started while Kafka is
//! away. Nothing may be lost, parked or reordered; while Kafka is away the
//! relay holds nothing on the application's database past relay.publish_timeout;
//! /readyz says "not ready" while a dependency is gone.
//!
//! These tests stop shared services: each holds an exclusive lock on what it
//! stops (`InfraLock`), so no test that uses it runs meanwhile, under any runner.

use std::time::{Duration, Instant};

use outbox_relay_support::*;

fn ready(port: u16) -> Option<bool> {
    http_get(port, "/readyz").map(|(code, _)| code == 200)
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn check_all_delivered(ob: &Outbox, topic: &str) {
    ob.wait_drained(Duration::from_secs(180)).await;
    let d = delivery(ob, &[topic.to_string()], Duration::from_secs(2)).await;
    assert!(d.lost.is_empty(), "{} lost events", d.lost.len());
    assert_eq!(d.order_violations, 0, "per-key order");
    assert_eq!(ob.count("parked_at IS NOT NULL OR attempts > 0").await, 0, "an outage never counts against events");
}

fn stop_kafka() {
    infra_cmd(&["stop-kafka"]);
    assert!(!kafka_reachable(&brokers()), "Kafka still answers: these tests need the broker run by scripts/infra");
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_stopped_mid_load_loses_nothing_and_readyz_flips() {
    let lock = InfraLock::exclusive(&[Resource::Kafka]).await;
    let ob = Outbox::new_beside("kafkaout", &lock).await;
    let topic = ob.topic("events", 3).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut relay =
        ob.spawn_relay(&[("OUTBOX_RELAY__HTTP__LISTEN", listen.as_str()), ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100")]);
    wait_for("ready", Duration::from_secs(30), || ready(port) == Some(true)).await;
    let writers = Writers::start(WriterSpec::small(&ob.qualified(), &topic));
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop_kafka();
    wait_for("not ready", Duration::from_secs(30), || ready(port) == Some(false)).await;
    tokio::time::sleep(Duration::from_secs(10)).await; // writes keep committing meanwhile
    relay.assert_running();
    infra_cmd(&["start-kafka"]);
    wait_for("ready again", Duration::from_secs(60), || ready(port) == Some(true)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    writers.finish().await;
    check_all_delivered(&ob, &topic).await;
    let (code, err) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_mid_load_loses_nothing() {
    let lock = InfraLock::exclusive(&[Resource::Postgres]).await;
    let ob = Outbox::new_beside("pgout", &lock).await;
    let topic = ob.topic("events", 3).await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut relay = ob.spawn_relay(&[
        ("OUTBOX_RELAY__HTTP__LISTEN", listen.as_str()),
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100"),
        ("OUTBOX_RELAY__RELAY__MAX_BACKOFF", "1s"),
    ]);
    wait_for("ready", Duration::from_secs(30), || ready(port) == Some(true)).await;
    let writers = Writers::start(WriterSpec::small(&ob.qualified(), &topic));
    tokio::time::sleep(Duration::from_secs(2)).await;
    infra_cmd(&["restart-postgres"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.assert_running();
    wait_for("ready again", Duration::from_secs(60), || ready(port) == Some(true)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(writers.finish().await > 0);
    check_all_delivered(&ob, &topic).await;
    let (code, err) = relay.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
}

/// The default bound on how long a batch may wait for Kafka (relay.publish_timeout,
/// 20 s), plus what one round trip and a heartbeat may add.
const HOLD_BOUND: f64 = 20.0 + 5.0;

#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_outage_holds_no_transaction_on_the_database_past_the_bound() {
    let lock = InfraLock::exclusive(&[Resource::Kafka]).await;
    let ob = Outbox::new_beside("horizon", &lock).await;
    let topic = ob.topic("events", 3).await;
    let url = ob.tagged_url();
    let mut relay =
        ob.spawn_relay(&[("OUTBOX_RELAY__POSTGRES__URL", url.as_str()), ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100")]);
    let writers = Writers::start(WriterSpec::small(&ob.qualified(), &topic));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let db = pg().await;
    stop_kafka();
    // Kafka stays away for twice the bound while the application keeps writing.
    let outage = Duration::from_secs(50);
    let started = Instant::now();
    let mut longest: f64 = 0.0;
    while started.elapsed() < outage {
        longest = longest.max(longest_transaction(&db, &ob.table).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    relay.assert_running();
    infra_cmd(&["start-kafka"]);
    let during = writers.written();
    tokio::time::sleep(Duration::from_secs(5)).await;
    writers.finish().await;
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

/// A relay (either mode) started while Kafka is away does not exit: it waits,
/// holding nothing on the database, and relays once Kafka answers. (Before
/// 0.3, start-up gave up after relay.startup_timeout and exited 69; an
/// exactly-once relay could also mistake a metadata timeout for an untrusted
/// decisions topic and exit 64.)
#[tokio::test(flavor = "multi_thread")]
async fn relays_started_while_kafka_is_down_wait_and_relay_once_it_returns() {
    let lock = InfraLock::exclusive(&[Resource::Kafka]).await;
    let alo = Outbox::new_beside("startdown", &lock).await;
    let eos = Outbox::new_beside("startdown_eos", &lock).await;
    let (alo_topic, eos_topic) = (alo.topic("events", 1).await, eos.topic("events", 1).await);
    alo.insert(&alo_topic, 50, 3).await;
    eos.insert(&eos_topic, 50, 3).await;
    stop_kafka();
    let decisions = format!("{}.commits", eos.table);
    let short = ("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT", "5s");
    let (alo_url, eos_url) = (alo.tagged_url(), eos.tagged_url());
    let mut a = alo.spawn_relay(&[short, ("OUTBOX_RELAY__POSTGRES__URL", alo_url.as_str())]);
    let mut e = eos.spawn_relay(&[
        short,
        ("OUTBOX_RELAY__POSTGRES__URL", eos_url.as_str()),
        ("OUTBOX_RELAY__RELAY__DELIVERY", "exactly-once"),
        ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", decisions.as_str()),
    ]);
    // Well past relay.startup_timeout: both still run and hold nothing.
    let db = pg().await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        for ob in [&alo, &eos] {
            let held = longest_transaction(&db, &ob.table).await;
            assert!(held < 1.0, "{}: a relay holds a transaction while Kafka is away", ob.table);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    a.assert_running();
    e.assert_running();
    assert_eq!(alo.count("published_at IS NOT NULL").await, 0);
    infra_cmd(&["start-kafka"]);
    check_all_delivered(&alo, &alo_topic).await;
    check_all_delivered(&eos, &eos_topic).await;
    let d = delivery(&eos, std::slice::from_ref(&eos_topic), Duration::from_secs(2)).await;
    assert_eq!(d.duplicates, 0, "exactly once");
    for r in [a, e] {
        let (code, err) = r.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{err}");
    }
}
