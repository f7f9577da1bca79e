//! Crash points for tests (the exactly-once protocol's steps; `after-claim`
//! also in at-least-once mode).
//!
//! Inactive unless `OUTBOX_RELAY_FAILPOINTS` is set, e.g.
//! `OUTBOX_RELAY_FAILPOINTS=after-prepare=crash` or `after-kafka-commit=pause`.
//! `crash` kills the process with SIGKILL (no clean-up, like a power cut);
//! `pause` stops it with SIGSTOP (a zombie until someone sends SIGCONT).
//! An optional `@N` fires on the N-th hit only: `after-claim=crash@3`.
//! `delay:<ms>` makes the calling thread stand still that long (the process
//! freezing, as a VM or cgroup stall would). Points: `after-claim-response`
//! (the claim's rows arrived, before anything else), `after-claim`,
//! `after-kafka-send`, `after-prepare`, `after-kafka-commit`,
//! `after-commit-prepared`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const ENV: &str = "OUTBOX_RELAY_FAILPOINTS";
/// The exactly-once protocol's steps (chaos arms one of these at random).
pub const POINTS: &[&str] =
    &["after-claim", "after-kafka-send", "after-prepare", "after-kafka-commit", "after-commit-prepared"];
/// Every point: the protocol's, and `after-send` (at-least-once: a batch was
/// handed to the producer).
pub const ALL_POINTS: &[&str] = &[
    "after-claim-response",
    "after-claim",
    "after-send",
    "after-kafka-send",
    "after-prepare",
    "after-kafka-commit",
    "after-commit-prepared",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL the process.
    Crash,
    /// SIGSTOP the calling thread (and so the process).
    Pause,
    /// Make the Kafka producer fail fatally (librdkafka's test hook).
    Fatal,
    /// Sleep this many milliseconds per event of the batch, on every hit from the
    /// N-th on (a slow batch).
    DelayPerEvent(u64),
    /// Stand still this many milliseconds, once (a frozen process).
    Delay(u64),
}

#[derive(Debug)]
struct Point {
    action: Action,
    nth: u64,
    hits: AtomicU64,
}

fn points() -> &'static HashMap<String, Point> {
    static POINTS_SET: OnceLock<HashMap<String, Point>> = OnceLock::new();
    POINTS_SET.get_or_init(|| match std::env::var(ENV) {
        Ok(spec) => parse(&spec).unwrap_or_else(|e| {
            tracing::error!("{ENV} ignored: {e}");
            HashMap::new()
        }),
        Err(_) => HashMap::new(),
    })
}

fn parse(spec: &str) -> Result<HashMap<String, Point>, String> {
    let mut out = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, rest) = item.split_once('=').ok_or_else(|| format!("{item:?}: expected point=action"))?;
        if !ALL_POINTS.contains(&name) {
            return Err(format!("unknown failpoint {name:?}; known: {}", ALL_POINTS.join(", ")));
        }
        let (action, nth) = match rest.split_once('@') {
            Some((a, n)) => (a, n.parse::<u64>().map_err(|_| format!("{item:?}: @N must be a number"))?),
            None => (rest, 1),
        };
        let action = match action.split_once(':') {
            None if action == "crash" => Action::Crash,
            None if action == "pause" => Action::Pause,
            None if action == "fatal" => Action::Fatal,
            Some(("delay-per-event", ms)) => {
                Action::DelayPerEvent(ms.parse().map_err(|_| format!("{item:?}: delay-per-event:<ms>"))?)
            }
            Some(("delay", ms)) => Action::Delay(ms.parse().map_err(|_| format!("{item:?}: delay:<ms>"))?),
            _ => {
                return Err(format!(
                    "{item:?}: unknown action {action:?}; use crash, pause, fatal, delay:<ms> or delay-per-event:<ms>"
                ))
            }
        };
        out.insert(name.to_string(), Point { action, nth: nth.max(1), hits: AtomicU64::new(0) });
    }
    Ok(out)
}

/// Checks `OUTBOX_RELAY_FAILPOINTS` (if set) so that a typo is an error at
/// start-up rather than a crash point that silently never fires.
pub fn validate_env() -> Result<(), String> {
    match std::env::var(ENV) {
        Ok(spec) => parse(&spec).map(|_| ()).map_err(|e| format!("{ENV}: {e}")),
        Err(_) => Ok(()),
    }
}

/// Marks a crash point; does nothing unless the environment arms it.
pub fn hit(name: &str) {
    hit_batch(name, 0);
}

/// Like [`hit`] for a point in a batch of `events` events. Returns `Some(Fatal)`
/// when the caller must make its producer fail (it owns the producer).
pub fn hit_batch(name: &str, events: usize) -> Option<Action> {
    let point = points().get(name)?;
    let n = point.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if let Action::DelayPerEvent(ms) = point.action {
        if n >= point.nth {
            std::thread::sleep(std::time::Duration::from_millis(ms * events as u64));
        }
        return None;
    }
    if n != point.nth {
        return None;
    }
    // the moment, for the chaos run's duplicate accounting (ms since the epoch)
    let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    eprintln!("failpoint {name}: {:?} (hit {n}) at_ms={at_ms}", point.action);
    match point.action {
        // SIGKILL: no clean-up, like a power cut.
        Action::Crash => {
            #[allow(unsafe_code)]
            // SAFETY: plain syscalls on our own process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL)
            };
            std::process::abort();
        }
        // SIGSTOP directed at this very thread: it stops before it returns from
        // the call, so the batch cannot take one more step (a signal sent to the
        // process as a whole may be taken by another thread first, and this one
        // would run on for a moment — long enough to send COMMIT PREPARED). The
        // call returns after SIGCONT, as a zombie relay would resume.
        Action::Pause => {
            #[allow(unsafe_code)]
            // SAFETY: raise(3) has no memory-safety preconditions.
            unsafe {
                libc::raise(libc::SIGSTOP)
            };
        }
        Action::Fatal => return Some(Action::Fatal),
        Action::Delay(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
        Action::DelayPerEvent(_) => {}
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        let p = parse("after-claim=crash, after-prepare=pause@3").unwrap();
        assert_eq!(p["after-claim"].action, Action::Crash);
        assert_eq!(p["after-prepare"].action, Action::Pause);
        assert_eq!(p["after-prepare"].nth, 3);
        assert!(parse("before-claim=crash").unwrap_err().contains("unknown failpoint"));
        assert!(parse("after-claim=explode").unwrap_err().contains("unknown action"));
        assert_eq!(parse("after-send=fatal@3").unwrap()["after-send"].action, Action::Fatal);
        assert_eq!(
            parse("after-kafka-send=delay-per-event:20").unwrap()["after-kafka-send"].action,
            Action::DelayPerEvent(20)
        );
        assert!(parse("after-claim").unwrap_err().contains("point=action"));
        assert_eq!(
            parse("after-claim-response=delay:8000").unwrap()["after-claim-response"].action,
            Action::Delay(8000)
        );
    }
}
