//! outbox-relay: the transactional outbox pattern for PostgreSQL and Apache Kafka.
//!
//! Modules follow the product's nouns, dependencies pointing one way:
//! `config` → (`store` | `sink`) → `relay` → `cli`.
// No unsafe code, except two signal calls in the test-only failpoints.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod event;
pub mod failpoint;
pub mod http;
pub mod metrics;
pub mod relay;
pub mod sink;
pub mod store;
pub mod telemetry;
pub mod verify;
