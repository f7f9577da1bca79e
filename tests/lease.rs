//! The exactly-once id lease is kept, not just taken (#21 item 4): after a
//! Postgres restart its holder takes it again, so a twin with the same
//! relay.id is still refused; and a holder cut off by a network partition
//! loses it within the stated bound (`store::LEASE_EXPIRY`), so its
//! replacement runs, and the old holder stops when it comes back.

use std::process::Command;
use std::time::{Duration, Instant};

use outbox_relay_support::*;

const EOS: (&str, &str) = ("OUTBOX_RELAY__RELAY__DELIVERY", "exactly-once");
const NETNS: &str = "outbox-relay-part";
const NETNS_PG_HOST: &str = "10.203.0.1";

#[tokio::test(flavor = "multi_thread")]
async fn after_a_postgres_restart_the_holder_takes_its_lease_again_and_a_twin_is_refused() {
    let lock = InfraLock::exclusive(&[Resource::Postgres]).await;
    let ob = Outbox::new_beside("lease_restart", &lock).await;
    let topic = ob.topic("events", 2).await;
    let id = ("OUTBOX_RELAY__RELAY__ID", "lease-twin");
    let a = ob.spawn_relay(&[EOS, id, ("OUTBOX_RELAY__RELAY__MAX_BACKOFF", "1s")]);
    a.wait_log("exactly-once ready", Duration::from_secs(60));
    ob.insert(&topic, 50, 5).await;
    ob.wait_drained(Duration::from_secs(60)).await;

    infra_cmd(&["restart-postgres"]);
    a.wait_log("took the exactly-once id lease again", Duration::from_secs(60));
    drop(lock);
    let _shared = InfraLock::shared(&[Resource::Postgres]).await;

    // The twin waits for the lease (its holder could be a vanished host), then is refused.
    let mut twin = ob.spawn_relay(&[EOS, id, ("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT", "1s")]);
    let status = twin.wait_exit(Duration::from_secs(120));
    let log = twin.log();
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("another live relay") && !log.contains("exactly-once ready"), "{log}");
    // The holder goes on publishing.
    ob.insert(&topic, 50, 5).await;
    ob.wait_drained(Duration::from_secs(60)).await;
    let (code, log) = a.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

/// `scripts/infra netns`, taken down again when the test ends.
struct Netns;

impl Netns {
    fn up() -> Netns {
        infra_cmd(&["netns", "up"]);
        Netns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        infra_cmd(&["netns", "heal"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_holder_loses_its_lease_within_the_bound_and_stops_when_it_returns() {
    let _net = Netns::up();
    let ob = Outbox::new("lease_part").await;
    let topic = ob.topic("events", 2).await;
    let id = ("OUTBOX_RELAY__RELAY__ID", "lease-part");
    // The holder runs in the namespace: it reaches Postgres over the veth link
    // (Kafka it cannot reach, which does not matter to the lease).
    let cmd = relay_cmd_in_netns(NETNS, NETNS_PG_HOST, &ob.table, &[EOS, id]);
    let holder = spawn_run(cmd);
    holder.wait_log("outbox-relay started", Duration::from_secs(60));

    let replacement = ob.spawn_relay(&[EOS, id, ("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT", "0s")]);
    replacement.wait_log("another live relay uses this relay.id; waiting", Duration::from_secs(30));
    infra_cmd(&["netns", "cut"]);
    let cut = Instant::now();
    replacement.wait_log("exactly-once ready", Duration::from_secs(120));
    let took = cut.elapsed();
    eprintln!("the replacement ran {took:?} after the partition");
    let bound = outbox_relay::store::LEASE_EXPIRY + Duration::from_secs(10);
    assert!(took <= bound, "the lease outlived its holder's partition by {took:?} (bound {bound:?})");
    ob.insert(&topic, 50, 5).await;
    ob.wait_drained(Duration::from_secs(60)).await;

    // The old holder comes back: the lease is taken, so it stops.
    infra_cmd(&["netns", "heal"]);
    let mut holder = holder;
    let status = holder.wait_exit(Duration::from_secs(60));
    let log = holder.log();
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("took the exactly-once id lease while this one had lost it"), "{log}");
    let (code, log) = replacement.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{log}");
}

fn spawn_run(mut cmd: Command) -> RelayProcess {
    cmd.arg("run");
    RelayProcess::spawn(cmd, Stderr::Keep)
}
