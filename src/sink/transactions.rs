//! The Kafka transaction API of exactly-once mode. Every call blocks inside
//! librdkafka, so each runs on the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer};

use super::acks::BatchAcks;
use super::kafka::build;
use super::{classify, KafkaSink, SendResult, SinkError};

impl KafkaSink {
    /// Replaces the producer with a new one and registers it with the
    /// transaction coordinator (`init_transactions`): this fences every older
    /// producer with the same transactional id — a zombie of this relay — and
    /// completes or aborts the transaction it left open.
    pub async fn reset_transactional(&self, timeout: Duration) -> Result<(), SinkError> {
        let fresh = build(&self.config)?;
        let p = fresh.clone();
        blocking("init transactions", move || p.init_transactions(timeout)).await?;
        self.install(fresh);
        Ok(())
    }

    pub async fn begin(&self) -> Result<(), SinkError> {
        let p = self.producer();
        blocking("begin transaction", move || p.begin_transaction()).await
    }

    pub async fn commit(&self, timeout: Duration) -> Result<(), SinkError> {
        let p = self.producer();
        blocking("commit transaction", move || p.commit_transaction(timeout)).await
    }

    pub async fn abort(&self, timeout: Duration) -> Result<(), SinkError> {
        let p = self.producer();
        blocking("abort transaction", move || p.abort_transaction(timeout)).await
    }

    /// Fences another relay's transactional id: a throw-away producer with that
    /// id registers with the coordinator, which completes (if its commit had
    /// begun) or aborts the other relay's open transaction and refuses that
    /// relay's later commits.
    pub async fn fence(&self, transactional_id: &str, timeout: Duration) -> Result<(), SinkError> {
        let mut config = self.config.clone();
        config.set("transactional.id", transactional_id);
        config.set("client.id", "outbox-relay-recovery");
        // Also from an at-least-once relay, whose config has no transaction bound.
        config.set("transaction.timeout.ms", "15000");
        config.set("message.timeout.ms", "10000");
        let p = build(&config)?;
        blocking("fence", move || p.init_transactions(timeout)).await
    }

    /// Produces the batch's commit decision (key = transactional id, value =
    /// the batch's prepared-transaction id) to partition 0 of `topic`, inside
    /// the open transaction.
    pub fn send_decision(&self, topic: &str, key: &str, gid: &str) -> BoxFuture<'static, SendResult> {
        debug_assert!(self.is_transactional());
        let acks = Arc::new(BatchAcks::new(1));
        let record: BaseRecord<'_, [u8], [u8], _> =
            BaseRecord::with_opaque_to(topic, Box::new((acks.clone(), 0, None)))
                .partition(0)
                .key(key.as_bytes())
                .payload(gid.as_bytes());
        let producer = self.producer();
        if let Err((e, _)) = producer.send(record) {
            acks.set(0, SendResult::Failed { class: classify(&e), error: e.to_string() });
        }
        async move {
            let result = acks.wait_all().await.pop().unwrap_or(SendResult::Skipped);
            drop(producer);
            result
        }
        .boxed()
    }
}

async fn blocking<F>(what: &'static str, f: F) -> Result<(), SinkError>
where
    F: FnOnce() -> Result<(), KafkaError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| SinkError::kafka(what, e)),
        Err(e) => Err(SinkError::unavailable(what, format!("task failed: {e}"))),
    }
}
