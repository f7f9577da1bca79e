//! A 3-broker Kafka cluster (replication factor 3, min.insync.replicas 2), as
//! production runs it (`scripts/infra up --brokers 3`): the leader of a busy
//! partition is SIGKILLed under load and comes back. Nothing may be lost,
//! parked or reordered, in both delivery modes.
//!
//! It kills brokers of the shared cluster: it holds the cluster's lock
//! exclusively (`InfraLock`), so nothing else that uses it runs meanwhile.

use std::time::{Duration, Instant};

use outbox_relay_support::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// The 3-broker cluster `scripts/infra` runs; fails with instructions otherwise.
fn cluster() -> String {
    let b = infra().cluster.clone();
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &b).create().expect("consumer");
    match c.fetch_metadata(None, Duration::from_secs(10)) {
        Ok(md) if md.brokers().len() == 3 => b,
        Ok(md) => panic!(
            "the test cluster at {b} has {} brokers, not 3: run `scripts/infra up --brokers 3`",
            md.brokers().len()
        ),
        Err(e) => panic!(
            "cannot reach the 3-broker test cluster at {b} ({e}): run scripts/test, or `scripts/infra up --brokers 3`"
        ),
    }
}

fn broker(action: &str, n: i32) {
    infra_cmd(&["broker", action, &n.to_string()]);
}

/// The broker leading partition `p` of `topic`.
fn leader(bootstrap: &str, topic: &str, p: i32) -> i32 {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("consumer");
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    md.topics()[0].partitions().iter().find(|x| x.id() == p).map(|x| x.leader()).expect("partition")
}

/// Every partition of `topic` has 3 in-sync replicas again.
async fn wait_in_sync(bootstrap: &str, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("consumer");
        if let Ok(md) = c.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            if md.topics()[0].partitions().iter().all(|p| p.isr().len() == 3 && p.leader() >= 0) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{topic} not back in sync within 2 minutes");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn leader_killed_under_load(delivery: &str) {
    let lock = InfraLock::exclusive(&[Resource::Cluster]).await;
    let bootstrap = cluster();
    let ob = Outbox::new_beside(if delivery == "exactly-once" { "cluster_eos" } else { "cluster_alo" }, &lock).await;
    let topic = format!("{}.events", ob.table);
    create_topics_at(&bootstrap, std::slice::from_ref(&topic), &TopicSpec::new(6).replicated(3)).await;
    let decisions = format!("{}.commits", ob.table);
    let env = [
        ("OUTBOX_RELAY__KAFKA__BROKERS", bootstrap.as_str()),
        ("OUTBOX_RELAY__RELAY__DELIVERY", delivery),
        ("OUTBOX_RELAY__RELAY__BATCH_SIZE", "100"),
        ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", decisions.as_str()),
    ];
    let relay = ob.spawn_relay(&env);
    let writers = Writers::start(WriterSpec { rate: 1000, ..WriterSpec::small(&ob.qualified(), &topic) });
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The leader of partition 0 dies without warning, mid-load; the cluster
    // elects another; the relay's idempotent producer moves on; the broker
    // returns after a while and catches up.
    let victim = leader(&bootstrap, &topic, 0);
    broker("kill", victim);
    eprintln!("{delivery}: killed broker {victim} (leader of {topic}[0]) after {} events", writers.written());
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker("start", victim);
    wait_in_sync(&bootstrap, &topic).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let written = writers.finish().await;
    ob.wait_drained(Duration::from_secs(120)).await;
    assert_eq!(ob.count("parked_at IS NOT NULL").await, 0, "a leader change is transient: nothing parked");
    let d = delivery_from(&bootstrap, &ob, std::slice::from_ref(&topic), Duration::from_secs(3)).await;
    assert_eq!(d.seq_of.len() as u64, written);
    assert!(d.lost.is_empty(), "{delivery}: lost {} (e.g. {:?})", d.lost.len(), &d.lost[..d.lost.len().min(3)]);
    assert_eq!(d.order_violations, 0, "{delivery}: per-key order");
    if delivery == "exactly-once" {
        assert_eq!(d.duplicates, 0, "exactly-once: no duplicate");
    }
    let (code, log) = relay.terminate(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_leader_killed_under_load_loses_nothing_and_keeps_order() {
    leader_killed_under_load("at-least-once").await;
    leader_killed_under_load("exactly-once").await;
}
