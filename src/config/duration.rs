//! Durations as human strings: `500ms`, `10s`, `5m`, `7d`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(s.trim()).map_err(|e| {
        serde::de::Error::custom(format!("invalid duration {s:?} ({e}); use e.g. \"500ms\", \"10s\", \"5m\", \"7d\""))
    })
}
