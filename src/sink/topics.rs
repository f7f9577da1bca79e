//! What the cluster says about a topic: partitions, replication, and the topic
//! settings the guarantees depend on (`cleanup.policy`, `min.insync.replicas`).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use super::SinkError;

/// One topic as the cluster describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub partitions: usize,
    /// The smallest replica count over its partitions.
    pub replication_factor: usize,
    pub cleanup_policy: String,
    pub min_insync_replicas: usize,
    /// `unclean.leader.election.enable`: an out-of-sync replica may become
    /// leader, dropping records the old leader had acknowledged.
    pub unclean_leader_election: bool,
}

/// The brokers in the cluster, and `topic` if it exists.
pub async fn describe(
    base: &ClientConfig,
    topic: &str,
    timeout: Duration,
) -> Result<(usize, Option<TopicInfo>), SinkError> {
    let cfg = base.clone();
    let name = topic.to_string();
    let span = tracing::Span::current();
    let (brokers, layout) = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer<super::RelayContext> = cfg
            .create_with_context(super::RelayContext::in_span(span))
            .map_err(|e| SinkError::config("kafka client", e))?;
        let md = c.fetch_metadata(Some(&name), timeout).map_err(|e| SinkError::kafka("metadata", e))?;
        let layout = match md.topics().first() {
            None => TopicState::Missing,
            Some(t) => topic_state(
                t.error().map(RDKafkaErrorCode::from),
                t.partitions().len(),
                t.partitions().iter().map(|p| p.replicas().len()).min().unwrap_or(0),
            ),
        };
        match layout {
            TopicState::Unsure(why) => Err(SinkError::unavailable(format!("metadata of topic {name}"), why)),
            _ if md.brokers().is_empty() => Err(SinkError::unavailable("metadata", "it lists no brokers")),
            TopicState::Missing => Ok((md.brokers().len(), None)),
            TopicState::Exists { partitions, replication_factor } => {
                Ok((md.brokers().len(), Some((partitions, replication_factor))))
            }
        }
    })
    .await
    .map_err(|e| SinkError::unavailable("metadata task", e))??;
    let Some((partitions, replication_factor)) = layout else { return Ok((brokers, None)) };
    let admin: AdminClient<super::RelayContext> = base
        .create_with_context(super::RelayContext::default())
        .map_err(|e| SinkError::config("cannot create the admin client", e))?;
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(|e| SinkError::kafka(format!("cannot describe topic {topic}"), e))?;
    let resource = described
        .into_iter()
        .next()
        .ok_or_else(|| SinkError::unavailable(format!("describe topic {topic}"), "no description"))?
        .map_err(|e| SinkError::unavailable(format!("cannot describe topic {topic}"), e))?;
    let value = |k: &str| resource.get(k).and_then(|e| e.value.clone()).unwrap_or_default();
    Ok((
        brokers,
        Some(TopicInfo {
            partitions,
            replication_factor,
            cleanup_policy: value("cleanup.policy"),
            min_insync_replicas: value("min.insync.replicas").parse().unwrap_or(1),
            unclean_leader_election: value("unclean.leader.election.enable") == "true",
        }),
    ))
}

/// What one metadata answer says about a topic.
#[derive(Debug, PartialEq, Eq)]
enum TopicState {
    Exists {
        partitions: usize,
        replication_factor: usize,
    },
    /// The cluster says it does not exist.
    Missing,
    /// Neither: a broker that is starting, stopping or electing a leader. Not
    /// "missing": the decisions topic's absence makes a relay refuse to start
    /// (or create it), so only the cluster's own word counts as absent.
    Unsure(String),
}

fn topic_state(error: Option<RDKafkaErrorCode>, partitions: usize, replication_factor: usize) -> TopicState {
    match error {
        None if partitions > 0 => TopicState::Exists { partitions, replication_factor },
        None => TopicState::Unsure("no partitions listed".into()),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => TopicState::Missing,
        Some(code) => TopicState::Unsure(code.to_string()),
    }
}

/// What a production event topic should have on a cluster of `brokers`:
/// returns one warning per setting below that.
pub fn event_topic_warnings(topic: &str, info: &TopicInfo, brokers: usize) -> Vec<String> {
    let mut out = Vec::new();
    let want_rf = brokers.min(3);
    if info.replication_factor < want_rf {
        out.push(format!(
            "topic {topic} has replication factor {} on a cluster of {brokers} brokers: a broker failure can \
             lose acknowledged events; use 3",
            info.replication_factor
        ));
    }
    if info.replication_factor >= 3 && info.min_insync_replicas < 2 {
        out.push(format!(
            "topic {topic} has min.insync.replicas = {}: acks=all then waits for one replica only; set it to 2 \
             (kafka-configs --alter --entity-type topics --entity-name {topic} --add-config min.insync.replicas=2)",
            info.min_insync_replicas
        ));
    }
    if info.unclean_leader_election {
        out.push(unclean_election_warning(topic));
    }
    out
}

/// The line for a topic whose out-of-sync replicas may become leader.
pub fn unclean_election_warning(topic: &str) -> String {
    format!(
        "topic {topic} has unclean.leader.election.enable=true: an out-of-sync replica can become leader and \
         drop events (and transaction markers) the old leader acknowledged; set it to false (kafka-configs --alter \
         --entity-type topics --entity-name {topic} --add-config unclean.leader.election.enable=false)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_clusters_unknown_topic_answer_means_missing() {
        assert_eq!(topic_state(None, 1, 3), TopicState::Exists { partitions: 1, replication_factor: 3 });
        assert_eq!(topic_state(Some(RDKafkaErrorCode::UnknownTopicOrPartition), 0, 0), TopicState::Missing);
        // A restarting single broker answers these for a topic that exists; taking
        // them for "missing" made an exactly-once relay with prepared batches
        // refuse to start (exit 64) in a chaos run's Kafka outage.
        for transient in [RDKafkaErrorCode::LeaderNotAvailable, RDKafkaErrorCode::BrokerNotAvailable] {
            assert!(matches!(topic_state(Some(transient), 0, 0), TopicState::Unsure(_)), "{transient:?}");
        }
        assert!(matches!(topic_state(None, 0, 0), TopicState::Unsure(_)));
    }

    #[test]
    fn event_topics_below_rf3_or_min_isr2_or_with_unclean_election_are_named() {
        let ok = TopicInfo {
            partitions: 6,
            replication_factor: 3,
            cleanup_policy: "delete".into(),
            min_insync_replicas: 2,
            unclean_leader_election: false,
        };
        assert!(event_topic_warnings("orders", &ok, 3).is_empty());
        let rf1 = TopicInfo { replication_factor: 1, ..ok.clone() };
        assert!(event_topic_warnings("orders", &rf1, 3)[0].contains("replication factor 1"));
        assert!(event_topic_warnings("orders", &rf1, 1).is_empty(), "a one-broker cluster cannot do better");
        let isr1 = TopicInfo { min_insync_replicas: 1, ..ok.clone() };
        assert!(event_topic_warnings("orders", &isr1, 3)[0].contains("min.insync.replicas = 1"));
        let unclean = TopicInfo { unclean_leader_election: true, ..ok };
        assert!(event_topic_warnings("orders", &unclean, 1)[0].contains("unclean.leader.election.enable=true"));
    }
}
