//! Exact fault injection with librdkafka's mock cluster (it cannot prove the
//! guarantees — the real-broker tests do — but it can make Kafka fail on cue):
//! transient errors are retried and never park, authorisation failures park,
//! a fatal producer state rebuilds the producer. Postgres is the real one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::config::Settings;
use outbox_relay::relay::{Relay, Step};
use outbox_relay::sink::KafkaSink;
use outbox_relay::store::Store;
use outbox_relay_support::*;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use tokio::sync::Notify;

fn settings(table: &str, brokers: &str, extra: &[(&str, &str)]) -> Settings {
    let mut env: Vec<(String, String)> = vec![
        ("OUTBOX_RELAY__POSTGRES__URL".into(), pg_url()),
        ("OUTBOX_RELAY__KAFKA__BROKERS".into(), brokers.into()),
        ("OUTBOX_RELAY__OUTBOX__TABLE".into(), table.into()),
        ("OUTBOX_RELAY__RELAY__RETRY_BACKOFF".into(), "100ms".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Settings::load_from(None, env).expect("settings")
}

/// Steps the relay until nothing is claimable and no row waits for a retry.
async fn drive(relay: &Relay<KafkaSink>, ob: &Outbox, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let step = relay.step().await.expect("step");
        let waiting = ob.count("published_at IS NULL AND parked_at IS NULL").await;
        if step == Step::Idle && waiting == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "not drained after {timeout:?}: {waiting} pending");
        if step == Step::Idle {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

type Mock = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

async fn setup(prefix: &str, extra: &[(&str, &str)]) -> (Outbox, Mock, Relay<KafkaSink>, Arc<KafkaSink>) {
    let ob = Outbox::new(prefix).await;
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic("t", 1, 1).expect("topic");
    let s = settings(&ob.table, &mock.bootstrap_servers(), extra);
    let store = Store::new(&s).unwrap();
    let sink = Arc::new(KafkaSink::new(&s).unwrap());
    let relay = Relay::new(store, sink.clone(), s.relay.clone(), Arc::new(Notify::new()));
    (ob, mock, relay, sink)
}

async fn insert(ob: &Outbox, n: i32) {
    pg().await
        .execute(
            &format!(
                "INSERT INTO {} (topic, key, payload) SELECT 't', 'k' || i % 4, '{{}}' FROM generate_series(1, $1) i",
                ob.qualified()
            ),
            &[&n],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_broker_errors_are_retried_and_never_park() {
    let (ob, mock, relay, _sink) = setup("fault_transient", &[("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "1")]).await;
    insert(&ob, 20).await;
    use RDKafkaRespErr::*;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION,
        ],
    );
    drive(&relay, &ob, Duration::from_secs(60)).await;
    assert_eq!(ob.count("published_at IS NOT NULL").await, 20);
    assert_eq!(
        ob.count("parked_at IS NOT NULL OR attempts > 0").await,
        0,
        "transient faults never count against an event"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_down_for_a_while_delays_but_loses_and_parks_nothing() {
    let (ob, mock, relay, _sink) = setup("fault_down", &[("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "1")]).await;
    insert(&ob, 10).await;
    mock.broker_down(1).unwrap();
    // same task, no Send needed: the broker comes back while the relay waits
    tokio::join!(drive(&relay, &ob, Duration::from_secs(60)), async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        mock.broker_up(1).unwrap();
    });
    assert_eq!(ob.count("published_at IS NOT NULL").await, 10);
    assert_eq!(ob.count("parked_at IS NOT NULL OR attempts > 0").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn topic_authorization_failure_is_parked_with_its_reason() {
    let (ob, mock, relay, _sink) = setup("fault_authz", &[("OUTBOX_RELAY__RELAY__MAX_ATTEMPTS", "2")]).await;
    insert(&ob, 1).await;
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 2]);
    drive(&relay, &ob, Duration::from_secs(60)).await;
    let row = pg()
        .await
        .query_one(&format!("SELECT attempts, last_error FROM {} WHERE parked_at IS NOT NULL", ob.qualified()), &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    let err: String = row.get(1);
    assert!(err.to_lowercase().contains("authoriz"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fatal_producer_error_rebuilds_the_producer_and_delivers_later() {
    let (ob, mock, relay, sink) = setup("fault_fatal", &[]).await;
    insert(&ob, 5).await;
    // A sequence desynchronisation on the head-of-line request makes the idempotent
    // producer unusable: librdkafka raises a fatal error.
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER]);
    drive(&relay, &ob, Duration::from_secs(60)).await;
    assert_eq!(ob.count("published_at IS NOT NULL").await, 5);
    assert_eq!(ob.count("parked_at IS NOT NULL").await, 0, "a broken producer is not the events' fault");
    assert!(sink.rebuilds() >= 1, "the fatal error was seen and the producer rebuilt");
}

/// The finish sends its statements and the COMMIT in one round trip. When the
/// statement recording a rejection fails, none of the batch may be committed,
/// not even the marks of the events Kafka acknowledged (they are published
/// again: at-least-once), and the caller gets the statement's error.
#[tokio::test(flavor = "multi_thread")]
async fn a_finish_whose_statement_fails_commits_none_of_its_batch() {
    use outbox_relay::store::{EventFailure, Outcome};
    let ob = Outbox::new("finishfail").await;
    let t = ob.qualified();
    let db = pg().await;
    // Counting an attempt fails while this trigger exists; marking does not.
    let f = format!("{}_frozen", ob.table);
    db.batch_execute(&format!(
        "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'attempts frozen'; END $$;
         CREATE TRIGGER {f} BEFORE UPDATE OF attempts ON {t} FOR EACH ROW EXECUTE FUNCTION {f}();
         INSERT INTO {t} (topic, key, payload) VALUES ('x', 'a', '{{}}'), ('x', 'b', '{{}}'), ('x', 'c', '{{}}');"
    ))
    .await
    .unwrap();
    let store = Store::new(&settings(&ob.table, &brokers(), &[("OUTBOX_RELAY__RELAY__ON_PUBLISH", "mark")])).unwrap();
    let rejected = || Outcome::Failed(EventFailure { error: "rejected".into(), park_now: true });
    let outcomes = [Outcome::Delivered, rejected(), Outcome::Delivered];
    let batch = store.claim(10, &[]).await.unwrap().expect("a batch");
    assert_eq!(batch.events.len(), 3);
    let err = batch.finish(&outcomes, 5).await.expect_err("the failing statement's error");
    assert!(err.to_string().contains("attempts frozen"), "{err}");
    assert_eq!(ob.count("published_at IS NOT NULL OR attempts > 0").await, 0, "part of the batch was committed");
    // The rows are pending and unlocked: the next claim gets them all again.
    db.batch_execute(&format!("DROP TRIGGER {f} ON {t}; DROP FUNCTION {f}()")).await.unwrap();
    let batch = store.claim(10, &[]).await.unwrap().expect("the batch again");
    assert_eq!(batch.events.len(), 3);
    let (done, _) = batch.finish(&outcomes, 5).await.unwrap();
    assert_eq!((done.published, done.failed, done.parked()), (2, 1, 1));
    assert_eq!(ob.count("published_at IS NOT NULL").await, 2);
}
