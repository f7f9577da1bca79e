//! The chaos run's relays: spawned (each incarnation appends to its slot's
//! log), SIGKILLed and restarted, switched between delivery modes, revived
//! when they exit by themselves; every disruption recorded with the relay it
//! struck, for the duplicate accounting.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use outbox_relay_support::accounting::Disruption;
use outbox_relay_support::{relay_bin, RelayProcess, Stderr};

use super::now_ms;

/// What a disruption was (for the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    Kill,
    CrashPoint,
    SelfExit,
    KafkaOutage,
    PostgresRestart,
    Freeze,
    ModeSwitch,
    LeaderKill,
    BrokerRestart,
    CoordinatorKill,
    TwoBrokersDown,
}

pub struct Relays {
    pub env: Vec<(String, String)>,
    pub config: PathBuf,
    pub logs: PathBuf,
    pub children: Vec<RelayProcess>,
    /// The delivery mode each relay runs now (a rolling switch changes it).
    pub modes: Vec<bool>,
    pub base_exactly_once: bool,
    pub kills: usize,
    armed: Vec<bool>,
    pub failpoint_kills: usize,
    pub frozen: Option<usize>,
    /// What was done, to which relay (`None`: all), with its cause.
    pub disruptions: Vec<(Disruption, Cause)>,
}

/// A relay's `relay.id`: its slot.
pub fn relay_id(i: usize) -> String {
    format!("chaos-{i}")
}

impl Relays {
    pub fn new(env: Vec<(String, String)>, config: PathBuf, logs: PathBuf, n: usize, exactly_once: bool) -> Relays {
        let mut relays = Relays {
            env,
            config,
            logs,
            children: Vec::new(),
            modes: vec![exactly_once; n],
            base_exactly_once: exactly_once,
            kills: 0,
            armed: vec![false; n],
            failpoint_kills: 0,
            frozen: None,
            disruptions: Vec::new(),
        };
        for i in 0..n {
            let c = relays.spawn(i);
            relays.children.push(c);
        }
        relays
    }

    /// A disruption that struck relay `i` (or all) now.
    pub fn struck(&mut self, i: Option<usize>, cause: Cause) {
        let t = now_ms();
        self.disruptions.push((Disruption { from: t, to: t, relay: i.map(relay_id) }, cause));
    }

    /// A window that struck every relay.
    pub fn window(&mut self, from: i64, to: i64, relay: Option<usize>, cause: Cause) {
        self.disruptions.push((Disruption { from, to, relay: relay.map(relay_id) }, cause));
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.logs.join(format!("relay-{i}.log"))
    }

    fn spawn(&mut self, i: usize) -> RelayProcess {
        let mut cmd = Command::new(relay_bin());
        let exactly_once = self.modes[i];
        // Relay 0 lives through the whole run and is slow: every batch takes 1 ms
        // longer per event (a relay stalled behind a slow database or host).
        let mut failpoints = Vec::new();
        if i == 0 {
            let point = if exactly_once { "after-kafka-send" } else { "after-send" };
            failpoints.push(format!("{point}=delay-per-event:1"));
        }
        // Exactly-once: half the other starts arm a crash point of the protocol.
        let armed = i > 0 && exactly_once && fastrand::bool();
        if armed {
            let points = outbox_relay::failpoint::POINTS;
            failpoints.push(format!("{}=crash@{}", points[fastrand::usize(0..points.len())], fastrand::u32(1..=4)));
        }
        if !failpoints.is_empty() {
            cmd.env(outbox_relay::failpoint::ENV, failpoints.join(","));
        }
        self.armed[i] = armed;
        cmd.envs(self.env.iter().cloned())
            .env("OUTBOX_RELAY__RELAY__ID", relay_id(i))
            .env("OUTBOX_RELAY__RELAY__DELIVERY", if exactly_once { "exactly-once" } else { "at-least-once" })
            .arg("--config")
            .arg(&self.config)
            .arg("run");
        RelayProcess::spawn(cmd, Stderr::File(self.log_path(i)))
    }

    /// Relays that may be SIGKILLed now: not relay 0 (long-lived), not the
    /// frozen one, and in an exactly-once run not those switched to
    /// at-least-once (their duplicates would be that mode's, not a failure).
    pub fn killable(&self) -> Vec<usize> {
        (1..self.children.len())
            .filter(|&i| Some(i) != self.frozen && (!self.base_exactly_once || self.modes[i]))
            .collect()
    }

    pub fn kill_and_restart(&mut self, i: usize) {
        self.struck(Some(i), Cause::Kill);
        let old = std::mem::replace(&mut self.children[i], RelayProcess::placeholder());
        old.kill9();
        self.kills += 1;
        self.children[i] = self.spawn(i);
    }

    /// Graceful restart in `exactly_once` mode (a rolling deploy).
    pub fn switch(&mut self, i: usize, exactly_once: bool) {
        self.struck(Some(i), Cause::ModeSwitch);
        let old = std::mem::replace(&mut self.children[i], RelayProcess::placeholder());
        if !old.stop(Duration::from_secs(60)) {
            eprintln!("chaos: relay {i} did not stop cleanly on SIGTERM during the mode switch");
        }
        self.modes[i] = exactly_once;
        self.children[i] = self.spawn(i);
    }

    /// The moment relay `i` last crashed at its failpoint (`at_ms=` of the
    /// failpoint's line in its log).
    fn crash_moment(&self, i: usize) -> Option<i64> {
        let text = std::fs::read_to_string(self.log_path(i)).ok()?;
        let line = text.lines().rev().find(|l| l.starts_with("failpoint "))?;
        line.rsplit_once("at_ms=")?.1.trim().parse().ok()
    }

    /// Restarts any relay that exited by itself (it should not; counted).
    pub fn revive(&mut self) -> usize {
        let mut revived = 0;
        for i in 0..self.children.len() {
            let Some(status) = self.children[i].exited() else { continue };
            if self.armed[i] && status.code().is_none() {
                // killed itself at its crash point, as armed
                self.failpoint_kills += 1;
                // when it crashed (its log says), not when we noticed: the
                // loop may have been busy with a step for seconds meanwhile
                let at = self.crash_moment(i).unwrap_or_else(now_ms);
                self.window(at, at, Some(i), Cause::CrashPoint);
                self.children[i] = self.spawn(i);
                continue;
            }
            eprintln!("chaos: relay {i} exited by itself ({status}); restarting. Its last log lines:");
            let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(3)..] {
                eprintln!("    {l}");
            }
            self.struck(Some(i), Cause::SelfExit);
            self.children[i] = self.spawn(i);
            revived += 1;
        }
        revived
    }

    /// Stops every relay with SIGTERM; returns how many exited 0.
    pub fn stop_all(&mut self) -> usize {
        std::mem::take(&mut self.children).into_iter().map(|c| c.stop(Duration::from_secs(60))).filter(|ok| *ok).count()
    }
}
