//! What an idle relay costs the host it shares with the application: a
//! sidecar with nothing to relay should use next to no CPU. Against the real
//! Postgres and Kafka of `scripts/infra`.

use std::time::Duration;

use outbox_relay_support::*;

/// utime + stime of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the relay's /proc stat");
    // Fields after the command (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// The relay's CPU over `secs` once started, as a share of one core.
async fn idle_share(relay: &RelayProcess, secs: u64) -> f64 {
    // Start-up (connections, metadata, the first looks) is not idling.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = cpu_ticks(relay.pid());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let used = cpu_ticks(relay.pid()) - before;
    // SAFETY: sysconf reads a constant of the system.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    used as f64 / hz / secs as f64
}

/// An idle relay, in either delivery mode, uses under 1.5 % of a core (this
/// test's debug build; a release build less). Its producers' report threads
/// polled in a loop for the last millisecond of every 100 ms window
/// (rdkafka's `ThreadedProducer`, and a second producer kept for the
/// decisions topic): an idle at-least-once relay used 2.5 % of a core here,
/// now ~0.8 % (~0.5 % in a release build).
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_relay_uses_under_one_and_a_half_percent_of_a_core() {
    for mode in ["at-least-once", "exactly-once"] {
        let ob = Outbox::new("idlecpu").await;
        let decisions = format!("{}.commits", ob.table);
        let relay = ob.spawn_relay(&[
            ("OUTBOX_RELAY__RELAY__DELIVERY", mode),
            ("OUTBOX_RELAY__RELAY__COMMITS_TOPIC", &decisions),
        ]);
        relay.wait_log("outbox-relay started", Duration::from_secs(60));
        if mode == "exactly-once" {
            relay.wait_log("exactly-once ready", Duration::from_secs(60));
        }
        let share = idle_share(&relay, 30).await;
        eprintln!("{mode}: an idle relay used {:.2} % of a core", share * 100.0);
        assert!(share < 0.015, "{mode}: an idle relay used {:.2} % of a core\n{}", share * 100.0, relay.log());
        let (code, log) = relay.terminate(Duration::from_secs(30));
        assert_eq!(code, Some(0), "{log}");
    }
}
