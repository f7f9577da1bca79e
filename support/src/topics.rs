//! Topics: create, delete, describe.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::infra::brokers;

/// How to make a topic.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub partitions: i32,
    pub replication: i32,
    /// Topic configs (`min.insync.replicas`, `message.timestamp.type`…).
    pub config: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn new(partitions: i32) -> TopicSpec {
        TopicSpec { partitions, replication: 1, config: Vec::new() }
    }

    /// Replicated like a production topic on a cluster of `brokers`: RF
    /// min(3, brokers), `min.insync.replicas` 2 when RF is 3.
    pub fn replicated(mut self, brokers: usize) -> TopicSpec {
        self.replication = brokers.clamp(1, 3) as i32;
        if self.replication >= 3 {
            self.config.push(("min.insync.replicas".into(), "2".into()));
        }
        self
    }

    pub fn with(mut self, key: &str, value: &str) -> TopicSpec {
        self.config.push((key.into(), value.into()));
        self
    }
}

fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client")
}

/// Creates `name` on the single broker (an existing one is fine).
pub async fn create_topic(name: &str, partitions: i32) {
    create_topics_at(&brokers(), &[name.to_string()], &TopicSpec::new(partitions)).await;
}

/// Creates `names` at `bootstrap` as `spec` says (existing ones are fine).
pub async fn create_topics_at(bootstrap: &str, names: &[String], spec: &TopicSpec) {
    let new: Vec<NewTopic> = names
        .iter()
        .map(|t| {
            let mut n = NewTopic::new(t, spec.partitions, TopicReplication::Fixed(spec.replication));
            for (k, v) in &spec.config {
                n = n.set(k, v);
            }
            n
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let res = admin(bootstrap)
        .create_topics(&new, &opts)
        .await
        .unwrap_or_else(|e| panic!("create topics {names:?}: {e}; is Kafka running?"));
    for r in res {
        if let Err((t, code)) = r {
            assert_eq!(code, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "create topic {t}: {code:?}");
        }
    }
}

/// Deletes `name` and waits until the broker no longer lists it.
pub async fn delete_topic(name: &str) {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    admin(&brokers()).delete_topics(&[name], &opts).await.expect("delete topic");
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = c.fetch_metadata(Some(name), Duration::from_secs(5)).expect("metadata");
        if md.topics().first().is_none_or(|t| t.error().is_some() || t.partitions().is_empty()) {
            return;
        }
        assert!(Instant::now() < deadline, "topic {name} still listed after deletion");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A topic's configuration as the broker describes it.
pub async fn kafka_topic_config(name: &str) -> HashMap<String, String> {
    let res = admin(&brokers())
        .describe_configs([&ResourceSpecifier::Topic(name)], &AdminOptions::new())
        .await
        .expect("describe configs");
    let r = res.into_iter().next().expect("one resource").expect("topic described");
    r.entries.iter().filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v))).collect()
}

/// How many partitions `topic` has at `bootstrap`.
pub fn partitions_of(bootstrap: &str, topic: &str) -> usize {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("consumer");
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    md.topics().first().map_or(0, |t| t.partitions().len())
}

/// Writes one record (`key`, `value`) to partition 0 of `topic` and waits for
/// its acknowledgement.
pub async fn produce(topic: &str, key: &str, value: &str) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("producer");
    p.send(FutureRecord::to(topic).partition(0).key(key).payload(value), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}
