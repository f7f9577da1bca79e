//! Figures: quantiles, the host, saved results.

use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Debug, serde::Serialize, Clone, Default)]
pub struct Quantiles {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

pub fn quantiles(mut v: Vec<f64>) -> Quantiles {
    if v.is_empty() {
        return Quantiles::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    Quantiles { n: v.len(), p50: q(0.50), p99: q(0.99), p999: q(0.999), max: v[v.len() - 1] }
}

/// The host's CPU model and core count, for the report header.
pub fn host() -> (usize, String) {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    (std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), model)
}

/// Saves `json` under `dir/<date>.json` and returns the path.
pub fn save(dir: &std::path::Path, json: &serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(dir).ok();
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "-");
    let path = dir.join(format!("{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(json).unwrap_or_default()).expect("write results");
    path
}
