//! The bench's view of the support kit: the infrastructure, tables, topics,
//! relays and writers as the sections use them.

use std::process::Command;

use outbox_relay_support::{
    create_topics_at, infra, pg_at, relay_cmd, relay_cmd_with, RelayProcess, Stderr, TopicSpec, WriterSpec, Writers,
};

/// The local infrastructure.
#[derive(Debug, Clone)]
pub(crate) struct Env {
    pub(crate) pg_url: String,
    pub(crate) brokers: String,
    /// Replication factor of the topics the bench creates.
    pub(crate) replication: i32,
    /// The relay binary, when not the one beside the bench (`--before-bin`).
    pub(crate) bin: Option<std::path::PathBuf>,
    /// Settings on top of every relay's (`--before-set`).
    pub(crate) extra: Vec<(String, String)>,
}

impl Env {
    pub(crate) fn from_infra() -> Env {
        let i = infra();
        let replication = if i.brokers.split(',').count() >= 3 { 3 } else { 1 };
        Env { pg_url: i.pg_url.clone(), brokers: i.brokers.clone(), replication, bin: None, extra: Vec::new() }
    }

    pub(crate) async fn db(&self) -> tokio_postgres::Client {
        pg_at(&self.pg_url).await
    }

    /// `outbox-relay` for `table` with `settings`, logging warnings only.
    pub(crate) fn relay_cmd(&self, table: &str, settings: &[(String, String)]) -> Command {
        let mut all = vec![("OUTBOX_RELAY__LOG__LEVEL", "warn")];
        all.extend(settings.iter().chain(&self.extra).map(|(k, v)| (k.as_str(), v.as_str())));
        match &self.bin {
            Some(bin) => relay_cmd_with(bin, table, &all),
            None => relay_cmd(table, &all),
        }
    }

    /// This environment with another relay binary and settings on top.
    pub(crate) fn with_bin(&self, bin: &std::path::Path, extra: Vec<(String, String)>) -> Env {
        Env { bin: Some(bin.to_path_buf()), extra, ..self.clone() }
    }

    /// A new outbox table `<prefix>_<random>`, migrated.
    pub(crate) fn new_table(&self, prefix: &str) -> String {
        let table = format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let out = self.relay_cmd(&table, &[]).arg("migrate").output().expect("migrate");
        assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
        table
    }

    /// Topics `<run>.<name>` with `partitions` each (LogAppendTime if asked:
    /// the broker then stamps when it appended, for commit→ack latency).
    pub(crate) async fn topics(&self, run: &str, names: &[&str], partitions: i32, append_time: bool) -> Vec<String> {
        let topics: Vec<String> = names.iter().map(|t| format!("{run}.{t}")).collect();
        let mut spec = TopicSpec::new(partitions).replicated(self.replication as usize);
        if append_time {
            spec = spec.with("message.timestamp.type", "LogAppendTime");
        }
        create_topics_at(&self.brokers, &topics, &spec).await;
        topics
    }

    /// The lowest pending seq (None when drained): one index probe.
    pub(crate) async fn head(&self, db: &tokio_postgres::Client, table: &str) -> Option<i64> {
        db.query_one(
            &format!(
                "SELECT (SELECT seq FROM public.{table} WHERE published_at IS NULL AND parked_at IS NULL ORDER BY seq LIMIT 1)"
            ),
            &[],
        )
        .await
        .expect("head")
        .get(0)
    }

    /// Pending rows (counted through the pending index).
    pub(crate) async fn pending(&self, db: &tokio_postgres::Client, table: &str) -> i64 {
        db.query_one(
            &format!("SELECT count(*) FROM public.{table} WHERE published_at IS NULL AND parked_at IS NULL"),
            &[],
        )
        .await
        .expect("pending")
        .get(0)
    }

    /// Application writers into `table` (≈1 KB events over 1000 keys).
    pub(crate) fn writers(&self, table: &str, topics: Vec<String>, connections: u64, rate: u64) -> Writers {
        Writers::start(WriterSpec {
            pg_url: self.pg_url.clone(),
            table: format!("public.{table}"),
            topics,
            connections,
            per_tx: 10,
            rate,
            keys: 1000,
            hot_key_share: 0.0,
            pad: outbox_relay_support::PAD,
            reconnect: false,
            rollback_share: 0.0,
            max_events: 0,
        })
    }
}

/// A relay process whose stderr goes to the bench's stderr.
pub(crate) fn spawn_relay(env: &Env, table: &str, settings: &[(String, String)]) -> RelayProcess {
    let mut cmd = env.relay_cmd(table, settings);
    cmd.arg("run");
    RelayProcess::spawn(cmd, Stderr::Inherit)
}
