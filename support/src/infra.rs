//! The local infrastructure `scripts/infra` runs: where it is (read from
//! `scripts/infra env`, or the variables it prints when they are set), failing
//! loudly when it is not there, and the locks that keep a test that stops a
//! broker or restarts Postgres from running beside a test that uses them.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tokio_postgres::NoTls;

/// The broker with SASL_SSL (SCRAM-SHA-512) and TLS listeners, and a
/// plaintext one for the tests' own admin client.
#[derive(Debug, Clone)]
pub struct SecureKafka {
    pub sasl_ssl: String,
    pub tls: String,
    pub plain_admin: String,
    pub user: String,
    pub password: String,
}

/// Where the local Postgres and Kafka are.
#[derive(Debug, Clone)]
pub struct Infra {
    /// `OUTBOX_RELAY__POSTGRES__URL`.
    pub pg_url: String,
    /// `OUTBOX_RELAY__KAFKA__BROKERS`: the single broker (or whatever the
    /// caller's environment points at).
    pub brokers: String,
    /// The 3-node cluster (`scripts/infra up --brokers 3`).
    pub cluster: String,
    /// The CA of the local Postgres's TLS certificate (the secure broker's too).
    pub pg_ca: PathBuf,
    /// The broker that requires security (`scripts/infra up --secure`).
    pub secure: SecureKafka,
    /// `scripts/infra` itself.
    pub script: PathBuf,
}

const MISSING: &str = "integration tests need the local PostgreSQL and Kafka: run `scripts/test` \
                       (or `scripts/infra up --brokers 3 --secure` and `eval \"$(scripts/infra env)\"`)";

/// The checkout this runs from. `cargo test` names the package under test
/// (the repository's root) at run time; the path compiled in is the fallback,
/// and can be stale: cargo keeps a workspace's artifacts across checkouts that
/// share a target directory.
fn repo_root() -> PathBuf {
    let runtime = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    match runtime {
        Some(dir) if dir.join("scripts/infra").is_file() => dir,
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default(),
    }
}

/// The infrastructure, read once: the variables `scripts/infra env` prints,
/// from the environment when set (as `scripts/test` sets them), else from
/// running `scripts/infra env`.
pub fn infra() -> &'static Infra {
    static INFRA: OnceLock<Infra> = OnceLock::new();
    INFRA.get_or_init(|| {
        let script = repo_root().join("scripts/infra");
        let out = std::process::Command::new(&script)
            .arg("env")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let printed: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| {
            std::env::var(k)
                .ok()
                .or_else(|| printed.get(k).cloned())
                .unwrap_or_else(|| panic!("`scripts/infra env` printed no {k}; {MISSING}"))
        };
        Infra {
            pg_url: get("OUTBOX_RELAY__POSTGRES__URL"),
            brokers: get("OUTBOX_RELAY__KAFKA__BROKERS"),
            cluster: get("OUTBOX_RELAY_TEST_CLUSTER"),
            pg_ca: PathBuf::from(get("OUTBOX_RELAY_TEST_PG_CA")),
            secure: SecureKafka {
                sasl_ssl: get("OUTBOX_RELAY_TEST_KAFKA_SASL_SSL"),
                tls: get("OUTBOX_RELAY_TEST_KAFKA_TLS"),
                plain_admin: get("OUTBOX_RELAY_TEST_KAFKA_PLAIN_ADMIN"),
                user: get("OUTBOX_RELAY_TEST_KAFKA_SCRAM_USER"),
                password: get("OUTBOX_RELAY_TEST_KAFKA_SCRAM_PASSWORD"),
            },
            script,
        }
    })
}

pub fn pg_url() -> String {
    infra().pg_url.clone()
}

pub fn brokers() -> String {
    infra().brokers.clone()
}

/// Runs `scripts/infra <args>`; fails the caller with its output if it fails.
pub fn infra_cmd(args: &[&str]) {
    let out = std::process::Command::new(&infra().script).args(args).output().expect("run scripts/infra");
    assert!(
        out.status.success(),
        "scripts/infra {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A connected client; fails (the test) with instructions if Postgres is not there.
pub async fn pg() -> tokio_postgres::Client {
    pg_at(&pg_url()).await
}

/// Shared buffers (hit + read) and calls of the claim statement on
/// `public.<table>` so far (pg_stat_statements, which `scripts/infra up` loads).
pub async fn claim_stats(db: &tokio_postgres::Client, table: &str) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT coalesce(sum(shared_blks_hit + shared_blks_read), 0)::int8, coalesce(sum(calls), 0)::int8
             FROM pg_stat_statements WHERE query LIKE '%\"public\".\"' || $1 || '\"%' AND query LIKE 'WITH due AS%'",
            &[&table],
        )
        .await
        .unwrap_or_else(|e| panic!("pg_stat_statements is needed (scripts/infra up loads it): {e}"));
    (row.get(0), row.get(1))
}

pub async fn pg_at(url: &str) -> tokio_postgres::Client {
    let (client, conn) = match tokio_postgres::connect(url, NoTls).await {
        Ok(c) => c,
        Err(e) => panic!("cannot connect to PostgreSQL ({e}); {MISSING}"),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Can a client reach `bootstrap` right now?
pub fn kafka_reachable(bootstrap: &str) -> bool {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("consumer config");
    c.fetch_metadata(None, Duration::from_secs(2)).is_ok()
}

/// Fails the test with instructions when the broker is not reachable.
pub fn require_kafka() {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().expect("consumer config");
    if let Err(e) = c.fetch_metadata(None, Duration::from_secs(10)) {
        panic!("cannot reach Kafka at {} ({e}); {MISSING}", brokers());
    }
}

/// What a disruptive test stops or restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Postgres,
    /// The single broker.
    Kafka,
    /// The 3-node cluster.
    Cluster,
}

impl Resource {
    fn file(self) -> &'static str {
        match self {
            Resource::Postgres => "postgres.lock",
            Resource::Kafka => "kafka.lock",
            Resource::Cluster => "cluster.lock",
        }
    }
}

/// Locks on the shared infrastructure, across processes (`flock`): every
/// test holds a shared lock on what it uses for as long as it runs; a test
/// that stops or restarts something holds an exclusive one, so it never runs
/// beside a test that uses it — under `cargo test` (threads), nextest
/// (processes) or any other runner. Released when dropped.
#[derive(Debug)]
pub struct InfraLock {
    held: Vec<(Resource, File)>,
}

impl InfraLock {
    /// Waits for shared locks on `resources`.
    pub async fn shared(resources: &[Resource]) -> InfraLock {
        Self::take(resources.iter().map(|r| (*r, libc::LOCK_SH)).collect()).await
    }

    /// Waits for exclusive locks on `resources` (a disruptive test), and shared
    /// ones on what an outbox fixture uses besides (Postgres, the broker), all
    /// in one fixed order so that no two tests wait for each other in a
    /// circle. Take it first; make fixtures with `Outbox::new_beside`.
    pub async fn exclusive(resources: &[Resource]) -> InfraLock {
        let mut wanted: Vec<(Resource, i32)> = resources.iter().map(|r| (*r, libc::LOCK_EX)).collect();
        for r in [Resource::Postgres, Resource::Kafka] {
            if !resources.contains(&r) {
                wanted.push((r, libc::LOCK_SH));
            }
        }
        Self::take(wanted).await
    }

    pub fn holds(&self, r: Resource) -> bool {
        self.held.iter().any(|(h, _)| *h == r)
    }

    async fn take(mut wanted: Vec<(Resource, i32)>) -> InfraLock {
        let dir = std::env::var("OUTBOX_RELAY_INFRA_STATE").unwrap_or_else(|_| "/var/tmp/outbox-relay-infra".into());
        let dir = PathBuf::from(dir).join("locks");
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).expect("lock dir");
            let mut held = Vec::new();
            // always in the same order: no two tests wait for each other in a circle
            wanted.sort_by_key(|(r, _)| r.file());
            wanted.dedup_by_key(|(r, _)| *r);
            for (r, mode) in wanted {
                let f = File::options()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(dir.join(r.file()))
                    .expect("lock file");
                use std::os::fd::AsRawFd;
                // SAFETY: flock(2) on a file descriptor this function owns.
                let rc = unsafe { libc::flock(f.as_raw_fd(), mode) };
                assert_eq!(rc, 0, "flock {}: {}", r.file(), std::io::Error::last_os_error());
                held.push((r, f));
            }
            InfraLock { held }
        })
        .await
        .expect("lock task")
    }
}
