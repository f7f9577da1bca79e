//! What the machine spent: CPU of the whole machine, of one process, of every
//! Postgres process, and the WAL written.

use std::time::Instant;

/// Busy CPU seconds of the whole machine so far (all processes), from /proc/stat.
pub fn machine_busy_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    let f: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum::<f64>() / 100.0
}

/// utime + stime of one process, in seconds.
pub fn proc_cpu_s(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().map_or(0.0, |s| stat_cpu(&s))
}

fn stat_cpu(stat: &str) -> f64 {
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime, stime, cutime, cstime (fields 14-17): children count once they are reaped
    (t(11) + t(12) + t(13) + t(14)) / 100.0
}

/// CPU seconds of every PostgreSQL process so far (the postmaster with the
/// backends it reaped, and the live backends, autovacuum and WAL writer).
pub fn postgres_cpu_s() -> f64 {
    let mut total = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            if stat.contains("(postgres)") {
                total += stat_cpu(&stat);
            }
        }
    }
    total
}

pub fn proc_peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// WAL written so far, in bytes.
pub async fn wal_bytes(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await.expect("wal lsn").get(0)
}

/// What the machine spent over an interval: wall time, Postgres CPU, WAL.
pub struct Meter {
    t: Instant,
    pg_cpu: f64,
    wal: i64,
    machine: f64,
}

#[derive(Debug, Clone, Copy, serde::Serialize, Default)]
pub struct Spent {
    pub seconds: f64,
    pub postgres_cpu_s: f64,
    pub wal_bytes: i64,
    pub machine_cpu_s: f64,
}

impl Meter {
    pub async fn start(db: &tokio_postgres::Client) -> Meter {
        Meter { t: Instant::now(), pg_cpu: postgres_cpu_s(), wal: wal_bytes(db).await, machine: machine_busy_s() }
    }

    pub async fn stop(&self, db: &tokio_postgres::Client) -> Spent {
        Spent {
            seconds: self.t.elapsed().as_secs_f64(),
            postgres_cpu_s: postgres_cpu_s() - self.pg_cpu,
            wal_bytes: wal_bytes(db).await - self.wal,
            machine_cpu_s: machine_busy_s() - self.machine,
        }
    }
}
