//! The relay binary and how to start it against the local infrastructure.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::infra::infra;

/// The `outbox-relay` binary: `OUTBOX_RELAY_BIN` when set, else the one
/// Cargo built beside the running executable (an integration test in
/// `target/<profile>/deps/`, a harness in `target/<profile>/`).
pub fn relay_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("OUTBOX_RELAY_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current exe");
        let candidates: Vec<PathBuf> =
            exe.ancestors().skip(1).take(2).map(|d| d.join("outbox-relay")).filter(|p| p.is_file()).collect();
        candidates.into_iter().next().unwrap_or_else(|| {
            panic!("no outbox-relay binary beside {}: build it (cargo build) or set OUTBOX_RELAY_BIN", exe.display())
        })
    })
    .clone()
}

/// `outbox-relay` with a clean environment: the local infrastructure, `table`,
/// no HTTP endpoint, `relay.id` = the table, a 20 s start-up bound, then the
/// `OUTBOX_RELAY__…` pairs of `extra` on top.
pub fn relay_cmd(table: &str, extra: &[(&str, &str)]) -> Command {
    with_relay_env(Command::new(relay_bin()), table, extra)
}

/// [`relay_cmd`] with another binary (the bench's `--before-bin`).
pub fn relay_cmd_with(bin: &std::path::Path, table: &str, extra: &[(&str, &str)]) -> Command {
    with_relay_env(Command::new(bin), table, extra)
}

/// [`relay_cmd`] inside network namespace `netns` (`ip netns exec`, root;
/// see `scripts/infra netns`), reaching Postgres at `pg_host` instead.
pub fn relay_cmd_in_netns(netns: &str, pg_host: &str, table: &str, extra: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(relay_bin());
    let url = infra().pg_url.replace("127.0.0.1", pg_host).replace("localhost", pg_host);
    let mut pairs = vec![("OUTBOX_RELAY__POSTGRES__URL", url.as_str())];
    pairs.extend_from_slice(extra);
    with_relay_env(cmd, table, &pairs)
}

fn with_relay_env(mut cmd: Command, table: &str, extra: &[(&str, &str)]) -> Command {
    let i = infra();
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OUTBOX_RELAY__POSTGRES__URL", &i.pg_url)
        .env("OUTBOX_RELAY__KAFKA__BROKERS", &i.brokers)
        .env("OUTBOX_RELAY__OUTBOX__TABLE", table)
        .env("OUTBOX_RELAY__HTTP__LISTEN", "")
        .env("OUTBOX_RELAY__RELAY__ID", table)
        .env("OUTBOX_RELAY__RELAY__STARTUP_TIMEOUT", "20s")
        .env("OUTBOX_RELAY__LOG__LEVEL", "info,librdkafka=error")
        .current_dir(std::env::temp_dir());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

/// Settings as owned pairs.
pub fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Owned pairs as borrowed ones, for [`relay_cmd`].
pub fn borrowed(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A free local TCP port (for `http.listen`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// `GET path` on a local port: (status code, body); `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}

/// One metric's value (summed over its labels) from a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let base = series.split('{').next().unwrap_or(series);
        if base == name {
            *found.get_or_insert(0.0) += value.parse::<f64>().ok()?;
        }
    }
    found
}
