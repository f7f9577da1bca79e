//! outbox-relay: the transactional outbox pattern for PostgreSQL and Apache Kafka.
//!
//! Modules follow the product's nouns, dependencies pointing one way:
//! `config` → (`store` | `sink`) → `relay` → `daemon` → `cli`. `telemetry`
//! (logging, metric names, named internal events) is a leaf every layer may
//! use; `event` is the one type store and sink share.
// No unsafe code, except two signal calls in the test-only failpoints and
// librdkafka's fatal-error test hook.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod daemon;
pub mod event;
pub mod exit;
pub mod failpoint;
pub mod http;
pub mod relay;
pub mod sink;
pub mod store;
pub mod telemetry;
pub mod verify;
