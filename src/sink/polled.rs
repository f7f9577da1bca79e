//! A producer with a thread of its own serving its delivery reports, like
//! rdkafka's `ThreadedProducer`, without its idle spin.
//!
//! `ThreadedProducer` polls in 100 ms windows, and `BaseProducer::poll` turns
//! what is left of a window into whole milliseconds: the last fraction of
//! every window becomes a stream of zero-timeout polls. That was ~0.7 % of a
//! core per producer with nothing to do, three quarters of an idle relay's
//! CPU. Here a window lasts [`POLL_WINDOW`], so that tail comes once a second.
//! A report never waits for the window: the poll returns as soon as one is
//! queued.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{BaseProducer, Producer, ProducerContext, PurgeConfig};

/// How long one poll of the producer's queue may wait for a report. Also how
/// long a dropped producer may live on before its thread notices and destroys
/// it (off the async runtime).
pub const POLL_WINDOW: Duration = Duration::from_secs(1);

/// A [`BaseProducer`] and the thread polling it; clones share both. When the
/// last clone is dropped, what the producer still holds is purged at once (as
/// dropping a `ThreadedProducer` did), and the thread stops within
/// [`POLL_WINDOW`] and destroys the producer there, off the async runtime.
pub struct Polled<C: ProducerContext + 'static>(Arc<Shared<C>>);

struct Shared<C: ProducerContext + 'static> {
    producer: Arc<BaseProducer<C>>,
    stop: Arc<AtomicBool>,
}

impl<C: ProducerContext + 'static> Drop for Shared<C> {
    fn drop(&mut self) {
        self.producer.purge(PurgeConfig::default().queue().inflight());
        self.stop.store(true, Ordering::Release);
    }
}

impl<C: ProducerContext + 'static> Polled<C> {
    pub fn create(config: &ClientConfig, context: C) -> KafkaResult<Polled<C>> {
        let producer = Arc::new(BaseProducer::from_config_and_context(config, context)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&producer), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("kafka-reports".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    p.poll(POLL_WINDOW);
                }
                // `p`, the last reference once every clone is gone, drops here.
            })
            .map_err(|e| KafkaError::ClientCreation(format!("cannot start its poll thread: {e}")))?;
        Ok(Polled(Arc::new(Shared { producer, stop })))
    }
}

impl<C: ProducerContext + 'static> Clone for Polled<C> {
    fn clone(&self) -> Self {
        Polled(Arc::clone(&self.0))
    }
}

impl<C: ProducerContext + 'static> Deref for Polled<C> {
    type Target = BaseProducer<C>;
    fn deref(&self) -> &BaseProducer<C> {
        &self.0.producer
    }
}
