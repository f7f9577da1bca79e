//! Prints the events of a topic as a consumer sees them (read_committed), with
//! the `event_id` dedup header. Stops after `--count` messages or `--idle`.
//!
//! ```text
//! cargo run --example tail -- --topic orders --count 20
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "orders")]
    topic: String,
    /// Stop after this many messages (0 = no limit).
    #[arg(long, default_value_t = 0)]
    count: usize,
    /// Stop after this many seconds without a message.
    #[arg(long, default_value_t = 10)]
    idle: u64,
    /// Start at the end instead of the beginning of the topic.
    #[arg(long)]
    from_end: bool,
    /// Create the topic first, with this many partitions, if it does not exist
    /// (the relay never creates event topics).
    #[arg(long)]
    create: Option<i32>,
    /// With --create: only create the topic, then exit.
    #[arg(long, requires = "create")]
    create_only: bool,
    #[arg(long, env = "OUTBOX_RELAY__KAFKA__BROKERS")]
    brokers: String,
}

/// Creates `topic` unless it exists (as an operator would before the first event).
fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), Box<dyn std::error::Error>> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    for r in rt.block_on(admin.create_topics([&new], &AdminOptions::new()))? {
        match r {
            Ok(_) => eprintln!("created topic {topic} ({partitions} partitions)"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(format!("cannot create topic {t}: {e}").into()),
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(partitions) = args.create {
        create_topic(&args.brokers, &args.topic, partitions)?;
        if args.create_only {
            return Ok(());
        }
    }
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", "outbox-relay-tail")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    // Wait for the topic (someone else may be creating it); a topic that did
    // not exist when we started holds only new events, so read it all.
    let started = Instant::now();
    let mut existed = true;
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(&args.topic), Duration::from_secs(10))?;
        let ids: Vec<i32> =
            md.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default();
        if !ids.is_empty() {
            break ids;
        }
        existed = false;
        if started.elapsed() > Duration::from_secs(args.idle) {
            return Err(format!("topic {} does not exist", args.topic).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let offset = if args.from_end && existed { Offset::End } else { Offset::Beginning };
        tpl.add_partition_offset(&args.topic, p, offset)?;
    }
    consumer.assign(&tpl)?;
    let (mut n, mut last) = (0, Instant::now());
    while last.elapsed() < Duration::from_secs(args.idle) && (args.count == 0 || n < args.count) {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m?;
            let event_id = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "event_id").and_then(|h| h.value))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            println!(
                "{}[{}]@{} key={} event_id={} value={}",
                m.topic(),
                m.partition(),
                m.offset(),
                m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_else(|| "-".into()),
                event_id,
                m.payload().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_else(|| "<tombstone>".into()),
            );
            n += 1;
            last = Instant::now();
        }
    }
    eprintln!("{n} message(s)");
    Ok(())
}
